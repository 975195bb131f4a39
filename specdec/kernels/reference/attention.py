"""Attention of ragged queries over the paged KV cache, in PyTorch (the oracle of
``verify_attention.py`` and the CPU backend)."""

from __future__ import annotations

import torch

from .._validation import check_window_args

__all__ = ["verify_attention"]


def _slots_of(block_table_row: torch.Tensor, length: int, block_size: int) -> torch.Tensor:
    pos = torch.arange(length, device=block_table_row.device)
    return block_table_row[pos // block_size].to(torch.int64) * block_size + pos % block_size


def verify_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    q_start: torch.Tensor,
    tree_mask: torch.Tensor | None,
    scale: float,
    *,
    sliding_window: int | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """Attention of ragged query tokens over the paged KV cache.

    q:            [T, H, D]   queries of all sequences, concatenated
    k_cache, v_cache: [num_blocks, block_size, H_kv, D]   (H % H_kv == 0, GQA)
    block_table:  [B, max_blocks] int32
    seq_lens:     [B] int32   cached tokens of each sequence *including* its n_b new ones
    q_start:      [B + 1] int32  cumulative query offsets; n_b = q_start[b+1] - q_start[b]
    tree_mask:    [T] int64 or None. Bit j of tree_mask[t]: query t sees the j-th new token
                  of its sequence (itself, its tree ancestors); None: causal (chain, prefill)
    scale:        softmax scale, usually D ** -0.5
    sliding_window: None, or W >= 1: a query at position p sees only keys at positions
                  > p - W (mistral / Gemma local layers). Positions: a committed key's is
                  its cache index; a causal query i's is prefix + i; a tree node's is
                  prefix + depth, depth = its ancestors among the new tokens (popcount of
                  its mask - 1), the position the engine rotates it by
    softcap:      None, or c > 0: scores -> c * tanh(scores / c) before the mask (Gemma 2)
    returns:      [T, H, D] in q's dtype

    Query i of sequence b sees every cached position < seq_lens[b] - n_b (the committed
    prefix), plus the new positions its mask allows, less those outside its window. A
    query that sees nothing yields zeros.
    """
    check_window_args(sliding_window, softcap)
    T, H, D = q.shape
    block_size, h_kv = k_cache.shape[1], k_cache.shape[2]
    group = H // h_kv
    out = torch.zeros(T, H, D, dtype=torch.float32, device=q.device)
    starts = q_start.tolist()
    lens = seq_lens.tolist()
    flat_k = k_cache.view(-1, h_kv, D)
    flat_v = v_cache.view(-1, h_kv, D)
    for b, length in enumerate(lens):
        t0, t1 = starts[b], starts[b + 1]
        n = t1 - t0
        if n == 0:
            continue
        slots = _slots_of(block_table[b], length, block_size)
        k = flat_k[slots].float().repeat_interleave(group, dim=1)  # [L, H, D]
        v = flat_v[slots].float().repeat_interleave(group, dim=1)  # [L, H, D]
        visible = _visible(tree_mask, t0, t1, length, sliding_window, q.device)  # [n, L]
        scores = torch.einsum("nhd,lhd->hnl", q[t0:t1].float(), k) * scale  # [H, n, L]
        if softcap is not None:
            scores = softcap * torch.tanh(scores / softcap)
        scores = scores.masked_fill(~visible[None], float("-inf"))
        probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # all-masked rows -> 0
        out[t0:t1] = torch.einsum("hnl,lhd->nhd", probs, v)
    return out.to(q.dtype)


def _visible(tree_mask, t0: int, t1: int, length: int, sliding_window, device) -> torch.Tensor:
    """[n, L] bool: which of a sequence's L cached keys each of its n = t1 - t0 queries sees."""
    n = t1 - t0
    prefix = length - n
    pos = torch.arange(length, device=device)  # [L]
    qi = torch.arange(n, device=device)  # [n]
    if tree_mask is None:
        visible = pos[None, :] <= prefix + qi[:, None]  # [n, L]
    else:
        j = (pos - prefix).clamp(min=0)
        bits = (tree_mask[t0:t1, None] >> j[None, :]) & 1  # [n, L]
        visible = (pos[None, :] < prefix) | ((pos[None, :] >= prefix) & (bits == 1))
    if sliding_window is not None:
        q_pos, k_pos = _token_positions(tree_mask, t0, t1, prefix, pos)  # [n], [L]
        visible = visible & (q_pos[:, None] - k_pos[None, :] < sliding_window)
    return visible


def _token_positions(tree_mask, t0: int, t1: int, prefix: int, pos: torch.Tensor):
    """Positions of one sequence's queries [n] and of its cached keys [L] (see
    ``verify_attention``): new token j sits at prefix + j (causal) or prefix + depth_j."""
    n = t1 - t0
    if tree_mask is None:
        new_pos = prefix + torch.arange(n, device=pos.device)
    else:
        bits = (tree_mask[t0:t1, None] >> torch.arange(64, device=pos.device)) & 1  # [n, 64]
        new_pos = prefix + bits.sum(-1) - 1  # depth = ancestors among the new tokens
    k_pos = pos.clone()
    k_pos[prefix:] = new_pos
    return new_pos, k_pos

