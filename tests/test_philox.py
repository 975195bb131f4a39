"""The torch Philox against Triton's tl.rand, its uniformity, and inverse-CDF sampling."""

import pytest
import torch
import triton
import triton.language as tl

from stats import chi_square_pvalue

from specdec.kernels.philox import (
    FIRST_FREE_STREAM,
    MAX_DRAWS,
    philox_uniform,
    sample_inverse_cdf,
)


@triton.jit
def _tl_rand_kernel(seed_ptr, offset_ptr, out_ptr, n, stream, BLOCK: tl.constexpr):
    # the counter layout documented in specdec/kernels/philox.py
    r = tl.program_id(0)
    seed = tl.load(seed_ptr + r)
    offset = tl.load(offset_ptr + r)
    j = tl.arange(0, BLOCK).to(tl.int64)
    # stream is an int32 argument: widen before shifting, 255 << 24 overflows int32
    u = tl.rand(seed, (offset << 32) + (tl.cast(stream, tl.int64) << 24) + j)
    tl.store(out_ptr + r * n + j, u, mask=j < n)


@triton.jit
def _tl_rand_scalar_kernel(seed_ptr, offset_ptr, out_ptr, stream, j):
    # a scalar counter, the way the rejection kernel draws one uniform
    r = tl.program_id(0)
    seed = tl.load(seed_ptr + r)
    offset = tl.load(offset_ptr + r)
    tl.store(out_ptr + r, tl.rand(seed, (offset << 32) + (tl.cast(stream, tl.int64) << 24) + j))


SEEDS = torch.tensor([0, 1, -1, 2**62 + 12345, -(2**63), 987654321, 42], dtype=torch.int64)
OFFSETS = torch.tensor([0, 5, 2**32 + 7, -3, 2**40, 123, 2**31], dtype=torch.int64)


# with CUDA, tl.rand runs compiled on the GPU and the torch Philox runs there too
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("stream,n", [(0, 1), (1, 300), (16, 1000), (255, 17)])
def test_matches_tl_rand_bit_for_bit(stream, n):
    seeds, offsets = SEEDS.to(DEVICE), OFFSETS.to(DEVICE)
    out = torch.full((len(SEEDS), n), -1.0, device=DEVICE)
    _tl_rand_kernel[(len(SEEDS),)](seeds, offsets, out, n, stream, BLOCK=triton.next_power_of_2(n))
    ref = philox_uniform(SEEDS, OFFSETS, n, stream=stream)  # on the CPU
    assert torch.equal(out.cpu().view(torch.int32), ref.view(torch.int32))
    here = philox_uniform(seeds, offsets, n, stream=stream)  # the same on DEVICE
    assert torch.equal(here.cpu().view(torch.int32), ref.view(torch.int32))


def test_scalar_counter_matches():
    out = torch.zeros(len(SEEDS), device=DEVICE)
    _tl_rand_scalar_kernel[(len(SEEDS),)](SEEDS.to(DEVICE), OFFSETS.to(DEVICE), out, 1, 5)
    ref = philox_uniform(SEEDS, OFFSETS, 6, stream=1)[:, 5]
    assert torch.equal(out.cpu().view(torch.int32), ref.view(torch.int32))


def test_rows_do_not_depend_on_batch_position():
    full = philox_uniform(SEEDS, OFFSETS, 64, stream=3)
    for r in [0, 3, 6]:
        alone = philox_uniform(SEEDS[r : r + 1], OFFSETS[r : r + 1], 64, stream=3)
        assert torch.equal(alone[0], full[r])
    shuffled = torch.randperm(len(SEEDS), generator=torch.Generator().manual_seed(0))
    assert torch.equal(philox_uniform(SEEDS[shuffled], OFFSETS[shuffled], 64, 3), full[shuffled])


def test_streams_offsets_and_seeds_give_different_draws():
    seed = torch.tensor([9], dtype=torch.int64)
    off = torch.tensor([4], dtype=torch.int64)
    a = philox_uniform(seed, off, 256, stream=0)
    assert not torch.equal(a, philox_uniform(seed, off, 256, stream=1))
    assert not torch.equal(a, philox_uniform(seed, off + 1, 256, stream=0))
    assert not torch.equal(a, philox_uniform(seed + 1, off, 256, stream=0))
    # draw j of a longer request is the same draw j
    assert torch.equal(a[:, :10], philox_uniform(seed, off, 10, stream=0))


def test_uniform_range_and_extreme_word():
    from specdec.kernels.philox import _uint32_to_uniform

    words = torch.tensor([0, 1, 2**31 - 1, 2**31, 2**32 - 1], dtype=torch.int64)
    u = _uint32_to_uniform(words)
    assert float(u.max()) < 1.0 and float(u.min()) == 0.0


def test_uniform_scale_is_a_float32_multiply():
    # the scale is a Python float (no host tensor inside a CUDA-graph step); the product
    # must stay bit-identical to float32 word x float32(scale), Triton's definition
    from specdec.kernels.philox import _UNIFORM_SCALE, _uint32_to_uniform

    g = torch.Generator().manual_seed(0)
    words = torch.cat([torch.randint(0, 2**32, (1 << 16,), generator=g, dtype=torch.int64),
                       torch.tensor([0, 1, 2**24, 2**24 + 1, 2**31 - 2, 2**31 - 1, 2**31,
                                     2**31 + 1, 2**32 - 1], dtype=torch.int64)])
    signed = torch.where(words >= 2**31, words - 2**32, words)
    folded = torch.where(signed < 0, -signed - 1, signed).to(torch.float32)
    want = folded * torch.tensor(_UNIFORM_SCALE, dtype=torch.float32)
    got = _uint32_to_uniform(words)
    assert got.dtype == torch.float32
    assert torch.equal(got.view(torch.int32), want.view(torch.int32))


def _uniform_chi_square(u: torch.Tensor, bins: int = 100) -> float:
    counts = torch.histc(u.double(), bins=bins, min=0.0, max=1.0)
    return chi_square_pvalue(counts, torch.full((bins,), u.numel() / bins))


def test_uniforms_look_uniform():
    # 256 sequences x 1024 draws over consecutive offsets and seeds, as the engine uses them
    seeds = torch.arange(256, dtype=torch.int64) * 7919
    offsets = torch.arange(256, dtype=torch.int64)
    u = philox_uniform(seeds, offsets, 1024, stream=FIRST_FREE_STREAM).flatten()
    assert _uniform_chi_square(u) > 1e-3
    # Kolmogorov-Smirnov statistic; 1.95 / sqrt(n) is the 0.1% critical value
    s, _ = torch.sort(u.double())
    n = s.numel()
    ecdf = torch.arange(1, n + 1, dtype=torch.float64) / n
    d = torch.maximum(ecdf - s, s - (ecdf - 1.0 / n)).max()
    assert float(d) < 1.95 / n**0.5
    # one uniform per row across offsets (the drafter's use): also uniform
    one = philox_uniform(torch.full((20000,), 5, dtype=torch.int64), torch.arange(20000), 1, 16)
    assert _uniform_chi_square(one.flatten(), bins=20) > 1e-3
    # neighbouring draws are uncorrelated
    pairs = philox_uniform(seeds, offsets, 2, stream=0)
    corr = torch.corrcoef(pairs.T.double())[0, 1]
    assert abs(float(corr)) < 0.25


def test_uniform_check_rejects_a_biased_generator():
    seeds = torch.arange(256, dtype=torch.int64)
    u = philox_uniform(seeds, seeds, 1024, stream=0).flatten()
    assert _uniform_chi_square(u**1.02) < 1e-6


def test_philox_validation():
    s = torch.zeros(3, dtype=torch.int64)
    with pytest.raises(ValueError, match=r"\(3,\) and \(2,\)"):
        philox_uniform(s, s[:2], 4)
    with pytest.raises(ValueError, match="int64"):
        philox_uniform(s.int(), s, 4)
    with pytest.raises(ValueError, match="stream"):
        philox_uniform(s, s, 4, stream=256)
    with pytest.raises(ValueError, match="n must be"):
        philox_uniform(s, s, MAX_DRAWS + 1)


# -- inverse-CDF sampling --


def test_inverse_cdf_exact_cases():
    probs = torch.tensor([[0.0, 0.25, 0.0, 0.75], [0.5, 0.5, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    u = torch.tensor([0.25, 0.0, 0.5])
    # 0.25 * 1 = 0.25 is not exceeded by cum[1] = 0.25, so token 3
    assert sample_inverse_cdf(probs, u).tolist() == [3, 0, -1]
    # the largest uniform below 1 lands on the last positive entry, never on a zero after it
    top = torch.tensor([1.0 - 2**-24] * 3)
    assert sample_inverse_cdf(probs, top).tolist() == [3, 1, -1]


def test_inverse_cdf_rounding_at_the_end_never_picks_zero_mass():
    # many tiny entries: the float cumsum can end below u * total's rounding
    g = torch.Generator().manual_seed(1)
    probs = torch.rand(64, 5003, generator=g) * (torch.rand(64, 5003, generator=g) < 0.3)
    probs[:, -7:] = 0.0
    u = torch.full((64,), 1.0 - 2**-24)
    idx = sample_inverse_cdf(probs, u)
    assert bool((probs.gather(1, idx[:, None]) > 0).all())
    u = torch.rand(64, generator=g)
    idx = sample_inverse_cdf(probs, u)
    assert bool((probs.gather(1, idx[:, None]) > 0).all())


def test_inverse_cdf_distribution():
    p = torch.tensor([0.1, 0.0, 0.45, 0.05, 0.4])
    n = 20000
    u = philox_uniform(torch.full((n,), 3, dtype=torch.int64), torch.arange(n), 1, 16)[:, 0]
    tok = sample_inverse_cdf(p.expand(n, 5) * 3.0, u)  # unnormalised rows are fine
    counts = torch.bincount(tok, minlength=5)
    assert counts[1] == 0
    assert chi_square_pvalue(counts, p * n) > 1e-3
    # the same test rejects a sampler with the wrong distribution
    wrong = sample_inverse_cdf(torch.tensor([0.15, 0.0, 0.4, 0.05, 0.4]).expand(n, 5), u)
    assert chi_square_pvalue(torch.bincount(wrong, minlength=5), p * n) < 1e-6
