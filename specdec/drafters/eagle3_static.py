"""The EAGLE-3 head's side of the fixed-shape decode step (specdec/cuda_graphs.py).

State carried from one fixed-shape step to the next, per sequence: the head output ``a``
[H] and the draft logits [V] of the last committed position (what the eager path keeps
in ``_HeadState``). Each step, with L committed tokens (the last one pending):

    load     (host)   the sequences' states -> static ``a_in`` [Bp, H], ``logits_in`` [Bp, V]
                      (padding rows: zeros)
    draft    (device) draft 1 from ``logits_in``; draft j + 1 from the head over the pair
                      (a, d_j) at position L - 1 + j (j = 1 .. k - 1), head-cache slots
                      through the block table: the eager chain's k - 1 forwards
    verify   (device) the target over [x_{L-1}, d_1 .. d_k] captures its aux hidden rows
                      g [Bp * (k + 1), C * Ht]; after rejection sampling the head runs over
                      all k + 1 pairs (fc(g_i), out_i) at positions L - 1 + i, out_i the
                      step's emitted token after row i (accepted drafts, then the sampled
                      one). Row n_accepted (gathered on the device) is the new state ->
                      ``a_out``, ``logits_out``. Rows past n_accepted pair features with
                      tokens that were not committed; they sit at positions >= the next
                      step's L - 1, which the next step's draft forwards overwrite before
                      any attention reads them (attention reads up to each row's length).
    drafted  (host)   clones of ``a_out[b]``, ``logits_out[b]`` become sequence b's state,
                      pending until ``commit`` learns its position (L + n_accepted).

Nothing here reads the device on the host inside ``draft`` or ``verify``.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

import torch

from ..batch import ForwardBatch
from ..kernels._sampling_core import DraftDist

if TYPE_CHECKING:
    from ..runners.static import StaticBatch
    from .eagle3 import Eagle3Drafter


class Eagle3StaticStep:
    """Static buffers of the fixed-shape step for ``max_batch`` rows, and its device work."""

    def __init__(self, drafter: Eagle3Drafter, max_batch: int):
        self.drafter = drafter
        head, dev = drafter.head, drafter.cache.k.device
        H, V = head.cfg.hidden_size, head.cfg.vocab_size
        self.a_in = torch.zeros(max_batch, H, dtype=head.dtype, device=dev)
        self.logits_in = torch.zeros(max_batch, V, dtype=head.dtype, device=dev)
        self.a_out = torch.zeros_like(self.a_in)
        self.logits_out = torch.zeros_like(self.logits_in)

    def load(self, states: list, bucket: int) -> None:
        """Host side, outside the graphs: the states of the batch's rows (device copies)."""
        B = len(states)
        if B:
            self.a_in[:B].copy_(torch.stack([s.a for s in states]), non_blocking=True)
            self.logits_in[:B].copy_(torch.stack([s.logits for s in states]), non_blocking=True)
        self.a_in[B:bucket].zero_()
        self.logits_in[B:bucket].zero_()

    def draft(self, batch: StaticBatch, greedy: bool) -> tuple[torch.Tensor, DraftDist | None]:
        """k drafts per row -> drafts [Bp, k] int64, q (Bp * k rows, row b * k + j) or None."""
        d, Bp = self.drafter, batch.batch
        a, logits = self.a_in[:Bp], self.logits_in[:Bp]
        drafts: list[torch.Tensor] = []
        dists: list[DraftDist] = []
        for j in range(batch.k):
            if greedy:
                tokens = logits.argmax(-1)
            else:
                tokens, q = d.sample_chain(logits, batch.sampling, j)
                dists.append(q)
            drafts.append(tokens)
            if j + 1 < batch.k:  # the pair (a, d_{j+1}) at position L - 1 + j
                logits, a = d.head.forward_cached(a, batch.next_draft(j - 1, tokens), d.cache, d.ops)
        return torch.stack(drafts, dim=1), None if greedy else DraftDist.interleave(dists)

    def observe(self, batch: StaticBatch, verify: ForwardBatch, hidden: torch.Tensor, out: torch.Tensor,
                n_accepted: torch.Tensor) -> None:
        """After the verify's rejection sampling: the head over the k + 1 pairs of each row.

        verify:     the verify forward's batch (positions L - 1 .. L + k - 1, head-cache
                    slots through the shared block table)
        hidden:     [Bp * (k + 1), C * Ht] its captured rows
        out:        [Bp, k + 1] int64 emitted tokens (-1 padding); n_accepted [Bp] int32
        """
        d, Bp, k = self.drafter, batch.batch, batch.k
        rows = torch.arange(Bp, device=out.device) * (k + 1) + n_accepted.clamp(min=0).to(torch.int64)
        pairs = dataclasses.replace(verify, tokens=out.clamp(min=0).reshape(-1), logits_rows=rows)
        logits, a = d.head.forward_cached(d.head.fc(hidden, d.ops), pairs, d.cache, d.ops)
        self.logits_out[:Bp].copy_(logits)
        self.a_out[:Bp].copy_(a.index_select(0, rows))

    def results(self, num: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Host side, after the step: copies of the first ``num`` rows' new (a, logits)."""
        return self.a_out[:num].clone(), self.logits_out[:num].clone()
