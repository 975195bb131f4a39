"""Paged KV cache: BlockManager bookkeeping, and cached decoding == the no-cache forward.

Oracle for the cached path: ``LlamaForCausalLM.__call__`` (full causal forward without a
cache, itself matched against transformers in test_models.py). The caches are filled with
NaN before use, so a forward that reads a slot nobody wrote (past ``seq_lens``, a stale
block, a padding entry of the block table) turns its logits into NaN and fails.
"""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from checkpoints import make_checkpoint
from engine_helpers import random_prompts
from specdec import LLM, CacheCapacityError, SamplingParams
from specdec.batch import build_forward_batch
from specdec.kernels import get_backend
from specdec.kv_cache import BlockManager, KVCache
from specdec.models import load_model

FP32 = dict(atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------------- BlockManager


def test_allocate_grow_truncate_free():
    bm = BlockManager(num_blocks=10, block_size=4)
    assert bm.num_free_blocks == 10
    assert bm.blocks_needed(7, 5) == 2
    bm.allocate(7, 5)  # 5 tokens -> 2 blocks
    assert len(bm.table(7)) == 2 and bm.capacity(7) == 8 and bm.num_free_blocks == 8
    bm.allocate(7, 8)  # still fits
    assert len(bm.table(7)) == 2
    assert bm.blocks_needed(7, 9) == 1 and bm.blocks_needed(7, 3) == 0
    bm.allocate(7, 9)  # grows by one, keeps the old blocks in order
    first_two = bm.table(7)[:2]
    assert len(bm.table(7)) == 3 and bm.num_free_blocks == 7
    bm.truncate(7, 4)  # exactly one block's worth
    assert bm.table(7) == first_two[:1] and bm.num_free_blocks == 9
    bm.truncate(7, 4)  # idempotent
    assert bm.num_free_blocks == 9
    bm.truncate(7, 100)  # never grows
    assert len(bm.table(7)) == 1
    bm.free(7)
    assert bm.num_free_blocks == 10
    with pytest.raises(KeyError):
        bm.table(7)
    bm.free(7)  # freeing twice or an unknown id is harmless
    bm.truncate(12345, 0)
    assert bm.num_free_blocks == 10


def test_tables_are_disjoint_and_cover_the_pool():
    bm = BlockManager(num_blocks=12, block_size=3)
    for seq_id, n in [(0, 7), (1, 1), (2, 12), (3, 3)]:
        bm.allocate(seq_id, n)
    tables = [bm.table(s) for s in range(4)]
    used = [b for t in tables for b in t]
    assert len(used) == len(set(used)) == 3 + 1 + 4 + 1
    assert bm.num_free_blocks == 12 - len(used)
    assert all(0 <= b < 12 for b in used)


def test_freed_blocks_are_reused():
    bm = BlockManager(num_blocks=6, block_size=2)
    bm.allocate(0, 4)
    bm.allocate(1, 4)
    bm.allocate(2, 4)
    assert bm.num_free_blocks == 0
    freed = set(bm.table(1))
    bm.free(1)
    bm.allocate(3, 3)
    assert set(bm.table(3)) == freed
    # a truncated tail comes back too
    tail = bm.table(0)[1]
    bm.truncate(0, 2)
    bm.allocate(4, 1)
    assert bm.table(4) == [tail]


def test_slots_mapping():
    bm = BlockManager(num_blocks=8, block_size=4)
    bm.allocate(0, 1)  # takes one block so seq 1's blocks are not 0, 1, 2
    bm.allocate(1, 10)
    table = bm.table(1)
    positions = list(range(10))
    expected = [table[p // 4] * 4 + p % 4 for p in positions]
    assert bm.slots(1, positions) == expected
    assert len(set(expected)) == 10
    assert bm.slots(1, [9, 0, 4]) == [table[2] * 4 + 1, table[0] * 4, table[1] * 4]


def test_block_table_tensor_pads_rows():
    bm = BlockManager(num_blocks=8, block_size=4)
    bm.allocate(0, 9)
    bm.allocate(1, 2)
    t = bm.block_table_tensor([1, 0])
    assert t.dtype == torch.int32 and t.shape == (2, 3)
    assert t[0].tolist() == bm.table(1) + [0, 0]
    assert t[1].tolist() == bm.table(0)


def test_capacity_error_when_exhausted_leaves_state_unchanged():
    bm = BlockManager(num_blocks=5, block_size=4)
    bm.allocate(0, 12)
    table = list(bm.table(0))
    with pytest.raises(CacheCapacityError, match="needs 3 more KV blocks but only 2 of 5"):
        bm.allocate(1, 9)
    with pytest.raises(CacheCapacityError):
        bm.allocate(0, 24)
    assert bm.table(0) == table and bm.num_free_blocks == 2  # no partial allocation
    bm.allocate(1, 8)  # exactly the free blocks
    assert bm.num_free_blocks == 0


@pytest.mark.parametrize("num_blocks, block_size", [(0, 4), (4, 0), (-1, 4)])
def test_block_manager_rejects_bad_sizes(num_blocks, block_size):
    with pytest.raises(ValueError):
        BlockManager(num_blocks, block_size)


def test_kv_cache_shapes_and_bytes():
    cache = KVCache(num_layers=3, num_blocks=5, block_size=4, num_kv_heads=2, head_dim=8,
                    dtype=torch.float16, device="cpu")
    assert cache.k.shape == cache.v.shape == (3, 5, 4, 2, 8)
    k0, v0 = cache.layer(1)
    assert k0.shape == (5, 4, 2, 8) and k0.data_ptr() == cache.k[1].data_ptr()
    assert KVCache.bytes_per_block(3, 4, 2, 8, torch.float16) == 2 * 3 * 4 * 2 * 8 * 2
    assert KVCache.bytes_per_block(3, 4, 2, 8, torch.float32) == 2 * 3 * 4 * 2 * 8 * 4


# ---------------------------------------------------------------------- cached forward


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("llama"), "llama", max_position_embeddings=64)


@pytest.fixture(scope="module")
def model(ckpt):
    return load_model(ckpt)


def _nan_cache(model, num_blocks, block_size, dtype=torch.float32):
    cfg = model.config
    cache = KVCache(cfg.num_layers, num_blocks, block_size, cfg.num_kv_heads, cfg.head_dim,
                    dtype, "cpu")
    cache.k.fill_(float("nan"))
    cache.v.fill_(float("nan"))
    return cache


def _forward(model, cache, bm, ops, seqs: dict[int, list[int]], starts: dict[int, int]):
    """One ragged forward of ``seqs[i][starts[i]:]`` for every i; returns {id: logits [n, V]}."""
    ids = list(seqs)
    lengths = [len(seqs[i]) - starts[i] for i in ids]
    for i in ids:
        bm.allocate(i, len(seqs[i]))
    flat = [t for i in ids for t in seqs[i][starts[i]:]]
    tokens = torch.tensor(flat, dtype=torch.int64)
    batch = build_forward_batch(bm, ids, [starts[i] for i in ids], lengths, lengths, tokens, "cpu")
    logits = model.forward_cached(batch, cache, ops)
    out, row = {}, 0
    for i, n in zip(ids, lengths):
        out[i] = logits[row:row + n]
        row += n
    return out


def _full(model, tokens: list[int]) -> torch.Tensor:
    return model(torch.tensor([tokens]))[0]  # [T, V]


@pytest.mark.parametrize("block_size", [1, 4, 8])
def test_ragged_prefill_then_decode_matches_no_cache(model, block_size):
    ops = get_backend("torch")
    cache = _nan_cache(model, num_blocks=128, block_size=block_size)
    bm = BlockManager(128, block_size)
    seqs = dict(enumerate(random_prompts([1, 7, 8, 9, 17])))
    # 1. ragged prefill: every prompt in one forward
    got = _forward(model, cache, bm, ops, seqs, {i: 0 for i in seqs})
    for i, toks in seqs.items():
        assert_close(got[i], _full(model, toks), **FP32)
    # 2. mixed step: decodes of 1 token, chains of 2 and 3 (verify-like), and a new
    #    prompt prefilled in the same batch
    extra = {0: [5], 1: [6, 7], 2: [8, 9, 10], 3: [11], 4: [12, 13]}
    starts = {i: len(t) for i, t in seqs.items()}
    for i, more in extra.items():
        seqs[i] = seqs[i] + more
    seqs[9] = random_prompts([11], seed=1)[0]
    starts[9] = 0
    got = _forward(model, cache, bm, ops, seqs, starts)
    for i, toks in seqs.items():
        assert_close(got[i], _full(model, toks)[starts[i]:], **FP32)
    # 3. plain decode steps, one token each, several block boundaries crossed
    for step in range(5):
        starts = {i: len(t) for i, t in seqs.items()}
        for i in seqs:
            seqs[i] = seqs[i] + [(7 * i + step) % 97]
        got = _forward(model, cache, bm, ops, seqs, starts)
        for i, toks in seqs.items():
            assert_close(got[i], _full(model, toks)[-1:], **FP32)


@pytest.mark.parametrize("dtype, tol", [(torch.float16, 1e-2), (torch.bfloat16, 5e-2)])
def test_half_precision_cache(ckpt, dtype, tol):
    model = load_model(ckpt, dtype=dtype)
    cache = _nan_cache(model, num_blocks=32, block_size=4, dtype=dtype)
    bm = BlockManager(32, 4)
    seqs = dict(enumerate(random_prompts([3, 10, 6])))
    got = _forward(model, cache, bm, get_backend("torch"), seqs, {i: 0 for i in seqs})
    starts = {i: len(t) for i, t in seqs.items()}
    seqs = {i: t + [7, 8] for i, t in seqs.items()}
    got2 = _forward(model, cache, bm, get_backend("torch"), seqs, starts)
    for i, toks in seqs.items():
        ref = _full(model, toks)  # the same weights in the same dtype, no cache
        scale = ref.abs().max().item()
        assert got[i].dtype == dtype  # the cached forward hands the samplers the model's dtype
        assert_close(torch.cat([got[i], got2[i]]).float(), ref, atol=tol * scale, rtol=tol)
    assert cache.k.dtype == dtype


def test_llm_half_precision_smoke(ckpt):
    llm = LLM(ckpt, draft="early-exit:1", device="cpu", dtype=torch.bfloat16, block_size=4)
    assert llm.cache.k.dtype == torch.bfloat16
    outs = llm.generate(random_prompts([2, 9]), SamplingParams(max_tokens=6, temperature=0, ignore_eos=True))
    assert [len(o.token_ids) for o in outs] == [6, 6]
    assert llm.blocks.num_free_blocks == llm.blocks.num_blocks


def test_reused_blocks_do_not_leak_stale_values(model):
    ops = get_backend("torch")
    cache = _nan_cache(model, num_blocks=6, block_size=4)
    bm = BlockManager(6, 4)
    long = random_prompts([21])[0]
    _forward(model, cache, bm, ops, {0: long}, {0: 0})
    bm.free(0)
    # seq 1 lands on seq 0's blocks; its last block's tail still holds seq 0's K/V
    short = random_prompts([6], seed=3)[0]
    got = _forward(model, cache, bm, ops, {1: short}, {1: 0})
    assert set(bm.table(1)) <= {0, 1, 2, 3, 4, 5}
    assert_close(got[1], _full(model, short), **FP32)
    got = _forward(model, cache, bm, ops, {1: short + [4]}, {1: 6})
    assert_close(got[1], _full(model, short + [4])[-1:], **FP32)


def test_logits_rows_and_early_exit_layers(model):
    ops = get_backend("torch")
    cache = _nan_cache(model, num_blocks=16, block_size=4)
    bm = BlockManager(16, 4)
    prompts = random_prompts([5, 9])
    for i, p in enumerate(prompts):
        bm.allocate(i, len(p))
    tokens = torch.tensor(prompts[0] + prompts[1])
    # only the last row of each sequence, through the first 2 layers
    batch = build_forward_batch(bm, [0, 1], [0, 0], [5, 9], [1, 1], tokens, "cpu")
    got = model.forward_cached(batch, cache, ops, num_layers=2)
    assert got.shape == (2, 97)
    layers = model.model.layers
    try:
        model.model.layers = layers[:2]
        ref = [_full(model, p)[-1] for p in prompts]
    finally:
        model.model.layers = layers
    assert_close(got, torch.stack(ref), **FP32)
    assert not torch.allclose(got[0], _full(model, prompts[0])[-1], atol=1e-2)


def test_tree_mask_sibling_branches(model):
    """Two sibling drafts after a prefix: each sees the prefix and itself, not the other."""
    from specdec.batch import ForwardBatch

    ops = get_backend("torch")
    cache = _nan_cache(model, num_blocks=8, block_size=4)
    bm = BlockManager(8, 4)
    prefix = random_prompts([6])[0]
    _forward(model, cache, bm, ops, {0: prefix}, {0: 0})
    # nodes: 0 = a (depth 0), 1 = b (child of a), 2 = c (child of a, sibling of b)
    a, b, c = 10, 20, 30
    L = len(prefix)
    bm.allocate(0, L + 3)
    batch = ForwardBatch(
        tokens=torch.tensor([a, b, c]),
        positions=torch.tensor([L, L + 1, L + 1]),
        slot_mapping=torch.tensor(bm.slots(0, [L, L + 1, L + 2])),
        block_table=bm.block_table_tensor([0]),
        seq_lens=torch.tensor([L + 3], dtype=torch.int32),
        q_start=torch.tensor([0, 3], dtype=torch.int32),
        tree_mask=torch.tensor([0b001, 0b011, 0b101]),
        logits_rows=None,
        max_query_len=3,
    )
    got = model.forward_cached(batch, cache, ops)
    assert_close(got[0], _full(model, prefix + [a])[-1], **FP32)
    assert_close(got[1], _full(model, prefix + [a, b])[-1], **FP32)
    assert_close(got[2], _full(model, prefix + [a, c])[-1], **FP32)


# ---------------------------------------------------------------------- through LLM


def _greedy_no_cache(model, prompt: list[int], n: int) -> list[int]:
    toks = list(prompt)
    for _ in range(n):
        toks.append(int(_full(model, toks)[-1].argmax()))
    return toks[len(prompt):]


@pytest.mark.parametrize("block_size", [4, 8])
def test_llm_greedy_equals_no_cache_loop(ckpt, model, block_size):
    prompts = random_prompts([1, 3, 7, 8, 9, 17])
    n = 12
    llm = LLM(ckpt, draft=None, block_size=block_size, device="cpu", dtype=torch.float32)
    llm.cache.k.fill_(float("nan"))
    llm.cache.v.fill_(float("nan"))
    outs = llm.generate(prompts, SamplingParams(max_tokens=n, temperature=0, ignore_eos=True))
    for prompt, out in zip(prompts, outs):
        assert out.prompt_token_ids == prompt
        assert out.token_ids == _greedy_no_cache(model, prompt, n)
        assert out.finish_reason == "length"
    assert llm.blocks.num_free_blocks == llm.blocks.num_blocks
    assert not llm.engine.has_work()


def test_llm_blocks_returned_after_each_generate(ckpt):
    llm = LLM(ckpt, draft="ngram", block_size=4, device="cpu")
    for max_tokens in (3, 9):
        llm.generate(random_prompts([2, 5, 13]), SamplingParams(max_tokens=max_tokens, temperature=0))
        assert llm.blocks.num_free_blocks == llm.blocks.num_blocks


def test_llm_cache_sized_from_budget(ckpt):
    cfg = load_model(ckpt).config
    per_block = KVCache.bytes_per_block(cfg.num_layers, 4, cfg.num_kv_heads, cfg.head_dim, torch.float32)
    llm = LLM(ckpt, block_size=4, device="cpu", kv_cache_memory=8 * per_block + per_block // 2)
    assert llm.blocks.num_blocks == 7  # and one scratch block no sequence is given
    assert llm.cache.k.shape == (cfg.num_layers, 8, 4, cfg.num_kv_heads, cfg.head_dim)
    with pytest.raises(ValueError, match="kv_cache_memory"):
        LLM(ckpt, block_size=4, device="cpu", kv_cache_memory=2 * per_block - 1)
