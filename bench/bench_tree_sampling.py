"""Tree verification: the PyTorch reference against the fused Triton kernel.

    python -m pytest bench/bench_tree_sampling.py --benchmark-only

Every sequence verifies a full tree of branching (4, 2, 2) (28 nodes, depth 3) whose
children are drawn i.i.d. from q, with target logits log q + noise (about half of the
children accepted). On a GPU it sweeps B in {1, 8, 64}, V in {32000, 128256}, fp32 and
bf16 logits; without one it is a smoke run under Triton's interpreter (B <= 2, V = 2048).
Each case reports in extra_info

    GB/s = sum_b (n_accepted_b + 1) V (bytes(logits dtype) + 4) / time

i.e. the target logits and fp32 draft rows of the positions on the accepted paths, each
read once: the rows a verifier cannot avoid (the kernel reads them a few times more, once
per rejected child, and no row off the path), so a floor on what it moves.

For a one-shot GPU script: ``from bench.bench_tree_sampling import run_gpu_table;
run_gpu_table()`` prints a markdown table for B=64, V=128256.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before any kernel module is imported

import pytest  # noqa: E402

from specdec.kernels import reference  # noqa: E402
from specdec.kernels.tree_sampling import tree_rejection_sample  # noqa: E402

GPU = torch.cuda.is_available()
DEVICE = "cuda" if GPU else "cpu"
IMPLS = {"torch": reference.tree_rejection_sample, "triton": tree_rejection_sample}
BRANCHING = (4, 2, 2)
pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0")

if GPU:
    BATCHES, VOCABS, DTYPES = [1, 8, 64], [32000, 128256], [torch.float32, torch.bfloat16]
else:
    BATCHES, VOCABS, DTYPES = [1, 2], [2048], [torch.float32]


def full_tree(branching):
    """Parents of a full tree numbered breadth first."""
    parents, level, first = [], [-1], 0
    for k in branching:
        parents += [p for p in level for _ in range(k)]
        level = list(range(first, first + len(level) * k))
        first += len(level)
    return parents


def make_inputs(batch, vocab, dtype, *, top_k=0, top_p=1.0, seed=0):
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    par = torch.tensor(full_tree(BRANCHING), dtype=torch.int32, device=DEVICE)
    n = par.shape[0]
    rows = batch * (n + 1)
    q = torch.softmax(torch.randn(rows, vocab, device=DEVICE, generator=g) * 2, dim=-1)
    logits = (q.log() + 0.7 * torch.randn(rows, vocab, device=DEVICE, generator=g)).to(dtype)
    # child i of sequence b drawn from the q row of its parent position
    parent_rows = (torch.arange(batch, device=DEVICE)[:, None] * (n + 1) + 1 + par).flatten()
    ids = torch.multinomial(q[parent_rows], 1, generator=g)[:, 0]
    return (
        logits, ids, par.repeat(batch), q,
        torch.arange(batch + 1, device=DEVICE, dtype=torch.int32) * n, len(BRANCHING),
        torch.ones(batch, device=DEVICE),
        torch.full((batch,), top_k, device=DEVICE, dtype=torch.int32),
        torch.full((batch,), top_p, device=DEVICE),
        torch.arange(batch, device=DEVICE, dtype=torch.int64),
        torch.zeros(batch, device=DEVICE, dtype=torch.int64),
    )


def bytes_moved(args, n_acc):
    # path rows (logits + fp32 q) read once
    vocab, dtype = args[0].shape[1], args[0].dtype
    return int((n_acc.long() + 1).sum()) * vocab * (dtype.itemsize + 4)


def _call(fn, args):
    out = fn(*args, check_finite=False)  # the engine's mode: no host copy
    if GPU:
        torch.cuda.synchronize()
    return out


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("vocab", VOCABS)
@pytest.mark.parametrize("batch", BATCHES)
def test_tree_rejection_sample(benchmark, batch, vocab, dtype, impl):
    args = make_inputs(batch, vocab, dtype)
    fn = IMPLS[impl]
    _, n_acc, _ = _call(fn, args)  # compile / warm up outside the timing
    benchmark.pedantic(_call, args=(fn, args), rounds=20 if GPU else 2, iterations=1,
                       warmup_rounds=1)
    if benchmark.stats is None:  # --benchmark-disable
        return
    benchmark.extra_info["GB/s"] = bytes_moved(args, n_acc) / benchmark.stats.stats.median / 1e9


def _median_us(fn, args):
    """Median µs of one call on the GPU (Triton's timer, as bench_verify_attention uses)."""
    import triton.testing

    return 1e3 * triton.testing.do_bench(lambda: fn(*args, check_finite=False), warmup=25, rep=100,
                                         return_mode="median")


def run_gpu_table(batch=64, vocab=128256):
    """Print a markdown table: reference vs Triton, fp32 and bf16 logits, µs and GB/s,
    and the fraction of sequences on which both give the same tokens (~1)."""
    if not GPU:
        raise RuntimeError("run_gpu_table needs a CUDA device")
    print(f"B={batch}, branching {BRANCHING}, V={vocab}, GB/s = accepted-path rows "
          f"(logits + fp32 q) / time, device {torch.cuda.get_device_name()}")
    print("| logits | sampling | impl | µs | GB/s | mean accepted | agree |")
    print("| --- | --- | --- | ---: | ---: | ---: | ---: |")
    for dtype in (torch.float32, torch.bfloat16):
        for label, top_k, top_p in (("plain", 0, 1.0), ("top-k 50, top-p 0.9", 50, 0.9)):
            args = make_inputs(batch, vocab, dtype, top_k=top_k, top_p=top_p)
            ref = reference.tree_rejection_sample(*args)
            got = tree_rejection_sample(*args)
            agree = float(((got[0] == ref[0]).all(1) & (got[1] == ref[1])).float().mean())
            gb = bytes_moved(args, got[1]) / 1e9
            mean_acc = float(got[1].float().mean())
            for impl, fn in IMPLS.items():
                us = _median_us(fn, args)
                name = str(dtype).removeprefix("torch.")
                print(f"| {name} | {label} | {impl} | {us:.1f} | {gb / (us * 1e-6):.0f} | "
                      f"{mean_acc:.2f} | {agree:.3f} |")


if __name__ == "__main__":
    run_gpu_table()
