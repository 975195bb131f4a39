"""write_kv / move_kv (Triton) against the PyTorch reference (the torch backend's ops).

On CPU the Triton path runs through Triton's interpreter; the caches stay small. Every
comparison is exact (atol=0): the ops copy values, casting only to the cache's dtype.
"""

from __future__ import annotations

import pytest
import torch

from specdec.kernels import kv_cache_ops as kv_ops
from specdec.kernels import reference as ref


def _cache(num_blocks=5, page=16, h_kv=2, d=64, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(num_blocks, page, h_kv, d, generator=g).to(dtype),
            torch.randn(num_blocks, page, h_kv, d, generator=g).to(dtype))


@pytest.mark.parametrize("src_dtype,cache_dtype,d", [
    (torch.float32, torch.float32, 64), (torch.float32, torch.bfloat16, 8),
    (torch.float16, torch.float16, 128), (torch.bfloat16, torch.bfloat16, 64)])
def test_write_kv_matches_reference(src_dtype, cache_dtype, d):
    k_cache, v_cache = _cache(d=d, dtype=cache_dtype)
    g = torch.Generator().manual_seed(1)
    k = torch.randn(9, 2, d, generator=g).to(src_dtype)
    v = torch.randn(9, 2, d, generator=g).to(src_dtype)
    slots = torch.randperm(80, generator=g)[:9].to(torch.int32)
    want_k, want_v = k_cache.clone(), v_cache.clone()
    ref.write_kv(k, v, want_k, want_v, slots.long())
    kv_ops.write_kv(k, v, k_cache, v_cache, slots)
    torch.testing.assert_close(k_cache, want_k, atol=0, rtol=0)
    torch.testing.assert_close(v_cache, want_v, atol=0, rtol=0)


def test_write_kv_into_strided_cache():
    kv = torch.zeros(4, 8, 2, 3, 16)  # K and V interleaved: [nb, page, 2, H_kv, D]
    k_cache, v_cache = kv[:, :, 0], kv[:, :, 1]
    k, v = torch.randn(5, 3, 16), torch.randn(5, 3, 16)
    slots = torch.tensor([31, 0, 9, 17, 8])
    want_k, want_v = k_cache.clone(), v_cache.clone()
    ref.write_kv(k, v, want_k, want_v, slots)
    kv_ops.write_kv(k, v, k_cache, v_cache, slots)
    torch.testing.assert_close(k_cache, want_k, atol=0, rtol=0)
    torch.testing.assert_close(v_cache, want_v, atol=0, rtol=0)


def test_write_kv_triton_skips_padding_slots():
    k_cache, v_cache = _cache()
    before = k_cache.clone()
    k, v = torch.ones(3, 2, 64), torch.ones(3, 2, 64)
    kv_ops.write_kv(k, v, k_cache, v_cache, torch.tensor([-1, 4, 10**6]))
    assert torch.equal(k_cache.view(-1, 2, 64)[4], k[1])
    k_cache.view(-1, 2, 64)[4] = before.view(-1, 2, 64)[4]
    assert torch.equal(k_cache, before)


@pytest.mark.parametrize("moves", [
    "shift_down", "shift_up", "keep_path", "swap", "disjoint"])
def test_move_kv_matches_reference(moves):
    # shift_up and swap read slots that other moves write: correct only when every
    # source is read before any destination is written
    src, dst = {
        "shift_down": (list(range(10, 40)), list(range(9, 39))),
        "shift_up": (list(range(9, 39)), list(range(10, 40))),
        "keep_path": ([35, 36, 40, 47], [33, 34, 35, 36]),
        "swap": ([1, 2, 70], [2, 1, 3]),
        "disjoint": ([0, 5, 63], [64, 65, 79]),
    }[moves]
    k_cache, v_cache = _cache(d=8, seed=3)
    want_k, want_v = k_cache.clone(), v_cache.clone()
    ref.move_kv(want_k, want_v, torch.tensor(src), torch.tensor(dst))
    kv_ops.move_kv(k_cache, v_cache, torch.tensor(src, dtype=torch.int32),
                   torch.tensor(dst, dtype=torch.int32))
    torch.testing.assert_close(k_cache, want_k, atol=0, rtol=0)
    torch.testing.assert_close(v_cache, want_v, atol=0, rtol=0)


def test_kv_write_validation():
    k_cache, v_cache = _cache(d=8)
    k = torch.randn(3, 2, 8)
    with pytest.raises(ValueError, match=r"k_cache has shape \(5, 16, 2, 8\) but v_cache"):
        kv_ops.write_kv(k, k, k_cache, v_cache[:, :, :1], torch.arange(3))
    with pytest.raises(ValueError, match=r"v must have shape \(3, 2, 8\)"):
        kv_ops.write_kv(k, k[:2], k_cache, v_cache, torch.arange(3))
    with pytest.raises(ValueError, match=r"slot_mapping has shape \(2,\) but k has 3 rows"):
        kv_ops.write_kv(k, k, k_cache, v_cache, torch.arange(2))
    with pytest.raises(ValueError, match=r"slot_mapping must be int32 or int64"):
        kv_ops.write_kv(k, k, k_cache, v_cache, torch.arange(3.0))
    with pytest.raises(ValueError, match=r"src_slots has shape \(3,\) but dst_slots has \(2,\)"):
        kv_ops.move_kv(k_cache, v_cache, torch.arange(3), torch.arange(2))


def test_docstring_examples():
    import doctest

    result = doctest.testmod(kv_ops, optionflags=doctest.ELLIPSIS)
    assert result.attempted >= 3 and result.failed == 0


def test_reference_move_kv_moves_every_layer_of_a_stacked_cache():
    # KVCache.keep_path passes [layers, num_blocks, block_size, H_kv, D]: each layer must
    # move exactly as a per-layer move would (overlapping shift, sources read first)
    g = torch.Generator().manual_seed(5)
    k, v = torch.randn(3, 4, 8, 2, 4, generator=g), torch.randn(3, 4, 8, 2, 4, generator=g)
    src, dst = torch.arange(9, 20), torch.arange(7, 18)
    want_k, want_v = k.clone(), v.clone()
    for layer in range(3):
        flat_k, flat_v = want_k[layer].view(-1, 2, 4), want_v[layer].view(-1, 2, 4)
        for s, d in sorted(zip(src.tolist(), dst.tolist(), strict=True)):  # ascending: a down-shift is safe
            flat_k[d], flat_v[d] = flat_k[s].clone(), flat_v[s].clone()
    ref.move_kv(k, v, src, dst)
    torch.testing.assert_close(k, want_k, atol=0, rtol=0)
    torch.testing.assert_close(v, want_v, atol=0, rtol=0)
