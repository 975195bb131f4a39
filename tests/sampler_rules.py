"""Sampling rules on the host, right and wrong, for the distribution tests' power checks.

A distribution test is only worth something if it rejects a sampler that is wrong; these
are the wrong ones (and the host harness that also runs the right rule), shared by the
engine, tree and EAGLE-3 distribution tests. ``ALPHA`` is the level a right sampler must
pass at, ``POWER_ALPHA`` the level a wrong one must fail at with the same draws.
"""

from __future__ import annotations

import torch
from exact_law import V
from stats import chi_square_test

from specdec.kernels import reference
from specdec.kernels.philox import (
    SAMPLER_SAMPLE_STREAM,
    TREE_ACCEPT_STREAM,
    TREE_SAMPLE_STREAM,
    philox_uniform,
    sample_inverse_cdf,
)
from specdec.tree import MAX_TREE_NODES

ALPHA = 1e-3  # the engine passes when p > ALPHA
POWER_ALPHA = 1e-6  # a wrong sampler must give p < POWER_ALPHA with the same draws


def residual_from_p(target_logits, draft_token_ids, draft_probs, cu_num_draft, max_num_draft,
                     temperature, top_k, top_p, seeds, offsets, check_finite=True, **hints):
    """Wrong: the right acceptance test, but after a rejection it samples p instead of the
    residual max(p - q, 0) / sum: tokens the draft favours come out too often."""
    out, n_acc = reference.rejection_sample(target_logits, draft_token_ids, draft_probs, cu_num_draft,
                                            max_num_draft, temperature, top_k, top_p, seeds, offsets,
                                            check_finite)
    b = torch.arange(out.shape[0])
    a = n_acc.long()
    rejected = a < (cu_num_draft[1:] - cu_num_draft[:-1]).long()
    row = cu_num_draft[:-1].long() + b + a  # target row of the emitted token
    p = reference.sampling_probs(target_logits[row], temperature, top_k, top_p)  # [B, V]
    u = philox_uniform(seeds, offsets, max_num_draft + 1, SAMPLER_SAMPLE_STREAM).gather(1, a[:, None])[:, 0]
    out[b, a] = torch.where(rejected, sample_inverse_cdf(p, u), out[b, a])
    return out, n_acc


def _marginals(counts, joint):
    """(counts, probs) of each single position's token, from the joint ones."""
    c = counts.view(V, V, V)
    j = joint.view(V, V, V)
    dims = [(1, 2), (0, 2), (0, 1)]
    return [(c.sum(d), j.sum(d)) for d in dims]


def law_test(counts, joint):
    """The joint chi-square test and one per position's marginal (the marginal test sees
    a bias confined to one position with far more power than 512 joint cells); returns
    (smallest p-value, Bonferroni-corrected over the 4 tests, and the results)."""
    results = [chi_square_test(counts, joint)] + [chi_square_test(c, p / p.sum()) for c, p in _marginals(counts, joint)]
    return min(1.0, 4 * min(r.p_value for r in results)), results


def _residual(p, q, x):
    """The reference's sibling update: max(p - q, 0) (point mass: p without x), normalised."""
    r = (p - q).clamp(min=0.0) if q is not None else p.clone().index_fill_(0, torch.tensor([x]), 0.0)
    total = r.sum()
    return r / total if total > 0 else p


def host_tree_sampler(rule: str):
    """``tree_rejection_sample`` as a per-sequence host loop, with the reference's Philox
    uniforms, under ``rule``:

    "exact":       the reference's rule (used to check this harness against the reference);
    "no-update":   every sibling is tested against the untouched p_u (accept iff
                   u q(x) < p_u(x)) instead of the residual the earlier rejections left;
                   after all are rejected it samples max(p_u - q_u, 0) normalised (point
                   mass: p_u without the rejected tokens), as a chain would;
    "first-child": always accepts the first child of each position.
    """
    def sample(target_logits, draft_token_ids, parents, q, cu_num_nodes, max_depth,
               temperature, top_k, top_p, seeds, offsets, check_finite=True, radix_rounds=None):
        draft_probs = reference.draft_dist_probs(q) if q is not None else None  # [rows, V]
        cu = cu_num_nodes.tolist()
        batch = len(cu) - 1
        rows = torch.tensor([cu[b + 1] - cu[b] + 1 for b in range(batch)])
        p_all = reference.sampling_probs(target_logits.float(), temperature.repeat_interleave(rows),
                                         top_k.repeat_interleave(rows), top_p.repeat_interleave(rows))
        argmax = target_logits.argmax(-1).tolist()
        u_acc = philox_uniform(seeds, offsets, MAX_TREE_NODES, TREE_ACCEPT_STREAM).tolist()
        u_emit = philox_uniform(seeds, offsets, MAX_TREE_NODES + 1, TREE_SAMPLE_STREAM)
        toks, pars, temps = draft_token_ids.tolist(), parents.tolist(), temperature.tolist()
        out = torch.full((batch, max_depth + 1), -1, dtype=torch.int64)
        path = torch.full((batch, max_depth), -1, dtype=torch.int32)
        n_acc = torch.zeros(batch, dtype=torch.int32)
        final_p, final_u, greedy_tok = [], [], []
        for b in range(batch):
            s, n, r0 = cu[b], cu[b + 1] - cu[b], cu[b] + b
            node, k = -1, 0
            while True:
                row = r0 + 1 + node
                p_u = p_all[row]
                q_u = draft_probs[row] if draft_probs is not None else None
                p_cur, chosen = p_u, None
                for c in [c for c in range(n) if pars[s + c] == node]:
                    x = toks[s + c]
                    if temps[b] <= 0:
                        ok = x == argmax[row]
                    elif rule == "first-child":
                        ok = True
                    else:
                        q_x = float(q_u[x]) if q_u is not None else 1.0
                        ok = u_acc[b][c] * q_x < float((p_cur if rule == "exact" else p_u)[x])
                    if ok:
                        chosen = c
                        break
                    if temps[b] > 0:
                        p_cur = _residual(p_u if (rule == "no-update" and q_u is not None) else p_cur, q_u, x)
                if chosen is None:
                    break
                path[b, k], out[b, k] = chosen, toks[s + chosen]
                k, node = k + 1, chosen
            n_acc[b] = k
            final_p.append(p_cur)
            final_u.append(u_emit[b, node + 1])
            greedy_tok.append(argmax[row] if temps[b] <= 0 else -1)
        emitted = sample_inverse_cdf(torch.stack(final_p), torch.stack(final_u))
        emitted = torch.where(torch.tensor(greedy_tok) >= 0, torch.tensor(greedy_tok), emitted)
        out[torch.arange(batch), n_acc.long()] = emitted
        return out, n_acc, path
    return sample
