"""Radix-select fallback of the row statistics: exact top-k / top-p thresholds of the rows
the per-chunk candidates cannot settle (top_k > CAND, or a top-p nucleus wider than the
candidates), by 8-bit digit histograms of the monotone key, over (rows x chunks) programs.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from ._sampling_core import INT32_MIN, key, row_sequence

_INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"  # kernels run on the host
_INT32_MIN = tl.constexpr(INT32_MIN)
# digits of the radix-select fallback: 4 rounds of 8 bits settle a 32-bit key
_RADIX_BITS = tl.constexpr(8)
_RADIX_BINS = tl.constexpr(256)  # 1 << _RADIX_BITS
_RADIX_TOP = tl.constexpr(24)  # shift of the first (most significant) digit


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
