"""Tree sampler, the walk (see tree_sampling.py): one program per sequence walks its tree
one level at a time from the per-row results of ``_tree_row_kernels``; sparse rows are
register work, dense rows take a pass over the row per rejected sampled child."""

from __future__ import annotations

import triton
import triton.language as tl

from ._sampling_core import cdf_block, key, row_inv_t
from ._tree_row_kernels import _INT32_MAX, _INT32_MIN, _NO_CANDIDATE, _from_key
from .philox import TREE_ACCEPT_STREAM, TREE_SAMPLE_STREAM

_ACCEPT_STREAM = tl.constexpr(TREE_ACCEPT_STREAM << 24)  # stream field of the counter
_SAMPLE_STREAM = tl.constexpr(TREE_SAMPLE_STREAM << 24)


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

