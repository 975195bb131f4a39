"""The PyTorch rejection sampler: exact cases, invariants, errors, and its distribution.

The helpers (batch builders, exact outcome distributions, chi-square) live in
tests/rejection_helpers.py, shared with tests/test_rejection_sampling.py, which runs the
same checks on the kernel.
"""

import math

import pytest
import torch
from rejection_helpers import (
    DIST_CASES,
    P_LOGITS,
    Q_ROWS,
    chain_batch,
    check_invariants,
    dist_inputs,
    first_token_pvalue,
    outcome_pvalue,
    ragged_batch,
    target_rows,
    validation_cases,
    wrong_residual_from_p,
)
from stats import chi_square_pvalue

from specdec.kernels._sampling_core import INT32_MIN, DraftDist
from specdec.kernels.reference import draft_dist, draft_dist_probs, rejection_sample, sampling_probs

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
        expected_a = next((i for i, (x, t) in enumerate(zip(drafts, rows)) if x != t), len(drafts))
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


@pytest.mark.parametrize("case", range(len(validation_cases())))
def test_validation(case):
    args, match = validation_cases()[case]
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


@pytest.mark.parametrize("case", list(DIST_CASES))
def test_distribution_matches_target(case):
    args, p_rows, law = dist_inputs(case, N_DRAWS)
    out, n_acc = rejection_sample(*args)
    assert first_token_pvalue(out, p_rows[0]) > 1e-3
    assert outcome_pvalue(out, n_acc, law) > 1e-3


def test_bonus_only_distribution():
    # n_b = 0: the single token is a plain sample of p
    p_rows = target_rows(temperature=0.9, top_k=4)
    args = chain_batch(P_LOGITS[:1], Q_ROWS[:0], N_DRAWS, temperature=0.9, top_k=4)
    out, n_acc = rejection_sample(*args)
    assert bool((n_acc == 0).all())
    assert first_token_pvalue(out, p_rows[0]) > 1e-3


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
