"""Pieces shared by the sampling kernels, the draft sampler and their PyTorch references.

The draft distribution q handed from a drafter to the samplers is never materialised as an
[n, V] float32 tensor on the GPU path: it is the draft's logits plus three numbers a row
(``DraftDist``). A row's processed distribution (temperature, top-k, top-p) is always

    x_v  = float32(logit_v) * inv_t                 inv_t = 1 / T, once per row in float32
    p(v) = [key(x_v) >= thr] * exp(x_v - m) / z     m = max_v x_v, z = kept mass

with ``key`` the monotone int32 key of a float32 (below), so top-k and top-p are a single
integer threshold per row and every path computes bit-identical x.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

__all__ = ["DraftDist", "INT32_MIN", "key", "key_of", "inverse_temperature", "row_inv_t"]

INT32_MIN = -2147483648  # thr of a row with nothing filtered out
_INT32_MIN = tl.constexpr(INT32_MIN)


class DraftDist(NamedTuple):
    """The draft's processed distribution q of each draft row, never materialised.

    q(v) = [key(x_v) >= thr] * exp(x_v - m) / z,   x_v = float32(logit_v) * inv_t

    Row layout: chain, one row per draft token (ragged by ``cu_num_draft``); tree, the
    root and every node of each sequence. Greedy rows' q is never read by a sampler.
    """

    logits: torch.Tensor  # [n, V] draft logits, any float dtype (bf16/fp16/fp32), stride(1) == 1
    inv_t: torch.Tensor  # [n] float32: 1 / temperature of the row's request (1.0 for greedy rows)
    m: torch.Tensor  # [n] float32: max over kept v of x_v
    z: torch.Tensor  # [n] float32: sum over kept v of exp(x_v - m)
    thr: torch.Tensor  # [n] int32: v is kept iff key(x_v) >= thr (INT32_MIN: nothing filtered)

    def narrow(self, start: int, length: int) -> DraftDist:
        """Rows ``start .. start + length`` of every field (views)."""
        return DraftDist(*(t.narrow(0, start, length) for t in self))

    def index_select(self, rows: torch.Tensor) -> DraftDist:
        """The rows ``rows`` ([r] int64) of every field, in that order."""
        return DraftDist(*(t.index_select(0, rows) for t in self))

    @staticmethod
    def interleave(parts: list[DraftDist]) -> DraftDist:
        """k DraftDists of B rows each -> B * k rows, row b * k + j = row b of parts[j]."""
        return DraftDist(*(torch.stack(fields, dim=1).flatten(0, 1) for fields in zip(*parts, strict=True)))

    @staticmethod
    def cat(parts: list[DraftDist]) -> DraftDist:
        """Rows of several DraftDists stacked in order (logits must share V and dtype)."""
        return DraftDist(*(torch.cat(fields, dim=0) for fields in zip(*parts, strict=True)))


@triton.jit
def key(x):
    """Monotone int32 key of a float32: x < y <=> key(x) < key(y); -0.0 and +0.0 share 0.

    Non-negative floats order like their bits; for negative ones flipping the 31 magnitude
    bits reverses their order and keeps them below every non-negative key.
    """
    bits = x.to(tl.int32, bitcast=True)
    k = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)
    return tl.where(x == 0.0, 0, k)


_key = key  # the name the kernels used before this module existed


def key_of(x: torch.Tensor) -> torch.Tensor:
    """Torch twin of ``key``: [...] float32 -> [...] int32, same order as the floats."""
    bits = x.float().contiguous().view(torch.int32)
    k = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits)
    return torch.where(x == 0.0, torch.zeros_like(k), k)


def inverse_temperature(temperature: torch.Tensor) -> torch.Tensor:
    """[n] float32 temperature -> [n] float32 1 / T (1.0 where T <= 0, greedy rows).

    The one place 1 / T is formed on the torch side; the kernels use ``row_inv_t``
    (a correctly rounded division, so both give the same bits).
    """
    t = temperature.float()
    return torch.where(t > 0, 1.0 / torch.where(t > 0, t, torch.ones_like(t)), torch.ones_like(t))


@triton.jit
def row_inv_t(temp):
    """1 / T in float32, correctly rounded (matches ``inverse_temperature``); 1 if T <= 0."""
    safe = tl.where(temp > 0.0, temp, 1.0)
    return tl.where(temp > 0.0, tl.math.div_rn(1.0, safe), 1.0)


# ---------------------------------------------------------------------------------------
# Pieces of the chunked row kernels (``_row_stats``, ``_radix``, the samplers' kernels).
# ---------------------------------------------------------------------------------------

_INT32_MAX = tl.constexpr(2147483647)
CAND = 64  # candidate keys kept per chunk: top-k for k <= CAND and most top-p cuts need no re-read


def chunk_size(vocab: int) -> int:
    """Vocabulary chunk of one program: about 32 chunks a row (so a lone row fills >= 32
    programs), a power of two in [1024, 4096] (small vocabularies: fewer, larger chunks)."""
    return max(1024, min(4096, triton.next_power_of_2(triton.cdiv(vocab, 32))))


@triton.jit
def decode_key(k):
    """Inverse of ``key``: the float32 whose key is ``k`` (key 0 gives +0.0)."""
    bits = tl.where(k < 0, k ^ 0x7FFFFFFF, k)
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def row_sequence(r, cu_ptr, n_seq, HAS_CU: tl.constexpr, BLOCK_B: tl.constexpr):
    """Sequence owning row ``r`` of a ragged layout where sequence b owns rows
    cu[b] + b .. cu[b + 1] + b (n_b + 1 rows); without cu, row r is sequence r."""
    if HAS_CU:
        bb = tl.arange(0, BLOCK_B)
        live = bb < n_seq
        first_after = tl.load(cu_ptr + 1 + bb, mask=live, other=0).to(tl.int64) + bb + 1
        seq = tl.sum((live & (first_after <= r)).to(tl.int64))
        return tl.minimum(seq, n_seq - 1)
    else:
        return r


@triton.jit
def p_weights(row_ptr, idx, mask, inv_t, m, z, thr):
    """p over one block of a row: [key(x) >= thr] exp(x - m) / z with x = logit * inv_t."""
    x = tl.load(row_ptr + idx, mask=mask, other=float("-inf")).to(tl.float32) * inv_t
    return tl.where(mask & (key(x) >= thr), tl.exp(x - m), 0.0) / z


@triton.jit
def p_at(row_ptr, v, live, inv_t, m, z, thr):
    """p of the single token ``v`` (0 where ``live`` is false)."""
    x = tl.load(row_ptr + v, mask=live, other=float("-inf")).to(tl.float32) * inv_t
    return tl.where(live & (key(x) >= thr), tl.exp(x - m), 0.0) / z


@triton.jit
def cdf_block(w, idx, cum, target, token, last):
    """One block of an inverse-CDF scan over weights ``w`` at vocabulary ids ``idx``.

    Returns (token, last, cum): the first id whose running sum exceeds ``target`` (kept
    at -1 until found), the last id with positive weight per lane (the fallback when
    rounding hides the crossing), and the running sum after this block.
    """
    last = tl.where(w > 0.0, idx, last)
    block_sum = tl.sum(w)
    if cum + block_sum > target:
        # the crossing is in this block; a zero weight never wins, even where the
        # scan's rounding steps up (if rounding hides the crossing, go on)
        hit = (cum + tl.cumsum(w, 0) > target) & (w > 0.0)
        first = tl.min(tl.where(hit, idx, _INT32_MAX))
        token = tl.where(first == _INT32_MAX, -1, first.to(tl.int64))
    return token, last, cum + block_sum


@triton.jit
def pick_chunk(w, cc, target):
    """Two-level inverse CDF, first level: the chunk whose running sum of chunk masses
    ``w`` ([BLOCK_C]) first exceeds ``target`` (the last positive chunk when rounding
    hides it), and the mass before it. Returns (chunk, mass before)."""
    cum = tl.cumsum(w, 0)
    chunk = tl.min(tl.where((cum > target) & (w > 0.0), cc, _INT32_MAX))
    chunk = tl.where(chunk == _INT32_MAX, tl.max(tl.where(w > 0.0, cc, -1)), chunk)
    before = tl.sum(tl.where(cc == chunk, cum - w, 0.0))
    return chunk, before


@triton.jit
def kth_largest(keys, live, k):
    """The k-th largest (1-based, ties counted) of the ``live`` int32 keys of a 1-D block,
    INT32_MIN when fewer than k are live.

    Radix select in registers: four histograms of 8-bit digits of the key in unsigned
    order, each fixing one digit (the bucket holding the k-th largest among the keys
    that match the digits found so far). No sort, no bisection.
    """
    u = (keys ^ _INT32_MIN).to(tl.uint32, bitcast=True)  # unsigned order = key order
    bins = tl.arange(0, 256)
    prefix = tl.zeros((), tl.uint32)
    rem = k
    for rnd in tl.static_range(4):
        if rnd == 0:
            match = live
        else:
            match = live & ((u >> (32 - 8 * rnd)) == (prefix >> (32 - 8 * rnd)))
        hist = tl.histogram(((u >> (24 - 8 * rnd)) & 255).to(tl.int32), 256, mask=match)
        at_least = tl.cumsum(hist, 0, reverse=True)  # keys in this bucket or above
        digit = tl.max(tl.where(at_least >= rem, bins, 0))
        rem -= tl.sum(tl.where(bins == digit, at_least - hist, 0))
        prefix = prefix | (digit.to(tl.uint32) << (24 - 8 * rnd))
    kth = prefix.to(tl.int32, bitcast=True) ^ _INT32_MIN
    return tl.where(tl.sum(live.to(tl.int32)) >= k, kth, _INT32_MIN)


def radix_rounds_needed(top_k, top_p, vocab: int | None = None, cand: int = CAND) -> int:
    """Radix rounds a batch may need: 0 when every row's thresholds come from the
    candidates for sure, 4 for top-p cuts, 8 for top-k > cand (the candidates kept per
    chunk) followed by top-p.

    top_k, top_p: [B] tensors (read on the host; free on CPU tensors) or host sequences;
    vocab: None for "any vocabulary" (a top_k >= V then counts as a real top-k: an upper bound)
    """
    k = torch.as_tensor(top_k).cpu()
    p = torch.as_tensor(top_p).cpu()
    no_k = k <= 0
    big_k = k > cand
    if vocab is not None:
        no_k |= k >= vocab
        big_k &= k < vocab
    if bool(big_k.any()):
        return 8 if bool((big_k & (p < 1)).any()) else 4
    return 4 if bool(((p < 1) & no_k).any()) else 0


