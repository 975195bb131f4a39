"""Fused draft-token sampling: tokens and the DraftDist of each row from the draft's logits,
with no probability tensor in memory.

Launches (N rows, C = V / CHUNK chunks):

1. ``row_statistics`` (``_sampling_core``): one read of every row over (N x C) programs,
   then per row m, the kept mass z, the top-k / top-p threshold thr and the argmax: the
   row's DraftDist (what the samplers read q from).
2. ``_draft_chunk_kernel`` (N x C): each chunk's mass of q. An unfiltered row takes it
   from the partials, z_c exp(m_c - m) / z, without reading the chunk again.
3. ``_draft_emit_kernel`` (N): ``num_samples`` i.i.d. draws per row by two-level inverse
   CDF (the chunk, then the token inside it: one chunk read per draw), with the Philox
   uniform ``philox_uniform(seed, offset, stream, first_draw + s)`` of draw s: the same
   uniform and rule as ``reference.draft_sample``. Greedy rows emit their first argmax.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._row_stats import row_statistics
from ._sampling_core import (
    INT32_MIN,
    DraftDist,
    cdf_block,
    p_weights,
    pick_chunk,
    radix_rounds_needed,
)
from ._sampling_validation import LOGIT_DTYPES, check_tensors, per_sequence
from ._validation import require, require_tensor
from .philox import MAX_DRAWS, MAX_STREAM

__all__ = ["draft_sample"]

_INT32_MIN = tl.constexpr(INT32_MIN)


@triton.jit(do_not_specialize=["V", "n_chunks"])
def _draft_chunk_kernel(
    logits_ptr, stride_l, V, n_chunks, temp_ptr,
    m_ptr, z_ptr, thr_ptr, inv_t_ptr, part_m_ptr, part_z_ptr, chunk_w_ptr,
    CHUNK: tl.constexpr,
):
    """Program (row r, chunk c): chunk_w[r, c] = sum over the chunk of q(v)."""
    r = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1)
    if tl.load(temp_ptr + r) > 0.0:
        m = tl.load(m_ptr + r)
        z = tl.load(z_ptr + r)
        thr = tl.load(thr_ptr + r)
        if thr == _INT32_MIN:  # unfiltered: the partials hold the chunk's mass
            part_m = tl.load(part_m_ptr + r * n_chunks + c)
            mass = tl.where(part_m == float("-inf"), 0.0,
                            tl.load(part_z_ptr + r * n_chunks + c) * tl.exp(part_m - m)) / z
        else:
            idx = c * CHUNK + tl.arange(0, CHUNK)
            mass = tl.sum(p_weights(logits_ptr + r * stride_l, idx, idx < V, tl.load(inv_t_ptr + r),
                                    m, z, thr))
        tl.store(chunk_w_ptr + r * n_chunks + c, mass)


@triton.jit(do_not_specialize=["V", "n_chunks", "stream", "num_samples"])
def _draft_emit_kernel(
    logits_ptr, stride_l, V, n_chunks, temp_ptr, seed_ptr, offset_ptr, first_ptr, stream,
    m_ptr, z_ptr, thr_ptr, arg_ptr, inv_t_ptr, chunk_w_ptr, tokens_ptr, num_samples,
    HAS_FIRST: tl.constexpr, CHUNK: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Program r: num_samples tokens of row r (the argmax for a greedy row)."""
    r = tl.program_id(0).to(tl.int64)
    arg = tl.load(arg_ptr + r).to(tl.int64)
    if tl.load(temp_ptr + r) > 0.0:
        cc = tl.arange(0, BLOCK_C)
        w = tl.load(chunk_w_ptr + r * n_chunks + cc, mask=cc < n_chunks, other=0.0)
        total = tl.sum(w)
        inv_t = tl.load(inv_t_ptr + r)
        m = tl.load(m_ptr + r)
        z = tl.load(z_ptr + r)
        thr = tl.load(thr_ptr + r)
        seed = tl.load(seed_ptr + r)
        base = (tl.load(offset_ptr + r) << 32) + (stream.to(tl.int64) << 24)
        if HAS_FIRST:
            base += tl.load(first_ptr + r)
        for s in range(0, num_samples):
            target = tl.rand(seed, base + s) * total
            chunk, before = pick_chunk(w, cc, target)
            idx = chunk * CHUNK + tl.arange(0, CHUNK)
            p = p_weights(logits_ptr + r * stride_l, idx, idx < V, inv_t, m, z, thr)
            found, last, _ = cdf_block(p, idx, before, target, tl.full((), -1, tl.int64),
                                       tl.full((CHUNK,), -1, tl.int32))
            tl.store(tokens_ptr + r * num_samples + s,
                     tl.where(found < 0, tl.max(last).to(tl.int64), found))
    else:
        for s in range(0, num_samples):
            tl.store(tokens_ptr + r * num_samples + s, arg)


def _check_args(logits, temperature, top_k, top_p, seeds, offsets, stream, num_samples,
                first_draw) -> None:
    require_tensor("logits", logits)
    require(logits.dim() == 2 and logits.shape[1] >= 1,
            f"logits must be [N, V] with V >= 1, got {tuple(logits.shape)}")
    require(logits.dtype in LOGIT_DTYPES,
            f"logits must be float32, float16 or bfloat16, got {logits.dtype}")
    n = logits.shape[0]
    expected = per_sequence(n, temperature, top_k, top_p, seeds, offsets)
    if first_draw is not None:
        expected["first_draw"] = (first_draw, torch.int64, (n,))
    check_tensors(expected, logits, f"N={n}")
    require(isinstance(stream, int) and 0 <= stream < MAX_STREAM,
            f"stream must be an int in [0, {MAX_STREAM}), got {stream!r}")
    require(isinstance(num_samples, int) and 1 <= num_samples <= MAX_DRAWS,
            f"num_samples must be an int in [1, {MAX_DRAWS}], got {num_samples!r}")


def draft_sample(
    logits: torch.Tensor,
    temperature: torch.Tensor,
    top_k: torch.Tensor,
    top_p: torch.Tensor,
    seeds: torch.Tensor,
    offsets: torch.Tensor,
    stream: int,
    num_samples: int = 1,
    first_draw: torch.Tensor | None = None,
    *,
    filtered: bool | None = None,
    all_greedy: bool | None = None,
    radix_rounds: int | None = None,
    chunk: int | None = None,
) -> tuple[torch.Tensor, DraftDist]:
    """Draw ``num_samples`` i.i.d. tokens per row from its processed distribution; same
    arguments and results as ``reference.draft_sample``.

    logits:      [N, V] float32/float16/bfloat16 draft logits (kept, not copied, in the
                 returned DraftDist when stride(1) == 1)
    temperature: [N] float32 (<= 0: greedy), top_k [N] int32, top_p [N] float32
    seeds, offsets: [N] int64; stream: Philox stream; first_draw: [N] int64 or None (0)
    filtered, radix_rounds: host hints as in ``rejection_sample`` (None reads top_k /
                 top_p); all_greedy is accepted for the reference's interface (the
                 kernel needs no hint: greedy rows take the argmax)
    returns:     tokens [N, num_samples] int64, DraftDist of the N rows
    """
    _check_args(logits, temperature, top_k, top_p, seeds, offsets, stream, num_samples, first_draw)
    n, vocab = logits.shape
    dev = logits.device
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    if filtered is None:
        filtered = dev.type != "cpu" or bool((((top_k > 0) & (top_k < vocab)) | (top_p < 1)).any())
    if filtered and radix_rounds is None:
        radix_rounds = radix_rounds_needed(top_k, top_p, vocab)
    stats = row_statistics(logits, temperature, top_k, top_p, None, filtered=filtered,
                           radix_rounds=radix_rounds or 0, chunk=chunk)
    tokens = torch.empty((n, num_samples), dtype=torch.int64, device=dev)
    if n:
        chunk_w = torch.empty((n, stats.n_chunks), dtype=torch.float32, device=dev)
        warps = 8 if stats.chunk >= 2048 else 4
        _draft_chunk_kernel[(n, stats.n_chunks)](
            logits, logits.stride(0), vocab, stats.n_chunks, temperature,
            stats.m, stats.z, stats.thr, stats.inv_t, stats.part_m, stats.part_z, chunk_w,
            CHUNK=stats.chunk, num_warps=warps,
        )
        _draft_emit_kernel[(n,)](
            logits, logits.stride(0), vocab, stats.n_chunks, temperature, seeds, offsets,
            first_draw if first_draw is not None else seeds, stream,
            stats.m, stats.z, stats.thr, stats.arg, stats.inv_t, chunk_w, tokens, num_samples,
            HAS_FIRST=first_draw is not None, CHUNK=stats.chunk,
            BLOCK_C=triton.next_power_of_2(stats.n_chunks), num_warps=warps,
        )
    return tokens, DraftDist(logits, stats.inv_t, stats.m, stats.z, stats.thr)
