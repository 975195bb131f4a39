"""Row statistics over the vocabulary split in chunks, shared by the chain and draft
samplers: per-chunk partials (max, sum of exp, first argmax, candidate keys), a per-row
merge (m, kept mass z, top-k / top-p threshold thr, argmax), and the radix fallback
(``_radix``) for the rows the candidates cannot settle.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from ._radix import radix_select, radix_start
from ._sampling_core import (
    CAND,
    INT32_MIN,
    chunk_size,
    decode_key,
    key,
    kth_largest,
    radix_rounds_needed,
    row_inv_t,
    row_sequence,
)

_INT32_MIN = tl.constexpr(INT32_MIN)
_INT32_MAX = tl.constexpr(2147483647)


@triton.jit(do_not_specialize=["n_seq", "V", "n_chunks"])
def _partials_kernel(
    logits_ptr, stride_l, temp_ptr, top_k_ptr, top_p_ptr, cu_ptr, n_seq, V, n_chunks,
    part_m_ptr, part_z_ptr, part_arg_ptr, cand_ptr, tail_ptr,
    HAS_CU: tl.constexpr, FILTERED: tl.constexpr, CHUNK: tl.constexpr, CAND_K: tl.constexpr,
    BLOCK_B: tl.constexpr,
):
    """Program (row r, chunk c): one read of the chunk, x = logit * (1 / T).

    Writes m_c = max x, z_c = sum exp(x - m_c) (one exp per element), the first argmax
    (-1 when the chunk holds NaN or +inf) and, when FILTERED, the chunk's CAND_K largest
    keys with the count of keys equal to the smallest of them.
    """
    r = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1)
    seq = row_sequence(r, cu_ptr, n_seq, HAS_CU, BLOCK_B)
    temp = tl.load(temp_ptr + seq)
    inv_t = row_inv_t(temp)
    idx = c * CHUNK + tl.arange(0, CHUNK)
    mask = idx < V
    raw = tl.load(logits_ptr + r * stride_l + idx, mask=mask, other=float("-inf")).to(tl.float32)
    x = raw * inv_t
    bad = tl.max(((raw != raw) | (raw == float("inf"))).to(tl.int32)) > 0
    m = tl.max(x)
    arg = tl.min(tl.where(x == m, idx, _INT32_MAX))
    z = tl.sum(tl.exp(x - tl.where(m == float("-inf"), 0.0, m)))
    out = r * n_chunks + c
    tl.store(part_m_ptr + out, m)
    tl.store(part_z_ptr + out, z)
    tl.store(part_arg_ptr + out, tl.where(bad, -1, arg))
    # candidates only where the merge reads them: sampled rows with top-k or top-p
    filters = (temp > 0.0) & ((tl.load(top_k_ptr + seq) > 0) | (tl.load(top_p_ptr + seq) < 1.0))
    if FILTERED & filters:
        # -- candidates: the chunk's CAND_K largest keys (unordered), i.e. every key above
        # its CAND_K-th largest s_c and as many keys equal to s_c as fit; s_c and the
        # chunk's count of keys equal to s_c go to the tail --
        keys = tl.where(mask, key(x), _INT32_MIN)
        s_c = kth_largest(keys, mask, CAND_K)  # INT32_MIN: fewer than CAND_K tokens
        gt = mask & (keys > s_c)
        eq = mask & (keys == s_c)
        n_gt = tl.sum(gt.to(tl.int32))
        n_eq = tl.sum(eq.to(tl.int32))
        slot = tl.where(gt, tl.cumsum(gt.to(tl.int32), 0), n_gt + tl.cumsum(eq.to(tl.int32), 0)) - 1
        jj = tl.arange(0, CAND_K)
        tl.store(cand_ptr + out * CAND_K + jj, _INT32_MIN, mask=jj >= n_gt + n_eq)
        tl.store(cand_ptr + out * CAND_K + slot, keys, mask=(gt | eq) & (slot < CAND_K))
        tl.store(tail_ptr + out * 2, s_c)
        tl.store(tail_ptr + out * 2 + 1, n_eq)


@triton.jit
def _key_count(grid, smallest, n_eq, d):
    """Tokens of the row with key d, for d >= D: a chunk whose smallest candidate is d
    counted them all (n_eq); any other chunk listed every one of them."""
    listed = tl.sum((grid == d).to(tl.int32), 1)  # [BLOCK_C]
    return tl.sum(tl.where(smallest == d, n_eq, listed))


@triton.jit
def _candidate_thresholds(cand_ptr, tail_ptr, top_ptr, r, n_chunks, m, z, top_k, top_p, V,
                          CAND_K: tl.constexpr, BLOCK_C: tl.constexpr):
    """(thr, kept mass, radix mode) of a row from its chunks' candidate keys.

    Every key above D = max over chunks of the chunk's smallest candidate s_c is listed,
    and the tokens with a key d >= D are counted exactly (``_key_count``). So:
      top-k (1 <= k <= CAND_K): thr = the k-th largest listed key (>= D), kept mass =
          listed mass >= thr + the unlisted ties at thr;
      top-p: over the listed keys >= lim = max(thr, the CAND_K-th largest listed key)
          (at most CAND_K, compacted through ``top_ptr``), each key's strictly-greater
          mass is exact, so t* = the smallest such key with that mass < target. If even
          lim is kept and the mass >= lim is < target, the cut lies below the listed
          keys (only without top-k): radix mode 2.
    Mode 1 (radix top-k) for k > CAND_K; thr / mass are then provisional.
    """
    use_k = (top_k > 0) & (top_k < V)
    use_p = top_p < 1.0
    thr = tl.full((), _INT32_MIN, tl.int32)
    zk = z
    mode = tl.full((), 0, tl.int32)
    if use_k | use_p:
        cc = tl.arange(0, BLOCK_C)
        jj = tl.arange(0, CAND_K)
        live_c = cc < n_chunks
        base = r * n_chunks + cc  # [BLOCK_C]
        grid = tl.load(cand_ptr + base[:, None] * CAND_K + jj[None, :], mask=live_c[:, None],
                       other=_INT32_MIN)  # [BLOCK_C, CAND_K]
        smallest = tl.load(tail_ptr + base * 2, mask=live_c, other=_INT32_MIN)
        n_eq = tl.load(tail_ptr + base * 2 + 1, mask=live_c, other=0)
        flat = tl.reshape(grid, (BLOCK_C * CAND_K,))
        live = flat > _INT32_MIN
        w_all = tl.where(live, tl.exp(decode_key(flat) - m), 0.0)
        if use_k:
            if top_k <= CAND_K:
                thr = kth_largest(flat, live, top_k)
                listed = tl.sum((flat == thr).to(tl.int32))
                zk = (tl.sum(tl.where(flat >= thr, w_all, 0.0))
                      + (_key_count(grid, smallest, n_eq, thr) - listed).to(tl.float32)
                      * tl.exp(decode_key(thr) - m))
            else:
                mode = 1
        if use_p & (mode == 0):
            lim = tl.maximum(thr, kth_largest(flat, live, CAND_K))
            gt = live & (flat > lim)
            eq = live & (flat == lim)
            n_gt = tl.sum(gt.to(tl.int32))
            n_sel = tl.minimum(n_gt + tl.sum(eq.to(tl.int32)), CAND_K)
            slot = tl.where(gt, tl.cumsum(gt.to(tl.int32), 0), n_gt + tl.cumsum(eq.to(tl.int32), 0)) - 1
            tl.store(top_ptr + r * CAND_K + jj, _INT32_MIN, mask=jj >= n_sel)
            tl.store(top_ptr + r * CAND_K + slot, flat, mask=(gt | eq) & (slot < CAND_K))
            tl.debug_barrier()
            top = tl.load(top_ptr + r * CAND_K + jj)  # [CAND_K] the keys >= lim, unordered
            w = tl.where(top > _INT32_MIN, tl.exp(decode_key(top) - m), 0.0)
            above = tl.sum(tl.where(top[None, :] > top[:, None], w[None, :], 0.0), 1)  # [CAND_K]
            target = top_p * zk
            t = tl.min(tl.where((top > _INT32_MIN) & (above < target), top, _INT32_MAX))
            # unlisted tokens with key lim (none when lim is the sentinel: every key listed)
            lim_ties = tl.where(
                lim == _INT32_MIN, 0.0,
                (_key_count(grid, smallest, n_eq, lim) - tl.sum((top == lim).to(tl.int32))).to(tl.float32)
                * tl.exp(decode_key(lim) - m))
            if use_k | (tl.sum(w) + lim_ties >= target):
                thr = tl.maximum(thr, t)
                zk = tl.sum(tl.where(top >= thr, w, 0.0)) + tl.where(thr == lim, lim_ties, 0.0)
            else:
                mode = 2
    return thr, zk, mode



@triton.jit(do_not_specialize=["n_seq", "V", "n_chunks"])
def _row_finish_kernel(
    part_m_ptr, part_z_ptr, part_arg_ptr, cand_ptr, tail_ptr, top_ptr,
    temp_ptr, top_k_ptr, top_p_ptr, cu_ptr, n_seq, V, n_chunks,
    m_ptr, z_ptr, thr_ptr, arg_ptr, inv_t_ptr, rad_i_ptr, rad_f_ptr,
    HAS_CU: tl.constexpr, FILTERED: tl.constexpr, CAND_K: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_B: tl.constexpr,
):
    """Program r: merge row r's chunk partials into m, z (kept mass), thr, argmax (-1:
    bad row) and 1 / T; start the radix fallback where the candidates cannot settle."""
    r = tl.program_id(0).to(tl.int64)
    seq = row_sequence(r, cu_ptr, n_seq, HAS_CU, BLOCK_B)
    temp = tl.load(temp_ptr + seq)
    cc = tl.arange(0, BLOCK_C)
    live = cc < n_chunks
    pm = tl.load(part_m_ptr + r * n_chunks + cc, mask=live, other=float("-inf"))
    pz = tl.load(part_z_ptr + r * n_chunks + cc, mask=live, other=0.0)
    pa = tl.load(part_arg_ptr + r * n_chunks + cc, mask=live, other=0)
    m = tl.max(pm)
    # z = sum_c z_c exp(m_c - m); a chunk of -inf only has z_c exp(-inf) = 0
    z = tl.sum(tl.where(pm == float("-inf"), 0.0, pz * tl.exp(pm - m)))
    first = tl.min(tl.where(pm == m, cc, _INT32_MAX))  # ties: the first chunk, first index
    arg = tl.sum(tl.where(cc == first, pa, 0))
    bad = (tl.min(pa) < 0) | (m == float("-inf")) | (m != m)
    thr = tl.full((), _INT32_MIN, tl.int32)
    mode = tl.full((), 0, tl.int32)
    top_k = tl.load(top_k_ptr + seq)
    if FILTERED:
        if (temp > 0.0) & ~bad:
            thr, z, mode = _candidate_thresholds(cand_ptr, tail_ptr, top_ptr, r, n_chunks, m, z,
                                                 top_k, tl.load(top_p_ptr + seq), V, CAND_K, BLOCK_C)
        radix_start(rad_i_ptr, rad_f_ptr, r, mode, top_k, tl.load(top_p_ptr + seq) * z)
    tl.store(m_ptr + r, m)
    tl.store(z_ptr + r, z)
    tl.store(thr_ptr + r, thr)
    tl.store(arg_ptr + r, tl.where(bad, -1, arg))
    tl.store(inv_t_ptr + r, row_inv_t(temp))



class RowStats(NamedTuple):
    """Per-row statistics of a batch of logit rows (``row_statistics``).

    m, z, thr, inv_t: [R] as in DraftDist (z is the kept mass); arg: [R] int32 first
    argmax of x, -1 for a bad row (NaN, +inf, all -inf); part_m, part_z: [R, C] chunk
    partials (chunk mass of an unfiltered row = part_z * exp(part_m - m)); chunk: tokens
    per chunk; n_chunks: C.
    """

    m: torch.Tensor
    z: torch.Tensor
    thr: torch.Tensor
    arg: torch.Tensor
    inv_t: torch.Tensor
    part_m: torch.Tensor
    part_z: torch.Tensor
    chunk: int
    n_chunks: int



def _scratch(rows: int, n_chunks: int, cand: int, filtered: bool, dev):
    """Per-(row, chunk) partials [R, C] (m, z float32; argmax int32) and, when filtered,
    the candidates [R, C, cand] and tails [R, C, 2] int32, the top-p table [R, cand] int32
    and the radix state [R, 4] int32 / [R, 2] float32 (unfiltered: aliases, never touched)."""
    f32, i32 = torch.float32, torch.int32
    part_m = torch.empty((rows, n_chunks), dtype=f32, device=dev)
    part_z = torch.empty((rows, n_chunks), dtype=f32, device=dev)
    part_arg = torch.empty((rows, n_chunks), dtype=i32, device=dev)
    if not filtered:
        return part_m, part_z, part_arg, part_arg, part_arg, part_arg, part_arg, part_m
    return (part_m, part_z, part_arg,
            torch.empty((rows, n_chunks, cand), dtype=i32, device=dev),
            torch.empty((rows, n_chunks, 2), dtype=i32, device=dev),
            torch.empty((rows, cand), dtype=i32, device=dev),
            torch.empty((rows, 4), dtype=i32, device=dev),
            torch.empty((rows, 2), dtype=f32, device=dev))


def row_statistics(
    logits: torch.Tensor,
    temperature: torch.Tensor,
    top_k: torch.Tensor,
    top_p: torch.Tensor,
    cu: torch.Tensor | None = None,
    *,
    filtered: bool = True,
    radix_rounds: int | None = None,
    chunk: int | None = None,
) -> RowStats:
    """Statistics of every row's processed distribution, with the vocabulary split over
    (rows x chunks) programs; no [R, V] tensor is written.

    logits:      [R, V] float32/float16/bfloat16, stride(1) == 1
    temperature, top_k, top_p: [S] per-sequence parameters (float32, int32, float32)
    cu:          None (row r is sequence r, R == S) or [S + 1] int32 cumulative draft
                 counts: sequence b owns rows cu[b] + b .. cu[b + 1] + b
    filtered:    False promises no row uses top-k / top-p (no candidates are kept)
    radix_rounds: radix-select rounds to launch for rows the candidates cannot settle
                 (None: ``radix_rounds_needed``, a host read of top_k / top_p)

    Launches: partials (R x C programs), merge (R), and per radix round a histogram
    (R x C) and a step (R); the logits are read once, plus once per radix round.
    """
    rows, vocab = logits.shape
    n_seq, dev = temperature.shape[0], logits.device
    chunk = chunk or chunk_size(vocab)
    n_chunks = triton.cdiv(vocab, chunk)
    cand = min(CAND, chunk)
    part_m, part_z, part_arg, cand_keys, tail, top_scratch, rad_i, rad_f = _scratch(
        rows, n_chunks, cand, filtered, dev)
    m, z, inv_t = (torch.empty(rows, dtype=torch.float32, device=dev) for _ in range(3))
    thr, arg = (torch.empty(rows, dtype=torch.int32, device=dev) for _ in range(2))
    if rows == 0:
        return RowStats(m, z, thr, arg, inv_t, part_m, part_z, chunk, n_chunks)
    has_cu = cu is not None
    cu_t = cu if has_cu else arg
    block_b = triton.next_power_of_2(n_seq) if has_cu else 1
    block_c = triton.next_power_of_2(n_chunks)
    # the candidate search holds ~6 values per token: 16 warps keep a 4096 chunk at 8 tokens
    # a thread (no spills on sm_90 at the 128-register cap)
    warps = (16 if filtered else 8) if chunk >= 4096 else (8 if chunk >= 2048 else 4)
    _partials_kernel[(rows, n_chunks)](
        logits, logits.stride(0), temperature, top_k, top_p, cu_t, n_seq, vocab, n_chunks,
        part_m, part_z, part_arg, cand_keys, tail,
        HAS_CU=has_cu, FILTERED=filtered, CHUNK=chunk, CAND_K=cand, BLOCK_B=block_b,
        num_warps=warps,
    )
    _row_finish_kernel[(rows,)](
        part_m, part_z, part_arg, cand_keys, tail, top_scratch, temperature, top_k, top_p, cu_t, n_seq, vocab,
        n_chunks, m, z, thr, arg, inv_t, rad_i, rad_f,
        HAS_CU=has_cu, FILTERED=filtered, CAND_K=cand, BLOCK_C=block_c, BLOCK_B=block_b,
        num_warps=8 if filtered else 4,  # the candidate merge: [C, 64] keys and a [64, 64] table
    )
    if filtered:
        if radix_rounds is None:
            radix_rounds = radix_rounds_needed(top_k, top_p, vocab)
        radix_select(logits, chunk, m, z, thr, inv_t, rad_i, rad_f, top_p, cu, radix_rounds)
    return RowStats(m, z, thr, arg, inv_t, part_m, part_z, chunk, n_chunks)

