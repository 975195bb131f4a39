"""Count what Triton kernels read, under the interpreter: bytes per tensor, launches, programs.

Used for the memory-traffic budgets of the samplers ("passes over the logits") and their
grid-size budgets. Only meaningful with TRITON_INTERPRET=1 (the CPU test set-up): every
``tl.load`` then goes through the interpreter builder's ``create_masked_load`` with the
absolute addresses of its lanes, and every launch through ``GridExecutor.__call__``.

Example::

    with LoadCounter(logits=logits) as counter:
        rejection_sample(logits, ...)
    counter.passes("logits")        # bytes read from logits' storage / logits.nbytes
    counter.launches                # [(kernel name, (gx, gy, gz)), ...]
    counter.max_programs            # the largest grid of any launch

``LoadCounter(dry_run=True)`` records the launches without running any program (for grid
budgets of huge shapes; outputs are then garbage).

A masked-out lane reads nothing; a lane whose address lies in a tensor's byte range
[data_ptr, data_ptr + nbytes) counts ``itemsize`` bytes for that tensor (every lane
counts, so a block that loads the same element twice counts it twice, as a GPU's L1
might not).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from triton.runtime import interpreter


class LoadCounter:
    """Context manager counting bytes loaded from named tensors and the launches made.

    tensors: name -> torch tensor (CPU); each tensor's storage range is tracked
    """

    def __init__(self, dry_run: bool = False, **tensors: torch.Tensor):
        if type(interpreter.interpreter_builder).__name__ != "InterpreterBuilder":
            raise RuntimeError("LoadCounter needs Triton's interpreter (TRITON_INTERPRET=1)")
        self._ranges = {}
        for name, t in tensors.items():
            start = t.data_ptr()
            self._ranges[name] = (start, start + t.numel() * t.element_size(), t.numel() * t.element_size())
        self.bytes = {name: 0 for name in tensors}
        self.launches: list[tuple[str, tuple[int, int, int]]] = []
        self.dry_run = dry_run  # record the launches without running them

    # -- hooks --
    def _load(self, ptrs, mask, other, *args, **kwargs):
        addr = np.asarray(ptrs.data).astype(np.uint64).ravel()
        live = np.asarray(mask.data).astype(bool).ravel()
        if live.size == 1 and addr.size > 1:
            live = np.broadcast_to(live, addr.shape)
        itemsize = np.dtype(interpreter._get_np_dtype(ptrs.get_element_ty())).itemsize
        addr = addr[live]
        for name, (lo, hi, _) in self._ranges.items():
            self.bytes[name] += int(((addr >= lo) & (addr < hi)).sum()) * itemsize
        return self._orig_load(ptrs, mask, other, *args, **kwargs)

    def _call(self, executor, *args, **kwargs):
        grid = executor.grid
        if not callable(grid):
            g = tuple(int(d) for d in grid) + (1,) * (3 - len(grid))
            self.launches.append((executor.fn.__name__, g))
        if self.dry_run:
            return None
        return self._orig_call(executor, *args, **kwargs)

    def __enter__(self) -> LoadCounter:
        builder = interpreter.interpreter_builder
        self._orig_load = builder.create_masked_load
        self._orig_call = interpreter.GridExecutor.__call__
        counter = self
        builder.create_masked_load = self._load

        def call(executor, *args, **kwargs):
            return counter._call(executor, *args, **kwargs)

        interpreter.GridExecutor.__call__ = call
        return self

    def __exit__(self, *exc) -> None:
        del interpreter.interpreter_builder.create_masked_load  # back to the class method
        interpreter.GridExecutor.__call__ = self._orig_call

    # -- results --
    def passes(self, name: str) -> float:
        """Bytes loaded from tensor ``name`` divided by its size in bytes."""
        return self.bytes[name] / self._ranges[name][2]

    @property
    def max_programs(self) -> int:
        """Programs in the largest grid launched inside the block (0 if none)."""
        return max((math.prod(g) for _, g in self.launches), default=0)
