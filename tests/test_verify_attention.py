"""verify_attention (Triton) against the PyTorch reference.

On CPU the kernels run through Triton's interpreter, so every case keeps its grid tiny
(a few programs); with CUDA the same cases run on the GPU (bench/gpu_check.py). Cache slots
that no sequence owns are filled with NaN: a kernel that reads a position it should not
(past seq_len, another sequence's block, an unused block table entry) turns its output
into NaN and the comparison fails.
"""

from __future__ import annotations

import importlib
import math
import random

import pytest
import torch

from specdec.kernels import reference as ref

# the module, not the function of the same name that specdec.kernels may re-export
va = importlib.import_module("specdec.kernels.verify_attention")
policy = importlib.import_module("specdec.kernels._attention_policy")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

TOL = {
    torch.float32: dict(atol=2e-5, rtol=1e-4),
    torch.float16: dict(atol=3e-3, rtol=3e-3),
    torch.bfloat16: dict(atol=2e-2, rtol=2e-2),
}


# --------------------------------------------------------------------------- helpers


def ancestor_mask(parents: list[int]) -> torch.Tensor:
    """[n] int64: bit j of entry i set when node j is i or an ancestor of i.

    ``parents[i] < i`` (or -1 for a root), i.e. nodes are in topological order.
    """
    bits = []
    for i, p in enumerate(parents):
        if not (p == -1 or 0 <= p < i):
            raise ValueError(f"parent of node {i} is {p}; need -1 or an earlier node")
        bits.append((1 << i) | (bits[p] if p >= 0 else 0))
    # bit 63 makes the int64 negative (two's complement)
    return torch.tensor([b - (1 << 64) if b >= 1 << 63 else b for b in bits],
                        dtype=torch.int64)


def chain(n):
    return [i - 1 for i in range(n)]


def star(n):
    return [-1] + [0] * (n - 1)


def deep(n):  # a long spine with short side branches
    return [-1] + [i - 1 if i % 3 else max(0, i - 2) for i in range(1, n)]


def wide(n):  # 4-ary tree in level order
    return [-1] + [(i - 1) // 4 for i in range(1, n)]


def random_tree(n, seed):
    rng = random.Random(seed)
    return [-1] + [rng.randrange(i) for i in range(1, n)]


def random_forest(n, seed):  # several roots: node 0 is not everybody's ancestor
    rng = random.Random(seed)
    return [-1] + [rng.randrange(-1, i) for i in range(1, n)]


def make_case(prefixes, trees, *, h=4, h_kv=2, d=64, page=16, dtype=torch.float32,
              causal=False, seed=0):
    """A ragged batch over a paged cache with shuffled blocks.

    prefixes: committed lengths per sequence; trees: parent lists (or ints: a chain of
    that many tokens, used with causal=True). Returns the verify_attention arguments.
    """
    g = torch.Generator().manual_seed(seed)
    parents = [chain(t) if isinstance(t, int) else t for t in trees]
    ns = [len(p) for p in parents]
    lens = [p + n for p, n in zip(prefixes, ns, strict=True)]
    nblk = [math.ceil(length / page) for length in lens]
    max_blocks = max(nblk + [1])
    num_blocks = sum(nblk) + 3  # spare blocks nobody owns
    perm = torch.randperm(num_blocks, generator=g).to(torch.int32)
    poison = int(perm[-1])  # unused table entries point at a NaN block
    block_table = torch.full((len(lens), max_blocks), poison, dtype=torch.int32)
    k_cache = torch.full((num_blocks, page, h_kv, d), float("nan"))
    v_cache = torch.full((num_blocks, page, h_kv, d), float("nan"))
    used = 0
    for b, length in enumerate(lens):
        block_table[b, : nblk[b]] = perm[used : used + nblk[b]]
        used += nblk[b]
        for pos in range(length):
            blk, off = int(block_table[b, pos // page]), pos % page
            k_cache[blk, off] = torch.randn(h_kv, d, generator=g)
            v_cache[blk, off] = torch.randn(h_kv, d, generator=g)
    T = sum(ns)
    q = torch.randn(T, h, d, generator=g)
    q_start = torch.tensor([0] + list(torch.tensor(ns).cumsum(0).tolist()), dtype=torch.int32)
    tree_mask = None if causal else torch.cat([ancestor_mask(p) for p in parents])
    case = dict(q=q.to(dtype), k_cache=k_cache.to(dtype), v_cache=v_cache.to(dtype),
                block_table=block_table, seq_lens=torch.tensor(lens, dtype=torch.int32),
                q_start=q_start, tree_mask=tree_mask)
    return dict({k: v if v is None else v.to(DEVICE) for k, v in case.items()}, scale=d ** -0.5)


def check(case, **kwargs):
    out = va.verify_attention(**case, **kwargs)
    want = ref.verify_attention(**case)
    assert out.shape == want.shape and out.dtype == want.dtype
    assert not out.isnan().any()
    torch.testing.assert_close(out, want, **TOL[case["q"].dtype])
    return out


# --------------------------------------------------------------------------- attention


@pytest.mark.parametrize("causal", [False, True], ids=["tree", "causal"])
@pytest.mark.parametrize("prefix", [0, 1, 15, 16, 17, 126, 127, 300])
def test_prefix_lengths_around_block_boundaries(prefix, causal):
    check(make_case([prefix], [random_tree(7, prefix) if not causal else 7],
                    causal=causal, seed=prefix))


@pytest.mark.parametrize("causal", [False, True], ids=["tree", "causal"])
def test_ragged_batch(causal):
    prefixes = [0, 1, 15, 16, 17, 45, 260]
    trees = [random_tree(n, n) for n in (3, 1, 9, 16, 5, 12, 8)]
    out = check(make_case(prefixes, trees, causal=causal, seed=1), max_query_len=16)
    # an overestimated bound only adds programs that exit at once
    again = va.verify_attention(**make_case(prefixes, trees, causal=causal, seed=1),
                                max_query_len=40)
    torch.testing.assert_close(again, out, atol=0, rtol=0)


@pytest.mark.parametrize("shape", ["chain", "star", "deep", "wide", "random", "forest"])
def test_tree_shapes(shape):
    make = dict(chain=chain, star=star, deep=deep, wide=wide,
                random=lambda n: random_tree(n, 7), forest=lambda n: random_forest(n, 7))[shape]
    check(make_case([5, 40], [make(13), make(30)], seed=2))


def test_64_node_tree_uses_bit_63():
    parents = random_tree(64, 3)
    parents[63] = 62  # the last node has every earlier spine node
    case = make_case([20], [parents], seed=3)
    assert (case["tree_mask"] < 0).any()  # bit 63 set
    check(case, max_query_len=64)


@pytest.mark.parametrize("d", [8, 64, 128])
@pytest.mark.parametrize("group", [1, 2, 3, 4, 8])
def test_gqa_groups_and_head_dims(group, d):
    h_kv = 2
    check(make_case([0, 17, 33], [random_tree(5, group), chain(8), star(6)],
                    h=h_kv * group, h_kv=h_kv, d=d, seed=group * d))


@pytest.mark.parametrize("causal", [False, True], ids=["tree", "causal"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16],
                         ids=lambda t: str(t).split(".")[-1])
def test_dtypes(dtype, causal):
    check(make_case([0, 31, 70], [random_tree(9, 4), chain(4), wide(11)],
                    dtype=dtype, h=8, h_kv=2, d=64, causal=causal, seed=4))


@pytest.mark.parametrize("page", [1, 8, 32])
def test_page_sizes(page):
    check(make_case([3, 41], [random_tree(6, 5), chain(3)], page=page, seed=5))


def test_prefill_long_causal_chain():
    # > 64 new tokens: only the causal mask (tree_mask=None) can describe it
    check(make_case([0, 37], [200, 150], h=4, h_kv=2, d=64, causal=True, seed=6),
          max_query_len=200)


def test_prefill_thousands_of_tokens():
    check(make_case([0, 5], [2048, 700], h=1, h_kv=1, d=16, page=64, causal=True, seed=16),
          max_query_len=2048)


def test_decode_one_token_per_sequence():
    check(make_case([0, 16, 33, 150], [1, 1, 1, 1], h=8, h_kv=2, causal=True, seed=7),
          max_query_len=1)


def test_sequence_without_new_tokens_and_max_query_len_from_device():
    check(make_case([10, 20, 0], [chain(4), [], chain(3)], seed=8))  # reads q_start


def test_query_that_sees_nothing_gives_zeros():
    # no prefix; node 1 does not see itself (nor anything), node 2 only node 0
    case = make_case([0], [[-1, 0, 0]], seed=9)
    case["tree_mask"] = torch.tensor([0b001, 0b000, 0b001], dtype=torch.int64, device=DEVICE)
    out = check(case)
    assert torch.count_nonzero(out[1]) == 0
    assert torch.count_nonzero(out[0]) > 0


def test_strided_inputs():
    base = make_case([9, 30], [random_tree(7, 1), chain(5)], h=4, h_kv=2, d=64, seed=10)
    # q is a head slice of a wider tensor, K and V interleave in one buffer, the block
    # table is a column slice of a wider table
    T, h, d = base["q"].shape
    wide_q = torch.randn(T, 2 * h, d, device=DEVICE)
    wide_q[:, 1::2] = base["q"]
    kv = torch.stack([base["k_cache"], base["v_cache"]], dim=2)  # [nb, page, 2, H_kv, D]
    bt = torch.zeros(base["block_table"].shape[0], base["block_table"].shape[1] + 3,
                     dtype=torch.int32, device=DEVICE)
    bt[:, : base["block_table"].shape[1]] = base["block_table"]
    case = dict(base, q=wide_q[:, 1::2], k_cache=kv[:, :, 0], v_cache=kv[:, :, 1],
                block_table=bt[:, : base["block_table"].shape[1]])
    assert not case["q"].is_contiguous() and not case["k_cache"].is_contiguous()
    assert not case["block_table"].is_contiguous()
    torch.testing.assert_close(va.verify_attention(**case), ref.verify_attention(**base),
                               **TOL[torch.float32])


@pytest.mark.parametrize("causal", [False, True], ids=["tree", "causal"])
def test_split_kv_and_small_tiles(causal):
    # several KV splits (one empty for the short sequence), 16-wide KV tiles that
    # straddle 8-slot pages, two query tiles per sequence
    case = make_case([0, 3, 130], [random_tree(10, 11), chain(2), wide(9)], page=8,
                     causal=causal, seed=11)
    cfg = policy.Config(block_m=16, block_n=16, num_warps=4, num_stages=1, num_splits=3)
    out = va._launch_attention(**case, max_query_len=10, cfg=cfg)
    torch.testing.assert_close(out, ref.verify_attention(**case), **TOL[torch.float32])


@pytest.mark.parametrize("causal", [False, True], ids=["forest", "causal"])
def test_unmasked_region_ends_at_tile_boundaries(causal):
    # 16-query tiles over 16-wide KV tiles, prefix + q0 + 1 at or next to a KV tile edge:
    # the unmasked loop must stop exactly where the tile's first query (causal) or the
    # prefix (tree) ends
    n = 40 if causal else 30
    trees = [n] * 5 if causal else [random_forest(n, s) for s in range(5)]
    case = make_case([14, 15, 16, 0, 30], trees, h=2, h_kv=2, causal=causal, seed=15)
    cfg = policy.Config(block_m=16, block_n=16, num_warps=4, num_stages=1)
    out = va._launch_attention(**case, max_query_len=n, cfg=cfg)
    torch.testing.assert_close(out, ref.verify_attention(**case), **TOL[torch.float32])


def test_split_kv_row_that_sees_nothing():
    case = make_case([0], [[-1, 0, 0]], seed=12)
    case["tree_mask"] = torch.tensor([0b001, 0b000, 0b011], dtype=torch.int64, device=DEVICE)
    cfg = policy.Config(block_m=16, block_n=16, num_warps=4, num_stages=1, num_splits=2)
    out = va._launch_attention(**case, max_query_len=3, cfg=cfg)
    assert not out.isnan().any() and torch.count_nonzero(out[1]) == 0
    torch.testing.assert_close(out, ref.verify_attention(**case), **TOL[torch.float32])


def _pretend_gpu(monkeypatch, sms=132, arch=90):
    monkeypatch.setattr(policy, "interpreting", lambda: False)
    monkeypatch.setattr(policy, "gpu_of_device", lambda device: policy.Gpu(sms, arch))
    return torch.device("cuda")


def test_gpu_config_choice(monkeypatch):
    # the GPU branch of the policy, on a pretend H100/H200 (132 SMs, sm_90)
    cuda = _pretend_gpu(monkeypatch)
    # headline tree: B=8, 32/8 heads, D=128, 64 nodes over a 4,096 prefix: 128-row tiles
    # (32 queries x 4 heads), so each KV head's K/V is streamed by 2 tiles, and 2 KV
    # splits fill 2 CTAs on each SM
    head = policy.pick_config(8, 8, 4, 128, 64, 4160, torch.bfloat16, cuda)
    assert head.block_m == 128 and math.ceil(64 * 4 / head.block_m) <= 2
    programs = 8 * 8 * math.ceil(64 * 4 / head.block_m)
    assert head.num_splits == 2 and programs * head.num_splits <= 2 * 132
    # decode at B=1 over 4,096 positions: >= 64 programs through KV splits
    decode = policy.pick_config(1, 8, 4, 128, 1, 4097, torch.bfloat16, cuda)
    assert decode.block_m == 16 and 8 * decode.num_splits >= 64
    assert decode.num_splits * 2 * decode.block_n <= 4097  # each split streams >= 2 tiles
    assert policy.pick_config(1, 8, 4, 128, 1, None, torch.bfloat16, cuda).num_splits == 1
    # a short sequence is not split below two KV tiles per split
    assert policy.pick_config(1, 8, 4, 128, 1, 100, torch.bfloat16, cuda).num_splits == 1
    # a grid that fills the GPU is not split
    assert policy.pick_config(64, 8, 4, 128, 64, 4160, torch.bfloat16, cuda).num_splits == 1
    mqa = policy.pick_config(2, 1, 64, 64, 1, None, torch.float16, cuda)
    assert mqa.block_m >= 64  # a tile holds at least one query's whole GQA group
    assert policy.pick_config(1, 8, 4, 128, 2048, None, torch.bfloat16, cuda).block_m == 128
    # float32: small tiles (no spills); head_dim 256: 128 rows on sm_90
    fp32 = policy.pick_config(8, 8, 4, 128, 64, 4160, torch.float32, cuda)
    assert fp32.block_m <= 32 and fp32.block_n == 16
    assert policy.pick_config(8, 8, 4, 256, 64, 4160, torch.float32, cuda).block_m == 16
    assert policy.pick_config(8, 4, 4, 256, 64, None, torch.float16, cuda).block_m == 128


def test_gpu_config_choice_on_sm80(monkeypatch):
    cuda = _pretend_gpu(monkeypatch, sms=108, arch=80)
    head = policy.pick_config(8, 8, 4, 128, 64, 4160, torch.bfloat16, cuda)
    assert head.block_m == 128 and head.block_n == 32  # mma.sync: narrower KV tiles
    assert policy.pick_config(8, 4, 4, 256, 64, None, torch.float16, cuda).block_m == 64


def test_float32_attention_refused_on_a_gpu_where_it_would_spill(monkeypatch):
    cuda = _pretend_gpu(monkeypatch)
    policy.check_gpu_support(torch.float32, 128, 32, cuda)  # 32 x 16 tiles: allowed
    policy.check_gpu_support(torch.float32, 256, 16, cuda)  # 16 x 16 tiles: allowed
    policy.check_gpu_support(torch.bfloat16, 256, 64, cuda)
    with pytest.raises(ValueError, match="at most 16 query heads per KV head at head_dim 256"):
        policy.check_gpu_support(torch.float32, 256, 32, cuda)
    with pytest.raises(ValueError, match="at most 32 query heads per KV head at head_dim 64"):
        policy.check_gpu_support(torch.float32, 64, 64, cuda)
    # through the launcher: refused before any work (the CPU tensors are never touched)
    q, kc = torch.empty(2, 64, 64), torch.empty(4, 16, 1, 64)
    bt = torch.zeros(1, 1, dtype=torch.int32)
    with pytest.raises(ValueError, match="float32 attention on a GPU"):
        va.verify_attention(q, kc, kc, bt, torch.tensor([2], dtype=torch.int32),
                            torch.tensor([0, 2], dtype=torch.int32), None, 0.125, max_query_len=2)


def _policy_configs() -> list:
    """Every tile config the GPU policy can choose, over dtypes, head dims, groups, archs."""
    out = []
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        for d in (64, 128, 256):
            for group in (1, 4, 8):
                for arch in (80, 90):
                    for cfg in policy.policy_tiles(dtype, d, group, arch):
                        if cfg not in out:
                            out.append(cfg)
    return out


POLICY = _policy_configs()


def test_policy_configs_are_enumerated():
    # the list the parity test below forces covers every tile size the policy names
    assert {c.block_m for c in POLICY} == {16, 32, 64, 128}
    assert {c.block_n for c in POLICY} == {16, 32, 64}


@pytest.mark.parametrize("causal,splits", [(False, 3), (True, 1)], ids=["tree-split", "causal"])
@pytest.mark.parametrize("cfg", POLICY, ids=lambda c: f"m{c.block_m}n{c.block_n}w{c.num_warps}s{c.num_stages}")
def test_every_policy_config_matches_the_reference(cfg, causal, splits):
    # forced through the public launcher (the interpreter's own config covers tree without
    # splits, test_split_kv_and_small_tiles causal with them): two query tiles for the long sequence at the
    # smaller tiles, a short sequence whose later splits are empty, a page of 8 so KV
    # tiles straddle pages
    trees = [20, 3, 9] if causal else [random_forest(20, 1), chain(3), wide(9)]
    case = make_case([0, 5, 70], trees, h=4, h_kv=2, d=16, page=8, causal=causal, seed=17)
    with policy.forcing(policy.dataclasses.replace(cfg, num_splits=splits)):
        check(case, max_query_len=20, max_seq_len=79)


def test_many_splits_most_of_them_empty():
    case = make_case([0, 2, 40], [random_tree(5, 3), chain(1), wide(7)], seed=18)
    cfg = policy.Config(block_m=16, block_n=16, num_warps=4, num_stages=1, num_splits=policy.MAX_SPLITS)
    with policy.forcing(cfg):
        check(case, max_query_len=7, max_seq_len=47)


# --------------------------------------------------------------------------- validation


def _valid():
    return make_case([3], [chain(2)], h=4, h_kv=2, d=16, seed=13)


def _bad(**changes):
    case = _valid()
    for key, fn in changes.items():
        case[key] = fn(case)
    return case


@pytest.mark.parametrize("case,kwargs,match", [
    (_bad(q=lambda c: c["q"][0]), {}, r"q must be \[T, H, D\], got shape \(4, 16\)"),
    (_bad(v_cache=lambda c: c["v_cache"][:, :8]), {},
     r"k_cache has shape \(4, 16, 2, 16\) but v_cache has \(4, 8, 2, 16\)"),
    (_bad(q=lambda c: c["q"][:, :3]), {}, r"q has 3 heads.*not a multiple.*2 KV heads"),
    (_bad(q=lambda c: c["q"][..., :8]), {}, r"q has head_dim 8.*k_cache has 16"),
    (_bad(q_start=lambda c: c["q_start"][:1]), {}, r"q_start must have shape \(2,\)"),
    (_bad(seq_lens=lambda c: c["seq_lens"].repeat(2)), {}, r"seq_lens must have shape \(1,\)"),
    (_bad(tree_mask=lambda c: c["tree_mask"].int()), {}, r"tree_mask must be torch.int64"),
    (_bad(tree_mask=lambda c: c["tree_mask"][:1]), {}, r"tree_mask must have shape \(2,\)"),
    (_bad(block_table=lambda c: c["block_table"].long()), {},
     r"block_table must be torch.int32"),
    (_bad(q=lambda c: c["q"].half()), {}, r"q is torch.float16 but k_cache"),
    (_bad(v_cache=lambda c: c["v_cache"].half()), {},
     r"k_cache is torch.float32 but v_cache is torch.float16"),
    (_bad(q=lambda c: torch.randn(2, 4, 32)[..., ::2]), {}, r"q must have stride 1"),
    (_bad(k_cache=lambda c: torch.randn(4, 16, 2, 32)[..., ::2],
          v_cache=lambda c: torch.randn(4, 16, 2, 32)[..., ::2]), {},
     r"k_cache must have stride 1"),
    (_bad(q=lambda c: torch.empty(2, 4, 16, device="meta")), {},
     r"k_cache is on \w+(:\d)? but q is on meta"),
    (_bad(scale=lambda c: float("nan")), {}, r"scale must be a finite float"),
    (_valid(), dict(max_query_len=-1), r"max_query_len must be None or an int >= 0"),
    (_valid(), dict(max_query_len=0), r"q has 2 rows but max_query_len is 0"),
])
def test_attention_validation(case, kwargs, match):
    with pytest.raises(ValueError, match=match):
        va.verify_attention(**case, **kwargs)


def test_tree_too_large_but_causal_is_fine():
    case = make_case([0], [70], causal=True, seed=14)
    check(case, max_query_len=70)
    case["tree_mask"] = torch.zeros(70, dtype=torch.int64, device=DEVICE)
    with pytest.raises(ValueError, match="tree_mask holds 64 nodes"):
        va.verify_attention(**case)


@pytest.mark.skipif(DEVICE == "cuda", reason="the examples run CPU tensors through the interpreter")
def test_docstring_examples():
    import doctest

    result = doctest.testmod(va, optionflags=doctest.ELLIPSIS)
    assert result.attempted >= 3 and result.failed == 0


# --------------------------------------------------------------------------- engine batches


def test_eager_batches_pass_the_longest_sequence_as_the_split_hint(monkeypatch):
    # the eager engine path (prefill, chains, trees, drafter steps) hands attention the
    # host-known longest sequence, so decode at B=1 over 4,096 positions fills the GPU
    from specdec.batch import build_forward_batch, build_tree_batch
    from specdec.kv_cache import BlockManager

    blocks = BlockManager(num_blocks=600, block_size=16)
    blocks.allocate(0, 4200)
    blocks.allocate(1, 300)
    tokens = torch.zeros(6, dtype=torch.int64)
    chain_batch = build_forward_batch(blocks, [0, 1], [4096, 200], [1, 5], [1, 5], tokens, "cpu")
    assert chain_batch.max_seq_len == 4097 and chain_batch.max_query_len == 5
    tree_batch = build_tree_batch(blocks, [0, 1], [4095, 100], [[-1, 0], [-1]], torch.zeros(5, dtype=torch.int64),
                                  "cpu")
    assert tree_batch.max_seq_len == 4098
    cuda = _pretend_gpu(monkeypatch)
    decode = policy.pick_config(1, 8, 4, 128, 1, chain_batch.max_seq_len, torch.bfloat16, cuda)
    assert 8 * decode.num_splits >= 64


# --------------------------------------------------------------------------- sliding window, soft-capping
#
# Windows W around the query positions: 1 (only itself), 5 (< a 16-slot page and < a
# KV tile), 37 (a prefix that straddles the window edge). The caches keep every
# position (NaN only where nobody wrote), so a key outside a window that the kernel
# reads anyway changes the output and the comparison fails.

WINDOW_KINDS = {
    # prefixes, trees, causal, max_query_len
    "prefill": ([0, 50], [70, 40], True, 70),
    "decode": ([3, 40, 90], [1, 1, 1], True, 1),
    "chain": ([20, 44], [6, 9], True, 9),
    "tree": ([10, 45], [random_tree(12, 21), deep(16)], False, 16),
}


def check_window(case, window, softcap, **kwargs):
    extra = dict(sliding_window=window, softcap=softcap)
    out = va.verify_attention(**case, **extra, **kwargs)
    want = ref.verify_attention(**case, **extra)
    assert not out.isnan().any()
    torch.testing.assert_close(out, want, **TOL[case["q"].dtype])
    return out, want


@pytest.mark.parametrize("softcap", [None, 2.5], ids=["nocap", "cap"])
@pytest.mark.parametrize("window", [1, 5, 37])
@pytest.mark.parametrize("kind", list(WINDOW_KINDS))
def test_sliding_window_and_softcap_match_the_reference(kind, window, softcap):
    prefixes, trees, causal, mql = WINDOW_KINDS[kind]
    case = make_case(prefixes, trees, causal=causal, h=4, h_kv=2, d=16, seed=window)
    out, want = check_window(case, window, softcap, max_query_len=mql)
    # the window (or the cap) did change something: the test can fail
    plain = ref.verify_attention(**case)
    assert not torch.allclose(want, plain, atol=1e-3)


def test_tree_nodes_at_the_window_edge():
    # a 12-deep spine with side branches: with W = 4 node i sees exactly its 3 nearest
    # ancestors and itself (positions prefix + depth), none of the prefix
    parents = deep(20)
    case = make_case([3], [parents], h=2, h_kv=1, d=16, seed=31)
    for window in (3, 4, 5, 12):
        check_window(case, window, None, max_query_len=20)


def test_reference_window_tree_of_a_chain_is_the_causal_window():
    tree = make_case([9, 30], [chain(7), chain(12)], h=2, h_kv=1, d=16, seed=32)
    causal = dict(tree, tree_mask=None)
    for window in (1, 4, 13):
        torch.testing.assert_close(ref.verify_attention(**tree, sliding_window=window),
                                   ref.verify_attention(**causal, sliding_window=window), atol=0, rtol=0)


def test_reference_window_is_a_band():
    # decode at position p with W: attention over keys (p - W, p] only, the textbook way
    case = make_case([40], [1], causal=True, h=1, h_kv=1, d=16, seed=33)
    window, p = 7, 40
    out = ref.verify_attention(**case, sliding_window=window)
    slots = ref._slots_of(case["block_table"][0], p + 1, case["k_cache"].shape[1])
    k = case["k_cache"].reshape(-1, 1, 16)[slots][p - window + 1:, 0]  # [W, D]
    v = case["v_cache"].reshape(-1, 1, 16)[slots][p - window + 1:, 0]
    probs = torch.softmax(case["q"][0, 0] @ k.T * case["scale"], -1)
    torch.testing.assert_close(out[0, 0], probs @ v, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("causal", [False, True], ids=["tree", "causal"])
def test_sliding_window_with_split_kv_and_small_tiles(causal):
    # 16-wide KV tiles over 8-slot pages, 3 splits of the windowed range, W = 20
    # (not a multiple of the tile), two query tiles per sequence
    case = make_case([0, 3, 130], [random_tree(10, 11), chain(2), wide(9)], page=8,
                     causal=causal, seed=34)
    cfg = policy.Config(block_m=16, block_n=16, num_warps=4, num_stages=1, num_splits=3)
    for window, cap in ((20, None), (3, 1.5)):
        out = va._launch_attention(**case, max_query_len=10, cfg=cfg, sliding_window=window, softcap=cap)
        want = ref.verify_attention(**case, sliding_window=window, softcap=cap)
        torch.testing.assert_close(out, want, **TOL[torch.float32])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_sliding_window_half_precision(dtype):
    case = make_case([30, 5], [random_tree(9, 4), chain(6)], dtype=dtype, h=4, h_kv=2, d=64, seed=35)
    check_window(case, 11, 30.0, max_query_len=9)


@pytest.mark.parametrize("kwargs, match", [
    (dict(sliding_window=0), "sliding_window must be None or an integer >= 1, got 0"),
    (dict(sliding_window=4.0), "sliding_window must be None or an integer >= 1"),
    (dict(softcap=0.0), "softcap must be None or a finite float > 0, got 0.0"),
    (dict(softcap=float("inf")), "softcap must be None or a finite float > 0"),
])
@pytest.mark.parametrize("impl", [ref.verify_attention, va.verify_attention], ids=["reference", "triton"])
def test_window_validation(impl, kwargs, match):
    case = make_case([3], [2], causal=True, h=2, h_kv=1, d=16)
    with pytest.raises(ValueError, match=match):
        impl(**case, **kwargs)
