"""specdec: speculative decoding for llama-style models, with Triton kernels.

>>> from specdec import LLM, SamplingParams                        # doctest: +SKIP
>>> llm = LLM("path/to/target", draft="ngram")
>>> llm.generate("Once upon a time", SamplingParams(max_tokens=32))[0].text
"""

import os as _os
import sys as _sys

import torch as _torch

# Without CUDA the Triton kernels can only run through Triton's interpreter, and Triton reads
# this flag when it is imported. Set it before anything imports triton; it changes nothing
# else on such a machine, where Triton has no driver to compile for.
if "triton" not in _sys.modules and not _torch.cuda.is_available():
    _os.environ.setdefault("TRITON_INTERPRET", "1")

from .api import LLM, Load  # noqa: E402
from .engine import NonFiniteLogitsError  # noqa: E402
from .kv_cache import CacheCapacityError  # noqa: E402
from .request import Request  # noqa: E402
from .sampling_params import SamplingParams  # noqa: E402
from .sequence import RequestMetrics, RequestOutput  # noqa: E402

__all__ = [
    "LLM",
    "Load",
    "CacheCapacityError",
    "NonFiniteLogitsError",
    "Request",
    "RequestMetrics",
    "RequestOutput",
    "SamplingParams",
]
__version__ = "0.1.0"
