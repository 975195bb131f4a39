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

Static inputs (the graphs of bucket ``Bp`` read rows ``[:Bp]``)::

    tail         [W, Bmax] int64  the W last committed tokens of each sequence, field-major
    length       [Bmax]    int64  committed tokens L (the last one is not yet cached)
    seeds        [Bmax]    int64
    offsets      [Bmax]    int64  the request's step counter (Philox offset)
    block_table  [Bmax, MB] int32
    top_k        [Bmax]    int32
    num_draft    [Bmax]    int32  drafts the sampler tests (fewer than k near max_tokens)
    temperature  [Bmax]    float32
    top_p        [Bmax]    float32

Positions, cache slots (``block_table[b, pos // bs] * bs + pos % bs``), sequence lengths
and the ragged layout are computed on the device from these, inside the graph. A batch
of B sequences runs in the smallest bucket ``Bp >= B``; rows ``B..Bp`` are padding: length
``W``, every block-table entry the cache's scratch block (never handed to a sequence), so
their writes land there and their results are dropped.

``W`` is 1 when the drafter reads the target's cache (early exit) or there is none; a
separate draft model's cache lags one token after a step that accepted every draft, so its
first forward always takes the last two tokens (re-writing one K/V entry it may hold).

Sampling modes key the graphs because they change which kernels run: ``greedy`` (every
row greedy: drafts are argmaxes, no distribution is built), ``sample`` (no top-k/top-p
anywhere: no sorts), ``filtered``.

Without CUDA (or with ``use_graphs=False``) the same static code runs eagerly; the tests
check it against the engine's general path on CPU.
"""

from __future__ import annotations

import time

import torch

from .batch import SamplingTensors
from .drafters.base import Drafter
from .drafters.draft_model import ModelDrafter
from .kernels._sampling_core import DraftDist
from .kv_cache import KVCache, cdiv
from .models.llama import ForwardBatch, LlamaForCausalLM
from .sequence import Sequence
from .speculation import bucket_of

SAMPLING_MODES = ("greedy", "sample", "filtered")


def sampling_mode(seqs: list[Sequence]) -> str:
    """The graph family a batch needs, from its host-side sampling parameters."""
    params = [s.params for s in seqs]
    if all(p.temperature == 0 for p in params):
        return "greedy"
    if any(p.top_k > 0 or p.top_p < 1 for p in params):
        return "filtered"
    return "sample"


class StepClock:
    """Timestamps a step's halves; read them after the step's device-to-host copy.

    On CUDA these are events (recording one does not wait for the device), elsewhere the
    wall clock (CPU work is synchronous).
    """

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def mark(self):
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def seconds(self, start, end) -> float:
        """Elapsed seconds between two marks (the device must have passed ``end``)."""
        return start.elapsed_time(end) / 1e3 if self.cuda else end - start


class _StaticStep:
    """The draft and verify work of one (bucket, k, mode) on the runner's static buffers."""

    def __init__(self, runner: "DecodeRunner", batch: int, k: int, mode: str):
        self.runner, self.batch, self.k, self.mode = runner, batch, k, mode
        dev, W = runner.device, runner.width
        ar = lambda n, step=1, dtype=torch.int32: torch.arange(n, device=dev, dtype=dtype) * step  # noqa: E731
        self.cu_first = ar(batch + 1, W)  # first draft forward: W tokens each
        self.rows_first = ar(batch, W, torch.int64) + (W - 1)  # logits of each last token
        self.cu_one = ar(batch + 1)  # later draft forwards: one token each
        self.cu_verify = ar(batch + 1, k + 1)
        self.cu_draft = ar(batch + 1, k)
        self.offs_first = ar(W, dtype=torch.int64) - W  # positions L - W .. L - 1
        self.offs_verify = ar(k + 1, dtype=torch.int64) - 1  # positions L - 1 .. L + k - 1
        r = runner
        self.tail = r.i64[:W, :batch].t()  # [Bp, W] view
        self.length = r.i64[W, :batch]
        self.sampling = SamplingTensors(
            temperature=r.f32[0, :batch], top_k=r.top_k[:batch], top_p=r.f32[1, :batch],
            seeds=r.i64[W + 1, :batch], offsets=r.i64[W + 2, :batch],
            all_greedy=mode == "greedy", filtered=mode == "filtered",
        )
        self.block_table = r.block_table[:batch]
        self.num_draft = r.num_draft[:batch]
        self.drafts = self.q = self.out = self.n_acc = None
        self.graphs = None  # (draft graph or None, verify graph) once captured

    # ------------------------------------------------------------------ device work
    def _slots(self, pos: torch.Tensor) -> torch.Tensor:
        """[Bp, n] positions -> [Bp * n] int64 cache slots through the block table."""
        bs = self.runner.block_size
        block = self.block_table.gather(1, pos // bs).to(torch.int64)
        return (block * bs + pos % bs).reshape(-1)

    def _batch(self, tokens, pos, seq_lens, q_start, rows, width) -> ForwardBatch:
        return ForwardBatch(
            tokens=tokens.reshape(-1), positions=pos.reshape(-1), slot_mapping=self._slots(pos),
            block_table=self.block_table, seq_lens=seq_lens.to(torch.int32), q_start=q_start,
            tree_mask=None, logits_rows=rows, max_query_len=width, max_seq_len=self.runner.max_seq_len,
        )

    def draft(self) -> None:
        """k draft forwards and samples -> self.drafts [Bp, k], self.q (DraftDist of Bp * k
        rows, row b * k + j) or None."""
        r, L, W = self.runner, self.length, self.runner.width
        drafter: ModelDrafter = r.drafter
        pos = L[:, None] + self.offs_first
        batch = self._batch(self.tail, pos, L, self.cu_first, self.rows_first, W)
        drafts, dists = [], []
        for j in range(self.k):
            logits = drafter.model.forward_cached(batch, drafter.cache, drafter.ops, drafter.num_layers)
            if self.mode == "greedy":  # greedy rows ignore q in the rejection sampler
                tokens, q = logits.argmax(-1), None
            else:
                tokens, q = drafter.sample(logits, self.sampling, j)
            drafts.append(tokens)
            dists.append(q)
            if j + 1 < self.k:  # draft j + 1 sits at position L + j
                batch = self._batch(tokens, (L + j)[:, None], L + j + 1, self.cu_one, None, 1)
        self.drafts = torch.stack(drafts, dim=1)
        self.q = None if self.mode == "greedy" else DraftDist.interleave(dists)

    def verify(self) -> None:
        """The target over [last token, d_1..d_k], then rejection sampling -> out, n_acc."""
        r, L, k = self.runner, self.length, self.k
        tokens = self.tail[:, -1:]
        if k > 0:
            tokens = torch.cat([tokens, self.drafts], dim=1)  # [Bp, k + 1]
        pos = L[:, None] + self.offs_verify
        batch = self._batch(tokens, pos, L + k, self.cu_verify, None, k + 1)
        logits = r.target.forward_cached(batch, r.cache, r.ops)  # [Bp * (k + 1), V]
        ids = self.drafts.reshape(-1) if k > 0 else torch.empty(0, dtype=torch.int64, device=r.device)
        s = self.sampling
        self.out, self.n_acc = r.ops.rejection_sample(
            logits, ids, self.q if k > 0 else None, self.cu_draft, k,
            s.temperature, s.top_k, s.top_p, s.seeds, s.offsets, check_finite=False,
            num_draft=self.num_draft, filtered=s.filtered, radix_rounds=s.radix_rounds,
        )

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
        t0 = mark()
        if self.k > 0:
            self.graphs[0].replay() if self.graphs else self.draft()
        t1 = mark()
        self.graphs[1].replay() if self.graphs else self.verify()
        return t0, t1, mark()


class DecodeRunner:
    """Runs pure-decode steps on static buffers, as CUDA graphs when ``use_graphs``.

    target, cache: the target model and its KV cache; padded rows write its
                   ``scratch_block``, which no sequence is ever given
    drafter:       ``Drafter()`` (plain decoding) or a chain ``ModelDrafter``
    max_k:         the longest chain a step may draft
    max_batch:     the most sequences in a step (graphs up to its bucket)
    max_context:   the model's context length (sizes the block-table width)
    """

    def __init__(self, target: LlamaForCausalLM, cache: KVCache, ops, drafter: Drafter, *, max_k: int,
                 max_batch: int, max_context: int, block_size: int, use_graphs: bool):
        if not supports(drafter):
            raise ValueError(f"the {drafter.name!r} drafter has no fixed-shape decode step (n-gram drafts "
                             "come from the host, trees have a shape of their own)")
        if use_graphs and cache.k.device.type != "cuda":
            raise ValueError("CUDA graphs need a CUDA device")
        self.target, self.cache, self.ops, self.drafter = target, cache, ops, drafter
        self.device = cache.k.device
        self.max_k = max_k if isinstance(drafter, ModelDrafter) else 0
        self.width = 2 if isinstance(drafter, ModelDrafter) and not drafter.shares_target_cache else 1
        self.block_size, self.scratch_block = block_size, cache.scratch_block
        self.max_seq_len = max_context + max_k + 1  # attention splits long KV ranges from this bound
        self.use_graphs = use_graphs
        self.max_batch = bucket_of(max_batch)
        self.blocks_per_seq = cdiv(max_context + max_k + 1, block_size)
        B, W, MB = self.max_batch, self.width, self.blocks_per_seq
        pin = self.device.type == "cuda"
        # host staging and device inputs: one int64, one int32 and one float32 area each
        self._host = [torch.zeros(shape, dtype=dt, pin_memory=pin)
                      for shape, dt in (((W + 3, B), torch.int64), ((B * MB + 2 * B,), torch.int32),
                                        ((2, B), torch.float32))]
        self._dev = [torch.zeros_like(h, device=self.device) for h in self._host]
        self.i64, i32, self.f32 = self._dev
        self.block_table = i32[:B * MB].view(B, MB)
        self.top_k = i32[B * MB:B * MB + B]
        self.num_draft = i32[B * MB + B:]
        self._np = [h.numpy() for h in self._host]
        caches = [cache] + ([drafter.cache] if self.width == 2 else [])  # the draft model's own
        for c in caches:  # padded rows read what they did not write: keep it finite
            c.k[:, self.scratch_block].zero_()
            c.v[:, self.scratch_block].zero_()
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
            if k > 0 and self.width == 2 and (n < 2 or s.draft_len < n - 2):
                return False  # the draft model's cache lags further (after plain steps)
        return True

    # ------------------------------------------------------------------ a step
    def load(self, seqs: list[Sequence], blocks, limits: list[int], bucket: int | None = None,
             pad: tuple[float, int] = (0.0, 0)) -> int:
        """Stage the batch's inputs and copy them to the device; returns the bucket.

        pad: (temperature, drafts tested) of the padding rows; greedy and none when
        serving, like real rows when timing a bucket of padding alone
        """
        B, W, MB = len(seqs), self.width, self.blocks_per_seq
        Bp = bucket if bucket is not None else bucket_of(B)
        i64, i32, f32 = self._np
        top = self.max_batch * MB
        bt = i32[:top].reshape(self.max_batch, MB)
        top_k, num_draft = i32[top:top + self.max_batch], i32[top + self.max_batch:]
        if B:  # one list per field, then one numpy assignment each
            num_draft[:B] = limits
            i64[:W, :B] = [[s.tokens[j - W] for s in seqs] for j in range(W)]
            i64[W:, :B] = [[len(s.tokens) for s in seqs], [s.seed for s in seqs], [s.step for s in seqs]]
            top_k[:B] = [s.params.top_k for s in seqs]
            f32[:, :B] = [[s.params.temperature for s in seqs], [s.params.top_p for s in seqs]]
            for b, s in enumerate(seqs):
                table = blocks.table(s.seq_id)
                bt[b, :len(table)] = table
        if Bp > B:  # padding rows: W tokens in the scratch block
            i64[:W, B:Bp] = 0
            i64[W, B:Bp] = W
            i64[W + 1:, B:Bp] = 0
            bt[B:Bp] = self.scratch_block
            top_k[B:Bp] = 0
            num_draft[B:Bp] = pad[1]
            f32[0, B:Bp], f32[1, B:Bp] = pad[0], 1.0
        for host, dev in zip(self._host, self._dev):
            dev.copy_(host, non_blocking=True)
        return Bp

    def _step(self, bucket: int, k: int, mode: str) -> _StaticStep:
        key = (bucket, k, mode)
        step = self._steps.get(key)
        if step is None:
            step = self._steps[key] = _StaticStep(self, bucket, k, mode)
            if self.use_graphs:
                step.capture(self._pool)
        return step

    def run(self, seqs: list[Sequence], blocks, limits: list[int], mode: str, clock: StepClock | None = None):
        """One decode step: ``k = max(limits)`` drafts for every sequence, of which the
        sampler tests ``limits[b]`` (the engine's per-sequence caps).

        returns out [B, k + 1] int64 (accepted drafts, the sampled token, -1 padding),
        n_accepted [B] int32 (-1: non-finite logits), and the step's marks on ``clock``
        (None when not timed).
        """
        B, k = len(seqs), max(limits)
        bucket = self.load(seqs, blocks, limits)
        step = self._step(bucket, k, mode)
        marks = step.run(clock)
        if k > 0:
            for s in seqs:
                s.draft_len = len(s.tokens) + k - 1  # d_1..d_{k-1} are in the draft cache
        return step.out[:B], step.n_acc[:B], marks

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


def supports(drafter: Drafter) -> bool:
    """Drafters with a fixed-shape step: none (plain decoding) and a model drafting a chain."""
    if isinstance(drafter, ModelDrafter):
        return drafter.tree is None
    return type(drafter) is Drafter
