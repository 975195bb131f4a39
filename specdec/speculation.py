"""Adaptive speculation: how many draft tokens the next step should propose.

Speculating ``k`` tokens costs one draft step (``k`` draft forwards) and a verify forward
over ``k + 1`` tokens per sequence, and yields ``E(α, k) = (1 − α^(k+1)) / (1 − α)``
tokens per sequence on average when each draft token is accepted with probability α
(Leviathan et al., 2023). The controller picks, for the batch at hand,

    k* = argmax_k  E(α, k) / (draft(B, k) + verify(B, k))

from an acceptance rate it measures on every step and costs it measures per batch-size
bucket and ``k`` (CUDA-event or wall-clock seconds of the draft and the verify half of a
step). At batch 1 the verify forward is bound by reading the weights and barely grows
with ``k``, so speculation pays; at large batch it becomes compute-bound, each extra
query token costs its share, and k* falls to 0: plain decoding, never slower than it.

Costs not yet measured are estimated optimistically — the lowest a roofline allows
given the measured ones: no less than a shorter chain's, and no less per verified token
than a longer chain's — so a ``k`` that might be better is tried and then known, and
one that cannot be better is never run. The first sample of every (bucket, k) is
dropped (it carries the CUDA-graph capture or kernel compilation).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

# batch-size buckets: a batch of B sequences is timed (and graph-captured) as the
# smallest bucket >= B
BATCH_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256)


def bucket_of(batch_size: int, buckets: tuple[int, ...] = BATCH_BUCKETS) -> int:
    """The smallest bucket holding ``batch_size`` sequences (itself past the last one)."""
    for b in buckets:
        if b >= batch_size:
            return b
    return batch_size


def expected_tokens(alpha: float, k: int) -> float:
    """Tokens one step emits on average: accepted drafts plus the sampled token."""
    if alpha >= 1.0:
        return float(k + 1)
    return (1.0 - alpha ** (k + 1)) / (1.0 - alpha)


def trials(num_proposed: int, num_accepted: int) -> int:
    """Acceptance tests a chain step ran: every accepted draft and the first rejection."""
    return num_accepted + (1 if num_accepted < num_proposed else 0)


@dataclass
class _Cost:
    """An exponential moving average of one (bucket, k)'s seconds; the first sample dropped."""

    dropped: bool = False  # the first sample without ``warm`` carries capture / compilation
    samples: int = 0
    draft: float = 0.0
    verify: float = 0.0

    def add(self, draft: float, verify: float, weight: float, warm: bool) -> None:
        if not (self.dropped or warm):
            self.dropped = True
            return
        self.dropped = True
        w = 1.0 if self.samples == 0 else weight
        self.samples += 1
        self.draft += w * (draft - self.draft)
        self.verify += w * (verify - self.verify)

    @property
    def known(self) -> bool:
        return self.samples > 0


@dataclass
class AdaptiveSpeculation:
    """Chooses the chain length of each step from measured acceptance and cost.

    max_k:        the longest chain (the user's ``num_draft_tokens``)
    prior_alpha:  acceptance assumed before any draft was verified
    prior_weight: how many acceptance tests the prior is worth
    memory:       per-step decay of old acceptance tests (1.0 keeps all)
    cost_weight:  weight of a new cost sample in its moving average

    >>> ctl = AdaptiveSpeculation(max_k=4)
    >>> ctl.choose(1)              # nothing measured: the longest chain
    4
    """

    max_k: int
    prior_alpha: float = 0.6
    prior_weight: float = 8.0
    memory: float = 0.98
    cost_weight: float = 0.2
    _accepted: float = 0.0
    _tests: float = 0.0
    _costs: dict = field(default_factory=dict)  # (bucket, k) -> _Cost

    def __post_init__(self):
        if self.max_k < 1:
            raise ValueError(f"adaptive speculation needs max_k >= 1, got {self.max_k}")
        if not 0.0 <= self.prior_alpha <= 1.0:
            raise ValueError(f"prior_alpha must be in [0, 1], got {self.prior_alpha}")

    # ------------------------------------------------------------------ measurements
    @property
    def alpha(self) -> float:
        """Acceptance rate per draft token, a smoothed estimate from the recent steps."""
        w = self.prior_weight
        return (self._accepted + w * self.prior_alpha) / (self._tests + w)

    def observe(self, proposed: list[int], accepted: list[int]) -> None:
        """One step's per-sequence draft counts and accepted counts."""
        tests = sum(trials(n, a) for n, a in zip(proposed, accepted, strict=True))
        if tests == 0:
            return  # nothing was drafted: nothing learned, nothing forgotten
        self._accepted = self.memory * self._accepted + sum(accepted)
        self._tests = self.memory * self._tests + tests

    def record(self, batch_size: int, k: int, draft_seconds: float, verify_seconds: float,
               warm: bool = False) -> None:
        """The measured halves of a step that ran ``k`` drafts for ``batch_size`` sequences.

        warm: the sample carries no one-time cost (capture, compilation), keep it even if
        it is the first of its (bucket, k)
        """
        key = (bucket_of(batch_size), k)
        self._costs.setdefault(key, _Cost()).add(draft_seconds, verify_seconds, self.cost_weight, warm)

    def has_costs(self, batch_size: int) -> bool:
        """Whether any chain length has a measured cost at this batch size's bucket."""
        bucket = bucket_of(batch_size)
        return any(b == bucket and c.known for (b, _), c in self._costs.items())

    # ------------------------------------------------------------------ the choice
    def _estimate(self, bucket: int, k: int) -> tuple[float, float] | None:
        """(draft, verify) seconds of ``k`` at ``bucket``: measured, else optimistic."""
        known = {j: c for (b, j), c in self._costs.items() if b == bucket and c.known}
        if k in known:
            return known[k].draft, known[k].verify
        if not known:
            return None
        # the lowest cost a roofline allows: a longer chain costs no less, and no less
        # per token, than a shorter one
        below = [j for j in known if j < k]
        above = [j for j in known if j > k]
        verify = 0.0
        if below:
            verify = known[max(below)].verify
        if above:
            hi = min(above)
            verify = max(verify, known[hi].verify * (k + 1) / (hi + 1))
        per_draft = [c.draft / j for j, c in known.items() if j > 0]
        draft = k * min(per_draft) if per_draft else 0.0
        return draft, verify

    def choose(self, batch_size: int) -> int:
        """The chain length for the next step of ``batch_size`` sequences."""
        bucket = bucket_of(batch_size)
        alpha = self.alpha
        best_k, best_rate = self.max_k, -1.0
        for k in range(self.max_k, -1, -1):  # ties go to the longer chain
            cost = self._estimate(bucket, k)
            if cost is None:
                return self.max_k  # nothing measured at this batch size yet
            seconds = cost[0] + cost[1]
            rate = expected_tokens(alpha, k) / seconds if seconds > 0 else float("inf")
            if rate > best_rate:
                best_k, best_rate = k, rate
        return best_k


class StepClock:
    """Timestamps a step's halves; read them after the step's device-to-host copy.

    On CUDA these are events (recording one does not wait for the device), elsewhere the
    wall clock (CPU work is synchronous).
    """

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def mark(self):
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def seconds(self, start, end) -> float:
        """Elapsed seconds between two marks (the device must have passed ``end``)."""
        return start.elapsed_time(end) / 1e3 if self.cuda else end - start
