"""The one prepared GPU check: budgets first, then tests, tables and the end-to-end run.

    PYTHONPATH=. python3 bench/gpu_check.py                 # on a machine with CUDA, < 8 min
    PYTHONPATH=. python3 bench/gpu_check.py attention graphs # some parts only

Parts, in order of importance, each in its own process (its own session, killed with its
children at its limit) so one slow part cannot starve the rest; the whole run stops
starting parts that would not fit in TOTAL_S. Children print every row as it is measured
(unbuffered), so a part stopped at its limit still leaves its partial table.

  attention  headline tree verification (B=8, 32/8 heads, D=128, prefix 4,096, 64 nodes,
             bf16) vs the 64 µs goal, and decode at B=1 over 4,096 positions vs 1.5x the
             K/V read floor; each beside the previous policy, each checked against the
             reference first (bench/bench_verify_attention.py: run_budget_table)
  graphs     warm_up() with the default modes for the none / early-exit / draft-model
             drafters (nothing captured while serving afterwards), CUDA-graph replays vs
             eager steps token for token in every mode, and no host sync in a replay
  kernels    the kernel tests that run on the GPU when there is one: Philox (tl.rand and
             the torch Philox on the GPU, bit for bit), attention (every policy config),
             fused ops, both samplers
  tables     the verification-attention, rejection-sampling and tree-sampling tables
  e2e        ``specdec bench`` on the synthetic llama-3.2-1B-shaped pair, batches 1 and 16
             (transformers' contenders left out: each compile costs a minute)

Exit code: the worst part's (0 all passed, 124 a part hit its limit, 2 no CUDA).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

TOTAL_S = 470  # the whole check stays under 8 minutes
PYTEST = [sys.executable, "-m", "pytest", "-v", "-x", "--no-header", "-p", "no:cacheprovider"]
PARTS = {
    "attention": (80, [sys.executable, "-c", "import sys; from bench.bench_verify_attention import "
                       "run_budget_table as t; sys.exit(0 if t() else 1)"]),
    "graphs": (150, PYTEST + ["tests/test_cuda_graphs.py", "-k",
                              "warm_up_with_default_modes or cuda_graphs_give or no_host_sync"]),
    "kernels": (90, PYTEST + ["tests/test_philox.py", "tests/test_verify_attention.py", "tests/test_fused_ops.py",
                               "tests/test_rejection_sampling.py", "tests/test_tree_sampling.py"]),
    "tables": (80, [sys.executable, "-c", "from bench.bench_verify_attention import run_gpu_table as a; "
                    "from bench.bench_rejection_sampling import run_gpu_table as r; "
                    "from bench.bench_tree_sampling import run_gpu_table as t; a(); r(); t()"]),
    "e2e": (60, [sys.executable, "-m", "specdec", "bench", "--shape", "llama-3.2-1b", "--batches", "1,16",
                 "--max-tokens", "64", "--skip-hf"]),
}


def run_part(name: str, limit: float) -> int:
    """Run one part with its output streamed; kill its whole process group at ``limit``."""
    _, cmd = PARTS[name]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(cmd, env=env, start_new_session=True)
    try:
        return proc.wait(timeout=limit)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        print(f"\n{name}: stopped at its {limit:.0f} s limit; the rows above are what it measured",
              flush=True)
        return 124


def main(argv: list[str]) -> int:
    unknown = [p for p in argv if p not in PARTS]
    if unknown:
        print(f"unknown part(s) {unknown}; choose from {', '.join(PARTS)}", file=sys.stderr)
        return 2
    import torch

    if not torch.cuda.is_available():
        print("gpu_check needs a CUDA device; none is present (CPU checks: python -m pytest)",
              file=sys.stderr)
        return 2
    props = torch.cuda.get_device_properties(0)
    print(f"# specdec GPU check on {props.name} ({props.total_memory / 2**30:.0f} GiB, sm_{props.major}"
          f"{props.minor}), torch {torch.__version__}, {time.strftime('%Y-%m-%d %H:%M')}", flush=True)
    start = time.perf_counter()
    worst = 0
    for name in argv or list(PARTS):
        left = TOTAL_S - (time.perf_counter() - start)
        limit = min(PARTS[name][0], left)
        print(f"\n## {name}\n", flush=True)
        if limit < 20:
            print(f"{name}: skipped, {left:.0f} s left of the {TOTAL_S} s total", flush=True)
            worst = max(worst, 124)
            continue
        t0 = time.perf_counter()
        rc = run_part(name, limit)
        print(f"\n{name}: exit code {rc}, {time.perf_counter() - t0:.0f} s", flush=True)
        worst = max(worst, rc)
    print(f"\ngpu_check: {time.perf_counter() - start:.0f} s in all, worst exit code {worst}", flush=True)
    return worst


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
