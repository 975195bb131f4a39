"""The fused draft sampler (``draft_sampling.draft_sample``) against ``reference.draft_sample``:
the same tokens (same Philox uniforms and inverse-CDF rule) and the same DraftDist, on
awkward inputs, and the distribution of its draws.

Small ``chunk`` values split tiny vocabularies over several programs, so the two-level
inverse CDF, the candidate merge and the radix fallback are exercised at interpreter cost.
"""

import pytest
import torch

from specdec.kernels import reference
from specdec.kernels._sampling_core import INT32_MIN
from specdec.kernels.draft_sampling import draft_sample
from stats import chi_square_pvalue

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
I32, I64 = torch.int32, torch.int64

pytestmark = [
    pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0"),
    pytest.mark.filterwarnings("ignore:invalid value encountered"),
    pytest.mark.filterwarnings("ignore:overflow encountered"),
]


def _rows(n, vocab, *, temperature, top_k, top_p, seed=0, scale=2.0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(n, vocab, generator=g) * scale).to(dtype)
    return (logits, torch.tensor(temperature, dtype=torch.float32), torch.tensor(top_k, dtype=I32),
            torch.tensor(top_p, dtype=torch.float32), torch.arange(n, dtype=I64) * 7919 + 3,
            torch.arange(n, dtype=I64) + 11)


def _both(args, stream=17, num_samples=1, first_draw=None, **kw):
    dev = tuple(a.to(DEVICE) for a in args)
    fd = None if first_draw is None else first_draw.to(DEVICE)
    tok, dist = draft_sample(*dev, stream, num_samples, fd, **kw)
    ref_tok, ref_dist = reference.draft_sample(*args, stream, num_samples, first_draw)
    return tok.cpu(), [t.cpu() for t in dist], ref_tok, ref_dist


def _assert_same(tok, dist, ref_tok, ref_dist, sampled):
    assert torch.equal(tok, ref_tok), (tok, ref_tok)
    inv_t, m, z, thr = dist[1:]
    assert torch.equal(inv_t, ref_dist.inv_t) and torch.equal(m[sampled], ref_dist.m[sampled])
    assert torch.equal(thr[sampled], ref_dist.thr[sampled])
    torch.testing.assert_close(z[sampled], ref_dist.z[sampled], rtol=2e-6, atol=0)


MIXED = dict(  # greedy, plain, top-k, top-p alone (radix), top-k > 64 + top-p (radix), both
    temperature=[0.0, 1.0, 0.7, 1.3, 1.0, 0.9],
    top_k=[5, 0, 10, 0, 100, 50],
    top_p=[0.5, 1.0, 1.0, 0.9, 0.8, 0.9],
)


@pytest.mark.parametrize("vocab,chunk", [(1000, 256), (777, 128), (7, None), (300, None)])
def test_agrees_with_reference(vocab, chunk):
    # 1000 = 3.9 chunks, 777 not a multiple of the chunk, 7 and 300 inside one chunk
    args = _rows(6, vocab, seed=vocab, **MIXED)
    first = torch.arange(6, dtype=I64) * 3
    tok, dist, ref_tok, ref_dist = _both(args, num_samples=3, first_draw=first, chunk=chunk)
    _assert_same(tok, dist, ref_tok, ref_dist, args[1] > 0)
    assert tok[0].tolist() == [int(args[0][0].argmax())] * 3  # greedy: the first argmax


def test_flat_rows_and_mass_in_one_chunk():
    # row 0: every logit equal (ties at every threshold); row 1: all mass in chunk 2;
    # row 2: a flat nucleus far wider than the candidates (radix top-p)
    vocab = 700
    logits = torch.zeros(3, vocab)
    logits[1] = -30.0
    logits[1, 300:310] = torch.linspace(0, 1, 10)
    logits[2] = torch.randn(vocab, generator=torch.Generator().manual_seed(1)) * 0.05
    args = (logits, torch.ones(3), torch.tensor([7, 0, 0], dtype=I32), torch.tensor([0.3, 0.95, 0.6]),
            torch.tensor([1, 2, 3], dtype=I64), torch.zeros(3, dtype=I64))
    tok, dist, ref_tok, ref_dist = _both(args, num_samples=4, chunk=128)
    _assert_same(tok, dist, ref_tok, ref_dist, torch.ones(3, dtype=torch.bool))
    assert bool(((tok[1] >= 300) & (tok[1] < 310)).all())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_logits(dtype):
    args = _rows(4, 500, seed=5, dtype=dtype, temperature=[1.0, 0.8, 0.0, 1.2], top_k=[0, 20, 0, 3],
                 top_p=[0.9, 1.0, 1.0, 0.7])
    tok, dist, ref_tok, ref_dist = _both(args, num_samples=2, chunk=128)
    _assert_same(tok, dist, ref_tok, ref_dist, args[1] > 0)
    assert dist[0].dtype == dtype  # q keeps the model's dtype: no fp32 copy


def test_top_p_one_is_off_beside_a_filtered_row():
    # a long flat row with top_p = 1 next to a filtered row: nothing of it is cut
    x = torch.randn(2, 50000, generator=torch.Generator().manual_seed(0)) * 3.0
    args = (x, torch.ones(2), torch.tensor([0, 5], dtype=I32), torch.tensor([1.0, 0.9]),
            torch.tensor([1, 2], dtype=I64), torch.zeros(2, dtype=I64))
    tok, dist, ref_tok, ref_dist = _both(args)
    assert dist[4][0] == INT32_MIN and ref_dist.thr[0] == INT32_MIN
    torch.testing.assert_close(dist[3][0], torch.exp(x[0] - x[0].max()).sum(), rtol=1e-5, atol=0)
    _assert_same(tok, dist, ref_tok, ref_dist, torch.ones(2, dtype=torch.bool))


# ------------------------------------------------------------------------------------
# distribution: rows of one distribution, many i.i.d. draws each
# ------------------------------------------------------------------------------------

LOGITS = torch.tensor([2.0, 1.5, 0.3, -0.5, -1.0, 1.5, 0.0, -2.0])
DRAWS = 3000 if DEVICE == "cuda" else 600


def _draws(temperature, top_k, top_p, n, rows=20):
    """n draws: ``rows`` rows (own offsets) of n / rows i.i.d. samples each (the tree
    drafter's children), so the interpreter runs few programs."""
    args = (LOGITS.expand(rows, -1).contiguous(), torch.full((rows,), temperature),
            torch.full((rows,), top_k, dtype=I32), torch.full((rows,), top_p),
            torch.full((rows,), 99, dtype=I64), torch.arange(rows, dtype=I64))
    tok, _ = draft_sample(*(a.to(DEVICE) for a in args), 16, n // rows)
    return torch.bincount(tok.flatten().cpu(), minlength=LOGITS.shape[0])


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 0, 1.0), (0.8, 4, 0.9), (1.3, 0, 0.7)])
def test_draws_follow_q(temperature, top_k, top_p):
    q = reference.sampling_probs(LOGITS[None], torch.tensor([temperature]),
                                 torch.tensor([top_k], dtype=I32), torch.tensor([top_p]))[0]
    counts = _draws(temperature, top_k, top_p, DRAWS)
    assert bool((counts[q == 0] == 0).all())
    assert chi_square_pvalue(counts, q * DRAWS) > 1e-3
    # the same test at this many draws rejects q without its top-p / temperature
    wrong = reference.sampling_probs(LOGITS[None], torch.tensor([1.0]), torch.tensor([top_k], dtype=I32),
                                     torch.tensor([1.0]))[0]
    if not torch.allclose(wrong, q):
        assert chi_square_pvalue(counts, wrong * DRAWS) < 1e-6


def test_validation():
    args = _rows(2, 50, temperature=[1.0, 1.0], top_k=[0, 0], top_p=[1.0, 1.0])
    with pytest.raises(ValueError, match="logits must be float32, float16 or bfloat16"):
        draft_sample(args[0].double(), *args[1:], 16)
    with pytest.raises(ValueError, match=r"top_k must have shape \(2,\)"):
        draft_sample(args[0], args[1], args[2][:1], *args[3:], 16)
    with pytest.raises(ValueError, match="stream must be an int"):
        draft_sample(*args, 256)
    with pytest.raises(ValueError, match="num_samples"):
        draft_sample(*args, 16, 0)
    with pytest.raises(ValueError, match="first_draw must be torch.int64"):
        draft_sample(*args, 16, 1, torch.zeros(2, dtype=I32))
