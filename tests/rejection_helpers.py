"""Rejection-sampler test helpers shared by the reference and kernel sampler tests
(test_reference_sampler.py, test_rejection_sampling.py, test_tree_sampling.py).

* batch builders: ``ragged_batch`` (random ragged inputs of ``rejection_sample``),
  ``chain_batch`` (n_seq copies of one chain), ``dist_of_probs`` / ``unfiltered_dist``;
* exact laws and goodness of fit: ``exact_outcomes`` (the law of (n_accepted, tokens)
  of a chain), ``outcome_pvalue``, ``first_token_pvalue``, ``check_invariants``;
* the distribution cases (``P_LOGITS``, ``Q_ROWS``, ``DIST_CASES``, ``dist_inputs``,
  ``target_rows``), a wrong sampler (``wrong_residual_from_p``) and the bad-input
  cases of the validation tests (``validation_cases``).
"""

import torch
from stats import chi_square_pvalue

from specdec.kernels._sampling_core import INT32_MIN, DraftDist
from specdec.kernels.philox import FIRST_FREE_STREAM, philox_uniform, sample_inverse_cdf
from specdec.kernels.reference import draft_dist, draft_dist_probs, sampling_probs




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
    for row, a in zip(out.tolist(), n_acc.tolist()):
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


def target_rows(temperature=1.0, top_k=0, top_p=1.0):
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
    p_rows = target_rows(**cfg)
    if has_q:
        args = chain_batch(P_LOGITS, Q_ROWS, n_seq, **cfg)
        law = exact_outcomes(p_rows, Q_ROWS)
    else:
        args = chain_batch(P_LOGITS, None, n_seq, fixed_drafts=FIXED_DRAFTS, **cfg)
        law = exact_outcomes(p_rows, torch.nn.functional.one_hot(FIXED_DRAFTS, 5).float())
    return args, p_rows, law


def wrong_residual_from_p(args, out, n_acc, p_rows):
    """A wrong sampler: after a rejection it samples p instead of max(p - q, 0)."""
    out = out.clone()
    u = philox_uniform(args[8], args[9], args[4] + 1, stream=1).gather(1, n_acc.long()[:, None])
    resample = sample_inverse_cdf(p_rows[n_acc.long()], u[:, 0])
    rejected = n_acc < args[4]
    out[rejected, n_acc[rejected].long()] = resample[rejected]
    return out


def validation_cases():
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
