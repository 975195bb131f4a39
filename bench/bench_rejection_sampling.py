"""Chain rejection sampling (and the draft side) against the read-once floor.

    python -m pytest bench/ --benchmark-only          # collects bench_*.py (pyproject)
    python bench/bench_rejection_sampling.py          # GPU: the markdown table

On a GPU the sweep is B in {1, 16, 64}, k in {4, 8}, V = 128,256, bf16 logits; without
one it is a smoke run under Triton's interpreter (B = 1, k = 4, V = 2048). Each case
reports in extra_info:

    bytes   = what a read-once sampler must move: the target logits B (k + 1) V once, and
              with the draft side the draft logits B k V once (model dtype)
    floor   = bytes / the device's measured copy bandwidth (a device-to-device copy of
              256 MiB: read + written bytes / time), in µs
    ratio   = floor / measured time (1.0 = at the floor)

for the Triton path and the PyTorch reference. Cases: ``target`` (rejection_sample, q
given as a DraftDist) and ``with_draft`` (k ``draft_sample`` calls of B rows, then
rejection_sample: what one engine step spends on sampling). Goals (GPU, B=64, k=5,
V=128,256 bf16): <= 60 µs with the draft side, <= 2x that with top-k 50 / top-p 0.9,
B = 1 <= 15 µs.
"""

from __future__ import annotations

import functools
import os
import time

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before any kernel module is imported

import pytest  # noqa: E402

from specdec.kernels import get_backend  # noqa: E402

GPU = torch.cuda.is_available()
DEVICE = "cuda" if GPU else "cpu"
BACKENDS = {"triton": get_backend("triton"), "torch": get_backend("torch")}
pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0")

if GPU:
    BATCHES, DRAFTS, VOCABS = [1, 16, 64], [4, 8], [128256]
else:
    BATCHES, DRAFTS, VOCABS = [1], [4], [2048]
DTYPE = torch.bfloat16
FILTERS = {"plain": (0, 1.0), "topk50_topp0.9": (50, 0.9)}


@functools.lru_cache(maxsize=1)
def copy_bandwidth() -> float:
    """Bytes per second of a device-to-device copy (read + written bytes / time)."""
    n = (256 << 20) if GPU else (16 << 20)
    src = torch.empty(n, dtype=torch.uint8, device=DEVICE)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    reps = 20 if GPU else 3
    if GPU:
        torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(reps):
        dst.copy_(src)
    if GPU:
        torch.cuda.synchronize()
    return 2 * n * reps / (time.perf_counter() - t)


def make_inputs(batch, k, vocab, *, top_k=0, top_p=1.0, seed=0):
    """Target logits, draft logits and per-sequence parameters; temperature 1."""
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    target = (torch.randn(batch * (k + 1), vocab, device=DEVICE, generator=g) * 2).to(DTYPE)
    draft = [(torch.randn(batch, vocab, device=DEVICE, generator=g) * 2).to(DTYPE) for _ in range(k)]
    i32, i64 = torch.int32, torch.int64
    params = (torch.ones(batch, device=DEVICE), torch.full((batch,), top_k, device=DEVICE, dtype=i32),
              torch.full((batch,), top_p, device=DEVICE), torch.arange(batch, device=DEVICE, dtype=i64),
              torch.zeros(batch, device=DEVICE, dtype=i64))
    cu = torch.arange(batch + 1, device=DEVICE, dtype=i32) * k
    return target, draft, params, cu


def sampling_step(ops, target, draft, params, cu, *, with_draft: bool, hints: dict, q=None):
    """k draft samples (with_draft) then the rejection sampler: one step's sampling."""
    from specdec.kernels._sampling_core import DraftDist

    if with_draft or q is None:
        tokens, dists = [], []
        for j, logits in enumerate(draft):
            t, d = ops.draft_sample(logits, *params, 16 + j, **hints)
            tokens.append(t[:, 0])
            dists.append(d)
        ids = torch.stack(tokens, 1).reshape(-1)
        q = (ids, DraftDist.interleave(dists))
    ids, dist = q
    out = ops.rejection_sample(target, ids, dist, cu, len(draft), *params, check_finite=False, **hints)
    if GPU:
        torch.cuda.synchronize()
    return out, q


def bytes_moved(batch, k, vocab, with_draft):
    return (batch * (k + 1) + (batch * k if with_draft else 0)) * vocab * DTYPE.itemsize


@pytest.mark.parametrize("impl", list(BACKENDS))
@pytest.mark.parametrize("with_draft", [False, True], ids=["target", "with_draft"])
@pytest.mark.parametrize("filt", list(FILTERS))
@pytest.mark.parametrize("vocab", VOCABS)
@pytest.mark.parametrize("k", DRAFTS)
@pytest.mark.parametrize("batch", BATCHES)
def test_sampling_step(benchmark, batch, k, vocab, filt, with_draft, impl):
    top_k, top_p = FILTERS[filt]
    target, draft, params, cu = make_inputs(batch, k, vocab, top_k=top_k, top_p=top_p)
    hints = dict(filtered=top_k > 0 or top_p < 1, radix_rounds=0)
    ops = BACKENDS[impl]
    _, q = sampling_step(ops, target, draft, params, cu, with_draft=True, hints=hints)  # warm-up
    run = functools.partial(sampling_step, ops, target, draft, params, cu, with_draft=with_draft,
                            hints=hints, q=q)
    benchmark.pedantic(run, rounds=20 if GPU else 1, iterations=1, warmup_rounds=1 if GPU else 0)
    if benchmark.stats is None:  # --benchmark-disable
        return
    seconds = benchmark.stats.stats.median
    moved = bytes_moved(batch, k, vocab, with_draft)
    floor = moved / copy_bandwidth()
    benchmark.extra_info.update({"us": seconds * 1e6, "bytes": moved, "floor_us": floor * 1e6,
                                 "floor/time": floor / seconds})


def run_gpu_table():
    """Markdown table of the GPU sweep (and B=64, k=5), both implementations."""
    if not GPU:
        raise RuntimeError("run_gpu_table needs a CUDA device")
    import triton.testing

    bw = copy_bandwidth()
    print(f"{torch.cuda.get_device_name()}: copy bandwidth {bw / 1e9:.0f} GB/s; bf16 logits, V=128256")
    print("| B | k | filter | case | impl | µs | MB moved | floor µs | floor/time |")
    print("| ---: | ---: | --- | --- | --- | ---: | ---: | ---: | ---: |")
    for batch, k in [(b, k) for b in BATCHES for k in DRAFTS] + [(64, 5)]:
        for filt, (top_k, top_p) in FILTERS.items():
            target, draft, params, cu = make_inputs(batch, k, 128256, top_k=top_k, top_p=top_p)
            hints = dict(filtered=top_k > 0 or top_p < 1, radix_rounds=0)
            for with_draft in (False, True):
                for impl, ops in BACKENDS.items():
                    _, q = sampling_step(ops, target, draft, params, cu, with_draft=True, hints=hints)
                    step = functools.partial(sampling_step, ops, target, draft, params, cu,
                                             with_draft=with_draft, hints=hints, q=q)
                    us = 1e3 * triton.testing.do_bench(step, warmup=25, rep=100, return_mode="median")
                    moved = bytes_moved(batch, k, 128256, with_draft)
                    floor = moved / bw * 1e6
                    case = "with_draft" if with_draft else "target"
                    print(f"| {batch} | {k} | {filt} | {case} | {impl} | {us:.1f} | {moved / 1e6:.1f} | "
                          f"{floor:.1f} | {floor / us:.2f} |")


if __name__ == "__main__":
    run_gpu_table()
