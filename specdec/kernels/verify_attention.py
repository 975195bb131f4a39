"""Paged verification attention, in Triton.

One forward of the target model over a ragged batch does, per layer::

    write_kv(k_new, v_new, k_cache, v_cache, slot_mapping)        # new tokens -> cache
    out = verify_attention(q, k_cache, v_cache, block_table, seq_lens, q_start,
                           tree_mask, scale, max_query_len=...)   # [T, H, D]

and after the rejection sampler, ``move_kv`` compacts the accepted tree path; the two
cache ops live in :mod:`specdec.kernels.kv_cache_ops`. Semantics are those of
:mod:`specdec.kernels.reference` (the test oracle); the paged layout is described there.

Kernel design (``_verify_attention_kernel``):

* grid = (query tiles x KV splits, H_kv, B); axis 0 varies fastest, so the programs
  that stream the same sequence/KV head run side by side and share K/V through L2.
* GQA fold: one program owns one KV head and all ``G = H / H_kv`` query heads on it.
  Tile row ``r`` is query ``q0 + r // G`` of the sequence, head ``kvh * G + r % G``,
  so each K/V tile is loaded once and multiplied against ``BLOCK_M = BLOCK_Q * G``
  rows (the Q tile is [BLOCK_M, D], the score tile [BLOCK_M, BLOCK_N]).
* Ragged queries without a host sync: the host knows an upper bound of the queries
  per sequence (``max_query_len``), the grid has ``cdiv(max_query_len, BLOCK_Q)`` tiles
  per sequence and a tile past its sequence's ``n_b`` queries returns at once.
* KV positions are walked BLOCK_N at a time; every position's slot comes from the
  block table (``block_table[b, pos // page] * page + pos % page``), so any page size
  works and a tile may straddle pages. Offsets into the cache are int64.
* Two loops: positions every row of the tile sees (the prefix; for causal also the new
  tokens up to the tile's first query) run without masks, the rest with the causal or
  tree-bit mask. Online softmax in base 2 with fp32 statistics (FlashAttention-2).
* Split-KV (flash-decoding) when the grid is too small to fill the GPU (decode, small
  batches, trees at B <= 8): each split handles a slice of the KV range and writes an
  fp32 partial output and its log-sum-exp; ``_combine_splits_kernel`` merges them.
  Query tiles are never shrunk to make programs: each query tile of a (sequence, KV
  head) streams that head's whole K/V (see the launch-config policy below).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ..tree import MAX_TREE_NODES
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


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


# --------------------------------------------------------------------------- kernels


@triton.jit
def _load_kv_tile(ptr, row_off, d, pos_ok, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                  MASKED: tl.constexpr, UPCAST: tl.constexpr):
    """[BLOCK_N, BLOCK_D] rows of K or V at int64 element offsets ``row_off``."""
    ptrs = ptr + row_off[:, None] + d[None, :]
    if MASKED:
        x = tl.load(ptrs, mask=pos_ok[:, None] & (d[None, :] < HEAD_DIM), other=0.0)
    elif HEAD_DIM == BLOCK_D:
        x = tl.load(ptrs)
    else:
        x = tl.load(ptrs, mask=d[None, :] < HEAD_DIM, other=0.0)
    if UPCAST:  # the interpreter computes bf16 wrongly
        x = x.to(tl.float32)
    return x


@triton.jit
def _popcount64(x):
    """Set bits of each int64 (SWAR; the masks clear the sign bits arithmetic shifts copy)."""
    x = x - ((x >> 1) & 0x5555555555555555)
    x = (x & 0x3333333333333333) + ((x >> 2) & 0x3333333333333333)
    x = (x + (x >> 4)) & 0x0F0F0F0F0F0F0F0F
    return (x * 0x0101010101010101) >> 56  # the byte sums, added into the top byte


@triton.jit
def _attend_range(
    acc, l_i, m_i, q, qi, q_pos, tree_bits, lo, hi, prefix, n_new,
    k_ptr, v_ptr, bt_row_ptr, scale_log2, cap_log2, window,
    stride_kb, stride_ks, stride_vb, stride_vs,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
    PAGE_SIZE: tl.constexpr, MASKED: tl.constexpr, HAS_TREE: tl.constexpr,
    SLIDING: tl.constexpr, SOFTCAP: tl.constexpr,
    UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """Online-softmax accumulation over KV positions [lo, hi) (hi - lo a whole number of
    KV tiles unless MASKED).

    acc [BLOCK_M, BLOCK_D] f32, l_i / m_i [BLOCK_M] f32 (row sum and max, base 2).
    k_ptr / v_ptr already point at the program's KV head. SOFTCAP: ``scale_log2`` is
    scale / cap and scores are cap * tanh(q.k * scale / cap) (``cap_log2`` = cap / ln 2).
    SLIDING (with MASKED): row r also needs q_pos[r] - key position < ``window``.
    """
    offs_n = tl.arange(0, BLOCK_N)
    d = tl.arange(0, BLOCK_D)
    for start in range(lo, hi, BLOCK_N):
        pos = start + offs_n  # [BLOCK_N] positions in the sequence
        pos_ok = pos < hi
        # -- paged addressing: slot = block_table[b, pos // page] * page + pos % page --
        if MASKED:
            blk = tl.load(bt_row_ptr + pos // PAGE_SIZE, mask=pos_ok, other=0)
        else:
            blk = tl.load(bt_row_ptr + pos // PAGE_SIZE)
        blk = blk.to(tl.int64)
        in_page = (pos % PAGE_SIZE).to(tl.int64)
        k = _load_kv_tile(k_ptr, blk * stride_kb + in_page * stride_ks, d, pos_ok,
                          HEAD_DIM, BLOCK_D, MASKED, UPCAST)
        # -- compute qk: s = (q . k) * scale / ln 2, so that exp(x) becomes exp2(s) --
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * scale_log2
        if SOFTCAP:
            # cap * tanh(x), x = q.k * scale / cap; tanh(x) = 1 - 2 / (e^2x + 1) (+-1 at +-inf)
            s = (1.0 - 2.0 / (tl.math.exp2(s * (2.0 * 1.4426950408889634)) + 1.0)) * cap_log2
        if MASKED:
            j = pos - prefix  # index among the new tokens; < 0 inside the prefix
            if HAS_TREE:
                # bit j of the query's ancestor mask (shift clamped to the 64 bits)
                shift = tl.minimum(tl.maximum(j, 0), 63).to(tl.int64)
                bit = (tree_bits[:, None] >> shift[None, :]) & 1
                visible = (j[None, :] < 0) | ((j[None, :] < n_new) & (bit != 0))
            else:
                visible = j[None, :] <= qi[:, None]  # causal among the new tokens
            if SLIDING:
                # distance from the query to the key in positions; a tree ancestor j sits
                # as many positions before the query as the query has ancestors after j
                dist = q_pos[:, None] - pos[None, :]
                if HAS_TREE:
                    jj = tl.minimum(tl.maximum(j, 0), 63).to(tl.int64)
                    after_j = tree_bits[:, None] & ~((2 << jj[None, :]) - 1)  # bits above j
                    dist = tl.where(j[None, :] < 0, dist, _popcount64(after_j))
                visible = visible & (dist < window)
            visible = visible & pos_ok[None, :]
            s = tl.where(visible, s, float("-inf"))
        # -- online softmax: m_new = max(m, rowmax s); rescale acc and l by 2^(m - m_new) --
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # a row that has seen nothing keeps m = -inf; subtract 0 instead (no inf - inf)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.math.exp2(m_i - m_safe)
        p = tl.math.exp2(s - m_safe[:, None])  # [BLOCK_M, BLOCK_N], masked -> 0
        l_i = l_i * alpha + tl.sum(p, 1)
        v = _load_kv_tile(v_ptr, blk * stride_vb + in_page * stride_vs, d, pos_ok,
                          HEAD_DIM, BLOCK_D, MASKED, UPCAST)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=DOT_PRECISION)
        m_i = m_new
    return acc, l_i, m_i


# Ints that vary from call to call (the block table's width, the KV split count and the
# partial buffers' split strides) are not specialised: one compiled variant serves every
# batch. Split strides are passed in units of 16 elements and multiplied back in the
# kernel, so the compiler still knows they keep 16-element alignment.
@triton.jit(do_not_specialize=["max_positions", "stride_bt", "num_splits", "stride_os16",
                               "stride_ls16", "window"])
def _verify_attention_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, block_table_ptr, seq_lens_ptr, q_start_ptr,
    tree_mask_ptr, out_ptr, lse_ptr,
    scale_log2, cap_log2, window, max_positions, num_splits,
    stride_qt, stride_qh,
    stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh,
    stride_bt,
    stride_os16, stride_ot, stride_oh,
    stride_ls16, stride_lt,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, PAGE_SIZE: tl.constexpr,
    GROUP: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, SPLIT: tl.constexpr, HAS_TREE: tl.constexpr,
    SLIDING: tl.constexpr, SOFTCAP: tl.constexpr,
    UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    tile = tl.program_id(0) // num_splits
    split = tl.program_id(0) % num_splits
    kvh = tl.program_id(1)
    b = tl.program_id(2)

    q_begin = tl.load(q_start_ptr + b)
    n_new = tl.load(q_start_ptr + b + 1) - q_begin  # n_b queries of this sequence
    q0 = tile * BLOCK_Q
    if q0 >= n_new:
        return
    seq_len = tl.load(seq_lens_ptr + b)
    prefix = seq_len - n_new  # committed positions, seen by every query

    # -- rows of the tile: (query, head) pairs of the GQA group --
    rows = tl.arange(0, BLOCK_M)
    qi = q0 + rows // GROUP  # [BLOCK_M] query index within the sequence
    head = kvh * GROUP + rows % GROUP  # [BLOCK_M] query head
    row_ok = (rows < BLOCK_Q * GROUP) & (qi < n_new)
    tok = (q_begin + qi).to(tl.int64)  # [BLOCK_M] row of q / out
    d = tl.arange(0, BLOCK_D)
    d_ok = d < HEAD_DIM
    q_off = tok[:, None] * stride_qt + head[:, None].to(tl.int64) * stride_qh + d[None, :]
    q = tl.load(q_ptr + q_off, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    if HAS_TREE:
        tree_bits = tl.load(tree_mask_ptr + tok, mask=row_ok, other=0)  # [BLOCK_M] int64
    else:
        tree_bits = tok  # unused

    # -- KV range: [0, dense_end) is seen by every row, [dense_end, kv_end) is masked --
    if HAS_TREE:
        kv_end = seq_len
        dense_end = prefix
    else:  # causal: query qi sees positions <= prefix + qi
        kv_end = prefix + tl.minimum(q0 + BLOCK_Q, n_new)
        dense_end = prefix + q0 + 1
    kv_end = tl.minimum(kv_end, max_positions)  # never read past the block table row
    # -- sliding window: a query at position p sees keys > p - window. The tile's rows sit
    # at positions [first_q, last_q] (a tree node at prefix + its depth, depth < n_new):
    # no row sees a key <= first_q - window, every row's window holds the keys > last_q - window
    if SLIDING:
        if HAS_TREE:
            q_pos = prefix + _popcount64(tree_bits) - 1  # [BLOCK_M] ancestors = depth + 1
            first_q = prefix
            last_q = prefix + n_new - 1
        else:
            q_pos = prefix + qi
            first_q = prefix + q0
            last_q = prefix + tl.minimum(q0 + BLOCK_Q, n_new) - 1
        win_lo = (tl.maximum(first_q - window + 1, 0) // BLOCK_N) * BLOCK_N
        win_all = tl.maximum(last_q - window + 1, 0)
    else:
        q_pos = qi  # unused
        win_lo = 0
        win_all = 0
    lo = win_lo
    hi = kv_end
    if SPLIT:  # this split's slice, a whole number of KV tiles (possibly empty)
        chunk = tl.cdiv(tl.cdiv(kv_end - win_lo, num_splits), BLOCK_N) * BLOCK_N
        lo = tl.minimum(win_lo + split * chunk, kv_end)
        hi = tl.minimum(lo + chunk, kv_end)
    # [lo, edge_stop): the window's edge, masked; [edge_stop, dense_stop): every row sees
    # every key, unmasked; [dense_stop, hi): the causal / tree mask
    edge_stop = lo
    if SLIDING:
        edge_stop = tl.minimum(tl.maximum(lo, tl.cdiv(win_all, BLOCK_N) * BLOCK_N), hi)
    dense_stop = tl.maximum(edge_stop, (tl.minimum(dense_end, hi) // BLOCK_N) * BLOCK_N)

    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    k_ptr = k_cache_ptr + kvh.to(tl.int64) * stride_kh
    v_ptr = v_cache_ptr + kvh.to(tl.int64) * stride_vh
    bt_row_ptr = block_table_ptr + b.to(tl.int64) * stride_bt
    if SLIDING:
        acc, l_i, m_i = _attend_range(
            acc, l_i, m_i, q, qi, q_pos, tree_bits, lo, edge_stop, prefix, n_new,
            k_ptr, v_ptr, bt_row_ptr, scale_log2, cap_log2, window,
            stride_kb, stride_ks, stride_vb, stride_vs, HEAD_DIM, BLOCK_D, BLOCK_N, PAGE_SIZE,
            True, HAS_TREE, True, SOFTCAP, UPCAST, DOT_PRECISION)
    acc, l_i, m_i = _attend_range(
        acc, l_i, m_i, q, qi, q_pos, tree_bits, edge_stop, dense_stop, prefix, n_new,
        k_ptr, v_ptr, bt_row_ptr, scale_log2, cap_log2, window,
        stride_kb, stride_ks, stride_vb, stride_vs, HEAD_DIM, BLOCK_D, BLOCK_N, PAGE_SIZE,
        False, HAS_TREE, False, SOFTCAP, UPCAST, DOT_PRECISION)
    acc, l_i, m_i = _attend_range(
        acc, l_i, m_i, q, qi, q_pos, tree_bits, dense_stop, hi, prefix, n_new,
        k_ptr, v_ptr, bt_row_ptr, scale_log2, cap_log2, window,
        stride_kb, stride_ks, stride_vb, stride_vs, HEAD_DIM, BLOCK_D, BLOCK_N, PAGE_SIZE,
        True, HAS_TREE, False, SOFTCAP, UPCAST, DOT_PRECISION)

    # -- epilogue: out = acc / l; a row that saw nothing (l == 0) gets zeros --
    seen = l_i > 0.0
    out = acc / tl.where(seen, l_i, 1.0)[:, None]
    o_off = tok[:, None] * stride_ot + head[:, None].to(tl.int64) * stride_oh + d[None, :]
    if SPLIT:
        o_off += split.to(tl.int64) * stride_os16 * 16
    tl.store(out_ptr + o_off, out, mask=row_ok[:, None] & d_ok[None, :])
    if SPLIT:  # log2-sum-exp2 of the split's scores, -inf when it saw nothing
        lse = tl.where(seen, m_i + tl.math.log2(tl.where(seen, l_i, 1.0)), float("-inf"))
        l_off = split.to(tl.int64) * stride_ls16 * 16 + tok * stride_lt + head
        tl.store(lse_ptr + l_off, lse, mask=row_ok)


@triton.jit(do_not_specialize=["num_splits", "stride_ps16", "stride_ls16"])
def _combine_splits_kernel(
    part_ptr, lse_ptr, out_ptr, num_splits,
    stride_ps16, stride_pt, stride_ph, stride_ls16, stride_lt, stride_ot, stride_oh,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr,
):
    """out[t, h] = sum_s w_s o_s / sum_s w_s with w_s = 2^(lse_s - max lse)."""
    t = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1).to(tl.int64)
    s = tl.arange(0, BLOCK_S).to(tl.int64)
    d = tl.arange(0, BLOCK_D)
    s_ok = s < num_splits
    lse = tl.load(lse_ptr + s * stride_ls16 * 16 + t * stride_lt + h, mask=s_ok,
                  other=float("-inf"))
    top = tl.max(lse, 0)
    w = tl.math.exp2(lse - tl.where(top == float("-inf"), 0.0, top))  # [BLOCK_S]
    den = tl.sum(w, 0)
    part = tl.load(part_ptr + s[:, None] * stride_ps16 * 16 + t * stride_pt + h * stride_ph
                   + d[None, :], mask=s_ok[:, None] & (d[None, :] < HEAD_DIM), other=0.0)
    out = tl.sum(w[:, None] * part, 0) / tl.where(den > 0.0, den, 1.0)
    tl.store(out_ptr + t * stride_ot + h * stride_oh + d, out, mask=d < HEAD_DIM)


# --------------------------------------------------------------------------- launch config
#
# Policy (host-side, from shapes only):
#
# * Query tiles keep every query row of a (sequence, KV head) together, up to 128 rows
#   (GQA group folded in): each extra query tile re-streams that KV head's K/V, so tiles
#   are never shrunk to make more programs.
# * The GPU is filled along the KV range instead (flash-decoding): when the grid has
#   fewer programs than two per SM, each program's KV range is split and
#   ``_combine_splits_kernel`` merges the partial results. The split count is the
#   smallest that reaches ~85 % of the best wave efficiency (as FlashAttention's
#   ``num_splits_heuristic``), each split streaming at least _MIN_SPLIT_TILES KV tiles.
# * Register budget (``_tiles``): D = 256 and sm_80 use narrower KV tiles; float32 (ieee
#   dots) uses 16x16 / 32x16 tiles and is refused on a GPU when a query's GQA group does
#   not fit them (more than 32 query heads per KV head, 16 for head_dim > 128). tests/test_gpu_compile.py compiles the variants for sm_80
#   and sm_90 and fails on any spill.
# * Split counts are runtime ints and the split flag a constexpr, so one model has a
#   handful of compiled variants (``_policy_tiles`` x tree/causal x split/not).

_MAX_SPLITS = 32  # partials the combine kernel merges (its BLOCK_S)
_MIN_SPLIT_TILES = 2  # KV tiles a split streams at least
_MAX_FP32_GROUP = {128: 32, 256: 16}  # float32: query heads per KV head a tile can hold


@dataclass(frozen=True)
class _Config:
    block_m: int  # tile rows = BLOCK_Q queries x GROUP heads (a power of two >= 16)
    block_n: int  # KV positions per step
    num_warps: int
    num_stages: int
    num_splits: int = 1  # KV splits (flash-decoding); > 1 adds a combine launch


@dataclass(frozen=True)
class _Gpu:
    sms: int
    arch: int  # compute capability major * 10 + minor: 80 (A100), 90 (H100/H200)


@functools.lru_cache(maxsize=None)
def _gpu_of(index: int) -> _Gpu:
    props = torch.cuda.get_device_properties(index)
    return _Gpu(props.multi_processor_count, props.major * 10 + props.minor)


def _gpu(device: torch.device) -> _Gpu | None:
    """SM count and architecture of a CUDA device (host-only, cached); None off CUDA."""
    if device.type != "cuda":
        return None
    return _gpu_of(device.index if device.index is not None else torch.cuda.current_device())


# test-only: a config every launch uses instead of the policy's (see ``_forcing``)
_FORCED: _Config | None = None


@contextlib.contextmanager
def _forcing(cfg: _Config):
    """Test-only override: every ``verify_attention`` call inside uses ``cfg``."""
    global _FORCED
    before, _FORCED = _FORCED, cfg
    try:
        yield
    finally:
        _FORCED = before


def _tiles(dtype: torch.dtype, head_dim: int, rows: int, group: int, arch: int) -> _Config:
    """Tile shape for ``rows`` query rows per (sequence, KV head) on a GPU of ``arch``.

    Register/shared-memory budget per variant, as compiled offline (ptxas 12.8, no spills):
    bf16 D=128 BM=128 w8: 182-214 regs sm_90 (98.5 KiB smem, 2 CTAs/SM); on sm_80
    mma.sync holds Q, S and acc in registers, so BM >= 64 takes 32-wide KV tiles (178-202
    regs; 64-wide spill 172 B). D=256: BM 128 on sm_90 (249 regs), 64 on sm_80 (255).
    fp32 ieee: BM <= 32 (16 for D=256) with 16-wide KV tiles (60-136 regs; 32x32 spills).
    """
    min_m = max(16, triton.next_power_of_2(group))  # a tile holds a query's whole group
    if dtype == torch.float32:
        block_m = max(min(32 if head_dim <= 128 else 16, triton.next_power_of_2(rows)), min_m)
        return _Config(block_m, 16, 8 if block_m >= 32 or head_dim > 128 else 4, 2)
    if head_dim > 128:
        cap = 128 if arch >= 90 else 64
        return _Config(max(min(cap, triton.next_power_of_2(rows)), min_m), 32, 8, 2)
    block_m = max(min(128, triton.next_power_of_2(rows)), min_m)
    if arch < 90 and head_dim > 64 and block_m >= 64:
        return _Config(block_m, 32, 8, 2)
    return _Config(block_m, 64, 8 if block_m >= 128 else 4, 3)


def _num_splits(programs: int, kv_len: int, block_n: int, slots: int) -> int:
    """KV splits for a grid of ``programs`` over ``kv_len`` positions on ``slots`` CTA slots.

    Efficiency of s splits = waves / ceil(waves), waves = programs * s / slots; the
    smallest s within 85 % of the best wins (fewer splits: less combine traffic).
    """
    if programs >= slots:
        return 1
    most = max(1, min(_MAX_SPLITS, kv_len // (_MIN_SPLIT_TILES * block_n)))
    eff = [0.0]
    for s in range(1, most + 1):
        waves = programs * s / slots
        eff.append(waves / math.ceil(waves))
    best = max(eff)
    return next(s for s in range(1, most + 1) if eff[s] >= 0.85 * best)


def _pick_config(num_seqs: int, h_kv: int, group: int, head_dim: int, max_query_len: int,
                 max_seq_len: int | None, dtype: torch.dtype, device: torch.device) -> _Config:
    """Tile sizes and KV splits from host-known sizes only (no device read)."""
    if _FORCED is not None:
        return _FORCED
    rows = max_query_len * group  # tile rows one (sequence, KV head) needs
    gpu = _gpu(device)
    if _interpreting() or gpu is None:  # few, large programs: the interpreter pays per program
        block_m = min(128, max(16, triton.next_power_of_2(rows), triton.next_power_of_2(group)))
        return _Config(block_m, 128, 1, 1)
    cfg = _tiles(dtype, head_dim, rows, group, gpu.arch)
    if max_seq_len is None:
        return cfg
    programs = num_seqs * h_kv * triton.cdiv(max_query_len, max(1, cfg.block_m // group))
    splits = _num_splits(programs, max_seq_len, cfg.block_n, 2 * gpu.sms)
    return dataclasses.replace(cfg, num_splits=splits)


def _policy_tiles(dtype: torch.dtype, head_dim: int, group: int, arch: int,
                  max_rows: int = 1 << 16) -> list[_Config]:
    """Every tile config ``_tiles`` can return for this model (num_splits 1)."""
    seen = []
    rows = 1
    while rows <= max_rows:
        cfg = _tiles(dtype, head_dim, rows, group, arch)
        if cfg not in seen:
            seen.append(cfg)
        rows *= 2
    return seen


def _check_gpu_support(dtype: torch.dtype, head_dim: int, group: int,
                       device: torch.device) -> None:
    """Refuse, before any work, what would compile to a spilling kernel on a GPU."""
    if _gpu(device) is None or _interpreting():
        return
    if dtype == torch.float32:
        most = _MAX_FP32_GROUP[128 if head_dim <= 128 else 256]
        require(group <= most,
                f"float32 attention on a GPU supports at most {most} query heads per KV head at "
                f"head_dim {head_dim} (got {group}): a tile holding a query's whole group would "
                "spill registers in fp32; load the model in bfloat16 or float16")


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

    Query i of sequence b sees cached positions < seq_lens[b] - n_b and the new
    positions that its mask allows; a query that sees nothing yields zeros. A tree mask
    holds 64 nodes, so ``tree_mask`` with ``max_query_len > 64`` raises ValueError
    (use None for longer chains). Device values are not checked (that would sync):
    seq_lens[b] >= n_b and block_table[b, :cdiv(seq_lens[b], block_size)] valid block ids
    are the caller's contract; positions past the block table row are never read.

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
    """
    _check_attention_args(q, k_cache, v_cache, block_table, seq_lens, q_start, tree_mask, scale)
    check_window_args(sliding_window, softcap)
    check_host_int("max_query_len", max_query_len)
    check_host_int("max_seq_len", max_seq_len)
    T, H, D = q.shape
    B = block_table.shape[0]
    if max_query_len is None:  # the one device read; pass max_query_len to avoid it
        max_query_len = int((q_start[1:] - q_start[:-1]).max()) if B > 0 else 0
    max_query_len = min(max_query_len, T)
    if tree_mask is not None and max_query_len > MAX_TREE_NODES:
        raise ValueError(f"tree_mask holds {MAX_TREE_NODES} nodes per sequence, but "
                         f"max_query_len is {max_query_len}; pass tree_mask=None for a chain")
    require(T == 0 or (B > 0 and max_query_len > 0),
            f"q has {T} rows but max_query_len is {max_query_len} with B = {B}")
    h_kv = k_cache.shape[2]
    _check_gpu_support(q.dtype, D, H // h_kv, q.device)
    if sliding_window is not None and max_seq_len is not None:
        # a program streams at most its rows' windows: split that range, not the sequence
        max_seq_len = min(max_seq_len, sliding_window + max_query_len)
    cfg = _pick_config(B, h_kv, H // h_kv, D, max_query_len, max_seq_len, q.dtype, q.device)
    return _launch_attention(q, k_cache, v_cache, block_table, seq_lens, q_start, tree_mask,
                             scale, max_query_len, cfg, sliding_window, softcap)


def _launch_attention(q, k_cache, v_cache, block_table, seq_lens, q_start, tree_mask, scale,
                      max_query_len: int, cfg: _Config, sliding_window: int | None = None,
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
    splits = min(cfg.num_splits, _MAX_SPLITS)
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
    upcast = _interpreting() and q.dtype == torch.bfloat16
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
            HEAD_DIM=D, BLOCK_D=triton.next_power_of_2(D), BLOCK_S=_MAX_SPLITS,
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

    A variant is a tile config (``_policy_tiles``) x split or not x tree or causal; the
    split count, batch size and block-table width are runtime ints, so one launch of one
    query over the scratch block compiles what every batch of that kind will run.
    """
    check_kv_cache(k_cache, v_cache)
    _, _, h_kv, d = k_cache.shape
    dtype, device = k_cache.dtype, k_cache.device
    require(num_heads % h_kv == 0, f"num_heads {num_heads} is not a multiple of {h_kv} KV heads")
    group = num_heads // h_kv
    _check_gpu_support(dtype, d, group, device)
    gpu = _gpu(device)
    if gpu is None or _interpreting():  # one config: the interpreter's
        tiles = [_pick_config(1, h_kv, group, d, 1, None, dtype, device)]
    else:
        tiles = _policy_tiles(dtype, d, group, gpu.arch)
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
