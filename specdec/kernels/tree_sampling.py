"""Tree verification (SpecInfer multi-step speculative sampling) with the vocabulary split
across programs. The rule, its proof and the contract a drafter must meet are in
``reference.tree_rejection_sample``; this file computes the same thing in three launches
(plus the radix rounds of rows the candidates cannot settle).

1. ``_tree_partials_kernel``, grid (tree rows, chunks of CHUNK tokens): every target row of
   every tree is read once, each program one chunk. It writes the chunk's softmax partials
   (max m_c and sum_c exp(x - m_c) of x = logit * (1 / T), the first argmax of the raw logits,
   the non-finite flag) and, for a row whose request uses top-k or top-p, the chunk's
   CANDIDATES largest tokens (key, id) plus how many of its tokens reach the smallest kept
   key (so ties cut by the buffer are counted, not lost).
2. ``_tree_rows_kernel``, grid (tree rows,): merges each row's chunk partials (m, Z, first
   argmax, flag; no read of the row) and, for a filtered row, its top-k / top-p threshold
   thr (p_u(v) = [key(x_v) >= thr] exp(x_v - m) / Z) from the row's CANDIDATES largest
   entries of the union of its chunk buffers, exact whenever top_k <= 64, and for top-p
   alone whenever the nucleus lies within those entries. It stores the entries per row.
   Rows the entries cannot settle (top_k > 64, or top-p alone with a wider nucleus) get
   their exact thr and kept mass from the radix select shared with the chain sampler
   (``_sampling_core.radix_select``: per round an 8-bit digit histogram of the key over
   (rows x chunks) and a per-row step; <= 4 rounds, 8 for top_k > 64 then top-p, as the
   host hint ``radix_rounds`` says); the walk treats them as dense rows. No bisection.
3. ``_tree_walk_kernel``, grid (B,): one program per sequence walks its tree, one level at
   a time, from the per-row results of the rows it visits; rows off the path are never
   looked at (their flags are not consulted). Per visited position u (tree row r):
   - "sparse" rows (filtered, every kept token among the candidates, the usual top-k /
     top-p case): p_u lives on <= 64 entries, so every ratio test, residual update
     (q gathered at those entries) and the final sample are register work: no pass;
   - "dense" rows (no filter): deterministic children update the normaliser W of p' by a
     scalar (W <- W - p(x)); sampled children need one pass over the row (target logits
     and the draft logits) per rejected child for W = sum max(p - c q, 0), which also
     yields the residual's per-chunk masses; the final sample picks its chunk from
     per-chunk masses (the partials, or that pass) and scans from that chunk on, so it
     normally reads one chunk.
   The residual after k sibling rejections is a closed form of p_u and two scalars:
     sampled children (q given): p'_k = max(p_u - c_k q_u, 0) / W_k with c_0 = 0, W_0 = 1,
       c_{k+1} = c_k + W_k, W_{k+1} = sum_v max(p_u - c_{k+1} q_u, 0)(v).
       Proof: max(max(p - c q, 0) / W - q, 0) = max(p - (c + W) q, 0) / W, since where
       p <= c q both sides are 0 (q >= 0);
     deterministic children (q None): p'_k = p_u [v not a rejected sibling's token] / W_k,
       the removed set being the children of u up to node ``cut``.
   A residual that sums to 0 leaves (c, W) / cut unchanged, as the reference keeps p'.

q is never materialised: the drafter hands a ``DraftDist`` (draft logits + per-row inv_t,
m, z, thr) and q_u(v) = [key(xq_v) >= thr_q] exp(xq_v - m_q) / z_q, xq = logit * inv_t_q, is
evaluated where it is needed.

Random numbers (``philox.py``), bit-identical to ``philox_uniform`` in the reference:
acceptance uniform of node i = tl.rand(seed, (offset << 32) | (2 << 24) | i); uniform of
the sample from tree row r = tl.rand(seed, (offset << 32) | (3 << 24) | r).

Outside the kernels: only the argument checks and, with check_finite=True, the host copies
that validate the trees and turn the walk's flags (n_accepted = -1) into a ValueError.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._sampling_core import (
    INT32_MIN,
    DraftDist,
    cdf_block,
    key,
    kth_largest,
    radix_rounds_needed,
    radix_select,
    radix_start,
    row_inv_t,
)
from ..tree import MAX_TREE_NODES
from ._sampling_validation import check_tree_args, check_tree_layout, raise_if_flagged
from .philox import TREE_ACCEPT_STREAM, TREE_SAMPLE_STREAM

__all__ = ["tree_rejection_sample", "CHUNK", "CANDIDATES"]

CHUNK = 4096  # tokens per program of the partials kernel (and per block of a dense pass)
CANDIDATES = 64  # largest tokens kept per chunk: top_k <= 64 needs no pass over the row

_ACCEPT_STREAM = tl.constexpr(TREE_ACCEPT_STREAM << 24)  # stream field of the counter
_SAMPLE_STREAM = tl.constexpr(TREE_SAMPLE_STREAM << 24)
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
# launch 2: the walk, one program per sequence
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


@triton.jit
def _q_at(q_row_ptr, idx, mask, q_inv_t, q_m, q_z, q_thr):
    """q(idx) of a DraftDist row: [key(xq) >= thr_q] exp(xq - m_q) / z_q, 0 where masked."""
    xq = tl.load(q_row_ptr + idx, mask=mask, other=float("-inf")).to(tl.float32) * q_inv_t
    return tl.where(mask & (key(xq) >= q_thr), tl.exp(xq - q_m), 0.0) / q_z


@triton.jit
def _dense_weights(row_ptr, q_row_ptr, q_inv_t, q_m, q_z, q_thr, ids_ptr, par_ptr, idx, mask,
                   inv_t, m, z, thr, node, coef, cut, HAS_Q: tl.constexpr):
    """Unnormalised p' on one block: max(p - coef q, 0) (sampled children), or p with the
    tokens of u's children numbered <= cut removed (deterministic children)."""
    x = tl.load(row_ptr + idx, mask=mask, other=float("-inf")).to(tl.float32) * inv_t
    p = tl.where(mask & (key(x) >= thr), tl.exp(x - m), 0.0) / z
    if HAS_Q:
        # q is read only once a child was rejected (coef > 0); tl.where rather than
        # `mask & (coef > 0.0)`, which the interpreter cannot evaluate
        q = _q_at(q_row_ptr, idx, tl.where(coef > 0.0, mask, False), q_inv_t, q_m, q_z, q_thr)
        w = tl.maximum(p - coef * q, 0.0)
    else:
        w = p
        for j in range(node + 1, cut + 1):
            # node j is a rejected sibling iff its parent is u: zero its token
            par_j = tl.load(par_ptr + j)
            x_j = tl.load(ids_ptr + j)
            w = tl.where((idx == x_j) & (par_j == node), 0.0, w)
    return w


@triton.jit
def _dense_masses(row_ptr, q_row_ptr, q_inv_t, q_m, q_z, q_thr, ids_ptr, par_ptr, V,
                  inv_t, m, z, thr, node, coef, cut, HAS_Q: tl.constexpr,
                  BLOCK_V: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_W: tl.constexpr):
    """One pass, in blocks of BLOCK_W: (W = sum_v p'(v) unnormalised, its per-chunk
    masses [BLOCK_C] for chunks of BLOCK_V)."""
    offs = tl.arange(0, BLOCK_W)
    ch = tl.arange(0, BLOCK_C)
    masses = tl.zeros((BLOCK_C,), tl.float32)
    for v0 in range(0, V, BLOCK_W):
        idx = v0 + offs
        w = _dense_weights(row_ptr, q_row_ptr, q_inv_t, q_m, q_z, q_thr, ids_ptr, par_ptr, idx,
                           idx < V, inv_t, m, z, thr, node, coef, cut, HAS_Q)
        masses = tl.where(ch == v0 // BLOCK_V, masses + tl.sum(w), masses)
    return tl.sum(masses), masses


@triton.jit
def _dense_sample(row_ptr, q_row_ptr, q_inv_t, q_m, q_z, q_thr, ids_ptr, par_ptr, V,
                  inv_t, m, z, thr, node, coef, cut, masses, u, fallback,
                  HAS_Q: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_C: tl.constexpr,
                  BLOCK_W: tl.constexpr):
    """Inverse-CDF sample of p' from its per-chunk masses: the chunk where the running sum
    crosses u * total, then a scan of that chunk (and the next ones if rounding hides the
    crossing): the first token whose running sum exceeds the target, weight > 0."""
    ch = tl.arange(0, BLOCK_C)
    offs = tl.arange(0, BLOCK_W)
    target = u * tl.sum(masses)
    hit_c = (tl.cumsum(masses, 0) > target) & (masses > 0.0)
    first_c = tl.min(tl.where(hit_c, ch, BLOCK_C))
    last_c = tl.max(tl.where(masses > 0.0, ch, 0))
    c0 = tl.where(first_c < BLOCK_C, first_c, last_c)
    cum = tl.sum(tl.where(ch < c0, masses, 0.0))
    token = tl.full((), -1, tl.int64)
    last = tl.full((BLOCK_W,), -1, tl.int32)  # last positive token per lane: rounding fallback
    v0 = c0 * BLOCK_V
    while (v0 < V) & (token < 0):
        idx = v0 + offs
        w = _dense_weights(row_ptr, q_row_ptr, q_inv_t, q_m, q_z, q_thr, ids_ptr, par_ptr, idx,
                           idx < V, inv_t, m, z, thr, node, coef, cut, HAS_Q)
        token, last, cum = cdf_block(w, idx, cum, target, token, last)
        v0 += BLOCK_W
    token = tl.where(token < 0, tl.max(last).to(tl.int64), token)
    return tl.where(token < 0, fallback, token)


@triton.jit
def _sparse_sample(w, ids, u):
    """Inverse-CDF sample over entries (weights w [CAND], distinct ids [CAND]) in id order."""
    before = tl.sum(tl.where(ids[None, :] < ids[:, None], w[None, :], 0.0), axis=1)  # [CAND]
    hit = (before + w > u * tl.sum(w)) & (w > 0.0)
    first = tl.min(tl.where(hit, ids, _INT32_MAX))
    last = tl.max(tl.where(w > 0.0, ids, -1))
    return tl.where(first == _INT32_MAX, last, first).to(tl.int64)


@triton.jit(do_not_specialize=["V", "n_nodes", "max_depth", "n_chunks"])
def _tree_walk_kernel(
    logits_ptr, stride_l, ids_ptr, par_ptr, cu_ptr,
    temp_ptr, seed_ptr, offset_ptr,
    stats_ptr, m_ptr, z_ptr, thr_ptr, row_i_ptr, ent_ptr,
    ql_ptr, stride_q, q_inv_t_ptr, q_m_ptr, q_z_ptr, q_thr_ptr,
    out_ptr, stride_o, n_acc_ptr, path_ptr, stride_p,
    V, n_nodes, max_depth, n_chunks,
    HAS_Q: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_C: tl.constexpr, CAND: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_W: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    # -- the sequence's slice (n = 0 when the layout is bad: never read out of bounds) --
    start = tl.load(cu_ptr + b).to(tl.int64)
    end = tl.load(cu_ptr + b + 1).to(tl.int64)
    n = end - start
    bad = (start < 0) | (n < 0) | (n > BLOCK_N) | (end > n_nodes)
    start = tl.where(bad, 0, start)
    n = tl.where(bad, 0, n)
    temp = tl.load(temp_ptr + b)
    greedy = temp <= 0.0
    inv_t = row_inv_t(temp)
    ids_ptr += start
    par_ptr += start
    seed = tl.load(seed_ptr + b)
    # -- all uniforms of the sequence in one Philox call: counter = offset | stream | draw --
    # lanes [0, 2 BLOCK_N): stream 2, draw = node index (acceptance uniform of that node);
    # lanes [2 BLOCK_N, 4 BLOCK_N): stream 3, draw = tree row (the emitted sample's uniform)
    lane = tl.arange(0, 4 * BLOCK_N)
    draw = tl.where(lane < 2 * BLOCK_N, _ACCEPT_STREAM + lane, _SAMPLE_STREAM + lane - 2 * BLOCK_N)
    u_all = tl.rand(seed, (tl.load(offset_ptr + b) << 32) + draw)  # [4 BLOCK_N]
    # -- the tree on a [BLOCK_N] block of node lanes: tokens, parents, depth checks --
    nodes = tl.arange(0, BLOCK_N)
    live = nodes < n
    tok = tl.load(ids_ptr + nodes, mask=live, other=0)  # int64
    par = tl.load(par_ptr + nodes, mask=live, other=-1)  # int32
    par_ok = (par >= -1) & (par < nodes)
    bad = bad | (tl.max((live & ((tok < 0) | (tok >= V) | ~par_ok)).to(tl.int32)) > 0)
    # depth by pointer jumping: anc = the 2**s-th ancestor, depth = edges up to it
    anc = tl.where(live & par_ok, par, -1)
    depth = tl.full((BLOCK_N,), 1, tl.int32)
    while tl.max(anc) >= 0:  # ceil(log2(depth)) steps
        has = anc >= 0
        at = tl.where(has, anc, 0)
        depth = depth + tl.where(has, tl.gather(depth, at, 0), 0)
        anc = tl.where(has, tl.gather(anc, at, 0), -1)
    bad = bad | (tl.max(tl.where(live, depth, 0)) > max_depth)
    # -- the walk: one visited position per level --
    lanes = tl.arange(0, BLOCK_D)
    path = tl.full((BLOCK_D,), -1, tl.int32)
    node = tl.full((), -1, tl.int32)  # current position, -1 = root
    n_acc = tl.full((), 0, tl.int32)
    token = tl.full((), -1, tl.int64)
    done = bad
    for level in range(0, max_depth + 1):
        if ~done:
            row = start + b + 1 + node  # tree row of the position
            row_ptr = logits_ptr + row * stride_l
            m = tl.load(m_ptr + row)
            z = tl.load(z_ptr + row)
            thr = tl.load(thr_ptr + row)
            sparse = tl.load(row_i_ptr + row * 3) > 0
            arg = tl.load(row_i_ptr + row * 3 + 1).to(tl.int64)
            bad = bad | (tl.load(row_i_ptr + row * 3 + 2) > 0)
            is_child = live & (par == node)  # [BLOCK_N]
            chosen = tl.full((), -1, tl.int32)
            emit = arg
            if ~bad:
                if greedy:
                    # -- greedy: the first child carrying the argmax --
                    hit = tl.min(tl.where(is_child & (tok == arg), nodes, BLOCK_N))
                    chosen = tl.where(hit < BLOCK_N, hit, -1)
                else:
                    # -- p_u: threshold and kept mass (from the candidates or the radix
                    # select); sparse rows live on the entries --
                    j = tl.arange(0, CAND)
                    ent = tl.load(ent_ptr + row * CAND + j, mask=tl.where(sparse, j < CAND, False),
                                  other=_NO_CANDIDATE)
                    e_key = (ent >> 32).to(tl.int32)
                    e_id = tl.where(e_key > _INT32_MIN, (ent & 0xFFFFFFFF).to(tl.int32), -1)
                    e_live = sparse & (e_key >= thr) & (e_key > _INT32_MIN)
                    p_e = tl.where(e_live, tl.exp(_from_key(e_key) - m), 0.0) / z  # [CAND]
                    # -- q_u: its scalars, and (sparse rows) its values at the entries --
                    q_row_ptr = ql_ptr + row * stride_q
                    q_inv_t = 1.0
                    q_m = 0.0
                    q_z = 1.0
                    q_thr = _INT32_MIN
                    q_e = tl.zeros((CAND,), tl.float32)
                    n_child = tl.sum(is_child.to(tl.int32))
                    if HAS_Q:
                        if n_child > 0:
                            q_inv_t = tl.load(q_inv_t_ptr + row)
                            q_m = tl.load(q_m_ptr + row)
                            q_z = tl.load(q_z_ptr + row)
                            q_thr = tl.load(q_thr_ptr + row)
                            q_e = _q_at(q_row_ptr, e_id, e_live, q_inv_t, q_m, q_z, q_thr)
                    # p' = max(p - coef q, 0) / w (sampled) or p without children <= cut / w
                    coef = tl.full((), 0.0, tl.float32)
                    w = tl.full((), 1.0, tl.float32)
                    cut = tl.full((), -1, tl.int32)
                    masses = tl.zeros((BLOCK_C,), tl.float32)  # of p', once a pass made them
                    have_masses = tl.full((), 0, tl.int1)
                    k = tl.full((), 0, tl.int32)
                    prev = tl.full((), -1, tl.int32)
                    while (k < n_child) & (chosen < 0):
                        c = tl.min(tl.where(is_child & (nodes > prev), nodes, BLOCK_N))
                        x = tl.sum(tl.where(nodes == c, tok, 0))  # its token, in [0, V)
                        xs = tl.load(row_ptr + x, mask=x >= 0).to(tl.float32) * inv_t
                        p_x = tl.where(key(xs) >= thr, tl.exp(xs - m), 0.0) / z
                        if HAS_Q:
                            q_x = _q_at(q_row_ptr, x, x >= 0, q_inv_t, q_m, q_z, q_thr)
                            pp_x = tl.maximum(p_x - coef * q_x, 0.0) / w
                        else:
                            q_x = 1.0
                            # a rejected sibling's token has p'(x) = 0 (duplicates)
                            gone = tl.max((is_child & (nodes <= cut) & (tok == x)).to(tl.int32))
                            pp_x = tl.where(gone > 0, 0.0, p_x / w)
                        # -- ratio test: accept iff u * q(x) < p'(x), i.e. w.p. min(1, p'/q) --
                        u = tl.sum(tl.where(lane == c, u_all, 0.0))
                        if u * q_x < pp_x:
                            chosen = c
                        else:
                            # -- rejected: the next normaliser (no pass on sparse rows) --
                            if HAS_Q:
                                coef_next = coef + w
                                if sparse:
                                    w_next = tl.sum(tl.maximum(p_e - coef_next * q_e, 0.0))
                                else:
                                    w_next, masses_next = _dense_masses(
                                        row_ptr, q_row_ptr, q_inv_t, q_m, q_z, q_thr, ids_ptr,
                                        par_ptr, V, inv_t, m, z, thr, node, coef_next, cut,
                                        HAS_Q, BLOCK_V, BLOCK_C, BLOCK_W)
                                    if w_next > 0.0:
                                        masses = masses_next
                                        have_masses = w_next > 0.0
                                if w_next > 0.0:
                                    coef = coef_next
                                    w = w_next
                            else:
                                if sparse:
                                    gone_e = (e_id[:, None] == tl.where(
                                        is_child & (nodes <= c), tok, -1)[None, :]).to(tl.int32)
                                    w_next = tl.sum(tl.where(tl.max(gone_e, axis=1) > 0, 0.0,
                                                             p_e))
                                else:
                                    # W - p(x): exact where some mass is left; a pass checks
                                    # a remainder at rounding level
                                    w_next = w - tl.where(gone > 0, 0.0, p_x)
                                    if w_next < 1e-5:
                                        w_next, _ = _dense_masses(
                                            row_ptr, q_row_ptr, q_inv_t, q_m, q_z, q_thr,
                                            ids_ptr, par_ptr, V, inv_t, m, z, thr, node, coef,
                                            c, HAS_Q, BLOCK_V, BLOCK_C, BLOCK_W)
                                if w_next > 0.0:
                                    cut = c
                                    w = w_next
                        prev = c
                        k += 1
                    if chosen < 0:
                        # -- every child rejected: a sample of p' --
                        u = tl.sum(tl.where(lane == 2 * BLOCK_N + 1 + node, u_all, 0.0))
                        if sparse:
                            if HAS_Q:
                                w_e = tl.where(coef > 0.0, tl.maximum(p_e - coef * q_e, 0.0), p_e)
                            else:
                                removed = (e_id[:, None] == tl.where(
                                    is_child & (nodes <= cut), tok, -1)[None, :]).to(tl.int32)
                                w_e = tl.where(tl.max(removed, axis=1) > 0, 0.0, p_e)
                            emit = _sparse_sample(w_e, e_id, u)
                        else:
                            if ~have_masses:
                                if (thr == _INT32_MIN) & (cut < 0):
                                    # p itself: the chunk masses are the partials
                                    ch = tl.arange(0, BLOCK_C)
                                    at = row * n_chunks + ch
                                    m_c = tl.load(stats_ptr + at * 3, mask=ch < n_chunks,
                                                  other=float("-inf"))
                                    z_c = tl.load(stats_ptr + at * 3 + 1, mask=ch < n_chunks,
                                                  other=0.0)
                                    masses = z_c * tl.exp(m_c - m) / z
                                else:
                                    _, masses = _dense_masses(
                                        row_ptr, q_row_ptr, q_inv_t, q_m, q_z, q_thr, ids_ptr,
                                        par_ptr, V, inv_t, m, z, thr, node, coef, cut, HAS_Q,
                                        BLOCK_V, BLOCK_C, BLOCK_W)
                            emit = _dense_sample(row_ptr, q_row_ptr, q_inv_t, q_m, q_z, q_thr,
                                                 ids_ptr, par_ptr, V, inv_t, m, z, thr, node,
                                                 coef, cut, masses, u, arg, HAS_Q, BLOCK_V,
                                                 BLOCK_C, BLOCK_W)
            if ~bad & (chosen >= 0):
                # -- accepted: move to the child --
                path = tl.where(lanes == level, chosen, path)
                n_acc += 1
                node = chosen
            if ~bad & (chosen < 0):
                token = emit
            done = bad | (chosen < 0)
    # -- outputs: path tokens, the emitted token, -1 padding (all -1 when bad) --
    on_path = lanes < n_acc
    path_tok = tl.load(ids_ptr + path, mask=on_path & (path >= 0), other=-1)
    row_out = tl.where(on_path, path_tok, tl.where(lanes == n_acc, token, -1))
    tl.store(out_ptr + b * stride_o + lanes, tl.where(bad, -1, row_out), mask=lanes <= max_depth)
    tl.store(path_ptr + b * stride_p + lanes, tl.where(bad, -1, path), mask=lanes < max_depth)
    tl.store(n_acc_ptr + b, tl.where(bad, -1, n_acc))


# ---------------------------------------------------------------------------------------
# launcher
# ---------------------------------------------------------------------------------------


def tree_rejection_sample(
    target_logits: torch.Tensor,
    draft_token_ids: torch.Tensor,
    parents: torch.Tensor,
    q: DraftDist | None,
    cu_num_nodes: torch.Tensor,
    max_depth: int,
    temperature: torch.Tensor,
    top_k: torch.Tensor,
    top_p: torch.Tensor,
    seeds: torch.Tensor,
    offsets: torch.Tensor,
    check_finite: bool = True,
    *,
    chunk: int = CHUNK,
    radix_rounds: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Tree verification in three launches (plus the radix rounds); same arguments, rule,
    results and errors as ``reference.tree_rejection_sample`` (see its docstring for every
    tensor's shape and dtype, the rule and how a drafter must draw the children).

    chunk: tokens per program of the partials launch (a power of two >= 16; rows of V
    tokens get cdiv(V, chunk) programs). Tests use small chunks to split small
    vocabularies.
    radix_rounds: host hint, radix-select rounds to launch for rows the candidates cannot
    settle (top_k > 64, top-p alone with a nucleus wider than the candidates): the
    engine's ``SamplingTensors.radix_rounds``; None reads top_k / top_p
    (``_sampling_core.radix_rounds_needed``).

    returns: out_tokens [B, max_depth + 1] int64 padded with -1, n_accepted [B] int32,
    accepted_nodes [B, max_depth] int32 padded with -1 (n_accepted = -1 and all -1 rows for
    a sequence with bad values when check_finite=False). With check_finite=False the call
    makes no host copy.

    Example::

        >>> logits = torch.tensor([[0.0, 5.0, 0.0], [0.0, 0.0, 9.0], [0.0, 0.0, 5.0]])
        >>> i32, i64 = torch.int32, torch.int64
        >>> tree_rejection_sample(logits, torch.tensor([2, 1]), torch.tensor([-1, -1], dtype=i32),
        ...                       None, torch.tensor([0, 2], dtype=i32), 1, torch.zeros(1),
        ...                       torch.zeros(1, dtype=i32), torch.ones(1),
        ...                       torch.zeros(1, dtype=i64), torch.zeros(1, dtype=i64))
        (tensor([[1, 2]]), tensor([1], dtype=torch.int32), tensor([[1]], dtype=torch.int32))
    """
    batch, vocab = check_tree_args(target_logits, draft_token_ids, parents, q,
                                    cu_num_nodes, max_depth, temperature, top_k, top_p,
                                    seeds, offsets)
    if not isinstance(chunk, int) or chunk < 16 or chunk & (chunk - 1):
        raise ValueError(f"chunk must be a power of two >= 16, got {chunk!r}")
    if check_finite:
        check_tree_layout(cu_num_nodes, draft_token_ids, parents, max_depth, vocab)
    dev = target_logits.device
    out = torch.empty((batch, max_depth + 1), dtype=torch.int64, device=dev)
    n_acc = torch.empty((batch,), dtype=torch.int32, device=dev)
    path = torch.empty((batch, max(max_depth, 1)), dtype=torch.int32, device=dev)
    if batch == 0:
        return out, n_acc, path[:, :max_depth]
    logits = target_logits if target_logits.stride(1) == 1 else target_logits.contiguous()
    rows = logits.shape[0]
    if draft_token_ids.numel() == 0:  # never read: every N_b = 0
        ids = torch.zeros(1, dtype=torch.int64, device=dev)
        par = torch.zeros(1, dtype=torch.int32, device=dev)
    else:
        ids, par = draft_token_ids.contiguous(), parents.contiguous()
    if q is not None:
        q_logits = q.logits if q.logits.stride(1) == 1 else q.logits.contiguous()
        q_args = (q_logits, q_logits.stride(0), q.inv_t, q.m, q.z, q.thr)
    else:
        never = torch.zeros(1, dtype=torch.float32, device=dev)  # never read (HAS_Q=False)
        q_args = (never, 0, never, never, never, never.int())
    block_v = min(chunk, triton.next_power_of_2(vocab))
    n_chunks = triton.cdiv(vocab, block_v)
    cand = min(CANDIDATES, block_v)
    # -- scratch: per (row, chunk) partials and candidates (~n_rows * n_chunks * 0.5 KiB) --
    stats = torch.empty((rows, n_chunks, 3), dtype=torch.float32, device=dev)
    arg = torch.empty((rows, n_chunks, 2), dtype=torch.int32, device=dev)
    cands = torch.empty((rows, n_chunks, cand), dtype=torch.int64, device=dev)
    n_ge = torch.empty((rows, n_chunks), dtype=torch.int32, device=dev)
    m = torch.empty((rows,), dtype=torch.float32, device=dev)
    z = torch.empty((rows,), dtype=torch.float32, device=dev)
    inv_t = torch.empty((rows,), dtype=torch.float32, device=dev)
    thr = torch.empty((rows,), dtype=torch.int32, device=dev)
    row_i = torch.empty((rows, 3), dtype=torch.int32, device=dev)
    entries = torch.empty((rows, cand), dtype=torch.int64, device=dev)
    rad_i = torch.empty((rows, 4), dtype=torch.int32, device=dev)
    rad_f = torch.empty((rows, 2), dtype=torch.float32, device=dev)
    _tree_partials_kernel[(rows, n_chunks)](
        logits, logits.stride(0), cu_num_nodes, temperature, top_k, top_p,
        stats, arg, cands, n_ge, vocab, batch,
        BLOCK_V=block_v, CAND=cand, num_warps=8 if block_v >= 2048 else 4,
    )
    block_c = triton.next_power_of_2(n_chunks)
    _tree_rows_kernel[(rows,)](
        cu_num_nodes, temperature, top_k, top_p, stats, arg, cands, n_ge,
        m, z, thr, inv_t, row_i, entries, rad_i, rad_f,
        vocab, batch, n_chunks, BLOCK_C=block_c, CAND=cand, num_warps=8 if block_v >= 2048 else 4,
    )
    # -- rows the candidates cannot settle: exact thr / Z_kept by the shared radix select --
    if radix_rounds is None:
        radix_rounds = radix_rounds_needed(top_k, top_p, vocab, cand)
    radix_select(logits, block_v, m, z, thr, inv_t, rad_i, rad_f, top_p, cu_num_nodes, radix_rounds)
    _tree_walk_kernel[(batch,)](
        logits, logits.stride(0), ids, par, cu_num_nodes,
        temperature, seeds, offsets,
        stats, m, z, thr, row_i, entries, *q_args,
        out, out.stride(0), n_acc, path, path.stride(0),
        vocab, draft_token_ids.shape[0], max_depth, n_chunks,
        HAS_Q=q is not None, BLOCK_V=block_v,
        BLOCK_C=block_c, CAND=cand, BLOCK_N=MAX_TREE_NODES,
        BLOCK_D=triton.next_power_of_2(max_depth + 1),
        BLOCK_W=min(block_v, 1024),  # the walk's rare passes: few registers a lane
        # one program a sequence, mostly scalar work and [64 x 64] tables: 4 warps, no
        # software pipelining of the rare passes, and all 255 registers (ptxas would
        # otherwise aim at 3 CTAs an SM and spill on sm_80): no spills on sm_90 / sm_80
        num_warps=4, num_stages=1, maxnreg=255,
    )
    if check_finite:
        raise_if_flagged(n_acc)
    return out, n_acc, path[:, :max_depth]
