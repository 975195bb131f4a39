"""Fused tree verification (SpecInfer multi-step speculative sampling) in one Triton launch.

One program per sequence walks its draft tree from the root, one tree level at a time,
streaming each visited row's vocabulary in blocks of BLOCK_V; no probability tensor is
ever written to memory. The rule, its proof and the contract a drafter must meet are in
``reference.tree_rejection_sample``; this file computes the same thing.

Per visited position u (tree row r):

1. the row's softmax stats, first argmax and non-finite check (``_row_stats``), then the
   top-k / top-p threshold (``_thresholds``): p_u(v) = [key(x_v) >= thr] exp(x_v - m) / Z.
   Both helpers come from the chain kernel, rejection_sampling.py;
2. the children of u — the lanes of the [64] node block whose parent is u — are tried in
   node order. p' (the target less what the rejected siblings took) is never stored; it is
   a closed form of p_u and two scalars, updated by one pass over V per rejected child:
     sampled children (q given): p'_k = max(p_u - c_k q_u, 0) / W_k with c_0 = 0, W_0 = 1,
       c_{k+1} = c_k + W_k, W_{k+1} = sum_v max(p_u - c_{k+1} q_u, 0)(v).
       Proof: max(max(p - c q, 0) / W - q, 0) = max(p - (c + W) q, 0) / W, since where
       p <= c q both sides are 0 (q >= 0). So SpecInfer's p' <- norm(max(p' - q, 0))
       after k rejections is exactly this, with normaliser W_{k+1} / W_k per step;
     deterministic children (q None): p'_k = p_u [v not a rejected sibling's token] / W_k,
       W_k = the mass that is left, the removed set being the children of u up to node
       ``cut`` (their tokens are re-read from memory in each block);
   a child is accepted iff u_c * q_u(x_c) < p'(x_c) (a point mass has q_u(x_c) = 1). A
   residual that sums to 0 leaves (c, W) / cut unchanged, as the reference keeps p';
3. if every child is rejected (or u has none): one inverse-CDF sample of p' (the total is
   the last W; one more pass when nothing was rejected), scanning blocks until the
   running sum crosses u * W.

So each visited row is read once for its stats, once more per rejected child (the
q row too, for sampled children) and, at the last one, once or twice more for the sample
(plus the top-k / top-p bisection passes when enabled); rows off the accepted path are
never read, and nothing is written but the outputs (no scratch memory).

Random numbers (``philox.py``), bit-identical to ``philox_uniform`` in the reference:
acceptance uniform of node i = tl.rand(seed, (offset << 32) | (2 << 24) | i); uniform of
the sample from tree row r = tl.rand(seed, (offset << 32) | (3 << 24) | r).

Outside the kernel: only the argument checks and, with check_finite=True, the host copies
that validate the trees and turn the kernel's flags (n_accepted = -1) into a ValueError.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .reference import (
    MAX_TREE_NODES,
    TREE_ACCEPT_STREAM,
    TREE_SAMPLE_STREAM,
    _check_tree_args,
    _check_tree_layout,
    _raise_if_flagged,
)
from .rejection_sampling import _cdf_block, _key, _load_scaled, _row_stats, _sequence, _thresholds

__all__ = ["tree_rejection_sample"]

_ACCEPT_STREAM = tl.constexpr(TREE_ACCEPT_STREAM << 24)  # stream field of the counter
_SAMPLE_STREAM = tl.constexpr(TREE_SAMPLE_STREAM << 24)


@triton.jit
def _weights(row_ptr, q_row_ptr, ids_ptr, par_ptr, idx, mask, t, m, z, thr, node, coef, cut,
             HAS_Q: tl.constexpr):
    """Unnormalised p' on one block: max(p - coef q, 0) (sampled children), or p with the
    tokens of u's children numbered <= cut removed (deterministic children)."""
    _, x = _load_scaled(row_ptr, idx, mask, t)
    p = tl.where(mask & (_key(x) >= thr), tl.exp(x - m), 0.0) / z
    if HAS_Q:
        # q is read only once a child was rejected (coef > 0); tl.where rather than
        # `mask & (coef > 0.0)`, which the interpreter cannot evaluate
        q = tl.load(q_row_ptr + idx, mask=tl.where(coef > 0.0, mask, False), other=0.0)
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
def _mass(row_ptr, q_row_ptr, ids_ptr, par_ptr, V, t, m, z, thr, node, coef, cut,
          HAS_Q: tl.constexpr, BLOCK_V: tl.constexpr):
    """sum_v of ``_weights`` over the row: the normaliser W of p'."""
    offs = tl.arange(0, BLOCK_V)
    acc = tl.zeros((BLOCK_V,), tl.float32)
    for v0 in range(0, V, BLOCK_V):
        idx = v0 + offs
        acc += _weights(row_ptr, q_row_ptr, ids_ptr, par_ptr, idx, idx < V, t, m, z, thr, node,
                        coef, cut, HAS_Q)
    return tl.sum(acc)


@triton.jit
def _sample(row_ptr, q_row_ptr, ids_ptr, par_ptr, V, t, m, z, thr, node, coef, cut, total, u,
            HAS_Q: tl.constexpr, BLOCK_V: tl.constexpr):
    """Inverse-CDF sample of p' (total = its unnormalised mass): the first token whose
    running sum exceeds u * total and whose weight is positive."""
    offs = tl.arange(0, BLOCK_V)
    target = u * total
    token = tl.full((), -1, tl.int64)
    last = tl.full((BLOCK_V,), -1, tl.int32)  # last positive token per lane: rounding fallback
    cum = tl.full((), 0.0, tl.float32)
    v0 = tl.full((), 0, tl.int32)
    while (v0 < V) & (token < 0):
        idx = v0 + offs
        w = _weights(row_ptr, q_row_ptr, ids_ptr, par_ptr, idx, idx < V, t, m, z, thr, node,
                     coef, cut, HAS_Q)
        token, last, cum = _cdf_block(w, idx, cum, target, token, last)
        v0 += BLOCK_V
    return tl.where(token < 0, tl.max(last).to(tl.int64), token)


@triton.jit
def _tree_rejection_sample_kernel(
    logits_ptr, stride_l, ids_ptr, par_ptr, q_ptr, stride_q, cu_ptr,
    temp_ptr, top_k_ptr, top_p_ptr, seed_ptr, offset_ptr,
    out_ptr, stride_o, n_acc_ptr, path_ptr, stride_p,
    V, n_nodes, max_depth,
    HAS_Q: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    start, n, bad, greedy, t, top_k, top_p = _sequence(b, cu_ptr, BLOCK_N, n_nodes, temp_ptr, top_k_ptr,
                                                        top_p_ptr)
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
            q_row_ptr = q_ptr + row * stride_q
            m, z, arg, row_bad = _row_stats(row_ptr, V, t, BLOCK_V)
            bad = bad | row_bad
            is_child = live & (par == node)  # [BLOCK_N]
            chosen = tl.full((), -1, tl.int32)
            emit = arg
            if ~bad:
                if greedy:
                    # -- greedy: the first child carrying the argmax --
                    hit = tl.min(tl.where(is_child & (tok == arg), nodes, BLOCK_N))
                    chosen = tl.where(hit < BLOCK_N, hit, -1)
                else:
                    thr, z = _thresholds(row_ptr, V, t, m, z, top_k, top_p, BLOCK_V)
                    # p' = max(p - coef q, 0) / w (sampled) or p without children <= cut / w
                    coef = tl.full((), 0.0, tl.float32)
                    w = tl.full((), 1.0, tl.float32)
                    cut = tl.full((), -1, tl.int32)
                    n_child = tl.sum(is_child.to(tl.int32))
                    k = tl.full((), 0, tl.int32)
                    prev = tl.full((), -1, tl.int32)
                    while (k < n_child) & (chosen < 0):
                        c = tl.min(tl.where(is_child & (nodes > prev), nodes, BLOCK_N))
                        x = tl.sum(tl.where(nodes == c, tok, 0))  # its token, in [0, V)
                        xs = tl.load(row_ptr + x, mask=(x >= 0) & (x < V),
                                     other=float("-inf")).to(tl.float32) / t
                        p_x = tl.where(_key(xs) >= thr, tl.exp(xs - m), 0.0) / z
                        if HAS_Q:
                            q_x = tl.load(q_row_ptr + x, mask=(x >= 0) & (x < V), other=1.0)
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
                            # -- rejected: one pass for the next normaliser --
                            if HAS_Q:
                                coef_next = coef + w
                                w_next = _mass(row_ptr, q_row_ptr, ids_ptr, par_ptr, V, t, m, z,
                                               thr, node, coef_next, cut, HAS_Q, BLOCK_V)
                                if w_next > 0.0:
                                    coef = coef_next
                                    w = w_next
                            else:
                                w_next = _mass(row_ptr, q_row_ptr, ids_ptr, par_ptr, V, t, m, z,
                                               thr, node, coef, c, HAS_Q, BLOCK_V)
                                if w_next > 0.0:
                                    cut = c
                                    w = w_next
                        prev = c
                        k += 1
                    if chosen < 0:
                        # -- every child rejected: a sample of p' (w is its mass once updated) --
                        if (coef == 0.0) & (cut < 0):
                            w = _mass(row_ptr, q_row_ptr, ids_ptr, par_ptr, V, t, m, z, thr,
                                      node, coef, cut, HAS_Q, BLOCK_V)
                        u = tl.sum(tl.where(lane == 2 * BLOCK_N + 1 + node, u_all, 0.0))
                        emit = _sample(row_ptr, q_row_ptr, ids_ptr, par_ptr, V, t, m, z, thr,
                                       node, coef, cut, w, u, HAS_Q, BLOCK_V)
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


def tree_rejection_sample(
    target_logits: torch.Tensor,
    draft_token_ids: torch.Tensor,
    parents: torch.Tensor,
    draft_probs: torch.Tensor | None,
    cu_num_nodes: torch.Tensor,
    max_depth: int,
    temperature: torch.Tensor,
    top_k: torch.Tensor,
    top_p: torch.Tensor,
    seeds: torch.Tensor,
    offsets: torch.Tensor,
    check_finite: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fused tree verification; same arguments, rule, results and errors as
    ``reference.tree_rejection_sample`` (see its docstring for every tensor's shape and
    dtype, the rule and how a drafter must draw the children).

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
    batch, vocab = _check_tree_args(target_logits, draft_token_ids, parents, draft_probs,
                                    cu_num_nodes, max_depth, temperature, top_k, top_p,
                                    seeds, offsets)
    if check_finite:
        _check_tree_layout(cu_num_nodes, draft_token_ids, parents, max_depth, vocab)
    dev = target_logits.device
    out = torch.empty((batch, max_depth + 1), dtype=torch.int64, device=dev)
    n_acc = torch.empty((batch,), dtype=torch.int32, device=dev)
    path = torch.empty((batch, max(max_depth, 1)), dtype=torch.int32, device=dev)
    if batch == 0:
        return out, n_acc, path[:, :max_depth]
    logits = target_logits if target_logits.stride(1) == 1 else target_logits.contiguous()
    if draft_token_ids.numel() == 0:  # never read: every N_b = 0
        ids = torch.zeros(1, dtype=torch.int64, device=dev)
        par = torch.zeros(1, dtype=torch.int32, device=dev)
    else:
        ids, par = draft_token_ids.contiguous(), parents.contiguous()
    if draft_probs is not None:
        q = draft_probs if draft_probs.stride(1) == 1 else draft_probs.contiguous()
    else:
        q = torch.zeros(1, dtype=torch.float32, device=dev)  # never read (HAS_Q=False)
    block_v = min(4096, triton.next_power_of_2(vocab))
    _tree_rejection_sample_kernel[(batch,)](
        logits, logits.stride(0), ids, par, q, q.stride(0), cu_num_nodes,
        temperature, top_k, top_p, seeds, offsets,
        out, out.stride(0), n_acc, path, path.stride(0),
        vocab, draft_token_ids.shape[0], max_depth,
        HAS_Q=draft_probs is not None, BLOCK_V=block_v, BLOCK_N=MAX_TREE_NODES,
        BLOCK_D=triton.next_power_of_2(max_depth + 1),
        # as the chain kernel: one program per sequence, so more warps hide more latency
        num_warps=16 if block_v >= 4096 else (8 if block_v >= 1024 else 4),
    )
    if check_finite:
        _raise_if_flagged(n_acc)
    return out, n_acc, path[:, :max_depth]
