"""EAGLE-3 drafting through the whole engine: lossless at temperature 0 and above.

* greedy speculative output with an EAGLE-3 head equals plain greedy decoding (no-cache
  oracle) token for token: chains, static trees, dynamic trees, ragged prompts (one
  longer than a tree forward's 64 tokens), fewer batch slots than requests, a KV budget
  that forces preemption; both caches start NaN-filled, so a stale read cannot pass;
* chi-square tests (tests/stats.py) of the joint law of the first 3 tokens of a V = 8
  target with EAGLE-3 drafts: a sampled chain, an i.i.d. static tree, dynamic top-K
  candidates (point masses), a reduced draft vocabulary (d2t) — each paired with a wrong
  rule the same harness rejects;
* option errors: a dynamic tree without an EAGLE-3 head, CUDA graphs with one.
"""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import pytest
import torch

from checkpoints import make_checkpoint
from eagle3_reference import make_eagle3_head
from engine_helpers import greedy_ref, random_prompts
from exact_law import exact_joint
from sampler_rules import (
    ALPHA,
    POWER_ALPHA,
    host_tree_sampler,
    law_test,
    residual_from_p,
)
from specdec import LLM, SamplingParams
from specdec.kernels import reference
from specdec.kv_cache import KVCache, cdiv

# ---------------------------------------------------------------------- greedy


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("eagle3_engine")
    # V = 16 keeps random-head acceptance well above 0, so accepted drafts and paths occur
    target = make_checkpoint(root / "t", "llama", vocab_size=16, num_layers=4, hidden_size=32, num_heads=4,
                             num_kv_heads=2, std=0.5, seed=4)
    head = make_eagle3_head(root / "h", vocab_size=16, target_hidden=32, aux_ids=[1, 2, 3], seed=6)
    small = make_eagle3_head(root / "hs", vocab_size=16, target_hidden=32, draft_vocab_size=10, own_embed=True,
                             hidden_size=16, num_kv_heads=1, aux_ids=[0, 2, 3], seed=7)
    return SimpleNamespace(target=target, head=head, small=small)


PROMPTS = random_prompts([1, 4, 9, 70], vocab=16) + [[5, 6, 7, 8] * 3]
MAX_TOKENS = [16, 12, 16, 9, 16]
DRAFTS = {"chain": None, "static": (2, 2, 1), "dynamic": "dynamic:3,4,10"}


def _poison(llm):
    for cache in (llm.cache, llm.drafter.cache):
        cache.k.fill_(float("nan"))
        cache.v.fill_(float("nan"))


def _greedy(dirs, head, tree, prompts=PROMPTS, max_tokens=MAX_TOKENS, **kw):
    llm = LLM(str(dirs.target), draft=str(head), num_draft_tokens=3, draft_tree=tree, device="cpu",
              dtype=torch.float32, backend="torch", **kw)
    _poison(llm)
    params = [SamplingParams(max_tokens=m, temperature=0.0, ignore_eos=True) for m in max_tokens]
    outs = llm.generate(prompts, params)
    for prompt, m, out in zip(prompts, max_tokens, outs, strict=True):
        assert out.token_ids == greedy_ref(dirs.target, prompt, m), (prompt[:6], out.token_ids)
    assert llm.blocks.num_free_blocks == llm.blocks.num_blocks
    return llm


@pytest.mark.parametrize("head", ["head", "small"])
@pytest.mark.parametrize("kind", list(DRAFTS))
def test_greedy_equals_plain_greedy(dirs, kind, head):
    llm = _greedy(dirs, getattr(dirs, head), DRAFTS[kind], block_size=3, max_num_seqs=3)
    m = llm.metrics()
    assert m["num_draft_tokens"] > 0 and m["num_accepted_tokens"] > 0, m  # drafts were accepted too
    if kind == "chain":  # a step that drafted proposed position 0; a request's first step (its prefill) did not
        assert m["num_draft_steps"] == m["proposed_per_position"][0] <= m["num_steps"] - len(PROMPTS)
        assert m["accepted_length_per_draft_step"] == 1 + m["num_accepted_tokens"] / m["num_draft_steps"]


def test_greedy_under_preemption(dirs):
    bs, tree = 4, DRAFTS["dynamic"]
    prompts = [PROMPTS[3]] + PROMPTS[:3]
    max_tokens = [16] * len(prompts)
    slots = 9 + 1  # the dynamic tree's cache slots (max(N - 1, K (D - 1))) + the root
    one = max(cdiv(len(p) + m + slots, bs) for p, m in zip(prompts, max_tokens, strict=True))
    per = (KVCache.bytes_per_block(4, bs, 2, 8, torch.float32)  # the target
           + KVCache.bytes_per_block(1, bs, 1, 16, torch.float32))  # the head's one layer
    llm = LLM(str(dirs.target), draft=str(dirs.head), draft_tree=tree, device="cpu", dtype=torch.float32,
              backend="torch", block_size=bs, kv_cache_memory=(one + 3) * per)
    assert llm.blocks.num_blocks == one + 2
    _poison(llm)
    outs = llm.generate(prompts, [SamplingParams(max_tokens=m, temperature=0.0, ignore_eos=True)
                                  for m in max_tokens])
    for prompt, m, out in zip(prompts, max_tokens, outs, strict=True):
        assert out.token_ids == greedy_ref(dirs.target, prompt, m)
    assert llm.engine.scheduler.num_preemptions > 0, "the budget should force preemption"


def test_dynamic_trees_differ_per_sequence_and_respect_the_budget(dirs):
    llm = LLM(str(dirs.target), draft=str(dirs.head), draft_tree="dynamic:3,4,10", device="cpu",
              dtype=torch.float32, backend="torch")
    seen, propose = [], llm.drafter.propose

    def wrapped(seqs, limits, sampling, device):
        prop = propose(seqs, limits, sampling, device)
        seen.append((list(limits), prop.counts, prop.parents))
        return prop

    llm.drafter.propose = wrapped
    llm.generate(PROMPTS[:4], SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True))
    shapes = set()
    for limits, counts, parents in seen:
        for lim, n, ps in zip(limits, counts, parents, strict=True):
            assert n == len(ps) <= 9 and all(-1 <= p < i for i, p in enumerate(ps))
            depth = [0] * n
            for i, p in enumerate(ps):
                depth[i] = 1 if p < 0 else depth[p] + 1
            assert max(depth, default=0) <= min(lim, 4)
            shapes.add(tuple(ps))
    assert len(shapes) > 2, "trees should differ between sequences and steps"


def test_option_errors(dirs):
    with pytest.raises(ValueError, match="needs an EAGLE-3 head"):
        LLM(str(dirs.target), draft="ngram", draft_tree="dynamic:3,3,8", device="cpu")
    with pytest.raises(ValueError, match="dynamic:K,D,N"):
        LLM(str(dirs.target), draft=str(dirs.head), draft_tree="dynamic:3,3", device="cpu")
    with pytest.raises(ValueError, match="adaptive speculation chooses a chain length"):
        LLM(str(dirs.target), draft=str(dirs.head), draft_tree="dynamic:3,3,8", adaptive=True, device="cpu")


def test_spec_of_a_head_directory(dirs, monkeypatch):
    """A head directory is the 'eagle3' kind; its chains take the fixed-shape step (CUDA
    graphs by default where possible), its trees do not; the dynamic spelling is parsed once."""
    from specdec.config import EngineConfig
    from specdec.drafters.eagle3 import DynamicTree
    from specdec.drafters.factory import DrafterSpec

    chain = DrafterSpec.parse(str(dirs.head))
    assert chain.kind == "eagle3" and chain.fixed_shape and chain.draft_slots(4) == 4
    dyn = DrafterSpec.parse(str(dirs.head), "dynamic:3,4,10")
    assert dyn.tree == DynamicTree(3, 4, 10) and not dyn.fixed_shape
    assert dyn.draft_slots(4) == max(9, 3 * 3) and dyn.draft_depth == 4
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    cfg = EngineConfig(str(dirs.target), str(dirs.head), device="cuda", backend="triton")
    assert cfg.cuda_graphs and cfg.adaptive
    with pytest.raises(ValueError, match="does not cover the n-gram drafter or draft trees"):
        EngineConfig(str(dirs.target), str(dirs.head), device="cuda", backend="triton",
                     draft_tree="dynamic:3,4,10", cuda_graphs=True)


# ---------------------------------------------------------------------- distribution

V = 8
N_SAMPLES = 2048  # requests per engine run (the wrong rules: half as many)
PROMPT = [3, 1, 2, 0, 5, 2, 0, 4, 3, 1, 2, 0, 5, 2]
BLOCK_SIZE = 4


@pytest.fixture(scope="module")
def dist(tmp_path_factory):
    root = tmp_path_factory.mktemp("eagle3_dist")
    from specdec.models import load_model

    target = make_checkpoint(root / "t", "llama", vocab_size=V, hidden_size=16, num_layers=4, num_heads=2,
                             num_kv_heads=1, intermediate_size=24, max_position_embeddings=64, std=0.5, seed=1)
    # std 0.15: the head's q overlaps the target's p (acceptance ~0.3-0.5), far from equal
    full = make_eagle3_head(root / "full", vocab_size=V, target_hidden=16, aux_ids=[1, 2, 3], std=0.15, seed=2)
    reduced = make_eagle3_head(root / "reduced", vocab_size=V, target_hidden=16, aux_ids=[1, 2, 3], std=0.15,
                               draft_vocab_size=5, seed=3)
    return SimpleNamespace(target=target, heads={"full": full, "reduced": reduced}, model=load_model(target))


CASES = {  # name: (head, draft_tree, SamplingParams, wrong rule)
    "chain-t1": ("full", None, SamplingParams(temperature=1.0), "residual-from-p"),
    "chain-d2t-t1": ("reduced", None, SamplingParams(temperature=1.0), "unscattered-q"),
    "static-tree-t1": ("full", (2, 2), SamplingParams(temperature=1.0), "accept-all"),
    "dynamic-t0.8": ("full", "dynamic:3,2,6", SamplingParams(temperature=0.8), "first-child"),
}


def _llm(dist, head, tree):
    return LLM(dist.target, draft=str(dist.heads[head]), num_draft_tokens=2, draft_tree=tree, device="cpu",
               dtype=torch.float32, backend="torch", block_size=BLOCK_SIZE, max_num_seqs=1024, seed=0)


def _counts(llm, params, num=N_SAMPLES):
    """The first 3 of 4 generated tokens: token 1 is the prefill's (the head has no
    features before it), tokens 2 and 3 come from a step with 2 draft levels."""
    reqs = [dataclasses.replace(params, max_tokens=4, seed=i, ignore_eos=True) for i in range(num)]
    outs = llm.generate([PROMPT] * num, reqs)
    toks = torch.tensor([o.token_ids[:3] for o in outs], dtype=torch.int64)
    index = (toks * V ** torch.arange(2, -1, -1)).sum(1)
    return torch.bincount(index, minlength=V ** 3)


def _unscattered(drafter):
    """The classic d2t bug: q handed to the sampler at draft ids 0..Vd-1 instead of at
    the target ids the drafts were drawn at."""
    propose = drafter.propose
    ids = drafter.head.target_ids

    def wrapped(seqs, limits, sampling, device):
        prop = propose(seqs, limits, sampling, device)
        if prop.q is not None and prop.q.logits.shape[0]:
            lg = torch.full_like(prop.q.logits, float("-inf"))
            lg[:, :ids.numel()] = prop.q.logits[:, ids]
            n = lg.shape[0]
            prop.q = reference.draft_dist(lg, 1 / prop.q.inv_t, torch.zeros(n, dtype=torch.int32), torch.ones(n))
        return prop

    drafter.propose = wrapped


def _accept_all_tree(target_logits, draft_token_ids, parents, q, *args, **kwargs):
    if q is not None:  # (steps without drafts hand None)
        q = q._replace(z=torch.full_like(q.z, float("inf")))
    return reference.tree_rejection_sample(target_logits, draft_token_ids, parents, q, *args, **kwargs)


def _wrong(llm, rule):
    ops = llm.engine.ops
    if rule == "residual-from-p":  # after a rejection, p instead of max(p - q, 0)
        llm.engine.ops = dataclasses.replace(ops, rejection_sample=residual_from_p)
    elif rule == "unscattered-q":
        _unscattered(llm.drafter)
    elif rule == "accept-all":  # q with z = inf: u q(x) < p(x) wherever p(x) > 0
        llm.engine.ops = dataclasses.replace(ops, tree_rejection_sample=_accept_all_tree)
    else:
        llm.engine.ops = dataclasses.replace(ops, tree_rejection_sample=host_tree_sampler(rule))


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_samples_target_distribution_and_rejects_a_wrong_rule(dist, case):
    head, tree, params, rule = CASES[case]
    joint, _ = exact_joint(dist.model, PROMPT, params)
    llm = _llm(dist, head, tree)
    counts = _counts(llm, params)
    p_value, results = law_test(counts, joint)
    assert all(r.impossible == 0 for r in results), results[0]
    assert p_value > ALPHA, f"{case}: {[str(r) for r in results]}"
    m = llm.metrics()  # acceptances and rejections both common
    assert m["num_accepted_tokens"] > 0.2 * N_SAMPLES and m["acceptance_rate"] < 0.9, m
    if head == "reduced":  # tokens outside the draft vocabulary come from the residual only
        outside = [t for t in range(V) if t not in set(llm.drafter.head.target_ids.tolist())]
        assert outside and counts.view(V, V, V).sum((0, 2))[outside].sum() > 0
    wrong = _llm(dist, head, tree)
    _wrong(wrong, rule)
    counts = _counts(wrong, params, N_SAMPLES // 2)
    p_value, results = law_test(counts, joint)
    assert p_value < POWER_ALPHA, f"{case}: the wrong rule {rule!r} passed: {[str(r) for r in results]}"


@pytest.mark.parametrize("kind", ["dynamic"])  # chains: test_eagle3_drafter.py's triton case
def test_triton_backend_greedy(dirs, kind):
    """The head's forward through the Triton kernels (the interpreter on CPU): write_kv,
    rotary, rms norm, verify_attention with the head's own tree masks."""
    prompts, max_tokens = [PROMPTS[1], PROMPTS[2]], [5, 4]
    llm = LLM(str(dirs.target), draft=str(dirs.small), num_draft_tokens=2, draft_tree=DRAFTS[kind], device="cpu",
              dtype=torch.float32, backend="triton", block_size=4)
    outs = llm.generate(prompts, [SamplingParams(max_tokens=m, temperature=0.0, ignore_eos=True) for m in max_tokens])
    for prompt, m, out in zip(prompts, max_tokens, outs, strict=True):
        assert out.token_ids == greedy_ref(dirs.target, prompt, m)
    assert llm.metrics()["num_draft_tokens"] > 0


def test_cli_dynamic_tree_spelling(tmp_path, capsys):
    """--draft-tree takes 'dynamic:K,D,N' (checked at parse time) as well as B1,B2,...;
    `specdec generate --draft HEAD --draft-tree dynamic:...` runs with a head."""
    import json

    from specdec.cli import build_parser
    from specdec.cli import main as cli_main
    from specdec.demo import demo_dirs

    parser = build_parser()
    common = ["generate", "--target", "t", "--prompt", "p", "--draft-tree"]
    assert parser.parse_args(common + ["dynamic:4,5,24"]).draft_tree == "dynamic:4,5,24"
    assert parser.parse_args(common + ["3,2,1"]).draft_tree == (3, 2, 1)
    with pytest.raises(SystemExit):
        parser.parse_args(common + ["dynamic:4,5"])
    assert "dynamic:K,D,N" in capsys.readouterr().err
    target = demo_dirs()[0]
    cfg = json.loads((target / "config.json").read_text())
    head = make_eagle3_head(tmp_path / "head", vocab_size=cfg["vocab_size"], target_hidden=cfg["hidden_size"],
                            num_heads=4, num_kv_heads=2, aux_ids=[1, 2, 3], seed=0)
    assert cli_main(["generate", "--target", str(target), "--draft", str(head), "--draft-tree", "dynamic:3,3,6",
                     "--prompt", "Once upon a time", "--max-tokens", "6", "--temperature", "0", "--device", "cpu"]) == 0
    assert f"[drafter {head}] 6 tokens" in capsys.readouterr().err
