"""Input checks shared by the Triton kernel launchers.

Each check raises ``ValueError`` (or ``TypeError`` for a non-tensor) with a message that
names the argument, its shape/dtype/device and what was expected; none reads device
memory, so none syncs. The checks specific to one op live beside its launcher.
"""

from __future__ import annotations

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
