"""SamplingParams: how one request samples and when it stops; validated on construction."""

from __future__ import annotations

import math
import numbers
import struct
from dataclasses import dataclass, field
from typing import TypeGuard

import numpy

# Accepted ranges. Every accepted value is exact and safe in the samplers' float32 /
# int32 packing: logits / temperature cannot overflow, top_p never rounds to 0.
MIN_TEMPERATURE = 1e-3  # 0 is greedy; (0, MIN_TEMPERATURE) is rejected
MAX_TEMPERATURE = 1e3
MIN_TOP_P = 1e-6  # below it top-p keeps the same tokens for any vocabulary up to 10^6
MAX_TOP_K = 2**31 - 1  # int32; any top_k >= the vocabulary size disables it, like 0
# what an unset temperature / top_k / top_p becomes when the model has no default for it
LIBRARY_DEFAULTS = {"temperature": 1.0, "top_k": 0, "top_p": 1.0}


@dataclass(frozen=True)
class SamplingParams:
    """Sampling and stopping for one request.

    max_tokens:     tokens to generate at most (0 returns the prompt untouched)
    temperature:    0 is greedy; otherwise in [1e-3, 1e3] and logits are divided by it
    top_k:          keep the k most likely tokens (ties kept); 0 (or >= the vocabulary)
                    disables; at most 2**31 - 1
    top_p:          in [1e-6, 1]: keep the smallest most-likely set with mass >= top_p;
                    1 disables (so does a value that rounds to 1 in float32, the
                    samplers' precision: it is stored as 1.0)
    seed:           per-request seed in [0, 2**63); the same seed gives the same tokens
                    alone or in any batch. None draws one at random.
    stop:           strings that end generation; the text is cut before the stop string
                    (a str is one stop string; None is none)
    stop_token_ids: token ids that end generation (kept in token_ids)
    ignore_eos:     keep generating past the model's EOS token (True or False)

    Defaults and precedence for temperature, top_k and top_p (as transformers applies a
    checkpoint's ``generation_config.json``): a value given here always wins; a value left
    unset (not passed, or passed as None) takes the model's default from its
    generation_config.json when ``LLM`` serves the request, and otherwise the library
    default (temperature 1.0, top_k 0, top_p 1.0). The fields of an unset parameter read
    as the library default until then; ``unset`` names them. A generation_config.json
    with ``"do_sample": false`` makes the model's default temperature 0 (greedy).

    Integers and reals of numpy are accepted and stored as Python int / float.

    >>> SamplingParams(max_tokens=32, temperature=0.8, top_p=0.95, seed=7)  # doctest: +NORMALIZE_WHITESPACE
    SamplingParams(max_tokens=32, temperature=0.8, top_k=0, top_p=0.95, seed=7, stop=(), stop_token_ids=(),
                   ignore_eos=False)
    """

    max_tokens: int = 16
    # None (unset) is accepted and replaced by __post_init__: the fields are typed as read
    temperature: float = None  # type: ignore[assignment]
    top_k: int = None  # type: ignore[assignment]
    top_p: float = None  # type: ignore[assignment]
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    # the names among temperature, top_k and top_p the caller left unset (see above).
    # Computed; accepted back (``SamplingParams(**vars(p))``, ``dataclasses.replace``) for
    # the names whose value is still the library default
    unset: frozenset | None = field(default=None, repr=False)

    def __post_init__(self):
        set_ = lambda name, value: object.__setattr__(self, name, value)  # noqa: E731  (frozen)
        kept = frozenset(self.unset or ())
        unset = frozenset(name for name in LIBRARY_DEFAULTS if getattr(self, name) is None or
                          (name in kept and getattr(self, name) == LIBRARY_DEFAULTS[name]))
        set_("unset", unset)
        for name in unset:
            set_(name, LIBRARY_DEFAULTS[name])
        stop = () if self.stop is None else (self.stop,) if isinstance(self.stop, str) else self.stop
        ids = () if self.stop_token_ids is None else self.stop_token_ids
        try:
            set_("stop", tuple(stop))
            set_("stop_token_ids", tuple(ids))
        except TypeError:
            raise ValueError(f"stop strings must be a str or a list of str and stop_token_ids a list of "
                             f"int, got stop={self.stop!r}, stop_token_ids={self.stop_token_ids!r}") from None
        if not _is_int(self.max_tokens) or self.max_tokens < 0:
            raise ValueError(f"max_tokens must be an integer >= 0, got {self.max_tokens!r}")
        set_("max_tokens", int(self.max_tokens))
        t = self.temperature
        if not _is_real(t) or not math.isfinite(t) or not (t == 0 or MIN_TEMPERATURE <= t <= MAX_TEMPERATURE):
            raise ValueError(f"temperature must be 0 (greedy) or a number in [{MIN_TEMPERATURE:g}, "
                             f"{MAX_TEMPERATURE:g}], got {t!r}")
        set_("temperature", float(t))
        if not _is_int(self.top_k) or not 0 <= self.top_k <= MAX_TOP_K:
            raise ValueError(f"top_k must be an integer in [0, 2**31 - 1] (0, or any value >= the vocabulary "
                             f"size, disables it), got {self.top_k!r}")
        set_("top_k", int(self.top_k))
        p = self.top_p
        if not _is_real(p) or not MIN_TOP_P <= p <= 1:
            raise ValueError(f"top_p must be a number in [{MIN_TOP_P:g}, 1] (1 disables it; smaller values "
                             f"keep the same tokens as {MIN_TOP_P:g}: the most likely ones), got {p!r}")
        set_("top_p", 1.0 if _float32(p) == 1.0 else float(p))
        if self.seed is not None:
            if not _is_int(self.seed) or not 0 <= self.seed < 2**63:
                raise ValueError(f"seed must be None or an integer in [0, 2**63), got {self.seed!r}")
            set_("seed", int(self.seed))
        for s in self.stop:
            if not isinstance(s, str) or not s:
                raise ValueError(f"stop strings must be non-empty str, got {s!r}")
        for t in self.stop_token_ids:
            if not _is_int(t) or t < 0:
                raise ValueError(f"stop_token_ids must be integers >= 0, got {t!r}")
        set_("stop_token_ids", tuple(int(t) for t in self.stop_token_ids))
        if not _is_bool(self.ignore_eos):
            raise ValueError(f"ignore_eos must be True or False, got {self.ignore_eos!r}")
        set_("ignore_eos", bool(self.ignore_eos))

    def with_defaults(self, **defaults) -> SamplingParams:
        """These parameters with each unset one among temperature, top_k and top_p taken
        from ``defaults`` (a model's generation_config values; None or absent: keep the
        library default). Given values are never replaced. Range-checked as on
        construction. The result records no unset fields: its values are final.

        >>> SamplingParams(top_p=0.5).with_defaults(temperature=0.6, top_p=0.95)  # doctest: +NORMALIZE_WHITESPACE
        SamplingParams(max_tokens=16, temperature=0.6, top_k=0, top_p=0.5, seed=None, stop=(), stop_token_ids=(),
                       ignore_eos=False)
        """
        unknown = set(defaults) - set(LIBRARY_DEFAULTS)
        if unknown:
            raise ValueError(f"with_defaults takes {', '.join(LIBRARY_DEFAULTS)}, got {', '.join(sorted(unknown))}")
        values = {name: getattr(self, name) for name in LIBRARY_DEFAULTS}
        for name in self.unset or ():  # always a frozenset after __post_init__
            if defaults.get(name) is not None:
                values[name] = defaults[name]
        return SamplingParams(max_tokens=self.max_tokens, seed=self.seed, stop=self.stop,
                              stop_token_ids=self.stop_token_ids, ignore_eos=self.ignore_eos, **values)


def _float32(x) -> float:
    """``x`` rounded to float32, as a Python float: the value the samplers see."""
    return struct.unpack("f", struct.pack("f", float(x)))[0]


def _is_int(x) -> TypeGuard[int]:
    return isinstance(x, numbers.Integral) and not _is_bool(x)


def _is_real(x) -> TypeGuard[float]:
    return isinstance(x, numbers.Real) and not _is_bool(x)


def _is_bool(x) -> bool:
    return isinstance(x, (bool, numpy.bool_))
