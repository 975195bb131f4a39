"""What a CUDA graph captures must not sync nor copy from the host: checked on CPU.

``DecodeRunner`` captures ``_StaticStep.draft`` and ``_StaticStep.verify``. Under stream
capture a host-to-device copy of fresh data (``torch.tensor(..., device=...)``), a read of
a device value (``.item()``, ``.tolist()``, ``bool(t)``, ``nonzero``, boolean indexing,
``.cpu()``) or a synchronize fails or silently bakes a stale value into the graph. Here the
fixed-shape steps run eagerly on CPU, with the Triton kernels interpreted, under a guard
that raises on every such operation (the kernels' interpreted bodies are not checked:
on a GPU they are single launches; their launchers' host code is).

Every sampling mode x every drafter the runner covers (none, a draft model, early exit,
an EAGLE-3 head: its state load is host work before the graphs, its chain and the
head pass over the verified rows' captured features are inside them),
plus a mutation check: a scale tensor built with ``torch.tensor(..., device=...)`` put
back into the draft step (the bug the Philox scale once had) makes the guard fail.
"""

from __future__ import annotations

import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from checkpoints import make_checkpoint, perturbed_copy
from eagle3_reference import make_eagle3_head
from specdec import LLM
from specdec.cuda_graphs import SAMPLING_MODES
from specdec.drafters.draft_model import ModelDrafter
from specdec.kernels import _radix

K = 2
BUCKET = 2

# Tensor methods / torch functions that read device data on the host, or build a tensor
# from host data (an H2D copy at capture time)
_FORBIDDEN_FUNCTIONS = {
    "tolist", "item", "cpu", "numpy", "__bool__", "__int__", "__float__", "__index__",
    "tensor", "as_tensor", "from_numpy", "nonzero", "argwhere", "masked_select", "unique",
    "unique_consecutive", "equal", "allclose", "synchronize",
}
# ATen ops that sync (data-dependent output size or a scalar read) or lift host data
_FORBIDDEN_OPS = {
    "aten.lift_fresh", "aten.lift_fresh_copy", "aten._local_scalar_dense", "aten.nonzero",
    "aten.argwhere", "aten.masked_select", "aten._unique", "aten._unique2", "aten.unique_dim",
    "aten.unique_consecutive", "aten.equal", "aten.is_nonzero", "aten.item",
}


class CaptureViolation(AssertionError):
    """An operation that stream capture forbids, or that waits for the device."""


class _Functions(TorchFunctionMode):
    def __init__(self, guard):
        super().__init__()
        self.guard = guard

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if not self.guard.paused:
            name = getattr(func, "__name__", str(func))
            if name in _FORBIDDEN_FUNCTIONS:
                raise CaptureViolation(f"{name}() inside a captured step")
            if name in ("to", "cuda") and (any(isinstance(a, (str, torch.device)) for a in args[1:])
                                           or "device" in kwargs):
                raise CaptureViolation(f".{name}(device) inside a captured step (a copy between devices)")
        return func(*args, **kwargs)


class _Ops(TorchDispatchMode):
    def __init__(self, guard):
        super().__init__()
        self.guard = guard

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if not self.guard.paused:
            name = str(func.overloadpacket)
            if name in _FORBIDDEN_OPS:
                raise CaptureViolation(f"{func} inside a captured step")
            if name in ("aten.index", "aten.index_put", "aten.index_put_"):
                indices = args[1] if len(args) > 1 else []
                if any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in indices):
                    raise CaptureViolation(f"boolean-mask indexing ({func}) inside a captured step")
            if name in ("aten._to_copy", "aten.copy_"):
                src = args[1] if name == "aten.copy_" else args[0]
                dst_device = args[0].device if name == "aten.copy_" else (kwargs.get("device") or src.device)
                if isinstance(src, torch.Tensor) and torch.device(dst_device) != src.device:
                    raise CaptureViolation(f"{func} from {src.device} to {dst_device} inside a captured step")
        return func(*args, **kwargs)


class CaptureGuard:
    """Context manager raising CaptureViolation on what CUDA stream capture forbids.

    Triton kernel bodies run through the interpreter on CPU (numpy and host copies of
    their arguments); the guard pauses inside them, so only the code a graph would
    capture around the launches is checked.
    """

    def __init__(self):
        self.paused = 0

    def __enter__(self):
        from triton.runtime.interpreter import InterpretedFunction

        self._run = InterpretedFunction.run
        guard = self

        def run(fn, *args, **kwargs):
            guard.paused += 1
            try:
                return guard._run(fn, *args, **kwargs)
            finally:
                guard.paused -= 1

        InterpretedFunction.run = run
        self._sync = torch.cuda.synchronize
        torch.cuda.synchronize = lambda *a, **k: (_ for _ in ()).throw(
            CaptureViolation("torch.cuda.synchronize() inside a captured step"))
        self._modes = [_Functions(self), _Ops(self)]
        for mode in self._modes:
            mode.__enter__()
        return self

    def __exit__(self, *exc):
        for mode in reversed(self._modes):
            mode.__exit__(*exc)
        from triton.runtime.interpreter import InterpretedFunction

        InterpretedFunction.run = self._run
        torch.cuda.synchronize = self._sync
        return False


# --------------------------------------------------------------------------- the guard itself


@pytest.mark.parametrize("bad", [
    lambda x: x.sum().item(), lambda x: x.tolist(), lambda x: bool(x[0]), lambda x: x.nonzero(),
    lambda x: x[x > 1], lambda x: torch.tensor([1.0], device=x.device), lambda x: x.cpu(),
    lambda x: x.to("cpu"), lambda x: torch.cuda.synchronize(), lambda x: int(x[1]),
], ids=["item", "tolist", "bool", "nonzero", "bool-index", "tensor", "cpu", "to-device", "sync", "int"])
def test_the_guard_catches_each_forbidden_operation(bad):
    x = torch.arange(4.0)
    with pytest.raises(CaptureViolation), CaptureGuard():
        bad(x)


def test_the_guard_lets_device_side_work_through():
    x = torch.arange(4.0)
    with CaptureGuard():
        y = torch.where(x > 1, x * 2.0, x).cumsum(0)
        z = torch.empty(3, dtype=torch.int64).fill_(7) + torch.arange(3)
        w = y.argmax(-1, keepdim=True).to(torch.int32)
    assert y.shape == (4,) and z.shape == (3,) and w.dtype == torch.int32


# --------------------------------------------------------------------------- the static steps


# the static steps run on CPU with the kernels interpreted; on a GPU the capture itself
# is the check (the gpu tests of tests/test_cuda_graphs.py)
on_cpu = pytest.mark.skipif(torch.cuda.is_available(), reason="interprets the kernels on CPU")


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("capture")
    target = make_checkpoint(root / "target", num_layers=2, seed=0)
    head = make_eagle3_head(root / "head", vocab_size=97, target_hidden=32, draft_vocab_size=50, aux_ids=[0, 1],
                            seed=1)
    return {"target": target, "near": perturbed_copy(target, root / "near", noise=0.05, seed=4), "head": head}


def _static_step(dirs, draft, mode):
    """The (bucket 4, k, mode) step of a runner on the Triton kernels, inputs staged the
    way warm_up stages them (padding rows; temperature 1 unless greedy)."""
    draft = str(dirs[draft]) if draft in dirs else draft
    llm = LLM(str(dirs["target"]), draft=draft, num_draft_tokens=K, device="cpu", dtype=torch.float32,
              backend="triton", block_size=4, seed=0, max_num_seqs=BUCKET)
    runner = llm.decode_runner(use_graphs=False)
    k = runner.max_k
    runner.load([], None, [], bucket=BUCKET, pad=(0.0 if mode == "greedy" else 1.0, k))
    runner.inputs.top_k[:BUCKET] = 5 if mode == "filtered" else 0  # exercise the filters for real
    return runner._step(BUCKET, k, mode)


@on_cpu
@pytest.mark.filterwarnings("ignore:Conversion of an array with ndim:DeprecationWarning")  # interpreter
@pytest.mark.parametrize("mode", SAMPLING_MODES)
@pytest.mark.parametrize("draft", [None, "near", "early-exit:1", "head"],
                         ids=["none", "draft-model", "early-exit", "eagle3"])
def test_captured_steps_neither_sync_nor_copy_from_the_host(dirs, draft, mode, monkeypatch):
    step = _static_step(dirs, draft, mode)
    # the host code a GPU runs: the samplers' interpreter-only shortcut (stop the radix
    # rounds once every row is settled, a host read) is off, as it is on a GPU
    monkeypatch.setattr(_radix, "_INTERPRETED", False)
    with CaptureGuard():
        step.run(None)  # exactly what capture() records: draft() (k > 0), then verify()
    assert step.out.shape == (BUCKET, step.k + 1)
    assert bool((step.n_acc >= 0).all())
    if draft is not None:
        assert step.k == K and step.drafts.shape == (BUCKET, K)


def _sample_with_a_host_scale(original):
    """The draft step's sampling with a host-built scale tensor put back (the bug the
    Philox scale once had: ``torch.tensor(..., device=x.device)``, an H2D copy)."""
    def sample(self, logits, sampling, j):
        scale = torch.tensor(1.0, dtype=torch.float32, device=logits.device)
        return original(self, logits * scale, sampling, j)
    return sample


@on_cpu
@pytest.mark.filterwarnings("ignore:Conversion of an array with ndim:DeprecationWarning")
def test_mutation_a_host_tensor_in_the_draft_step_is_caught(dirs, monkeypatch):
    step = _static_step(dirs, "near", "sample")
    monkeypatch.setattr(ModelDrafter, "sample", _sample_with_a_host_scale(ModelDrafter.sample))
    with pytest.raises(CaptureViolation, match="tensor"), CaptureGuard():
        step.draft()
    monkeypatch.undo()
    with CaptureGuard():  # and the unmutated step passes
        step.draft()
