"""The fixed-shape runner's static inputs: where each field lives, and the batches built
from them on the device.

Three flat areas, each once as pinned host staging and once on the device (one async
copy each per step). ``StaticInputs.of`` is the one place that knows the layout::

    int64   [W + 3, Bmax]       tail (W rows, field-major), length, seeds, offsets
    int32   [Bmax * MB + 2 * Bmax]  block_table [Bmax, MB], top_k [Bmax], num_draft [Bmax]
    float32 [2, Bmax]           temperature, top_p

``StaticBatch`` is one bucket's rows ``[:Bp]`` of the device inputs plus the index
arithmetic of a decode step (positions, slots, ragged offsets), computed on the device so
a captured graph replays it for new inputs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..batch import ForwardBatch, SamplingTensors


@dataclass
class StaticInputs:
    """Named views of the three areas (host numpy arrays or device tensors alike).

    tail [W, Bmax] int64: the W last committed tokens of each sequence, field-major
    length, seeds, offsets [Bmax] int64: committed tokens L, Philox seed and offset
    block_table [Bmax, MB] int32; top_k, num_draft [Bmax] int32
    temperature, top_p [Bmax] float32
    """

    # numpy arrays (the host staging) or torch tensors (the device inputs)
    tail: Any
    length: Any
    seeds: Any
    offsets: Any
    block_table: Any
    top_k: Any
    num_draft: Any
    temperature: Any
    top_p: Any

    @staticmethod
    def shapes(width: int, max_batch: int, blocks_per_seq: int) -> list[tuple]:
        """(shape, dtype) of the int64, int32 and float32 areas."""
        B, W, MB = max_batch, width, blocks_per_seq
        return [((W + 3, B), torch.int64), ((B * MB + 2 * B,), torch.int32), ((2, B), torch.float32)]

    @classmethod
    def of(cls, areas, width: int, max_batch: int, blocks_per_seq: int) -> StaticInputs:
        i64, i32, f32 = areas
        B, W, MB = max_batch, width, blocks_per_seq
        return cls(tail=i64[:W], length=i64[W], seeds=i64[W + 1], offsets=i64[W + 2],
                   block_table=i32[:B * MB].reshape(B, MB), top_k=i32[B * MB:B * MB + B],
                   num_draft=i32[B * MB + B:], temperature=f32[0], top_p=f32[1])


class StaticBatch:
    """Rows ``[:batch]`` of the device inputs, as one (bucket, k, mode) step sees them.

    tail [Bp, W] int64, length [Bp] int64, block_table [Bp, MB] int32, num_draft [Bp]
    int32, sampling: SamplingTensors of views (host facts from the mode).
    """

    def __init__(self, inputs: StaticInputs, batch: int, k: int, mode: str, width: int, block_size: int,
                 max_seq_len: int):
        dev = inputs.length.device
        self.batch, self.k, self.width = batch, k, width
        self.block_size, self.max_seq_len = block_size, max_seq_len
        self.tail = inputs.tail[:, :batch].t()  # [Bp, W] view
        self.length = inputs.length[:batch]
        self.block_table = inputs.block_table[:batch]
        self.num_draft = inputs.num_draft[:batch]
        self.sampling = SamplingTensors(
            temperature=inputs.temperature[:batch], top_k=inputs.top_k[:batch], top_p=inputs.top_p[:batch],
            seeds=inputs.seeds[:batch], offsets=inputs.offsets[:batch],
            all_greedy=mode == "greedy", filtered=mode == "filtered",
        )
        ar = lambda n, step=1, dtype=torch.int32: torch.arange(n, device=dev, dtype=dtype) * step  # noqa: E731
        W = width
        self.cu_first = ar(batch + 1, W)  # first draft forward: W tokens each
        self.rows_first = ar(batch, W, torch.int64) + (W - 1)  # logits of each last token
        self.cu_one = ar(batch + 1)  # later draft forwards: one token each
        self.cu_verify = ar(batch + 1, k + 1)
        self.cu_draft = ar(batch + 1, k)
        self.offs_first = ar(W, dtype=torch.int64) - W  # positions L - W .. L - 1
        self.offs_verify = ar(k + 1, dtype=torch.int64) - 1  # positions L - 1 .. L + k - 1

    def _slots(self, pos: torch.Tensor) -> torch.Tensor:
        """[Bp, n] positions -> [Bp * n] int64 cache slots through the block table."""
        bs = self.block_size
        block = self.block_table.gather(1, pos // bs).to(torch.int64)
        return (block * bs + pos % bs).reshape(-1)

    def _batch(self, tokens, pos, seq_lens, q_start, rows, width) -> ForwardBatch:
        return ForwardBatch(
            tokens=tokens.reshape(-1), positions=pos.reshape(-1), slot_mapping=self._slots(pos),
            block_table=self.block_table, seq_lens=seq_lens.to(torch.int32), q_start=q_start,
            tree_mask=None, logits_rows=rows, max_query_len=width, max_seq_len=self.max_seq_len,
        )

    def first_draft(self) -> ForwardBatch:
        """The W last committed tokens at positions L - W .. L - 1; logits of the last."""
        L = self.length
        return self._batch(self.tail, L[:, None] + self.offs_first, L, self.cu_first, self.rows_first, self.width)

    def next_draft(self, j: int, tokens: torch.Tensor) -> ForwardBatch:
        """Draft j (0-based, [Bp] int64) at position L + j, one token each."""
        L = self.length
        return self._batch(tokens, (L + j)[:, None], L + j + 1, self.cu_one, None, 1)

    def verify(self, drafts: torch.Tensor | None) -> ForwardBatch:
        """[last token, d_1..d_k] at positions L - 1 .. L + k - 1; logits of all k + 1."""
        L, k = self.length, self.k
        tokens = self.tail[:, -1:]
        if k > 0:
            if drafts is None:
                raise ValueError(f"verifying k={k} drafts needs the drafts tensor, got None")
            tokens = torch.cat([tokens, drafts], dim=1)  # [Bp, k + 1]
        return self._batch(tokens, L[:, None] + self.offs_verify, L + k, self.cu_verify, None, k + 1)
