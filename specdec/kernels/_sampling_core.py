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

    def narrow(self, start: int, length: int) -> "DraftDist":
        """Rows ``start .. start + length`` of every field (views)."""
        return DraftDist(*(t.narrow(0, start, length) for t in self))

    def index_select(self, rows: torch.Tensor) -> "DraftDist":
        """The rows ``rows`` ([r] int64) of every field, in that order."""
        return DraftDist(*(t.index_select(0, rows) for t in self))

    @staticmethod
    def cat(parts: "list[DraftDist]") -> "DraftDist":
        """Rows of several DraftDists stacked in order (logits must share V and dtype)."""
        return DraftDist(*(torch.cat(fields, dim=0) for fields in zip(*parts)))


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
