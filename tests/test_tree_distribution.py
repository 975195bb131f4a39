"""Tree speculation is exact at temperature > 0.

The joint law of the first 3 tokens (chi-square against the exact law of a V = 8 target)
for sampled children (model drafter), deterministic candidates (n-gram) and temperature
0.7 with top-k / top-p, with the first step's acceptance probability checked against its
exact value; the same harness rejects a wrong tree rule (no residual update between
siblings; always the first child) and a drafter whose children are drawn without
replacement (the sampled rule needs them i.i.d. from q, which is how the model drafter
draws them: ``draft_sample`` with b samples).
"""

from __future__ import annotations

import dataclasses
import itertools
from types import SimpleNamespace

import pytest
import torch
from exact_law import (
    distribution_checkpoints,
    exact_joint,
    next_token_probs,
    window_checkpoints,
)
from sampler_rules import ALPHA, POWER_ALPHA, host_tree_sampler, law_test
from stats import binomial_two_sided_p

from specdec import LLM, SamplingParams
from specdec.drafters.ngram import continuation_tree, ngram_continuations
from specdec.kernels import reference
from specdec.kernels.philox import philox_uniform, sample_inverse_cdf
from specdec.models import load_model
from specdec.tree import TreeShape

# ---------------------------------------------------------------------- exactness


V = 8
N_TOKENS = 3
N_SAMPLES = 4096
BLOCK_SIZE = 4
PROMPT = [3, 1, 2, 0, 5, 2, 0, 4, 3, 1, 2, 0, 5, 2]  # as in test_distribution.py
# for the n-gram drafter: the last token 2 was followed by "4 7", "0 0" and "0 2", so the
# (2, 2) tree is root -> {4, 0}, 4 -> {7}, 0 -> {0, 2}: siblings at both levels, and the
# target gives the root's candidates 0.26 and 0.36, so both are accepted often
NGRAM_PROMPT = [2, 0, 2, 0, 0, 3, 3, 3, 7, 1, 2, 4, 7, 2]


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """The checkpoints of test_distribution.py (exact_law.distribution_checkpoints)."""
    return distribution_checkpoints(tmp_path_factory.mktemp("tree_distribution"))


TREE_CASES = {
    # name: (drafter, tree, prompt, SamplingParams)
    "model-t1": ("model", (2, 2), PROMPT, SamplingParams(temperature=1.0)),
    "ngram-t1": ("ngram", (2, 2), NGRAM_PROMPT, SamplingParams(temperature=1.0)),
    "near-t0.7-topk-topp": ("near", (3, 1), PROMPT, SamplingParams(temperature=0.7, top_k=3, top_p=0.9)),
    # three i.i.d. children of a close draft: where drawing them without replacement
    # would skew the law most visibly (see test_children_without_replacement_are_caught)
    "near-t1": ("near", (3, 1), PROMPT, SamplingParams(temperature=1.0)),
}


def _dist_llm(ckpts, draft, tree, backend="torch"):
    draft = str(ckpts.dirs[draft]) if draft in ckpts.dirs else draft
    return LLM(ckpts.target, draft=draft, draft_tree=tree, device="cpu" if backend == "torch" else "cuda",
               dtype=torch.float32, backend=backend, block_size=BLOCK_SIZE, max_num_seqs=512, seed=0)


def _sample_counts(llm, prompt, params, num=N_SAMPLES):
    reqs = [dataclasses.replace(params, max_tokens=N_TOKENS, seed=i, ignore_eos=True) for i in range(num)]
    outs = llm.generate([prompt] * num, reqs)
    toks = torch.tensor([o.token_ids for o in outs], dtype=torch.int64)  # [num, 3]
    assert toks.shape == (num, N_TOKENS)
    index = (toks * V ** torch.arange(N_TOKENS - 1, -1, -1)).sum(1)
    return torch.bincount(index, minlength=V ** N_TOKENS), outs




class TreeWalkRecorder:
    """Wraps ``tree_rejection_sample`` to record every sequence's walk of every step."""

    def __init__(self, fn):
        self.fn, self.walks = fn, []

    def __call__(self, target_logits, draft_token_ids, parents, q, cu_num_nodes, *args, **kwargs):
        out, n_acc, path = self.fn(target_logits, draft_token_ids, parents, q, cu_num_nodes,
                                   *args, **kwargs)
        cu, par, tok = cu_num_nodes.tolist(), parents.tolist(), draft_token_ids.tolist()
        offsets = args[-1].tolist()  # temperature, top_k, top_p, seeds, offsets follow max_depth
        for b, (a, nodes) in enumerate(zip(n_acc.tolist(), path.tolist())):
            s, e = cu[b], cu[b + 1]
            self.walks.append(SimpleNamespace(parents=par[s:e], tokens=tok[s:e], n_acc=a, path=nodes[:a],
                                              offset=offsets[b]))
        return out, n_acc, path

    def summary(self):
        """rejected: walks that rejected some child; residual: walks that emitted after
        rejecting every child of their last position; non_first: walks that accepted a
        child that was not the first one of its parent; duplicate_siblings: walks whose
        tree has two siblings with one token; first_step: n_acc of the step at offset 0."""
        s = SimpleNamespace(rejected=0, residual=0, non_first=0, duplicate_siblings=0, first_step=[])
        for w in self.walks:
            kids = {u: [i for i, p in enumerate(w.parents) if p == u] for u in [-1] + list(range(len(w.parents)))}
            pos, rejected, non_first = -1, 0, False
            for node in w.path:
                rejected += kids[pos].index(node)
                non_first |= kids[pos].index(node) > 0
                pos = node
            rejected += len(kids[pos])
            s.rejected += rejected > 0
            s.residual += len(kids[pos]) > 0
            s.non_first += non_first
            s.duplicate_siblings += any(len({w.tokens[i] for i in k}) < len(k) for k in kids.values())
            if w.offset == 0:
                s.first_step.append(w.n_acc)
        return s


def first_step_acceptance(ckpts, draft, tree, prompt, params) -> float:
    """The exact probability that the first step accepts a child of the root.

    Sampled children x_1..x_b i.i.d. from q: child k is reached with the target less the
    earlier rejections, r_k (r_0 = p, r_{k+1} = max(r_k - q, 0) / beta_k), and is rejected
    with probability beta_k = sum max(r_k - q, 0) (SpecInfer, Thm 4.2's proof), so
    P(accept) = 1 - prod_k beta_k. Deterministic distinct candidates: sum_i p(x_i)."""
    x = torch.tensor([prompt])
    p = next_token_probs(ckpts.model, x, params)[0]  # [V] float64
    if draft == "ngram":
        conts = ngram_continuations(prompt, len(tree), limit=TreeShape.of(tree).num_nodes)
        toks, parents = continuation_tree(conts, tree)
        return float(sum(p[t] for t, par in zip(toks, parents) if par == -1))
    q = next_token_probs(load_model(ckpts.dirs[draft]), x, params)[0]
    reject, r = 1.0, p
    for _ in range(tree[0]):
        residual = (r - q).clamp(min=0)
        beta = float(residual.sum())
        reject *= beta
        if beta == 0:
            break
        r = residual / beta
    return 1.0 - reject


# The torch backend everywhere; on a CUDA machine the Triton kernels too, at full size (the
# interpreter is far too slow for that: test_triton_backend_tree covers it on CPU).
DISTRIBUTION_RUNS = [pytest.param(case, "torch", id=case) for case in TREE_CASES] + [
    pytest.param(case, "triton", id=f"{case}-triton", marks=pytest.mark.gpu)
    for case in ("model-t1", "ngram-t1", "near-t0.7-topk-topp")
]


@pytest.mark.slow
@pytest.mark.parametrize("case, backend", DISTRIBUTION_RUNS)
def test_tree_engine_samples_target_distribution(ckpts, case, backend):
    draft, tree, prompt, params = TREE_CASES[case]
    joint, kept = exact_joint(ckpts.model, prompt, params)
    llm = _dist_llm(ckpts, draft, tree, backend)
    rec = TreeWalkRecorder(llm.engine.ops.tree_rejection_sample)
    llm.engine.ops = dataclasses.replace(llm.engine.ops, tree_rejection_sample=rec)
    counts, outs = _sample_counts(llm, prompt, params)
    p_value, results = law_test(counts, joint)
    assert all(r.impossible == 0 for r in results), f"{case}: outcomes the target cannot produce: {results[0]}"
    assert p_value > ALPHA, f"{case}: the samples do not follow the target: {[str(r) for r in results]}"
    # every branch of the rule was taken, often
    s = rec.summary()
    assert len(s.first_step) == N_SAMPLES
    assert s.rejected > 0.05 * N_SAMPLES and s.residual > 0.02 * N_SAMPLES, s
    assert s.non_first > 0.01 * N_SAMPLES, "no walk accepted a non-first child"
    assert any(n >= 2 for n in s.first_step), "no walk reached depth 2"
    if draft == "ngram":
        assert s.duplicate_siblings == 0  # distinct candidates: the point-mass rule's premise
    else:
        # children drawn i.i.d. with replacement, as the sampled rule requires: repeats occur
        assert s.duplicate_siblings > 0.01 * N_SAMPLES
    # the acceptance rate is the exact multi-draft one, not merely some rate that keeps p
    expected = first_step_acceptance(ckpts, draft, tree, prompt, params)
    got = sum(n >= 1 for n in s.first_step)
    p_acc = binomial_two_sided_p(got, N_SAMPLES, expected)
    assert p_acc > ALPHA, f"{case}: first step accepted {got}/{N_SAMPLES}, expected {expected:.3f}"
    if params.top_k or params.top_p < 1:
        assert kept.max() == params.top_k and kept.min() < params.top_k, kept  # both filters cut


# -- wrong rules, as a slow host-side walk over the reference's own uniforms --




def _random_tree_inputs(seed, with_q):
    g = torch.Generator().manual_seed(seed)
    shapes = [(2, 2), (3, 1), (1,), None, (2, 2, 2), (3,)]
    trees = [list(TreeShape.of(s).parents) if s else [] for s in shapes]
    counts = [len(t) for t in trees]
    rows = sum(counts) + len(counts)
    vocab = 8
    # peaked-ish logits and draft tokens that often match, so every branch of the walk runs
    logits = torch.randn(rows, vocab, generator=g) * 1.5
    q_logits = logits + torch.randn(rows, vocab, generator=g)
    q = reference.draft_dist(q_logits, torch.ones(rows), torch.zeros(rows, dtype=torch.int32),
                             torch.ones(rows)) if with_q else None
    tokens = torch.randint(0, vocab, (sum(counts),), generator=g)
    cu = torch.tensor([0] + list(itertools.accumulate(counts)), dtype=torch.int32)
    b = len(counts)
    temperature = torch.tensor([1.0, 0.7, 1.0, 1.0, 0.0, 1.3])
    top_k = torch.tensor([0, 3, 0, 0, 0, 5], dtype=torch.int32)
    top_p = torch.tensor([1.0, 0.9, 1.0, 1.0, 1.0, 0.8])
    seeds = torch.arange(b, dtype=torch.int64) + 100 * seed
    offsets = torch.full((b,), seed, dtype=torch.int64)
    parents = torch.tensor([p for t in trees for p in t], dtype=torch.int32)
    return (logits, tokens, parents, q, cu, 3, temperature, top_k, top_p, seeds, offsets)


@pytest.mark.parametrize("with_q", [True, False], ids=["sampled", "deterministic"])
def test_host_tree_sampler_reproduces_the_reference(with_q):
    """The harness's host walk with the exact rule is the reference, draw for draw, so the
    wrong rules below differ from the engine's in the rule alone."""
    differ = {"no-update": 0, "first-child": 0}
    for seed in range(40):
        args = _random_tree_inputs(seed, with_q)
        want = reference.tree_rejection_sample(*args)
        got = host_tree_sampler("exact")(*args)
        for w, g_ in zip(want, got):
            assert torch.equal(w, g_), (seed, want, got)
        for rule in differ:
            wrong = host_tree_sampler(rule)(*args)
            differ[rule] += not all(torch.equal(w, x) for w, x in zip(want, wrong))
    assert all(n > 0 for n in differ.values()), differ


WRONG_RULES = [("model-t1", "no-update"), ("ngram-t1", "no-update"), ("model-t1", "first-child")]


@pytest.mark.slow
@pytest.mark.parametrize("case, rule", WRONG_RULES, ids=[f"{c}-{r}" for c, r in WRONG_RULES])
def test_wrong_tree_rule_is_rejected(ckpts, case, rule):
    draft, tree, prompt, params = TREE_CASES[case]
    joint, _ = exact_joint(ckpts.model, prompt, params)
    llm = _dist_llm(ckpts, draft, tree)
    llm.engine.ops = dataclasses.replace(llm.engine.ops, tree_rejection_sample=host_tree_sampler(rule))
    counts, _ = _sample_counts(llm, prompt, params)  # the seeds of the passing test
    p_value, results = law_test(counts, joint)
    assert p_value < POWER_ALPHA, f"a wrong tree rule passed: {[str(r) for r in results]}"


def _children_without_replacement(logits, temperature, top_k, top_p, seeds, offsets, stream,
                                  num_samples=1, first_draw=None, **hints):
    """Like the backend's ``draft_sample`` but the ``num_samples`` children of a row are
    distinct: child k is drawn (same uniform) from q with the earlier children's tokens
    removed, renormalised."""
    _, q = reference.draft_sample(logits, temperature, top_k, top_p, seeds, offsets, stream,
                                  num_samples, first_draw, **hints)
    u = philox_uniform(seeds, offsets, num_samples, stream=stream, first=first_draw)  # [N, b]
    left, out = reference.draft_dist_probs(q), []
    for k in range(num_samples):
        tok = sample_inverse_cdf(left, u[:, k])  # [N]
        out.append(tok)
        left.scatter_(1, tok[:, None], 0.0)
    return torch.stack(out, -1), q


@pytest.mark.slow
def test_children_without_replacement_are_caught(ckpts, monkeypatch):
    """The sampled rule is exact for children drawn i.i.d. from q, which is what the model
    drafter does; distinct children (drawn without replacement) need another rule. The
    harness must see that mismatch: with this drafter and the engine's own sampler, the
    law of the near-t1 case is off (by 0.08 in total variation on the first token)."""
    draft, tree, prompt, params = TREE_CASES["near-t1"]
    joint, _ = exact_joint(ckpts.model, prompt, params)
    llm = _dist_llm(ckpts, draft, tree)
    drafter = llm.engine.drafter
    monkeypatch.setattr(drafter, "ops", dataclasses.replace(drafter.ops, draft_sample=_children_without_replacement))
    rec = TreeWalkRecorder(llm.engine.ops.tree_rejection_sample)
    llm.engine.ops = dataclasses.replace(llm.engine.ops, tree_rejection_sample=rec)
    counts, _ = _sample_counts(llm, prompt, params)
    assert rec.summary().duplicate_siblings == 0  # the patched drafter was used
    p_value, results = law_test(counts, joint)
    assert p_value < POWER_ALPHA, f"distinct children went unnoticed: {[str(r) for r in results]}"


@pytest.fixture(scope="module")
def window_ckpts(tmp_path_factory):
    """A 2-layer V = 8 Gemma 2 target, its first layer over a 4-position window (tree
    nodes at depth 2 see 2 prompt positions), and a noisy copy."""
    return window_checkpoints(tmp_path_factory.mktemp("tree_window_distribution"))


@pytest.mark.slow
def test_sliding_window_tree_samples_target_distribution(window_ckpts):
    params = SamplingParams(temperature=1.0)
    joint, _ = exact_joint(window_ckpts.model, PROMPT, params)
    llm = _dist_llm(window_ckpts, "near", (3, 1))
    rec = TreeWalkRecorder(llm.engine.ops.tree_rejection_sample)
    llm.engine.ops = dataclasses.replace(llm.engine.ops, tree_rejection_sample=rec)
    counts, outs = _sample_counts(llm, PROMPT, params)
    p_value, results = law_test(counts, joint)
    assert all(r.impossible == 0 for r in results) and p_value > ALPHA, [str(r) for r in results]
    s = rec.summary()
    assert any(n >= 2 for n in s.first_step) and s.rejected > 0.05 * N_SAMPLES, s
    expected = first_step_acceptance(window_ckpts, "near", (3, 1), PROMPT, params)
    got = sum(n >= 1 for n in s.first_step)
    assert binomial_two_sided_p(got, N_SAMPLES, expected) > ALPHA, (got, expected)
