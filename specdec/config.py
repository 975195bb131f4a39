"""``EngineConfig``: every ``LLM`` option, checked and resolved before anything is loaded."""

from __future__ import annotations

import numbers
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .drafters.factory import DrafterSpec
from .kernels import BACKENDS

DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@dataclass
class EngineConfig:
    """The options of ``LLM`` (documented there). ``__post_init__`` checks every one and
    raises ``ValueError`` / ``TypeError`` naming the option, then resolves the defaults:

    device       None -> CUDA when present, else CPU (a ``torch.device`` after this)
    dtype        None -> bfloat16 on CUDA, float32 on CPU
    backend      "auto" -> "triton" on CUDA, "torch" elsewhere
    cuda_graphs  None -> on with CUDA, the Triton backend and a drafter the fixed-shape
                 step covers (not n-gram, no tree)
    adaptive     None -> on with CUDA graphs and a drafter
    drafter      the parsed ``draft`` and ``draft_tree`` (``DrafterSpec``)

    >>> EngineConfig("out/stories260K", "early-exit:2", device="cpu").draft_slots  # doctest: +SKIP
    4
    """

    target: str | Path
    draft: str | Path | None = None
    num_draft_tokens: int = 4
    device: torch.device | str | None = None  # a torch.device after __post_init__
    dtype: torch.dtype | None = None  # set after __post_init__
    backend: str = "auto"
    kv_cache_memory: float | None = None
    block_size: int = 16
    max_num_seqs: int = 64
    seed: int | None = None
    draft_tree: tuple[int, ...] | str | None = None
    adaptive: bool | None = None
    cuda_graphs: bool | None = None
    drafter: DrafterSpec = field(init=False)

    def __post_init__(self):
        self._check_sizes()
        device = self._resolve_device()
        self._check_numbers()
        if self.backend == "auto":
            self.backend = "triton" if device.type == "cuda" else "torch"
        self.drafter = DrafterSpec.parse(self.draft, self.draft_tree)  # names checked before anything loads
        self._resolve_speculation(device)

    # ------------------------------------------------------------------ checks
    def _check_sizes(self) -> None:
        k = self.num_draft_tokens
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"num_draft_tokens must be an integer >= 1, got {k!r}")
        if self.backend not in BACKENDS + ("auto",):
            raise ValueError(f"backend must be one of 'auto', {', '.join(map(repr, BACKENDS))}; got {self.backend!r}")
        sizes = (self.block_size, self.max_num_seqs)
        if not all(_is_int(n) and n >= 1 for n in sizes):
            raise ValueError(f"block_size and max_num_seqs must be integers >= 1, got {sizes[0]!r}, {sizes[1]!r}")

    def _resolve_device(self) -> torch.device:
        self.device = device = torch.device(self.device) if self.device is not None else default_device()
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device {str(device)!r} was asked for but this torch build or machine has no "
                             "CUDA device: pass device='cpu'")
        if self.dtype is None:
            self.dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        if self.dtype not in DTYPES:
            raise TypeError(f"dtype must be torch.float32, float16 or bfloat16, got {self.dtype}")
        return device

    def _check_numbers(self) -> None:
        m = self.kv_cache_memory
        if m is not None and (not isinstance(m, numbers.Real) or isinstance(m, bool) or not m > 0):
            raise ValueError(f"kv_cache_memory must be a number of bytes > 0 (or None for the default), got {m!r}")
        s = self.seed
        if s is not None and (not _is_int(s) or s < 0):
            raise ValueError(f"seed must be None or an integer >= 0, got {s!r}")

    def _resolve_speculation(self, device: torch.device) -> None:
        """cuda_graphs and adaptive: checked against the device, backend and drafter, then
        their defaults."""
        for name in ("adaptive", "cuda_graphs"):
            flag = getattr(self, name)
            if flag is not None and not isinstance(flag, bool):
                raise TypeError(f"{name} must be True, False or None, got {flag!r}")
        spec = self.drafter
        graphs_possible = device.type == "cuda" and self.backend == "triton"
        if self.cuda_graphs and not graphs_possible:
            raise ValueError(f"cuda_graphs=True needs a CUDA device and the Triton backend, got device "
                             f"{device} and backend {self.backend!r}: pass cuda_graphs=False")
        if self.cuda_graphs and not spec.fixed_shape:
            raise ValueError("cuda_graphs=True does not cover the n-gram drafter or draft trees (they run "
                             "eagerly): pass cuda_graphs=False or None")
        if self.adaptive and (spec.tree is not None or spec.kind == "none"):
            raise ValueError("adaptive speculation chooses a chain length: it needs a drafter and no "
                             "draft_tree; pass adaptive=False")
        if self.cuda_graphs is None:
            self.cuda_graphs = graphs_possible and spec.fixed_shape
        if self.adaptive is None:
            self.adaptive = self.cuda_graphs and spec.kind != "none"

    # ------------------------------------------------------------------ derived
    @property
    def draft_slots(self) -> int:
        """Cache slots one step's drafts take (the engine's ``num_draft_tokens``): 0
        without a drafter, the tree's nodes, else the chain length."""
        return self.drafter.draft_slots(self.num_draft_tokens)


def _is_int(x) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)
