"""Paged KV cache: fixed-size blocks, one block table per sequence.

Two pieces with separate jobs:

* ``BlockManager`` — host-side bookkeeping: a free list of block ids and, per sequence,
  the list of blocks that hold its tokens. One manager can serve several caches (the
  target's and a draft model's) because they share logical positions: token ``pos`` of
  a sequence lives in slot ``table[pos // block_size] * block_size + pos % block_size``
  of every cache that uses the table.
* ``KVCache`` — the device tensors of one model, preallocated once:
  ``k, v: [num_layers, num_blocks, block_size, H_kv, D]``.

``allocate_caches`` sizes both from a memory budget: the manager gets ``N`` blocks, every
cache ``N + 1``; the last, ``KVCache.scratch_block``, is never given to a sequence, so the
padded rows of fixed-shape steps and the warm-up launches have somewhere to write.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import torch

from .kernels.reference import move_kv


class CacheCapacityError(RuntimeError):
    """Raised when the KV cache has no free block for an allocation."""


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


class BlockManager:
    """Free list and per-sequence block tables over ``num_blocks`` blocks."""

    def __init__(self, num_blocks: int, block_size: int):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"need num_blocks >= 1 and block_size >= 1, got {num_blocks}, {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._free: list[int] = list(range(num_blocks - 1, -1, -1))  # pop() takes block 0 first
        self._tables: dict[int, list[int]] = {}

    # -- queries --
    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    def blocks_needed(self, seq_id: int, num_tokens: int) -> int:
        """Extra blocks ``seq_id`` needs to hold ``num_tokens`` tokens in all."""
        have = len(self._tables.get(seq_id, ()))
        return max(0, cdiv(num_tokens, self.block_size) - have)

    def table(self, seq_id: int) -> list[int]:
        return self._tables[seq_id]

    def capacity(self, seq_id: int) -> int:
        return len(self._tables.get(seq_id, ())) * self.block_size

    # -- updates --
    def allocate(self, seq_id: int, num_tokens: int) -> None:
        """Grow ``seq_id``'s table so it holds ``num_tokens`` tokens (the append path)."""
        need = self.blocks_needed(seq_id, num_tokens)
        if need > len(self._free):
            raise CacheCapacityError(
                f"sequence {seq_id} needs {need} more KV blocks but only {len(self._free)} "
                f"of {self.num_blocks} are free"
            )
        table = self._tables.setdefault(seq_id, [])
        table.extend(self._free.pop() for _ in range(need))

    def truncate(self, seq_id: int, num_tokens: int) -> None:
        """Release the blocks of ``seq_id`` past the first ``num_tokens`` tokens."""
        table = self._tables.get(seq_id)
        if table is None:
            return
        keep = cdiv(num_tokens, self.block_size)
        while len(table) > keep:
            self._free.append(table.pop())

    def free(self, seq_id: int) -> None:
        """Release every block of ``seq_id``."""
        self.truncate(seq_id, 0)
        self._tables.pop(seq_id, None)

    # -- tensors for a forward --
    def slots(self, seq_id: int, positions: list[int]) -> list[int]:
        table, bs = self._tables[seq_id], self.block_size
        return [table[p // bs] * bs + p % bs for p in positions]

    def block_table_tensor(self, seq_ids: list[int], device=None) -> torch.Tensor:
        """[B, max_blocks] int32, rows padded with 0 (never read past seq_lens)."""
        width = max([len(self._tables.get(s, ())) for s in seq_ids] + [1])
        rows = [self._tables.get(s, []) + [0] * (width - len(self._tables.get(s, []))) for s in seq_ids]
        return torch.tensor(rows, dtype=torch.int32, device=device)


class KVCache:
    """Preallocated K and V of one model: ``[num_layers, num_blocks, block_size, H_kv, D]``."""

    def __init__(self, num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int,
                 head_dim: int, dtype: torch.dtype, device):
        shape = (num_layers, num_blocks, block_size, num_kv_heads, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.block_size = block_size
        self.num_blocks = num_blocks

    @staticmethod
    def bytes_per_block(num_layers: int, block_size: int, num_kv_heads: int, head_dim: int,
                        dtype: torch.dtype) -> int:
        itemsize = torch.empty((), dtype=dtype).element_size()
        return 2 * num_layers * block_size * num_kv_heads * head_dim * itemsize

    def keep_path(self, src_slots: torch.Tensor, dst_slots: torch.Tensor) -> None:
        """Copy K/V ``src_slots[i] -> dst_slots[i]`` in every layer at once (one index op).

        Used after tree verification to move the accepted path into consecutive slots;
        the sources are gathered before anything is written, so overlaps are safe.
        """
        move_kv(self.k, self.v, src_slots, dst_slots)  # [layers, ...]: every layer in one op

    def layer(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.k[i], self.v[i]

    @property
    def scratch_block(self) -> int:
        """The last block. ``allocate_caches`` gives the block manager one block fewer than
        the cache holds, so no sequence is ever given this one."""
        return self.num_blocks - 1


class CacheLayout(Protocol):
    """What sizing reads of a model config (``ModelConfig`` has it); read-only, so a frozen
    dataclass matches."""

    @property
    def num_layers(self) -> int: ...
    @property
    def num_kv_heads(self) -> int: ...
    @property
    def head_dim(self) -> int: ...
    @property
    def max_position_embeddings(self) -> int: ...


def default_budget(device: torch.device) -> int:
    """KV-cache bytes when the caller gives none: 70% of free memory on CUDA, 1 GiB elsewhere."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free * 0.7)
    return 1 << 30


def allocate_caches(configs: Sequence[CacheLayout], budget: float | None, block_size: int, max_num_seqs: int,
                    draft_slots: int, dtype: torch.dtype, device) -> tuple[BlockManager, list[KVCache]]:
    """One block manager and one cache per model, sized to share a memory budget.

    configs:      the target's config first, then each model with a cache of its own (a
                  draft model); every cache gets the same number of blocks
    budget:       bytes for all caches together; None: ``default_budget(device)``
    draft_slots:  cache slots one step's drafts take past the context (chain length or tree
                  nodes; 0 without a drafter)
    returns:      (BlockManager over N blocks, caches of N + 1 blocks each: the last is the
                  scratch block), N = min(budget // bytes per block - 1, what ``max_num_seqs``
                  sequences of the target's full context and the drafts need)
    """
    per_block = sum(KVCache.bytes_per_block(c.num_layers, block_size, c.num_kv_heads, c.head_dim, dtype)
                    for c in configs)
    budget = int(budget) if budget is not None else default_budget(torch.device(device))
    full = max_num_seqs * cdiv(configs[0].max_position_embeddings + draft_slots, block_size)
    num_blocks = min(budget // per_block - 1, full)  # one more: the scratch block of padded rows
    if num_blocks < 1:
        raise ValueError(f"kv_cache_memory={budget} bytes holds fewer than two KV blocks of {per_block} bytes")
    caches = [KVCache(c.num_layers, num_blocks + 1, block_size, c.num_kv_heads, c.head_dim, dtype, device)
              for c in configs]
    return BlockManager(num_blocks, block_size), caches
