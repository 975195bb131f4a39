"""Host-side preparation of the tensors one step needs.

Everything here reads host lists only (token ids, lengths, block tables) and ends in one
``torch.tensor(..., device=...)`` per field, so preparing a step never waits on the
device.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from .kernels._sampling_core import radix_rounds_needed
from .kv_cache import BlockManager
from .sequence import Sequence
from .tree import tree_layout


@dataclass
class ForwardBatch:
    """A ragged batch of new tokens for ``forward_cached``; every tensor on the model's device.

    tokens:        [T] int64   new tokens of all sequences, concatenated
    positions:     [T] int64   absolute position of each token (RoPE)
    slot_mapping:  [T] int64   cache slot each token's K/V is written to
    block_table:   [B, max_blocks] int32
    seq_lens:      [B] int32   cached tokens per sequence including the new ones
    q_start:       [B + 1] int32  cumulative count of new tokens
    tree_mask:     [T] int64 ancestor bits, or None for causal order among new tokens
    logits_rows:   [R] int64   rows of ``tokens`` whose logits are wanted (None = all)
    max_query_len: host int, max new tokens of one sequence (kernel grid size)
    max_seq_len:   host int or None, an upper bound of seq_lens; lets attention split a
                   long KV range over more programs (a hint: results do not depend on it)
    """

    tokens: torch.Tensor
    positions: torch.Tensor
    slot_mapping: torch.Tensor
    block_table: torch.Tensor
    seq_lens: torch.Tensor
    q_start: torch.Tensor
    tree_mask: torch.Tensor | None
    logits_rows: torch.Tensor | None
    max_query_len: int
    max_seq_len: int | None = None


@dataclass
class SamplingTensors:
    """Per-sequence sampling parameters of one step, on the device, plus two host facts.

    temperature [B] float32, top_k [B] int32, top_p [B] float32,
    seeds [B] int64, offsets [B] int64 (the request's step counter).
    """

    temperature: torch.Tensor
    top_k: torch.Tensor
    top_p: torch.Tensor
    seeds: torch.Tensor
    offsets: torch.Tensor
    all_greedy: bool = False  # host facts, so sampling code can skip work without a sync
    filtered: bool = True  # some row uses top-k or top-p
    radix_rounds: int = 8  # radix-select rounds the samplers may need (radix_rounds_needed)

    @classmethod
    def of(cls, seqs: list[Sequence], device) -> SamplingTensors:
        p = [s.params for s in seqs]
        return cls(
            temperature=torch.tensor([x.temperature for x in p], dtype=torch.float32, device=device),
            top_k=torch.tensor([x.top_k for x in p], dtype=torch.int32, device=device),
            top_p=torch.tensor([x.top_p for x in p], dtype=torch.float32, device=device),
            seeds=torch.tensor([s.seed for s in seqs], dtype=torch.int64, device=device),
            offsets=torch.tensor([s.step for s in seqs], dtype=torch.int64, device=device),
            all_greedy=all(x.temperature == 0 for x in p),
            filtered=any(x.top_k > 0 or x.top_p < 1 for x in p),
            radix_rounds=radix_rounds_needed([x.top_k for x in p], [x.top_p for x in p]),
        )

    def select(self, index: torch.Tensor) -> SamplingTensors:
        """The rows ``index`` [A] int64 of the batch; the host facts, true of the whole
        batch, stay true of any subset."""
        pick = lambda t: t.index_select(0, index)  # noqa: E731
        return dataclasses.replace(self, temperature=pick(self.temperature), top_k=pick(self.top_k),
                                   top_p=pick(self.top_p), seeds=pick(self.seeds), offsets=pick(self.offsets))


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
    positions, slots, q_start = [], [], [0]
    rows: list[int] = []
    for seq_id, start, n, n_logits in zip(seq_ids, starts, lengths, num_logits, strict=True):
        pos = list(range(start, start + n))
        positions += pos
        slots += blocks.slots(seq_id, pos)
        rows += range(q_start[-1] + n - n_logits, q_start[-1] + n)
        q_start.append(q_start[-1] + n)
    seq_lens = [s + n for s, n in zip(starts, lengths, strict=True)]
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
        max_seq_len=max(seq_lens, default=0),  # host-known: lets attention split long KV ranges
    )


def build_tree_batch(
    blocks: BlockManager,
    seq_ids: list[int],
    roots: list[int],
    parents: list[list[int]],
    tokens: torch.Tensor,
    device,
) -> ForwardBatch:
    """A tree forward: sequence b adds ``[root, node 0, ..., node N_b - 1]``.

    roots[b]:   position of the root (the last committed token), L_b - 1
    parents[b]: the tree (see specdec/tree.py); node i is written to cache position
                roots[b] + 1 + i and rotated as position roots[b] + depth(i)
    tokens:     [sum(1 + N_b)] int64 on ``device``
    Logits are returned for every new token (the root's and each node's).
    """
    positions, slots, q_start = [], [], [0]
    masks: list[int] = []  # one packed ancestor mask per new token
    seq_lens = [r + 1 + len(p) for r, p in zip(roots, parents, strict=True)]
    for seq_id, root, ps in zip(seq_ids, roots, parents, strict=True):
        n = 1 + len(ps)
        depths, tree_mask = tree_layout(tuple(ps))
        positions += [root] + [root + d for d in depths]
        slots += blocks.slots(seq_id, list(range(root, root + n)))
        masks += tree_mask
        q_start.append(q_start[-1] + n)
    return ForwardBatch(
        tokens=tokens,
        positions=torch.tensor(positions, dtype=torch.int64, device=device),
        slot_mapping=torch.tensor(slots, dtype=torch.int64, device=device),
        block_table=blocks.block_table_tensor(seq_ids, device=device),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=device),
        q_start=torch.tensor(q_start, dtype=torch.int32, device=device),
        tree_mask=torch.tensor(masks, dtype=torch.int64, device=device),
        logits_rows=None,
        max_query_len=max(1 + len(p) for p in parents),
        max_seq_len=max(seq_lens),
    )
