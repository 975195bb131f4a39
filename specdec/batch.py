"""Host-side preparation of the tensors one step needs.

Everything here reads host lists only (token ids, lengths, block tables) and ends in one
``torch.tensor(..., device=...)`` per field, so preparing a step never waits on the
device.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .kv_cache import BlockManager
from .models.llama import ForwardBatch
from .sequence import Sequence


@dataclass
class SamplingTensors:
    """Per-sequence sampling parameters of one step, on the device.

    temperature [B] float32, top_k [B] int32, top_p [B] float32,
    seeds [B] int64, offsets [B] int64 (the request's step counter).
    """

    temperature: torch.Tensor
    top_k: torch.Tensor
    top_p: torch.Tensor
    seeds: torch.Tensor
    offsets: torch.Tensor

    @classmethod
    def of(cls, seqs: list[Sequence], device) -> "SamplingTensors":
        p = [s.params for s in seqs]
        return cls(
            temperature=torch.tensor([x.temperature for x in p], dtype=torch.float32, device=device),
            top_k=torch.tensor([x.top_k for x in p], dtype=torch.int32, device=device),
            top_p=torch.tensor([x.top_p for x in p], dtype=torch.float32, device=device),
            seeds=torch.tensor([s.seed for s in seqs], dtype=torch.int64, device=device),
            offsets=torch.tensor([s.step for s in seqs], dtype=torch.int64, device=device),
        )


def build_forward_batch(
    blocks: BlockManager,
    seq_ids: list[int],
    starts: list[int],
    lengths: list[int],
    num_logits: list[int],
    tokens: torch.Tensor,
    device,
) -> ForwardBatch:
    """A chain-ordered ragged batch: sequence b adds ``lengths[b]`` tokens at positions
    ``starts[b] ..`` and wants logits for its last ``num_logits[b]`` of them.

    tokens: [sum(lengths)] int64 on ``device`` (built by the caller, possibly on device)
    """
    positions, slots, rows, q_start = [], [], [], [0]
    for seq_id, start, n, n_logits in zip(seq_ids, starts, lengths, num_logits):
        pos = list(range(start, start + n))
        positions += pos
        slots += blocks.slots(seq_id, pos)
        rows += range(q_start[-1] + n - n_logits, q_start[-1] + n)
        q_start.append(q_start[-1] + n)
    seq_lens = [s + n for s, n in zip(starts, lengths)]
    return ForwardBatch(
        tokens=tokens,
        positions=torch.tensor(positions, dtype=torch.int64, device=device),
        slot_mapping=torch.tensor(slots, dtype=torch.int64, device=device),
        block_table=blocks.block_table_tensor(seq_ids, device=device),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=device),
        q_start=torch.tensor(q_start, dtype=torch.int32, device=device),
        tree_mask=None,
        logits_rows=torch.tensor(rows, dtype=torch.int64, device=device),
        max_query_len=max(lengths, default=0),
    )
