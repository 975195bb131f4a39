"""Tree verification: the PyTorch reference against the split-vocabulary Triton kernels.

    python -m pytest bench/bench_tree_sampling.py --benchmark-only

Every sequence verifies a full tree whose children are drawn i.i.d. from q (a DraftDist
of bf16 draft logits), with target logits log q + noise (about half of the children
accepted): 64 nodes (branching 4, 3, 4) and the small k = 4 / 8-node trees (2, 1) and
(2, 3). On a GPU: B in {1, 16, 64}, V = 128,256, bf16 logits, plain and top-k 50 / top-p
0.9 sampling; without one a smoke run under Triton's interpreter (B <= 2, V = 2048).

Each case reports in extra_info:

    bytes   = every tree row's target logits read once, rows * V * 2 (what the partials
              launch reads; the walk adds gathers, and one pass per rejected child on
              unfiltered rows with sampled children)
    floor   = bytes / the device's measured copy bandwidth (``copy_bandwidth``): the
              read-once floor
    of_floor = floor / time (1.0 = at the floor)

``python bench/bench_tree_sampling.py`` prints the whole table (GPU).
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
TREES = {"64-node": (4, 3, 4), "k4": (2, 1), "k8": (2, 3)}
SAMPLING = {"plain": (0, 1.0), "top-k50-top-p0.9": (50, 0.9)}
pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0")

if GPU:
    BATCHES, VOCAB = [1, 16, 64], 128256
else:
    BATCHES, VOCAB = [1, 2], 2048


def full_tree(branching):
    """Parents of a full tree numbered breadth first."""
    parents, level, first = [], [-1], 0
    for k in branching:
        parents += [p for p in level for _ in range(k)]
        level = list(range(first, first + len(level) * k))
        first += len(level)
    return parents


def make_inputs(batch, vocab, branching, *, top_k=0, top_p=1.0, dtype=torch.bfloat16, seed=0):
    """Positional arguments of ``tree_rejection_sample`` for ``batch`` copies of one tree."""
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    par = torch.tensor(full_tree(branching), dtype=torch.int32, device=DEVICE)
    n = par.shape[0]
    rows = batch * (n + 1)
    ones = torch.ones(rows, device=DEVICE)
    q = reference.draft_dist((torch.randn(rows, vocab, device=DEVICE, generator=g) * 2).to(dtype),
                             ones, torch.full((rows,), top_k, dtype=torch.int32, device=DEVICE),
                             torch.full((rows,), top_p, device=DEVICE))
    probs = reference.draft_dist_probs(q)
    logits = (torch.softmax(q.logits.float(), -1).log()
              + 0.7 * torch.randn(rows, vocab, device=DEVICE, generator=g)).to(dtype)
    # child i of sequence b drawn from the q row of its parent position
    parent_rows = (torch.arange(batch, device=DEVICE)[:, None] * (n + 1) + 1 + par).flatten()
    ids = torch.multinomial(probs[parent_rows], 1, generator=g)[:, 0]
    return (
        logits, ids, par.repeat(batch), q,
        torch.arange(batch + 1, device=DEVICE, dtype=torch.int32) * n, len(branching),
        torch.ones(batch, device=DEVICE),
        torch.full((batch,), top_k, device=DEVICE, dtype=torch.int32),
        torch.full((batch,), top_p, device=DEVICE),
        torch.arange(batch, device=DEVICE, dtype=torch.int64),
        torch.zeros(batch, device=DEVICE, dtype=torch.int64),
    )


def floor_bytes(args) -> int:
    """Every tree row's target logits, read once."""
    return args[0].numel() * args[0].element_size()


_COPY_BW = {}


def copy_bandwidth() -> float:
    """Bytes/s of a device-to-device copy of 512 MiB (64 MiB on CPU), measured once."""
    if not _COPY_BW:
        n = (512 if GPU else 64) << 20
        src = torch.empty(n, dtype=torch.uint8, device=DEVICE)
        dst = torch.empty_like(src)
        if GPU:
            import triton.testing

            ms = triton.testing.do_bench(lambda: dst.copy_(src), warmup=10, rep=50,
                                         return_mode="median")
            secs = ms * 1e-3
        else:
            import time

            dst.copy_(src)
            t0 = time.perf_counter()
            for _ in range(5):
                dst.copy_(src)
            secs = (time.perf_counter() - t0) / 5
        _COPY_BW["bw"] = 2 * n / secs  # read + write
    return _COPY_BW["bw"]


def _call(fn, args):
    out = fn(*args, check_finite=False)  # the engine's mode: no host copy
    if GPU:
        torch.cuda.synchronize()
    return out


def report(info: dict, args, seconds: float) -> dict:
    floor = floor_bytes(args) / copy_bandwidth()
    info.update({"us": seconds * 1e6, "bytes": floor_bytes(args), "floor_us": floor * 1e6,
                 "of_floor": floor / seconds})
    return info


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("sampling", list(SAMPLING))
@pytest.mark.parametrize("tree", list(TREES))
@pytest.mark.parametrize("batch", BATCHES)
def test_tree_rejection_sample(benchmark, batch, tree, sampling, impl):
    top_k, top_p = SAMPLING[sampling]
    args = make_inputs(batch, VOCAB, TREES[tree], top_k=top_k, top_p=top_p)
    fn = IMPLS[impl]
    _call(fn, args)  # compile / warm up outside the timing
    benchmark.pedantic(_call, args=(fn, args), rounds=20 if GPU else 1, iterations=1,
                       warmup_rounds=1 if GPU else 0)
    if benchmark.stats is None:  # --benchmark-disable
        return
    report(benchmark.extra_info, args, benchmark.stats.stats.median)


def _median_s(fn, args):
    """Median seconds of one call on the GPU (Triton's timer)."""
    import triton.testing

    return 1e-3 * triton.testing.do_bench(lambda: fn(*args, check_finite=False), warmup=25,
                                          rep=100, return_mode="median")


def run_gpu_table(vocab=VOCAB):
    """Print a markdown table: reference vs Triton for every batch, tree and sampling mode:
    µs, bytes, the read-once floor, achieved / floor, and the agreement with the reference."""
    if not GPU:
        raise RuntimeError("run_gpu_table needs a CUDA device")
    print(f"V={vocab}, bf16 logits, copy bandwidth {copy_bandwidth() / 1e9:.0f} GB/s, "
          f"device {torch.cuda.get_device_name()}")
    print("| B | tree | sampling | impl | µs | MB | floor µs | floor / time | agree |")
    print("| ---: | --- | --- | --- | ---: | ---: | ---: | ---: | ---: |")
    for batch in BATCHES:
        for tree, branching in TREES.items():
            for sampling, (top_k, top_p) in SAMPLING.items():
                args = make_inputs(batch, vocab, branching, top_k=top_k, top_p=top_p)
                ref = reference.tree_rejection_sample(*args)
                got = tree_rejection_sample(*args)
                agree = float(((got[0] == ref[0]).all(1) & (got[1] == ref[1])).float().mean())
                for impl, fn in IMPLS.items():
                    r = report({}, args, _median_s(fn, args))
                    print(f"| {batch} | {tree} | {sampling} | {impl} | {r['us']:.1f} | "
                          f"{r['bytes'] / 1e6:.1f} | {r['floor_us']:.1f} | {r['of_floor']:.2f} | "
                          f"{agree:.3f} |")


if __name__ == "__main__":
    run_gpu_table()
