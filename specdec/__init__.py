"""specdec: speculative decoding for llama-style models, with Triton kernels.

>>> from specdec import LLM, SamplingParams                        # doctest: +SKIP
>>> llm = LLM("path/to/target", draft="ngram")
>>> llm.generate("Once upon a time", SamplingParams(max_tokens=32))[0].text
"""

from .api import LLM
from .engine import NonFiniteLogitsError
from .kv_cache import CacheCapacityError
from .sampling_params import SamplingParams
from .sequence import RequestMetrics, RequestOutput

__all__ = [
    "LLM",
    "CacheCapacityError",
    "NonFiniteLogitsError",
    "RequestMetrics",
    "RequestOutput",
    "SamplingParams",
]
__version__ = "0.1.0"
