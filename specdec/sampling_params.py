"""SamplingParams: how one request samples and when it stops; validated on construction."""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class SamplingParams:
    """Sampling and stopping for one request.

    max_tokens:     tokens to generate at most (0 returns the prompt untouched)
    temperature:    0 is greedy; otherwise logits are divided by it
    top_k:          keep the k most likely tokens (ties kept); 0 disables
    top_p:          keep the smallest most-likely set with mass >= top_p; 1 disables
    seed:           per-request seed; the same seed gives the same tokens alone or in
                    any batch. None draws one at random.
    stop:           strings that end generation; the text is cut before the stop string
    stop_token_ids: token ids that end generation (kept in token_ids)
    ignore_eos:     keep generating past the model's EOS token

    >>> SamplingParams(max_tokens=32, temperature=0.8, top_p=0.95, seed=7)
    SamplingParams(max_tokens=32, temperature=0.8, top_k=0, top_p=0.95, seed=7, stop=(), stop_token_ids=(), ignore_eos=False)
    """

    max_tokens: int = 16
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False

    def __post_init__(self):
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        object.__setattr__(self, "stop", tuple(self.stop))
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))
        if not _is_int(self.max_tokens) or self.max_tokens < 0:
            raise ValueError(f"max_tokens must be an integer >= 0, got {self.max_tokens!r}")
        if not _is_real(self.temperature) or not math.isfinite(self.temperature) or self.temperature < 0:
            raise ValueError(f"temperature must be a finite number >= 0 (0 = greedy), got {self.temperature!r}")
        if not _is_int(self.top_k) or self.top_k < 0:
            raise ValueError(f"top_k must be an integer >= 0 (0 disables it), got {self.top_k!r}")
        if not _is_real(self.top_p) or not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1] (1 disables it), got {self.top_p!r}")
        if self.seed is not None and (not _is_int(self.seed) or not 0 <= self.seed < 2**63):
            raise ValueError(f"seed must be None or an integer in [0, 2**63), got {self.seed!r}")
        for s in self.stop:
            if not isinstance(s, str) or not s:
                raise ValueError(f"stop strings must be non-empty str, got {s!r}")
        for t in self.stop_token_ids:
            if not _is_int(t) or t < 0:
                raise ValueError(f"stop_token_ids must be integers >= 0, got {t!r}")


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_real(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)
