"""One-shot GPU check: kernel tests natively, then the benchmark tables, in one run.

    PYTHONPATH=. python3 bench/gpu_check.py            # on a machine with CUDA

Runs (1) the kernel and engine test files on the GPU (the Triton kernels compiled for
real, the distribution tests at full power), (2) the verification-attention table,
(3) the rejection-sampling table, and prints everything as markdown with the card's
name. Each part is time-boxed by its own size, the whole run takes a few minutes.
"""

from __future__ import annotations

import subprocess
import sys
import time


def _section(title: str) -> None:
    print(f"\n## {title}\n", flush=True)


def main() -> int:
    import torch

    if not torch.cuda.is_available():
        print("gpu_check needs a CUDA device; none is present", file=sys.stderr)
        return 2
    props = torch.cuda.get_device_properties(0)
    print(f"# specdec GPU check on {props.name} ({props.total_memory / 2**30:.0f} GiB), "
          f"torch {torch.__version__}, {time.strftime('%Y-%m-%d')}")

    _section("tests on the GPU")
    tests = ["tests/test_verify_attention.py", "tests/test_kv_cache_ops.py", "tests/test_rejection_sampling.py",
             "tests/test_tree_sampling.py", "tests/test_distribution.py", "tests/test_engine.py"]
    rc = subprocess.call([sys.executable, "-m", "pytest", "-q", "-x", "--no-header", "-p", "no:cacheprovider",
                          *tests])
    print(f"pytest exit code {rc}", flush=True)

    _section("verification attention")
    from bench.bench_verify_attention import run_gpu_table as attention_table

    attention_table()

    _section("rejection sampling")
    from bench.bench_rejection_sampling import run_gpu_table as sampling_table

    sampling_table()
    return rc


if __name__ == "__main__":
    sys.exit(main())
