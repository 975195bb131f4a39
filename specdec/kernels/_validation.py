"""Input checks shared by the Triton kernel launchers.

Each check raises ``ValueError`` (or ``TypeError`` for a non-tensor) with a message that
names the argument, its shape/dtype/device and what was expected; none reads device
memory, so none syncs. The checks specific to one op live beside its launcher.
"""

from __future__ import annotations

import math

import torch

CACHE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def shape_of(t: torch.Tensor) -> tuple[int, ...]:
    """``t.shape`` as a plain tuple, for messages: ``(4, 16)`` rather than ``torch.Size``."""
    return tuple(t.shape)


def require(cond: bool, message: str) -> None:
    if not cond:
        raise ValueError(message)


def require_tensor(name: str, t) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")


def require_unit_stride(name: str, t: torch.Tensor) -> None:
    """The kernels address the last dimension as contiguous (offset ``+ d``)."""
    require(t.dim() == 0 or t.shape[-1] <= 1 or t.stride(-1) == 1,
            f"{name} must have stride 1 in its last dimension, got strides {t.stride()}")


def require_same_device(ref_name: str, ref: torch.Tensor, **tensors: torch.Tensor) -> None:
    """Every tensor in ``tensors`` is on ``ref``'s device (``ref_name`` names ``ref``)."""
    for name, t in tensors.items():
        require(t.device == ref.device,
                f"{name} is on {t.device} but {ref_name} is on {ref.device}; "
                f"all must share a device")


def check_kv_cache(k_cache: torch.Tensor, v_cache: torch.Tensor) -> None:
    """k_cache, v_cache: [num_blocks, block_size, H_kv, D], one shape, dtype and device."""
    require_tensor("k_cache", k_cache)
    require_tensor("v_cache", v_cache)
    require(k_cache.dim() == 4,
            f"k_cache must be [num_blocks, block_size, H_kv, D], got shape {shape_of(k_cache)}")
    require(k_cache.shape == v_cache.shape,
            f"k_cache has shape {shape_of(k_cache)} but v_cache has {shape_of(v_cache)}")
    require(k_cache.dtype == v_cache.dtype,
            f"k_cache is {k_cache.dtype} but v_cache is {v_cache.dtype}")
    require(k_cache.dtype in CACHE_DTYPES,
            f"k_cache dtype must be float16, bfloat16 or float32, got {k_cache.dtype}")
    require(k_cache.device == v_cache.device,
            f"k_cache is on {k_cache.device} but v_cache is on {v_cache.device}")
    require_unit_stride("k_cache", k_cache)
    require_unit_stride("v_cache", v_cache)


def check_index(name: str, t: torch.Tensor, length: int, dtype: torch.dtype,
                what: str) -> None:
    """A 1-D ``[length]`` tensor of ``dtype``; ``what`` says where ``length`` comes from."""
    require_tensor(name, t)
    require(t.dim() == 1 and t.shape[0] == length,
            f"{name} must have shape ({length},) ({what}), got {shape_of(t)}")
    require(t.dtype == dtype, f"{name} must be {dtype}, got {t.dtype}")
    require_unit_stride(name, t)


def check_host_int(name: str, value) -> None:
    """None or a Python int >= 0 (a host-side size hint; a bool is refused)."""
    require(value is None or (isinstance(value, int) and not isinstance(value, bool)
                              and value >= 0),
            f"{name} must be None or an int >= 0, got {value!r}")


def check_window_args(sliding_window, softcap) -> None:
    """verify_attention's ``sliding_window`` (None or an int >= 1) and ``softcap`` (None or a
    finite float > 0)."""
    require(sliding_window is None or (isinstance(sliding_window, int) and not isinstance(sliding_window, bool)
                                       and sliding_window >= 1),
            f"sliding_window must be None or an integer >= 1, got {sliding_window!r}")
    require(softcap is None or (isinstance(softcap, (int, float)) and not isinstance(softcap, bool)
                                and math.isfinite(softcap) and softcap > 0),
            f"softcap must be None or a finite float > 0, got {softcap!r}")


# Fused elementwise ops (add_rms_norm, rotary, silu_mul): the reference and the launchers
# in fused_ops.py apply these same checks.

_ACTIVATION_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _require_activation(name: str, t: torch.Tensor, rank: int, layout: str) -> None:
    """A ``rank``-D float16/bfloat16/float32 tensor with stride 1 in its last dimension."""
    require_tensor(name, t)
    require(t.dim() == rank, f"{name} must be {rank}-D {layout}, got shape {shape_of(t)}")
    require(t.dtype in _ACTIVATION_DTYPES,
            f"{name} must be float16, bfloat16 or float32, got {t.dtype}")
    require_unit_stride(name, t)


def check_add_rms_norm_args(x, residual, weight, eps) -> None:
    _require_activation("x", x, 2, "[T, N]")
    n = x.shape[1]
    require(n >= 1, f"x must have at least one column, got shape {shape_of(x)}")
    if residual is not None:
        _require_activation("residual", residual, 2, "[T, N]")
        require(residual.shape == x.shape,
                f"residual must have x's shape {shape_of(x)}, got {shape_of(residual)}")
        require(residual.dtype == x.dtype, f"residual is {residual.dtype} but x is {x.dtype}")
        require_same_device("x", x, residual=residual)
    _require_activation("weight", weight, 1, "[N]")
    require(weight.shape[0] == n, f"weight must have shape ({n},) (N of x {shape_of(x)}), "
            f"got {shape_of(weight)}")
    require(weight.dtype == x.dtype, f"weight is {weight.dtype} but x is {x.dtype}")
    require_same_device("x", x, weight=weight)
    require(isinstance(eps, (int, float)) and not isinstance(eps, bool) and math.isfinite(eps)
            and eps >= 0, f"eps must be a host float >= 0, got {eps!r}")


def check_rotary_args(q, k, positions, inv_freq, q_norm_weight=None, k_norm_weight=None,
                       norm_eps=1e-6) -> None:
    _require_activation("q", q, 3, "[T, H, D]")
    _require_activation("k", k, 3, "[T, H_kv, D]")
    t, _, d = q.shape
    require(k.shape[0] == t and k.shape[2] == d,
            f"k must have shape ({t}, H_kv, {d}) (T and D of q {shape_of(q)}), got {shape_of(k)}")
    require(d >= 2 and d % 2 == 0, f"the head dim D must be even, got q of shape {shape_of(q)}")
    require(k.dtype == q.dtype, f"k is {k.dtype} but q is {q.dtype}")
    require_tensor("positions", positions)
    require(positions.dim() == 1 and positions.shape[0] == t,
            f"positions must have shape ({t},) (T of q), got {shape_of(positions)}")
    require(positions.dtype in (torch.int32, torch.int64),
            f"positions must be int64 or int32, got {positions.dtype}")
    require_unit_stride("positions", positions)
    require_tensor("inv_freq", inv_freq)
    require(inv_freq.dim() == 1 and inv_freq.shape[0] == d // 2,
            f"inv_freq must have shape ({d // 2},) (D / 2 of q {shape_of(q)}), "
            f"got {shape_of(inv_freq)}")
    require(inv_freq.dtype == torch.float32, f"inv_freq must be float32 (RoPE frequencies "
            f"stay fp32 whatever the model's dtype), got {inv_freq.dtype}")
    require_unit_stride("inv_freq", inv_freq)
    require_same_device("q", q, k=k, positions=positions, inv_freq=inv_freq)
    require((q_norm_weight is None) == (k_norm_weight is None),
            "q_norm_weight and k_norm_weight go together: pass both (a per-head q/k norm) or neither")
    for name, w in (("q_norm_weight", q_norm_weight), ("k_norm_weight", k_norm_weight)):
        if w is None:
            continue
        _require_activation(name, w, 1, "[D]")
        require(w.shape[0] == d, f"{name} must have shape ({d},) (D of q {shape_of(q)}), "
                f"got {shape_of(w)}")
        require(w.dtype == q.dtype, f"{name} is {w.dtype} but q is {q.dtype}")
        require_same_device("q", q, **{name: w})
    require(isinstance(norm_eps, (int, float)) and not isinstance(norm_eps, bool)
            and math.isfinite(norm_eps) and norm_eps >= 0,
            f"norm_eps must be a host float >= 0, got {norm_eps!r}")


ACTIVATIONS = ("silu", "gelu_tanh")


def check_silu_mul_args(gate_up, activation: str = "silu") -> None:
    require(activation in ACTIVATIONS,
            f"activation must be one of {', '.join(ACTIVATIONS)}, got {activation!r}")
    _require_activation("gate_up", gate_up, 2, "[T, 2 I]")
    require(gate_up.shape[1] >= 2 and gate_up.shape[1] % 2 == 0,
            f"gate_up must be [T, 2 I] with an even, non-zero last dim, got {shape_of(gate_up)}")

