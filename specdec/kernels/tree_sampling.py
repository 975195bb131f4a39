"""Tree verification (SpecInfer multi-step speculative sampling) with the vocabulary split
across programs. The rule is in
``reference/tree_sampling.py``, its proof and the contract a drafter must meet in
docs/proofs.md; this file computes the same thing in three launches (plus the radix rounds
of rows the candidates cannot settle). Kernels: ``_tree_row_kernels.py`` (launches 1, 2)
and ``_tree_walk_kernel.py`` (launch 3); this file holds the launcher.

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
   (``_radix.radix_select``: per round an 8-bit digit histogram of the key over
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

from typing import NamedTuple

import torch
import triton

from ..tree import MAX_TREE_NODES
from ._radix import radix_select
from ._sampling_core import DraftDist, radix_rounds_needed
from ._sampling_validation import check_tree_args, check_tree_layout, raise_if_flagged
from ._tree_row_kernels import _tree_partials_kernel, _tree_rows_kernel
from ._tree_walk_kernel import _tree_walk_kernel

__all__ = ["tree_rejection_sample", "CHUNK", "CANDIDATES"]

CHUNK = 4096  # tokens per program of the partials kernel (and per block of a dense pass)
CANDIDATES = 64  # largest tokens kept per chunk: top_k <= 64 needs no pass over the row


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
    tensor's shape and dtype).

    chunk: tokens per program of the partials launch (a power of two >= 16; rows of V
    tokens get cdiv(V, chunk) programs; tests split small vocabularies with small chunks).
    radix_rounds: host hint, radix-select rounds for rows the candidates cannot settle
    (top_k > 64, top-p alone with a nucleus wider than the candidates): the engine's
    ``SamplingTensors.radix_rounds``; None reads top_k / top_p (``radix_rounds_needed``).
    returns: out_tokens [B, max_depth + 1] int64, n_accepted [B] int32, accepted_nodes
    [B, max_depth] int32, as the reference; check_finite=False makes no host copy.

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
    block_v = min(chunk, triton.next_power_of_2(vocab))
    rs = _row_stats(logits, cu_num_nodes, temperature, top_k, top_p, block_v, radix_rounds)
    _launch_walk(logits, draft_token_ids, parents, q, cu_num_nodes, max_depth, temperature,
                 seeds, offsets, rs, block_v, out, n_acc, path)
    if check_finite:
        raise_if_flagged(n_acc)
    return out, n_acc, path[:, :max_depth]


class _TreeRows(NamedTuple):
    """Per-row results of launches 1 and 2 (and the radix rounds) the walk reads."""

    stats: torch.Tensor  # [R, C, 3] float32 chunk partials
    m: torch.Tensor  # [R] float32
    z: torch.Tensor  # [R] float32 kept mass
    thr: torch.Tensor  # [R] int32
    row_i: torch.Tensor  # [R, 3] int32 (sparse, first argmax, bad)
    entries: torch.Tensor  # [R, CAND] int64 packed (key, id) candidate entries
    n_chunks: int
    cand: int


def _row_stats(logits, cu_num_nodes, temperature, top_k, top_p, block_v: int,
               radix_rounds: int | None) -> _TreeRows:
    """Launches 1 (partials, rows x chunks) and 2 (per-row merge), then the radix rounds
    of the rows the candidates cannot settle."""
    (rows, vocab), batch, dev = logits.shape, temperature.shape[0], logits.device
    n_chunks = triton.cdiv(vocab, block_v)
    cand = min(CANDIDATES, block_v)
    f32, i32 = torch.float32, torch.int32
    # -- scratch: per (row, chunk) partials and candidates (~n_rows * n_chunks * 0.5 KiB) --
    stats = torch.empty((rows, n_chunks, 3), dtype=f32, device=dev)
    arg = torch.empty((rows, n_chunks, 2), dtype=i32, device=dev)
    cands = torch.empty((rows, n_chunks, cand), dtype=torch.int64, device=dev)
    n_ge = torch.empty((rows, n_chunks), dtype=i32, device=dev)
    m, z, inv_t = (torch.empty((rows,), dtype=f32, device=dev) for _ in range(3))
    thr = torch.empty((rows,), dtype=i32, device=dev)
    row_i = torch.empty((rows, 3), dtype=i32, device=dev)
    entries = torch.empty((rows, cand), dtype=torch.int64, device=dev)
    rad_i = torch.empty((rows, 4), dtype=i32, device=dev)
    rad_f = torch.empty((rows, 2), dtype=f32, device=dev)
    _tree_partials_kernel[(rows, n_chunks)](
        logits, logits.stride(0), cu_num_nodes, temperature, top_k, top_p,
        stats, arg, cands, n_ge, vocab, batch,
        BLOCK_V=block_v, CAND=cand, num_warps=8 if block_v >= 2048 else 4,
    )
    _tree_rows_kernel[(rows,)](
        cu_num_nodes, temperature, top_k, top_p, stats, arg, cands, n_ge,
        m, z, thr, inv_t, row_i, entries, rad_i, rad_f,
        vocab, batch, n_chunks, BLOCK_C=triton.next_power_of_2(n_chunks), CAND=cand,
        num_warps=8 if block_v >= 2048 else 4,
    )
    # -- rows the candidates cannot settle: exact thr / Z_kept by the shared radix select --
    if radix_rounds is None:
        radix_rounds = radix_rounds_needed(top_k, top_p, vocab, cand)
    radix_select(logits, block_v, m, z, thr, inv_t, rad_i, rad_f, top_p, cu_num_nodes, radix_rounds)
    return _TreeRows(stats, m, z, thr, row_i, entries, n_chunks, cand)


def _launch_walk(logits, draft_token_ids, parents, q, cu_num_nodes, max_depth: int, temperature,
                 seeds, offsets, rs: _TreeRows, block_v: int, out, n_acc, path) -> None:
    """Launch 3: the walk, one program per sequence, into out / n_acc / path."""
    dev, vocab = logits.device, logits.shape[1]
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
    _tree_walk_kernel[(out.shape[0],)](
        logits, logits.stride(0), ids, par, cu_num_nodes,
        temperature, seeds, offsets,
        rs.stats, rs.m, rs.z, rs.thr, rs.row_i, rs.entries, *q_args,
        out, out.stride(0), n_acc, path, path.stride(0),
        vocab, draft_token_ids.shape[0], max_depth, rs.n_chunks,
        HAS_Q=q is not None, BLOCK_V=block_v,
        BLOCK_C=triton.next_power_of_2(rs.n_chunks), CAND=rs.cand, BLOCK_N=MAX_TREE_NODES,
        BLOCK_D=triton.next_power_of_2(max_depth + 1),
        BLOCK_W=min(block_v, 1024),  # the walk's rare passes: few registers a lane
        # one program a sequence, mostly scalar work and [64 x 64] tables: 4 warps, no
        # software pipelining of the rare passes, and all 255 registers (ptxas would
        # otherwise aim at 3 CTAs an SM and spill on sm_80): no spills on sm_90 / sm_80
        num_warps=4, num_stages=1, maxnreg=255,
    )
