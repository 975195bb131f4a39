"""Fused speculative rejection sampling (chain drafts) in one Triton launch.

One program per sequence walks its n_b + 1 target rows in order and streams each row's
vocabulary in blocks of BLOCK_V; no probability tensor is ever written to memory. Per row:

1. stats pass: m = max(logit / T), Z = sum exp(logit / T - m) (online), the first argmax of
   the raw logits (greedy), and the non-finite check;
2. top-k / top-p thresholds (only when enabled): a sorting-free bisection on the value of
   the threshold. Values are compared through a monotone int32 key of the float
   (``_key``), so the search is exact; each pass also snaps the bracket to the nearest
   keys present in the row, which ends the search after O(log V) passes on real data
   (at most 32). Both thresholds follow ``reference.sampling_probs``' tie-keeping rules:
       top-k keeps key >= the k-th largest key;
       top-p keeps key >= t*, the smallest key whose strictly-greater mass is < top_p;
   so a row's distribution is p(v) = [key(x_v) >= thr] exp(x_v - m) / Z_kept;
3. the ratio test of draft x_i: accept iff u_i * q_i(x_i) < p_i(x_i) (one scalar load);
4. on the first rejection, or after the last row, one sample of the residual
   max(p - q, 0) (point mass: p without x_i), or of p, by inverse CDF: a pass for the
   totals, then a pass that stops at the block holding the token.

Inverse CDF rather than an exponential race (Gumbel-max): it needs one Philox uniform per
sample instead of one per vocabulary entry (ten rounds of 32-bit multiplies for each of
128k entries would cost more than reading the row), and it is the rule the torch
reference and the drafters use, so the same uniform gives the same token except where it
falls within rounding of a cumulative-sum boundary. The search pass touches only the
prefix up to the sampled token.

Random numbers (``philox.py``), all drawn in one ``tl.rand`` call per sequence and
bit-identical to ``philox_uniform`` in the reference: acceptance uniform of draft i =
tl.rand(seed, (offset << 32) | (0 << 24) | i); uniform of the sample from row i =
tl.rand(seed, (offset << 32) | (1 << 24) | i).

Outside the kernel: only the argument checks and, with check_finite=True, the host copies
that turn the kernel's per-sequence flags (n_accepted = -1) into a ValueError.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .philox import SAMPLER_ACCEPT_STREAM, SAMPLER_SAMPLE_STREAM
from .reference import _check_draft_layout, _check_rejection_args, _raise_if_flagged

__all__ = ["rejection_sample"]

_INT32_MIN = tl.constexpr(-2147483648)
_INT32_MAX = tl.constexpr(2147483647)
_ACCEPT_STREAM = tl.constexpr(SAMPLER_ACCEPT_STREAM << 24)  # stream field of the counter
_SAMPLE_STREAM = tl.constexpr(SAMPLER_SAMPLE_STREAM << 24)


@triton.jit
def _key(x):
    """Monotone int32 key of a float32: x < y <=> key(x) < key(y); -0.0 and +0.0 share 0.

    Non-negative floats order like their bits; for negative ones flipping the 31 magnitude
    bits reverses their order and keeps them below every non-negative key.
    """
    bits = x.to(tl.int32, bitcast=True)
    key = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)
    return tl.where(x == 0.0, 0, key)


@triton.jit
def _load_scaled(row_ptr, idx, mask, t):
    # x = logit / T in fp32; masked lanes read -inf (zero probability, never a key of data)
    raw = tl.load(row_ptr + idx, mask=mask, other=float("-inf")).to(tl.float32)
    return raw, raw / t


@triton.jit
def _row_stats(row_ptr, V, t, BLOCK_V: tl.constexpr):
    """One pass over a row: (m, Z, first argmax of the raw logits, row is bad).

    Every lane keeps its own running max / sum / argmax; they are reduced once at the end.
    """
    offs = tl.arange(0, BLOCK_V)
    m_vec = tl.full((BLOCK_V,), float("-inf"), tl.float32)
    z_vec = tl.zeros((BLOCK_V,), tl.float32)
    best_vec = tl.full((BLOCK_V,), float("-inf"), tl.float32)
    arg_vec = tl.zeros((BLOCK_V,), tl.int32)
    bad_vec = tl.zeros((BLOCK_V,), tl.int1)
    for v0 in range(0, V, BLOCK_V):
        idx = v0 + offs
        raw, x = _load_scaled(row_ptr, idx, idx < V, t)
        bad_vec = bad_vec | (raw != raw) | (raw == float("inf"))
        # -- first argmax per lane: a strictly greater logit moves it --
        arg_vec = tl.where(raw > best_vec, idx, arg_vec)
        best_vec = tl.maximum(best_vec, raw)
        # -- online softmax per lane: z <- z * exp(m_old - m_new) + exp(x - m_new); a lane
        # that has seen only -inf shifts by 0 instead (-inf - -inf would be NaN) --
        m_vec_new = tl.maximum(m_vec, x)
        shift = tl.where(m_vec_new == float("-inf"), 0.0, m_vec_new)
        z_vec = z_vec * tl.exp(m_vec - shift) + tl.exp(x - shift)
        m_vec = m_vec_new
    m = tl.max(m_vec)
    z = tl.sum(z_vec * tl.exp(m_vec - tl.where(m == float("-inf"), 0.0, m)))
    best = tl.max(best_vec)
    arg = tl.min(tl.where(best_vec == best, arg_vec, _INT32_MAX)).to(tl.int64)  # ties: first
    bad = (tl.max(bad_vec.to(tl.int32)) > 0) | (best == float("-inf"))  # NaN/+inf, all -inf
    return m, z, arg, bad


@triton.jit
def _split_pass(row_ptr, V, t, m, floor, mid, BLOCK_V: tl.constexpr):
    """Over the tokens with key >= floor: (#{key >= mid}, mass{key >= mid}, min key >= mid,
    max key < mid), the mass being sum exp(x - m)."""
    offs = tl.arange(0, BLOCK_V)
    count = tl.zeros((BLOCK_V,), tl.int32)
    mass = tl.zeros((BLOCK_V,), tl.float32)
    above = tl.full((BLOCK_V,), _INT32_MAX, tl.int32)
    below = tl.full((BLOCK_V,), _INT32_MIN, tl.int32)
    for v0 in range(0, V, BLOCK_V):
        idx = v0 + offs
        mask = idx < V
        _, x = _load_scaled(row_ptr, idx, mask, t)
        key = _key(x)
        live = mask & (key >= floor)
        ge = live & (key >= mid)
        count += ge.to(tl.int32)
        mass += tl.where(ge, tl.exp(x - m), 0.0)
        above = tl.minimum(above, tl.where(ge, key, _INT32_MAX))
        below = tl.maximum(below, tl.where(live & (key < mid), key, _INT32_MIN))
    return tl.sum(count), tl.sum(mass), tl.min(above), tl.max(below)


@triton.jit
def _thresholds(row_ptr, V, t, m, z, top_k, top_p, BLOCK_V: tl.constexpr):
    """(thr, Z_kept): the row keeps the tokens with key(x) >= thr, of total mass Z_kept."""
    thr = tl.full((), _INT32_MIN, tl.int32)
    hi_key = _key(m)
    if (top_k > 0) & (top_k < V):
        # largest key t with #{key >= t} >= k (the k-th largest, ties kept); lo and hi
        # snap to keys present in the row, mid in (lo, hi]
        lo = thr
        hi = hi_key
        while lo < hi:
            mid = ((lo.to(tl.int64) + hi + 1) >> 1).to(tl.int32)
            count, _, above, below = _split_pass(row_ptr, V, t, m, _INT32_MIN, mid, BLOCK_V)
            lo = tl.where(count >= top_k, above, lo)
            hi = tl.where(count >= top_k, hi, below)
        thr = lo
        _, z, _, _ = _split_pass(row_ptr, V, t, m, _INT32_MIN, thr, BLOCK_V)
    if top_p < 1.0:
        # smallest present key d (among top-k survivors) with mass{key > d} < top_p * Z;
        # for mid in (lo, hi] the largest key below mid has mass{key > it} = mass{key >= mid}
        target = top_p * z
        lo = thr
        hi = hi_key
        while lo < hi:
            mid = ((lo.to(tl.int64) + hi + 1) >> 1).to(tl.int32)
            _, mass, above, below = _split_pass(row_ptr, V, t, m, thr, mid, BLOCK_V)
            lo = tl.where(mass < target, lo, above)
            hi = tl.where(mass < target, below, hi)
        thr = lo
        _, z, _, _ = _split_pass(row_ptr, V, t, m, thr, thr, BLOCK_V)
    return thr, z


@triton.jit
def _weights(row_ptr, q_row_ptr, idx, mask, t, m, z, thr, x_draft, residual,
             HAS_Q: tl.constexpr):
    """(p, residual) of one block: p = [key >= thr] exp(x - m) / Z, residual = max(p - q, 0)
    (point-mass drafter: p with the draft token removed); q is read only when needed."""
    _, x = _load_scaled(row_ptr, idx, mask, t)
    p = tl.where(mask & (_key(x) >= thr), tl.exp(x - m), 0.0) / z
    if HAS_Q:
        q = tl.load(q_row_ptr + idx, mask=mask & residual, other=0.0)
        r = tl.maximum(p - q, 0.0)
    else:
        r = tl.where(idx == x_draft, 0.0, p)
    return p, r


@triton.jit
def _cdf_block(w, idx, cum, target, token, last):
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
def _sample(row_ptr, q_row_ptr, V, t, m, z, thr, x_draft, residual, u,
            HAS_Q: tl.constexpr, BLOCK_V: tl.constexpr):
    """Inverse-CDF sample of the residual (or of p when residual is false or sums to 0):
    the first token whose running sum exceeds u * total and whose weight is positive."""
    offs = tl.arange(0, BLOCK_V)
    # -- pass 1: totals of the residual and of p --
    total_r = tl.zeros((BLOCK_V,), tl.float32)
    total_p = tl.zeros((BLOCK_V,), tl.float32)
    for v0 in range(0, V, BLOCK_V):
        idx = v0 + offs
        p, r = _weights(row_ptr, q_row_ptr, idx, idx < V, t, m, z, thr, x_draft, residual, HAS_Q)
        total_r += r
        total_p += p
    use_r = residual & (tl.sum(total_r) > 0.0)
    target = u * tl.where(use_r, tl.sum(total_r), tl.sum(total_p))
    # -- pass 2: scan blocks until the running sum crosses the target --
    token = tl.full((), -1, tl.int64)
    last = tl.full((BLOCK_V,), -1, tl.int32)  # last positive token per lane: rounding fallback
    cum = tl.full((), 0.0, tl.float32)
    v0 = tl.full((), 0, tl.int32)
    while (v0 < V) & (token < 0):
        idx = v0 + offs
        p, r = _weights(row_ptr, q_row_ptr, idx, idx < V, t, m, z, thr, x_draft, residual, HAS_Q)
        token, last, cum = _cdf_block(tl.where(use_r, r, p), idx, cum, target, token, last)
        v0 += BLOCK_V
    return tl.where(token < 0, tl.max(last).to(tl.int64), token)


@triton.jit
def _sequence(b, cu_ptr, max_n, total, temp_ptr, top_k_ptr, top_p_ptr):
    """Sequence ``b``'s slice of a ragged layout and its sampling parameters.

    returns start, n (0 when the layout is bad: never read out of bounds), bad, greedy,
    t (the temperature logits are divided by; 1 for greedy rows), top_k, top_p
    """
    start = tl.load(cu_ptr + b).to(tl.int64)
    end = tl.load(cu_ptr + b + 1).to(tl.int64)
    n = end - start
    bad = (start < 0) | (n < 0) | (n > max_n) | (end > total)
    temp = tl.load(temp_ptr + b)
    greedy = temp <= 0.0
    return (tl.where(bad, 0, start), tl.where(bad, 0, n), bad, greedy, tl.where(greedy, 1.0, temp),
            tl.load(top_k_ptr + b), tl.load(top_p_ptr + b))


@triton.jit
def _rejection_sample_kernel(
    logits_ptr, stride_l, ids_ptr, q_ptr, stride_q, cu_ptr,
    temp_ptr, top_k_ptr, top_p_ptr, seed_ptr, offset_ptr, cap_ptr,
    out_ptr, stride_o, n_acc_ptr,
    V, n_draft, k_max,
    HAS_Q: tl.constexpr, HAS_CAP: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    start, n, bad, greedy, t, top_k, top_p = _sequence(b, cu_ptr, k_max, n_draft, temp_ptr, top_k_ptr,
                                                        top_p_ptr)
    if HAS_CAP:  # test only the first num_draft[b] drafts of the slice
        n = tl.minimum(n, tl.maximum(tl.load(cap_ptr + b).to(tl.int64), 0))
    seed = tl.load(seed_ptr + b)
    # -- all uniforms of the sequence in one Philox call: counter = offset | stream | draw --
    # lanes [0, BLOCK_K): stream 0 draw i = acceptance uniform of draft i;
    # lanes [BLOCK_K, 2 BLOCK_K): stream 1 draw i = uniform of a sample from row i
    kk = tl.arange(0, BLOCK_K)  # BLOCK_K >= k_max + 1: draft positions / row indices
    lane = tl.arange(0, 2 * BLOCK_K)
    draw = tl.where(lane < BLOCK_K, _ACCEPT_STREAM + lane, _SAMPLE_STREAM + lane - BLOCK_K)
    u_all = tl.rand(seed, (tl.load(offset_ptr + b) << 32) + draw)  # [2 BLOCK_K]
    n_acc = b * 0
    token = b * 0 - 1
    done = b < 0
    for i in range(0, n + 1):
        row_ptr = logits_ptr + (start + b + i) * stride_l
        q_row_ptr = q_ptr + (start + i) * stride_q
        # every row gets the stats pass, so a NaN after the first rejection is still seen
        m, z, arg, row_bad = _row_stats(row_ptr, V, t, BLOCK_V)
        x = tl.load(ids_ptr + start + i, mask=i < n, other=0)
        bad = bad | row_bad | ((i < n) & ((x < 0) | (x >= V)))
        if ~(done | bad):
            if greedy:
                # -- greedy: accept while the draft is the argmax, then emit the argmax --
                if (i < n) & (x == arg):
                    n_acc += 1
                else:
                    token = arg
                    done = b >= 0  # True
            else:
                thr, z = _thresholds(row_ptr, V, t, m, z, top_k, top_p, BLOCK_V)
                # -- ratio test: accept x iff u * q(x) < p(x) (Leviathan et al. 2023) --
                x_logit = tl.load(row_ptr + x, mask=i < n, other=float("-inf")).to(tl.float32)
                xs = x_logit / t
                p_x = tl.where(_key(xs) >= thr, tl.exp(xs - m), 0.0) / z
                if HAS_Q:
                    q_x = tl.load(q_row_ptr + x, mask=i < n, other=1.0)
                else:
                    q_x = 1.0
                u = tl.sum(tl.where(lane == i, u_all, 0.0))
                if (i < n) & (u * q_x < p_x):
                    n_acc += 1
                else:
                    # -- emit: residual after a rejection, bonus token after the last row --
                    u = tl.sum(tl.where(lane == BLOCK_K + i, u_all, 0.0))
                    token = _sample(row_ptr, q_row_ptr, V, t, m, z, thr, x, i < n, u,
                                    HAS_Q, BLOCK_V)
                    done = b >= 0  # True
    # -- out row: accepted drafts, the emitted token, -1 padding (all -1 when bad) --
    drafts = tl.load(ids_ptr + start + kk, mask=kk < n_acc, other=-1)
    row = tl.where(kk < n_acc, drafts, tl.where(kk == n_acc, token, -1))
    tl.store(out_ptr + b * stride_o + kk, tl.where(bad, -1, row), mask=kk <= k_max)
    tl.store(n_acc_ptr + b, tl.where(bad, -1, n_acc).to(tl.int32))


def rejection_sample(
    target_logits: torch.Tensor,
    draft_token_ids: torch.Tensor,
    draft_probs: torch.Tensor | None,
    cu_num_draft: torch.Tensor,
    max_num_draft: int,
    temperature: torch.Tensor,
    top_k: torch.Tensor,
    top_p: torch.Tensor,
    seeds: torch.Tensor,
    offsets: torch.Tensor,
    check_finite: bool = True,
    *,
    num_draft: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused rejection sampling; same arguments, results and errors as
    ``reference.rejection_sample`` (see its docstring for every tensor's shape and dtype).

    returns: out_tokens [B, max_num_draft + 1] int64 padded with -1, n_accepted [B] int32
    (-1 for a sequence with bad values when check_finite=False). With check_finite=False
    the call makes no host copy.

    Example::

        >>> logits = torch.tensor([[0.0, 5.0, 0.0], [0.0, 0.0, 5.0]])
        >>> i32, i64 = torch.int32, torch.int64
        >>> rejection_sample(logits, torch.tensor([1]), None, torch.tensor([0, 1], dtype=i32), 1,
        ...                  torch.zeros(1), torch.zeros(1, dtype=i32), torch.ones(1),
        ...                  torch.zeros(1, dtype=i64), torch.zeros(1, dtype=i64))
        (tensor([[1, 2]]), tensor([1], dtype=torch.int32))
    """
    batch, vocab = _check_rejection_args(target_logits, draft_token_ids, draft_probs, cu_num_draft,
                                         max_num_draft, temperature, top_k, top_p, seeds, offsets,
                                         num_draft)
    if check_finite:
        _check_draft_layout(cu_num_draft, draft_token_ids, max_num_draft, vocab)
    dev = target_logits.device
    out = torch.empty((batch, max_num_draft + 1), dtype=torch.int64, device=dev)
    n_acc = torch.empty((batch,), dtype=torch.int32, device=dev)
    if batch == 0:
        return out, n_acc
    logits = target_logits if target_logits.stride(1) == 1 else target_logits.contiguous()
    ids = draft_token_ids
    if ids.numel() == 0:
        ids = torch.zeros(1, dtype=torch.int64, device=dev)  # never read (every n_b = 0)
    if draft_probs is not None:
        q = draft_probs if draft_probs.stride(1) == 1 else draft_probs.contiguous()
    else:
        q = torch.zeros(1, dtype=torch.float32, device=dev)  # never read (HAS_Q=False)
    block_v = min(4096, triton.next_power_of_2(vocab))
    _rejection_sample_kernel[(batch,)](
        logits, logits.stride(0), ids, q, q.stride(0), cu_num_draft,
        temperature, top_k, top_p, seeds, offsets, num_draft if num_draft is not None else cu_num_draft,
        out, out.stride(0), n_acc,
        vocab, draft_token_ids.shape[0], max_num_draft,
        HAS_Q=draft_probs is not None, HAS_CAP=num_draft is not None, BLOCK_V=block_v,
        BLOCK_K=triton.next_power_of_2(max_num_draft + 1),
        # one program per sequence, so a lone CTA per SM: 16 warps (8 elements a thread at
        # BLOCK_V = 4096) hide more latency; 109 registers a thread, no spills on sm_90
        num_warps=16 if block_v >= 4096 else (8 if block_v >= 1024 else 4),
    )
    if check_finite:
        _raise_if_flagged(n_acc)
    return out, n_acc
