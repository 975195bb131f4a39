"""The general step path: any drafter, prefill, chains and trees, ragged batches.

    drafter.propose -> DraftProposal (chain: counts; tree: counts + parents)
    chain: one causal target forward over each sequence's uncached tokens + its drafts
    tree:  prefill the uncached tails causally, then one tree forward over [root, nodes]
    -> rejection sampling (chain or tree) -> StepResult

Every batch is built on the host (specdec/batch.py); nothing here reads the device. After
the engine's device-to-host copy, ``keep_paths`` moves each accepted tree path's K/V to
consecutive positions (a chain's accepted drafts already sit there).
"""

from __future__ import annotations

import itertools

import torch

from ..batch import SamplingTensors, build_forward_batch, build_tree_batch
from ..drafters.base import Drafter
from ..kv_cache import BlockManager, KVCache
from ..sequence import Sequence
from ..tree import tree_layout
from .result import Captured, StepResult


def _cumsum(counts: list[int], device) -> torch.Tensor:
    """[B + 1] int32 cumulative counts, built on the host."""
    return torch.tensor(list(itertools.accumulate(counts, initial=0)), dtype=torch.int32, device=device)


def prefill_tails(model, cache, ops, blocks: BlockManager, seqs: list[Sequence], cached: list[int], device,
                  num_layers: int | None = None, capture: tuple[int, ...] | None = None) -> torch.Tensor | None:
    """Write the K/V of every uncached token but the last (the root of a tree step).

    cached[b]: tokens of sequence b already in ``cache``. A tree forward carries at most
    64 new tokens per sequence, so a prompt (or a sequence back from preemption) is first
    run as a causal chain here; sequences with nothing to prefill are left out.
    capture:   hidden_states indices to capture (``forward_cached``); then returns the
               tails' rows [T, C * H] in sequence order, or None when nothing was prefilled
    """
    todo = [(s, c) for s, c in zip(seqs, cached, strict=True) if c < len(s.tokens) - 1]
    if not todo:
        return None
    tails = [s.tokens[c:-1] for s, c in todo]
    tokens = torch.tensor([t for tail in tails for t in tail], dtype=torch.int64, device=device)
    batch = build_forward_batch(blocks, [s.seq_id for s, _ in todo], [c for _, c in todo],
                                [len(t) for t in tails], [0] * len(todo), tokens, device)
    out = model.forward_cached(batch, cache, ops, num_layers, capture=capture)
    return out[1] if capture else None


def _tree_captured(seqs: list[Sequence], counts: list[int], pre: torch.Tensor | None,
                   hidden: torch.Tensor) -> Captured:
    """Rows of a tree step: ``prefill_tails``' rows (sequences with more than the root
    uncached, in order), then [root, nodes] of every sequence (the tree forward)."""
    fixed, drafts, row = [], [], 0
    for seq in seqs:
        m = max(0, len(seq.tokens) - 1 - seq.target_len)
        fixed.append(list(range(row, row + m)))
        row += m
    for b, n in enumerate(counts):
        fixed[b].append(row)
        drafts.append(list(range(row + 1, row + 1 + n)))
        row += 1 + n
    return Captured(hidden if pre is None else torch.cat([pre, hidden]), fixed, drafts)


class EagerRunner:
    """Draft, verify and accept one step of any batch on the target and its cache.

    target, cache, ops: the target model, its paged KV cache and the kernel backend
    drafter:            any ``Drafter`` (chains or trees, model or host drafts)
    """

    def __init__(self, target, cache: KVCache, ops, drafter: Drafter):
        self.target, self.cache, self.ops, self.drafter = target, cache, ops, drafter
        self.device = cache.k.device

    def run(self, seqs: list[Sequence], blocks: BlockManager, limits: list[int], mode: str,
            clock=None) -> StepResult:
        """One step: at most ``limits[b]`` drafts for sequence b, verified and sampled.

        mode: the batch's sampling mode (keys the fixed-shape runner's graphs; here the
        same facts come from ``SamplingTensors``). clock: a ``StepClock`` to time the
        draft and verify halves, or None.
        """
        mark = clock.mark if clock is not None else lambda: None
        sampling = SamplingTensors.of(seqs, self.device)
        t0 = mark()
        draft = self.drafter.propose(seqs, limits, sampling, self.device)
        t1 = mark()
        if draft.parents is None:
            depths = draft.counts
            (out, n_acc, nodes), captured = self.verify_chain(seqs, blocks, draft, sampling)
        else:
            depths = [max(tree_layout(tuple(p))[0], default=0) for p in draft.parents]
            (out, n_acc, nodes), captured = self.verify_tree(seqs, blocks, draft, sampling, max(depths))
        marks = (t0, t1, mark()) if clock is not None else None
        return StepResult(out, n_acc, nodes, draft.counts, depths, marks, fixed_shape=False, captured=captured)

    def observe(self, seqs: list[Sequence], result: StepResult) -> None:
        """After ``result.fetch()``: hand the drafter the captured target features of each
        sequence's newly committed positions (drafters with ``capture_layers`` only)."""
        if result.captured is None:
            return
        todo, rows, nexts = result.captured.committed(seqs, result.rows, result.host_paths)
        self.drafter.observe(todo, result.captured.hidden, rows, nexts)

    def verify_chain(self, seqs, blocks, draft, sampling):
        """Uncached tokens + a chain of drafts per sequence, one causal forward ->
        ((out, n_accepted, None), the captured features or None)."""
        dev = self.device
        tails = [s.tokens[s.target_len:] for s in seqs]
        lengths = [len(t) + n for t, n in zip(tails, draft.counts, strict=True)]
        flat: list[int] = []
        draft_pos: list[int] = []
        offset = 0
        for tail, n, length in zip(tails, draft.counts, lengths, strict=True):
            flat += tail + [0] * n
            draft_pos += range(offset + len(tail), offset + length)
            offset += length
        tokens = torch.tensor(flat, dtype=torch.int64, device=dev)
        tokens[torch.tensor(draft_pos, dtype=torch.int64, device=dev)] = draft.tokens
        batch = build_forward_batch(blocks, [s.seq_id for s in seqs], [s.target_len for s in seqs],
                                    lengths, [n + 1 for n in draft.counts], tokens, dev)
        capture = self.drafter.capture_layers or None
        logits = self.target.forward_cached(batch, self.cache, self.ops, capture=capture)  # [sum(n_b + 1), V]
        captured = None
        if capture:
            logits, hidden = logits
            starts = list(itertools.accumulate(lengths, initial=0))[:-1]  # first row of each sequence
            captured = Captured(hidden, [list(range(o, o + len(t))) for o, t in zip(starts, tails, strict=True)],
                                [list(range(o + len(t), o + n))
                                 for o, t, n in zip(starts, tails, lengths, strict=True)])
        out, n_acc = self.ops.rejection_sample(
            logits, draft.tokens, draft.q, _cumsum(draft.counts, dev), max(draft.counts),
            sampling.temperature, sampling.top_k, sampling.top_p, sampling.seeds, sampling.offsets,
            check_finite=False, filtered=sampling.filtered, radix_rounds=sampling.radix_rounds,
        )
        return (out, n_acc, None), captured

    def verify_tree(self, seqs, blocks, draft, sampling, max_depth: int):
        """Prefill long tails causally, then one tree forward over [root, nodes...] ->
        ((out, n_accepted, paths), the captured features or None)."""
        dev = self.device
        capture = self.drafter.capture_layers or None
        pre = prefill_tails(self.target, self.cache, self.ops, blocks, seqs, [s.target_len for s in seqs], dev,
                            capture=capture)
        roots = [len(s.tokens) - 1 for s in seqs]
        flat: list[int] = []
        node_pos: list[int] = []
        for seq, n in zip(seqs, draft.counts, strict=True):
            node_pos += range(len(flat) + 1, len(flat) + 1 + n)
            flat += [seq.tokens[-1]] + [0] * n
        tokens = torch.tensor(flat, dtype=torch.int64, device=dev)
        tokens[torch.tensor(node_pos, dtype=torch.int64, device=dev)] = draft.tokens
        batch = build_tree_batch(blocks, [s.seq_id for s in seqs], roots, draft.parents, tokens, dev)
        logits = self.target.forward_cached(batch, self.cache, self.ops, capture=capture)  # [sum(1 + N_b), V]
        captured = None
        if capture:
            logits, hidden = logits
            captured = _tree_captured(seqs, draft.counts, pre, hidden)
        parents = torch.tensor([p for ps in draft.parents for p in ps], dtype=torch.int32, device=dev)
        return self.ops.tree_rejection_sample(
            logits, draft.tokens, parents, draft.q, _cumsum(draft.counts, dev), max_depth,
            sampling.temperature, sampling.top_k, sampling.top_p, sampling.seeds, sampling.offsets,
            check_finite=False, radix_rounds=sampling.radix_rounds,
        ), captured

    def keep_paths(self, seqs: list[Sequence], blocks: BlockManager, result: StepResult) -> None:
        """After ``result.fetch()``: compact the accepted tree paths of the finite rows."""
        if result.host_paths is None:
            return
        good = [i for i, ok in enumerate(result.finite) if ok]
        self.keep_path(blocks, [seqs[i] for i in good], [result.rows[i][0] for i in good],
                       [result.host_paths[i] for i in good])

    def keep_path(self, blocks, seqs, accepted: list[int], paths: list[list[int]]) -> None:
        """Move each accepted path's K/V from its node slots to consecutive positions."""
        src, dst = [], []
        for seq, a, path in zip(seqs, accepted, paths, strict=True):
            base = len(seq.tokens)  # node i sits at position base + i, path step k goes to base + k
            moved = [(base + node, base + k) for k, node in enumerate(path[:a]) if node != k]
            if moved:
                src += blocks.slots(seq.seq_id, [m[0] for m in moved])
                dst += blocks.slots(seq.seq_id, [m[1] for m in moved])
        if src:
            src_t = torch.tensor(src, dtype=torch.int64, device=self.device)
            dst_t = torch.tensor(dst, dtype=torch.int64, device=self.device)
            self.cache.keep_path(src_t, dst_t)
            self.drafter.keep_path(src_t, dst_t)
