"""The drafter interface: propose draft tokens for a batch, then learn what was accepted."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from ..batch import ForwardBatch, SamplingTensors
from ..kernels._sampling_core import DraftDist
from ..sequence import Sequence

if TYPE_CHECKING:
    from ..runners.static import StaticBatch


@dataclass
class DraftProposal:
    """Draft tokens of one step, ragged over the batch.

    tokens:  [sum_b n_b] int64 on the device, sequence b's n_b tokens in order
    q:       DraftDist (draft logits + per-row statistics, never an [n, V] probability
             tensor): chain, one row per draft token, the distribution it was sampled
             from; tree, sum_b (n_b + 1) rows, the draft distribution at the root and at
             each node (what that position's children were drawn from);
             None for a point-mass drafter (n-gram lookup, deterministic candidates)
    counts:  host list, n_b per sequence (0 allowed)
    parents: None for chains, else the host tree of each sequence (specdec/tree.py)
    """

    tokens: torch.Tensor
    q: DraftDist | None
    counts: list[int]
    parents: list[list[int]] | None = None


class Drafter:
    """Base drafter: proposes nothing (plain decoding through the speculative engine).

    The interface the runners call:

    propose(seqs, limits, sampling, device)  the eager path's drafts (any shape)
    commit(seq, a)                           after verification, before tokens append
    keep_path(src, dst)                      mirror a tree step's K/V compaction
    capture_layers, observe                  target hidden states the drafter reads (EAGLE-3)
    static_step, width, static_draft, drafted, static_ready, prepare_scratch,
    prepare_static, static_load, static_observe
                                             the fixed-shape decode step (specdec/cuda_graphs.py)
    snapshot, restore, forget                draft-side state around failed steps and preemption

    All draft-side per-sequence state (``Sequence.draft_len``) is written here only.
    """

    name = "none"
    speculates = False  # proposes draft tokens at all (the fixed-shape step then drafts k)
    samples_q = False  # sampled drafts come with the distribution q they were drawn from
    capture_layers: tuple[int, ...] = ()  # target hidden_states indices the verify forward captures

    # ------------------------------------------------------------------ eager path
    def propose(self, seqs: list[Sequence], limits: list[int], sampling: SamplingTensors,
                device) -> DraftProposal:
        """Propose at most ``limits[b]`` tokens after each sequence's last token."""
        return DraftProposal(torch.empty(0, dtype=torch.int64, device=device), None, [0] * len(seqs))

    def commit(self, seq: Sequence, num_accepted: int) -> None:
        """Called after verification, before the emitted tokens are appended."""

    def keep_path(self, src_slots: torch.Tensor, dst_slots: torch.Tensor) -> None:
        """Mirror the target's keep-path move in a draft cache of the drafter's own."""

    def observe(self, seqs: list[Sequence], hidden: torch.Tensor, rows: list[list[int]],
                next_tokens: list[list[int]]) -> None:
        """Target features of newly committed positions (drafters with ``capture_layers``):
        called after the step's device-to-host copy, before postprocess.

        hidden:      [R, C * Ht] the verify forward's captured rows
        rows:        rows[b], the rows of ``hidden`` of sequence b's positions
                     target_len .. target_len + m_b - 1 (target_len not yet advanced)
        next_tokens: next_tokens[b][i], the committed token after position target_len + i
        """

    # ------------------------------------------------------------------ fixed-shape step
    @property
    def static_step(self) -> bool:
        """Has a fixed-shape decode step (chains of a fixed k)."""
        return True

    @property
    def width(self) -> int:
        """W: tokens per sequence the first draft forward of a decode step takes."""
        return 1

    def static_draft(self, batch: StaticBatch, greedy: bool) -> tuple[torch.Tensor, DraftDist | None]:
        """``batch.k`` drafts of every row on the static inputs, device work only (it is
        captured into a CUDA graph) -> drafts [Bp, k] int64, q (Bp * k rows, row b * k + j)
        or None when ``greedy`` (argmax drafts; greedy rows never read q)."""
        raise NotImplementedError(f"the {self.name!r} drafter has no fixed-shape step")

    def drafted(self, seqs: list[Sequence], k: int) -> None:
        """Host record after a fixed-shape step that drafted ``k`` for ``seqs``."""

    def static_ready(self, seq: Sequence) -> bool:
        """Whether the drafter's side of ``seq`` is where a fixed-shape step expects it."""
        return True

    def prepare_scratch(self, block: int) -> None:
        """Make the scratch block of a cache of its own finite (padding rows read it)."""

    def prepare_static(self, max_batch: int) -> None:
        """Allocate static buffers of its own for ``max_batch`` rows (before any capture)."""

    def static_load(self, seqs: list[Sequence], bucket: int) -> None:
        """Host side of a fixed-shape step, after the runner staged its inputs: copy the
        drafter's per-sequence state of ``seqs`` (rows 0 .. B - 1) into its static buffers."""

    def static_observe(self, batch: StaticBatch, verify: ForwardBatch, hidden: torch.Tensor, out: torch.Tensor,
                       n_accepted: torch.Tensor) -> None:
        """Device work after the verify half's rejection sampling (drafters with
        ``capture_layers``): verify batch, its captured hidden rows, out [Bp, k + 1], n_accepted [Bp]."""

    def own_forwards(self) -> list[tuple]:
        """(model, cache, num_layers) of each forward the drafter runs on a cache of its
        own, for warm-up to compile; empty when it runs none (or reads the target's)."""
        return []

    # ------------------------------------------------------------------ draft-side state
    def snapshot(self, seqs: list[Sequence]) -> list[int]:
        """The draft-side state of ``seqs``, to ``restore`` after a failed step."""
        return [s.draft_len for s in seqs]

    def restore(self, seqs: list[Sequence], saved: list[int]) -> None:
        for seq, draft_len in zip(seqs, saved, strict=True):
            seq.draft_len = draft_len

    def forget(self, seq: Sequence) -> None:
        """Nothing of ``seq`` is cached on the draft side any more (preemption)."""
        seq.draft_len = 0
