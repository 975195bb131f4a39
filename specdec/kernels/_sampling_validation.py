"""Argument checks shared by the samplers: the Triton launchers (rejection_sampling.py,
tree_sampling.py, draft_sampling.py) and their PyTorch references apply the same ones, so
both paths refuse the same inputs with the same messages.

Shape, dtype and device checks read no device memory; the ``*_layout`` checks copy the
ragged counts and ids to the host (the samplers' ``check_finite=True`` path).
"""

from __future__ import annotations

import torch

from ..tree import MAX_TREE_NODES
from ._sampling_core import DraftDist

LOGIT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def check_tensors(expected: dict, target_logits: torch.Tensor, sizes: str) -> None:
    """``expected``: name -> (tensor, dtype, shape); each must match and share the logits' device."""
    for name, (t, dtype, shape) in expected.items():
        if tuple(t.shape) != shape:
            raise ValueError(f"{name} must have shape {shape} ({sizes}), got {tuple(t.shape)}")
        if t.dtype != dtype:
            raise ValueError(f"{name} must be {dtype}, got {t.dtype}")
        if t.device != target_logits.device:
            raise ValueError(
                f"{name} is on {t.device} but target_logits is on {target_logits.device}")


def _check_ragged(target_logits, draft_token_ids, cu, cu_name: str, count: str) -> tuple[int, int, int, int]:
    """The layout checks both samplers share: logits [rows, V] of a logit dtype, ``cu``
    [B + 1], draft ids 1-D. Returns (rows, V, B, number of drafts)."""
    if target_logits.dim() != 2 or target_logits.shape[1] < 1:
        raise ValueError(
            f"target_logits must be [rows, V] with V >= 1, got {tuple(target_logits.shape)}")
    if target_logits.dtype not in LOGIT_DTYPES:
        raise ValueError(
            f"target_logits must be float32, float16 or bfloat16, got {target_logits.dtype}")
    if cu.dim() != 1 or cu.shape[0] < 1:
        raise ValueError(f"{cu_name} must be [B + 1], got {tuple(cu.shape)}")
    if draft_token_ids.dim() != 1:
        raise ValueError(
            f"draft_token_ids must be 1-D [sum {count}], got {tuple(draft_token_ids.shape)}")
    rows, vocab = target_logits.shape
    return rows, vocab, cu.shape[0] - 1, draft_token_ids.shape[0]


def check_draft_dist(q, rows: int, vocab: int, target_logits: torch.Tensor) -> None:
    """``q``: None or a DraftDist of ``rows`` rows over ``vocab`` tokens on the logits'
    device: logits [rows, V] of a logit dtype with stride(1) == 1, inv_t / m / z [rows]
    float32, thr [rows] int32."""
    if q is None:
        return
    if not isinstance(q, DraftDist):
        raise TypeError(f"the draft distribution must be a DraftDist or None, got "
                        f"{type(q).__name__} (build one with reference.draft_dist or the "
                        f"backend's draft_sample)")
    if q.logits.dtype not in LOGIT_DTYPES:
        raise ValueError(f"q.logits must be float32, float16 or bfloat16, got {q.logits.dtype}")
    if q.logits.dim() == 2 and q.logits.shape[1] > 1 and q.logits.stride(1) != 1:
        raise ValueError(f"q.logits must have stride 1 in its last dimension, got {q.logits.stride()}")
    check_tensors({
        "q.logits": (q.logits, q.logits.dtype, (rows, vocab)),
        "q.inv_t": (q.inv_t, torch.float32, (rows,)),
        "q.m": (q.m, torch.float32, (rows,)),
        "q.z": (q.z, torch.float32, (rows,)),
        "q.thr": (q.thr, torch.int32, (rows,)),
    }, target_logits, f"{rows} draft rows, V={vocab}")


def per_sequence(batch: int, temperature, top_k, top_p, seeds, offsets) -> dict:
    """The per-sequence sampling tensors' expected dtype and shape, for ``check_tensors``."""
    return {
        "temperature": (temperature, torch.float32, (batch,)),
        "top_k": (top_k, torch.int32, (batch,)),
        "top_p": (top_p, torch.float32, (batch,)),
        "seeds": (seeds, torch.int64, (batch,)),
        "offsets": (offsets, torch.int64, (batch,)),
    }


def check_rejection_args(
    target_logits, draft_token_ids, q, cu_num_draft, max_num_draft,
    temperature, top_k, top_p, seeds, offsets, num_draft=None,
) -> tuple[int, int]:
    """Shape, dtype and device checks that need no device read. Returns (B, V)."""
    rows, vocab, batch, n_draft = _check_ragged(target_logits, draft_token_ids, cu_num_draft,
                                                "cu_num_draft", "n_b")
    expected = {
        "draft_token_ids": (draft_token_ids, torch.int64, (n_draft,)),
        "cu_num_draft": (cu_num_draft, torch.int32, (batch + 1,)),
        **per_sequence(batch, temperature, top_k, top_p, seeds, offsets),
    }
    if num_draft is not None:
        expected["num_draft"] = (num_draft, torch.int32, (batch,))
    check_tensors(expected, target_logits, f"B={batch}, sum n_b={n_draft}, V={vocab}")
    check_draft_dist(q, n_draft, vocab, target_logits)
    if rows != n_draft + batch:
        raise ValueError(f"target_logits has {rows} rows; {batch} sequences with {n_draft} drafts "
                         f"in all need sum (n_b + 1) = {n_draft + batch}")
    if not isinstance(max_num_draft, int) or max_num_draft < 0:
        raise ValueError(f"max_num_draft must be a host int >= 0, got {max_num_draft!r}")
    if n_draft > batch * max_num_draft:
        raise ValueError(f"{n_draft} drafts cannot fit {batch} sequences of at most "
                         f"max_num_draft={max_num_draft}")
    return batch, vocab


def _host_counts(cu_t: torch.Tensor, total: int, cu_name: str, counts: str, limit: int,
                 limit_text: str) -> torch.Tensor:
    """Copy cumulative counts to the host and check them: from 0 to ``total``, each count
    in [0, limit]. Returns the host int64 copy."""
    cu = cu_t.cpu().long()
    symbol = counts.split()[-1]  # n_b or N_b
    if cu[0] != 0 or cu[-1] != total:
        raise ValueError(f"{cu_name} must run from 0 to sum {symbol} = {total}, "
                         f"got {int(cu[0])} .. {int(cu[-1])}")
    n = cu[1:] - cu[:-1]
    wrong = ((n < 0) | (n > limit)).nonzero().flatten().tolist()
    if wrong:
        raise ValueError(f"{counts} must be in [0, {limit_text}]; "
                         f"sequence(s) {wrong} have {n[wrong].tolist()}")
    return cu


def check_draft_layout(cu_num_draft, draft_token_ids, max_num_draft: int, vocab: int) -> None:
    """Checks that read device values (one host copy): cu_num_draft and draft token ids."""
    cu = _host_counts(cu_num_draft, draft_token_ids.shape[0], "cu_num_draft", "draft counts n_b",
                      max_num_draft, f"max_num_draft={max_num_draft}")
    ids = draft_token_ids.cpu()
    out_of_range = ((ids < 0) | (ids >= vocab)).nonzero().flatten()
    if out_of_range.numel():
        seqs = torch.unique(torch.searchsorted(cu, out_of_range, right=True) - 1).tolist()
        raise ValueError(f"draft_token_ids of sequence(s) {seqs} lie outside [0, V={vocab})")


def raise_if_flagged(n_accepted: torch.Tensor) -> None:
    """Raise naming the sequences flagged with n_accepted = -1 (one host copy)."""
    flagged = (n_accepted < 0).nonzero().flatten().tolist()
    if flagged:
        raise ValueError(f"target_logits of sequence(s) {flagged} contain NaN or +inf, "
                         f"or a row that is all -inf")


def check_tree_args(
    target_logits, draft_token_ids, parents, q, cu_num_nodes, max_depth,
    temperature, top_k, top_p, seeds, offsets,
) -> tuple[int, int]:
    """Shape, dtype and device checks of ``tree_rejection_sample`` that read no device
    value. Returns (B, V)."""
    for name, t in (("target_logits", target_logits), ("draft_token_ids", draft_token_ids),
                    ("parents", parents), ("cu_num_nodes", cu_num_nodes),
                    ("temperature", temperature), ("top_k", top_k), ("top_p", top_p),
                    ("seeds", seeds), ("offsets", offsets)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    rows, vocab, batch, n_nodes = _check_ragged(target_logits, draft_token_ids, cu_num_nodes,
                                                "cu_num_nodes", "N_b")
    if rows != n_nodes + batch:
        raise ValueError(f"target_logits has {rows} rows; {batch} sequences with {n_nodes} nodes "
                         f"in all need sum (N_b + 1) = {n_nodes + batch}")
    expected = {
        "draft_token_ids": (draft_token_ids, torch.int64, (n_nodes,)),
        "parents": (parents, torch.int32, (n_nodes,)),
        "cu_num_nodes": (cu_num_nodes, torch.int32, (batch + 1,)),
        **per_sequence(batch, temperature, top_k, top_p, seeds, offsets),
    }
    check_tensors(expected, target_logits, f"B={batch}, sum N_b={n_nodes}, rows={rows}, V={vocab}")
    check_draft_dist(q, rows, vocab, target_logits)
    if (not isinstance(max_depth, int) or isinstance(max_depth, bool)
            or not 0 <= max_depth <= MAX_TREE_NODES):
        raise ValueError(f"max_depth must be a host int in [0, {MAX_TREE_NODES}], "
                         f"got {max_depth!r}")
    if n_nodes > batch * MAX_TREE_NODES:
        raise ValueError(f"{n_nodes} nodes cannot fit {batch} trees of at most "
                         f"{MAX_TREE_NODES} nodes")
    return batch, vocab


def tree_depths(par: torch.Tensor) -> torch.Tensor:
    """Depth of every node (children of the root have depth 1) by pointer jumping.

    par:     [B, M] int64 local parent index, -1 for a child of the root (and for padding);
             every entry must be < its own column index (checked by the callers)
    returns: [B, M] int64

    After step s, ``anc`` is the 2**s-th ancestor and ``depth`` the number of edges to it;
    six steps cover any depth <= 64.
    """
    anc = par.clone()
    depth = torch.ones_like(par)
    for _ in range(6):
        has = anc >= 0
        at = anc.clamp(min=0)
        depth = depth + torch.where(has, depth.gather(1, at), 0)
        anc = torch.where(has, anc.gather(1, at), -1)
    return depth


def tree_table(cu_num_nodes, values, fill):
    """Ragged per-node values -> [B, MAX_TREE_NODES] (``fill`` past N_b); sequences with
    a bad slice (N_b outside [0, 64], out of bounds) get N_b = 0.

    Returns (table [B, M], n [B] int64, start [B] int64, layout_ok [B] bool).
    """
    m, total = MAX_TREE_NODES, values.shape[0]
    start, end = cu_num_nodes[:-1].long(), cu_num_nodes[1:].long()
    n = end - start
    layout_ok = (start >= 0) & (n >= 0) & (n <= m) & (end <= total)
    n = torch.where(layout_ok, n, 0)
    start = torch.where(layout_ok, start, 0)
    j = torch.arange(m, device=values.device)
    flat = (start[:, None] + j[None, :]).clamp(max=max(total - 1, 0))  # [B, M]
    table = values[flat].long() if total else torch.zeros_like(flat)
    table = torch.where(j[None, :] < n[:, None], table, fill)
    return table, n, start, layout_ok


def check_tree_layout(cu_num_nodes, draft_token_ids, parents, max_depth: int,
                       vocab: int) -> None:
    """Checks that read device values (host copies): node counts, token ids, parents,
    depths. Raises ValueError naming the sequences."""
    cu = _host_counts(cu_num_nodes, draft_token_ids.shape[0], "cu_num_nodes", "node counts N_b",
                      MAX_TREE_NODES, str(MAX_TREE_NODES))
    tok, n, _, _ = tree_table(cu, draft_token_ids.cpu(), 0)
    par, _, _, _ = tree_table(cu, parents.cpu(), -1)
    j = torch.arange(MAX_TREE_NODES)
    seqs = ((tok < 0) | (tok >= vocab)).any(1).nonzero().flatten().tolist()
    if seqs:
        raise ValueError(f"draft_token_ids of sequence(s) {seqs} lie outside [0, V={vocab})")
    seqs = ((par < -1) | (par >= j)).any(1).nonzero().flatten().tolist()
    if seqs:
        raise ValueError(f"parents of sequence(s) {seqs} are not in [-1, i) for node i "
                         f"(nodes must be numbered in topological order)")
    depth = torch.where(j < n[:, None], tree_depths(par), 0)
    seqs = (depth > max_depth).any(1).nonzero().flatten().tolist()
    if seqs:
        raise ValueError(f"trees of sequence(s) {seqs} are deeper than max_depth={max_depth} "
                         f"(depths {depth[seqs].amax(1).tolist()})")

