"""The speculative step loop over a continuously batched set of requests.

One ``step()`` for every running sequence at once:

  1. schedule  grow running sequences' block tables (preempting the newest if the cache
               is full), admit waiting requests while blocks last
  2. draft     drafter.propose -> n_b draft tokens per sequence (ragged, n_b may be 0)
  3. verify    one target forward over each sequence's uncached tokens + its drafts
               -> logits of the last committed token and of every draft token
  4. accept    rejection_sample -> accepted drafts + one sampled token per sequence
  5. commit    the one device-to-host copy of the step; keep-path: the target cache
               stays valid up to the accepted drafts, the rest of the blocks go back
  6. emit      append tokens, stop on EOS / stop ids / stop strings / max_tokens /
               context; finished sequences leave and free their blocks

Failures stay with the requests they concern. A step that raises is rolled back (no
token appended, each sequence's cached lengths restored) and, when it held several
sequences, re-run one sequence at a time: a sequence whose own step raises finishes
with reason 'error' and the exception in ``seq.error``, the others advance as usual.
Non-finite logits are detected per row and finish only their request. A
``BaseException`` (KeyboardInterrupt) rolls the step back and propagates: every request
is left as it was, and the caller cancels its own.

Prefill is not a separate phase: a new sequence's uncached tokens are its whole prompt,
so its first verify forward is its prefill (chunk-free, ragged with the decodes).

Two things shape a step when they are given:

* ``speculation`` (specdec/speculation.py) picks the chain length k of each step from the
  measured acceptance and the measured cost of both halves at this batch size; 0 makes
  the step plain decoding.
* ``runner`` (specdec/cuda_graphs.py) runs steps where every sequence is past its prefill
  on static buffers — replayed CUDA graphs on a GPU. Other steps (prefill, trees, n-gram
  drafts, a draft model's cache lagging after plain steps) take the general path below.
"""

from __future__ import annotations

import time
from collections import deque

import torch

from .batch import SamplingTensors, build_forward_batch, build_tree_batch, prefill_tails
from .cuda_graphs import StepClock, sampling_mode
from .detokenize import stop_window_text
from .drafters.base import Drafter
from .kv_cache import BlockManager, CacheCapacityError, KVCache, cdiv
from .models.llama import LlamaForCausalLM
from .sequence import RequestMetrics, Sequence, Status
from .speculation import AdaptiveSpeculation
from .tree import tree_layout
from .warmup import warm_up_eager


def _cumsum(counts: list[int], device) -> torch.Tensor:
    """[B + 1] int32 cumulative counts, built on the host."""
    cu = [0]
    for n in counts:
        cu.append(cu[-1] + n)
    return torch.tensor(cu, dtype=torch.int32, device=device)


class NonFiniteLogitsError(RuntimeError):
    """The target produced NaN or +inf logits for a request."""


class Engine:
    """Runs sequences to completion; ``LLM`` builds it, tests may drive it directly."""

    def __init__(self, target: LlamaForCausalLM, cache: KVCache, blocks: BlockManager, ops,
                 drafter: Drafter, num_draft_tokens: int, eos_token_ids=(), max_num_seqs: int = 64,
                 tokenizer=None, draft_depth: int | None = None, speculation: AdaptiveSpeculation | None = None):
        self.target, self.cache, self.blocks, self.ops = target, cache, blocks, ops
        self.drafter = drafter
        self.num_draft_tokens = num_draft_tokens  # cache slots a step's drafts use (tree nodes)
        self.draft_depth = num_draft_tokens if draft_depth is None else draft_depth  # drafts on one path
        self.eos_token_ids = frozenset(eos_token_ids)
        self.max_num_seqs = max_num_seqs
        self.tokenizer = tokenizer
        self.max_context = target.config.max_position_embeddings
        self.device = cache.k.device
        self.speculation = speculation
        self.runner = None  # a DecodeRunner (specdec/cuda_graphs.py), attached by LLM when it uses one
        self._captured = None  # eagle3: (hidden, fixed rows, draft rows) of the latest verify forward
        self.clock = StepClock(self.device)
        self.last_k = self.draft_depth  # the chain length the latest step asked for
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.totals = RequestMetrics()  # every retired request's metrics
        self.busy_seconds = 0.0  # wall time spent inside step()

    # ------------------------------------------------------------------ requests
    def max_tokens_held(self, seq: Sequence) -> int:
        """The most cache slots ``seq`` can ever occupy (prompt, output, drafts)."""
        total = min(seq.num_prompt + seq.params.max_tokens, self.max_context)
        return total + self.num_draft_tokens

    def check_fits(self, seq: Sequence) -> None:
        need = cdiv(self.max_tokens_held(seq), self.blocks.block_size)
        if need > self.blocks.num_blocks:
            raise CacheCapacityError(
                f"request of {seq.num_prompt} prompt tokens + max_tokens={seq.params.max_tokens} "
                f"needs {need} KV blocks of {self.blocks.block_size} tokens but the cache has only "
                f"{self.blocks.num_blocks}: raise the KV-cache budget or lower max_tokens"
            )

    def add(self, seq: Sequence) -> None:
        self.check_fits(seq)
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def cancel(self, seq: Sequence) -> None:
        """Stop one request wherever it is (finish reason 'abort') and release its blocks;
        a request that already finished is left as it is."""
        if seq.finished:
            return
        self._finish(seq, "abort")
        self._retire(seq)

    def abort_all(self) -> list[Sequence]:
        """Cancel every request (finish reason 'abort'); returns them."""
        dropped = self.running + list(self.waiting)
        for seq in dropped:
            self.cancel(seq)
        return dropped

    def _fail(self, seq: Sequence, error: Exception) -> None:
        seq.error = error
        self._finish(seq, "error")

    def _retire(self, seq: Sequence) -> None:
        """A finished request leaves the engine: blocks freed, metrics counted once."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.blocks.free(seq.seq_id)
        self.totals.merge(seq.metrics)

    # ------------------------------------------------------------------ scheduling
    def _slots_needed(self, seq: Sequence) -> int:
        return len(seq.tokens) + self.num_draft_tokens

    def _preempt(self, seq: Sequence) -> None:
        # recompute-style preemption: drop the cache, keep the tokens, re-queue first
        self.blocks.free(seq.seq_id)
        seq.reset_cache_state()
        seq.status = Status.WAITING
        self.running.remove(seq)
        self.waiting.appendleft(seq)

    def _schedule(self) -> None:
        for seq in list(self.running):  # oldest first
            if seq not in self.running:
                continue
            while self.blocks.blocks_needed(seq.seq_id, self._slots_needed(seq)) > self.blocks.num_free_blocks:
                self._preempt(self.running[-1])
                if seq not in self.running:
                    break
            else:
                self.blocks.allocate(seq.seq_id, self._slots_needed(seq))
        while self.waiting and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            if self.blocks.blocks_needed(seq.seq_id, self._slots_needed(seq)) > self.blocks.num_free_blocks:
                break
            self.blocks.allocate(seq.seq_id, self._slots_needed(seq))
            seq.status = Status.RUNNING
            self.running.append(self.waiting.popleft())

    def _draft_limit(self, seq: Sequence) -> int:
        # no drafts past max_tokens (the step always adds one sampled token) or the context
        left = min(seq.params.max_tokens - seq.num_generated, self.max_context - len(seq.tokens))
        return max(0, min(self.draft_depth, left - 1))

    # ------------------------------------------------------------------ the step
    @torch.inference_mode()
    def step(self) -> list[Sequence]:
        """Advance every running sequence by one speculative step; returns those that
        finished in it (stopped, at their length, or failed with reason 'error').

        An ``Exception`` never escapes: the step is rolled back and re-run one sequence
        at a time, and only a sequence whose own step raises fails (see the module
        docstring). A ``BaseException`` rolls the step back and propagates.
        """
        start = time.perf_counter()
        try:
            self._schedule()
            seqs = list(self.running)
            if not seqs:
                return []
            try:
                self._step(seqs)
            except Exception as error:
                if len(seqs) == 1:
                    self._fail(seqs[0], error)
                else:  # find the request(s) it concerns: each alone
                    for seq in seqs:
                        try:
                            self._step([seq])
                        except Exception as own:
                            self._fail(seq, own)
            finished = [s for s in seqs if s.finished]
            for seq in finished:
                self._retire(seq)
            return finished
        finally:
            self.busy_seconds += time.perf_counter() - start

    def _step(self, seqs: list[Sequence]) -> None:
        """One step of ``seqs`` (running, with their blocks allocated): compute, then
        commit. Raises only from the compute half, after restoring every sequence's
        cached lengths (what the step wrote past them is never read)."""
        saved = [(s.target_len, s.draft_len) for s in seqs]
        try:
            host, counts, depths, k, timing = self._compute(seqs)
        except BaseException:
            for seq, (target_len, draft_len) in zip(seqs, saved):
                seq.target_len, seq.draft_len = target_len, draft_len
            raise
        self.last_k = k
        ok = [row[0] >= 0 for row in host]  # n_accepted < 0: non-finite logits in the row
        spec = self.speculation
        if spec is not None:
            spec.observe([n for n, good in zip(counts, ok) if good], [row[0] for row in host if row[0] >= 0])
            if timing is not None and all(ok):
                spec.record(len(seqs), k, *timing)
        for seq, row, n_draft, depth in zip(seqs, host, counts, depths):
            if row[0] < 0:
                self._fail(seq, NonFiniteLogitsError(
                    f"the target produced NaN or +inf logits for request {seq.seq_id} at step {seq.step}; "
                    "that request was stopped, the others continue. Check the checkpoint and the dtype "
                    "(fp16 overflows on some models)."))
                continue
            try:
                self._commit(seq, row, n_draft, depth)
            except Exception as error:
                self._fail(seq, error)

    def _compute(self, seqs: list[Sequence]):
        """Draft, verify, accept: -> (host rows [B, 1 + (D + 1)] of n_accepted and the
        emitted tokens, draft counts, draft depths, k, the controller's timing or None).
        Appends nothing; moves accepted tree paths in the caches."""
        spec = self.speculation
        k = self.draft_depth if spec is None else spec.choose(len(seqs))
        limits = [min(k, self._draft_limit(s)) for s in seqs]
        clock = self.clock if spec is not None else None  # time the halves only for the controller
        mark = clock.mark if clock is not None else lambda: None
        decode_only = spec is not None and all(s.target_len == len(s.tokens) - 1 for s in seqs)
        nodes = None
        fixed_shape = self.runner is not None and self.runner.can_run(seqs, max(limits))
        if fixed_shape:
            mode = sampling_mode(seqs)
            k, limits = self._profile_if_new(seqs, k, limits, mode)
            out, n_acc, marks = self.runner.run(seqs, self.blocks, limits, mode, clock)
            counts = depths = limits
        else:
            sampling = SamplingTensors.of(seqs, self.device)
            t0 = mark()
            draft = self.drafter.propose(seqs, limits, sampling, self.device)
            t1 = mark()
            counts = draft.counts
            if draft.parents is None:
                depths = draft.counts
                out, n_acc, nodes = self._verify_chain(seqs, draft, sampling)
            else:
                depths = [max(tree_layout(tuple(p))[0], default=0) for p in draft.parents]
                out, n_acc, nodes = self._verify_tree(seqs, draft, sampling, max(depths))
            marks = (t0, t1, mark())

        # -- the one device-to-host copy of the step --
        host = torch.cat([n_acc.to(torch.int64)[:, None], out] + ([nodes.to(torch.int64)] if nodes is not None else []),
                         dim=1).tolist()  # [B, 1 + (D + 1) (+ D)]
        width = out.shape[1]
        if nodes is not None:
            good = [i for i, row in enumerate(host) if row[0] >= 0]
            self._keep_path([seqs[i] for i in good], [host[i][0] for i in good],
                            [host[i][1 + width:] for i in good])
        # -- eagle3 (begin): the drafter reads the committed positions' target features --
        if self._captured is not None:
            self._observe(seqs, host, width)
        # -- eagle3 (end) --
        timing = None
        # time only steps like the next one: no prefill, every sequence drafting k, and
        # the fixed-shape path whenever there is one (an eager step costs more)
        if decode_only and all(n == k for n in counts) and (fixed_shape or self.runner is None):
            t0, t1, t2 = marks
            timing = (clock.seconds(t0, t1), clock.seconds(t1, t2))
        return [row[:1 + width] for row in host], counts, depths, k, timing

    def _commit(self, seq: Sequence, row: list[int], n_draft: int, depth: int) -> None:
        """Append one sequence's accepted drafts and sampled token (row = [a, tokens...])."""
        a = row[0]
        emitted = row[1:a + 2]
        vocab = self.target.config.vocab_size
        bad = [t for t in emitted if not 0 <= t < vocab]
        if bad:
            raise RuntimeError(f"the sampler returned token id(s) {bad} for request {seq.seq_id} at step "
                               f"{seq.step}, outside the vocabulary [0, {vocab}); the request was stopped")
        self.drafter.commit(seq, a)
        seq.target_len = len(seq.tokens) + a  # pending token + accepted drafts are cached
        self.blocks.truncate(seq.seq_id, max(seq.target_len, seq.draft_len))
        seq.step += 1
        n_kept = self._append(seq, emitted)
        seq.metrics.record_step(n_draft, min(a, n_kept), n_kept, depth)

    def warm_up(self, batch_sizes: list[int], modes: tuple[str, ...]) -> int:
        """Compile the general path's kernels (specdec/warmup.py), then capture and time
        the decode steps of these batch sizes and sampling modes ahead of serving; returns
        how many (bucket, mode, k) steps were prepared."""
        warm_up_eager(self, modes, batch_sizes)
        if self.runner is None:
            return 0
        costs = self.runner.warm_up(batch_sizes, modes)
        if self.speculation is not None:
            for (bucket, _, k), (draft_s, verify_s) in costs.items():
                self.speculation.record(bucket, k, draft_s, verify_s, warm=True)
        return len(costs)

    def _profile_if_new(self, seqs, k: int, limits: list[int], mode: str) -> tuple[int, list[int]]:
        """The first graph step at a batch size times every k (capturing its graphs), so
        the controller chooses from measured costs instead of exploring step by step."""
        spec = self.speculation
        if spec is None or not self.runner.use_graphs or spec.has_costs(len(seqs)):
            return k, limits
        for j, (draft_s, verify_s) in self.runner.profile(seqs, self.blocks, mode).items():
            spec.record(len(seqs), j, draft_s, verify_s, warm=True)
        k = spec.choose(len(seqs))  # <= the k profiled from, so the step still qualifies
        return k, [min(k, n) for n in limits]

    def _verify_chain(self, seqs, draft, sampling):
        """Uncached tokens + a chain of drafts per sequence, one causal forward."""
        dev = self.device
        tails = [s.tokens[s.target_len:] for s in seqs]
        lengths = [len(t) + n for t, n in zip(tails, draft.counts)]
        flat, draft_pos, offset = [], [], 0
        for tail, n, length in zip(tails, draft.counts, lengths):
            flat += tail + [0] * n
            draft_pos += range(offset + len(tail), offset + length)
            offset += length
        tokens = torch.tensor(flat, dtype=torch.int64, device=dev)
        tokens[torch.tensor(draft_pos, dtype=torch.int64, device=dev)] = draft.tokens
        batch = build_forward_batch(self.blocks, [s.seq_id for s in seqs], [s.target_len for s in seqs],
                                    lengths, [n + 1 for n in draft.counts], tokens, dev)
        # -- eagle3 (begin) --
        capture = self.drafter.capture_layers or None
        logits = self.target.forward_cached(batch, self.cache, self.ops, capture=capture)  # [sum(n_b + 1), V]
        if capture:
            logits, hidden = logits
            starts = [sum(lengths[:b]) for b in range(len(seqs))]
            self._captured = (hidden, [list(range(o, o + len(t))) for o, t in zip(starts, tails)],
                              [list(range(o + len(t), o + n)) for o, t, n in zip(starts, tails, lengths)])
        # -- eagle3 (end) --
        out, n_acc = self.ops.rejection_sample(
            logits, draft.tokens, draft.q, _cumsum(draft.counts, dev), max(draft.counts),
            sampling.temperature, sampling.top_k, sampling.top_p, sampling.seeds, sampling.offsets,
            check_finite=False, filtered=sampling.filtered, radix_rounds=sampling.radix_rounds,
        )
        return out, n_acc, None

    def _verify_tree(self, seqs, draft, sampling, max_depth: int):
        """Prefill long tails causally, then one tree forward over [root, nodes...]."""
        dev = self.device
        capture = self.drafter.capture_layers or None  # eagle3
        pre = prefill_tails(self.target, self.cache, self.ops, self.blocks, seqs, [s.target_len for s in seqs], dev,
                            capture=capture)
        roots = [len(s.tokens) - 1 for s in seqs]
        flat, node_pos = [], []
        for seq, n in zip(seqs, draft.counts):
            node_pos += range(len(flat) + 1, len(flat) + 1 + n)
            flat += [seq.tokens[-1]] + [0] * n
        tokens = torch.tensor(flat, dtype=torch.int64, device=dev)
        tokens[torch.tensor(node_pos, dtype=torch.int64, device=dev)] = draft.tokens
        batch = build_tree_batch(self.blocks, [s.seq_id for s in seqs], roots, draft.parents, tokens, dev)
        logits = self.target.forward_cached(batch, self.cache, self.ops, capture=capture)  # [sum(1 + N_b), V]
        # -- eagle3 (begin): rows of the prefilled tails, then of [root, nodes] per sequence --
        if capture:
            logits, hidden = logits
            fixed, drafts, row = [], [], 0
            for seq in seqs:  # prefill_tails' rows: sequences with more than the root uncached
                m = max(0, len(seq.tokens) - 1 - seq.target_len)
                fixed.append(list(range(row, row + m)))
                row += m
            for b, n in enumerate(draft.counts):
                fixed[b].append(row)
                drafts.append(list(range(row + 1, row + 1 + n)))
                row += 1 + n
            self._captured = (hidden if pre is None else torch.cat([pre, hidden]), fixed, drafts)
        # -- eagle3 (end) --
        parents = torch.tensor([p for ps in draft.parents for p in ps], dtype=torch.int32, device=dev)
        return self.ops.tree_rejection_sample(
            logits, draft.tokens, parents, draft.q, _cumsum(draft.counts, dev), max_depth,
            sampling.temperature, sampling.top_k, sampling.top_p, sampling.seeds, sampling.offsets,
            check_finite=False, radix_rounds=sampling.radix_rounds,
        )

    def _keep_path(self, seqs, accepted: list[int], paths: list[list[int]]) -> None:
        """Move each accepted path's K/V from its node slots to consecutive positions."""
        src, dst = [], []
        for seq, a, path in zip(seqs, accepted, paths):
            base = len(seq.tokens)  # node i sits at position base + i, path step k goes to base + k
            moved = [(base + node, base + k) for k, node in enumerate(path[:a]) if node != k]
            if moved:
                src += self.blocks.slots(seq.seq_id, [m[0] for m in moved])
                dst += self.blocks.slots(seq.seq_id, [m[1] for m in moved])
        if src:
            src_t = torch.tensor(src, dtype=torch.int64, device=self.device)
            dst_t = torch.tensor(dst, dtype=torch.int64, device=self.device)
            self.cache.keep_path(src_t, dst_t)
            self.drafter.keep_path(src_t, dst_t)

    # -- eagle3 (begin) --
    def _observe(self, seqs, host, width: int) -> None:
        """Hand the drafter the captured rows of each sequence's committed positions
        (fixed rows, then the accepted drafts / path nodes) and the token after each."""
        hidden, fixed, drafts = self._captured
        self._captured = None
        todo, rows, nexts = [], [], []
        for b, (seq, row) in enumerate(zip(seqs, host)):
            a = row[0]
            if a < 0:
                continue
            path = row[1 + width:1 + width + a] if len(row) > 1 + width else range(a)
            r = fixed[b] + [drafts[b][i] for i in path]
            ext = seq.tokens + row[1:a + 2]
            todo.append(seq)
            rows.append(r)
            nexts.append(ext[seq.target_len + 1:seq.target_len + 1 + len(r)])
        self.drafter.observe(todo, hidden, rows, nexts)
    # -- eagle3 (end) --

    # ------------------------------------------------------------------ emit
    def _append(self, seq: Sequence, emitted: list[int]) -> int:
        """Append tokens until a stop condition; returns how many were kept."""
        p = seq.params
        kept = 0
        for tok in emitted:
            seq.tokens.append(tok)
            kept += 1
            if (tok in self.eos_token_ids and not p.ignore_eos) or tok in p.stop_token_ids:
                self._finish(seq, "stop")
            elif p.stop and self._hits_stop_string(seq):
                self._finish(seq, "stop")
            elif seq.num_generated >= p.max_tokens or len(seq.tokens) >= self.max_context:
                self._finish(seq, "length")
            if seq.finished:
                break
        return kept

    def _hits_stop_string(self, seq: Sequence) -> bool:
        if self.tokenizer is None:
            return False
        longest = max(len(s) for s in seq.params.stop)
        tail = stop_window_text(self.tokenizer, seq.tokens, seq.num_prompt, longest)
        return any(s in tail for s in seq.params.stop)

    def _finish(self, seq: Sequence, reason: str) -> None:
        seq.status = Status.FINISHED
        seq.finish_reason = reason
