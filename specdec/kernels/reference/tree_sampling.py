"""Speculative verification of draft trees in PyTorch (SpecInfer's multi-step
speculative sampling): the oracle of ``tree_sampling.py`` and the CPU backend's sampler."""

from __future__ import annotations

import torch

from ...tree import MAX_TREE_NODES
from .._sampling_core import DraftDist
from .._sampling_validation import (check_tree_args, check_tree_layout, raise_if_flagged, tree_depths,
                                    tree_table)
from ..philox import TREE_ACCEPT_STREAM, TREE_SAMPLE_STREAM, philox_uniform, sample_inverse_cdf
from .sampling import draft_dist_probs, sampling_probs

__all__ = ["tree_rejection_sample"]


def _sibling_residual(p_cur: torch.Tensor, q: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
    """p' after its child x was rejected: max(p' - q, 0) (point mass: p' without x),
    renormalised; p' itself where that sums to 0.

    p_cur: [B, V] float32 rows summing to 1; q: [B, V] float32 or None; x: [B] int64
    """
    if q is not None:
        residual = (p_cur - q).clamp(min=0.0)
    else:
        residual = p_cur.scatter(1, x[:, None], 0.0)
    total = residual.sum(-1, keepdim=True)  # [B, 1]
    return torch.where(total > 0, residual / torch.where(total > 0, total, 1.0), p_cur)


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
    radix_rounds: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Speculative verification of draft trees for a ragged batch (SpecInfer).

    Sequence b has N_b <= 64 draft nodes numbered 0..N_b-1 in topological order (a parent's
    index is below its children's); the children of a position are tried in increasing
    node index (a breadth-first numbering makes siblings contiguous; not required).
    Tree row 0 of a sequence is its root (the last committed token), tree row 1 + i is
    node i; a sequence's rows start at cu_num_nodes[b] + b.

    target_logits:   [sum_b (N_b + 1), V] float32/float16/bfloat16, target logits of every
                     tree row; row r scores the children of tree position r
    draft_token_ids: [sum_b N_b] int64, the token of each node
    parents:         [sum_b N_b] int32, parent node index within the sequence, -1 for the
                     children of the root
    q:               DraftDist (``_sampling_core``) of sum_b (N_b + 1) rows with
                     target_logits' row layout: row r is the draft distribution q_r the
                     children of tree position r were drawn from (after the drafter's own
                     temperature / top-k / top-p); rows of childless positions are not
                     read. None: the children are deterministic candidates (top-b of a
                     drafter, n-gram continuations).
    cu_num_nodes:    [B + 1] int32 cumulative node counts; N_b may be 0
    max_depth:       host int D in [0, 64] >= the depth of every tree (children of the
                     root have depth 1)
    temperature, top_k, top_p, seeds, offsets, check_finite: as in ``rejection_sample``;
    radix_rounds: the kernel's hint, ignored here
    returns:         out_tokens [B, D + 1] int64 (the accepted path's tokens, one emitted
                     token, then -1), n_accepted [B] int32 (path length), accepted_nodes
                     [B, D] int32 (node indices of the accepted path, root to leaf, then -1)

    The walk starts at the root; at position u with p_u = ``sampling_probs`` of its row:
      - greedy (temperature <= 0): move to the first child whose token is the first argmax
        of the raw logits; if none, emit that argmax;
      - q None (deterministic candidates): p' = p_u; for each child c in order
        accept x_c with probability p'(x_c) (u_c < p'(x_c)); on rejection p' <- p' with
        x_c zeroed, renormalised (a duplicate of a rejected sibling has p'(x) = 0);
      - q given (children of u i.i.d. from q_u): multi-step speculative sampling
        (Miao et al. 2024, "SpecInfer", Algorithm 2, Theorem 4.2). p' = p_u; for each child c
        in order accept x_c with probability min(1, p'(x_c) / q_u(x_c)), i.e. iff
        u_c * q_u(x_c) < p'(x_c); on rejection p' <- max(p' - q_u, 0), renormalised;
      - on acceptance move to c; when every child of u is rejected (or u has none) emit a
        sample of the final p'. If a residual sums to 0, p' is kept unchanged: exactly
        that needs p' <= q_u everywhere, i.e. p' == q_u, where every x with q_u(x) > 0 is
        accepted, so it is reached only through rounding (or a child with q_u(x_c) = 0).
    Uniforms (``philox.py``): u_c = Philox stream 2, draw c (node index); the emitted
    sample from tree row r uses stream 3, draw r, by inverse CDF (``sample_inverse_cdf``).

    Why the sampled rule is exact (the proof of SpecInfer's Theorem 4.2): let r be the
    current p' and x_1..x_k the untried children, i.i.d. from q and independent of the
    uniforms and of the earlier siblings. Claim: the token leaving u has law r. k = 0: it is
    a sample of r. k >= 1: x_1 = x is accepted with probability q(x) min(1, r(x)/q(x)) =
    min(q, r)(x); it is rejected with probability beta = sum_x max(r - q, 0)(x) (as
    sum min(q, r) + sum max(r - q, 0) = sum r = 1), and then — x_2..x_k still i.i.d. q,
    because they are independent of (x_1, u_1) — by induction the token has law
    max(r - q, 0) / beta. In all: min(q, r) + max(r - q, 0) = r. With r = p_u the token
    leaving the root has the target law; given that the accepted child c carries it, c's
    own children are i.i.d. from q_c independently of everything used so far, so the
    same argument at c gives the next token law p_c, and so on down the path (the bonus
    token after a leaf is a plain sample of p_leaf). The deterministic rule is the same
    argument with q = the point mass at x_c (min(q, r) = r(x_c) at x_c); it holds for
    any candidates chosen independently of the sampler's uniforms, so q=None
    is exact whatever the drafter did — q only raises the acceptance rate, and
    is exact only under the contract below.

    What a drafter must do for q to be right: draw the children of each
    position u i.i.d. (with replacement, duplicates kept) from exactly q_u = row u of q,
    with fresh randomness per position (never Philox streams 0..15 of the
    sequence's (seed, offset)). The number of children of u, and q_u itself, may depend
    on anything outside u's own subtree (a fixed branching, a budget split by the
    ancestors' draft scores), never on the tokens drawn for u's children. Children drawn
    without replacement (Sequoia), de-duplicated, or top-b (EAGLE) break this rule: the
    first two need Jeon et al. 2024's recursive rejection sampling (q renormalised after
    each rejection), not provided here; for any of them pass q=None.

    Bad values (flagged with n_accepted = -1 and all -1 outputs when check_finite=False,
    a ValueError naming the sequences otherwise): NaN / +inf / an all -inf row among the
    rows the walk reads (rows off the accepted path are never read), token ids outside
    [0, V), parents outside [-1, i), trees deeper than max_depth, N_b outside [0, 64].

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
    if check_finite:
        check_tree_layout(cu_num_nodes, draft_token_ids, parents, max_depth, vocab)
    dev = target_logits.device
    m, d_max = MAX_TREE_NODES, max_depth
    n_rows = target_logits.shape[0]
    b_idx = torch.arange(batch, device=dev)
    j = torch.arange(m, device=dev)
    # -- ragged nodes -> [B, M] tables; bad trees are flagged and never walked --
    tok, n, start, layout_ok = tree_table(cu_num_nodes, draft_token_ids, 0)  # [B, M]
    par, _, _, _ = tree_table(cu_num_nodes, parents, -1)  # [B, M]
    valid = j[None, :] < n[:, None]  # [B, M]
    par_ok = (par >= -1) & (par < j[None, :])
    depth = tree_depths(torch.where(par_ok, par, -1))
    bad = ~layout_ok | (valid & ((tok < 0) | (tok >= vocab) | ~par_ok | (depth > d_max))).any(1)
    tok = tok.clamp(0, vocab - 1)
    root_row = start + b_idx  # [B] the row of each sequence's root
    u_accept = philox_uniform(seeds, offsets, m, TREE_ACCEPT_STREAM)  # [B, M]
    u_emit = philox_uniform(seeds, offsets, m + 1, TREE_SAMPLE_STREAM)  # [B, M + 1]
    greedy = temperature <= 0  # [B]
    # -- the walk, one tree level per step, all sequences together --
    node = torch.full((batch,), -1, dtype=torch.int64, device=dev)  # current position
    n_acc = torch.zeros(batch, dtype=torch.int64, device=dev)
    path = torch.full((batch, d_max), -1, dtype=torch.int64, device=dev)
    token = torch.full((batch,), -1, dtype=torch.int64, device=dev)
    running = ~bad
    q_probs = draft_dist_probs(q) if q is not None else None  # [rows, V] q of every row
    for level in range(d_max + 1):
        row = (root_row + 1 + node).clamp(0, n_rows - 1)  # [B] tree row of the position
        raw = target_logits[row].float()  # [B, V]
        row_bad = raw.isnan().any(-1) | raw.isposinf().any(-1) | raw.isneginf().all(-1)
        bad |= running & row_bad
        running &= ~row_bad
        p = sampling_probs(raw, temperature, top_k, top_p)  # [B, V] p_u
        argmax = raw.argmax(-1)  # [B] first argmax (greedy)
        q_u = q_probs[row] if q_probs is not None else None  # [B, V] q_u
        is_child = valid & (par == node[:, None])  # [B, M]
        chosen = torch.full((batch,), -1, dtype=torch.int64, device=dev)
        p_cur = p  # p': the target less what the rejected siblings took
        for c in range(min(m, draft_token_ids.shape[0])):  # children in node order
            trying = running & (chosen < 0) & is_child[:, c]  # [B]
            if not bool(trying.any()):  # a host sync per node: fine on the CPU path
                continue
            x = tok[:, c]  # [B]
            p_x = p_cur.gather(1, x[:, None])[:, 0]
            q_x = q_u.gather(1, x[:, None])[:, 0] if q_u is not None else torch.ones_like(p_x)
            accept = torch.where(greedy, x == argmax, u_accept[:, c] * q_x < p_x)
            chosen = torch.where(trying & accept, c, chosen)
            p_cur = torch.where((trying & ~accept)[:, None], _sibling_residual(p_cur, q_u, x), p_cur)
        # -- every child rejected (or none): emit a sample of p' (greedy: the argmax) --
        stop = running & (chosen < 0)
        u = u_emit.gather(1, (node + 1)[:, None])[:, 0]
        emitted = torch.where(greedy, argmax, sample_inverse_cdf(p_cur, u))
        token = torch.where(stop, emitted, token)
        advance = running & (chosen >= 0)
        if level < d_max:
            path[:, level] = torch.where(advance, chosen, -1)
        n_acc += advance.long()
        node = torch.where(advance, chosen, node)
        running = advance
    # -- assemble: path tokens, the emitted token, -1 padding; bad sequences all -1 --
    out = torch.full((batch, d_max + 1), -1, dtype=torch.int64, device=dev)
    out[:, :d_max] = torch.where(path >= 0, tok.gather(1, path.clamp(min=0)), -1)
    out[b_idx, n_acc] = token
    out = torch.where(bad[:, None], -1, out)
    path = torch.where(bad[:, None], -1, path)
    n_accepted = torch.where(bad, -1, n_acc).to(torch.int32)
    if check_finite:
        raise_if_flagged(n_accepted)
    return out, n_accepted, path.to(torch.int32)

