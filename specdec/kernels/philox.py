"""Counter-based Philox4x32-10 in plain PyTorch, bit-identical to Triton's ``tl.rand``.

Every random number in specdec comes from Philox keyed on a sequence's ``(seed, offset)``
and never on its position in the batch, so a sequence samples the same tokens alone or
in any batch, on the torch (CPU) backend and in the Triton kernels alike.

Counter layout
--------------
Triton's ``tl.randint(seed, c)`` runs Philox4x32-10 with key ``(seed_lo32, seed_hi32)``
and counter ``(c_lo32, c_hi32, 0, 0)`` for a 64-bit ``c`` and returns the first output
word. Draw ``j`` of stream ``s`` for a sequence with ``(seed, offset)`` uses::

    c = ((offset mod 2**32) << 32) | (s << 24) | j        0 <= s < 256, 0 <= j < 2**24
    u = tl.rand(seed, c)     # uint32 -> float32 in [0, 1), see _uint32_to_uniform

so in a kernel, with ``seed``, ``offset``, ``s`` and ``j`` all int64 (widen an int32 ``s``
before the shift: ``255 << 24`` overflows int32)::

    u = tl.rand(seed, (offset << 32) + (s << 24) + j)

``offset`` is the request's step counter; only its low 32 bits count.

Streams
-------
===========  ===============================================================
stream 0     rejection sampler: acceptance uniform of draft position i (j = i)
stream 1     rejection sampler: the one emitted residual / bonus sample,
             j = index of the target row it is drawn from (0 .. n_b)
stream 2     tree sampler: acceptance uniform of node j
stream 3     tree sampler: the one emitted sample, j = tree row it is drawn from
4 .. 15      reserved for the sampler
16 .. 255    drafters: ``16 + draft_position`` for chains, ``16 + depth`` (j = node
             index) for the children of a tree level
===========  ===============================================================

A drafter draws its token at draft position ``d`` by inverse CDF from one uniform::

    u = philox_uniform(seeds, offsets, 1, stream=16 + d)[:, 0]     # [B]
    tok = sample_inverse_cdf(q, u)                                  # [B] int64
"""

from __future__ import annotations

import torch

__all__ = [
    "philox_uniform",
    "sample_inverse_cdf",
    "SAMPLER_ACCEPT_STREAM",
    "SAMPLER_SAMPLE_STREAM",
    "TREE_ACCEPT_STREAM",
    "TREE_SAMPLE_STREAM",
    "DRAFT_STREAM",
    "FIRST_FREE_STREAM",
    "MAX_STREAM",
    "MAX_DRAWS",
]

SAMPLER_ACCEPT_STREAM = 0  # j = draft position
SAMPLER_SAMPLE_STREAM = 1  # j = target row of the residual / bonus sample
TREE_ACCEPT_STREAM = 2  # tree sampler: acceptance uniform of node i (j = i)
TREE_SAMPLE_STREAM = 3  # tree sampler: the emitted sample from tree row r (j = r)
FIRST_FREE_STREAM = 16  # streams 16 .. MAX_STREAM - 1 belong to drafters
DRAFT_STREAM = FIRST_FREE_STREAM  # a draft model's token at draft position j: DRAFT_STREAM + j
MAX_STREAM = 256  # the stream field is 8 bits wide
MAX_DRAWS = 1 << 24  # the draw index field is 24 bits wide

_M32 = 0xFFFFFFFF
# Philox4x32 constants (Salmon et al. 2011), as in triton/language/random.py
_ROUND_A = 0xD2511F53
_ROUND_B = 0xCD9E8D57
_KEY_A = 0x9E3779B9
_KEY_B = 0xBB67AE85
_N_ROUNDS = 10
# Triton's uint32 -> float scale: the largest float s with (2**31 - 1) * s < 1 in fp32
_UNIFORM_SCALE = 4.6566127342e-10


def _umulhi(a: torch.Tensor, b: int) -> torch.Tensor:
    """High 32 bits of the 64-bit product of two uint32 values held in int64.

    The product can exceed 2**63; int64 multiplication wraps modulo 2**64, which keeps
    the bit pattern of the unsigned product, so shifting and masking recovers it.
    """
    return ((a * b) >> 32) & _M32


def _philox4x32(c0, c1, c2, c3, k0, k1):
    """Ten Philox rounds on uint32 words stored in int64 tensors; returns the 4 words."""
    for _ in range(_N_ROUNDS):
        _c0, _c2 = c0, c2
        c0 = _umulhi(_c2, _ROUND_B) ^ c1 ^ k0
        c2 = _umulhi(_c0, _ROUND_A) ^ c3 ^ k1
        c1 = (_c2 * _ROUND_B) & _M32
        c3 = (_c0 * _ROUND_A) & _M32
        k0 = (k0 + _KEY_A) & _M32
        k1 = (k1 + _KEY_B) & _M32
    return c0, c1, c2, c3


def _uint32_to_uniform(x: torch.Tensor) -> torch.Tensor:
    """Triton's ``uint_to_uniform_float`` for 32-bit words: [0, 2**32) -> [0, 1) float32.

    The word is read as int32 and folded onto [0, 2**31) (x < 0 -> -x - 1), converted to
    float32 (round to nearest) and multiplied in float32 by ~2**-31. The scale is a
    Python float: a float32 tensor times a Python scalar computes in float32 (the scalar
    is rounded to float32 first, as Triton's constant is), and unlike a
    ``torch.tensor(..., device=...)`` it copies nothing from the host, so a CUDA graph
    can capture it.
    """
    signed = torch.where(x >= 2**31, x - 2**32, x)  # bitcast uint32 -> int32
    folded = torch.where(signed < 0, -signed - 1, signed)
    return folded.to(torch.float32) * _UNIFORM_SCALE


def philox_counter(offset: torch.Tensor, stream: int, j: torch.Tensor) -> torch.Tensor:
    """The 64-bit Philox counter of draw ``j`` of ``stream`` (see the module docstring).

    offset: [N] int64; j: [n] int64; returns [N, n] int64 ``(offset << 32) | (stream << 24) | j``
    (the int64 wraps, exactly as the Triton expression does).
    """
    return (offset[:, None] << 32) + (stream << 24) + j[None, :]


def philox_uniform(
    seed: torch.Tensor, offset: torch.Tensor, n: int, stream: int = 0,
    first: torch.Tensor | None = None,
) -> torch.Tensor:
    """``n`` uniforms in [0, 1) per row, keyed on (seed[r], offset[r], stream, j).

    seed:    [N] int64, the Philox key (all 64 bits are used)
    offset:  [N] int64, e.g. the request's step counter (used modulo 2**32)
    n:       draws per row, 0 <= n <= 2**24
    stream:  0 <= stream < 256; 0 and 1 belong to the rejection sampler, 2..15 are
             reserved, 16..255 are free for drafters (see the module docstring)
    first:   [N] int64 or None: row r draws j = first[r] .. first[r] + n - 1 (default 0)
    returns: [N, n] float32, ``out[r, j] == tl.rand(seed[r], philox_counter(offset, stream, j))``

    Example::

        >>> u = philox_uniform(torch.tensor([7]), torch.tensor([0]), 3, stream=16)
        >>> u.shape, bool(((u >= 0) & (u < 1)).all())
        (torch.Size([1, 3]), True)
    """
    if seed.dim() != 1 or offset.dim() != 1 or seed.shape != offset.shape:
        raise ValueError(
            f"seed and offset must be 1-D of one length, got {tuple(seed.shape)} "
            f"and {tuple(offset.shape)}"
        )
    if seed.dtype != torch.int64 or offset.dtype != torch.int64:
        raise ValueError(f"seed and offset must be int64, got {seed.dtype} and {offset.dtype}")
    if seed.device != offset.device:
        raise ValueError(f"seed is on {seed.device} but offset is on {offset.device}")
    if not 0 <= n <= MAX_DRAWS:
        raise ValueError(f"n must be in [0, {MAX_DRAWS}], got {n}")
    if not 0 <= stream < MAX_STREAM:
        raise ValueError(f"stream must be in [0, {MAX_STREAM}), got {stream}")
    j = torch.arange(n, dtype=torch.int64, device=seed.device)
    counter = philox_counter(offset, stream, j)  # [N, n]
    if first is not None:
        counter = counter + first.long()[:, None]
    c0 = counter & _M32
    c1 = (counter >> 32) & _M32
    zero = torch.zeros_like(c0)
    k0 = (seed & _M32)[:, None].expand_as(c0)
    k1 = ((seed >> 32) & _M32)[:, None].expand_as(c0)
    word, _, _, _ = _philox4x32(c0, c1, zero, zero, k0, k1)
    return _uint32_to_uniform(word)


def sample_inverse_cdf(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF sample: the first index whose cumulative sum exceeds ``u * total``.

    probs:   [N, V] float32, non-negative, unnormalised rows allowed
    u:       [N] float32 in [0, 1)
    returns: [N] int64 token ids; -1 for a row whose total is not positive

    A zero-probability token is never returned: the cumulative sum does not increase
    there, so it cannot be the first index to exceed the target. When rounding leaves
    ``u * total`` at or above the last cumulative value, the last token with positive
    probability is returned.

    Example::

        >>> sample_inverse_cdf(torch.tensor([[0.0, 0.25, 0.0, 0.75]]), torch.tensor([0.5]))
        tensor([3])
    """
    if probs.dim() != 2 or u.dim() != 1 or u.shape[0] != probs.shape[0]:
        raise ValueError(
            f"probs must be [N, V] and u [N], got {tuple(probs.shape)} and {tuple(u.shape)}"
        )
    probs = probs.float()
    cum = torch.cumsum(probs, dim=-1)  # [N, V]
    total = cum[:, -1:]  # [N, 1]
    target = u.float()[:, None] * total  # [N, 1]
    idx = torch.searchsorted(cum, target, right=True)[:, 0]  # first cum > target, or V
    # rounding at the end: fall back to the last positive entry
    v = probs.shape[1]
    last_pos = v - 1 - torch.flip(probs > 0, dims=[1]).to(torch.int8).argmax(dim=1)
    idx = torch.where(idx >= v, last_pos, idx)
    return torch.where(total[:, 0] > 0, idx, torch.full_like(idx, -1))
