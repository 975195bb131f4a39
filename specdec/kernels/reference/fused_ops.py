"""Fused elementwise ops of a decoder layer in PyTorch: residual add + RMSNorm, RoPE on q
and k, SiLU(gate) * up. Each reproduces llama.py's module math bit for bit (same ops in the
same order and dtypes). The argument checks live in ``_validation`` and are shared with the
Triton launchers in fused_ops.py, so both paths refuse the same inputs with the same messages.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .._validation import check_add_rms_norm_args, check_rotary_args, check_silu_mul_args

__all__ = ["add_rms_norm", "rotary", "silu_mul"]


def add_rms_norm(
    x: torch.Tensor,
    residual: torch.Tensor | None,
    weight: torch.Tensor,
    eps: float,
    *,
    check: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Residual add, then RMSNorm: the two ops between a decoder layer's sublayers.

    x:        [T, N] float16/bfloat16/float32, stride 1 in N: a sublayer's output (or the
              embeddings, for the first layer)
    residual: [T, N] x's dtype, or None (nothing to add yet)
    weight:   [N] x's dtype, the norm's gain
    eps:      host float >= 0, added to the mean square
    check:    validate the arguments (keyword; the backend's hot-path calls skip it, for
              every op here, since the model builds their arguments itself)
    returns:  normed [T, N] and new_residual [T, N], both in x's dtype;
              new_residual = x + residual, or x itself (not a copy) when residual is None

    The norm is llama.py's ``RMSNorm.forward`` of new_residual op for op (transformers'
    order: fp32 statistics, the normalised row rounded to x's dtype, then the gain)::

        h = r.float(); h = h * rsqrt(mean(h^2) + eps); normed = weight * h.to(x.dtype)
    """
    if check:
        check_add_rms_norm_args(x, residual, weight, eps)
    r = x if residual is None else x + residual  # [T, N], rounded to x.dtype
    h = r.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)  # [T, N] fp32
    return weight * h.to(r.dtype), r


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def _head_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """llama.py's ``RMSNorm`` over the last dim (each head): fp32 statistics, the
    normalised row rounded to x's dtype, then the gain."""
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def rotary(
    q: torch.Tensor,
    k: torch.Tensor,
    positions: torch.Tensor,
    inv_freq: torch.Tensor,
    *,
    q_norm_weight: torch.Tensor | None = None,
    k_norm_weight: torch.Tensor | None = None,
    norm_eps: float = 1e-6,
    check: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(Per-head RMSNorm, then) RoPE on the query and key heads of T tokens
    (transformers' half-split layout).

    q:         [T, H, D] float16/bfloat16/float32, any token/head strides, stride 1 in D
               (e.g. a view into a fused qkv projection's output); D even
    k:         [T, H_kv, D] q's dtype, same layout rules
    positions: [T] int64 (or int32), each token's absolute position, exact below 2**24
    inv_freq:  [D / 2] float32, the rotation frequencies (``ModelConfig.rope_inv_freq``)
    q_norm_weight, k_norm_weight: [D] q's dtype or None (both or neither): Qwen3's
               ``q_norm`` / ``k_norm``, an RMSNorm over each head (eps ``norm_eps``)
               applied before the rotation, as llama.py's ``RMSNorm`` computes it
    returns:   q_rot [T, H, D], k_rot [T, H_kv, D], contiguous, in q's dtype

    llama.py's ``Rotary.cos_sin`` then ``apply_rope`` op for op: angles in fp32, cos and
    sin rounded to q's dtype, then ``x * cos + rotate_half(x) * sin`` in q's dtype::

        theta = positions.float()[:, None] * inv_freq     # [T, D/2]
        emb = cat(theta, theta)                            # [T, D]
        x1, x2 = halves of x -> x * cos(emb) + cat(-x2, x1) * sin(emb)
    """
    if check:
        check_rotary_args(q, k, positions, inv_freq, q_norm_weight, k_norm_weight, norm_eps)
    if q_norm_weight is not None and k_norm_weight is not None:  # both or neither (checked above)
        q, k = _head_rms_norm(q, q_norm_weight, norm_eps), _head_rms_norm(k, k_norm_weight, norm_eps)
    freqs = positions.float()[:, None] * inv_freq.float()  # [T, D/2]
    emb = torch.cat((freqs, freqs), dim=-1)  # [T, D]
    cos = emb.cos().to(q.dtype)[:, None]  # [T, 1, D]
    sin = emb.sin().to(q.dtype)[:, None]
    q_rot = (q * cos + _rotate_half(q) * sin).contiguous()
    k_rot = (k * cos + _rotate_half(k) * sin).contiguous()
    return q_rot, k_rot


def silu_mul(gate_up: torch.Tensor, *, activation: str = "silu", check: bool = True) -> torch.Tensor:
    """SwiGLU's activation: SiLU of the gate half times the up half (GeGLU's with
    ``activation="gelu_tanh"``: ``F.gelu(gate, approximate="tanh") * up``, Gemma's MLP).

    gate_up: [T, 2 I] float16/bfloat16/float32, stride 1 in its last dim: the gate
             projection's output in columns [0, I), the up projection's in [I, 2 I)
    returns: [T, I] in gate_up's dtype, ``F.silu(gate) * up`` as llama.py's MLP computes it

    The gate half is made contiguous first: on the CPU, ``F.silu`` of a strided view takes
    a scalar path for some elements whose fp32 result differs in the last bit from the
    vectorised path a contiguous ``gate_proj(x)`` output gets.
    """
    if check:
        check_silu_mul_args(gate_up, activation)
    i = gate_up.shape[1] // 2
    gate = gate_up[:, :i].contiguous()
    act = F.gelu(gate, approximate="tanh") if activation == "gelu_tanh" else F.silu(gate)
    return act * gate_up[:, i:]
