"""Kernel backends: the Triton kernels and the PyTorch reference behind one interface.

``get_backend("torch")`` returns the reference path (kernels/reference/), the CPU
backend and test oracle. ``get_backend("triton")`` returns the Triton kernels; on a machine
without CUDA they run through Triton's interpreter, which must be switched on before the
kernel modules are imported — ``get_backend`` does that when it imports them.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch

from . import reference

BACKENDS = ("torch", "triton")


@dataclass(frozen=True)
class Backend:
    name: str
    write_kv: Callable
    verify_attention: Callable
    rejection_sample: Callable
    tree_rejection_sample: Callable
    draft_sample: Callable  # draft tokens + their DraftDist from draft logits
    add_rms_norm: Callable
    rotary: Callable
    silu_mul: Callable


def _reference_attention(*args, max_query_len=None, max_seq_len=None, **kwargs):
    return reference.verify_attention(*args, **kwargs)


def _require_interpreter() -> None:
    """On a machine without CUDA, Triton kernels run only through its interpreter.

    Triton reads TRITON_INTERPRET when ``@triton.jit`` decorates a function, i.e. when
    triton and the kernel modules are imported; set here, it only helps if triton has not
    been imported yet (``import specdec`` sets it early for that reason).
    """
    os.environ.setdefault("TRITON_INTERPRET", "1")
    import triton.language as tl

    if type(tl.zeros).__name__ != "InterpretedFunction":
        raise RuntimeError(
            "backend='triton' on a machine without CUDA needs Triton's interpreter, but triton was "
            "imported before TRITON_INTERPRET=1 was set. Set TRITON_INTERPRET=1 in the environment, "
            "or import specdec before anything that imports triton (transformers' models do)."
        )


def _unchecked(module) -> tuple[Callable, ...]:
    """The fused elementwise ops without their host-side argument checks: the model calls
    them several times per layer with tensors it shapes itself."""
    return tuple(partial(getattr(module, op), check=False) for op in ("add_rms_norm", "rotary", "silu_mul"))


def get_backend(name: str) -> Backend:
    if name == "torch":
        return Backend("torch", reference.write_kv, _reference_attention, reference.rejection_sample,
                       reference.tree_rejection_sample, reference.draft_sample, *_unchecked(reference))
    if name == "triton":
        if not torch.cuda.is_available():
            _require_interpreter()
        import importlib

        fused_ops = importlib.import_module(f"{__name__}.fused_ops")
        kv_cache_ops = importlib.import_module(f"{__name__}.kv_cache_ops")
        rejection_sampling = importlib.import_module(f"{__name__}.rejection_sampling")
        draft_sampling = importlib.import_module(f"{__name__}.draft_sampling")
        tree_sampling = importlib.import_module(f"{__name__}.tree_sampling")
        verify_attention = importlib.import_module(f"{__name__}.verify_attention")

        return Backend("triton", kv_cache_ops.write_kv, verify_attention.verify_attention,
                       rejection_sampling.rejection_sample, tree_sampling.tree_rejection_sample,
                       draft_sampling.draft_sample, *_unchecked(fused_ops))
    raise ValueError(f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)}")


__all__ = ["BACKENDS", "Backend", "get_backend"]
