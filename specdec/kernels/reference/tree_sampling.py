"""Speculative verification of draft trees in PyTorch (SpecInfer's multi-step speculative
sampling): the oracle of ``tree_sampling.py`` and the CPU backend's tree sampler.

Sequence b has N_b <= 64 draft nodes numbered 0..N_b-1 in topological order (a parent's
index is below its children's); the children of a position are tried in increasing node
index (a breadth-first numbering makes siblings contiguous; not required). Tree row 0 of a
sequence is its root (the last committed token), tree row 1 + i is node i; a sequence's
rows start at cu_num_nodes[b] + b.

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
    sample of the final p' (kept unchanged where a residual sums to 0).
Uniforms (``philox.py``): u_c = Philox stream 2, draw c (node index); the emitted
sample from tree row r uses stream 3, draw r, by inverse CDF (``sample_inverse_cdf``).

Why this is exact, and what a drafter must do for its q to be right (children of u drawn
i.i.d. from q_u with fresh randomness, never Philox streams 0..15; else pass q=None):
docs/proofs.md.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from ...tree import MAX_TREE_NODES
from .._sampling_core import DraftDist
from .._sampling_validation import check_tree_args, check_tree_layout, raise_if_flagged, tree_depths, tree_table
from ..philox import TREE_ACCEPT_STREAM, TREE_SAMPLE_STREAM, philox_uniform, sample_inverse_cdf
from .sampling import bad_rows, draft_dist_probs, sampling_probs

__all__ = ["tree_rejection_sample"]


class _Trees(NamedTuple):
    """The ragged trees as [B, M] tables (M = MAX_TREE_NODES); bad trees are flagged."""

    tok: torch.Tensor  # [B, M] int64 token of node j, clamped into [0, V)
    par: torch.Tensor  # [B, M] int64 parent of node j (-1: the root; -1 past N_b)
    valid: torch.Tensor  # [B, M] bool, j < N_b
    root_row: torch.Tensor  # [B] int64 the row of each sequence's root
    bad: torch.Tensor  # [B] bool: bad layout, token id, parent or depth


def _trees(cu_num_nodes, draft_token_ids, parents, max_depth: int, vocab: int) -> _Trees:
    j = torch.arange(MAX_TREE_NODES, device=draft_token_ids.device)
    tok, n, start, layout_ok = tree_table(cu_num_nodes, draft_token_ids, 0)  # [B, M]
    par, _, _, _ = tree_table(cu_num_nodes, parents, -1)  # [B, M]
    valid = j[None, :] < n[:, None]  # [B, M]
    par_ok = (par >= -1) & (par < j[None, :])
    depth = tree_depths(torch.where(par_ok, par, -1))
    bad = ~layout_ok | (valid & ((tok < 0) | (tok >= vocab) | ~par_ok | (depth > max_depth))).any(1)
    root_row = start + torch.arange(start.shape[0], device=start.device)
    return _Trees(tok.clamp(0, vocab - 1), par, valid, root_row, bad)


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


def _try_children(trees: _Trees, node, running, p, argmax, q_u, greedy, u_accept, n_nodes: int):
    """The children of each sequence's position ``node`` ([B] int64, -1: root), in order.

    p: [B, V] p_u; argmax: [B]; q_u: [B, V] or None; u_accept: [B, M]
    returns: chosen [B] int64 (the accepted child, -1: none), p' [B, V] after the rejections
    """
    chosen = torch.full_like(node, -1)
    is_child = trees.valid & (trees.par == node[:, None])  # [B, M]
    p_cur = p  # p': the target less what the rejected siblings took
    for c in range(min(MAX_TREE_NODES, n_nodes)):  # children in node order
        trying = running & (chosen < 0) & is_child[:, c]  # [B]
        if not bool(trying.any()):  # a host sync per node: fine on the CPU path
            continue
        x = trees.tok[:, c]  # [B]
        p_x = p_cur.gather(1, x[:, None])[:, 0]
        q_x = q_u.gather(1, x[:, None])[:, 0] if q_u is not None else torch.ones_like(p_x)
        accept = torch.where(greedy, x == argmax, u_accept[:, c] * q_x < p_x)
        chosen = torch.where(trying & accept, c, chosen)
        p_cur = torch.where((trying & ~accept)[:, None], _sibling_residual(p_cur, q_u, x), p_cur)
    return chosen, p_cur


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
    """Speculative verification of draft trees for a ragged batch (SpecInfer; the rule is
    in the module docstring).

    target_logits:   [sum_b (N_b + 1), V] float32/float16/bfloat16, target logits of every
                     tree row; row r scores the children of tree position r
    draft_token_ids: [sum_b N_b] int64, the token of each node
    parents:         [sum_b N_b] int32, parent node index within the sequence, -1 for the
                     children of the root
    q:               DraftDist of sum_b (N_b + 1) rows in target_logits' layout: row r is
                     the distribution q_r the children of tree position r were drawn from
                     (childless positions' rows are not read), or None: deterministic
                     candidates (top-b of a drafter, n-gram continuations)
    cu_num_nodes:    [B + 1] int32 cumulative node counts; N_b may be 0
    max_depth:       host int D in [0, 64] >= every tree's depth (the root's children: 1)
    temperature, top_k, top_p, seeds, offsets, check_finite: as in ``rejection_sample``;
    radix_rounds: the kernel's hint, ignored here
    returns:         out_tokens [B, D + 1] int64 (the accepted path's tokens, one emitted
                     token, then -1), n_accepted [B] int32 (path length), accepted_nodes
                     [B, D] int32 (node indices of the accepted path, root to leaf, then -1)

    Bad values (check_finite=False: n_accepted = -1, all -1 outputs; else a ValueError
    naming the sequences): NaN / +inf / an all -inf row among the rows the walk reads,
    token ids outside [0, V), parents outside [-1, i), depth > max_depth, N_b outside [0, 64].

    Example::

        >>> logits = torch.tensor([[0.0, 5.0, 0.0], [0.0, 0.0, 9.0], [0.0, 0.0, 5.0]])
        >>> i32, i64 = torch.int32, torch.int64
        >>> tree_rejection_sample(logits, torch.tensor([2, 1]), torch.tensor([-1, -1], dtype=i32),
        ...                       None, torch.tensor([0, 2], dtype=i32), 1, torch.zeros(1),
        ...                       torch.zeros(1, dtype=i32), torch.ones(1),
        ...                       torch.zeros(1, dtype=i64), torch.zeros(1, dtype=i64))
        (tensor([[1, 2]]), tensor([1], dtype=torch.int32), tensor([[1]], dtype=torch.int32))
    """
    batch, vocab = check_tree_args(target_logits, draft_token_ids, parents, q, cu_num_nodes, max_depth,
                                   temperature, top_k, top_p, seeds, offsets)
    if check_finite:
        check_tree_layout(cu_num_nodes, draft_token_ids, parents, max_depth, vocab)
    trees = _trees(cu_num_nodes, draft_token_ids, parents, max_depth, vocab)
    out, n_accepted, path = _walk(target_logits, trees, q, draft_token_ids.shape[0], max_depth,
                                  temperature, top_k, top_p, seeds, offsets)
    if check_finite:
        raise_if_flagged(n_accepted)
    return out, n_accepted, path


def _walk(target_logits, trees: _Trees, q, n_nodes: int, d_max: int, temperature, top_k, top_p,
          seeds, offsets):
    """The walk, one tree level per step, all sequences together; see the module docstring."""
    batch, dev, n_rows = trees.bad.shape[0], target_logits.device, target_logits.shape[0]
    u_accept = philox_uniform(seeds, offsets, MAX_TREE_NODES, TREE_ACCEPT_STREAM)  # [B, M]
    u_emit = philox_uniform(seeds, offsets, MAX_TREE_NODES + 1, TREE_SAMPLE_STREAM)  # [B, M + 1]
    greedy = temperature <= 0  # [B]
    node = torch.full((batch,), -1, dtype=torch.int64, device=dev)  # current position
    n_acc = torch.zeros(batch, dtype=torch.int64, device=dev)
    path = torch.full((batch, d_max), -1, dtype=torch.int64, device=dev)
    token = torch.full((batch,), -1, dtype=torch.int64, device=dev)
    bad = trees.bad.clone()
    running = ~bad
    q_probs = draft_dist_probs(q) if q is not None else None  # [rows, V] q of every row
    for level in range(d_max + 1):
        row = (trees.root_row + 1 + node).clamp(0, n_rows - 1)  # [B] tree row of the position
        raw = target_logits[row].float()  # [B, V]
        row_bad = bad_rows(raw)
        bad |= running & row_bad
        running &= ~row_bad
        argmax = raw.argmax(-1)  # [B] first argmax (greedy)
        q_u = q_probs[row] if q_probs is not None else None  # [B, V] q_u
        chosen, p_cur = _try_children(trees, node, running, sampling_probs(raw, temperature, top_k, top_p),
                                      argmax, q_u, greedy, u_accept, n_nodes)
        # -- every child rejected (or none): emit a sample of p' (greedy: the argmax) --
        u = u_emit.gather(1, (node + 1)[:, None])[:, 0]
        emitted = torch.where(greedy, argmax, sample_inverse_cdf(p_cur, u))
        token = torch.where(running & (chosen < 0), emitted, token)
        advance = running & (chosen >= 0)
        if level < d_max:
            path[:, level] = torch.where(advance, chosen, -1)
        n_acc += advance.long()
        node = torch.where(advance, chosen, node)
        running = advance
    # -- assemble: path tokens, the emitted token, -1 padding; bad sequences all -1 --
    out = torch.full((batch, d_max + 1), -1, dtype=torch.int64, device=dev)
    out[:, :d_max] = torch.where(path >= 0, trees.tok.gather(1, path.clamp(min=0)), -1)
    out[torch.arange(batch, device=dev), n_acc] = token
    out = torch.where(bad[:, None], -1, out)
    path = torch.where(bad[:, None], -1, path)
    return out, torch.where(bad, -1, n_acc).to(torch.int32), path.to(torch.int32)
