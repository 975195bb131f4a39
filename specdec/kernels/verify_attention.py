"""Paged verification attention, in Triton.

One forward of the target model over a ragged batch does, per layer::

    write_kv(k_new, v_new, k_cache, v_cache, slot_mapping)        # new tokens -> cache
    out = verify_attention(q, k_cache, v_cache, block_table, seq_lens, q_start,
                           tree_mask, scale, max_query_len=...)   # [T, H, D]

and after the rejection sampler, ``move_kv`` compacts the accepted tree path; the two
cache ops live in :mod:`specdec.kernels.kv_cache_ops`. Semantics are those of
:mod:`specdec.kernels.reference` (the test oracle); the paged layout is described there.

Query i of sequence b sees cached positions < seq_lens[b] - n_b and the new positions
that its mask allows; a query that sees nothing yields zeros. A tree mask holds 64 nodes,
so ``tree_mask`` with ``max_query_len > 64`` raises ValueError (use None for longer
chains). Device values are not checked (that would sync): seq_lens[b] >= n_b and
block_table[b, :cdiv(seq_lens[b], block_size)] valid block ids are the caller's contract;
positions past the block table row are never read.

Example::

    >>> import torch
    >>> from specdec.kernels.verify_attention import verify_attention
    >>> kc = torch.randn(4, 16, 2, 64); vc = torch.randn(4, 16, 2, 64)
    >>> q = torch.randn(3, 4, 64)                     # one sequence, 3 new tokens
    >>> bt = torch.tensor([[2, 0]], dtype=torch.int32)  # 20 positions: 17 + 3
    >>> out = verify_attention(q, kc, vc, bt, torch.tensor([20], dtype=torch.int32),
    ...                        torch.tensor([0, 3], dtype=torch.int32), None, 64 ** -0.5,
    ...                        max_query_len=3)
    >>> out.shape
    torch.Size([3, 4, 64])

The kernels (``_attention_kernels.py``: design notes there), the host-side launch policy
(``_attention_policy.py``: tile shapes, KV splits) and this launcher are three files.
"""

from __future__ import annotations

import dataclasses
import math

import torch
import triton

from ..tree import MAX_TREE_NODES
from . import _attention_policy as policy
from ._attention_kernels import _combine_splits_kernel, _verify_attention_kernel
from ._validation import (
    check_host_int,
    check_index,
    check_kv_cache,
    check_window_args,
    require,
    require_same_device,
    require_tensor,
    require_unit_stride,
    shape_of,
)

__all__ = ["verify_attention"]

_LOG2E = 1.4426950408889634  # 1 / ln 2: exp(x) == exp2(x * _LOG2E)
_MAX_HEAD_DIM = 256

# --------------------------------------------------------------------------- validation


def _check_attention_args(q, k_cache, v_cache, block_table, seq_lens, q_start, tree_mask,
                          scale) -> None:
    require_tensor("q", q)
    require(q.dim() == 3, f"q must be [T, H, D], got shape {shape_of(q)}")
    check_kv_cache(k_cache, v_cache)
    T, H, D = q.shape
    h_kv, d_cache = k_cache.shape[2], k_cache.shape[3]
    require(q.dtype == k_cache.dtype,
            f"q is {q.dtype} but k_cache/v_cache are {k_cache.dtype}; use one dtype")
    require(D == d_cache, f"q has head_dim {D} (shape {shape_of(q)}) but k_cache has "
            f"{d_cache} (shape {shape_of(k_cache)})")
    require(1 <= D <= _MAX_HEAD_DIM, f"head_dim must be in [1, {_MAX_HEAD_DIM}], got {D}")
    require(h_kv >= 1 and H >= h_kv and H % h_kv == 0,
            f"q has {H} heads, which is not a multiple of k_cache's {h_kv} KV heads")
    require_unit_stride("q", q)
    require_tensor("block_table", block_table)
    require(block_table.dim() == 2,
            f"block_table must be [B, max_blocks], got shape {shape_of(block_table)}")
    require(block_table.dtype == torch.int32,
            f"block_table must be torch.int32, got {block_table.dtype}")
    require_unit_stride("block_table", block_table)
    B = block_table.shape[0]
    require(B <= 65535, f"block_table has {B} rows; at most 65535 sequences per launch")
    check_index("seq_lens", seq_lens, B, torch.int32, f"B = {B} from block_table")
    check_index("q_start", q_start, B + 1, torch.int32, f"B + 1, B = {B} from block_table")
    devices = dict(k_cache=k_cache, v_cache=v_cache, block_table=block_table,
                   seq_lens=seq_lens, q_start=q_start)
    if tree_mask is not None:
        check_index("tree_mask", tree_mask, T, torch.int64, f"T = {T} from q")
        devices["tree_mask"] = tree_mask
    require_same_device("q", q, **devices)
    require(isinstance(scale, (int, float)) and not isinstance(scale, bool)
            and math.isfinite(scale), f"scale must be a finite float, got {scale!r}")


# --------------------------------------------------------------------------- launchers


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
    max_query_len: int | None = None,
    max_seq_len: int | None = None,
    sliding_window: int | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """Attention of ragged query tokens over the paged KV cache (Triton).

    q:            [T, H, D] float16 / bfloat16 / float32, stride 1 in D
    k_cache:      [num_blocks, block_size, H_kv, D], q's dtype, stride 1 in D; H % H_kv == 0
    v_cache:      [num_blocks, block_size, H_kv, D], same shape and dtype as k_cache
    block_table:  [B, max_blocks] int32, row stride free, stride 1 along a row
    seq_lens:     [B] int32, cached positions of each sequence *including* its n_b new ones
    q_start:      [B + 1] int32, q_start[0] = 0, non-decreasing, q_start[B] = T;
                  n_b = q_start[b + 1] - q_start[b]
    tree_mask:    [T] int64 or None. Bit j of tree_mask[t] lets query t see the j-th new
                  token of its own sequence. None means causal among the new tokens
                  (prefill, decode, chain), with no limit on n_b.
    scale:        softmax scale, usually D ** -0.5
    max_query_len (host int, keyword): an upper bound of max_b n_b. It sizes the grid
                  without reading the device; a larger bound only adds programs that
                  exit at once. None reads q_start once (a device sync).
    max_seq_len   (host int, keyword): a hint, an upper bound of max_b seq_lens. With it
                  a small grid (decode with few sequences) is split along the KV range
                  to fill the GPU; without it the KV range is not split. Results do not
                  depend on it.
    sliding_window (keyword): None, or W >= 1: a query at position p sees only keys at
                  positions > p - W; a tree node's position is prefix + its depth (see
                  the reference). Keys before the window are not read.
    softcap       (keyword): None, or c > 0: scores c * tanh(scores / c) (Gemma 2)
    returns:      [T, H, D] in q's dtype

    Visibility, the caller's contract and an example: see the module docstring.
    """
    _check_attention_args(q, k_cache, v_cache, block_table, seq_lens, q_start, tree_mask, scale)
    check_window_args(sliding_window, softcap)
    check_host_int("max_query_len", max_query_len)
    check_host_int("max_seq_len", max_seq_len)
    T, H, D = q.shape
    B, h_kv = block_table.shape[0], k_cache.shape[2]
    max_query_len = _query_bound(max_query_len, q_start, T, B, tree_mask is not None)
    policy.check_gpu_support(q.dtype, D, H // h_kv, q.device)
    if sliding_window is not None and max_seq_len is not None:
        # a program streams at most its rows' windows: split that range, not the sequence
        max_seq_len = min(max_seq_len, sliding_window + max_query_len)
    cfg = policy.pick_config(B, h_kv, H // h_kv, D, max_query_len, max_seq_len, q.dtype, q.device)
    return _launch_attention(q, k_cache, v_cache, block_table, seq_lens, q_start, tree_mask,
                             scale, max_query_len, cfg, sliding_window, softcap)


def _query_bound(max_query_len: int | None, q_start: torch.Tensor, T: int, B: int, tree: bool) -> int:
    """The host bound of max_b n_b the grid is sized by (checked against T, B and the tree
    mask's 64 nodes); None reads q_start once (the one device read)."""
    if max_query_len is None:
        max_query_len = int((q_start[1:] - q_start[:-1]).max()) if B > 0 else 0
    max_query_len = min(max_query_len, T)
    if tree and max_query_len > MAX_TREE_NODES:
        raise ValueError(f"tree_mask holds {MAX_TREE_NODES} nodes per sequence, but "
                         f"max_query_len is {max_query_len}; pass tree_mask=None for a chain")
    require(T == 0 or (B > 0 and max_query_len > 0),
            f"q has {T} rows but max_query_len is {max_query_len} with B = {B}")
    return max_query_len


def _launch_attention(q, k_cache, v_cache, block_table, seq_lens, q_start, tree_mask, scale,
                      max_query_len: int, cfg: policy.Config, sliding_window: int | None = None,
                      softcap: float | None = None) -> torch.Tensor:
    """Launch with an explicit config (inputs already validated)."""
    T, H, D = q.shape
    B = block_table.shape[0]
    page, h_kv = k_cache.shape[1], k_cache.shape[2]
    group = H // h_kv
    out = torch.empty(T, H, D, dtype=q.dtype, device=q.device)
    if T == 0:
        return out
    block_m = max(cfg.block_m, triton.next_power_of_2(group), 16)
    block_q = block_m // group  # queries per tile
    splits = min(cfg.num_splits, policy.MAX_SPLITS)
    if splits > 1:
        # fp32 partial outputs [S, T16, H, D] and their log2-sum-exp2 [S, T16, H], with
        # T16 = T rounded up to 16 so that the split strides are multiples of 16
        t16 = triton.cdiv(T, 16) * 16
        part = torch.empty(splits, t16, H, D, dtype=torch.float32, device=q.device)
        lse = torch.empty(splits, t16, H, dtype=torch.float32, device=q.device)
        dst, stride_os16, stride_ls16, stride_lt = part, part.stride(0) // 16, lse.stride(0) // 16, lse.stride(1)
        dst_t, dst_h = part.stride(1), part.stride(2)
    else:
        lse = out  # unused
        dst, stride_os16, stride_ls16, stride_lt = out, 0, 0, 0
        dst_t, dst_h = out.stride(0), out.stride(1)
    upcast = policy.interpreting() and q.dtype == torch.bfloat16
    grid = (triton.cdiv(max_query_len, block_q) * splits, h_kv, B)
    _verify_attention_kernel[grid](
        q, k_cache, v_cache, block_table, seq_lens, q_start,
        tree_mask if tree_mask is not None else seq_lens, dst, lse,
        # soft-capping: the kernel takes scale / cap and cap / ln 2 (see _attend_range)
        float(scale) / softcap if softcap else float(scale) * _LOG2E,
        float(softcap) * _LOG2E if softcap else 0.0,
        int(sliding_window) if sliding_window else 0, block_table.shape[1] * page, splits,
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        block_table.stride(0),
        stride_os16, dst_t, dst_h,
        stride_ls16, stride_lt,
        HEAD_DIM=D, BLOCK_D=max(16, triton.next_power_of_2(D)), PAGE_SIZE=page, GROUP=group,
        BLOCK_Q=block_q, BLOCK_M=block_m, BLOCK_N=cfg.block_n, SPLIT=splits > 1,
        HAS_TREE=tree_mask is not None, SLIDING=sliding_window is not None,
        SOFTCAP=softcap is not None, UPCAST=upcast,
        DOT_PRECISION="ieee" if q.dtype == torch.float32 or upcast else "tf32",
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    if splits > 1:
        _combine_splits_kernel[(T, H)](
            part, lse, out, splits,
            part.stride(0) // 16, part.stride(1), part.stride(2), lse.stride(0) // 16,
            lse.stride(1), out.stride(0), out.stride(1),
            HEAD_DIM=D, BLOCK_D=triton.next_power_of_2(D), BLOCK_S=policy.MAX_SPLITS,
            num_warps=4 if D >= 128 else 2,
        )
    return out


def precompile(k_cache: torch.Tensor, v_cache: torch.Tensor, num_heads: int, scratch_block: int,
               *, trees: bool = True, kinds: tuple = ((None, None),)) -> int:
    """Launch every kernel variant the policy can choose for this cache once, ahead of
    serving, so that no request waits for a Triton compile (a few seconds each).

    k_cache/v_cache: [num_blocks, block_size, H_kv, D], one layer of a model's cache
    num_heads:       the model's query heads H
    scratch_block:   a block no sequence owns; the launches read it and write nothing
    trees:           also the tree-mask variants
    kinds:           the model's attention kinds, (sliding_window, softcap) pairs (one
                     variant each; the window size and cap are runtime values)
    returns:         the number of launches

    A variant is a tile config (``policy.policy_tiles``) x split or not x tree or causal; the
    split count, batch size and block-table width are runtime ints, so one launch of one
    query over the scratch block compiles what every batch of that kind will run.
    """
    check_kv_cache(k_cache, v_cache)
    _, _, h_kv, d = k_cache.shape
    dtype, device = k_cache.dtype, k_cache.device
    require(num_heads % h_kv == 0, f"num_heads {num_heads} is not a multiple of {h_kv} KV heads")
    group = num_heads // h_kv
    policy.check_gpu_support(dtype, d, group, device)
    gpu = policy.gpu_of_device(device)
    if gpu is None or policy.interpreting():  # one config: the interpreter's
        tiles = [policy.pick_config(1, h_kv, group, d, 1, None, dtype, device)]
    else:
        tiles = policy.policy_tiles(dtype, d, group, gpu.arch)
    q = torch.zeros(1, num_heads, d, dtype=dtype, device=device)
    block_table = torch.full((1, 1), scratch_block, dtype=torch.int32, device=device)
    seq_lens = torch.ones(1, dtype=torch.int32, device=device)
    q_start = torch.arange(2, dtype=torch.int32, device=device)
    masks = [None] + ([torch.ones(1, dtype=torch.int64, device=device)] if trees else [])
    launches = 0
    for window, softcap in kinds:
        check_window_args(window, softcap)
    for window, softcap in kinds:
        for cfg in tiles:
            for splits in (1, 2):
                for mask in masks:
                    _launch_attention(q, k_cache, v_cache, block_table, seq_lens, q_start, mask,
                                      d ** -0.5, 1, dataclasses.replace(cfg, num_splits=splits),
                                      sliding_window=window, softcap=softcap)
                    launches += 1
    return launches
