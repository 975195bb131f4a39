"""Draft trees: n-gram continuations and their merge into a tree, and ragged trees in one
batch (n-gram trees differ per sequence, some are empty; trees near max_tokens are cut
to the depth that is left), each step's proposals checked for validity and the output
against plain greedy decoding.
"""

from __future__ import annotations

import random

import pytest

from engine_helpers import draft_arg, random_prompts
from tree_helpers import (
    check_greedy,
    check_tree_valid,
    make_llm,
    record_proposals,
    tree_checkpoints,
    tree_params,
)
from specdec import SamplingParams
from specdec.drafters.ngram import NgramDrafter, continuation_tree, ngram_continuations
from specdec.kv_cache import cdiv
from specdec.sequence import Sequence
from specdec.tree import TreeShape, depths_of


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    return tree_checkpoints(tmp_path_factory.mktemp("tree_drafting"))


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


# ---------------------------------------------------------------------- ragged trees


def test_ngram_trees_are_ragged_per_sequence(dirs):
    path, shape = dirs["llama"], (3, 2, 1)
    prompts = [[5, 6, 7, 8] * 3 + [5, 6, 7], random_prompts([6], seed=9)[0],
               [9, 10, 9, 11, 9, 12, 9], [20, 21, 22, 20, 21, 23, 20, 21]]
    params = tree_params([14, 10, 3, 7])
    llm = make_llm(path, "ngram", draft_tree=shape, block_size=4)
    steps = record_proposals(llm)
    outs = llm.generate(prompts, params)
    check_greedy(path, prompts, params, outs)
    for st in steps:
        for parents, toks, lim in zip(st.parents, st.tokens, st.limits):
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
    params = tree_params([1, 2, 3, 4, 5, 9], ignore_eos=True)
    prompts = random_prompts([3, 5, 2, 7, 4, 6], seed=8)
    llm = make_llm(path, draft_arg(dirs, "llama", drafter), draft_tree=shape.branching, block_size=4)
    steps = record_proposals(llm)
    outs = llm.generate(prompts, params)
    check_greedy(path, prompts, params, outs)
    assert steps[0].limits == [0, 1, 2, 3, 3, 3]
    for st in steps:
        if st.parents is None:  # every limit 0: the drafter proposes nothing (a chain of 0)
            assert not any(st.limits) and not any(st.counts)
            continue
        for parents, lim in zip(st.parents, st.limits):
            assert parents == list(shape.parents[:shape.nodes_up_to(lim)])
    assert sorted(set(steps[0].counts)) == [0, 2, 6, 10]
    for out, p in zip(outs, params):
        assert len(out.token_ids) == p.max_tokens
        if drafter == "self":  # all accepted: ceil(max_tokens / (D + 1)) steps
            assert out.metrics.num_steps == cdiv(p.max_tokens, shape.depth + 1)
