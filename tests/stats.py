"""Goodness-of-fit helpers for the sampling tests (scipy-free: torch.special only).

``chi_square_test(counts, probs)`` compares observed counts over a finite set of outcomes
with exact probabilities: cells with a small expected count are pooled so the chi-square
approximation holds, and the p-value is the chi-square survival function

    P(X >= stat) for X ~ chi2(df)  =  Q(df / 2, stat / 2)

with Q the regularised upper incomplete gamma function (``torch.special.gammaincc``).
An observation in a cell of probability 0 is impossible under the null, so it gives
``stat = inf`` and ``p_value = 0``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


def chi2_sf(stat: float, df: int) -> float:
    """Survival function of the chi-square distribution with ``df`` degrees of freedom."""
    if df < 1:
        raise ValueError(f"df must be >= 1, got {df}")
    if stat == math.inf:
        return 0.0
    if stat <= 0:
        return 1.0
    a = torch.tensor(df / 2, dtype=torch.float64)
    x = torch.tensor(stat / 2, dtype=torch.float64)
    return float(torch.special.gammaincc(a, x))


@dataclass
class ChiSquareResult:
    stat: float  # Pearson's sum (O - E)^2 / E over the pooled cells
    df: int  # pooled cells - 1
    p_value: float
    num_cells: int  # cells after pooling
    impossible: int  # observations that fell in cells of probability 0

    def __str__(self) -> str:
        return (f"chi2={self.stat:.1f} df={self.df} p={self.p_value:.3g} "
                f"({self.num_cells} cells, {self.impossible} impossible draws)")


def chi_square_test(counts: torch.Tensor, probs: torch.Tensor, min_expected: float = 5.0
                    ) -> ChiSquareResult:
    """Pearson's chi-square test of ``counts`` against the exact distribution ``probs``.

    counts:       [C] integer counts of each outcome (any integer dtype)
    probs:        [C] float probabilities of the outcomes (sum 1 up to rounding)
    min_expected: cells whose expected count is below this are pooled into one cell
                  (with the smallest large cells too, until the pool reaches it)
    """
    if counts.shape != probs.shape or counts.dim() != 1:
        raise ValueError(f"counts and probs must be 1-D of one length, got "
                         f"{tuple(counts.shape)} and {tuple(probs.shape)}")
    counts = counts.double()
    probs = probs.double()
    if (probs < 0).any() or abs(float(probs.sum()) - 1) > 1e-6:
        raise ValueError(f"probs must be a distribution, sums to {float(probs.sum())}")
    n = float(counts.sum())
    impossible = int(counts[probs == 0].sum())
    # the zero-probability cells leave the test: any draw there rejects outright
    possible = probs > 0
    counts, expected = counts[possible], probs[possible] * n
    order = torch.argsort(expected)  # ascending
    counts, expected = counts[order], expected[order]
    # pool the smallest cells until the pooled expected count reaches min_expected
    cum = torch.cumsum(expected, 0)
    n_small = int((expected < min_expected).sum())
    if n_small:
        n_small = max(n_small, int((cum < min_expected).sum()) + 1)
        n_small = min(n_small, expected.numel())
        counts = torch.cat([counts[:n_small].sum()[None], counts[n_small:]])
        expected = torch.cat([expected[:n_small].sum()[None], expected[n_small:]])
    df = expected.numel() - 1
    if df < 1:
        raise ValueError("too few samples: every cell pools into one; draw more")
    stat = float(((counts - expected) ** 2 / expected).sum())
    if impossible:
        stat = math.inf
    return ChiSquareResult(stat, df, chi2_sf(stat, df), expected.numel(), impossible)


def binomial_two_sided_p(successes: int, trials: int, prob: float) -> float:
    """Two-sided p-value of ``successes`` in ``trials`` Bernoulli(``prob``) draws, by the
    normal approximation with continuity correction (fine when trials * prob * (1 - prob)
    is large, as in these tests: hundreds or more)."""
    if not 0 < prob < 1:
        raise ValueError(f"prob must be in (0, 1), got {prob}")
    mean = trials * prob
    sd = math.sqrt(trials * prob * (1 - prob))
    z = max(abs(successes - mean) - 0.5, 0.0) / sd
    return math.erfc(z / math.sqrt(2))


def chi_square_pvalue(observed: torch.Tensor, expected: torch.Tensor) -> float:
    """Pearson chi-square p-value of counts against expected counts (cells with 0 dropped)."""
    observed, expected = observed.double(), expected.double()
    keep = expected > 0
    stat = ((observed[keep] - expected[keep]) ** 2 / expected[keep]).sum()
    df = int(keep.sum()) - 1
    return float(torch.special.gammaincc(torch.tensor(df / 2.0), stat / 2.0))
