"""The PyTorch rejection sampler: exact cases, invariants, errors, and its distribution.

The helpers at the top (batch builders, exact outcome distributions, chi-square) are
shared with tests/test_rejection_sampling.py, which runs the same checks on the kernel.
"""

import math

import pytest
import torch

from specdec.kernels._sampling_core import INT32_MIN, DraftDist
from specdec.kernels.philox import FIRST_FREE_STREAM, philox_uniform, sample_inverse_cdf
from specdec.kernels.reference import draft_dist, draft_dist_probs, rejection_sample, sampling_probs
from test_philox import chi_square_pvalue

# ------------------------------------------------------------------------------------
# shared helpers
# ------------------------------------------------------------------------------------


def dist_of_probs(probs: torch.Tensor) -> DraftDist:
    """A DraftDist whose q is ``probs`` ([n, V] float32, rows summing to 1): logits log q."""
    logits = probs.float().log()
    m = logits.amax(-1)
    n = probs.shape[0]
    return DraftDist(logits, torch.ones(n), m, torch.exp(logits - m[:, None]).sum(-1),
                     torch.full((n,), INT32_MIN, dtype=torch.int32))


def unfiltered_dist(logits: torch.Tensor) -> DraftDist:
    """The DraftDist of softmax(logits) (T = 1, nothing filtered)."""
    n = logits.shape[0]
    return draft_dist(logits, torch.ones(n), torch.zeros(n, dtype=torch.int32), torch.ones(n))


def ragged_batch(lengths, vocab, *, has_q=True, temperature=1.0, top_k=0, top_p=1.0,
                 dtype=torch.float32, seed=0, scale=2.0):
    """Random inputs for ``rejection_sample``; per-sequence params may be lists.

    Drafts are sampled from q (or uniformly for a point-mass drafter), so about half
    are accepted. Returns the positional argument tuple.
    """
    g = torch.Generator().manual_seed(seed)
    batch = len(lengths)
    cu = torch.tensor([0] + list(torch.tensor(lengths).cumsum(0).tolist()), dtype=torch.int32)
    n_draft = int(cu[-1])
    logits = (torch.randn(n_draft + batch, vocab, generator=g) * scale).to(dtype)
    if has_q:
        q = unfiltered_dist((torch.randn(n_draft, vocab, generator=g) * scale).to(dtype))
        ids = (torch.multinomial(draft_dist_probs(q), 1, generator=g)[:, 0] if n_draft
               else torch.zeros(0).long())
    else:
        q = None
        ids = torch.randint(0, vocab, (n_draft,), generator=g)

    def per_seq(value, dtype):
        values = value if isinstance(value, (list, tuple)) else [value] * batch
        return torch.tensor(values, dtype=dtype)

    return (
        logits, ids, q, cu, max(lengths),
        per_seq(temperature, torch.float32), per_seq(top_k, torch.int32),
        per_seq(top_p, torch.float32),
        torch.arange(batch, dtype=torch.int64) * 7919 + 13,
        torch.arange(batch, dtype=torch.int64) + 100,
    )


def chain_batch(logit_rows, q_rows, n_seq, *, fixed_drafts=None, temperature=1.0, top_k=0,
                top_p=1.0, seed=1234):
    """n_seq copies of one chain, each with its own offset, drafts sampled as the engine does.

    logit_rows: [n + 1, V] target logits shared by every copy (a context-free target)
    q_rows:     [n, V] draft distributions, or None with fixed_drafts [n] (point mass)
    Draft d of copy r is drawn by inverse CDF from Philox stream 16 + d.
    """
    n, vocab = logit_rows.shape[0] - 1, logit_rows.shape[1]
    seeds = torch.full((n_seq,), seed, dtype=torch.int64)
    offsets = torch.arange(n_seq, dtype=torch.int64)
    if q_rows is not None:
        cols = []
        for d in range(n):
            u = philox_uniform(seeds, offsets, 1, stream=FIRST_FREE_STREAM + d)[:, 0]
            cols.append(sample_inverse_cdf(q_rows[d].expand(n_seq, vocab), u))
        ids = torch.stack(cols, dim=1).flatten() if n else torch.zeros(0, dtype=torch.int64)
        q = dist_of_probs(q_rows.repeat(n_seq, 1))
    else:
        ids, q = fixed_drafts.repeat(n_seq), None
    return (
        logit_rows.repeat(n_seq, 1), ids, q,
        torch.arange(n_seq + 1, dtype=torch.int32) * n, n,
        torch.full((n_seq,), temperature), torch.full((n_seq,), top_k, dtype=torch.int32),
        torch.full((n_seq,), top_p), seeds, offsets,
    )


def exact_outcomes(p_rows, q_rows):
    """Exact law of (n_accepted, emitted tokens) for a context-free chain.

    p_rows [n + 1, V], q_rows [n, V] (a point-mass drafter is q = one-hot). Accepting
    x at step i has probability min(p_i, q_i)(x); rejecting and emitting y has
    max(p_i - q_i, 0)(y); after n acceptances the bonus y has p_n(y).
    """
    n, vocab = q_rows.shape[0], p_rows.shape[1]
    law = {}

    def walk(i, prefix, prob):
        if i == n:
            for y in range(vocab):
                law[(n, *prefix, y)] = prob * float(p_rows[n, y])
            return
        residual = (p_rows[i] - q_rows[i]).clamp(min=0)
        accept = torch.minimum(p_rows[i], q_rows[i])
        for y in range(vocab):
            law[(i, *prefix, y)] = prob * float(residual[y])
        for x in range(vocab):
            if accept[x] > 0:
                walk(i + 1, prefix + (x,), prob * float(accept[x]))

    walk(0, (), 1.0)
    return law


def outcome_pvalue(out, n_acc, law, min_expected=5.0):
    """Chi-square p-value of observed (n_accepted, tokens) against the exact law.

    Cells expected below min_expected are pooled into one; an outcome of probability 0
    gives p-value 0.
    """
    total = n_acc.shape[0]
    counts = {}
    for row, a in zip(out.tolist(), n_acc.tolist(), strict=True):
        key = (a, *row[: a + 1])
        if law.get(key, 0.0) <= 0.0:
            return 0.0
        counts[key] = counts.get(key, 0) + 1
    big = [k for k, pr in law.items() if pr * total >= min_expected]
    small = [k for k, pr in law.items() if 0 < pr * total < min_expected]
    observed = [counts.get(k, 0) for k in big]
    expected = [law[k] * total for k in big]
    if small:
        observed.append(sum(counts.get(k, 0) for k in small))
        expected.append(sum(law[k] for k in small) * total)
    return chi_square_pvalue(torch.tensor(observed), torch.tensor(expected))


def first_token_pvalue(out, p_first):
    """Chi-square p-value of the first emitted token against p of the first row."""
    counts = torch.bincount(out[:, 0], minlength=p_first.shape[0])
    if bool((counts[p_first == 0] > 0).any()):
        return 0.0
    return chi_square_pvalue(counts, p_first * out.shape[0])


def check_invariants(args, out, n_acc):
    """-1 padding after the emitted token, accepted tokens are the draft prefix."""
    ids, cu, k_max = args[1], args[3], args[4]
    vocab = args[0].shape[1]
    assert out.shape == (cu.shape[0] - 1, k_max + 1) and out.dtype == torch.int64
    assert n_acc.dtype == torch.int32
    for b in range(cu.shape[0] - 1):
        n_b, a = int(cu[b + 1] - cu[b]), int(n_acc[b])
        assert 0 <= a <= n_b
        assert out[b, :a].tolist() == ids[int(cu[b]) : int(cu[b]) + a].tolist()
        assert 0 <= int(out[b, a]) < vocab  # emitted = accepted + 1
        assert bool((out[b, a + 1 :] == -1).all())


# target and draft of the distribution tests: q is far from p so wrong samplers show
P_LOGITS = torch.tensor([[2.0, 1.5, 0.3, -0.5, -1.0],
                         [0.0, 1.0, 2.0, -1.0, 0.5],
                         [1.0, -1.0, 0.0, 2.0, 0.0]])
Q_ROWS = torch.tensor([[0.05, 0.05, 0.1, 0.3, 0.5],
                       [0.4, 0.3, 0.05, 0.2, 0.05]])

# ------------------------------------------------------------------------------------
# exact cases
# ------------------------------------------------------------------------------------


def test_greedy_accepts_while_argmax_then_emits_argmax():
    v = 6
    logits = torch.full((7, v), -1.0)
    # seq 0: rows' argmax 2, 4 (tie 4/5 -> first), 1, 3; drafts 2, 4, 0 -> accept 2
    for r, t in enumerate([2, 4, 1, 3]):
        logits[r, t] = 3.0
    logits[1, 5] = 3.0
    # seq 1: no drafts, argmax 5; seq 2: one draft, rows' argmax 0, 1, draft 0 accepted
    logits[4, 5] = 1.0
    logits[5, 0], logits[6, 1] = 2.0, 2.0
    ids = torch.tensor([2, 4, 0, 0])
    cu = torch.tensor([0, 3, 3, 4], dtype=torch.int32)
    zeros = torch.zeros(3)
    i64 = torch.zeros(3, dtype=torch.int64)
    out, n_acc = rejection_sample(logits, ids, None, cu, 3, zeros, zeros.int(), torch.ones(3),
                                  i64, i64)
    assert out.tolist() == [[2, 4, 1, -1], [5, -1, -1, -1], [0, 1, -1, -1]]
    assert n_acc.tolist() == [2, 0, 1]


@pytest.mark.parametrize("has_q", [True, False])
def test_one_hot_target(has_q):
    args = list(ragged_batch([4, 2, 3, 1], 10, has_q=has_q, seed=1))
    target = torch.randint(0, 10, (args[0].shape[0],), generator=torch.Generator().manual_seed(2))
    logits = torch.full_like(args[0], float("-inf"))  # -inf alone is a legal masked token
    logits[torch.arange(logits.shape[0]), target] = 0.0
    # make half of the drafts right
    cu = args[3]
    for b in range(4):
        for i in range(0, int(cu[b + 1] - cu[b]), 2):
            args[1][int(cu[b]) + i] = target[int(cu[b]) + b + i]
    args[0] = logits
    out, n_acc = rejection_sample(*args)
    check_invariants(args, out, n_acc)
    for b in range(4):
        rows = target[int(cu[b]) + b : int(cu[b + 1]) + b + 1]
        drafts = args[1][int(cu[b]) : int(cu[b + 1])]
        a = int(n_acc[b])
        expected_a = next((i for i, (x, t) in enumerate(zip(drafts, rows, strict=False)) if x != t), len(drafts))
        assert a == expected_a
        assert int(out[b, a]) == int(rows[a])


@pytest.mark.parametrize("top_k,top_p,temp", [(0, 1.0, 1.0), (3, 0.8, 0.7)])
def test_p_equals_q_accepts_everything(top_k, top_p, temp):
    args = list(ragged_batch([5, 3, 0, 5], 50, temperature=temp, top_k=top_k, top_p=top_p, seed=3))
    cu = args[3]
    q_rows = []
    for b in range(4):
        rows = args[0][int(cu[b]) + b : int(cu[b + 1]) + b]  # the rows scoring the drafts
        n = rows.shape[0]
        q_rows.append(draft_dist(rows, args[5][b].expand(n), args[6][b].expand(n),
                                 args[7][b].expand(n)))
    args[2] = DraftDist.cat(q_rows)
    args[1] = torch.multinomial(draft_dist_probs(args[2]), 1,
                                generator=torch.Generator().manual_seed(4))[:, 0]
    out, n_acc = rejection_sample(*args)
    assert n_acc.tolist() == [5, 3, 0, 5]
    check_invariants(args, out, n_acc)


def test_zero_draft_probability_where_target_positive_accepts():
    args = list(ragged_batch([3, 3], 20, seed=5))
    logits = args[2].logits.clone()
    logits[torch.arange(6), args[1]] = float("-inf")  # q(x) = 0 < p(x): u * 0 < p(x) accepts
    args[2] = args[2]._replace(logits=logits)
    out, n_acc = rejection_sample(*args)
    assert n_acc.tolist() == [3, 3]


def test_residual_token_is_where_target_exceeds_draft():
    args = ragged_batch([2] * 64, 12, seed=6, scale=0.7)
    out, n_acc = rejection_sample(*args)
    check_invariants(args, out, n_acc)
    rejected = (n_acc < 2).nonzero().flatten()
    assert 10 < rejected.numel() < 54  # both paths are exercised
    probs = sampling_probs(args[0], args[5].repeat_interleave(3), args[6].repeat_interleave(3),
                           args[7].repeat_interleave(3))
    for b in rejected.tolist():
        a = int(n_acc[b])
        y = int(out[b, a])
        assert probs[b * 3 + a, y] > draft_dist_probs(args[2])[b * 2 + a, y]


@pytest.mark.parametrize("has_q", [True, False])
def test_ragged_lengths_zero_and_max_and_invariants(has_q):
    lengths = [0, 5, 1, 0, 5, 3]
    args = ragged_batch(lengths, 37, has_q=has_q, temperature=[1.0, 0.0, 0.5, 1.0, 1.2, 0.0],
                        top_k=[0, 0, 5, 3, 0, 2], top_p=[1.0, 1.0, 0.9, 1.0, 0.6, 1.0], seed=7)
    out, n_acc = rejection_sample(*args)
    check_invariants(args, out, n_acc)
    assert n_acc[0] == 0 and n_acc[3] == 0


def test_batch_invariance():
    args = ragged_batch([2, 4, 0, 3], 64, temperature=[1.0, 0.8, 0.0, 1.0], top_k=[0, 10, 0, 0],
                        top_p=[1.0, 0.9, 1.0, 0.7], seed=8)
    out, n_acc = rejection_sample(*args)
    cu = args[3]
    for b in range(4):
        s, e = int(cu[b]), int(cu[b + 1])
        alone = (
            args[0][s + b : e + b + 1], args[1][s:e], args[2].narrow(s, e - s),
            torch.tensor([0, e - s], dtype=torch.int32), 4,
            *(t[b : b + 1] for t in args[5:]),
        )
        out_b, n_b = rejection_sample(*alone)
        assert n_b.tolist() == n_acc[b : b + 1].tolist()
        assert out_b[0].tolist() == out[b].tolist()


def test_offsets_change_the_draws():
    args = list(ragged_batch([3] * 32, 20, seed=9))
    out, _ = rejection_sample(*args)
    args[9] = args[9] + 1
    out2, _ = rejection_sample(*args)
    assert not torch.equal(out, out2)


# ------------------------------------------------------------------------------------
# bad values and validation
# ------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", ["nan", "inf", "all_neg_inf", "nan_after_rejection"])
def test_non_finite_logits(bad):
    args = list(ragged_batch([2, 3, 1], 16, seed=10))
    logits = args[0].clone()
    row = {"nan": 3, "inf": 4, "all_neg_inf": 6, "nan_after_rejection": 6}[bad]
    if bad == "nan":
        logits[row, 5] = float("nan")
    elif bad == "inf":
        logits[row, 0] = float("inf")
    elif bad == "all_neg_inf":
        logits[row] = float("-inf")
    else:
        # sequence 1 (rows 3..6): one-hot rows make the first draft rejected, NaN in row 6
        logits[3:7] = float("-inf")
        logits[3:7, 0] = 0.0
        args[1][2] = 1
        logits[6, 9] = float("nan")
    logits[0, 1] = float("-inf")  # a lone -inf is legal
    args[0] = logits
    with pytest.raises(ValueError, match=r"sequence\(s\) \[1\]"):
        rejection_sample(*args)
    out, n_acc = rejection_sample(*args, check_finite=False)
    assert n_acc[1] == -1 and bool((out[1] == -1).all())
    clean = list(ragged_batch([2, 3, 1], 16, seed=10))
    ref_out, ref_n = rejection_sample(*clean)
    assert n_acc[[0, 2]].tolist() == ref_n[[0, 2]].tolist()
    assert out[[0, 2]].tolist() == ref_out[[0, 2]].tolist()


def _validation_cases():
    base = ragged_batch([2, 1], 8)
    cases = []

    def case(i, value, match):
        args = list(base)
        args[i] = value
        cases.append((args, match))

    case(0, base[0][:, :, None], r"\[rows, V\]")
    case(0, base[0].double(), "float64")
    case(0, base[0][:-1], "has 4 rows.*need.*5")
    case(1, base[1].int(), "draft_token_ids must be torch.int64")
    q = base[2]
    case(2, q._replace(logits=q.logits[:, :-1]), r"q.logits must have shape \(3, 8\).*got \(3, 7\)")
    case(2, q._replace(logits=q.logits.double()), "q.logits must be float32, float16 or bfloat16")
    case(2, q._replace(logits=q.logits.t().contiguous().t()), "q.logits must have stride 1")
    case(2, q._replace(z=q.z.half()), "q.z must be torch.float32")
    case(2, q._replace(thr=q.thr.long()), "q.thr must be torch.int32")
    case(2, q._replace(m=q.m[:2]), r"q.m must have shape \(3,\)")
    case(2, q._replace(inv_t=q.inv_t.to("meta")), "q.inv_t is on meta")
    case(3, base[3].long(), "cu_num_draft must be torch.int32")
    case(4, -1, "max_num_draft")
    case(4, 1, "3 drafts cannot fit 2 sequences")
    case(5, base[5][:1], r"temperature must have shape \(2,\)")
    case(6, base[6].long(), "top_k must be torch.int32")
    case(7, base[7].double(), "top_p must be torch.float32")
    case(8, base[8].int(), "seeds must be torch.int64")
    case(9, base[9][:, None], r"offsets must have shape \(2,\)")
    # checks that read cu_num_draft / draft ids (check_finite=True)
    case(3, torch.tensor([0, 3, 3], dtype=torch.int32), r"sequence\(s\) \[0\] have \[3\]")
    case(3, torch.tensor([1, 2, 3], dtype=torch.int32), "from 0 to sum n_b = 3")
    case(1, torch.tensor([0, 8, 1]), r"draft_token_ids of sequence\(s\) \[0\] lie outside")
    return cases


@pytest.mark.parametrize("case", range(len(_validation_cases())))
def test_validation(case):
    args, match = _validation_cases()[case]
    with pytest.raises(ValueError, match=match):
        rejection_sample(*args)


def test_bad_layout_unchecked_flags_the_sequence():
    args = list(ragged_batch([2, 1], 8))
    args[3] = torch.tensor([0, 3, 3], dtype=torch.int32)  # n_0 = 3 > max_num_draft = 2
    out, n_acc = rejection_sample(*args, check_finite=False)
    assert n_acc[0] == -1 and bool((out[0] == -1).all())
    args = list(ragged_batch([2, 1], 8))
    args[1] = torch.tensor([0, 1, 99])
    out, n_acc = rejection_sample(*args, check_finite=False)
    assert n_acc[1] == -1 and n_acc[0] >= 0


# ------------------------------------------------------------------------------------
# distribution (chi-square against the exact law, and its power against wrong samplers)
# ------------------------------------------------------------------------------------

N_DRAWS = 40000


def _target_rows(temperature=1.0, top_k=0, top_p=1.0):
    n = P_LOGITS.shape[0]
    return sampling_probs(P_LOGITS, torch.full((n,), temperature),
                          torch.full((n,), top_k, dtype=torch.int32), torch.full((n,), top_p))


DIST_CASES = {
    "draft_probs": dict(q=True),
    "point_mass": dict(q=False),
    "top_k_top_p_temperature": dict(q=True, temperature=0.7, top_k=4, top_p=0.8),
    "point_mass_top_k_top_p": dict(q=False, temperature=1.3, top_k=3, top_p=0.9),
}
FIXED_DRAFTS = torch.tensor([1, 2])


def dist_inputs(case, n_seq):
    cfg = dict(DIST_CASES[case])
    has_q = cfg.pop("q")
    p_rows = _target_rows(**cfg)
    if has_q:
        args = chain_batch(P_LOGITS, Q_ROWS, n_seq, **cfg)
        law = exact_outcomes(p_rows, Q_ROWS)
    else:
        args = chain_batch(P_LOGITS, None, n_seq, fixed_drafts=FIXED_DRAFTS, **cfg)
        law = exact_outcomes(p_rows, torch.nn.functional.one_hot(FIXED_DRAFTS, 5).float())
    return args, p_rows, law


@pytest.mark.parametrize("case", list(DIST_CASES))
def test_distribution_matches_target(case):
    args, p_rows, law = dist_inputs(case, N_DRAWS)
    out, n_acc = rejection_sample(*args)
    assert first_token_pvalue(out, p_rows[0]) > 1e-3
    assert outcome_pvalue(out, n_acc, law) > 1e-3


def test_bonus_only_distribution():
    # n_b = 0: the single token is a plain sample of p
    p_rows = _target_rows(temperature=0.9, top_k=4)
    args = chain_batch(P_LOGITS[:1], Q_ROWS[:0], N_DRAWS, temperature=0.9, top_k=4)
    out, n_acc = rejection_sample(*args)
    assert bool((n_acc == 0).all())
    assert first_token_pvalue(out, p_rows[0]) > 1e-3


def wrong_residual_from_p(args, out, n_acc, p_rows):
    """A wrong sampler: after a rejection it samples p instead of max(p - q, 0)."""
    out = out.clone()
    u = philox_uniform(args[8], args[9], args[4] + 1, stream=1).gather(1, n_acc.long()[:, None])
    resample = sample_inverse_cdf(p_rows[n_acc.long()], u[:, 0])
    rejected = n_acc < args[4]
    out[rejected, n_acc[rejected].long()] = resample[rejected]
    return out


@pytest.mark.parametrize("wrong", ["always_accept", "residual_from_p", "point_mass_rule"])
def test_distribution_test_rejects_wrong_samplers(wrong):
    args, p_rows, law = dist_inputs("draft_probs", N_DRAWS)
    if wrong == "always_accept":
        # q = 0 (z = inf) makes u * q < p true for every draft with p > 0
        args = list(args)
        args[2] = args[2]._replace(z=torch.full_like(args[2].z, float("inf")))
        out, n_acc = rejection_sample(*args)
    elif wrong == "residual_from_p":
        out, n_acc = rejection_sample(*args)
        out = wrong_residual_from_p(args, out, n_acc, p_rows)
    else:
        # treating drafts sampled from q as point masses (ignores q)
        args = list(args)
        args[2] = None
        out, n_acc = rejection_sample(*args)
    assert outcome_pvalue(out, n_acc, law) < 1e-6
    if wrong != "point_mass_rule":  # that one keeps the first token's law (n-gram rule)
        assert first_token_pvalue(out, p_rows[0]) < 1e-6


def test_chi_square_helper_is_calibrated():
    # exact multinomial draws pass, a 5% shift in one cell at n = 20000 fails
    g = torch.Generator().manual_seed(11)
    p = torch.tensor([0.5, 0.3, 0.2])
    counts = torch.bincount(torch.multinomial(p, N_DRAWS, True, generator=g), minlength=3)
    assert chi_square_pvalue(counts, p * N_DRAWS) > 1e-3
    assert chi_square_pvalue(counts, torch.tensor([0.45, 0.35, 0.2]) * N_DRAWS) < 1e-6
    even = torch.tensor([10.0, 10.0])
    assert math.isclose(chi_square_pvalue(even, even), 1.0)


def test_top_p_one_is_off_exactly_beside_a_filtered_row():
    # a float32 running sum of 50k probabilities rounds past 1 before the tail: top_p = 1
    # must still keep every token even when another row of the batch is filtered
    x = torch.randn(2, 50000, generator=torch.Generator().manual_seed(0)) * 3.0
    params = (torch.ones(2), torch.tensor([0, 5], dtype=torch.int32), torch.tensor([1.0, 0.9]))
    probs = sampling_probs(x, *params)
    assert bool((probs[0] > 0).all())
    torch.testing.assert_close(probs[0], torch.softmax(x[0], -1))
    assert 0 < int((probs[1] > 0).sum()) <= 5
    dist = draft_dist(x, *params)
    assert dist.thr[0] == INT32_MIN
