"""The runnable examples in the package's docstrings."""

import doctest
import importlib

import pytest
import torch

MODULES = ["specdec.tree", "specdec.drafters.ngram", "specdec.sampling_params", "specdec.detokenize",
           "specdec.benchmark", "specdec.server.protocol",
           # its examples pass CPU tensors, which only the interpreter (no CUDA) can run
           pytest.param("specdec.kernels.fused_ops", marks=pytest.mark.skipif(
               torch.cuda.is_available(), reason="Triton examples use CPU tensors"))]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    result = doctest.testmod(importlib.import_module(name))
    assert result.attempted > 0 and result.failed == 0
