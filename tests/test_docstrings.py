"""The runnable examples in the package's docstrings."""

import doctest
import importlib

import pytest

MODULES = ["specdec.tree", "specdec.drafters.ngram", "specdec.sampling_params", "specdec.detokenize",
           "specdec.benchmark"]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    result = doctest.testmod(importlib.import_module(name))
    assert result.attempted > 0 and result.failed == 0
