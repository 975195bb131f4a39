"""The elementwise ops of a decoder layer, one Triton launch each.

A decode step at batch 1 is launch-bound: in torch, residual add + RMSNorm is ~8 kernels,
RoPE on q and k ~18, SiLU-times-up 2, each ~2 µs even inside a CUDA graph. Fused::

    normed, residual = add_rms_norm(h, residual, weight, eps)  # one program per token row
    q, k = rotary(q, k, positions, inv_freq)                   # one program per token
    act = silu_mul(gate_up)                                    # a program per row and block

Numerics: every kernel upcasts its loads to fp32, computes in fp32 and rounds once, when
storing. The PyTorch reference (:mod:`specdec.kernels.reference`, the test oracle)
follows llama.py op for op and rounds some intermediates to the activation dtype (the
normalised row before the gain; cos, sin and each RoPE product; SiLU before the
multiply), so in float16/bfloat16 the two differ by a rounding or two: 1-2 ulp of the
output, and for RoPE of the larger term x1 cos or x2 sin, many ulps of an output where
they cancel; in float32 by a few fp32 ulp. ``add_rms_norm``'s new residual is rounded
once by both (fp32 sum -> x's dtype, as torch adds) and is bit-equal; the norm is taken
of that rounded residual, as the reference does.

The launchers share their argument checks with the reference (``ValueError`` naming the
argument, host-side, no device reads; ``check=False`` skips them for callers that build
the arguments themselves, as the model's cached forward does through the backend),
allocate outputs with ``torch.empty`` and never sync, so a decode step that calls them
can be captured in a CUDA graph.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._validation import check_add_rms_norm_args, check_rotary_args, check_silu_mul_args, require, shape_of

__all__ = ["add_rms_norm", "rotary", "silu_mul"]

MAX_NORM_COLS = 65536  # add_rms_norm keeps a whole row in one block


# --------------------------------------------------------------------------- kernels


@triton.jit
def _round(x, dtype: tl.constexpr, RNE_BF16: tl.constexpr):
    """fp32 ``x`` -> ``dtype``, rounding to nearest even.

    A GPU's fp32 -> bf16 conversion rounds to nearest even; triton 3.6's interpreter
    truncates. RNE_BF16 (set only when interpreting a bf16 output) rounds by hand so that
    CPU tests see the GPU's numerics: add half an ulp of bf16 (less one, plus the kept
    lowest bit: ties go to even) and drop the low 16 bits.
    """
    if RNE_BF16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = tl.where(x == x, bits, 0x7FC00000)  # NaN -> the quiet NaN (no carry)
        bits = bits + 0x7FFF + ((bits >> 16) & 1)
        return (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return x.to(dtype)


@triton.jit
def _add_rms_norm_kernel(
    x_ptr, res_ptr, w_ptr, out_ptr, new_res_ptr, n_cols, eps,
    stride_x, stride_res, stride_out, stride_new_res,
    BLOCK_N: tl.constexpr, HAS_RESIDUAL: tl.constexpr, RNE_BF16: tl.constexpr,
):
    """Row ``t``: r = x + res (stored, in x's dtype), out = w * r * rsqrt(mean(r^2) + eps)."""
    t = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_N)
    mask = cols < n_cols
    r = tl.load(x_ptr + t * stride_x + cols, mask=mask, other=0.0).to(tl.float32)  # [BLOCK_N]
    if HAS_RESIDUAL:
        # -- new residual: the fp32 sum rounded to x's dtype, as torch's x + residual --
        r += tl.load(res_ptr + t * stride_res + cols, mask=mask, other=0.0).to(tl.float32)
        r_out = _round(r, new_res_ptr.dtype.element_ty, RNE_BF16)
        tl.store(new_res_ptr + t * stride_new_res + cols, r_out, mask=mask)
        r = r_out.to(tl.float32)  # normalise what the next layer adds to
    # -- rms norm; masked columns load 0 and add nothing to the sum of squares --
    inv_rms = tl.math.rsqrt(tl.sum(r * r, axis=0) / n_cols + eps)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    out = _round(r * inv_rms * w, out_ptr.dtype.element_ty, RNE_BF16)
    tl.store(out_ptr + t * stride_out + cols, out, mask=mask)


@triton.jit
def _rope_heads(x_ptr, out_ptr, w_ptr, eps, n_heads, stride_h, stride_out_h, cos, sin,
                HALF: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr,
                HAS_NORM: tl.constexpr, RNE_BF16: tl.constexpr):
    """(RMSNorm each head, then) rotate every head of one token, BLOCK_H heads at a time.

    With x = [x1, x2] (the two halves of a head), x * cos + rotate_half(x) * sin is
    [x1 cos - x2 sin, x2 cos + x1 sin]; ``cos``, ``sin``: [1, BLOCK_HALF] fp32. With
    HAS_NORM, x is first w * x * rsqrt(mean(x^2) + eps) over the head's D = 2 HALF values
    (``w_ptr``: [D] gain), kept in fp32.
    """
    j = tl.arange(0, BLOCK_HALF)[None, :]  # [1, BLOCK_HALF]
    if HAS_NORM:
        w1 = tl.load(w_ptr + j, mask=j < HALF, other=0.0).to(tl.float32)  # [1, BLOCK_HALF]
        w2 = tl.load(w_ptr + HALF + j, mask=j < HALF, other=0.0).to(tl.float32)
    for h0 in range(0, n_heads, BLOCK_H):
        h = h0 + tl.arange(0, BLOCK_H)[:, None]  # [BLOCK_H, 1]
        mask = (h < n_heads) & (j < HALF)
        src = x_ptr + h * stride_h + j
        x1 = tl.load(src, mask=mask, other=0.0).to(tl.float32)  # [BLOCK_H, BLOCK_HALF]
        x2 = tl.load(src + HALF, mask=mask, other=0.0).to(tl.float32)
        if HAS_NORM:
            # masked columns load 0: the sum of squares is over the head's D values only
            ss = tl.sum(x1 * x1, axis=1) + tl.sum(x2 * x2, axis=1)  # [BLOCK_H]
            inv_rms = tl.math.rsqrt(ss / (2 * HALF) + eps)[:, None]
            x1 = x1 * inv_rms * w1
            x2 = x2 * inv_rms * w2
        dst = out_ptr + h * stride_out_h + j
        tl.store(dst, _round(x1 * cos - x2 * sin, out_ptr.dtype.element_ty, RNE_BF16),
                 mask=mask)
        tl.store(dst + HALF, _round(x2 * cos + x1 * sin, out_ptr.dtype.element_ty, RNE_BF16),
                 mask=mask)


# head counts only bound a loop and mask whole heads: no need to specialise on them
@triton.jit(do_not_specialize=["n_q_heads", "n_k_heads"])
def _rotary_kernel(
    q_ptr, k_ptr, pos_ptr, inv_freq_ptr, q_out_ptr, k_out_ptr, qw_ptr, kw_ptr, eps,
    n_q_heads, n_k_heads,
    stride_qt, stride_qh, stride_kt, stride_kh,
    stride_qot, stride_qoh, stride_kot, stride_koh,
    HALF: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_HQ: tl.constexpr,
    BLOCK_HK: tl.constexpr, HAS_NORM: tl.constexpr, RNE_BF16: tl.constexpr,
):
    """Token ``t``: (per-head RMSNorm and) RoPE on its H query heads and H_kv key heads
    (D = 2 * HALF)."""
    t = tl.program_id(0).to(tl.int64)
    # -- angles theta_j = pos * inv_freq_j, the fp32 product the reference takes --
    j = tl.arange(0, BLOCK_HALF)
    pos = tl.load(pos_ptr + t).to(tl.float32)
    theta = pos * tl.load(inv_freq_ptr + j, mask=j < HALF, other=0.0)  # [BLOCK_HALF]
    cos = tl.cos(theta)[None, :]
    sin = tl.sin(theta)[None, :]
    _rope_heads(q_ptr + t * stride_qt, q_out_ptr + t * stride_qot, qw_ptr, eps, n_q_heads,
                stride_qh, stride_qoh, cos, sin, HALF, BLOCK_HQ, BLOCK_HALF, HAS_NORM, RNE_BF16)
    _rope_heads(k_ptr + t * stride_kt, k_out_ptr + t * stride_kot, kw_ptr, eps, n_k_heads,
                stride_kh, stride_koh, cos, sin, HALF, BLOCK_HK, BLOCK_HALF, HAS_NORM, RNE_BF16)


@triton.jit
def _silu_mul_kernel(gate_up_ptr, out_ptr, n_inter, stride_gu, stride_out,
                     BLOCK: tl.constexpr, GELU: tl.constexpr, RNE_BF16: tl.constexpr):
    """Row ``t``, columns ``[b * BLOCK, (b + 1) * BLOCK)``: silu(gate) * up, or with GELU
    gelu_tanh(gate) * up."""
    t = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_inter
    row = gate_up_ptr + t * stride_gu
    gate = tl.load(row + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(row + n_inter + cols, mask=mask, other=0.0).to(tl.float32)
    if GELU:
        # gelu_tanh(g) = g (1 + tanh(u)) / 2 = g * sigmoid(2 u), u = sqrt(2/pi) (g + 0.044715 g^3)
        # (no cancellation for negative g, unlike 1 + tanh)
        u2 = 1.5957691216057308 * (gate + 0.044715 * gate * gate * gate)  # 2 u
        out = gate / (1.0 + tl.exp(-u2)) * up
    else:
        # silu(g) = g * sigmoid(g) = g / (1 + exp(-g)); exp overflow to inf gives -0, as torch
        out = gate / (1.0 + tl.exp(-gate)) * up
    tl.store(out_ptr + t * stride_out + cols, _round(out, out_ptr.dtype.element_ty, RNE_BF16),
             mask=mask)


# True when @triton.jit built interpreter functions (TRITON_INTERPRET=1, CPU tensors)
_INTERPRETED = type(_silu_mul_kernel).__name__ == "InterpretedFunction"


# --------------------------------------------------------------------------- launchers


def _rne_bf16(dtype: torch.dtype) -> bool:
    """Whether a kernel storing ``dtype`` must round bf16 by hand (see ``_round``)."""
    return _INTERPRETED and dtype == torch.bfloat16


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor,
                 eps: float, *, check: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Residual add, then RMSNorm, in one launch (one program per row).

    x:        [T, N] float16/bfloat16/float32, any row stride, stride 1 in N; N <= 65536
    residual: [T, N] x's dtype (same layout rules), or None
    weight:   [N] x's dtype, the norm's gain
    eps:      host float >= 0, added to the mean square
    returns:  normed [T, N] (new), new_residual [T, N] (new; ``x`` itself when residual
              is None), both contiguous except that returned ``x``, in x's dtype

    new_residual = x + residual rounded to x's dtype (bit-equal to the reference);
    normed = weight * r / sqrt(mean(r^2) + eps) of that rounded r, computed in fp32 and
    rounded once (the reference rounds r / rms to x's dtype before the gain).

    Example::

        >>> x = torch.tensor([[3.0, 4.0]]); res = torch.tensor([[0.0, -4.0]])
        >>> normed, new_res = add_rms_norm(x, res, torch.ones(2), eps=0.0)
        >>> new_res.tolist(), [round(v, 4) for v in normed[0].tolist()]
        ([[3.0, 0.0]], [1.4142, 0.0])
    """
    if check:
        check_add_rms_norm_args(x, residual, weight, eps)
        require(x.shape[1] <= MAX_NORM_COLS, f"add_rms_norm keeps a row in one block: N must be <= "
                f"{MAX_NORM_COLS}, got x of shape {shape_of(x)}")
    t, n = x.shape
    out = torch.empty(t, n, dtype=x.dtype, device=x.device)
    new_res = x if residual is None else torch.empty_like(out)
    if t == 0:
        return out, new_res
    block_n = triton.next_power_of_2(n)
    res = x if residual is None else residual  # a placeholder pointer when there is none
    _add_rms_norm_kernel[(t,)](
        x, res, weight, out, new_res, n, float(eps),
        x.stride(0), res.stride(0), out.stride(0), new_res.stride(0),
        BLOCK_N=block_n, HAS_RESIDUAL=residual is not None, RNE_BF16=_rne_bf16(x.dtype),
        num_warps=16 if block_n >= 8192 else (8 if block_n >= 2048 else 4),
    )
    return out, new_res


def rotary(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor,
           inv_freq: torch.Tensor, *, q_norm_weight: torch.Tensor | None = None,
           k_norm_weight: torch.Tensor | None = None, norm_eps: float = 1e-6,
           check: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """(Per-head RMSNorm and) RoPE on the query and key heads of T tokens in one launch
    (one program per token).

    q:         [T, H, D] float16/bfloat16/float32, any token/head strides, stride 1 in D
               (e.g. ``qkv[:, :H * D].view(T, H, D)`` of a fused projection); D even
    k:         [T, H_kv, D] q's dtype, same layout rules
    positions: [T] int64 (or int32), absolute positions, exact below 2**24
    inv_freq:  [D / 2] float32 rotation frequencies
    q_norm_weight, k_norm_weight: [D] q's dtype or None (both or neither): an RMSNorm of
               each head (eps ``norm_eps``) before the rotation (Qwen3's q_norm/k_norm),
               kept in fp32 into the rotation (the reference rounds it to q's dtype)
    returns:   q_rot [T, H, D], k_rot [T, H_kv, D], new and contiguous, in q's dtype

    Per token, theta_j = float(pos) * inv_freq_j (the reference's fp32 product), cos and
    sin of it in fp32, and [x1, x2] -> [x1 cos - x2 sin, x2 cos + x1 sin] in fp32,
    rounded once (the reference rounds cos, sin and each product to q's dtype).

    Example::

        >>> q = torch.tensor([[[1.0, 0.0]]]); k = torch.tensor([[[0.0, 2.0]]])  # T=1, D=2
        >>> q_rot, k_rot = rotary(q, k, torch.tensor([2]), torch.tensor([torch.pi / 6]))
        >>> [round(v, 3) for v in q_rot.flatten().tolist() + k_rot.flatten().tolist()]
        [0.5, 0.866, -1.732, 1.0]
    """
    if check:
        check_rotary_args(q, k, positions, inv_freq, q_norm_weight, k_norm_weight, norm_eps)
    t, h, d = q.shape
    h_kv = k.shape[1]
    q_out = torch.empty(t, h, d, dtype=q.dtype, device=q.device)
    k_out = torch.empty(t, h_kv, d, dtype=q.dtype, device=q.device)
    if t == 0:
        return q_out, k_out
    block_half = triton.next_power_of_2(d // 2)
    max_heads = max(1, 4096 // block_half)  # keep a [BLOCK_H, BLOCK_HALF] tile <= 4096
    has_norm = q_norm_weight is not None
    _rotary_kernel[(t,)](
        q, k, positions, inv_freq, q_out, k_out,
        q_norm_weight if has_norm else q, k_norm_weight if has_norm else k, float(norm_eps), h, h_kv,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1),
        q_out.stride(0), q_out.stride(1), k_out.stride(0), k_out.stride(1),
        HALF=d // 2, BLOCK_HALF=block_half, BLOCK_HQ=min(triton.next_power_of_2(h), max_heads),
        BLOCK_HK=min(triton.next_power_of_2(h_kv), max_heads), HAS_NORM=has_norm,
        RNE_BF16=_rne_bf16(q.dtype), num_warps=4,
    )
    return q_out, k_out


def silu_mul(gate_up: torch.Tensor, *, activation: str = "silu", check: bool = True) -> torch.Tensor:
    """SwiGLU's activation ``silu(gate) * up`` in one launch (a program per row and block);
    GeGLU's ``gelu_tanh(gate) * up`` with ``activation="gelu_tanh"`` (Gemma).

    gate_up: [T, 2 I] float16/bfloat16/float32, any row stride, stride 1 in the last dim:
             gate in columns [0, I), up in [I, 2 I) (a fused gate/up projection's output)
    returns: [T, I] new, contiguous, in gate_up's dtype

    Computed in fp32 and rounded once (the reference rounds silu(gate) first).

    Example::

        >>> silu_mul(torch.tensor([[0.0, 20.0, 3.0, 0.5]])).tolist()
        [[0.0, 10.0]]
    """
    if check:
        check_silu_mul_args(gate_up, activation)
    t, i = gate_up.shape[0], gate_up.shape[1] // 2
    out = torch.empty(t, i, dtype=gate_up.dtype, device=gate_up.device)
    if t == 0:
        return out
    block = min(triton.next_power_of_2(i), 1024)
    _silu_mul_kernel[(t, triton.cdiv(i, block))](
        gate_up, out, i, gate_up.stride(0), out.stride(0),
        BLOCK=block, GELU=activation == "gelu_tanh", RNE_BF16=_rne_bf16(gate_up.dtype), num_warps=4,
    )
    return out
