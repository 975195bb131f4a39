"""Paged KV cache writes and moves, in PyTorch (the CPU backend and the oracle of
``kv_cache_ops``). Slot of position p: ``block_table[p // block_size] * block_size + p % block_size``."""

from __future__ import annotations

import torch

__all__ = ["write_kv", "move_kv"]


def write_kv(
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Scatter new keys and values into the paged cache.

    k, v:            [T, H_kv, D]
    k_cache/v_cache: [num_blocks, block_size, H_kv, D] (written in place)
    slot_mapping:    [T] int64, flat slot index ``block * block_size + offset``
    """
    num_blocks, block_size, h_kv, d = k_cache.shape
    k_cache.view(num_blocks * block_size, h_kv, d)[slot_mapping] = k.to(k_cache.dtype)
    v_cache.view(num_blocks * block_size, h_kv, d)[slot_mapping] = v.to(v_cache.dtype)


def move_kv(
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    src_slots: torch.Tensor,
    dst_slots: torch.Tensor,
) -> None:
    """Copy cache entries ``src_slots[i] -> dst_slots[i]`` (keep-path compaction), in place.

    k_cache/v_cache:      [..., num_blocks, block_size, H_kv, D]: leading dims (a model's
                          layers, ``KVCache.k``) move together, in one index op
    src_slots, dst_slots: [N] int64 (or int32) slots ``block * block_size + offset``

    All sources are read (advanced indexing gathers into a new tensor) before any
    destination is written, so overlapping moves (a tree path shifting down onto its own
    earlier slots) are safe.
    """
    for cache in (k_cache, v_cache):
        lead, (h_kv, d) = cache.shape[:-4], cache.shape[-2:]
        flat = cache.view(*lead, -1, h_kv, d)  # [..., num_blocks * block_size, H_kv, D]
        flat[..., dst_slots, :, :] = flat[..., src_slots, :, :]

