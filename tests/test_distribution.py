"""End-to-end distribution tests: the speculative engine samples exactly the target's law.

Speculative sampling (Leviathan et al. 2023; Chen et al. 2023) is exact: whatever the
drafter proposes, accepting draft x with probability min(1, p(x) / q(x)) and otherwise
sampling the residual max(p - q, 0) normalised emits tokens distributed as the target
p alone would. These tests check that claim through the whole engine (drafting, ragged
verify forward through the paged cache, rejection sampling, commit/truncate, emit):

* the target's exact joint law of the first ``N_TOKENS`` generated tokens is enumerated
  with the no-cache forward ``model(input_ids)`` and ``reference.sampling_probs`` (the
  definition of the distribution a request samples from), V ** N_TOKENS outcomes;
* ``N_SAMPLES`` seeded requests go through ``LLM.generate`` in one call, and Pearson's
  chi-square test (tests/stats.py) compares their counts with the exact law;
* the share of requests whose first draft is accepted is compared (binomial test) with
  its exact value sum_x min(p(x), q(x)): exact but needlessly timid samplers fail too;
* the same harness, with the engine's rejection sampler swapped for a wrong one, must
  reject at p < ``POWER_ALPHA``: the tests have the power to see a broken sampler;
* a seeded request gives the same tokens alone, in a batch, joining a running batch and
  across preemption; the triton backend gives the torch backend's tokens.

The vocabulary is tiny (V = 8) and the random models are far from peaked (std 0.5: the
most likely token has ~0.3 of the mass), and the separate draft model overlaps the
target by only ~0.5, so rejections, residual samples and bonus tokens are all frequent.
Every seed is fixed, so every test is deterministic.
"""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from engine_helpers import ScheduledK
from exact_law import (
    distribution_checkpoints,
    exact_joint,
    next_token_probs,
    window_checkpoints,
)
from sampler_rules import ALPHA, POWER_ALPHA, residual_from_p
from stats import binomial_two_sided_p, chi2_sf, chi_square_test

from specdec import LLM, SamplingParams
from specdec.drafters.ngram import ngram_propose
from specdec.kernels import reference
from specdec.kernels.philox import (
    philox_uniform,
    sample_inverse_cdf,
)
from specdec.kv_cache import KVCache
from specdec.models import load_model

V = 8  # vocabulary size
N_TOKENS = 3  # generated tokens whose joint law is tested: V ** 3 = 512 outcomes
N_SAMPLES = 4096  # requests per distribution test
# A prompt with repeats, so the n-gram drafter proposes tokens (acceptance ~0.2); 14
# tokens with block_size 4 puts the drafts across KV block boundaries.
PROMPT = [3, 1, 2, 0, 5, 2, 0, 4, 3, 1, 2, 0, 5, 2]
BLOCK_SIZE = 4


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    return distribution_checkpoints(tmp_path_factory.mktemp("distribution"))


def make_llm(ckpts, draft: str | None, k: int = 2, backend: str = "torch",
             max_num_seqs: int = 512, device: str = "cpu", num_blocks: int | None = None) -> LLM:
    """``draft``: None, "model" / "near" (draft checkpoints), "ngram", "early-exit:N";
    ``num_blocks``: size the KV cache to that many blocks (default: plenty).
    fp32 everywhere, so the engine's logits match the no-cache oracle to a few ulps."""
    memory = None
    if num_blocks is not None:
        cfg = ckpts.model.config
        layers = cfg.num_layers + (1 if draft == "model" else 0)  # the draft model has 1 layer
        # + 1: the scratch block
        memory = (num_blocks + 1) * KVCache.bytes_per_block(layers, BLOCK_SIZE, cfg.num_kv_heads, cfg.head_dim,
                                                      torch.float32)
    draft = str(ckpts.dirs[draft]) if draft in ckpts.dirs else draft
    return LLM(ckpts.target, draft=draft, num_draft_tokens=k, device=device, dtype=torch.float32,
               backend=backend, block_size=BLOCK_SIZE, max_num_seqs=max_num_seqs, seed=0,
               kv_cache_memory=memory)


# ---------------------------------------------------------------------------------------
# The exact law of the target and the sampled one
# ---------------------------------------------------------------------------------------

def sample_outcomes(llm: LLM, params: SamplingParams, num: int = N_SAMPLES, n: int = N_TOKENS,
                    seed0: int = 0):
    """``num`` requests of ``PROMPT`` with seeds seed0, seed0 + 1, ..; returns (counts
    [V ** n] int64 over outcomes, the RequestOutputs)."""
    reqs = [dataclasses.replace(params, max_tokens=n, seed=seed0 + i, ignore_eos=True) for i in range(num)]
    outs = llm.generate([PROMPT] * num, reqs)
    toks = torch.tensor([o.token_ids for o in outs], dtype=torch.int64)  # [num, n]
    assert toks.shape == (num, n) and all(o.finish_reason == "length" for o in outs)
    index = (toks * V ** torch.arange(n - 1, -1, -1)).sum(1)  # [num]
    return torch.bincount(index, minlength=V ** n), outs


def first_draft_acceptance(ckpts, draft: str, params: SamplingParams) -> float:
    """The exact probability that the first draft token of a request's first step is
    accepted: sum_x min(p(x), q(x)) for a sampled draft (Leviathan et al., Thm 3.5),
    p(d) for the n-gram drafter's fixed proposal d."""
    prompt = torch.tensor([PROMPT])
    p = next_token_probs(ckpts.model, prompt, params)[0]  # [V]
    if draft == "ngram":
        return float(p[ngram_propose(PROMPT, 1)[0]])
    if draft.startswith("early-exit:"):
        drafter = copy.deepcopy(ckpts.model)
        drafter.model.layers = drafter.model.layers[:int(draft.split(":")[1])]
    else:
        drafter = load_model(ckpts.dirs[draft])
    q = next_token_probs(drafter, prompt, params)[0]  # [V]
    return float(torch.minimum(p, q).sum())


def first_draft_accepted(outs) -> int:
    """Requests whose first step accepted its first draft. With max_tokens=3 a position-0
    draft is proposed again in step 2 only after a rejection in step 1, so that happened
    iff position 0 was proposed once and accepted once."""
    return sum(o.metrics.proposed_per_position[0] == 1 and o.metrics.accepted_per_position[0] == 1
               for o in outs)


def assert_paths_exercised(llm: LLM, outs) -> None:
    """Acceptances, rejections (residual samples) and all-accepted steps (bonus tokens)
    each occur in at least 2% of the requests."""
    m = llm.metrics()
    assert 0.05 < m["acceptance_rate"] < 0.95, m
    drafted = [o.metrics for o in outs if o.metrics.num_draft_tokens]
    rejected = sum(r.num_accepted_tokens < r.num_draft_tokens for r in drafted)
    bonus = sum(r.num_accepted_tokens == r.num_draft_tokens for r in drafted)  # last step all accepted
    assert len(drafted) == len(outs), "every request should have been proposed drafts"
    assert rejected > 0.02 * len(outs) and bonus > 0.02 * len(outs), (rejected, bonus, len(outs))


# ---------------------------------------------------------------------------------------
# The statistics helper itself
# ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("stat, df, expected", [
    (3.841458820694124, 1, 0.05),  # textbook chi-square quantiles
    (18.307038053275146, 10, 0.05),
    (6.634896601021214, 1, 0.01),
    (2.0, 2, 0.36787944117144233),  # df = 2: exp(-stat / 2)
])
def test_chi2_sf_matches_known_quantiles(stat, df, expected):
    assert chi2_sf(stat, df) == pytest.approx(expected, rel=1e-9)


def test_chi_square_test_accepts_exact_draws_and_rejects_a_shift():
    gen = torch.Generator().manual_seed(0)
    probs = torch.softmax(torch.randn(64, generator=gen, dtype=torch.float64) * 2, 0)
    draws = torch.multinomial(probs, 4096, replacement=True, generator=gen)
    good = chi_square_test(torch.bincount(draws, minlength=64), probs)
    assert good.p_value > ALPHA and good.num_cells < 64, good  # small cells were pooled
    shifted = torch.softmax(probs.log() + 0.3 * torch.randn(64, generator=gen, dtype=torch.float64), 0)
    draws = torch.multinomial(shifted, 4096, replacement=True, generator=gen)
    assert chi_square_test(torch.bincount(draws, minlength=64), probs).p_value < POWER_ALPHA
    # a draw of a zero-probability outcome rejects outright
    counts = torch.bincount(draws, minlength=64)
    counts[0] += 1
    zeroed = probs.clone()
    zeroed[0] = 0
    res = chi_square_test(counts, zeroed / zeroed.sum())
    assert res.p_value == 0 and res.impossible == counts[0]


# ---------------------------------------------------------------------------------------
# The engine samples the target's law
# ---------------------------------------------------------------------------------------

CASES = {
    # name: (drafter, num_draft_tokens, SamplingParams)
    "plain": (None, 2, SamplingParams(temperature=1.0)),  # control: no speculation
    "model-t1": ("model", 2, SamplingParams(temperature=1.0)),
    # k = 3 > the 2 drafts max_tokens=3 allows on the first step: clipped draft counts
    "ngram-t1": ("ngram", 3, SamplingParams(temperature=1.0)),
    "early-exit-t1": ("early-exit:1", 2, SamplingParams(temperature=1.0)),
    # temperature, then top-k (keeps 3 of 8), then top-p (keeps 2 where 3 hold > 0.9)
    "near-t0.7-topk-topp": ("near", 2, SamplingParams(temperature=0.7, top_k=3, top_p=0.9)),
}


# The torch backend runs on the CPU everywhere. On a CUDA machine the same cases also
# run on the triton backend at full size; without CUDA the interpreter is far too slow
# for that, and test_triton_backend_draws_the_torch_backends_tokens covers it instead.
DISTRIBUTION_RUNS = [pytest.param(case, "torch", id=case) for case in CASES] + [
    pytest.param(case, "triton", id=f"{case}-triton", marks=pytest.mark.gpu)
    for case in ("model-t1", "ngram-t1", "near-t0.7-topk-topp")
]


@pytest.mark.slow
@pytest.mark.parametrize("case, backend", DISTRIBUTION_RUNS)
def test_engine_samples_target_distribution(ckpts, case, backend):
    draft, k, params = CASES[case]
    joint, kept = exact_joint(ckpts.model, PROMPT, params)
    llm = make_llm(ckpts, draft, k, backend=backend, device="cpu" if backend == "torch" else "cuda")
    counts, outs = sample_outcomes(llm, params)
    res = chi_square_test(counts, joint)
    assert res.impossible == 0, f"{case}: drew outcomes the target cannot produce: {res}"
    assert res.p_value > ALPHA, f"{case}: the engine's samples do not follow the target: {res}"
    if draft is not None:
        assert_paths_exercised(llm, outs)
        # the acceptance rate is the optimal one, not merely some rate that keeps p exact
        expected = first_draft_acceptance(ckpts, draft, params)
        got = first_draft_accepted(outs)
        p_acc = binomial_two_sided_p(got, len(outs), expected)
        assert p_acc > ALPHA, f"{case}: first drafts accepted {got}/{len(outs)}, expected {expected:.3f}"
    if params.top_k or params.top_p < 1:
        # both filters really cut: top-k binds after some prefixes, top-p after others
        assert kept.max() == params.top_k and kept.min() < params.top_k, kept


# ---------------------------------------------------------------------------------------
# ... and the same harness rejects a wrong rejection sampler
# ---------------------------------------------------------------------------------------

def _accept_all(target_logits, draft_token_ids, q, *args, **kwargs):
    """Wrong: accepts every draft token. Passing q = 0 (z = inf) makes the ratio test
    u * q(x) < p(x) pass wherever p(x) > 0 (always, at temperature 1); then the bonus
    token is sampled from the last row, so the output follows the draft model."""
    return reference.rejection_sample(target_logits, draft_token_ids,
                                      q._replace(z=torch.full_like(q.z, float("inf"))),
                                      *args, **kwargs)




def _unfiltered(target_logits, draft_token_ids, draft_probs, cu_num_draft, max_num_draft,
                temperature, top_k, top_p, *args, **kwargs):
    """Wrong: forgets the request's top-k and top-p on the target side (temperature only)."""
    return reference.rejection_sample(target_logits, draft_token_ids, draft_probs, cu_num_draft,
                                      max_num_draft, temperature, torch.zeros_like(top_k),
                                      torch.ones_like(top_p), *args, **kwargs)


@pytest.mark.slow
@pytest.mark.parametrize("case, wrong, num", [
    ("model-t1", _accept_all, N_SAMPLES),
    ("model-t1", residual_from_p, N_SAMPLES),
    # draws outside the filtered support: a quarter of the draws is plenty
    ("near-t0.7-topk-topp", _unfiltered, N_SAMPLES // 4),
], ids=["accept-all", "residual-from-p", "unfiltered"])
def test_wrong_sampler_is_rejected(ckpts, case, wrong, num):
    draft, k, params = CASES[case]
    joint, _ = exact_joint(ckpts.model, PROMPT, params)
    llm = make_llm(ckpts, draft, k)
    llm.engine.ops = dataclasses.replace(llm.engine.ops, rejection_sample=wrong)
    counts, _ = sample_outcomes(llm, params, num=num)  # the seeds of the passing test
    res = chi_square_test(counts, joint)
    assert res.p_value < POWER_ALPHA, f"a wrong sampler passed the distribution test: {res}"


def _draft_ignores_filters(logits, temperature, top_k, top_p, seeds, offsets, stream, *args,
                           **kwargs):
    """Wrong draft side: draws the drafts from the draft's temperature-only distribution
    but hands the sampler the filtered q (the q the tokens were not drawn from)."""
    tokens, _ = reference.draft_sample(logits, temperature, torch.zeros_like(top_k), torch.ones_like(top_p),
                                       seeds, offsets, stream, *args, **kwargs)
    _, q = reference.draft_sample(logits, temperature, top_k, top_p, seeds, offsets, stream, *args, **kwargs)
    return tokens, q


@pytest.mark.slow
def test_wrong_draft_sampler_is_rejected(ckpts):
    """The harness also sees a draft sampler whose draws do not follow the q it reports."""
    draft, k, params = CASES["near-t0.7-topk-topp"]
    joint, _ = exact_joint(ckpts.model, PROMPT, params)
    llm = make_llm(ckpts, draft, k)
    llm.engine.drafter.ops = dataclasses.replace(llm.engine.drafter.ops, draft_sample=_draft_ignores_filters)
    counts, _ = sample_outcomes(llm, params, num=N_SAMPLES // 4)
    res = chi_square_test(counts, joint)
    assert res.p_value < POWER_ALPHA, f"a wrong draft sampler passed the distribution test: {res}"


def _timid(c: float):
    """Exact but wasteful: keeps each draft the correct sampler accepts only with
    probability ``c``, and at the first draft not kept samples the residual
    r = p - c min(p, q) (normalised), so that position still emits
    c min(p, q) + (1 - c sum min(p, q)) r / sum r = p. The law is right; the acceptance
    rate is c times the optimal one."""
    def sample(target_logits, draft_token_ids, draft_q, cu_num_draft, max_num_draft,
               temperature, top_k, top_p, seeds, offsets, check_finite=True, **hints):
        out, n_acc = reference.rejection_sample(target_logits, draft_token_ids, draft_q, cu_num_draft,
                                                max_num_draft, temperature, top_k, top_p, seeds, offsets,
                                                check_finite)
        if draft_token_ids.numel() == 0:  # a step without drafts (the last one): nothing to do
            return out, n_acc
        b = torch.arange(out.shape[0])
        start, end = cu_num_draft[:-1].long(), cu_num_draft[1:].long()
        coin = philox_uniform(seeds, offsets, max_num_draft, stream=2) < c  # [B, K]
        a = torch.minimum(n_acc.long(), torch.cumprod(coin.long(), 1).sum(1))  # [B] kept drafts
        stopped = a < end - start
        p = reference.sampling_probs(target_logits[start + b + a], temperature, top_k, top_p)  # [B, V]
        draft_probs = reference.draft_dist_probs(draft_q)  # [sum n_b, V]
        q = draft_probs[(start + a).clamp(max=draft_probs.shape[0] - 1)]  # [B, V]
        u = philox_uniform(seeds, offsets, max_num_draft + 1, stream=3).gather(1, a[:, None])[:, 0]
        emitted = torch.where(stopped, sample_inverse_cdf(p - c * torch.minimum(p, q), u), out[b, a])
        out = torch.where(torch.arange(max_num_draft + 1) < a[:, None], out, -1)
        out[b, a] = emitted
        return out, a.to(torch.int32)
    return sample


@pytest.mark.slow
def test_timid_exact_sampler_fails_the_acceptance_check(ckpts):
    """The acceptance check has power too: a sampler whose law is exact (the chi-square
    test passes) but which accepts 0.8x the optimal rate is caught by it."""
    draft, k, params = CASES["model-t1"]
    joint, _ = exact_joint(ckpts.model, PROMPT, params)
    llm = make_llm(ckpts, draft, k)
    llm.engine.ops = dataclasses.replace(llm.engine.ops, rejection_sample=_timid(0.8))
    counts, outs = sample_outcomes(llm, params)
    res = chi_square_test(counts, joint)
    assert res.p_value > ALPHA, f"the timid sampler is exact, yet: {res}"
    expected = first_draft_acceptance(ckpts, draft, params)
    got = first_draft_accepted(outs)
    assert binomial_two_sided_p(got, len(outs), expected) < POWER_ALPHA, (got, expected)


# ---------------------------------------------------------------------------------------
# Batch invariance: a seeded request's tokens do not depend on what runs beside it
# ---------------------------------------------------------------------------------------

def _mixed_requests():
    """Nine requests with different prompts and sampling parameters; index 4 is the probe."""
    prompts = [[1, 2], [7] * 9, PROMPT[:5], [0, 6, 0, 6, 0, 6, 0], PROMPT, [5] * 3 + [4] * 3,
               PROMPT[::-1], [2, 2, 7, 1, 3, 3, 7, 1, 3], list(range(V)) * 3]
    params = [
        SamplingParams(max_tokens=9, temperature=0.0, seed=11),
        SamplingParams(max_tokens=14, temperature=1.3, top_p=0.8, seed=12),
        SamplingParams(max_tokens=5, temperature=0.7, top_k=3, seed=13),
        SamplingParams(max_tokens=11, temperature=1.0, seed=14),
        SamplingParams(max_tokens=12, temperature=1.0, seed=1234),  # the probe
        SamplingParams(max_tokens=7, temperature=0.5, top_k=4, top_p=0.9, seed=15),
        SamplingParams(max_tokens=16, temperature=1.0, seed=16),
        SamplingParams(max_tokens=3, temperature=2.0, seed=17),
        SamplingParams(max_tokens=10, temperature=0.9, top_p=0.5, seed=18),
    ]
    return prompts, [dataclasses.replace(p, ignore_eos=True) for p in params]


def _alone_and_together(llm: LLM):
    """Each mixed request generated alone, then all nine in one generate call."""
    prompts, params = _mixed_requests()
    alone = [llm.generate([p], sp)[0] for p, sp in zip(prompts, params)]
    together = llm.generate(prompts, params)
    for out, sp in zip(alone + together, params + params):
        assert len(out.token_ids) == sp.max_tokens
    return alone, together


@pytest.mark.parametrize("max_num_seqs, num_blocks", [(16, None), (3, None), (16, 16)],
                         ids=["one-batch", "continuous", "preempting"])
@pytest.mark.parametrize("draft", ["model", "ngram", "early-exit:1"])
def test_seeded_request_is_batch_invariant(ckpts, draft, max_num_seqs, num_blocks):
    # continuous: the probe waits, then joins a running batch; preempting: 16 KV blocks
    # hold the largest request (10 blocks) but not all nine, so sequences are preempted
    # and recomputed mid-generation
    llm = make_llm(ckpts, draft, k=3, max_num_seqs=max_num_seqs, num_blocks=num_blocks)
    alone, together = _alone_and_together(llm)
    for i, (a, t) in enumerate(zip(alone, together)):
        assert t.token_ids == a.token_ids, f"request {i} changed inside the batch"
    preempted = llm.engine.scheduler.num_preemptions
    assert bool(preempted) == (num_blocks is not None), preempted
    # the probe went through rejections and acceptances, not only one path
    probe = alone[4].metrics
    assert 0 < probe.num_accepted_tokens < probe.num_draft_tokens, probe
    # and the seed matters: another seed gives other tokens
    prompts, params = _mixed_requests()
    other = llm.generate([prompts[4]], dataclasses.replace(params[4], seed=4321))[0]
    assert other.token_ids != alone[4].token_ids


def _slot_keyed(target_logits, draft_token_ids, draft_probs, cu_num_draft, max_num_draft,
                temperature, top_k, top_p, seeds, offsets, check_finite=True, **hints):
    """Wrong: keys the sampler's draws on the request's slot in the batch, not its seed."""
    slots = torch.arange(seeds.shape[0], dtype=torch.int64, device=seeds.device)
    return reference.rejection_sample(target_logits, draft_token_ids, draft_probs, cu_num_draft,
                                      max_num_draft, temperature, top_k, top_p, slots, offsets,
                                      check_finite)


def test_batch_invariance_check_catches_slot_keyed_draws(ckpts):
    llm = make_llm(ckpts, "model", k=3, max_num_seqs=16)
    llm.engine.ops = dataclasses.replace(llm.engine.ops, rejection_sample=_slot_keyed)
    alone, together = _alone_and_together(llm)
    changed = [i for i, (a, t) in enumerate(zip(alone, together)) if a.token_ids != t.token_ids]
    assert len(changed) >= 3, changed


# ---------------------------------------------------------------------------------------
# The triton backend (under the interpreter on CPU), at reduced size
# ---------------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:Conversion of an array with ndim:DeprecationWarning")  # interpreter
@pytest.mark.parametrize("draft", ["model", "ngram", "early-exit:1"])
def test_triton_backend_draws_the_torch_backends_tokens(ckpts, device, draft):
    """Every random draw is Philox keyed on (seed, step, stream) in both backends, so the
    Triton kernels (verify attention, KV writes, rejection sampling) must emit exactly the
    torch backend's tokens for every seed: equality carries the chi-square verdicts on the
    torch backend over to the triton one. The interpreter is ~100x too slow for a
    chi-square test of its own (on CUDA that runs too, in the distribution test above).
    Equality is per seed, so a few seeds per parameter set suffice: they cover the wiring
    (streams, offsets, layout) on accepting and rejecting steps, plain and filtered; the
    kernels' token-for-token agreement on awkward inputs is tested in their own files."""
    n = 6
    t1 = SamplingParams(max_tokens=N_TOKENS, temperature=1.0, ignore_eos=True)
    filtered = dataclasses.replace(t1, temperature=0.7, top_k=3, top_p=0.9)
    exact_joint(ckpts.model, PROMPT, filtered)  # asserts the cuts sit far from ties
    params = [dataclasses.replace(sp, seed=i) for sp in (t1, filtered) for i in range(n)]
    ref = make_llm(ckpts, draft, k=2)
    tri = make_llm(ckpts, draft, k=2, backend="triton", device=device)
    want = ref.generate([PROMPT] * len(params), params)
    got = tri.generate([PROMPT] * len(params), params)
    assert [o.token_ids for o in got] == [o.token_ids for o in want]
    assert [o.metrics.num_accepted_tokens for o in got] == [o.metrics.num_accepted_tokens for o in want]
    assert 0 < tri.metrics()["acceptance_rate"] < 1, tri.metrics()  # both paths were taken


# ---------------------------------------------------------------------------------------
# Fixed-shape decode steps (what CUDA graphs replay) and a chain length that changes
# from step to step (adaptive speculation) keep the law
# ---------------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("case", ["model-t1", "early-exit-t1", "near-t0.7-topk-topp"])
def test_fixed_shape_steps_with_varying_k_sample_target_distribution(ckpts, case):
    draft, _, params = CASES[case]
    joint, _ = exact_joint(ckpts.model, PROMPT, params)
    llm = make_llm(ckpts, draft, k=3, max_num_seqs=N_SAMPLES)  # all at once: every later step decodes
    runner = llm.engine.runner = llm.decode_runner(use_graphs=False)
    llm.engine.speculation = ScheduledK([2, 3, 1, 0])  # step 1 prefills; k changes every step
    runs = []
    run = runner.run
    runner.run = lambda seqs, blocks, limits, mode, *rest: (runs.append((len(seqs), max(limits))),
                                                            run(seqs, blocks, limits, mode, *rest))[1]
    counts, outs = sample_outcomes(llm, params)
    res = chi_square_test(counts, joint)
    assert res.impossible == 0 and res.p_value > ALPHA, f"{case}: {res}"
    assert sum(b for b, _ in runs) > N_SAMPLES // 4, "the fixed-shape path served too few sequence steps"
    assert len({k for _, k in runs}) >= 2, runs  # the graphs of several chain lengths
    assert_paths_exercised(llm, outs)


@pytest.mark.slow
def test_fixed_shape_steps_with_a_wrong_sampler_are_rejected(ckpts):
    draft, _, params = CASES["model-t1"]
    joint, _ = exact_joint(ckpts.model, PROMPT, params)
    llm = make_llm(ckpts, draft, k=3, max_num_seqs=N_SAMPLES)
    llm.engine.runner = llm.decode_runner(use_graphs=False)
    llm.engine.speculation = ScheduledK([2, 3, 1, 0])
    llm.engine.ops = llm.engine.runner.ops = dataclasses.replace(llm.engine.ops, rejection_sample=_accept_all)
    counts, _ = sample_outcomes(llm, params)
    assert chi_square_test(counts, joint).p_value < POWER_ALPHA


# ---------------------------------------------------------------------------------------
# A sliding-window, soft-capped target (Gemma 2 layout) samples its own law too
# ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def window_ckpts(tmp_path_factory):
    return window_checkpoints(tmp_path_factory.mktemp("window_distribution"))


@pytest.mark.slow
def test_sliding_window_model_samples_target_distribution(window_ckpts):
    ckpts, params = window_ckpts, SamplingParams(temperature=1.0)
    assert ckpts.model.config.sliding_layers == (True, False)
    joint, _ = exact_joint(ckpts.model, PROMPT, params)
    # the window shapes the law being tested
    unwindowed = copy.deepcopy(ckpts.model)
    unwindowed.model.layers[0].self_attn.sliding_window = None
    assert (exact_joint(unwindowed, PROMPT, params)[0] - joint).abs().max() > 1e-3
    llm = make_llm(ckpts, "near", 2)
    counts, outs = sample_outcomes(llm, params)
    res = chi_square_test(counts, joint)
    assert res.impossible == 0 and res.p_value > ALPHA, res
    assert_paths_exercised(llm, outs)
    got, expected = first_draft_accepted(outs), first_draft_acceptance(ckpts, "near", params)
    assert binomial_two_sided_p(got, len(outs), expected) > ALPHA, (got, expected)
