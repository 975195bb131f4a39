"""Rejection sampling: the PyTorch reference against the fused Triton kernel.

    python -m pytest bench/bench_rejection_sampling.py --benchmark-only

On a GPU it sweeps B in {1, 8, 64}, k in {1, 4, 8}, V in {32000, 128256} with fp32 and
bf16 logits; without one it is a smoke run under Triton's interpreter (B <= 2, V <= 2048).
Each case reports in extra_info

    GB/s = (B (k + 1) V  bytes(logits dtype)  +  B k V 4) / time

i.e. the target logits read once plus the fp32 draft probabilities read once. (The kernel
reads every logit row once, the sampled row and its q row twice more, and other q rows
only at the draft token, so this is a floor on what it moves, the figure a fused
sampler is usually quoted with.)

For a one-shot GPU script: ``from bench.bench_rejection_sampling import run_gpu_table;
run_gpu_table()`` prints a markdown table for B=64, k=5, V=128256.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before any kernel module is imported

import pytest  # noqa: E402

from specdec.kernels import reference  # noqa: E402
from specdec.kernels.rejection_sampling import rejection_sample  # noqa: E402

GPU = torch.cuda.is_available()
DEVICE = "cuda" if GPU else "cpu"
IMPLS = {"torch": reference.rejection_sample, "triton": rejection_sample}
# the interpreter (numpy < 2.4) warns on every runtime loop bound; see TOOLCHAIN.md
pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0")

if GPU:
    BATCHES, DRAFTS, VOCABS = [1, 8, 64], [1, 4, 8], [32000, 128256]
    DTYPES = [torch.float32, torch.bfloat16]
else:
    BATCHES, DRAFTS, VOCABS, DTYPES = [1, 2], [1, 4], [2048], [torch.float32]


def make_inputs(batch, k, vocab, dtype, *, top_k=0, top_p=1.0, seed=0):
    """A full batch of k drafts per sequence, drafts sampled from q; about half accepted."""
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    logits = torch.randn(batch * (k + 1), vocab, device=DEVICE, generator=g).to(dtype)
    q = torch.softmax(torch.randn(batch * k, vocab, device=DEVICE, generator=g), dim=-1)
    ids = torch.multinomial(q, 1, generator=g)[:, 0]
    return (
        logits, ids, q,
        torch.arange(batch + 1, device=DEVICE, dtype=torch.int32) * k, k,
        torch.ones(batch, device=DEVICE),
        torch.full((batch,), top_k, device=DEVICE, dtype=torch.int32),
        torch.full((batch,), top_p, device=DEVICE),
        torch.arange(batch, device=DEVICE, dtype=torch.int64),
        torch.zeros(batch, device=DEVICE, dtype=torch.int64),
    )


def bytes_moved(batch, k, vocab, dtype):
    # logits read once + draft probabilities read once
    return batch * (k + 1) * vocab * dtype.itemsize + batch * k * vocab * 4


def _call(fn, args):
    out = fn(*args, check_finite=False)  # the engine's mode: no host copy
    if GPU:
        torch.cuda.synchronize()
    return out


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("vocab", VOCABS)
@pytest.mark.parametrize("k", DRAFTS)
@pytest.mark.parametrize("batch", BATCHES)
def test_rejection_sample(benchmark, batch, k, vocab, dtype, impl):
    args = make_inputs(batch, k, vocab, dtype)
    fn = IMPLS[impl]
    _call(fn, args)  # compile / warm up outside the timing
    rounds = 20 if GPU else 2
    benchmark.pedantic(_call, args=(fn, args), rounds=rounds, iterations=1, warmup_rounds=1)
    if benchmark.stats is None:  # --benchmark-disable
        return
    seconds = benchmark.stats.stats.median
    benchmark.extra_info["GB/s"] = bytes_moved(batch, k, vocab, dtype) / seconds / 1e9


@pytest.mark.parametrize("impl", list(IMPLS))
def test_rejection_sample_top_k_top_p(benchmark, impl):
    # the threshold searches: top-k 50, top-p 0.9 on every row
    batch, k, vocab = (64, 4, 128256) if GPU else (2, 2, 2048)
    args = make_inputs(batch, k, vocab, torch.float32, top_k=50, top_p=0.9)
    fn = IMPLS[impl]
    _call(fn, args)
    benchmark.pedantic(_call, args=(fn, args), rounds=10 if GPU else 2, iterations=1,
                       warmup_rounds=1)
    if benchmark.stats is None:  # --benchmark-disable
        return
    seconds = benchmark.stats.stats.median
    benchmark.extra_info["GB/s"] = bytes_moved(batch, k, vocab, torch.float32) / seconds / 1e9


def _median_us(fn, args):
    """Median µs of one call on the GPU (Triton's timer, as bench_verify_attention uses)."""
    import triton.testing

    return 1e3 * triton.testing.do_bench(lambda: fn(*args, check_finite=False), warmup=25, rep=100,
                                         return_mode="median")


def run_gpu_table(batch=64, k=5, vocab=128256):
    """Print a markdown table: reference vs Triton, fp32 and bf16 logits, µs and GB/s.

    Also prints the fraction of sequences on which both give the same tokens (expected
    to be ~1: they differ only where a uniform falls within rounding of a threshold).
    """
    if not GPU:
        raise RuntimeError("run_gpu_table needs a CUDA device")
    print(f"B={batch}, k={k}, V={vocab}, GB/s = (logits + fp32 draft probs) bytes / time, "
          f"device {torch.cuda.get_device_name()}")
    print("| logits | sampling | impl | µs | GB/s | agree |")
    print("| --- | --- | --- | ---: | ---: | ---: |")
    for dtype in (torch.float32, torch.bfloat16):
        for label, top_k, top_p in (("plain", 0, 1.0), ("top-k 50, top-p 0.9", 50, 0.9)):
            args = make_inputs(batch, k, vocab, dtype, top_k=top_k, top_p=top_p)
            ref_out, ref_n = reference.rejection_sample(*args)
            out, n_acc = rejection_sample(*args)
            agree = float(((out == ref_out).all(1) & (n_acc == ref_n)).float().mean())
            gb = bytes_moved(batch, k, vocab, dtype) / 1e9
            for impl, fn in IMPLS.items():
                us = _median_us(fn, args)
                name = str(dtype).removeprefix("torch.")
                print(f"| {name} | {label} | {impl} | {us:.1f} | {gb / (us * 1e-6):.0f} | "
                      f"{agree:.3f} |")


if __name__ == "__main__":
    run_gpu_table()
