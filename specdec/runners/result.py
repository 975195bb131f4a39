"""What a runner returns for one step: ``StepResult``, the same for every runner."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class Captured:
    """The target's captured hidden states of one verify forward (EAGLE-3 features).

    hidden: [R, C * Ht] the rows of every token the step ran through the target
    fixed:  fixed[b], the rows of sequence b's positions committed whatever is accepted
            (its uncached tail; a tree step's root included)
    drafts: drafts[b][i], the row of draft i (chain position i, or tree node i)
    """

    hidden: torch.Tensor
    fixed: list[list[int]]
    drafts: list[list[int]]

    def committed(self, seqs, rows: list[list[int]], paths: list[list[int]] | None):
        """After ``StepResult.fetch``: (sequences, hidden rows, next tokens) of each finite
        sequence's newly committed positions: its fixed rows, then its accepted drafts (the
        accepted path's nodes for trees), each with the token committed after it."""
        todo, index, nexts = [], [], []
        for b, (seq, row) in enumerate(zip(seqs, rows, strict=True)):
            a = row[0]
            if a < 0:
                continue
            accepted = paths[b][:a] if paths is not None else range(a)
            r = self.fixed[b] + [self.drafts[b][i] for i in accepted]
            ext = seq.tokens + row[1:a + 2]  # the accepted drafts and the sampled token
            todo.append(seq)
            index.append(r)
            nexts.append(ext[seq.target_len + 1:seq.target_len + 1 + len(r)])
        return todo, index, nexts


@dataclass
class StepResult:
    """One step's outcome: device tensors until ``fetch()``, host rows after it.

    Device (what the runner computed; nothing has been read back yet):
      out:         [B, D + 1] int64  accepted drafts then the sampled token, -1 padding
      n_accepted:  [B] int32         accepted drafts per sequence (-1: non-finite logits)
      paths:       [B, D] int       the accepted tree path (node index per depth) or None
                                     for chains
    Host (known before the step ran):
      counts:      draft tokens proposed per sequence (tree nodes for trees)
      depths:      draft positions per sequence (= counts for chains)
      marks:       the clock marks (draft start, draft end / verify start, verify end) or
                   None when the step was not timed
      fixed_shape: whether the fixed-shape runner (static buffers, CUDA graphs) ran it
      captured:    ``Captured`` target hidden states of the verify forward (drafters with
                   ``capture_layers``), or None
    After ``fetch()``:
      rows:        [B] host lists ``[a, token_1, ..., token_{D + 1}]``
      host_paths:  [B] host lists of the accepted path's node indices (trees), else None
    """

    out: torch.Tensor
    n_accepted: torch.Tensor
    paths: torch.Tensor | None
    counts: list[int]
    depths: list[int]
    marks: tuple | None
    fixed_shape: bool
    rows: list[list[int]] = field(default_factory=list)
    host_paths: list[list[int]] | None = None
    captured: Captured | None = None

    def fetch(self) -> None:
        """The one device-to-host copy of the step: n_accepted, out (and paths) in one."""
        parts = [self.n_accepted.to(torch.int64)[:, None], self.out]
        if self.paths is not None:
            parts.append(self.paths.to(torch.int64))
        host = torch.cat(parts, dim=1).tolist()  # [B, 1 + (D + 1) (+ D)]
        width = 1 + self.out.shape[1]
        self.rows = [row[:width] for row in host]
        if self.paths is not None:
            self.host_paths = [row[width:] for row in host]

    @property
    def finite(self) -> list[bool]:
        """Per sequence: its logits were finite (n_accepted >= 0); valid after ``fetch()``."""
        return [row[0] >= 0 for row in self.rows]
