"""Adaptive speculation: the chain length each step chooses (specdec/speculation.py).

The controller is driven here by a cost model of a GPU step — a verify forward that is
bound by reading the weights until the batch's query tokens make it compute-bound, and
a draft forward that is a fixed fraction of it — and by acceptance drawn from a known α.
It must find the k that maximises tokens per second, run the longest chain at batch 1,
fall to plain decoding at large batch, and waste few steps finding out.
"""

from __future__ import annotations

import random

import pytest
import torch

from checkpoints import make_checkpoint
from specdec import LLM, SamplingParams
from specdec.speculation import AdaptiveSpeculation, bucket_of, expected_tokens, trials

K = 4


def verify_cost(batch: int, k: int) -> float:
    """Seconds of a verify forward: weight-bound (1 ms) up to 64 query tokens, then
    compute-bound (1 ms per 64 tokens)."""
    return max(1.0, batch * (k + 1) / 64) * 1e-3


def draft_cost(batch: int, k: int, c: float = 0.1) -> float:
    return k * c * verify_cost(batch, 0)


def rate(alpha: float, batch: int, k: int, c: float = 0.1) -> float:
    """Expected tokens per second of a chain of k under the cost model."""
    return batch * expected_tokens(alpha, k) / (draft_cost(batch, k, c) + verify_cost(batch, k))


def best_k(alpha: float, batch: int, c: float = 0.1) -> int:
    return max(range(K + 1), key=lambda k: (rate(alpha, batch, k, c), k))


def draw_accepted(rng: random.Random, alpha: float, k: int, batch: int) -> list[int]:
    """Accepted drafts of each sequence when each of k drafts passes with probability α."""
    accepted = []
    for _ in range(batch):
        a = 0
        while a < k and rng.random() < alpha:
            a += 1
        accepted.append(a)
    return accepted


def simulate(ctl: AdaptiveSpeculation, alpha: float, batch: int, steps: int, seed: int = 0, c: float = 0.1):
    """Run ``steps`` steps of ``batch`` sequences; returns the chosen k of each step."""
    rng = random.Random(seed)
    chosen = []
    for _ in range(steps):
        k = ctl.choose(batch)
        chosen.append(k)
        ctl.observe([k] * batch, draw_accepted(rng, alpha, k, batch))
        ctl.record(batch, k, draft_cost(batch, k, c), verify_cost(batch, k))
    return chosen


def test_expected_tokens_and_trials():
    assert expected_tokens(0.0, 4) == 1.0
    assert expected_tokens(1.0, 4) == 5.0
    assert expected_tokens(0.5, 2) == pytest.approx(1 + 0.5 + 0.25)
    assert trials(4, 4) == 4 and trials(4, 1) == 2 and trials(0, 0) == 0


def test_buckets():
    assert [bucket_of(b) for b in (1, 2, 3, 5, 17, 64, 65, 300)] == [1, 2, 4, 8, 24, 64, 96, 300]


def test_acceptance_estimate_tracks_alpha():
    ctl = AdaptiveSpeculation(max_k=K)
    assert ctl.alpha == ctl.prior_alpha
    simulate(ctl, alpha=0.85, batch=8, steps=300)
    assert ctl.alpha == pytest.approx(0.85, abs=0.05)
    simulate(ctl, alpha=0.3, batch=8, steps=300, seed=1)  # the text got harder: it follows
    assert ctl.alpha == pytest.approx(0.3, abs=0.06)


@pytest.mark.parametrize("alpha, batch", [(0.9, 1), (0.6, 1), (0.9, 16), (0.6, 32), (0.9, 64), (0.5, 64), (0.2, 1)])
def test_settles_on_the_fastest_chain(alpha, batch):
    ctl = AdaptiveSpeculation(max_k=K)
    chosen = simulate(ctl, alpha, batch, steps=200)
    best = rate(alpha, batch, best_k(alpha, batch))
    # near-ties may flip with the noise of the acceptance estimate; the speed may not
    settled = [rate(alpha, batch, k) / best for k in chosen[-100:]]
    assert min(settled) > 0.97, (best_k(alpha, batch), chosen)
    # exploration is cheap: each k is run about twice to be measured (the first sample is dropped)
    overall = sum(rate(alpha, batch, k) for k in chosen) / len(chosen) / best
    assert overall > 0.9, chosen


def test_batch_one_speculates_and_large_batch_decodes_plainly():
    assert best_k(0.8, 1) == K and best_k(0.8, 64) == 0  # the cost model's premise
    ctl = AdaptiveSpeculation(max_k=K)
    assert simulate(ctl, 0.8, 1, 60)[-10:] == [K] * 10
    assert simulate(ctl, 0.8, 64, 60)[-10:] == [0] * 10
    assert simulate(ctl, 0.8, 1, 10)[-5:] == [K] * 5  # costs are kept per bucket


def test_never_slower_than_plain_decoding():
    """Over a run, tokens per second stay >= 0.95x plain decoding's, at every batch."""
    for batch in (1, 16, 64, 128):
        for alpha in (0.1, 0.5, 0.9):
            ctl = AdaptiveSpeculation(max_k=K)
            rng = random.Random(batch)
            tokens = seconds = 0.0
            for _ in range(400):
                k = ctl.choose(batch)
                acc = draw_accepted(rng, alpha, k, batch)
                ctl.observe([k] * batch, acc)
                d, v = draft_cost(batch, k), verify_cost(batch, k)
                ctl.record(batch, k, d, v)
                tokens += sum(acc) + batch
                seconds += d + v
            plain = batch / verify_cost(batch, 0)
            assert tokens / seconds >= 0.95 * plain, (batch, alpha, tokens / seconds / plain)


def test_warm_costs_skip_exploration():
    ctl = AdaptiveSpeculation(max_k=K)
    for k in range(K + 1):
        ctl.record(64, k, draft_cost(64, k), verify_cost(64, k), warm=True)
    assert ctl.has_costs(64) and ctl.choose(64) == 0
    assert not ctl.has_costs(1) and ctl.choose(1) == K  # nothing known at batch 1: the longest chain


def test_bad_settings():
    with pytest.raises(ValueError, match="max_k"):
        AdaptiveSpeculation(max_k=0)
    with pytest.raises(ValueError, match="prior_alpha"):
        AdaptiveSpeculation(max_k=2, prior_alpha=1.5)


# ---------------------------------------------------------------------------------------
# In the engine
# ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def target(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("adaptive") / "t", num_layers=3, seed=0)


def _modelled(llm):
    """Replace measured seconds with the cost model's, so the test does not depend on
    this machine's timings; everything else is the engine's own loop."""
    spec = llm.engine.speculation
    record = spec.record
    ks = []
    spec.record = lambda b, k, d, v, warm=False: (ks.append((b, k)), record(b, k, draft_cost(b, k), verify_cost(b, k)))
    return ks


@pytest.mark.parametrize("batch, want", [(1, K), (64, 0)])
def test_engine_follows_the_controller(target, batch, want):
    # the target drafting for itself: greedy acceptance is 1, and even so a batch of 64
    # is faster plainly under the cost model
    assert best_k(1.0, batch) == want
    llm = LLM(str(target), draft=str(target), num_draft_tokens=K, device="cpu", dtype=torch.float32,
              adaptive=True, max_num_seqs=batch, seed=0)
    ks = _modelled(llm)
    prompts = [[5 + i, 9, 13] for i in range(batch)]
    greedy = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)
    outs = llm.generate(prompts, greedy)
    tail = [k for b, k in ks if b == batch][-3:]
    assert tail and all(k == want for k in tail), ks
    m = llm.metrics()
    assert m["chain_length"] == want
    assert m["measured_alpha"] > 0.8  # greedy self-drafting: every tested draft is accepted
    # the chain length changes step to step; greedy output is plain decoding's all the same
    plain = LLM(str(target), device="cpu", dtype=torch.float32, max_num_seqs=batch).generate(prompts, greedy)
    assert [o.token_ids for o in outs] == [o.token_ids for o in plain]
