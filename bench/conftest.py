"""Benchmark set-up: run Triton kernels through the interpreter when there is no GPU.

bench/ is outside the default test paths, so tests/conftest.py does not apply here.
TRITON_INTERPRET must be set before any module defining a ``@triton.jit`` kernel is
imported; the benchmarks then run as a smoke test at tiny sizes.
"""

import os
import pathlib
import sys

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
    torch.set_num_threads(min(2, torch.get_num_threads()))

# the GPU image runs the repository without installing it
ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

if not torch.cuda.is_available():
    sys.path.insert(0, str(ROOT / "tests"))
    import fast_interpreter  # noqa: E402  (one language patch per launch: ~2x faster)

    fast_interpreter.install()
