"""Pieces shared by the sampling kernels, the draft sampler and their PyTorch references.

The draft distribution q handed from a drafter to the samplers is never materialised as an
[n, V] float32 tensor on the GPU path: it is the draft's logits plus three numbers a row
(``DraftDist``). A row's processed distribution (temperature, top-k, top-p) is always

    x_v  = float32(logit_v) * inv_t                 inv_t = 1 / T, once per row in float32
    p(v) = [key(x_v) >= thr] * exp(x_v - m) / z     m = max_v x_v, z = kept mass

with ``key`` the monotone int32 key of a float32 (below), so top-k and top-p are a single
integer threshold per row and every path computes bit-identical x.
"""

from __future__ import annotations

import os
from typing import NamedTuple

import torch
import triton
import triton.language as tl

__all__ = ["DraftDist", "INT32_MIN", "key", "key_of", "inverse_temperature", "row_inv_t"]

INT32_MIN = -2147483648  # thr of a row with nothing filtered out
_INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"  # kernels run on the host
_INT32_MIN = tl.constexpr(INT32_MIN)


class DraftDist(NamedTuple):
    """The draft's processed distribution q of each draft row, never materialised.

    q(v) = [key(x_v) >= thr] * exp(x_v - m) / z,   x_v = float32(logit_v) * inv_t

    Row layout: chain, one row per draft token (ragged by ``cu_num_draft``); tree, the
    root and every node of each sequence. Greedy rows' q is never read by a sampler.
    """

    logits: torch.Tensor  # [n, V] draft logits, any float dtype (bf16/fp16/fp32), stride(1) == 1
    inv_t: torch.Tensor  # [n] float32: 1 / temperature of the row's request (1.0 for greedy rows)
    m: torch.Tensor  # [n] float32: max over kept v of x_v
    z: torch.Tensor  # [n] float32: sum over kept v of exp(x_v - m)
    thr: torch.Tensor  # [n] int32: v is kept iff key(x_v) >= thr (INT32_MIN: nothing filtered)

    def narrow(self, start: int, length: int) -> "DraftDist":
        """Rows ``start .. start + length`` of every field (views)."""
        return DraftDist(*(t.narrow(0, start, length) for t in self))

    def index_select(self, rows: torch.Tensor) -> "DraftDist":
        """The rows ``rows`` ([r] int64) of every field, in that order."""
        return DraftDist(*(t.index_select(0, rows) for t in self))

    @staticmethod
    def interleave(parts: "list[DraftDist]") -> "DraftDist":
        """k DraftDists of B rows each -> B * k rows, row b * k + j = row b of parts[j]."""
        return DraftDist(*(torch.stack(fields, dim=1).flatten(0, 1) for fields in zip(*parts)))

    @staticmethod
    def cat(parts: "list[DraftDist]") -> "DraftDist":
        """Rows of several DraftDists stacked in order (logits must share V and dtype)."""
        return DraftDist(*(torch.cat(fields, dim=0) for fields in zip(*parts)))


@triton.jit
def key(x):
    """Monotone int32 key of a float32: x < y <=> key(x) < key(y); -0.0 and +0.0 share 0.

    Non-negative floats order like their bits; for negative ones flipping the 31 magnitude
    bits reverses their order and keeps them below every non-negative key.
    """
    bits = x.to(tl.int32, bitcast=True)
    k = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)
    return tl.where(x == 0.0, 0, k)


_key = key  # the name the kernels used before this module existed


def key_of(x: torch.Tensor) -> torch.Tensor:
    """Torch twin of ``key``: [...] float32 -> [...] int32, same order as the floats."""
    bits = x.float().contiguous().view(torch.int32)
    k = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits)
    return torch.where(x == 0.0, torch.zeros_like(k), k)


def inverse_temperature(temperature: torch.Tensor) -> torch.Tensor:
    """[n] float32 temperature -> [n] float32 1 / T (1.0 where T <= 0, greedy rows).

    The one place 1 / T is formed on the torch side; the kernels use ``row_inv_t``
    (a correctly rounded division, so both give the same bits).
    """
    t = temperature.float()
    return torch.where(t > 0, 1.0 / torch.where(t > 0, t, torch.ones_like(t)), torch.ones_like(t))


@triton.jit
def row_inv_t(temp):
    """1 / T in float32, correctly rounded (matches ``inverse_temperature``); 1 if T <= 0."""
    safe = tl.where(temp > 0.0, temp, 1.0)
    return tl.where(temp > 0.0, tl.math.div_rn(1.0, safe), 1.0)


# ---------------------------------------------------------------------------------------
# Row statistics over the vocabulary split in chunks: partials, merge, radix fallback.
# ---------------------------------------------------------------------------------------

_INT32_MAX = tl.constexpr(2147483647)
CAND = 64  # candidate keys kept per chunk: top-k for k <= CAND and most top-p cuts need no re-read
# digits of the radix-select fallback: 4 rounds of 8 bits settle a 32-bit key
_RADIX_BITS = tl.constexpr(8)
_RADIX_BINS = tl.constexpr(256)  # 1 << _RADIX_BITS
_RADIX_TOP = tl.constexpr(24)  # shift of the first (most significant) digit


def chunk_size(vocab: int) -> int:
    """Vocabulary chunk of one program: about 32 chunks a row (so a lone row fills >= 32
    programs), a power of two in [1024, 4096] (small vocabularies: fewer, larger chunks)."""
    return max(1024, min(4096, triton.next_power_of_2(triton.cdiv(vocab, 32))))


@triton.jit
def decode_key(k):
    """Inverse of ``key``: the float32 whose key is ``k`` (key 0 gives +0.0)."""
    bits = tl.where(k < 0, k ^ 0x7FFFFFFF, k)
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def row_sequence(r, cu_ptr, n_seq, HAS_CU: tl.constexpr, BLOCK_B: tl.constexpr):
    """Sequence owning row ``r`` of a ragged layout where sequence b owns rows
    cu[b] + b .. cu[b + 1] + b (n_b + 1 rows); without cu, row r is sequence r."""
    if HAS_CU:
        bb = tl.arange(0, BLOCK_B)
        live = bb < n_seq
        first_after = tl.load(cu_ptr + 1 + bb, mask=live, other=0).to(tl.int64) + bb + 1
        seq = tl.sum((live & (first_after <= r)).to(tl.int64))
        return tl.minimum(seq, n_seq - 1)
    else:
        return r


@triton.jit
def p_weights(row_ptr, idx, mask, inv_t, m, z, thr):
    """p over one block of a row: [key(x) >= thr] exp(x - m) / z with x = logit * inv_t."""
    x = tl.load(row_ptr + idx, mask=mask, other=float("-inf")).to(tl.float32) * inv_t
    return tl.where(mask & (key(x) >= thr), tl.exp(x - m), 0.0) / z


@triton.jit
def p_at(row_ptr, v, live, inv_t, m, z, thr):
    """p of the single token ``v`` (0 where ``live`` is false)."""
    x = tl.load(row_ptr + v, mask=live, other=float("-inf")).to(tl.float32) * inv_t
    return tl.where(live & (key(x) >= thr), tl.exp(x - m), 0.0) / z


@triton.jit
def cdf_block(w, idx, cum, target, token, last):
    """One block of an inverse-CDF scan over weights ``w`` at vocabulary ids ``idx``.

    Returns (token, last, cum): the first id whose running sum exceeds ``target`` (kept
    at -1 until found), the last id with positive weight per lane (the fallback when
    rounding hides the crossing), and the running sum after this block.
    """
    last = tl.where(w > 0.0, idx, last)
    block_sum = tl.sum(w)
    if cum + block_sum > target:
        # the crossing is in this block; a zero weight never wins, even where the
        # scan's rounding steps up (if rounding hides the crossing, go on)
        hit = (cum + tl.cumsum(w, 0) > target) & (w > 0.0)
        first = tl.min(tl.where(hit, idx, _INT32_MAX))
        token = tl.where(first == _INT32_MAX, -1, first.to(tl.int64))
    return token, last, cum + block_sum


@triton.jit
def pick_chunk(w, cc, target):
    """Two-level inverse CDF, first level: the chunk whose running sum of chunk masses
    ``w`` ([BLOCK_C]) first exceeds ``target`` (the last positive chunk when rounding
    hides it), and the mass before it. Returns (chunk, mass before)."""
    cum = tl.cumsum(w, 0)
    chunk = tl.min(tl.where((cum > target) & (w > 0.0), cc, _INT32_MAX))
    chunk = tl.where(chunk == _INT32_MAX, tl.max(tl.where(w > 0.0, cc, -1)), chunk)
    before = tl.sum(tl.where(cc == chunk, cum - w, 0.0))
    return chunk, before


@triton.jit
def kth_largest(keys, live, k):
    """The k-th largest (1-based, ties counted) of the ``live`` int32 keys of a 1-D block,
    INT32_MIN when fewer than k are live.

    Radix select in registers: four histograms of 8-bit digits of the key in unsigned
    order, each fixing one digit (the bucket holding the k-th largest among the keys
    that match the digits found so far). No sort, no bisection.
    """
    u = (keys ^ _INT32_MIN).to(tl.uint32, bitcast=True)  # unsigned order = key order
    bins = tl.arange(0, 256)
    prefix = tl.zeros((), tl.uint32)
    rem = k
    for rnd in tl.static_range(4):
        if rnd == 0:
            match = live
        else:
            match = live & ((u >> (32 - 8 * rnd)) == (prefix >> (32 - 8 * rnd)))
        hist = tl.histogram(((u >> (24 - 8 * rnd)) & 255).to(tl.int32), 256, mask=match)
        at_least = tl.cumsum(hist, 0, reverse=True)  # keys in this bucket or above
        digit = tl.max(tl.where(at_least >= rem, bins, 0))
        rem -= tl.sum(tl.where(bins == digit, at_least - hist, 0))
        prefix = prefix | (digit.to(tl.uint32) << (24 - 8 * rnd))
    kth = prefix.to(tl.int32, bitcast=True) ^ _INT32_MIN
    return tl.where(tl.sum(live.to(tl.int32)) >= k, kth, _INT32_MIN)


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


@triton.jit
def radix_start(rad_i_ptr, rad_f_ptr, r, mode, top_k, target):
    """Radix-select state of row r: rad_i [R, 4] int32 (mode, prefix, shift, count left),
    rad_f [R, 2] float32 (mass above the prefix, top-p target).

    mode 0: settled (nothing to do); 1: top-k for k = ``top_k`` (then top-p over the
    survivors when the row's top_p < 1); 2: top-p alone, ``target`` = top_p * Z.
    """
    tl.store(rad_i_ptr + r * 4, mode)
    tl.store(rad_i_ptr + r * 4 + 1, 0)
    tl.store(rad_i_ptr + r * 4 + 2, _RADIX_TOP)
    tl.store(rad_i_ptr + r * 4 + 3, top_k)
    tl.store(rad_f_ptr + r * 2, 0.0)
    tl.store(rad_f_ptr + r * 2 + 1, target)


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


@triton.jit(do_not_specialize=["V", "n_chunks"])
def _radix_hist_kernel(
    logits_ptr, stride_l, V, n_chunks, m_ptr, thr_ptr, inv_t_ptr, rad_i_ptr, hist_n_ptr, hist_w_ptr,
    CHUNK: tl.constexpr, SUB: tl.constexpr,
):
    """Program (row r, chunk c) of a radix round: histogram (count, mass exp(x - m)) of
    the next 8-bit digit of the ordered key over the chunk's tokens that match the
    digits found so far (mode 1, top-k: every token; mode 2, top-p: kept tokens)."""
    r = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1)
    mode = tl.load(rad_i_ptr + r * 4)
    if mode != 0:
        prefix = tl.load(rad_i_ptr + r * 4 + 1).to(tl.uint32, bitcast=True)
        shift = tl.load(rad_i_ptr + r * 4 + 2)
        m = tl.load(m_ptr + r)
        thr = tl.load(thr_ptr + r)
        inv_t = tl.load(inv_t_ptr + r)
        bins = tl.arange(0, _RADIX_BINS)
        hn = tl.zeros((_RADIX_BINS,), tl.int32)
        hw = tl.zeros((_RADIX_BINS,), tl.float32)
        hi = tl.minimum(shift + _RADIX_BITS, 31)
        for s0 in range(0, tl.minimum(CHUNK, V - c * CHUNK), SUB):  # the chunk's tokens only
            idx = c * CHUNK + s0 + tl.arange(0, SUB)
            mask = idx < V
            x = tl.load(logits_ptr + r * stride_l + idx, mask=mask, other=float("-inf")).to(tl.float32) * inv_t
            k = key(x)
            u = (k ^ _INT32_MIN).to(tl.uint32, bitcast=True)  # unsigned order = key order
            match = (shift + _RADIX_BITS >= 32) | ((u >> hi) == (prefix >> hi))
            elig = mask & match & ((mode == 1) | ((k >= thr) & (x > float("-inf"))))
            digit = ((u >> shift) & (_RADIX_BINS - 1)).to(tl.int32)
            hit = (digit[:, None] == bins[None, :]) & elig[:, None]  # [SUB, 256]
            hn += tl.sum(hit.to(tl.int32), 0)
            hw += tl.sum(tl.where(hit, tl.exp(x - m)[:, None], 0.0), 0)
        out = (r * n_chunks + c) * _RADIX_BINS + bins
        tl.store(hist_n_ptr + out, hn)
        tl.store(hist_w_ptr + out, hw)


@triton.jit(do_not_specialize=["n_chunks", "n_seq"])
def _radix_step_kernel(
    hist_n_ptr, hist_w_ptr, n_chunks, rad_i_ptr, rad_f_ptr, thr_ptr, z_ptr,
    top_p_ptr, cu_ptr, n_seq,
    HAS_CU: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_B: tl.constexpr,
):
    """Program r: merge the round's chunk histograms (fixed order) and fix one digit.

    mode 1 (top-k): the digit whose bucket holds the k-th largest key; mode 2 (top-p):
    the lowest non-empty digit whose strictly-greater mass is < target. After the last
    digit the key is exact: thr, and the kept mass (mass above + the key's own bucket).
    """
    r = tl.program_id(0).to(tl.int64)
    mode = tl.load(rad_i_ptr + r * 4)
    if mode != 0:
        prefix = tl.load(rad_i_ptr + r * 4 + 1)
        shift = tl.load(rad_i_ptr + r * 4 + 2)
        k_rem = tl.load(rad_i_ptr + r * 4 + 3)
        above = tl.load(rad_f_ptr + r * 2)
        target = tl.load(rad_f_ptr + r * 2 + 1)
        bins = tl.arange(0, _RADIX_BINS)
        cc = tl.arange(0, BLOCK_C)
        at = (r * n_chunks + cc[:, None]) * _RADIX_BINS + bins[None, :]
        live = cc[:, None] < n_chunks
        hn = tl.sum(tl.load(hist_n_ptr + at, mask=live, other=0), 0)  # [256]
        hw = tl.sum(tl.load(hist_w_ptr + at, mask=live, other=0.0), 0)
        gt_n = tl.cumsum(hn, 0, reverse=True) - hn  # tokens in higher buckets
        gt_w = tl.cumsum(hw, 0, reverse=True) - hw
        if mode == 1:
            digit = tl.max(tl.where(gt_n + hn >= k_rem, bins, -1))
            k_rem -= tl.sum(tl.where(bins == digit, gt_n, 0))
        else:
            digit = tl.min(tl.where((hn > 0) & (above + gt_w < target), bins, _RADIX_BINS))
            digit = tl.where(digit == _RADIX_BINS, tl.max(tl.where(hn > 0, bins, -1)), digit)
        digit = tl.maximum(digit, 0)
        above += tl.sum(tl.where(bins == digit, gt_w, 0.0))
        prefix = prefix | (digit << shift)
        if shift == 0:
            found = prefix ^ _INT32_MIN  # back from unsigned order to the signed key
            kept = above + tl.sum(tl.where(bins == digit, hw, 0.0))
            if mode == 1:
                tl.store(thr_ptr + r, found)
                seq = row_sequence(r, cu_ptr, n_seq, HAS_CU, BLOCK_B)
                top_p = tl.load(top_p_ptr + seq)
                mode = tl.where(top_p < 1.0, 2, 0)
                prefix = 0
                shift = _RADIX_TOP
                above = 0.0
                target = top_p * kept
            else:
                tl.store(thr_ptr + r, tl.maximum(tl.load(thr_ptr + r), found))
                mode = 0
            tl.store(z_ptr + r, kept)
        else:
            shift -= _RADIX_BITS
        tl.store(rad_i_ptr + r * 4, mode)
        tl.store(rad_i_ptr + r * 4 + 1, prefix)
        tl.store(rad_i_ptr + r * 4 + 2, shift)
        tl.store(rad_i_ptr + r * 4 + 3, k_rem)
        tl.store(rad_f_ptr + r * 2, above)
        tl.store(rad_f_ptr + r * 2 + 1, target)


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


def radix_rounds_needed(top_k, top_p, vocab: int | None = None, cand: int = CAND) -> int:
    """Radix rounds a batch may need: 0 when every row's thresholds come from the
    candidates for sure, 4 for top-p cuts, 8 for top-k > cand (the candidates kept per
    chunk) followed by top-p.

    top_k, top_p: [B] tensors (read on the host; free on CPU tensors) or host sequences;
    vocab: None for "any vocabulary" (a top_k >= V then counts as a real top-k: an upper bound)
    """
    k = torch.as_tensor(top_k).cpu()
    p = torch.as_tensor(top_p).cpu()
    no_k = k <= 0
    big_k = k > cand
    if vocab is not None:
        no_k |= k >= vocab
        big_k &= k < vocab
    if bool(big_k.any()):
        return 8 if bool((big_k & (p < 1)).any()) else 4
    return 4 if bool(((p < 1) & no_k).any()) else 0


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
    (R x C) and a step (R). Reads: the logits once, plus once per radix round for the
    rows that need it.
    """
    rows, vocab = logits.shape
    n_seq = temperature.shape[0]
    dev = logits.device
    chunk = chunk or chunk_size(vocab)
    n_chunks = triton.cdiv(vocab, chunk)
    cand = min(CAND, chunk)
    f32, i32 = torch.float32, torch.int32
    part_m = torch.empty((rows, n_chunks), dtype=f32, device=dev)
    part_z = torch.empty((rows, n_chunks), dtype=f32, device=dev)
    part_arg = torch.empty((rows, n_chunks), dtype=i32, device=dev)
    if filtered:
        cand_keys = torch.empty((rows, n_chunks, cand), dtype=i32, device=dev)
        tail = torch.empty((rows, n_chunks, 2), dtype=i32, device=dev)
        top_scratch = torch.empty((rows, cand), dtype=i32, device=dev)
        rad_i = torch.empty((rows, 4), dtype=i32, device=dev)
        rad_f = torch.empty((rows, 2), dtype=f32, device=dev)
    else:
        cand_keys = tail = top_scratch = rad_i = part_arg  # never touched
        rad_f = part_m
    m = torch.empty(rows, dtype=f32, device=dev)
    z = torch.empty(rows, dtype=f32, device=dev)
    thr = torch.empty(rows, dtype=i32, device=dev)
    arg = torch.empty(rows, dtype=i32, device=dev)
    inv_t = torch.empty(rows, dtype=f32, device=dev)
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


def radix_select(
    logits: torch.Tensor,
    chunk: int,
    m: torch.Tensor,
    z: torch.Tensor,
    thr: torch.Tensor,
    inv_t: torch.Tensor,
    rad_i: torch.Tensor,
    rad_f: torch.Tensor,
    top_p: torch.Tensor,
    cu: torch.Tensor | None,
    rounds: int,
) -> None:
    """Exact top-k / top-p thresholds of the rows whose radix state (``radix_start``) is
    not settled, in place: thr [R] int32 and z [R] float32 (the kept mass).

    logits [R, V] (stride(1) == 1), split in chunks of ``chunk`` tokens; m, inv_t [R]
    float32 of each row; rad_i [R, 4] int32, rad_f [R, 2] float32 the radix state; top_p
    [S] float32 per sequence, cu as in ``row_statistics`` (None: row r is sequence r).

    Up to ``rounds`` rounds (host hint, no sync: 4 settle a top-k or a top-p key, 8 a
    top-k followed by top-p), each a histogram launch (R x C programs, one read of the
    unsettled rows; settled rows return at once) and a step launch (R): the same
    thresholds and tie rules as ``reference.sampling_probs``.
    """
    rows, vocab = logits.shape
    if rows == 0 or not rounds:
        return
    n_chunks = triton.cdiv(vocab, chunk)
    has_cu = cu is not None
    n_seq = top_p.shape[0]
    cu_t = cu if has_cu else rad_i  # never read without cu
    block_b = triton.next_power_of_2(n_seq) if has_cu else 1
    block_c = triton.next_power_of_2(n_chunks)
    bins = _RADIX_BINS.value
    hist_n = torch.empty((rows, n_chunks, bins), dtype=torch.int32, device=logits.device)
    hist_w = torch.empty((rows, n_chunks, bins), dtype=torch.float32, device=logits.device)
    for _ in range(rounds):
        if _INTERPRETED and not bool(rad_i[:, 0].any()):
            break  # free to check under the interpreter: every row is settled
        _radix_hist_kernel[(rows, n_chunks)](
            logits, logits.stride(0), vocab, n_chunks, m, thr, inv_t, rad_i, hist_n, hist_w,
            CHUNK=chunk, SUB=min(32, chunk), num_warps=4,
        )
        _radix_step_kernel[(rows,)](
            hist_n, hist_w, n_chunks, rad_i, rad_f, thr, z, top_p, cu_t, n_seq,
            HAS_CU=has_cu, BLOCK_C=block_c, BLOCK_B=block_b, num_warps=4,
        )
