"""The fused layer ops: the PyTorch reference against llama.py, Triton against the reference.

Three layers of checks:

* the reference reproduces llama.py's module math bit for bit (RMSNorm, Rotary +
  apply_rope, MLP's silu * up), so the torch backend can switch to it unnoticed;
* each Triton kernel equals the same math done in fp32 and rounded once to the output
  dtype (to one ulp: kernel and torch fp32 differ in the last bits), and the half-precision
  reference to within its own extra roundings (~2 bf16 ulps);
* both paths refuse bad arguments with the same ValueError.

On CPU the kernels run in Triton's interpreter (~1 ms a program), so shapes stay small.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from specdec.kernels import fused_ops
from specdec.kernels import reference as ref
from specdec.models.config import ModelConfig
from specdec.models.llama import MLP, RMSNorm, Rotary, apply_rope

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.bfloat16, torch.float16]

# the half-precision reference rounds intermediates the kernels keep in fp32 (2-3 roundings
# of u = 2^-8 in bf16, 2^-11 in fp16, relative to the output)
VS_REFERENCE = {
    torch.float32: dict(atol=1e-5, rtol=1e-5),
    torch.bfloat16: dict(atol=1.6e-2, rtol=1.6e-2),
    torch.float16: dict(atol=2e-3, rtol=2e-3),
}
# kernel vs fp32 math rounded once: one ulp apart at most (an ulp is <= 2^-7 |x| in bf16,
# <= 2^-10 |x| in fp16); atol covers fp32 cancellation noise near 0
ROUNDED_ONCE = {
    torch.float32: dict(atol=1e-5, rtol=1e-5),
    torch.bfloat16: dict(atol=1e-5, rtol=1.01 * 2**-7),
    torch.float16: dict(atol=1e-5, rtol=1.01 * 2**-10),
}

# triton 3.6's interpreter turns a runtime loop bound into an int through a deprecated
# numpy path (the head loop in the rotary kernel)
pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim")


def randn(*shape, gen, scale=1.0, dtype=torch.float32):
    return (torch.randn(*shape, generator=gen) * scale).to(dtype)


def close(actual, expected, tol):
    torch.testing.assert_close(actual.cpu().float(), expected.cpu().float(), **tol)


def config(h=4, h_kv=2, d=16, inter=40) -> ModelConfig:
    return ModelConfig(architecture="llama", vocab_size=32, hidden_size=h * d,
                       intermediate_size=inter, num_layers=1, num_heads=h, num_kv_heads=h_kv,
                       head_dim=d, rope_theta=10000.0)


def qkv_views(t, h, h_kv, d, gen, dtype, scale=1.0):
    """q [T, H, D] and k [T, H_kv, D] as views into one [T, (H + 2 H_kv) D] projection."""
    qkv = randn(t, (h + 2 * h_kv) * d, gen=gen, scale=scale, dtype=dtype)
    q = qkv[:, :h * d].view(t, h, d)
    k = qkv[:, h * d:(h + h_kv) * d].view(t, h_kv, d)
    return q, k


def assert_rounded_once(actual, exact32, dtype):
    """``actual`` is the fp32 result ``exact32`` rounded once to ``dtype``: within an ulp
    everywhere, and in half precision bit-equal almost everywhere (kernel and torch fp32
    math differ in their last bits, which moves a rounding only next to a tie; a path
    that rounds an intermediate, or normalises an unrounded residual, misses ~20%)."""
    want = exact32.to(dtype)
    close(actual, want, ROUNDED_ONCE[dtype])
    if dtype != torch.float32:
        same = (actual.cpu() == want.cpu()).float().mean().item()
        assert same >= 0.99, f"only {same:.1%} of the elements are the fp32 result rounded once"


def inv_freq_of(d: int) -> torch.Tensor:
    return 1.0 / 10000.0 ** (torch.arange(0, d, 2, dtype=torch.float32) / d)


# ------------------------------------------------------------------------------------
# the reference is llama.py's math, bit for bit
# ------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_reference_add_rms_norm_is_llama_rmsnorm(dtype):
    g = torch.Generator().manual_seed(0)
    norm = RMSNorm(200, eps=1e-5)
    norm.weight.data = randn(200, gen=g) + 1.0
    norm.to(dtype)
    x, residual = randn(5, 200, gen=g, dtype=dtype), randn(5, 200, gen=g, scale=4, dtype=dtype)
    with torch.no_grad():
        normed, new_residual = ref.add_rms_norm(x, residual, norm.weight, norm.eps)
        assert torch.equal(new_residual, x + residual)
        assert torch.equal(normed, norm(residual + x))  # DecoderLayer adds in this order
        normed, new_residual = ref.add_rms_norm(x, None, norm.weight, norm.eps)
        assert new_residual is x and torch.equal(normed, norm(x))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_reference_rotary_is_llama_rope(dtype):
    g = torch.Generator().manual_seed(1)
    t, h, h_kv, d = 7, 4, 2, 64
    rotary = Rotary(config(h, h_kv, d))
    q, k = qkv_views(t, h, h_kv, d, g, dtype)
    positions = torch.tensor([0, 1, 2, 17, 511, 2048, 4000])
    cos, sin = rotary.cos_sin(positions, dtype)
    q_rot, k_rot = ref.rotary(q, k, positions, rotary.inv_freq)
    assert torch.equal(q_rot, apply_rope(q, cos, sin))
    assert torch.equal(k_rot, apply_rope(k, cos, sin))
    assert q_rot.is_contiguous() and k_rot.is_contiguous()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_reference_silu_mul_is_llama_mlp(dtype):
    # I = 37 leaves a ragged tail in each row of the strided gate view: F.silu of the view
    # (not made contiguous) differs from the module's in the last fp32 bit there
    g = torch.Generator().manual_seed(2)
    mlp = MLP(config(inter=37)).to(dtype)
    mlp.down_proj = nn.Identity()
    x = randn(5, 64, gen=g, dtype=dtype)
    with torch.no_grad():
        gate_up = torch.cat([mlp.gate_proj(x), mlp.up_proj(x)], dim=-1)  # [T, 2 I]
        assert torch.equal(ref.silu_mul(gate_up), mlp(x))


# ------------------------------------------------------------------------------------
# Triton against the reference
# ------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_residual", [False, True])
@pytest.mark.parametrize("t,n", [(1, 72), (3, 200), (17, 72)])
def test_add_rms_norm_matches_reference(t, n, with_residual, dtype):
    g = torch.Generator().manual_seed(t * n)
    wide = randn(t, n + 24, gen=g, scale=3, dtype=dtype)
    x = wide[:, 5:5 + n]  # row stride n + 24
    residual = randn(t, n, gen=g, scale=3, dtype=dtype) if with_residual else None
    weight = randn(n, gen=g, scale=0.5, dtype=dtype) + 1
    args = [a.to(DEVICE) if a is not None else None for a in (x, residual, weight)]
    normed, new_residual = fused_ops.add_rms_norm(*args, 1e-6)
    want, want_residual = ref.add_rms_norm(x, residual, weight, 1e-6)
    # the new residual is rounded once by both: bit-equal
    assert torch.equal(new_residual.cpu(), want_residual)
    if residual is None:
        assert new_residual is args[0]
    assert normed.dtype == dtype and normed.shape == (t, n) and normed.is_contiguous()
    close(normed, want, VS_REFERENCE[dtype])
    # fp32 math on the rounded residual, rounded once
    r = want_residual.float()
    exact = weight.float() * r * torch.rsqrt(r.pow(2).mean(-1, keepdim=True) + 1e-6)
    assert_rounded_once(normed, exact, dtype)


@pytest.mark.filterwarnings("ignore:overflow encountered")  # numpy, in the interpreter
def test_add_rms_norm_new_residual_special_values():
    """inf, NaN, overflow, -0 and ties round like torch's bf16 addition.

    (No subnormals: triton 3.6's interpreter upcasts bf16 subnormals wrongly, 1e-39 -> 4.4e-39.)
    """
    big = 3.0e38
    x = torch.tensor([[float("inf"), -float("inf"), float("nan"), big, -big, -0.0, 1.0,
                       1.0078125]], dtype=torch.bfloat16)
    residual = torch.tensor([[1.0, 1.0, 1.0, big, 1.0, -0.0, 2.0**-8, 2.0**-8]],
                            dtype=torch.bfloat16)
    weight = torch.ones(8, dtype=torch.bfloat16)
    _, got = fused_ops.add_rms_norm(x.to(DEVICE), residual.to(DEVICE), weight.to(DEVICE), 1e-6)
    # [inf, -inf, nan, inf (overflow), -big, -0, then ties to even: 1 and 1.015625]
    want, got = x + residual, got.cpu()
    nan = want.isnan()
    assert torch.equal(got.isnan(), nan)
    assert torch.equal(got.view(torch.int16)[~nan], want.view(torch.int16)[~nan])  # bitwise


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("t,h,h_kv,d", [
    (1, 4, 2, 8),      # decode, tiny heads
    (3, 8, 2, 64),     # GQA
    (17, 3, 3, 128),   # non-power-of-two heads, MHA
    (2, 5, 1, 24),     # D/2 = 12 is not a power of two
    (1, 65, 1, 128),   # 65 heads: two [64, 64] tiles in the head loop
])
def test_rotary_matches_reference(t, h, h_kv, d, dtype):
    g = torch.Generator().manual_seed(t * h * d)
    # inputs in [-1, 1]: the half-precision reference's error is relative to the terms
    # x1 cos and x2 sin, not to their (possibly cancelling) sum, so |x| <= 1 bounds it by
    # ~2 ulps of 1 (atol); the rounded-once check below holds at any scale
    qkv = (torch.rand(t, (h + 2 * h_kv) * d, generator=g) * 2 - 1).to(dtype)
    q = qkv[:, :h * d].view(t, h, d)
    k = qkv[:, h * d:(h + h_kv) * d].view(t, h_kv, d)
    positions = torch.randint(0, 4001, (t,), generator=g)
    positions[0] = 4000 if t > 1 else positions[0]
    inv_freq = inv_freq_of(d)
    q_rot, k_rot = fused_ops.rotary(*(a.to(DEVICE) for a in (q, k, positions, inv_freq)))
    want_q, want_k = ref.rotary(q, k, positions, inv_freq)
    for got, want, x in ((q_rot, want_q, q), (k_rot, want_k, k)):
        assert got.shape == x.shape and got.dtype == dtype and got.is_contiguous()
        close(got, want, VS_REFERENCE[dtype])
        exact = ref.rotary(x.float(), x.float(), positions, inv_freq)[0]
        assert_rounded_once(got, exact, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_reference_rotary_with_head_norm_is_qwen3(dtype):
    """q_norm/k_norm: llama.py's RMSNorm of each head, then its RoPE, bit for bit."""
    g = torch.Generator().manual_seed(4)
    t, h, h_kv, d = 5, 4, 2, 32
    rotary = Rotary(config(h, h_kv, d))
    q, k = qkv_views(t, h, h_kv, d, g, dtype, scale=3.0)
    qn, kn = RMSNorm(d, 1e-6), RMSNorm(d, 1e-6)
    qn.weight.data, kn.weight.data = randn(d, gen=g) + 1.0, randn(d, gen=g) + 1.0
    qn.to(dtype), kn.to(dtype)
    positions = torch.tensor([0, 3, 100, 2047, 4000])
    cos, sin = rotary.cos_sin(positions, dtype)
    with torch.no_grad():
        q_rot, k_rot = ref.rotary(q, k, positions, rotary.inv_freq, q_norm_weight=qn.weight,
                                  k_norm_weight=kn.weight, norm_eps=1e-6)
        assert torch.equal(q_rot, apply_rope(qn(q), cos, sin))
        assert torch.equal(k_rot, apply_rope(kn(k), cos, sin))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("t,h,h_kv,d", [(1, 4, 2, 8), (3, 5, 1, 24), (2, 65, 1, 128)])
def test_rotary_with_head_norm_matches_reference(t, h, h_kv, d, dtype):
    g = torch.Generator().manual_seed(7 * t + d)
    q, k = qkv_views(t, h, h_kv, d, g, dtype, scale=5.0)  # the norm brings heads back to ~1
    wq, wk = (randn(d, gen=g, scale=0.5) + 1.0).to(dtype), (randn(d, gen=g, scale=0.5) + 1.0).to(dtype)
    positions = torch.randint(0, 4001, (t,), generator=g)
    inv_freq = inv_freq_of(d)
    norm = dict(q_norm_weight=wq, k_norm_weight=wk, norm_eps=1e-5)
    got_q, got_k = fused_ops.rotary(*(a.to(DEVICE) for a in (q, k, positions, inv_freq)),
                                    **{n: (w.to(DEVICE) if torch.is_tensor(w) else w) for n, w in norm.items()})
    want_q, want_k = ref.rotary(q, k, positions, inv_freq, **norm)
    plain_q, _ = ref.rotary(q, k, positions, inv_freq)
    for got, want in ((got_q, want_q), (got_k, want_k)):
        assert got.dtype == dtype and got.is_contiguous()
        close(got, want, VS_REFERENCE[dtype])
    assert not torch.allclose(want_q.float(), plain_q.float(), atol=0.1)  # the norm did something


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rotary_large_activations_rounded_once(dtype):
    """At activation scale ~8 and positions up to 4000 the kernel still rounds once."""
    g = torch.Generator().manual_seed(3)
    q, k = qkv_views(5, 4, 2, 64, g, dtype, scale=8.0)
    positions = torch.tensor([0, 1, 1000, 3999, 4000])
    inv_freq = inv_freq_of(64)
    q_rot, k_rot = fused_ops.rotary(*(a.to(DEVICE) for a in (q, k, positions, inv_freq)))
    for got, x in ((q_rot, q), (k_rot, k)):
        exact = ref.rotary(x.float(), x.float(), positions, inv_freq)[0]
        assert_rounded_once(got, exact, dtype)


@pytest.mark.filterwarnings("ignore:overflow encountered in exp")  # numpy, exp(100)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("t,i", [(1, 36), (3, 100), (17, 72), (2, 1100)])
def test_silu_mul_matches_reference(t, i, dtype):
    g = torch.Generator().manual_seed(t * i)
    wide = randn(t, 2 * i + 8, gen=g, scale=3, dtype=dtype)
    wide[0, :4] = torch.tensor([-100.0, 100.0, -20.0, 0.0])  # exp(-g) overflows; silu(0) = 0
    gate_up = wide[:, :2 * i]  # row stride 2 I + 8
    out = fused_ops.silu_mul(gate_up.to(DEVICE))
    assert out.shape == (t, i) and out.dtype == dtype and out.is_contiguous()
    close(out, ref.silu_mul(gate_up), VS_REFERENCE[dtype])
    exact = F.silu(gate_up[:, :i].float()) * gate_up[:, i:].float()
    assert_rounded_once(out, exact, dtype)


@pytest.mark.filterwarnings("ignore:overflow encountered in exp")  # numpy, exp(100)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("t,i", [(1, 36), (3, 100), (2, 1100)])
def test_gelu_tanh_mul_matches_reference(t, i, dtype):
    g = torch.Generator().manual_seed(t * i + 1)
    wide = randn(t, 2 * i + 8, gen=g, scale=3, dtype=dtype)
    wide[0, :4] = torch.tensor([-100.0, 100.0, -20.0, 0.0])  # exp(-2u) overflows; gelu(0) = 0
    gate_up = wide[:, :2 * i]  # row stride 2 I + 8
    out = fused_ops.silu_mul(gate_up.to(DEVICE), activation="gelu_tanh")
    assert out.shape == (t, i) and out.dtype == dtype and out.is_contiguous()
    want = ref.silu_mul(gate_up, activation="gelu_tanh")
    close(out, want, VS_REFERENCE[dtype])
    # float64, in the form g * sigmoid(2 u): torch's 0.5 g (1 + tanh(u)) cancels for
    # negative g (to 0 below g ~ -6 even in float64), so it is no rounded-once oracle there
    gate = gate_up[:, :i].double()
    u = math.sqrt(2 / math.pi) * (gate + 0.044715 * gate**3)
    exact = (gate * torch.sigmoid(2 * u) * gate_up[:, i:].double()).float()
    assert_rounded_once(out, exact, dtype)
    assert not torch.allclose(want.float(), ref.silu_mul(gate_up).float(), atol=1e-2)  # not SiLU


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_reference_gelu_tanh_mul_is_gemma_mlp(dtype):
    g = torch.Generator().manual_seed(5)
    cfg = ModelConfig(architecture="gemma", vocab_size=32, hidden_size=64, intermediate_size=37, num_layers=1,
                      num_heads=4, num_kv_heads=2, head_dim=16, hidden_act="gelu_tanh")
    mlp = MLP(cfg).to(dtype)
    mlp.down_proj = nn.Identity()
    x = randn(5, 64, gen=g, dtype=dtype)
    with torch.no_grad():
        gate_up = torch.cat([mlp.gate_proj(x), mlp.up_proj(x)], dim=-1)  # [T, 2 I]
        assert torch.equal(ref.silu_mul(gate_up, activation="gelu_tanh"), mlp(x))


def test_empty_batch():
    x = torch.empty(0, 8, device=DEVICE)
    normed, new_residual = fused_ops.add_rms_norm(x, x, torch.ones(8, device=DEVICE), 1e-6)
    assert normed.shape == new_residual.shape == (0, 8)
    q, k = torch.empty(0, 2, 8, device=DEVICE), torch.empty(0, 1, 8, device=DEVICE)
    q_rot, k_rot = fused_ops.rotary(q, k, torch.empty(0, dtype=torch.int64, device=DEVICE),
                                    inv_freq_of(8).to(DEVICE))
    assert q_rot.shape == (0, 2, 8) and k_rot.shape == (0, 1, 8)
    assert fused_ops.silu_mul(torch.empty(0, 6, device=DEVICE)).shape == (0, 3)


# ------------------------------------------------------------------------------------
# argument checks: the same ValueError from both paths
# ------------------------------------------------------------------------------------

IMPLS = [pytest.param(ref, id="reference"), pytest.param(fused_ops, id="triton")]
_bf16 = torch.bfloat16


def _norm_args(**kw):
    args = dict(x=torch.zeros(3, 8), residual=torch.zeros(3, 8), weight=torch.ones(8), eps=1e-6)
    args.update(kw)
    return args


def _rope_args(**kw):
    q, k = qkv_views(3, 4, 2, 8, torch.Generator().manual_seed(0), torch.float32)
    args = dict(q=q, k=k, positions=torch.arange(3), inv_freq=inv_freq_of(8))
    args.update(kw)
    return args


NORM_CASES = [
    (dict(x=torch.zeros(8)), r"x must be 2-D \[T, N\], got shape \(8,\)"),
    (dict(x=torch.zeros(3, 8, dtype=torch.int32)), r"x must be float16, bfloat16 or float32"),
    (dict(x=torch.zeros(8, 3).t()), r"x must have stride 1 in its last dimension"),
    (dict(residual=torch.zeros(3, 9)), r"residual must have x's shape \(3, 8\), got \(3, 9\)"),
    (dict(residual=torch.zeros(3, 8, dtype=_bf16)), r"residual is torch.bfloat16 but x is"),
    (dict(residual=torch.zeros(3, 8, device="meta")), r"residual is on meta but x is on cpu"),
    (dict(weight=torch.ones(9)), r"weight must have shape \(8,\) \(N of x \(3, 8\)\)"),
    (dict(weight=torch.ones(8, dtype=_bf16)), r"weight is torch.bfloat16 but x is torch.float32"),
    (dict(weight=torch.ones(8, device="meta")), r"weight is on meta but x is on cpu"),
    (dict(eps=-1.0), r"eps must be a host float >= 0, got -1.0"),
    (dict(eps=torch.tensor(1e-6)), r"eps must be a host float >= 0, got tensor"),
]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("kw,message", NORM_CASES)
def test_add_rms_norm_rejects(impl, kw, message):
    with pytest.raises(ValueError, match=message):
        impl.add_rms_norm(**_norm_args(**kw))


ROPE_CASES = [
    (dict(q=torch.zeros(3, 32)), r"q must be 3-D \[T, H, D\], got shape \(3, 32\)"),
    (dict(k=torch.zeros(3, 2, 16)), r"k must have shape \(3, H_kv, 8\) \(T and D of q"),
    (dict(k=torch.zeros(2, 2, 8)), r"k must have shape \(3, H_kv, 8\)"),
    (dict(q=torch.zeros(3, 4, 7), k=torch.zeros(3, 2, 7)), r"the head dim D must be even"),
    (dict(k=torch.zeros(3, 2, 8, dtype=_bf16)), r"k is torch.bfloat16 but q is torch.float32"),
    (dict(q=torch.zeros(3, 8, 4).transpose(1, 2)), r"q must have stride 1 in its last dim"),
    (dict(positions=torch.arange(4)), r"positions must have shape \(3,\) \(T of q\), got \(4,\)"),
    (dict(positions=torch.zeros(3)), r"positions must be int64 or int32, got torch.float32"),
    (dict(inv_freq=inv_freq_of(16)), r"inv_freq must have shape \(4,\) \(D / 2 of q"),
    (dict(inv_freq=inv_freq_of(8).to(_bf16)), r"inv_freq must be float32 \(RoPE frequencies"),
    (dict(positions=torch.arange(3, device="meta")), r"positions is on meta but q is on cpu"),
    (dict(k=torch.zeros(3, 2, 8, device="meta")), r"k is on meta but q is on cpu"),
    (dict(q_norm_weight=torch.ones(8)), r"q_norm_weight and k_norm_weight go together"),
    (dict(q_norm_weight=torch.ones(4), k_norm_weight=torch.ones(8)),
     r"q_norm_weight must have shape \(8,\) \(D of q"),
    (dict(q_norm_weight=torch.ones(8), k_norm_weight=torch.ones(8, dtype=_bf16)),
     r"k_norm_weight is torch.bfloat16 but q is torch.float32"),
    (dict(q_norm_weight=torch.ones(8), k_norm_weight=torch.ones(8), norm_eps=-1.0),
     r"norm_eps must be a host float >= 0"),
]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("kw,message", ROPE_CASES)
def test_rotary_rejects(impl, kw, message):
    with pytest.raises(ValueError, match=message):
        impl.rotary(**_rope_args(**kw))


@pytest.mark.parametrize("impl", IMPLS)
def test_unknown_activation_rejected(impl):
    with pytest.raises(ValueError, match="activation must be one of silu, gelu_tanh, got 'relu'"):
        impl.silu_mul(torch.zeros(2, 8), activation="relu")


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("gate_up,message", [
    (torch.zeros(3, 7), r"gate_up must be \[T, 2 I\] with an even, non-zero last dim"),
    (torch.zeros(2, 3, 8), r"gate_up must be 2-D \[T, 2 I\], got shape \(2, 3, 8\)"),
    (torch.zeros(3, 8, dtype=torch.float64), r"gate_up must be float16, bfloat16 or float32"),
    (torch.zeros(8, 3).t(), r"gate_up must have stride 1 in its last dimension"),
])
def test_silu_mul_rejects(impl, gate_up, message):
    with pytest.raises(ValueError, match=message):
        impl.silu_mul(gate_up)


@pytest.mark.parametrize("impl", IMPLS)
def test_non_tensor_is_a_type_error(impl):
    with pytest.raises(TypeError, match=r"x must be a torch.Tensor, got list"):
        impl.add_rms_norm([[1.0]], None, torch.ones(1), 1e-6)
    with pytest.raises(TypeError, match=r"positions must be a torch.Tensor, got range"):
        impl.rotary(**_rope_args(positions=range(3)))


def test_triton_add_rms_norm_row_limit():
    x = torch.zeros(1, fused_ops.MAX_NORM_COLS + 1)
    with pytest.raises(ValueError, match=r"N must be <= 65536, got x of shape \(1, 65537\)"):
        fused_ops.add_rms_norm(x, None, torch.ones(x.shape[1]), 1e-6)
