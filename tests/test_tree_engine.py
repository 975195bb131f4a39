"""Tree speculation end to end: draft trees, tree verification, keep-path, exactness.

``LLM(target, draft=..., draft_tree=(b_1, .., b_D))`` drafts a static tree (a node at depth
d has b_d children), verifies it in one target forward under the tree mask and walks it
with ``tree_rejection_sample`` (reference/tree_sampling.py / tree_sampling.py). What is checked here:

* the pieces: ancestor masks, ``TreeShape``, ``build_tree_batch`` (positions, slots,
  masks of a 2-sequence batch), ``prefill_tails`` + a tree forward against the no-cache
  model on every root-to-node path, n-gram continuations and their merge into a tree;
* greedy tree decoding emits exactly plain greedy decoding (no-cache oracle) for every
  drafter and several tree shapes, with ragged prompts (one > 64 tokens), block sizes
  3 and 4, fewer batch slots than requests, and a KV budget that forces preemption;
  the Triton backend (the interpreter on CPU) on two small cases;
* ragged trees in one batch (n-gram trees differ per sequence, some are empty; trees
  near max_tokens are cut to the depth that is left);
* keep-path: after every step the target cache holds, at every committed position, what
  plain decoding of the same tokens writes there, and a draft model's own cache does up
  to ``draft_len``; every cache starts NaN-filled so a stale read cannot pass;
* exactness at temperature > 0: the joint law of the first 3 tokens (chi-square against
  the exact law of a V = 8 target) for sampled children (model drafter), deterministic
  candidates (n-gram) and temperature 0.7 with top-k / top-p, with the first step's
  acceptance probability checked against its exact value; the same harness rejects
  a wrong tree rule (no residual update between siblings; always the first child) and
  a drafter whose children are drawn without replacement (the sampled rule needs them
  i.i.d. from q, which is how the model drafter draws them: ``draft_sample`` with b samples);
* metrics: a tree (b, 1, 1) drafted by the target itself accepts D tokens per step.
"""

from __future__ import annotations

import dataclasses
import itertools
import random
from types import SimpleNamespace

import pytest
import torch
from torch.testing import assert_close

from checkpoints import make_checkpoint, perturbed_copy
from specdec import LLM, SamplingParams
from specdec.batch import build_tree_batch
from specdec.drafters.ngram import NgramDrafter, continuation_tree, ngram_continuations
from specdec.kernels import get_backend, reference
from specdec.kernels.philox import philox_uniform, sample_inverse_cdf
from specdec.kernels.reference import MAX_TREE_NODES, TREE_ACCEPT_STREAM, TREE_SAMPLE_STREAM
from specdec.kv_cache import BlockManager, KVCache, cdiv
from specdec.models import load_model
from specdec.runners.eager import prefill_tails
from specdec.sequence import Sequence
from specdec.tree import TreeShape, depths_of, tree_masks
from stats import binomial_two_sided_p, chi_square_test
from test_distribution import exact_joint, next_token_probs
from test_engine import _draft_arg, _model, _poison, _prompts, _record_running, greedy_ref

SHAPES = [(2,), (3, 2, 1), (2, 2, 2), (1, 1, 1, 1)]  # the last one is a chain as a tree


# ---------------------------------------------------------------------- helpers


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("tree_engine")
    # mistral-window: a 6-position sliding window, shorter than the sequences
    out = {f: make_checkpoint(root / f, f)
           for f in ("llama", "qwen2", "llama3-rope", "qwen3", "mistral-window", "gemma2", "gemma3")}
    # an unrelated random model with another cache shape (acceptance near 0) ...
    out["draft-model"] = make_checkpoint(root / "draft", "llama", num_layers=2, num_kv_heads=1,
                                         hidden_size=16, intermediate_size=24, seed=1)
    # ... and a near copy of each target (greedy acceptance ~60%, non-first children win often)
    for f in ("llama", "qwen2", "llama3-rope"):
        out[f"near-{f}"] = perturbed_copy(out[f], root / f"near-{f}", noise=0.01, seed=11)
    return out


def make_llm(path, draft=None, **kw):
    llm = LLM(str(path), draft=draft, device="cpu", dtype=torch.float32, backend="torch", **kw)
    _poison(llm)
    return llm


# ragged, crossing block boundaries, one longer than a tree forward's 64 tokens, one
# repetitive (n-gram hits)
PROMPTS = _prompts([1, 4, 9, 70]) + [[5, 6, 7, 8] * 3 + [5, 6, 7]]
MAX_TOKENS = [16, 12, 16, 9, 16]  # different lengths: trees near the end are cut shallower


def _params(max_tokens=MAX_TOKENS, **kw):
    kw.setdefault("temperature", 0.0)
    return [SamplingParams(max_tokens=m, **kw) for m in max_tokens]


def check_greedy(path, prompts, params, outs):
    for prompt, p, out in zip(prompts, params, outs, strict=True):
        ref = greedy_ref(path, prompt, p.max_tokens, () if p.ignore_eos else (2,))
        assert out.token_ids == ref, (prompt[:8], out.token_ids, ref)
        stopped = len(ref) < p.max_tokens or (not p.ignore_eos and ref[-1] == 2)
        assert out.finish_reason == ("stop" if stopped else "length")


def check_tree_metrics(out, shape: TreeShape):
    m = out.metrics
    assert m.num_generated == len(out.token_ids)
    assert 0 <= m.num_accepted_tokens <= m.num_draft_tokens <= m.num_steps * shape.num_nodes
    assert m.num_generated <= m.num_steps * (shape.depth + 1)
    assert m.num_generated >= m.num_accepted_tokens + m.num_steps - 1
    acc, prop = m.accepted_per_position, m.proposed_per_position
    assert len(acc) == len(prop) <= shape.depth  # one entry per depth, not per node
    assert sum(acc) == m.num_accepted_tokens  # one accepted token per depth on the path
    assert all(a <= p for a, p in zip(acc, prop, strict=True))
    assert all(x >= y for x, y in zip(acc, acc[1:], strict=False))
    assert all(x >= y for x, y in zip(prop, prop[1:], strict=False))


def _record_proposals(llm):
    """Wrap the drafter: record (limits, counts, parents, token lists) of every step."""
    steps, propose = [], llm.drafter.propose

    def wrapped(seqs, limits, sampling, device):
        prop = propose(seqs, limits, sampling, device)
        toks = prop.tokens.tolist()
        cu = [0] + list(itertools.accumulate(prop.counts))
        steps.append(SimpleNamespace(limits=list(limits), counts=list(prop.counts), parents=prop.parents,
                                     tokens=[toks[a:b] for a, b in zip(cu, cu[1:], strict=False)]))
        return prop

    llm.drafter.propose = wrapped
    return steps


def check_tree_valid(parents, tokens, branching, limit, distinct_siblings):
    """A proposed tree: topological, at most ``branching[d-1]`` children at depth d - 1,
    no deeper than ``limit``; siblings distinct where the drafter promises it."""
    depths = depths_of(parents)
    assert all(-1 <= p < i for i, p in enumerate(parents))
    assert max(depths, default=0) <= min(limit, len(branching))
    assert depths == sorted(depths)  # breadth-first
    for u in [-1] + list(range(len(parents))):
        kids = [i for i, p in enumerate(parents) if p == u]
        d = 0 if u < 0 else depths[u]
        assert len(kids) <= (branching[d] if d < len(branching) else 0)
        if distinct_siblings:
            assert len({tokens[i] for i in kids}) == len(kids)


# ---------------------------------------------------------------------- masks and shapes


def _brute_masks(parents):
    masks = [1]
    for i in range(len(parents)):
        bits, u = 1, i
        while u >= 0:
            bits |= 1 << (u + 1)
            u = parents[u]
        masks.append(bits - (1 << 64) if bits >= 1 << 63 else bits)
    return masks


def test_tree_masks():
    assert tree_masks([]) == [1]
    assert tree_masks([-1, -1, 0]) == [1, 3, 5, 11]
    # a chain of 63 nodes fills all 64 bits: the last mask is -1 as a signed int64
    chain = tree_masks(list(range(-1, 62)))
    assert chain[-1] == -1 and chain[-2] == (1 << 63) - 1 and chain[1] == 3
    rng = random.Random(0)
    for n in (1, 5, 17, 63):
        parents = [rng.randrange(-1, i) for i in range(n)]
        assert tree_masks(parents) == _brute_masks(parents)
    # the signed values survive a trip through an int64 tensor
    t = torch.tensor(chain, dtype=torch.int64)
    assert ((t[-1] >> torch.arange(64)) & 1).all()
    with pytest.raises(ValueError, match="at most 63 nodes, got 64"):
        tree_masks(list(range(-1, 63)))
    for bad in ([0], [-1, 1], [-1, -2], [-1, 0, 3]):
        with pytest.raises(ValueError, match="parents must precede their children"):
            tree_masks(bad)


def test_tree_shape():
    s = TreeShape.of((2, 1))
    assert (s.parents, s.depths, s.num_nodes, s.depth) == ((-1, -1, 0, 1), (1, 1, 2, 2), 4, 2)
    s = TreeShape.of([3, 2, 1])  # any iterable
    assert s.branching == (3, 2, 1) and s.num_nodes == 3 + 6 + 6 and s.depth == 3
    assert s.parents == (-1,) * 3 + (0, 0, 1, 1, 2, 2) + tuple(range(3, 9))
    assert [s.nodes_up_to(d) for d in range(5)] == [0, 3, 9, 15, 15]
    for branching in SHAPES + [(63,), (1,) * 63, (2, 2, 2, 2, 2), (1, 3, 1, 2)]:
        s = TreeShape.of(branching)
        assert s.num_nodes == sum(itertools.accumulate(branching, lambda a, b: a * b))
        assert list(s.depths) == depths_of(list(s.parents)) == sorted(s.depths)
        for d in range(s.depth + 1):  # the nodes of depth <= d are a prefix: a valid tree
            n = s.nodes_up_to(d)
            assert all(x <= d for x in s.depths[:n]) and all(x > d for x in s.depths[n:])
            assert all(p < n for p in s.parents[:n])
        for i in range(s.num_nodes):  # exactly branching[d] children per node of depth d < D
            kids = [j for j, p in enumerate(s.parents) if p == i]
            assert len(kids) == (branching[s.depths[i]] if s.depths[i] < s.depth else 0)
            assert all(b - a == 1 for a, b in zip(kids, kids[1:], strict=False))  # siblings are contiguous
        assert tree_masks(list(s.parents)) == _brute_masks(list(s.parents))
    for too_big in [(64,), (1,) * 64, (2,) * 6, (8, 8)]:
        with pytest.raises(ValueError, match="at most 63 fit one verification pass"):
            TreeShape.of(too_big)
    for bad in [(), (0,), (2, 0), (2, -1), (1.5,), (True,), ("2",), "ab"]:
        with pytest.raises(ValueError, match="non-empty tuple of integers >= 1"):
            TreeShape.of(bad)


def test_llm_draft_tree_options(dirs):
    path = dirs["llama"]
    with pytest.raises(ValueError, match="draft_tree needs a drafter"):
        LLM(str(path), draft_tree=(2,), device="cpu")
    with pytest.raises(ValueError, match="at most 63"):
        LLM(str(path), draft="ngram", draft_tree=(4, 4, 4), device="cpu")
    with pytest.raises(ValueError, match="integers >= 1"):
        LLM(str(path), draft="early-exit:1", draft_tree=(2, 0), device="cpu")
    llm = LLM(str(path), draft="ngram", draft_tree=(3, 2, 1), device="cpu")
    # the cache reserves one slot per node; a step drafts at most depth-many tokens on a path
    assert llm.engine.num_draft_tokens == 15 and llm.engine.draft_depth == 3


def test_build_tree_batch_two_sequences():
    bm = BlockManager(num_blocks=8, block_size=3)
    bm.allocate(10, 3)  # seq 10: block 0
    bm.allocate(11, 4)  # seq 11: blocks 1, 2
    bm.allocate(10, 9)  # seq 10: blocks 0, 3, 4 (not contiguous with its first)
    tokens = torch.arange(6, dtype=torch.int64)
    # seq 10: 5 committed tokens, root at position 4, tree root -> {0, 1}, 0 -> 2, 1 -> 3;
    # seq 11: 4 committed tokens and an empty tree
    b = build_tree_batch(bm, [10, 11], [4, 3], [[-1, -1, 0, 1], []], tokens, "cpu")
    assert b.tokens is tokens
    assert b.positions.tolist() == [4, 5, 5, 6, 6, 3]  # root, then root + depth
    # seq 10 cache positions 4..8 -> block 3 (slots 9..11) offsets 1, 2; block 4 offsets 0..2
    assert b.slot_mapping.tolist() == [10, 11, 12, 13, 14, 2 * 3 + 0]
    assert b.tree_mask.tolist() == [1, 0b11, 0b101, 0b1011, 0b10101, 1]
    assert b.tree_mask.dtype == torch.int64
    assert b.seq_lens.tolist() == [9, 4] and b.q_start.tolist() == [0, 5, 6]
    assert b.block_table.tolist() == [[0, 3, 4], [1, 2, 0]]
    assert b.max_query_len == 5 and b.logits_rows is None


def _cached_tree_logits(model, seqs, trees, block_size=3):
    """prefill_tails + one tree forward through a NaN-filled paged cache; returns the
    logits [sum(1 + N_b), V]."""
    cfg = model.config
    need = [len(s.tokens) + len(t[0]) for s, t in zip(seqs, trees, strict=True)]
    bm = BlockManager(sum(cdiv(n, block_size) for n in need) + 1, block_size)
    bm.allocate(99, 1)  # a first block nobody owns: no sequence starts at slot 0
    for s, n in zip(seqs, need, strict=True):
        bm.allocate(s.seq_id, n)
    cache = KVCache(cfg.num_layers, bm.num_blocks, block_size, cfg.num_kv_heads, cfg.head_dim,
                    torch.float32, "cpu")
    cache.k.fill_(float("nan"))
    cache.v.fill_(float("nan"))
    ops = get_backend("torch")
    prefill_tails(model, cache, ops, bm, seqs, [0] * len(seqs), "cpu")
    flat = [t for s, (_, toks) in zip(seqs, trees, strict=True) for t in [s.tokens[-1]] + toks]
    batch = build_tree_batch(bm, [s.seq_id for s in seqs], [len(s.tokens) - 1 for s in seqs],
                             [p for p, _ in trees], torch.tensor(flat), "cpu")
    return model.forward_cached(batch, cache, ops)


def test_tree_forward_matches_no_cache_paths(dirs):
    """Row r of a tree forward scores the children of tree position r: it must equal the
    no-cache model on the committed prefix + the root-to-r path."""
    model = _model(dirs["qwen2"])
    params = SamplingParams()
    prompts = [_prompts([70], seed=3)[0], [7], _prompts([5], seed=4)[0]]
    seqs = [Sequence(i, p, params, seed=0) for i, p in enumerate(prompts)]
    shapes = [TreeShape.of((3, 2, 1)), TreeShape.of((2,)), None]
    g = torch.Generator().manual_seed(5)
    trees = []
    for s in shapes:
        parents = list(s.parents[:s.nodes_up_to(2)]) if s else []
        trees.append((parents, torch.randint(3, 97, (len(parents),), generator=g).tolist()))
    logits = _cached_tree_logits(model, seqs, trees)
    assert logits.shape == (sum(1 + len(p) for p, _ in trees), 97)
    row = 0
    for seq, (parents, toks) in zip(seqs, trees, strict=True):
        for node in [-1] + list(range(len(parents))):
            path, u = [], node
            while u >= 0:
                path.insert(0, toks[u])
                u = parents[u]
            want = model(torch.tensor([seq.tokens + path]))[0, -1]
            assert_close(logits[row], want, atol=1e-4, rtol=1e-4)
            row += 1


# ---------------------------------------------------------------------- n-gram trees


def test_ngram_continuations_edge_cases():
    assert ngram_continuations([], 3) == [] and ngram_continuations([5], 3) == []
    assert ngram_continuations([1, 2, 3, 4], 3) == []  # no repeat: no match
    assert ngram_continuations([5, 6, 7, 5, 6, 8, 5, 6], length=2) == [[8, 5], [7, 5]]
    # the longest suffix match first (the 2-gram "5 6" is followed by 8 then 7), then shorter
    # n-grams add what they find: "6" was also followed by 9
    assert ngram_continuations([6, 9, 5, 6, 7, 5, 6, 8, 5, 6], 1) == [[8], [7], [9]]
    assert ngram_continuations([6, 9, 5, 6, 7, 5, 6, 8, 5, 6], 1, max_ngram=1) == [[8], [7], [9]]
    assert ngram_continuations([6, 9, 5, 6, 7, 5, 6, 8, 5, 6], 1, min_ngram=2) == [[8], [7]]
    assert ngram_continuations([6, 9, 5, 6, 7, 5, 6, 8, 5, 6], 1, limit=2) == [[8], [7]]
    # a match at the end gives a short continuation; repeats are dropped
    assert ngram_continuations([5, 5, 5, 5], 2) == [[5], [5, 5]]
    assert ngram_continuations([5, 6, 5, 6], 0) == []
    conts = ngram_continuations([4, 2, 6, 1, 0, 2, 7, 3, 2, 6, 5, 1, 0, 2], 2, limit=6)
    assert conts == [[7, 3], [6, 5], [6, 1]]
    assert len({tuple(c) for c in conts}) == len(conts)


def test_continuation_tree_edge_cases():
    assert continuation_tree([], (2, 2)) == ([], [])
    assert continuation_tree([[]], (2,)) == ([], [])
    assert continuation_tree([[1, 2], [1, 3], [4]], (2, 2)) == ([1, 4, 2, 3], [-1, -1, 0, 0])
    assert continuation_tree([[1, 2, 3]], (2,)) == ([1], [-1])  # cut at the tree's depth
    assert continuation_tree([[1], [2], [3]], (2,)) == ([1, 2], [-1, -1])  # root full: 3 dropped
    # a full node stops a continuation there; later ones still grow elsewhere
    assert continuation_tree([[1, 2], [1, 3], [1, 4], [5, 6]], (3, 2)) == \
        ([1, 5, 2, 3, 6], [-1, -1, 0, 0, 1])
    # duplicates and prefixes merge
    assert continuation_tree([[1, 2], [1, 2], [1]], (2, 2)) == ([1, 2], [-1, 0])
    # breadth-first order across branches
    assert continuation_tree([[1, 2, 3], [4, 5, 6]], (2, 1, 1)) == ([1, 4, 2, 5, 3, 6], [-1, -1, 0, 1, 2, 3])
    rng = random.Random(1)
    for _ in range(200):
        branching = tuple(rng.randint(1, 3) for _ in range(rng.randint(1, 4)))
        conts = [[rng.randrange(4) for _ in range(rng.randint(0, 5))] for _ in range(rng.randint(0, 8))]
        toks, parents = continuation_tree(conts, branching)
        check_tree_valid(parents, toks, branching, len(branching), distinct_siblings=True)
        for i in range(len(toks)):  # every root-to-node path is a prefix of some continuation
            path, u = [], i
            while u >= 0:
                path.insert(0, toks[u])
                u = parents[u]
            assert any(c[:len(path)] == path for c in conts)
        # the first continuation always fits whole (up to the depth)
        if conts and conts[0]:
            first = conts[0][:len(branching)]
            assert toks[0] == first[0] and len(first) <= max(depths_of(parents))


def test_ngram_tree_proposal_is_ragged():
    drafter = NgramDrafter(tree=TreeShape.of((2, 2)))
    seqs = [Sequence(i, p, SamplingParams(), seed=0) for i, p in enumerate(
        [[4, 2, 6, 1, 0, 2, 7, 3, 2, 6, 5, 1, 0, 2], [1, 2, 3], [5, 6, 5, 6, 5], [4, 2, 6, 1, 0, 2, 7, 3, 2]])]
    prop = drafter.propose(seqs, [2, 2, 1, 0], None, "cpu")
    assert prop.q is None
    assert prop.counts == [5, 0, 1, 0]
    assert prop.parents == [[-1, -1, 0, 1, 1], [], [-1], []]
    assert prop.tokens.tolist() == [7, 6, 3, 5, 1, 6]


# ---------------------------------------------------------------------- greedy identity


def _run_greedy(path, draft, shape, prompts=PROMPTS, params=None, **kw):
    params = params or _params()
    llm = make_llm(path, draft, draft_tree=shape, **kw)
    running = _record_running(llm)
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
    llm, outs, running = _run_greedy(path, _draft_arg(dirs, "llama", drafter), shape, block_size=3, max_num_seqs=3)
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
    _run_greedy(dirs[family], _draft_arg(dirs, family, drafter), shape, block_size=4)


def _budget(paths, block_size, num_blocks):
    """kv_cache_memory that buys exactly ``num_blocks`` blocks of every model in ``paths``
    (plus the scratch block)."""
    per = 0
    for p in paths:
        c = _model(p).config
        per += KVCache.bytes_per_block(c.num_layers, block_size, c.num_kv_heads, c.head_dim, torch.float32)
    return (num_blocks + 1) * per


PREEMPT_CASES = [("ngram", (3, 2, 1)), ("early-exit:2", (2, 2, 2)), ("draft-model", (2, 2, 2)), ("self", (3, 2, 1))]


@pytest.mark.parametrize("drafter, shape", PREEMPT_CASES,
                         ids=[f"{d}-{'x'.join(map(str, s))}" for d, s in PREEMPT_CASES])
def test_greedy_tree_under_preemption(dirs, drafter, shape):
    path, bs = dirs["qwen2"], 4
    draft = _draft_arg(dirs, "qwen2", drafter)
    n = TreeShape.of(shape).num_nodes
    # the 70-token prompt first: it holds most of the cache, the others take turns beside it
    prompts = [PROMPTS[3]] + PROMPTS[:3] + PROMPTS[4:]
    params = _params([16] * len(prompts), ignore_eos=True)
    one = max(cdiv(len(p) + sp.max_tokens + n, bs) for p, sp in zip(prompts, params, strict=True))
    models = [path] + ([draft] if drafter in ("draft-model", "self") else [])
    llm = make_llm(path, draft, draft_tree=shape, block_size=bs, kv_cache_memory=_budget(models, bs, one + 2))
    assert llm.blocks.num_blocks == one + 2
    outs = llm.generate(prompts, params)
    check_greedy(path, prompts, params, outs)
    assert llm.engine.scheduler.num_preemptions, "the budget should force preemption"
    assert llm.blocks.num_free_blocks == llm.blocks.num_blocks


# ---------------------------------------------------------------------- ragged trees


def test_ngram_trees_are_ragged_per_sequence(dirs):
    path, shape = dirs["llama"], (3, 2, 1)
    prompts = [[5, 6, 7, 8] * 3 + [5, 6, 7], _prompts([6], seed=9)[0],
               [9, 10, 9, 11, 9, 12, 9], [20, 21, 22, 20, 21, 23, 20, 21]]
    params = _params([14, 10, 3, 7])
    llm = make_llm(path, "ngram", draft_tree=shape, block_size=4)
    steps = _record_proposals(llm)
    outs = llm.generate(prompts, params)
    check_greedy(path, prompts, params, outs)
    for st in steps:
        for parents, toks, lim in zip(st.parents, st.tokens, st.limits, strict=True):
            check_tree_valid(parents, toks, shape, lim, distinct_siblings=True)
    first = steps[0]
    assert first.counts[1] == 0, "a prompt without repeats gets no tree"
    # several continuations: root branches (9 was followed by 10, 11, 12; "20 21" by 22, 23)
    assert [p.count(-1) for p in first.parents] == [1, 0, 3, 2]
    assert first.limits[2] == 2  # max_tokens=3 leaves room for 2 drafts
    mixed = [st for st in steps if 0 in st.counts and any(st.counts)]
    shapes = {tuple(p) for st in steps for p in st.parents if p}
    assert mixed and len(shapes) >= 3, "want empty and differently shaped trees side by side"


@pytest.mark.parametrize("drafter", ["self", "early-exit:1"])
def test_trees_near_max_tokens_are_cut(dirs, drafter):
    """A tree never drafts past max_tokens: depth <= tokens left - 1, and a model drafter's
    tree is the static shape cut to that depth (ragged across the batch)."""
    path, shape = dirs["llama"], TreeShape.of((2, 2, 1))
    params = _params([1, 2, 3, 4, 5, 9], ignore_eos=True)
    prompts = _prompts([3, 5, 2, 7, 4, 6], seed=8)
    llm = make_llm(path, _draft_arg(dirs, "llama", drafter), draft_tree=shape.branching, block_size=4)
    steps = _record_proposals(llm)
    outs = llm.generate(prompts, params)
    check_greedy(path, prompts, params, outs)
    assert steps[0].limits == [0, 1, 2, 3, 3, 3]
    for st in steps:
        if st.parents is None:  # every limit 0: the drafter proposes nothing (a chain of 0)
            assert not any(st.limits) and not any(st.counts)
            continue
        for parents, lim in zip(st.parents, st.limits, strict=True):
            assert parents == list(shape.parents[:shape.nodes_up_to(lim)])
    assert sorted(set(steps[0].counts)) == [0, 2, 6, 10]
    for out, p in zip(outs, params, strict=True):
        assert len(out.token_ids) == p.max_tokens
        if drafter == "self":  # all accepted: ceil(max_tokens / (D + 1)) steps
            assert out.metrics.num_steps == cdiv(p.max_tokens, shape.depth + 1)


# ---------------------------------------------------------------------- keep-path


def _kv_at(cache, blocks, seq_id, n):
    """K, V of positions 0..n-1 of a sequence: [layers, n, H_kv, D] each (copies)."""
    slots = torch.tensor(blocks.slots(seq_id, list(range(n))), dtype=torch.int64)
    L, NB, BS, H, D = cache.k.shape
    return (cache.k.reshape(L, NB * BS, H, D)[:, slots].clone(),
            cache.v.reshape(L, NB * BS, H, D)[:, slots].clone())


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
    while any(s.target_len < len(t) - 1 for s, t in zip(seqs, tokens, strict=True)):
        llm.engine.step()
        for s, t in zip(seqs, tokens, strict=True):
            if len(s.tokens) <= len(t):
                s.tokens[-1] = t[len(s.tokens) - 1]
    for s, t in zip(seqs, tokens, strict=True):
        assert s.tokens[:len(t)] == t and not s.finished
    return [_kv_at(llm.cache, llm.blocks, s.seq_id, len(t) - 1) for s, t in zip(seqs, tokens, strict=True)]


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
    draft = _draft_arg(dirs, "llama", drafter)
    own_cache = drafter in ("near-draft", "self")
    memory = _budget([path] + ([draft] if own_cache else []), bs, num_blocks) if num_blocks else None
    llm = make_llm(path, draft, draft_tree=shape, block_size=bs, kv_cache_memory=memory)
    moves, keep = [], llm.cache.keep_path
    llm.cache.keep_path = lambda src, dst: (moves.append((src != dst).sum().item()), keep(src, dst))
    params = _params([20, 24, 16, 18, 22], temperature=temperature, ignore_eos=True, seed=3)
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
            target_snaps.append((i, s.target_len, *_kv_at(llm.cache, llm.blocks, s.seq_id, s.target_len)))
            if own_cache:
                assert 0 < s.draft_len <= s.target_len
                draft_snaps.append((i, s.draft_len, *_kv_at(llm.drafter.cache, llm.blocks, s.seq_id, s.draft_len)))
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
    _poison(tri)
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
    outs = llm.generate(PROMPTS[:3], _params([12] * 3, temperature=temperature, ignore_eos=True, seed=5))
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
    llm = make_llm(path, _draft_arg(dirs, "llama", "near-draft"), draft_tree=(3, 2, 1, 1), block_size=4)
    outs = llm.generate(PROMPTS, _params([24] * 5, ignore_eos=True))
    by_pos = llm.metrics()["acceptance_rate_by_position"]
    assert len(by_pos) == 4
    assert all(0 <= r <= 1 for r in by_pos) and 0 < min(by_pos) < 1
    acc = [sum(o.metrics.accepted_per_position[i] for o in outs) for i in range(4)]
    prop = [sum(o.metrics.proposed_per_position[i] for o in outs) for i in range(4)]
    assert by_pos == [a / p for a, p in zip(acc, prop, strict=True)]


# ---------------------------------------------------------------------- exactness


V = 8
N_TOKENS = 3
N_SAMPLES = 4096
ALPHA = 1e-3
POWER_ALPHA = 1e-6
BLOCK_SIZE = 4
PROMPT = [3, 1, 2, 0, 5, 2, 0, 4, 3, 1, 2, 0, 5, 2]  # as in test_distribution.py
# for the n-gram drafter: the last token 2 was followed by "4 7", "0 0" and "0 2", so the
# (2, 2) tree is root -> {4, 0}, 4 -> {7}, 0 -> {0, 2}: siblings at both levels, and the
# target gives the root's candidates 0.26 and 0.36, so both are accepted often
NGRAM_PROMPT = [2, 0, 2, 0, 0, 3, 3, 3, 7, 1, 2, 4, 7, 2]
_ARCH = dict(vocab_size=V, hidden_size=16, num_heads=2, num_kv_heads=1, intermediate_size=24,
             max_position_embeddings=64, std=0.5)


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """The checkpoints of test_distribution.py: a 2-layer V = 8 target, an unrelated 1-layer
    draft (overlap ~0.5) and a noisy copy of the target (keeps its top tokens)."""
    root = tmp_path_factory.mktemp("tree_distribution")
    target = make_checkpoint(root / "target", num_layers=2, seed=1, **_ARCH)
    draft = make_checkpoint(root / "draft", num_layers=1, seed=2, **_ARCH)
    near = perturbed_copy(target, root / "near", noise=0.25, seed=3)
    return SimpleNamespace(target=target, dirs={"model": draft, "near": near}, model=load_model(target))


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


def _marginals(counts, joint):
    """(counts, probs) of each single position's token, from the joint ones."""
    c = counts.view(V, V, V)
    j = joint.view(V, V, V)
    dims = [(1, 2), (0, 2), (0, 1)]
    return [(c.sum(d), j.sum(d)) for d in dims]


def law_test(counts, joint):
    """The joint chi-square test and one per position's marginal (the marginal test sees
    a bias confined to one position with far more power than 512 joint cells); returns
    (smallest p-value, Bonferroni-corrected over the 4 tests, and the results)."""
    results = [chi_square_test(counts, joint)] + [chi_square_test(c, p / p.sum()) for c, p in _marginals(counts, joint)]
    return min(1.0, 4 * min(r.p_value for r in results)), results


class TreeWalkRecorder:
    """Wraps ``tree_rejection_sample`` to record every sequence's walk of every step."""

    def __init__(self, fn):
        self.fn, self.walks = fn, []

    def __call__(self, target_logits, draft_token_ids, parents, q, cu_num_nodes, *args, **kwargs):
        out, n_acc, path = self.fn(target_logits, draft_token_ids, parents, q, cu_num_nodes,
                                   *args, **kwargs)
        cu, par, tok = cu_num_nodes.tolist(), parents.tolist(), draft_token_ids.tolist()
        offsets = args[-1].tolist()  # temperature, top_k, top_p, seeds, offsets follow max_depth
        for b, (a, nodes) in enumerate(zip(n_acc.tolist(), path.tolist(), strict=True)):
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
        return float(sum(p[t] for t, par in zip(toks, parents, strict=True) if par == -1))
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


def _residual(p, q, x):
    """The reference's sibling update: max(p - q, 0) (point mass: p without x), normalised."""
    r = (p - q).clamp(min=0.0) if q is not None else p.clone().index_fill_(0, torch.tensor([x]), 0.0)
    total = r.sum()
    return r / total if total > 0 else p


def host_tree_sampler(rule: str):
    """``tree_rejection_sample`` as a per-sequence host loop, with the reference's Philox
    uniforms, under ``rule``:

    "exact":       the reference's rule (used to check this harness against the reference);
    "no-update":   every sibling is tested against the untouched p_u (accept iff
                   u q(x) < p_u(x)) instead of the residual the earlier rejections left;
                   after all are rejected it samples max(p_u - q_u, 0) normalised (point
                   mass: p_u without the rejected tokens), as a chain would;
    "first-child": always accepts the first child of each position.
    """
    def sample(target_logits, draft_token_ids, parents, q, cu_num_nodes, max_depth,
               temperature, top_k, top_p, seeds, offsets, check_finite=True, radix_rounds=None):
        draft_probs = reference.draft_dist_probs(q) if q is not None else None  # [rows, V]
        cu = cu_num_nodes.tolist()
        batch = len(cu) - 1
        rows = torch.tensor([cu[b + 1] - cu[b] + 1 for b in range(batch)])
        p_all = reference.sampling_probs(target_logits.float(), temperature.repeat_interleave(rows),
                                         top_k.repeat_interleave(rows), top_p.repeat_interleave(rows))
        argmax = target_logits.argmax(-1).tolist()
        u_acc = philox_uniform(seeds, offsets, MAX_TREE_NODES, TREE_ACCEPT_STREAM).tolist()
        u_emit = philox_uniform(seeds, offsets, MAX_TREE_NODES + 1, TREE_SAMPLE_STREAM)
        toks, pars, temps = draft_token_ids.tolist(), parents.tolist(), temperature.tolist()
        out = torch.full((batch, max_depth + 1), -1, dtype=torch.int64)
        path = torch.full((batch, max_depth), -1, dtype=torch.int32)
        n_acc = torch.zeros(batch, dtype=torch.int32)
        final_p, final_u, greedy_tok = [], [], []
        for b in range(batch):
            s, n, r0 = cu[b], cu[b + 1] - cu[b], cu[b] + b
            node, k = -1, 0
            while True:
                row = r0 + 1 + node
                p_u = p_all[row]
                q_u = draft_probs[row] if draft_probs is not None else None
                p_cur, chosen = p_u, None
                for c in [c for c in range(n) if pars[s + c] == node]:
                    x = toks[s + c]
                    if temps[b] <= 0:
                        ok = x == argmax[row]
                    elif rule == "first-child":
                        ok = True
                    else:
                        q_x = float(q_u[x]) if q_u is not None else 1.0
                        ok = u_acc[b][c] * q_x < float((p_cur if rule == "exact" else p_u)[x])
                    if ok:
                        chosen = c
                        break
                    if temps[b] > 0:
                        p_cur = _residual(p_u if (rule == "no-update" and q_u is not None) else p_cur, q_u, x)
                if chosen is None:
                    break
                path[b, k], out[b, k] = chosen, toks[s + chosen]
                k, node = k + 1, chosen
            n_acc[b] = k
            final_p.append(p_cur)
            final_u.append(u_emit[b, node + 1])
            greedy_tok.append(argmax[row] if temps[b] <= 0 else -1)
        emitted = sample_inverse_cdf(torch.stack(final_p), torch.stack(final_u))
        emitted = torch.where(torch.tensor(greedy_tok) >= 0, torch.tensor(greedy_tok), emitted)
        out[torch.arange(batch), n_acc.long()] = emitted
        return out, n_acc, path
    return sample


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
        for w, g_ in zip(want, got, strict=True):
            assert torch.equal(w, g_), (seed, want, got)
        for rule in differ:
            wrong = host_tree_sampler(rule)(*args)
            differ[rule] += not all(torch.equal(w, x) for w, x in zip(want, wrong, strict=True))
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
    root = tmp_path_factory.mktemp("tree_window_distribution")
    target = make_checkpoint(root / "target", "gemma2", num_layers=2, seed=1, sliding_window=4, **_ARCH)
    near = perturbed_copy(target, root / "near", noise=0.25, seed=3)
    return SimpleNamespace(target=target, dirs={"near": near}, model=load_model(target))


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
