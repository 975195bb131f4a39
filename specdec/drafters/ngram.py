"""Prompt-lookup drafting: continue the longest recent n-gram that occurred before."""

from __future__ import annotations

import torch

from ..batch import SamplingTensors
from ..sequence import Sequence
from .base import DraftProposal, Drafter


def ngram_propose(tokens: list[int], k: int, max_ngram: int = 4, min_ngram: int = 1) -> list[int]:
    """Up to ``k`` tokens that followed the latest earlier occurrence of the longest
    suffix n-gram of ``tokens`` (n from ``max_ngram`` down to ``min_ngram``).

    >>> ngram_propose([5, 6, 7, 8, 5, 6], k=2)
    [7, 8]
    """
    n_tok = len(tokens)
    if k <= 0:
        return []
    for n in range(min(max_ngram, n_tok - 1), min_ngram - 1, -1):
        suffix = tokens[n_tok - n:]
        # latest earlier start i (< n_tok - n) with tokens[i:i+n] == suffix
        for i in range(n_tok - n - 1, -1, -1):
            if tokens[i:i + n] == suffix:
                return tokens[i + n:i + n + k]
    return []


class NgramDrafter(Drafter):
    """No model: the draft is a point mass on what followed the matched n-gram."""

    name = "ngram"

    def __init__(self, max_ngram: int = 4, min_ngram: int = 1):
        if not 1 <= min_ngram <= max_ngram:
            raise ValueError(f"need 1 <= min_ngram <= max_ngram, got {min_ngram}, {max_ngram}")
        self.max_ngram, self.min_ngram = max_ngram, min_ngram

    def propose(self, seqs: list[Sequence], limits: list[int], sampling: SamplingTensors,
                device) -> DraftProposal:
        drafts = [ngram_propose(s.tokens, lim, self.max_ngram, self.min_ngram)
                  for s, lim in zip(seqs, limits)]
        flat = [t for d in drafts for t in d]
        return DraftProposal(torch.tensor(flat, dtype=torch.int64, device=device), None,
                             [len(d) for d in drafts])
