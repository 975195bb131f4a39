"""One-shot GPU check: the end-to-end table, the GPU tests, the kernel tables, in one run.

    PYTHONPATH=. python3 bench/gpu_check.py            # on a machine with CUDA (~9 min)
    PYTHONPATH=. python3 bench/gpu_check.py e2e tests  # some parts only

Parts, in order of importance, each in its own process with its own time limit so one
slow part cannot starve the rest:

  e2e      ``specdec bench`` on the synthetic llama-3.2-1B-shaped pair (ε = 0, so the
           2-layer early-exit draft agrees with the target), batches 1, 16, 64, greedy
           and T = 1; transformers' compiled static-cache and assisted generation at
           batch 1 (each compile costs a minute)
  tests    CUDA graphs against eager, then the kernel, distribution and engine tests
  kernels  the verification-attention and rejection-sampling tables

Everything prints as markdown under the card's name.
"""

from __future__ import annotations

import subprocess
import sys
import time

PARTS = {
    "e2e": (330, [sys.executable, "-m", "specdec", "bench", "--shape", "llama-3.2-1b", "--batches", "1,16,64",
                  "--max-tokens", "128", "--hf-batches", "1"]),
    "tests": (150, [sys.executable, "-m", "pytest", "-q", "-x", "--no-header", "-p", "no:cacheprovider",
                    "tests/test_cuda_graphs.py", "tests/test_verify_attention.py", "tests/test_kv_cache_ops.py",
                    "tests/test_rejection_sampling.py", "tests/test_tree_sampling.py", "tests/test_distribution.py",
                    "tests/test_engine.py"]),
    "kernels": (90, [sys.executable, "-c", "from bench.bench_verify_attention import run_gpu_table as a; "
                     "from bench.bench_rejection_sampling import run_gpu_table as r; a(); r()"]),
}


def main(argv: list[str]) -> int:
    import torch

    if not torch.cuda.is_available():
        print("gpu_check needs a CUDA device; none is present", file=sys.stderr)
        return 2
    unknown = [p for p in argv if p not in PARTS]
    if unknown:
        print(f"unknown part(s) {unknown}; choose from {', '.join(PARTS)}", file=sys.stderr)
        return 2
    props = torch.cuda.get_device_properties(0)
    print(f"# specdec GPU check on {props.name} ({props.total_memory / 2**30:.0f} GiB), "
          f"torch {torch.__version__}, {time.strftime('%Y-%m-%d')}", flush=True)
    worst = 0
    for name in argv or list(PARTS):
        limit, cmd = PARTS[name]
        print(f"\n## {name}\n", flush=True)
        start = time.perf_counter()
        try:
            rc = subprocess.call(cmd, timeout=limit)
        except subprocess.TimeoutExpired:
            rc = 124
            print(f"\n{name}: stopped after its {limit} s limit", flush=True)
        print(f"\n{name}: exit code {rc}, {time.perf_counter() - start:.0f} s", flush=True)
        worst = max(worst, rc)
    return worst


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
