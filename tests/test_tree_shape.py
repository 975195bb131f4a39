"""Tree pieces: ancestor masks, ``TreeShape``, ``build_tree_batch`` and the tree forward.

* ``tree_masks`` against a brute-force ancestor walk; ``TreeShape`` (parents, depths,
  node counts) and the ``draft_tree`` options of ``LLM``;
* ``build_tree_batch`` (positions, slots, masks of a 2-sequence batch);
* ``prefill_tails`` + a tree forward against the no-cache model on every root-to-node path.
"""

from __future__ import annotations

import itertools
import random

import pytest
import torch
from torch.testing import assert_close

from engine_helpers import cached_model, random_prompts
from tree_helpers import SHAPES, tree_checkpoints
from specdec import LLM, SamplingParams
from specdec.batch import build_tree_batch
from specdec.kernels import get_backend
from specdec.kv_cache import BlockManager, KVCache, cdiv
from specdec.runners.eager import prefill_tails
from specdec.sequence import Sequence
from specdec.tree import TreeShape, depths_of, tree_masks


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    return tree_checkpoints(tmp_path_factory.mktemp("tree_shape"))


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
            assert all(b - a == 1 for a, b in zip(kids, kids[1:]))  # siblings are contiguous
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
    need = [len(s.tokens) + len(t[0]) for s, t in zip(seqs, trees)]
    bm = BlockManager(sum(cdiv(n, block_size) for n in need) + 1, block_size)
    bm.allocate(99, 1)  # a first block nobody owns: no sequence starts at slot 0
    for s, n in zip(seqs, need):
        bm.allocate(s.seq_id, n)
    cache = KVCache(cfg.num_layers, bm.num_blocks, block_size, cfg.num_kv_heads, cfg.head_dim,
                    torch.float32, "cpu")
    cache.k.fill_(float("nan"))
    cache.v.fill_(float("nan"))
    ops = get_backend("torch")
    prefill_tails(model, cache, ops, bm, seqs, [0] * len(seqs), "cpu")
    flat = [t for s, (_, toks) in zip(seqs, trees) for t in [s.tokens[-1]] + toks]
    batch = build_tree_batch(bm, [s.seq_id for s in seqs], [len(s.tokens) - 1 for s in seqs],
                             [p for p, _ in trees], torch.tensor(flat), "cpu")
    return model.forward_cached(batch, cache, ops)


def test_tree_forward_matches_no_cache_paths(dirs):
    """Row r of a tree forward scores the children of tree position r: it must equal the
    no-cache model on the committed prefix + the root-to-r path."""
    model = cached_model(dirs["qwen2"])
    params = SamplingParams()
    prompts = [random_prompts([70], seed=3)[0], [7], random_prompts([5], seed=4)[0]]
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
    for seq, (parents, toks) in zip(seqs, trees):
        for node in [-1] + list(range(len(parents))):
            path, u = [], node
            while u >= 0:
                path.insert(0, toks[u])
                u = parents[u]
            want = model(torch.tensor([seq.tokens + path]))[0, -1]
            assert_close(logits[row], want, atol=1e-4, rtol=1e-4)
            row += 1
