"""The naive PyTorch path for every kernel.

One place for three jobs: the test oracle the Triton kernels are checked against, the
baseline the benchmarks compare with, and the CPU backend of the engine. Everything here
is written for clarity first; shapes are given in the docstrings and inline comments.

Paged KV cache layout shared by every attention function in specdec::

    k_cache, v_cache : [num_blocks, block_size, H_kv, D]
    slot             = block_table[b, pos // block_size] * block_size + pos % block_size

A forward over a ragged batch writes the new tokens' K/V into their slots first
(``write_kv``) and then attends (``verify_attention``): the last ``n_b`` cached positions
of sequence ``b`` are its new tokens (a chain, or the nodes of a draft tree in order).
"""

from __future__ import annotations

import torch

__all__ = [
    "write_kv",
    "move_kv",
    "verify_attention",
    "chain_tree_mask",
    "sampling_probs",
]


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
    """Copy cache entries ``src_slots[i] -> dst_slots[i]`` (keep-path compaction).

    All sources are read before any destination is written, so overlapping moves
    (a tree path shifting down onto its own earlier slots) are safe.
    """
    num_blocks, block_size, h_kv, d = k_cache.shape
    for cache in (k_cache, v_cache):
        flat = cache.view(num_blocks * block_size, h_kv, d)
        flat[dst_slots] = flat[src_slots].clone()


def chain_tree_mask(n: int, device=None) -> torch.Tensor:
    """Ancestor bitmask of a chain of ``n`` <= 64 nodes: node i sees nodes 0..i.

    Returns [n] int64 with bit j of entry i set when node j is i or an ancestor of i.
    """
    if not 0 <= n <= 64:
        raise ValueError(f"a tree mask holds at most 64 nodes, got {n}")
    i = torch.arange(n, dtype=torch.int64, device=device)
    # (1 << (i + 1)) - 1 overflows to -1 for i = 63, which is exactly "all 64 bits set".
    return torch.where(i == 63, torch.full_like(i, -1), (1 << (i + 1)) - 1)


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
) -> torch.Tensor:
    """Attention of ragged query tokens over the paged KV cache.

    q:            [T, H, D]   queries of all sequences, concatenated
    k_cache:      [num_blocks, block_size, H_kv, D]   (H % H_kv == 0, GQA)
    v_cache:      [num_blocks, block_size, H_kv, D]
    block_table:  [B, max_blocks] int32
    seq_lens:     [B] int32   cached tokens of each sequence *including* its n_b new ones
    q_start:      [B + 1] int32  cumulative query offsets; n_b = q_start[b+1] - q_start[b]
    tree_mask:    [T] int64 or None. Bit j of tree_mask[t] is set when query t may see
                  the j-th new token of its own sequence (itself and its tree ancestors).
                  None means causal order among the new tokens (prefill, decode, chain).
    scale:        softmax scale, usually D ** -0.5
    returns:      [T, H, D] in q's dtype

    Query i of sequence b sees every cached position < seq_lens[b] - n_b (the committed
    prefix), plus the new positions its mask allows. A query that sees nothing yields
    zeros.
    """
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
        prefix = length - n
        pos = torch.arange(length, device=q.device)  # [L]
        qi = torch.arange(n, device=q.device)  # [n]
        if tree_mask is None:
            visible = pos[None, :] <= prefix + qi[:, None]  # [n, L]
        else:
            j = (pos - prefix).clamp(min=0)
            bits = (tree_mask[t0:t1, None] >> j[None, :]) & 1  # [n, L]
            visible = (pos[None, :] < prefix) | ((pos[None, :] >= prefix) & (bits == 1))
        scores = torch.einsum("nhd,lhd->hnl", q[t0:t1].float(), k) * scale  # [H, n, L]
        scores = scores.masked_fill(~visible[None], float("-inf"))
        probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # all-masked rows -> 0
        out[t0:t1] = torch.einsum("hnl,lhd->nhd", probs, v)
    return out.to(q.dtype)


def sampling_probs(
    logits: torch.Tensor,
    temperature: torch.Tensor,
    top_k: torch.Tensor,
    top_p: torch.Tensor,
) -> torch.Tensor:
    """The distribution a sequence samples from: temperature, then top-k, then top-p.

    logits:      [N, V] any float dtype
    temperature: [N] float32; 0 means greedy (a point mass on the first argmax)
    top_k:       [N] int32; 0 (or >= V) disables it
    top_p:       [N] float32 in (0, 1]; 1 disables it
    returns:     [N, V] float32 probabilities, each row sums to 1

    Ties are kept together, so the rule is a pair of thresholds a kernel can find with a
    pivot search instead of a sort:
      top-k keeps x  iff  logit(x) >= the k-th largest logit;
      top-p keeps x  iff  the (top-k renormalised) mass of tokens strictly more likely
                          than x is < top_p (the token crossing p is kept).
    """
    x = logits.float()
    n, v = x.shape
    greedy = temperature <= 0
    t = torch.where(greedy, torch.ones_like(temperature), temperature).float()
    x = x / t[:, None]
    # -- top-k: threshold at the k-th largest logit --
    k = torch.where((top_k <= 0) | (top_k >= v), torch.full_like(top_k, v), top_k).long()
    kth = torch.sort(x, dim=-1, descending=True).values.gather(1, (k - 1)[:, None])  # [N, 1]
    x = x.masked_fill(x < kth, float("-inf"))
    probs = torch.softmax(x, dim=-1)
    # -- top-p: mass strictly above each token --
    sorted_p, _ = torch.sort(probs, dim=-1, descending=True)
    cum = torch.cumsum(sorted_p, dim=-1)  # cum[i] = mass of the i+1 largest
    # mass strictly greater than p(x): cumulative mass of sorted entries > p(x)
    # (entries of the descending sort that are > p(x)), found by binary search
    n_greater = torch.searchsorted(-sorted_p, -probs, side="left")  # [N, V]
    above = torch.where(
        n_greater > 0, cum.gather(1, (n_greater - 1).clamp(min=0)), torch.zeros_like(probs)
    )
    keep = above < top_p.float()[:, None]
    probs = probs * keep
    probs = probs / probs.sum(-1, keepdim=True)
    # -- greedy rows: point mass on the first argmax of the raw logits --
    onehot = torch.zeros_like(probs)
    onehot.scatter_(1, logits.float().argmax(-1, keepdim=True), 1.0)
    return torch.where(greedy[:, None], onehot, probs)
