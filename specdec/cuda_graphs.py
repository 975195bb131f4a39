"""Fixed-shape decode steps, captured as CUDA graphs per (batch bucket, k, sampling mode).

Once every running sequence is past its prefill, a step has the same shape every time:
``W`` tokens per sequence into the first draft forward, one into each of the ``k - 1``
others, ``k + 1`` into the verify forward. ``DecodeRunner`` runs such steps on static
buffers, so the whole draft step (``k`` forwards and their sampling) and the whole verify
step (target forward and rejection sampling) can each be captured once and replayed:

    host:   fill one pinned staging area (tokens, lengths, block tables, sampling)
            -> three async copies into the static inputs
    device: [draft graph] -> [verify graph] -> out [B, k + 1], n_accepted [B]
    host:   the engine's one device-to-host copy of the step

Static inputs (specdec/runners/static.py: ``StaticInputs`` names the fields, ``StaticBatch``
is one bucket's rows and the step's index arithmetic): the W last tokens, committed
length, seed and Philox offset, block table, top-k, drafts tested, temperature, top-p
of each row; the graphs of bucket ``Bp`` read rows ``[:Bp]``.

Positions, cache slots (``block_table[b, pos // bs] * bs + pos % bs``), sequence lengths
and the ragged layout are computed on the device from these, inside the graph. A batch
of B sequences runs in the smallest bucket ``Bp >= B``; rows ``B..Bp`` are padding: length
``W``, every block-table entry the cache's scratch block (never handed to a sequence), so
their writes land there and their results are dropped.

The drafter's side of the step is the drafter's (``Drafter.static_draft``, the same chain
loop as its eager ``propose``); ``Drafter.width`` is ``W``: 1 when the drafter reads the
target's cache (early exit) or there is none, 2 for a separate draft model. A drafter
that reads the target's hidden states (EAGLE-3, ``capture_layers``) gets the verify
forward's captured rows in the verify half (``Drafter.static_observe``) and keeps its
per-sequence state in static buffers of its own (``static_load``).

Sampling modes key the graphs because they change which kernels run: ``greedy`` (every
row greedy: drafts are argmaxes, no distribution is built), ``sample`` (no top-k/top-p
anywhere: no sorts), ``filtered``.

Without CUDA (or with ``use_graphs=False``) the same static code runs eagerly; the tests
check it against the engine's general path on CPU.
"""

from __future__ import annotations

import torch

from .drafters.base import Drafter
from .kernels._sampling_core import DraftDist
from .kv_cache import KVCache, cdiv
from .models.llama import LlamaForCausalLM
from .runners.result import StepResult
from .runners.static import StaticBatch, StaticInputs
from .sequence import Sequence
from .speculation import StepClock, bucket_of

SAMPLING_MODES = ("greedy", "sample", "filtered")


def sampling_mode(seqs: list[Sequence]) -> str:
    """The graph family a batch needs, from its host-side sampling parameters."""
    params = [s.params for s in seqs]
    if all(p.temperature == 0 for p in params):
        return "greedy"
    if any(p.top_k > 0 or p.top_p < 1 for p in params):
        return "filtered"
    return "sample"


class _StaticStep:
    """The draft and verify work of one (bucket, k, mode) on the runner's static buffers."""

    out: torch.Tensor  # [Bp, k + 1] int64, written by verify()
    n_acc: torch.Tensor  # [Bp] int32, written by verify()

    def __init__(self, runner: DecodeRunner, batch: int, k: int, mode: str):
        self.runner, self.batch, self.k, self.mode = runner, batch, k, mode
        self.inputs = StaticBatch(runner.inputs, batch, k, mode, runner.width, runner.block_size,
                                  runner.max_seq_len)
        self.drafts: torch.Tensor | None = None
        self.q: DraftDist | None = None
        # (draft graph or None, verify graph) once captured
        self.graphs: tuple[torch.cuda.CUDAGraph | None, torch.cuda.CUDAGraph] | None = None

    # ------------------------------------------------------------------ device work
    def draft(self) -> None:
        """k draft forwards and samples, the drafter's -> self.drafts [Bp, k], self.q
        (DraftDist of Bp * k rows, row b * k + j) or None."""
        self.drafts, self.q = self.runner.drafter.static_draft(self.inputs, greedy=self.mode == "greedy")

    def verify(self) -> None:
        """The target over [last token, d_1..d_k], then rejection sampling -> out, n_acc."""
        r, k, x = self.runner, self.k, self.inputs
        drafts = self.drafts if k > 0 else None
        batch, capture = x.verify(drafts), r.drafter.capture_layers or None
        logits = r.target.forward_cached(batch, r.cache, r.ops, capture=capture)  # [Bp * (k + 1), V]
        if capture:
            logits, hidden = logits
        ids = drafts.reshape(-1) if drafts is not None else torch.empty(0, dtype=torch.int64, device=r.device)
        s = x.sampling
        self.out, self.n_acc = r.ops.rejection_sample(
            logits, ids, self.q if k > 0 else None, x.cu_draft, k,
            s.temperature, s.top_k, s.top_p, s.seeds, s.offsets, check_finite=False,
            num_draft=x.num_draft, filtered=s.filtered, radix_rounds=s.radix_rounds,
        )
        if capture:  # the drafter reads the target's features of the verified rows
            r.drafter.static_observe(x, batch, hidden, self.out, self.n_acc)

    # ------------------------------------------------------------------ graphs
    def capture(self, pool) -> None:
        """Run once eagerly (compiles kernels, sets up cuBLAS), then capture both halves."""
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            if self.k > 0:
                self.draft()
            self.verify()
        torch.cuda.current_stream().wait_stream(side)
        draft_graph = None
        if self.k > 0:
            draft_graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(draft_graph, pool=pool):
                self.draft()
        verify_graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(verify_graph, pool=pool):
            self.verify()
        self.graphs = (draft_graph, verify_graph)

    def run(self, clock: StepClock | None):
        """One step on the current inputs; returns the three clock marks (None untimed)."""
        mark = clock.mark if clock is not None else lambda: None
        draft_graph, verify_graph = self.graphs or (None, None)
        t0 = mark()
        if self.k > 0:
            draft_graph.replay() if draft_graph is not None else self.draft()
        t1 = mark()
        verify_graph.replay() if verify_graph is not None else self.verify()
        return t0, t1, mark()


class DecodeRunner:
    """Runs pure-decode steps on static buffers, as CUDA graphs when ``use_graphs``.

    target, cache: the target model and its KV cache; padded rows write its
                   ``scratch_block``, which no sequence is ever given
    drafter:       ``Drafter()`` (plain decoding), a chain ``ModelDrafter`` or ``Eagle3Drafter``
    max_k:         the longest chain a step may draft
    max_batch:     the most sequences in a step (graphs up to its bucket)
    max_context:   the model's context length (sizes the block-table width)
    """

    def __init__(self, target: LlamaForCausalLM, cache: KVCache, ops, drafter: Drafter, *, max_k: int,
                 max_batch: int, max_context: int, block_size: int, use_graphs: bool):
        if not drafter.static_step:
            raise ValueError(f"the {drafter.name!r} drafter has no fixed-shape decode step (n-gram drafts "
                             "come from the host, trees have a shape of their own)")
        if use_graphs and cache.k.device.type != "cuda":
            raise ValueError("CUDA graphs need a CUDA device")
        self.target, self.cache, self.ops, self.drafter = target, cache, ops, drafter
        self.device = cache.k.device
        self.max_k = max_k if drafter.speculates else 0
        self.width = drafter.width
        self.block_size, self.scratch_block = block_size, cache.scratch_block
        self.max_seq_len = max_context + max_k + 1  # attention splits long KV ranges from this bound
        self.use_graphs = use_graphs
        self.max_batch = bucket_of(max_batch)
        self.blocks_per_seq = cdiv(max_context + max_k + 1, block_size)
        shape = (self.width, self.max_batch, self.blocks_per_seq)
        pin = self.device.type == "cuda"
        # host staging and device inputs: one int64, one int32 and one float32 area each
        self._host = [torch.zeros(size, dtype=dt, pin_memory=pin) for size, dt in StaticInputs.shapes(*shape)]
        self._dev = [torch.zeros_like(h, device=self.device) for h in self._host]
        self.staging = StaticInputs.of([h.numpy() for h in self._host], *shape)  # host numpy views
        self.inputs = StaticInputs.of(self._dev, *shape)  # the device views the graphs read
        # padded rows read what they did not write: keep the scratch block finite
        cache.k[:, self.scratch_block].zero_()
        cache.v[:, self.scratch_block].zero_()
        drafter.prepare_scratch(self.scratch_block)
        drafter.prepare_static(self.max_batch)
        self._steps: dict[tuple[int, int, str], _StaticStep] = {}
        self._pool = torch.cuda.graph_pool_handle() if use_graphs else None
        self.clock = StepClock(self.device)

    # ------------------------------------------------------------------ eligibility
    def can_run(self, seqs: list[Sequence], k: int) -> bool:
        """Whether a step of (at most) ``k`` drafts for ``seqs`` is a pure decode step."""
        if len(seqs) > self.max_batch or k > self.max_k:
            return False
        for s in seqs:
            n = len(s.tokens)
            if s.target_len != n - 1 or n < self.width:  # a prompt (or a preempted sequence) to
                return False  # prefill, or fewer tokens than the first draft forward takes
            if (k > 0 or self.drafter.capture_layers) and not self.drafter.static_ready(s):
                return False  # e.g. the draft model's cache lags further (after plain steps)
        return True

    # ------------------------------------------------------------------ a step
    def load(self, seqs: list[Sequence], blocks, limits: list[int], bucket: int | None = None,
             pad: tuple[float, int] = (0.0, 0)) -> int:
        """Stage the batch's inputs and copy them to the device; returns the bucket.

        pad: (temperature, drafts tested) of the padding rows; greedy and none when
        serving, like real rows when timing a bucket of padding alone
        """
        B, W = len(seqs), self.width
        Bp = bucket if bucket is not None else bucket_of(B)
        x = self.staging
        if B:  # one list per field, then one numpy assignment each
            x.num_draft[:B] = limits
            x.tail[:, :B] = [[s.tokens[j - W] for s in seqs] for j in range(W)]
            x.length[:B] = [len(s.tokens) for s in seqs]
            x.seeds[:B] = [s.seed for s in seqs]
            x.offsets[:B] = [s.step for s in seqs]
            x.top_k[:B] = [s.params.top_k for s in seqs]
            x.temperature[:B] = [s.params.temperature for s in seqs]
            x.top_p[:B] = [s.params.top_p for s in seqs]
            for b, s in enumerate(seqs):
                table = blocks.table(s.seq_id)
                x.block_table[b, :len(table)] = table
        if Bp > B:  # padding rows: W tokens in the scratch block
            x.tail[:, B:Bp] = 0
            x.length[B:Bp] = W
            x.seeds[B:Bp] = x.offsets[B:Bp] = 0
            x.block_table[B:Bp] = self.scratch_block
            x.top_k[B:Bp] = 0
            x.num_draft[B:Bp] = pad[1]
            x.temperature[B:Bp], x.top_p[B:Bp] = pad[0], 1.0
        for host, dev in zip(self._host, self._dev, strict=True):
            dev.copy_(host, non_blocking=True)
        self.drafter.static_load(seqs, Bp)
        return Bp

    def _step(self, bucket: int, k: int, mode: str) -> _StaticStep:
        key = (bucket, k, mode)
        step = self._steps.get(key)
        if step is None:
            step = self._steps[key] = _StaticStep(self, bucket, k, mode)
            if self.use_graphs:
                step.capture(self._pool)
        return step

    def run(self, seqs: list[Sequence], blocks, limits: list[int], mode: str,
            clock: StepClock | None = None) -> StepResult:
        """One decode step: ``k = max(limits)`` drafts for every sequence, of which the
        sampler tests ``limits[b]`` (the engine's per-sequence caps).

        The result's out is [B, k + 1] int64 (accepted drafts, the sampled token, -1
        padding), n_accepted [B] int32 (-1: non-finite logits); its marks are on
        ``clock`` (None when not timed).
        """
        B, k = len(seqs), max(limits)
        bucket = self.load(seqs, blocks, limits)
        step = self._step(bucket, k, mode)
        marks = step.run(clock)
        self.drafter.drafted(seqs, k)
        return StepResult(step.out[:B], step.n_acc[:B], None, list(limits), list(limits),
                          marks if clock is not None else None, fixed_shape=True)

    def profile(self, seqs: list[Sequence], blocks, mode: str, repeats: int = 3) -> dict[int, tuple[float, float]]:
        """Seconds of the draft and verify halves for every k, on this batch's inputs.

        Replays are idempotent (same inputs, same writes past the committed tokens), so
        this may run inside a step before its real replay.
        """
        costs = {}
        for k in range(self.max_k + 1):
            bucket = self.load(seqs, blocks, [k] * len(seqs))
            costs[k] = self._time(bucket, k, mode, repeats)
        return costs

    def warm_up(self, batch_sizes: list[int], modes: tuple[str, ...], repeats: int = 3) -> dict:
        """Capture (with graphs) and time every k of these batch sizes' buckets and modes
        on padding rows alone, before any request; returns {(bucket, mode, k): (draft s,
        verify s)}."""
        bad = [m for m in modes if m not in SAMPLING_MODES]
        if bad:
            raise ValueError(f"unknown sampling mode(s) {bad}; choose from {', '.join(SAMPLING_MODES)}")
        costs = {}
        for bucket in sorted({bucket_of(b) for b in batch_sizes if 1 <= b <= self.max_batch}):
            for mode in modes:
                for k in range(self.max_k + 1):
                    self.load([], None, [], bucket=bucket, pad=(0.0 if mode == "greedy" else 1.0, k))
                    costs[(bucket, mode, k)] = self._time(bucket, k, mode, repeats)
        return costs

    def _time(self, bucket: int, k: int, mode: str, repeats: int) -> tuple[float, float]:
        """The fastest of ``repeats`` runs of a loaded step: (draft seconds, verify seconds)."""
        step = self._step(bucket, k, mode)
        marks = [step.run(self.clock) for _ in range(repeats)]
        if self.clock.cuda:
            torch.cuda.synchronize(self.device)
        halves = [(self.clock.seconds(a, b), self.clock.seconds(b, c)) for a, b, c in marks]
        return min(halves, key=sum)

