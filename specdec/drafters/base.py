"""The drafter interface: propose draft tokens for a batch, then learn what was accepted."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..batch import SamplingTensors
from ..kernels._sampling_core import DraftDist
from ..sequence import Sequence


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
    """Base drafter: proposes nothing (plain decoding through the speculative engine)."""

    name = "none"
    capture_layers: tuple[int, ...] = ()  # target hidden_states the drafter reads (EAGLE-3)

    def propose(self, seqs: list[Sequence], limits: list[int], sampling: SamplingTensors,
                device) -> DraftProposal:
        """Propose at most ``limits[b]`` tokens after each sequence's last token."""
        return DraftProposal(torch.empty(0, dtype=torch.int64, device=device), None, [0] * len(seqs))

    def commit(self, seq: Sequence, num_accepted: int) -> None:
        """Called after verification, before the emitted tokens are appended."""

    def observe(self, seqs: list[Sequence], hidden: torch.Tensor, rows: list[list[int]],
                next_tokens: list[list[int]]) -> None:
        """Target features of newly committed positions (drafters with capture_layers)."""

    def keep_path(self, src_slots: torch.Tensor, dst_slots: torch.Tensor) -> None:
        """Mirror the target's keep-path move in a draft cache of the drafter's own."""
