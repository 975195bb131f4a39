"""Tree sampler, launches 1 and 2 (see tree_sampling.py): per-chunk partials of every tree
row, then per row m, Z, the first argmax, the top-k / top-p threshold and the candidate
entries the walk reads."""

from __future__ import annotations

import triton
import triton.language as tl

from ._radix import radix_start
from ._sampling_core import INT32_MIN, key, kth_largest, row_inv_t

_INT32_MIN = tl.constexpr(INT32_MIN)
_INT32_MAX = tl.constexpr(2147483647)
_NO_CANDIDATE = tl.constexpr(-9223372036854775808)  # packed (INT32_MIN, 0): below every key


# ---------------------------------------------------------------------------------------
# launch 1: per-chunk partials of every tree row
# ---------------------------------------------------------------------------------------


@triton.jit
def _top_slots(keys, valid, kth, CAND: tl.constexpr):
    """Slots in [0, CAND) of the keys >= kth (all above it, then ties in order while
    room is left): (slot, taken mask, number taken)."""
    gt = valid & (keys > kth)
    eq = valid & (keys == kth)
    n_gt = tl.sum(gt.to(tl.int32))
    slot = tl.where(gt, tl.cumsum(gt.to(tl.int32), 0) - 1, n_gt + tl.cumsum(eq.to(tl.int32), 0) - 1)
    taken = (gt | eq) & (slot < CAND)
    return slot, taken, tl.minimum(tl.sum((gt | eq).to(tl.int32)), CAND)


@triton.jit
def _sequence_of(cu_ptr, row, n_seq):
    """The sequence of tree row ``row``: the last b whose first row cu[b] + b is <= row."""
    lo = row * 0
    hi = lo + n_seq - 1
    while lo < hi:
        mid = (lo + hi + 1) // 2
        below = tl.load(cu_ptr + mid) + mid <= row
        lo = tl.where(below, mid, lo)
        hi = tl.where(below, hi, mid - 1)
    return lo


@triton.jit(do_not_specialize=["V", "n_seq"])
def _tree_partials_kernel(
    logits_ptr, stride_l, cu_ptr, temp_ptr, top_k_ptr, top_p_ptr,
    stats_ptr, arg_ptr, cand_ptr, n_ge_ptr,
    V, n_seq,
    BLOCK_V: tl.constexpr, CAND: tl.constexpr,
):
    """Program (row, chunk). Writes, at [row, chunk]:
    stats [.., 3] float32 (m_c, z_c = sum exp(x - m_c), best raw logit), arg [.., 2] int32
    (first argmax, non-finite flag); for a filtered row also cand [.., CAND] int64, the
    chunk's CAND largest (key << 32 | token id), in no order, padded with (INT32_MIN, 0),
    and n_ge int32, how many of its tokens have a key >= the smallest of them."""
    row = tl.program_id(0)
    chunk = tl.program_id(1)
    out = row.to(tl.int64) * tl.num_programs(1) + chunk
    lo = _sequence_of(cu_ptr, row, n_seq)
    temp = tl.load(temp_ptr + lo)
    inv_t = row_inv_t(temp)
    top_k = tl.load(top_k_ptr + lo)
    top_p = tl.load(top_p_ptr + lo)
    # -- one chunk of the row --
    idx = chunk * BLOCK_V + tl.arange(0, BLOCK_V)
    mask = idx < V
    raw = tl.load(logits_ptr + row.to(tl.int64) * stride_l + idx, mask=mask,
                  other=float("-inf")).to(tl.float32)
    x = raw * inv_t
    m_c = tl.max(x)
    z_c = tl.sum(tl.exp(x - tl.where(m_c == float("-inf"), 0.0, m_c)))
    best = tl.max(raw)
    arg = tl.min(tl.where(raw == best, idx, _INT32_MAX))
    bad = tl.max(((raw != raw) | (raw == float("inf"))).to(tl.int32))
    tl.store(stats_ptr + out * 3, m_c)
    tl.store(stats_ptr + out * 3 + 1, z_c)
    tl.store(stats_ptr + out * 3 + 2, best)
    tl.store(arg_ptr + out * 2, arg)
    tl.store(arg_ptr + out * 2 + 1, bad)
    if (temp > 0.0) & (((top_k > 0) & (top_k < V)) | (top_p < 1.0)):
        # -- candidates: the chunk's CAND largest keys with their ids (radix select in
        # registers, ``kth_largest``) --
        k = key(x)
        kth = kth_largest(k, mask, CAND)
        slot, taken, n_taken = _top_slots(k, mask, kth, CAND)
        tl.store(cand_ptr + out * CAND + slot, (k.to(tl.int64) << 32) | idx.to(tl.int64),
                 mask=taken)
        j = tl.arange(0, CAND)
        tl.store(cand_ptr + out * CAND + j, tl.full((CAND,), _NO_CANDIDATE, tl.int64),
                 mask=j >= n_taken)
        tl.store(n_ge_ptr + out, tl.sum((mask & (k >= kth)).to(tl.int32)))


# ---------------------------------------------------------------------------------------
# launch 2: per-row merge of the chunk partials
# ---------------------------------------------------------------------------------------


@triton.jit
def _from_key(k):
    """Inverse of ``key`` for keys of data (never INT32_MIN): the float32 it came from."""
    return tl.where(k < 0, k ^ 0x7FFFFFFF, k).to(tl.float32, bitcast=True)


@triton.jit
def _merge_stats(stats_ptr, arg_ptr, row, n_chunks, BLOCK_C: tl.constexpr):
    """(m, Z, first argmax, bad) of a row from its chunk partials."""
    ch = tl.arange(0, BLOCK_C)
    live = ch < n_chunks
    at = row * n_chunks + ch
    m_c = tl.load(stats_ptr + at * 3, mask=live, other=float("-inf"))
    z_c = tl.load(stats_ptr + at * 3 + 1, mask=live, other=0.0)
    best_c = tl.load(stats_ptr + at * 3 + 2, mask=live, other=float("-inf"))
    arg_c = tl.load(arg_ptr + at * 2, mask=live, other=_INT32_MAX)
    bad_c = tl.load(arg_ptr + at * 2 + 1, mask=live, other=0)
    m = tl.max(m_c)
    z = tl.sum(z_c * tl.exp(m_c - tl.where(m == float("-inf"), 0.0, m)))
    best = tl.max(best_c)
    arg = tl.min(tl.where(best_c == best, arg_c, _INT32_MAX)).to(tl.int64)  # ties: first
    bad = (tl.max(bad_c) > 0) | (best == float("-inf"))  # NaN / +inf, or all -inf
    return m, z, arg, bad


@triton.jit
def _candidate_thresholds(cand_ptr, n_ge_ptr, top_ptr, row, n_chunks, V, m, z, top_k, top_p,
                          BLOCK_C: tl.constexpr, CAND: tl.constexpr):
    """Top-k / top-p threshold from the chunk candidates (no read of the row).

    returns thr, Z_kept, found (False: top_k > CAND, or top-p alone with a nucleus wider
    than the candidates), sparse (every kept token is among the returned entries), and
    the global CAND largest entries: keys [CAND] int32, ids [CAND] int32 (no order;
    padding has key INT32_MIN), also left in ``top_ptr`` ([CAND] int64, the row's entries).

    Every token not among the entries has key <= K (the largest chunk floor or the last
    entry); the union of the chunks' top CAND holds the global top CAND as a multiset of
    keys, so the k-th entry is the k-th largest key of the row for k <= CAND.
    """
    ch = tl.arange(0, BLOCK_C)
    j = tl.arange(0, CAND)
    live = ch < n_chunks
    at = row * n_chunks + ch
    tile = tl.load(cand_ptr + at[:, None] * CAND + j[None, :], mask=live[:, None],
                   other=_NO_CANDIDATE)  # [BLOCK_C, CAND]
    n_ge = tl.load(n_ge_ptr + at, mask=live, other=0)  # [BLOCK_C]
    floor_c = (tl.min(tile, axis=1) >> 32).to(tl.int32)  # [BLOCK_C] smallest key kept
    flat = tl.reshape(tile, [BLOCK_C * CAND])
    flat_keys = (flat >> 32).to(tl.int32)
    flat_valid = flat_keys > _INT32_MIN
    # -- the CAND largest of the union, gathered into [CAND] through the scratch --
    kth = kth_largest(flat_keys, flat_valid, CAND)
    slot, taken, n_taken = _top_slots(flat_keys, flat_valid, kth, CAND)
    j = tl.arange(0, CAND)
    tl.store(top_ptr + slot, flat, mask=taken)
    tl.store(top_ptr + j, tl.full((CAND,), _NO_CANDIDATE, tl.int64), mask=j >= n_taken)
    tl.debug_barrier()
    top = tl.load(top_ptr + j)
    keys = (top >> 32).to(tl.int32)
    ids = (top & 0xFFFFFFFF).to(tl.int32)
    valid = keys > _INT32_MIN
    w = tl.where(valid, tl.exp(_from_key(keys) - m), 0.0)  # exp(x - m) of each entry
    # everything at or below K may be missing from the entries
    k_floor = tl.maximum(tl.max(floor_c), kth)
    thr = tl.full((), _INT32_MIN, tl.int32)
    z_kept = z
    use_k = (top_k > 0) & (top_k < V)
    found = ~use_k | (top_k <= CAND)
    sparse = found
    if use_k & found:
        # -- top-k: the k-th largest key; count its ties, the buffers may have cut some --
        thr = kth_largest(flat_keys, flat_valid, top_k)
        # the tile again (cache-resident) rather than kept live across the selection
        tile = tl.load(cand_ptr + at[:, None] * CAND + j[None, :], mask=live[:, None],
                       other=_NO_CANDIDATE)
        in_buf = tl.sum((tile >= (thr.to(tl.int64) << 32)).to(tl.int32), axis=1)
        n_kept = tl.sum(tl.where(floor_c == thr, n_ge, in_buf))  # tokens with key >= thr
        n_in = tl.sum((keys >= thr).to(tl.int32))
        z_kept = (tl.sum(tl.where(keys >= thr, w, 0.0))
                  + (n_kept - n_in).to(tl.float32) * tl.exp(_from_key(thr) - m))
        sparse = n_kept == n_in
        k_floor = thr - 1  # the entries hold every token above thr: all of top-k's set
    if (top_p < 1.0) & found:
        # -- top-p over the top-k survivors: mass strictly above each entry, exact for
        # entries above k_floor; kept iff it is < top_p * Z_kept --
        w_k = tl.where(keys >= thr, w, 0.0)
        above = tl.sum(tl.where(keys[None, :] > keys[:, None], w_k[None, :], 0.0), axis=1)
        sure = valid & (keys > k_floor)
        target = top_p * z_kept
        kept = sure & (keys >= thr) & (above < target)
        # without top-k, the tokens at or below k_floor are all cut when the mass above
        # it reaches the target (with top-k, every survivor's mass above is known)
        found = use_k | (tl.sum(tl.where(sure, w_k, 0.0)) >= target)
        thr_p = tl.min(tl.where(kept, keys, _INT32_MAX))
        if found & (thr_p > thr):
            thr = thr_p  # every token with key >= thr_p is an entry
            z_kept = tl.sum(tl.where(keys >= thr, w, 0.0))
            sparse = True
    sparse = sparse & found
    return thr, z_kept, found, sparse, keys, ids


@triton.jit(do_not_specialize=["V", "n_seq", "n_chunks"])
def _tree_rows_kernel(
    cu_ptr, temp_ptr, top_k_ptr, top_p_ptr, stats_ptr, arg_ptr, cand_ptr, n_ge_ptr,
    m_ptr, z_ptr, thr_ptr, inv_t_ptr, row_i_ptr, ent_ptr, rad_i_ptr, rad_f_ptr,
    V, n_seq, n_chunks,
    BLOCK_C: tl.constexpr, CAND: tl.constexpr,
):
    """Program (row): merges the row's chunk partials and, for a filtered row, finds its
    threshold from the candidates. Writes m, Z_kept, 1 / T (float32) and thr (int32) at
    [row], row_i [row] = (sparse, first argmax, bad) int32, for a filtered row ent [row] =
    its CAND largest entries (key << 32 | id), in no order, and the row's radix state
    (``radix_start``): unsettled (top_k > CAND: mode 1; top-p alone with a nucleus wider
    than the entries: mode 2) when the candidates cannot settle thr / Z_kept."""
    row = tl.program_id(0).to(tl.int64)
    b = _sequence_of(cu_ptr, row, n_seq)
    temp = tl.load(temp_ptr + b)
    top_k = tl.load(top_k_ptr + b)
    top_p = tl.load(top_p_ptr + b)
    m, z, arg, bad = _merge_stats(stats_ptr, arg_ptr, row, n_chunks, BLOCK_C)
    thr = tl.full((), _INT32_MIN, tl.int32)
    found = tl.full((), 1, tl.int1)
    sparse = tl.full((), 0, tl.int1)
    if (temp > 0.0) & (((top_k > 0) & (top_k < V)) | (top_p < 1.0)) & ~bad:
        thr, z, found, sparse, _, _ = _candidate_thresholds(
            cand_ptr, n_ge_ptr, ent_ptr + row * CAND, row, n_chunks, V, m, z, top_k, top_p,
            BLOCK_C, CAND)
    # unsettled rows: thr = INT32_MIN and Z_kept = Z here; the radix launches fix both
    mode = tl.where(found, 0, tl.where((top_k > 0) & (top_k < V), 1, 2))
    radix_start(rad_i_ptr, rad_f_ptr, row, mode, top_k, top_p * z)
    tl.store(m_ptr + row, m)
    tl.store(z_ptr + row, z)
    tl.store(thr_ptr + row, thr)
    tl.store(inv_t_ptr + row, row_inv_t(temp))
    tl.store(row_i_ptr + row * 3, sparse.to(tl.int32))
    tl.store(row_i_ptr + row * 3 + 1, arg.to(tl.int32))
    tl.store(row_i_ptr + row * 3 + 2, bad.to(tl.int32))

