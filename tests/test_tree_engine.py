"""Tree speculation end to end: greedy identity, keep-path, the Triton backend, metrics.

``LLM(target, draft=..., draft_tree=(b_1, .., b_D))`` drafts a static tree (a node at depth
d has b_d children), verifies it in one target forward under the tree mask and walks it
with ``tree_rejection_sample``. What is checked here:

* greedy tree decoding emits exactly plain greedy decoding (no-cache oracle) for every
  drafter and several tree shapes, with ragged prompts (one > 64 tokens), block sizes
  3 and 4, fewer batch slots than requests, and a KV budget that forces preemption;
* keep-path: after every step the target cache holds, at every committed position, what
  plain decoding of the same tokens writes there, and a draft model's own cache does up
  to ``draft_len``; every cache starts NaN-filled so a stale read cannot pass;
* the Triton backend (the interpreter on CPU) on two small cases;
* metrics: a tree (b, 1, 1) drafted by the target itself accepts D tokens per step.

The pieces are in test_tree_shape.py, the draft trees in test_tree_drafting.py and
exactness at temperature > 0 in test_tree_distribution.py.
"""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from engine_helpers import cached_model, draft_arg, kv_at, poison_caches, record_running
from tree_helpers import (
    PROMPTS,
    SHAPES,
    check_greedy,
    check_tree_metrics,
    make_llm,
    tree_checkpoints,
    tree_params,
)
from specdec import LLM, SamplingParams
from specdec.kv_cache import KVCache, cdiv
from specdec.tree import TreeShape


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    return tree_checkpoints(tmp_path_factory.mktemp("tree_engine"))


# ---------------------------------------------------------------------- greedy identity


def _run_greedy(path, draft, shape, prompts=PROMPTS, params=None, **kw):
    params = params or tree_params()
    llm = make_llm(path, draft, draft_tree=shape, **kw)
    running = record_running(llm)
    outs = llm.generate(prompts, params)
    check_greedy(path, prompts, params, outs)
    tree = TreeShape.of(shape)
    for out in outs:
        check_tree_metrics(out, tree)
    assert llm.blocks.num_free_blocks == llm.blocks.num_blocks
    return llm, outs, running


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("drafter", ["ngram", "early-exit:1", "early-exit:2", "near-draft", "draft-model", "self"])
def test_greedy_tree_equals_plain_greedy(dirs, drafter, shape):
    path = dirs["llama"]
    llm, outs, running = _run_greedy(path, draft_arg(dirs, "llama", drafter), shape, block_size=3, max_num_seqs=3)
    assert max(running) == 3 and len(PROMPTS) > 3  # continuous batching: requests waited
    accepted = sum(o.metrics.num_accepted_tokens for o in outs)
    if drafter == "self":  # every drafted path is accepted whole
        for out in outs:
            m = out.metrics
            assert m.accepted_per_position == m.proposed_per_position
    elif drafter in ("ngram", "near-draft"):
        assert accepted > 0


# each drafter once per shape across the other families (block size 4, all in one batch)
OTHER = [(f, d, SHAPES[(i + j) % 4])
         for j, f in enumerate(("qwen2", "llama3-rope", "qwen3", "mistral-window", "gemma2", "gemma3"))
         for i, d in enumerate(["ngram", "early-exit:1", "early-exit:2", "draft-model", "self"])]


@pytest.mark.parametrize("family, drafter, shape", OTHER, ids=[f"{f}-{d}-{'x'.join(map(str, s))}" for f, d, s in OTHER])
def test_greedy_tree_other_families(dirs, family, drafter, shape):
    _run_greedy(dirs[family], draft_arg(dirs, family, drafter), shape, block_size=4)


def _budget(paths, block_size, num_blocks):
    """kv_cache_memory that buys exactly ``num_blocks`` blocks of every model in ``paths``
    (plus the scratch block)."""
    per = 0
    for p in paths:
        c = cached_model(p).config
        per += KVCache.bytes_per_block(c.num_layers, block_size, c.num_kv_heads, c.head_dim, torch.float32)
    return (num_blocks + 1) * per


PREEMPT_CASES = [("ngram", (3, 2, 1)), ("early-exit:2", (2, 2, 2)), ("draft-model", (2, 2, 2)), ("self", (3, 2, 1))]


@pytest.mark.parametrize("drafter, shape", PREEMPT_CASES, ids=[f"{d}-{'x'.join(map(str, s))}" for d, s in PREEMPT_CASES])
def test_greedy_tree_under_preemption(dirs, drafter, shape):
    path, bs = dirs["qwen2"], 4
    draft = draft_arg(dirs, "qwen2", drafter)
    n = TreeShape.of(shape).num_nodes
    # the 70-token prompt first: it holds most of the cache, the others take turns beside it
    prompts = [PROMPTS[3]] + PROMPTS[:3] + PROMPTS[4:]
    params = tree_params([16] * len(prompts), ignore_eos=True)
    one = max(cdiv(len(p) + sp.max_tokens + n, bs) for p, sp in zip(prompts, params))
    models = [path] + ([draft] if drafter in ("draft-model", "self") else [])
    llm = make_llm(path, draft, draft_tree=shape, block_size=bs, kv_cache_memory=_budget(models, bs, one + 2))
    assert llm.blocks.num_blocks == one + 2
    outs = llm.generate(prompts, params)
    check_greedy(path, prompts, params, outs)
    assert llm.engine.scheduler.num_preemptions, "the budget should force preemption"
    assert llm.blocks.num_free_blocks == llm.blocks.num_blocks


# ---------------------------------------------------------------------- keep-path


def plain_decoding_kv(path, prompts, tokens, block_size):
    """K/V that a plain (draft=None) engine writes while decoding ``tokens[i]`` (prompt +
    continuation), teacher-forced: after each step its new token is overwritten with the
    wanted one, which has no K/V yet, so the next step caches the wanted token.
    Returns (K, V) of positions 0..len(tokens[i]) - 2 per sequence."""
    llm = make_llm(path, None, block_size=block_size)
    p = SamplingParams(max_tokens=max(map(len, tokens)) + 4, temperature=0, ignore_eos=True)
    seqs = llm._make_sequences(prompts, p)
    for s in seqs:
        llm.engine.add(s)
    while any(s.target_len < len(t) - 1 for s, t in zip(seqs, tokens)):
        llm.engine.step()
        for s, t in zip(seqs, tokens):
            if len(s.tokens) <= len(t):
                s.tokens[-1] = t[len(s.tokens) - 1]
    for s, t in zip(seqs, tokens):
        assert s.tokens[:len(t)] == t and not s.finished
    return [kv_at(llm.cache, llm.blocks, s.seq_id, len(t) - 1) for s, t in zip(seqs, tokens)]


KEEP_PATH_CASES = [
    # drafter, shape, temperature, KV blocks (None: plenty)
    ("ngram", (3, 2, 1), 0.0, None),
    ("early-exit:1", (2, 2, 2), 1.0, None),  # shared cache
    ("near-draft", (3, 2, 1), 0.0, None),
    ("near-draft", (2, 2, 2), 1.0, None),
    ("self", (3, 1, 1), 1.0, None),
    ("near-draft", (3, 2, 1), 1.0, 40),  # preemption: both caches recomputed
]


@pytest.mark.parametrize("drafter, shape, temperature, num_blocks", KEEP_PATH_CASES,
                         ids=[f"{d}-{'x'.join(map(str, s))}-t{t}{'-preempt' if n else ''}"
                              for d, s, t, n in KEEP_PATH_CASES])
def test_keep_path_cache_equals_plain_decoding(dirs, drafter, shape, temperature, num_blocks):
    path, bs = dirs["llama"], 4
    draft = draft_arg(dirs, "llama", drafter)
    own_cache = drafter in ("near-draft", "self")
    memory = _budget([path] + ([draft] if own_cache else []), bs, num_blocks) if num_blocks else None
    llm = make_llm(path, draft, draft_tree=shape, block_size=bs, kv_cache_memory=memory)
    moves, keep = [], llm.cache.keep_path
    llm.cache.keep_path = lambda src, dst: (moves.append((src != dst).sum().item()), keep(src, dst))
    params = tree_params([20, 24, 16, 18, 22], temperature=temperature, ignore_eos=True, seed=3)
    seqs = llm._make_sequences(PROMPTS, params)
    for s in seqs:
        llm.engine.add(s)
    target_snaps, draft_snaps = [], []  # (sequence index, n, K, V) after each step
    while llm.engine.has_work():
        llm.engine.step()
        for i, s in enumerate(seqs):
            if s not in llm.engine.running:
                continue
            assert s.target_len == len(s.tokens) - 1  # everything but the pending token
            target_snaps.append((i, s.target_len, *kv_at(llm.cache, llm.blocks, s.seq_id, s.target_len)))
            if own_cache:
                assert 0 < s.draft_len <= s.target_len
                draft_snaps.append((i, s.draft_len, *kv_at(llm.drafter.cache, llm.blocks, s.seq_id, s.draft_len)))
    assert sum(moves) > 0, "no accepted path left the first-child slots"
    assert bool(llm.engine.scheduler.num_preemptions) == (num_blocks is not None)
    m = [s.metrics for s in seqs]
    if drafter == "self":
        assert all(x.accepted_per_position == x.proposed_per_position for x in m)
    else:
        assert 0 < sum(x.num_accepted_tokens for x in m) < sum(x.num_draft_tokens for x in m)

    tokens = [s.tokens for s in seqs]
    for model_path, snaps in [(path, target_snaps)] + ([(draft, draft_snaps)] if own_cache else []):
        plain = plain_decoding_kv(model_path, PROMPTS, tokens, bs)
        for i, n, k, v in snaps:
            assert not k.isnan().any()
            assert_close(k, plain[i][0][:, :n], atol=1e-5, rtol=1e-5)
            assert_close(v, plain[i][1][:, :n], atol=1e-5, rtol=1e-5)
    assert llm.blocks.num_free_blocks == llm.blocks.num_blocks


# ---------------------------------------------------------------------- triton backend


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # numpy, inside Triton's interpreter
@pytest.mark.parametrize("family, drafter", [("qwen2", "ngram"), ("qwen2", "early-exit:1"),
                                            ("mistral-window", "ngram"), ("gemma2", "early-exit:1")])
def test_triton_backend_tree(dirs, device, family, drafter):
    """The Triton kernels (interpreter on CPU) in a tree step: greedy requests emit plain
    greedy decoding, seeded sampled ones exactly the torch backend's tokens (mistral-window:
    tree nodes past the sliding window's reach)."""
    path = dirs[family]
    prompts = [[5, 6, 7, 8, 5, 6, 7, 8, 5, 6], [9, 10, 11], [5, 6, 7, 8, 5, 6, 7, 8, 5, 6]]
    params = [SamplingParams(max_tokens=5, temperature=0), SamplingParams(max_tokens=5, temperature=0),
              SamplingParams(max_tokens=5, temperature=1.0, seed=3)]
    tri = LLM(str(path), draft=drafter, draft_tree=(2, 2), device=device, dtype=torch.float32,
              backend="triton", block_size=4)
    assert tri.backend == "triton"
    poison_caches(tri)
    got = tri.generate(prompts, params)
    check_greedy(path, prompts[:2], params[:2], got[:2])
    want = make_llm(path, drafter, draft_tree=(2, 2), block_size=4).generate(prompts, params)
    assert [o.token_ids for o in got] == [o.token_ids for o in want]
    assert [o.metrics.num_accepted_tokens for o in got] == [o.metrics.num_accepted_tokens for o in want]
    assert sum(o.metrics.num_accepted_tokens for o in got) > 0
    assert tri.blocks.num_free_blocks == tri.blocks.num_blocks


# ---------------------------------------------------------------------- metrics


@pytest.mark.parametrize("temperature", [0.0, 1.0])
@pytest.mark.parametrize("b", [1, 3])
def test_target_as_draft_accepts_every_level(dirs, b, temperature):
    """The target drafting for itself: the first child at every level is the target's own
    choice (greedy: top-1; sampled: q = p accepts any draw), so each step accepts D
    tokens and emits D + 1."""
    path = dirs["llama"]
    llm = make_llm(path, str(path), draft_tree=(b, 1, 1), block_size=4)
    outs = llm.generate(PROMPTS[:3], tree_params([12] * 3, temperature=temperature, ignore_eos=True, seed=5))
    for out in outs:
        m = out.metrics
        assert (m.num_steps, m.num_generated, m.num_accepted_tokens) == (3, 12, 9)
        assert m.mean_accepted_length == 4.0
        assert m.num_draft_tokens == 3 * 3 * b  # nodes proposed
        assert m.acceptance_rate == pytest.approx(1 / b)
        assert m.accepted_per_position == m.proposed_per_position == [3, 3, 3]
    totals = llm.metrics()
    assert totals["mean_accepted_length"] == 4.0
    assert totals["acceptance_rate_by_position"] == [1.0, 1.0, 1.0]  # one entry per depth


def test_acceptance_by_position_has_one_entry_per_depth(dirs):
    path = dirs["llama"]
    llm = make_llm(path, draft_arg(dirs, "llama", "near-draft"), draft_tree=(3, 2, 1, 1), block_size=4)
    outs = llm.generate(PROMPTS, tree_params([24] * 5, ignore_eos=True))
    by_pos = llm.metrics()["acceptance_rate_by_position"]
    assert len(by_pos) == 4
    assert all(0 <= r <= 1 for r in by_pos) and 0 < min(by_pos) < 1
    acc = [sum(o.metrics.accepted_per_position[i] for o in outs) for i in range(4)]
    prop = [sum(o.metrics.proposed_per_position[i] for o in outs) for i in range(4)]
    assert by_pos == [a / p for a, p in zip(acc, prop)]
