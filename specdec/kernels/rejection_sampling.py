"""Speculative rejection sampling of chain drafts, with each row's vocabulary split across
programs (so batch 1 fills the GPU) and no probability tensor in memory.

Launches (R = sum_b (n_b + 1) target rows, C = V / CHUNK vocabulary chunks):

1. ``row_statistics`` (``_row_stats``): partials over (R x C) programs, one read of
   every row (max, sum-exp with one exp per element, first argmax, non-finite flag and,
   with top-k / top-p, each chunk's 64 largest keys); a merge per row gives m, the kept
   mass z, the threshold thr of top-k / top-p (from the candidates: no pass over the row;
   a radix-select fallback only for top_k > 64 or a top-p nucleus wider than the
   candidates), the argmax and the bad-row flag. A row's distribution is then
   p(v) = [key(x_v) >= thr] exp(x_v - m) / z,  x_v = logit_v * (1 / T).
2. ``_chain_accept_kernel`` over (B x C): every program of sequence b replays the ratio
   tests from the row statistics (accept x_i iff u_i q_i(x_i) < p_i(x_i), two scalar
   loads a draft; q from the draft's logits and its DraftDist numbers), finds the row
   the emitted token comes from, and sums its chunk of that row's residual
   max(p - q, 0) (point mass: p without the draft) and of p. Only that one row is read
   again, and only for sampled sequences.
3. ``_chain_emit_kernel`` over B: two-level inverse CDF with the sequence's Philox
   uniform u: the chunk where the running sum of chunk masses first exceeds u * total,
   then the token inside it (one chunk read); writes the output row.

The Philox draws and the rule are those of ``reference.rejection_sample`` (acceptance
uniform of draft i = stream 0 draw i, sample from row i = stream 1 draw i, inverse CDF
with the first running sum > u * total), so the tokens agree with the reference except
where u * total falls within rounding of a cumulative-sum boundary.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._row_stats import RowStats, row_statistics
from ._sampling_core import (
    DraftDist,
    cdf_block,
    p_at,
    p_weights,
    pick_chunk,
    radix_rounds_needed,
)
from ._sampling_validation import check_draft_layout, check_rejection_args, raise_if_flagged
from .philox import SAMPLER_ACCEPT_STREAM, SAMPLER_SAMPLE_STREAM

__all__ = ["rejection_sample"]

_ACCEPT_STREAM = tl.constexpr(SAMPLER_ACCEPT_STREAM << 24)  # stream field of the counter
_SAMPLE_STREAM = tl.constexpr(SAMPLER_SAMPLE_STREAM << 24)


@triton.jit
def _slice(b, cu_ptr, max_n, total):
    """Sequence b's drafts: (start, n, bad); n = 0 when the layout is bad (never read out
    of bounds)."""
    start = tl.load(cu_ptr + b).to(tl.int64)
    end = tl.load(cu_ptr + b + 1).to(tl.int64)
    n = end - start
    bad = (start < 0) | (n < 0) | (n > max_n) | (end > total)
    return tl.where(bad, 0, start), tl.where(bad, 0, n), bad


@triton.jit(do_not_specialize=["V", "n_draft", "k_max", "n_chunks"])
def _chain_accept_kernel(
    logits_ptr, stride_l, ids_ptr, cu_ptr, cap_ptr, temp_ptr, seed_ptr, offset_ptr,
    m_ptr, z_ptr, thr_ptr, arg_ptr, inv_t_ptr,
    ql_ptr, stride_q, q_inv_t_ptr, q_m_ptr, q_z_ptr, q_thr_ptr,
    state_ptr, chunk_w_ptr,
    V, n_draft, k_max, n_chunks,
    HAS_Q: tl.constexpr, HAS_CAP: tl.constexpr, CHUNK: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Program (sequence b, chunk c): the ratio tests, then chunk c of the emitted row.

    state[b] = (n_accepted or -1 for a bad sequence, drafts tested); chunk_w[b, c] =
    (residual mass, p mass) of the chunk in the emitting row (sampled sequences only).
    """
    b = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1)
    start, n, bad = _slice(b, cu_ptr, k_max, n_draft)
    if HAS_CAP:  # test only the first num_draft[b] drafts of the slice
        n = tl.minimum(n, tl.maximum(tl.load(cap_ptr + b).to(tl.int64), 0))
    greedy = tl.load(temp_ptr + b) <= 0.0
    kk = tl.arange(0, BLOCK_K)
    u_acc = tl.rand(tl.load(seed_ptr + b), (tl.load(offset_ptr + b) << 32) + _ACCEPT_STREAM + kk)
    n_acc = b * 0
    done = b < 0
    for i in range(0, n + 1):
        r = start + b + i
        drafted = i < n
        arg = tl.load(arg_ptr + r)  # -1: NaN / +inf / all -inf, seen by every row's partials
        x = tl.load(ids_ptr + start + i, mask=drafted, other=0)
        bad = bad | (arg < 0) | (drafted & ((x < 0) | (x >= V)))
        if ~(done | bad):
            if greedy:
                # -- greedy: accept while the draft is the argmax --
                if drafted & (x == arg):
                    n_acc += 1
                else:
                    done = b >= 0  # True
            else:
                # -- ratio test: accept x iff u * q(x) < p(x) (Leviathan et al. 2023) --
                p_x = p_at(logits_ptr + r * stride_l, x, drafted, tl.load(inv_t_ptr + r),
                           tl.load(m_ptr + r), tl.load(z_ptr + r), tl.load(thr_ptr + r))
                if HAS_Q:
                    d = start + i
                    q_x = p_at(ql_ptr + d * stride_q, x, drafted,
                               tl.load(q_inv_t_ptr + d, mask=drafted, other=1.0),
                               tl.load(q_m_ptr + d, mask=drafted, other=0.0),
                               tl.load(q_z_ptr + d, mask=drafted, other=1.0),
                               tl.load(q_thr_ptr + d, mask=drafted, other=0))
                else:
                    q_x = 1.0
                u = tl.sum(tl.where(kk == i, u_acc, 0.0))
                if drafted & (u * q_x < p_x):
                    n_acc += 1
                else:
                    done = b >= 0  # True
    if c == 0:
        tl.store(state_ptr + b * 2, tl.where(bad, -1, n_acc).to(tl.int32))
        tl.store(state_ptr + b * 2 + 1, n.to(tl.int32))
    if ~(bad | greedy):
        # -- chunk c of the emitting row: residual after a rejection, p for the bonus --
        r = start + b + n_acc
        idx = c * CHUNK + tl.arange(0, CHUNK)
        mask = idx < V
        p = p_weights(logits_ptr + r * stride_l, idx, mask, tl.load(inv_t_ptr + r), tl.load(m_ptr + r),
                      tl.load(z_ptr + r), tl.load(thr_ptr + r))
        w_r = 0.0
        if n_acc < n:
            d = start + n_acc
            if HAS_Q:
                q = p_weights(ql_ptr + d * stride_q, idx, mask, tl.load(q_inv_t_ptr + d), tl.load(q_m_ptr + d),
                              tl.load(q_z_ptr + d), tl.load(q_thr_ptr + d))
                w_r = tl.sum(tl.maximum(p - q, 0.0))
            else:
                w_r = tl.sum(tl.where(idx == tl.load(ids_ptr + d), 0.0, p))
        tl.store(chunk_w_ptr + (b * n_chunks + c) * 2, w_r)
        tl.store(chunk_w_ptr + (b * n_chunks + c) * 2 + 1, tl.sum(p))


@triton.jit(do_not_specialize=["V", "k_max", "n_chunks"])
def _chain_emit_kernel(
    logits_ptr, stride_l, ids_ptr, cu_ptr, temp_ptr, seed_ptr, offset_ptr,
    m_ptr, z_ptr, thr_ptr, arg_ptr, inv_t_ptr,
    ql_ptr, stride_q, q_inv_t_ptr, q_m_ptr, q_z_ptr, q_thr_ptr,
    state_ptr, chunk_w_ptr, out_ptr, stride_o, n_acc_ptr,
    V, k_max, n_chunks,
    HAS_Q: tl.constexpr, CHUNK: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Program b: the emitted token (argmax, or two-level inverse CDF) and the out row."""
    b = tl.program_id(0).to(tl.int64)
    start = tl.load(cu_ptr + b).to(tl.int64)
    n_acc = tl.load(state_ptr + b * 2).to(tl.int64)
    n = tl.load(state_ptr + b * 2 + 1).to(tl.int64)
    bad = n_acc < 0
    n_acc = tl.maximum(n_acc, 0)
    r = start + b + n_acc
    token = tl.load(arg_ptr + r, mask=~bad, other=-1).to(tl.int64)  # greedy: the argmax
    if ~bad & (tl.load(temp_ptr + b) > 0.0):
        cc = tl.arange(0, BLOCK_C)
        live = cc < n_chunks
        w_r = tl.load(chunk_w_ptr + (b * n_chunks + cc) * 2, mask=live, other=0.0)
        w_p = tl.load(chunk_w_ptr + (b * n_chunks + cc) * 2 + 1, mask=live, other=0.0)
        use_r = (n_acc < n) & (tl.sum(w_r) > 0.0)  # a residual of 0 falls back to p
        w = tl.where(use_r, w_r, w_p)
        kk = tl.arange(0, BLOCK_K)
        u_all = tl.rand(tl.load(seed_ptr + b), (tl.load(offset_ptr + b) << 32) + _SAMPLE_STREAM + kk)
        target = tl.sum(tl.where(kk == n_acc, u_all, 0.0)) * tl.sum(w)
        chunk, before = pick_chunk(w, cc, target)
        idx = chunk * CHUNK + tl.arange(0, CHUNK)
        mask = idx < V
        p = p_weights(logits_ptr + r * stride_l, idx, mask, tl.load(inv_t_ptr + r), tl.load(m_ptr + r),
                      tl.load(z_ptr + r), tl.load(thr_ptr + r))
        wv = p
        if use_r:
            d = start + n_acc
            if HAS_Q:
                q = p_weights(ql_ptr + d * stride_q, idx, mask, tl.load(q_inv_t_ptr + d), tl.load(q_m_ptr + d),
                              tl.load(q_z_ptr + d), tl.load(q_thr_ptr + d))
                wv = tl.maximum(p - q, 0.0)
            else:
                wv = tl.where(idx == tl.load(ids_ptr + d), 0.0, p)
        found, last, _ = cdf_block(wv, idx, before, target, tl.full((), -1, tl.int64),
                                   tl.full((CHUNK,), -1, tl.int32))
        token = tl.where(found < 0, tl.max(last).to(tl.int64), found)
    # -- out row: accepted drafts, the emitted token, -1 padding (all -1 when bad) --
    kk = tl.arange(0, BLOCK_K)
    drafts = tl.load(ids_ptr + start + kk, mask=kk < n_acc, other=-1)
    row = tl.where(kk < n_acc, drafts, tl.where(kk == n_acc, token, -1))
    tl.store(out_ptr + b * stride_o + kk, tl.where(bad, -1, row), mask=kk <= k_max)
    tl.store(n_acc_ptr + b, tl.where(bad, -1, n_acc).to(tl.int32))


def rejection_sample(
    target_logits: torch.Tensor,
    draft_token_ids: torch.Tensor,
    q: DraftDist | None,
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
    filtered: bool | None = None,
    radix_rounds: int | None = None,
    chunk: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Split-vocabulary rejection sampling; same arguments, results and errors as
    ``reference.rejection_sample`` (see its docstring for every tensor's shape and dtype).

    filtered:     host hint: False promises no top-k / top-p (no candidate keys kept); None
                  reads top_k / top_p (a sync on a GPU: pass ``SamplingTensors.filtered``)
    radix_rounds: host hint, radix-select rounds for rows the candidates cannot settle
                  (``radix_rounds_needed``; None reads top_k / top_p)
    chunk:        tokens per program (a power of two >= 64; default ``chunk_size(V)``)
    returns: out_tokens [B, max_num_draft + 1] int64, n_accepted [B] int32, as the
    reference; check_finite=False with both hints given makes no host copy.

    Example::

        >>> logits = torch.tensor([[0.0, 5.0, 0.0], [0.0, 0.0, 5.0]])
        >>> i32, i64 = torch.int32, torch.int64
        >>> rejection_sample(logits, torch.tensor([1]), None, torch.tensor([0, 1], dtype=i32), 1,
        ...                  torch.zeros(1), torch.zeros(1, dtype=i32), torch.ones(1),
        ...                  torch.zeros(1, dtype=i64), torch.zeros(1, dtype=i64))
        (tensor([[1, 2]]), tensor([1], dtype=torch.int32))
    """
    batch, vocab = check_rejection_args(target_logits, draft_token_ids, q, cu_num_draft, max_num_draft,
                                        temperature, top_k, top_p, seeds, offsets, num_draft)
    if chunk is not None and (chunk < 64 or chunk & (chunk - 1)):
        raise ValueError(f"chunk must be a power of two >= 64, got {chunk}")
    if check_finite:
        check_draft_layout(cu_num_draft, draft_token_ids, max_num_draft, vocab)
    dev = target_logits.device
    out, n_acc = _empty_outputs(batch, max_num_draft, dev)
    if batch == 0:
        return out, n_acc
    if filtered is None:
        filtered = dev.type != "cpu" or bool((((top_k > 0) & (top_k < vocab)) | (top_p < 1)).any())
    if filtered and radix_rounds is None:
        radix_rounds = radix_rounds_needed(top_k, top_p, vocab)
    logits = target_logits if target_logits.stride(1) == 1 else target_logits.contiguous()
    stats = row_statistics(logits, temperature, top_k, top_p, cu_num_draft, filtered=filtered,
                           radix_rounds=radix_rounds or 0, chunk=chunk)
    _launch_chain(logits, draft_token_ids, q, cu_num_draft, max_num_draft, num_draft, temperature,
                  seeds, offsets, stats, out, n_acc)
    if check_finite:
        raise_if_flagged(n_acc)
    return out, n_acc


def _launch_chain(logits, draft_token_ids, q, cu_num_draft, max_num_draft: int, num_draft,
                  temperature, seeds, offsets, stats: RowStats, out, n_acc) -> None:
    """Launches 2 (accept, B x C) and 3 (emit, B) from the row statistics, into out / n_acc."""
    batch, vocab, dev = out.shape[0], logits.shape[1], logits.device
    ids = draft_token_ids
    if ids.numel() == 0:
        ids = torch.zeros(1, dtype=torch.int64, device=dev)  # never read (every n_b = 0)
    has_q = q is not None and q.logits.shape[0] > 0
    if has_q:
        q_logits = q.logits
        q_fields = (q.inv_t, q.m, q.z, q.thr)
    else:  # never read (HAS_Q=False, or no draft rows)
        q_logits = logits
        q_fields = (stats.inv_t, stats.m, stats.z, stats.thr)
    state = torch.empty((batch, 2), dtype=torch.int32, device=dev)
    chunk_w = torch.empty((batch, stats.n_chunks, 2), dtype=torch.float32, device=dev)
    row = (stats.m, stats.z, stats.thr, stats.arg, stats.inv_t)
    block_k = triton.next_power_of_2(max_num_draft + 1)
    warps = 8 if stats.chunk >= 2048 else 4
    _chain_accept_kernel[(batch, stats.n_chunks)](
        logits, logits.stride(0), ids, cu_num_draft,
        num_draft if num_draft is not None else cu_num_draft, temperature, seeds, offsets,
        *row, q_logits, q_logits.stride(0), *q_fields, state, chunk_w,
        vocab, draft_token_ids.shape[0], max_num_draft, stats.n_chunks,
        HAS_Q=has_q, HAS_CAP=num_draft is not None, CHUNK=stats.chunk, BLOCK_K=block_k,
        num_warps=warps, maxnreg=128,  # without a cap ptxas spilled 4 B (fp32 logits, no q)
    )
    _chain_emit_kernel[(batch,)](
        logits, logits.stride(0), ids, cu_num_draft, temperature, seeds, offsets,
        *row, q_logits, q_logits.stride(0), *q_fields, state, chunk_w, out, out.stride(0), n_acc,
        vocab, max_num_draft, stats.n_chunks,
        HAS_Q=has_q, CHUNK=stats.chunk, BLOCK_K=block_k,
        BLOCK_C=triton.next_power_of_2(stats.n_chunks), num_warps=warps,
    )


def _empty_outputs(batch: int, max_num_draft: int, dev) -> tuple[torch.Tensor, torch.Tensor]:
    """out_tokens [B, k_max + 1] int64 and n_accepted [B] int32, uninitialised."""
    return (torch.empty((batch, max_num_draft + 1), dtype=torch.int64, device=dev),
            torch.empty((batch,), dtype=torch.int32, device=dev))
