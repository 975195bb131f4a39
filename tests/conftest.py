"""Test set-up: run Triton kernels through the interpreter when there is no GPU.

TRITON_INTERPRET must be set before any module that defines a ``@triton.jit`` kernel is
imported, so it is set here, at collection time, before the tests import specdec.
"""

import os
import pathlib

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
    import fast_interpreter  # noqa: E402

    fast_interpreter.install()

# The engine runs many tiny ops; on a 2-core machine one thread is several times faster.
torch.set_num_threads(1)

import pytest  # noqa: E402

SHARED_MODELS = pathlib.Path(__file__).resolve().parents[2] / "shared" / "models"
STORIES_DIR = SHARED_MODELS / "stories260K"


@pytest.fixture(scope="session")
def device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device; none is present")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
