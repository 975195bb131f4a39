"""The speculative step loop over a continuously batched set of requests.

One ``step()`` for every running sequence at once:

  1. schedule     Scheduler.schedule: grow running sequences' block tables (preempting
                  the newest if the cache is full), admit waiting requests while blocks last
  2. choose k     the speculation controller's chain length, capped per sequence by
                  max_tokens and the context; the fixed-shape runner when it can run the
                  batch, else the eager one
  3. runner.run   draft -> verify (one target forward over each sequence's uncached
                  tokens + its drafts) -> accept (rejection sampling) -> StepResult
  4. fetch        the one device-to-host copy of the step; tree steps then move each
                  accepted path's K/V to consecutive positions (keep-path)
  5. postprocess  Scheduler.postprocess: the target cache stays valid up to the accepted
                  drafts, tokens append until EOS / stop ids / stop strings / max_tokens /
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
  drafts, a draft model's cache lagging after plain steps) take the eager runner
  (specdec/runners/eager.py). Both return a ``StepResult``.
"""

from __future__ import annotations

import time

import torch

from .cuda_graphs import sampling_mode
from .drafters.base import Drafter
from .kv_cache import BlockManager, KVCache
from .models.llama import LlamaForCausalLM
from .runners.eager import EagerRunner
from .runners.result import StepResult
from .scheduler import NonFiniteLogitsError, Scheduler
from .sequence import RequestMetrics, Sequence
from .speculation import AdaptiveSpeculation, StepClock
from .warmup import warm_up_eager

__all__ = ["Engine", "NonFiniteLogitsError"]


class Engine:
    """Runs sequences to completion; ``LLM`` builds it, tests may drive it directly.

    runner: the fixed-shape ``DecodeRunner`` (specdec/cuda_graphs.py) or None; steps it
            cannot run take the eager runner (``self.eager``)
    """

    def __init__(self, target: LlamaForCausalLM, cache: KVCache, blocks: BlockManager, ops,
                 drafter: Drafter, num_draft_tokens: int, eos_token_ids=(), max_num_seqs: int = 64,
                 tokenizer=None, draft_depth: int | None = None, speculation: AdaptiveSpeculation | None = None,
                 runner=None):
        self.target, self.cache, self.blocks = target, cache, blocks
        self.drafter = drafter
        self.num_draft_tokens = num_draft_tokens  # cache slots a step's drafts use (tree nodes)
        self.draft_depth = num_draft_tokens if draft_depth is None else draft_depth  # drafts on one path
        self.max_num_seqs = max_num_seqs
        self.max_context = target.config.max_position_embeddings
        self.device = cache.k.device
        self.speculation = speculation
        self.runner = runner  # a DecodeRunner (specdec/cuda_graphs.py) for fixed-shape decode steps, or None
        self.eager = EagerRunner(target, cache, ops, drafter)
        self.scheduler = Scheduler(blocks, drafter, num_draft_tokens=num_draft_tokens, draft_depth=self.draft_depth,
                                   max_num_seqs=max_num_seqs, max_context=self.max_context,
                                   vocab_size=target.config.vocab_size, eos_token_ids=eos_token_ids,
                                   tokenizer=tokenizer)
        self.clock = StepClock(self.device)
        self.last_k = self.draft_depth  # the chain length the latest step asked for
        self.busy_seconds = 0.0  # wall time spent inside step()

    # ------------------------------------------------------------------ requests
    @property
    def ops(self):
        """The kernel backend of the eager path (the fixed-shape runner holds its own)."""
        return self.eager.ops

    @ops.setter
    def ops(self, ops) -> None:
        self.eager.ops = ops

    @property
    def waiting(self):
        return self.scheduler.waiting

    @property
    def running(self) -> list[Sequence]:
        return self.scheduler.running

    @property
    def totals(self) -> RequestMetrics:
        """Every retired request's metrics."""
        return self.scheduler.totals

    def max_tokens_held(self, seq: Sequence) -> int:
        return self.scheduler.max_tokens_held(seq)

    def check_fits(self, seq: Sequence) -> None:
        self.scheduler.check_fits(seq)

    def add(self, seq: Sequence) -> None:
        self.scheduler.add(seq)

    def has_work(self) -> bool:
        return self.scheduler.has_work()

    def cancel(self, seq: Sequence) -> None:
        """Stop one request wherever it is (finish reason 'abort') and release its blocks."""
        self.scheduler.cancel(seq)

    def abort_all(self) -> list[Sequence]:
        """Cancel every request (finish reason 'abort'); returns them."""
        return self.scheduler.abort_all()

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
            seqs = self.scheduler.schedule()  # 1. schedule
            if seqs:
                try:
                    self._step(seqs)  # 2-5
                except Exception as error:
                    self._step_each(seqs, error)
            return self.scheduler.retire_finished(seqs)
        finally:
            self.busy_seconds += time.perf_counter() - start

    def _step_each(self, seqs: list[Sequence], error: Exception) -> None:
        """After a failed step of ``seqs``: find the request(s) it concerns, each alone."""
        if len(seqs) == 1:
            self.scheduler.fail(seqs[0], error)
            return
        for seq in seqs:
            try:
                self._step([seq])
            except Exception as own:
                self.scheduler.fail(seq, own)

    def _step(self, seqs: list[Sequence]) -> None:
        """choose k -> runner.run -> the one device-to-host copy -> postprocess. Raises
        only before postprocess, after restoring every sequence's cached lengths (what
        the step wrote past them is never read)."""
        saved = [s.target_len for s in seqs], self.drafter.snapshot(seqs)
        try:
            decode_only = all(s.target_len == len(s.tokens) - 1 for s in seqs)
            k, runner, limits, mode = self._plan(seqs)  # 2. choose k
            clock = self.clock if self.speculation is not None else None  # timed for the controller only
            result = runner.run(seqs, self.blocks, limits, mode, clock)  # 3. draft, verify, accept
            result.fetch()  # 4. the one device-to-host copy
            self.eager.keep_paths(seqs, self.blocks, result)
            self.eager.observe(seqs, result)  # features of the committed positions to the drafter
            timing = self._timing(result, k, decode_only)
        except BaseException:
            for seq, target_len in zip(seqs, saved[0], strict=True):
                seq.target_len = target_len
            self.drafter.restore(seqs, saved[1])
            raise
        self.last_k = k
        self._observe(seqs, k, result, timing)
        self.scheduler.postprocess(seqs, result)  # 5. postprocess

    def _plan(self, seqs: list[Sequence]):
        """-> (k, the runner, each sequence's draft limit, the sampling mode)."""
        spec = self.speculation
        k = self.draft_depth if spec is None else spec.choose(len(seqs))
        limits = self.scheduler.draft_limits(seqs, k)
        mode = sampling_mode(seqs)
        if self.runner is None or not self.runner.can_run(seqs, max(limits)):
            return k, self.eager, limits, mode
        k, limits = self._profile_if_new(seqs, k, limits, mode)
        return k, self.runner, limits, mode

    def _timing(self, result: StepResult, k: int, decode_only: bool) -> tuple[float, float] | None:
        """(draft s, verify s) for the controller, from steps like the next one only: no
        prefill, every sequence drafting k, and the fixed-shape path whenever there is one
        (an eager step costs more)."""
        if result.marks is None or not decode_only or any(n != k for n in result.counts):
            return None
        if not (result.fixed_shape or self.runner is None):
            return None
        t0, t1, t2 = result.marks
        return self.clock.seconds(t0, t1), self.clock.seconds(t1, t2)

    def _observe(self, seqs: list[Sequence], k: int, result: StepResult, timing) -> None:
        """Feed the controller the step's acceptance (finite rows) and its cost."""
        spec = self.speculation
        if spec is None:
            return
        ok = result.finite
        spec.observe([n for n, good in zip(result.counts, ok, strict=True) if good],
                     [row[0] for row in result.rows if row[0] >= 0])
        if timing is not None and all(ok):
            spec.record(len(seqs), k, *timing)

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
