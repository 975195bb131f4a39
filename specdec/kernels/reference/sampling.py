"""Sampling in PyTorch: the processed distribution of a row (temperature, top-k, top-p),
the draft sampler and chain rejection sampling. The oracle of ``draft_sampling.py`` and
``rejection_sampling.py`` and the CPU backend's samplers.

Chain rejection sampling (Leviathan et al. 2023, Chen et al. 2023), with p_i =
``sampling_probs`` of target row i and q_i the draft distribution of draft i (0-based):
  - greedy: accept while x_i == argmax(row i) (first argmax of the raw logits), then
    emit the argmax of the next row;
  - otherwise accept x_i iff ``u_i * q_i(x_i) < p_i(x_i)``, u_i = Philox stream 0,
    draw i; a point-mass drafter has q_i(x_i) = 1. On the first rejection emit a
    sample of the residual max(p_i - q_i, 0) (point mass: p_i with x_i removed),
    renormalised, or of p_i when the residual sums to 0; if all n_b drafts are
    accepted, emit a sample of p_{n_b} (the bonus token). The emitted sample uses
    inverse CDF (``sample_inverse_cdf``) with Philox stream 1, draw = its row index.
Why the emitted token has the target's law: docs/proofs.md.
"""

from __future__ import annotations

import torch

from .._sampling_core import INT32_MIN, DraftDist, inverse_temperature, key_of
from .._sampling_validation import check_draft_layout, check_rejection_args, raise_if_flagged
from ..philox import SAMPLER_ACCEPT_STREAM, SAMPLER_SAMPLE_STREAM, philox_uniform, sample_inverse_cdf

__all__ = ["sampling_probs", "draft_dist", "draft_dist_probs", "draft_sample", "rejection_sample"]


def _keep_thresholds(x: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Per-row int32 threshold on ``key_of(x)`` that top-k then top-p keep.

    x: [N, V] float32 (temperature applied); top_k [N] int32; top_p [N] float32
    returns: [N] int32 thr, the row keeps v iff key_of(x_v) >= thr (INT32_MIN: nothing cut)

    Ties are kept together:
      top-k keeps key >= the k-th largest key (k <= 0 or k >= V: off);
      top-p keeps key >= t*, the smallest key whose strictly-greater mass (over the top-k
            survivors, in units of exp(x - m)) is < top_p * z_k; top_p >= 1 is off exactly
            (a rounded-up running sum never cuts the tail of an unfiltered row).
    """
    n, v = x.shape
    keys = key_of(x)  # [N, V]
    thr = torch.full((n,), INT32_MIN, dtype=torch.int32, device=x.device)
    sorted_x, order = torch.sort(x, dim=-1, descending=True)  # [N, V]
    sorted_keys = keys.gather(1, order)
    # -- top-k: the k-th largest key --
    use_k = (top_k > 0) & (top_k < v)
    k = torch.where(use_k, top_k, torch.full_like(top_k, v)).long()
    thr = torch.where(use_k, sorted_keys.gather(1, (k - 1)[:, None])[:, 0], thr)
    # -- top-p over the top-k survivors: mass strictly above each sorted entry --
    use_p = top_p < 1.0
    if bool(use_p.any()) if x.device.type == "cpu" else True:
        m = sorted_x[:, :1]  # [N, 1]
        w = torch.where(sorted_keys >= thr[:, None], torch.exp(sorted_x - m), 0.0)  # [N, V]
        cum = torch.cumsum(w, dim=-1)  # cum[i] = mass of the i + 1 largest
        z = cum[:, -1:]  # [N, 1]
        # entries strictly greater than sorted entry i: the first index of its tie group
        first = torch.searchsorted(-sorted_x.contiguous(), -sorted_x.contiguous(), side="left")
        above = torch.where(first > 0, cum.gather(1, (first - 1).clamp(min=0)), 0.0)  # [N, V]
        keep = (above < top_p.float()[:, None] * z) & (w > 0)
        t_p = torch.where(keep, sorted_keys, torch.iinfo(torch.int32).max).amin(-1)  # [N]
        thr = torch.where(use_p, torch.maximum(thr, t_p), thr)
    return thr


def draft_dist(
    logits: torch.Tensor,
    temperature: torch.Tensor,
    top_k: torch.Tensor,
    top_p: torch.Tensor,
    *,
    filtered: bool | None = None,
) -> DraftDist:
    """The processed distribution of each row as a ``DraftDist`` (no [N, V] probabilities).

    logits: [N, V] any float dtype (kept as is in the result); temperature [N] float32
    (<= 0: greedy, inv_t = 1); top_k [N] int32; top_p [N] float32
    returns: DraftDist with q(v) = [key(x_v) >= thr] exp(x_v - m) / z, x = logit.float() * inv_t

    filtered=False promises no row uses top-k or top-p (skips the sorts); None reads it
    off CPU tensors and assumes it on a GPU.
    """
    inv_t = inverse_temperature(temperature)  # [N]
    x = logits.float() * inv_t[:, None]  # [N, V]
    n, v = x.shape
    if filtered is None:
        filtered = (x.device.type != "cpu"
                    or bool((((top_k > 0) & (top_k < v)) | (top_p < 1)).any()))
    if filtered:  # greedy rows are not filtered (their q is never read)
        thr = torch.where(temperature <= 0, INT32_MIN, _keep_thresholds(x, top_k, top_p))
    else:
        thr = torch.full((n,), INT32_MIN, dtype=torch.int32, device=x.device)
    m = x.amax(-1)  # [N]; the max is always kept
    kept = key_of(x) >= thr[:, None]
    z = torch.where(kept, torch.exp(x - m[:, None]), 0.0).sum(-1)
    return DraftDist(logits, inv_t, m, z, thr)


def draft_dist_probs(dist: DraftDist) -> torch.Tensor:
    """Materialise q: DraftDist -> [n, V] float32, q(v) = [key(x_v) >= thr] exp(x_v - m) / z.

    For the reference samplers and tests only; the kernels read the logits instead.
    """
    x = dist.logits.float() * dist.inv_t[:, None]
    kept = key_of(x) >= dist.thr[:, None]
    return torch.where(kept, torch.exp(x - dist.m[:, None]), 0.0) / dist.z[:, None]


def sampling_probs(
    logits: torch.Tensor,
    temperature: torch.Tensor,
    top_k: torch.Tensor,
    top_p: torch.Tensor,
    *,
    filtered: bool | None = None,
    all_greedy: bool | None = None,
) -> torch.Tensor:
    """The distribution a sequence samples from: temperature, then top-k, then top-p.

    logits:      [N, V] any float dtype
    temperature: [N] float32; 0 means greedy (a point mass on the first argmax)
    top_k:       [N] int32; 0 (or >= V) disables it
    top_p:       [N] float32 in (0, 1]; 1 disables it (exactly: nothing is cut)
    returns:     [N, V] float32 probabilities, each row sums to 1

    Ties are kept together, so the rule is a pair of thresholds on the monotone key of
    x = logit * (1 / T) (``_keep_thresholds``):
      top-k keeps x  iff  key(x) >= the k-th largest key;
      top-p keeps x  iff  the (top-k renormalised) mass of tokens strictly more likely
                          than x is < top_p (the token crossing p is kept).

    filtered, all_greedy: optional host-side hints that let the common cases skip the
    sorts: ``filtered=False`` promises no row uses top-k or top-p, ``all_greedy=True``
    that every row is greedy. When None they are read off CPU tensors (free) and assumed
    unknown on a GPU (reading them would be a host sync).
    """
    onehot = torch.zeros(logits.shape, dtype=torch.float32, device=logits.device)
    onehot.scatter_(1, logits.float().argmax(-1, keepdim=True), 1.0)  # greedy rows
    if all_greedy is None and temperature.device.type == "cpu":
        all_greedy = bool((temperature <= 0).all())
    if all_greedy:
        return onehot
    probs = draft_dist_probs(draft_dist(logits, temperature, top_k, top_p, filtered=filtered))
    return torch.where((temperature <= 0)[:, None], onehot, probs)


def draft_sample(
    logits: torch.Tensor,
    temperature: torch.Tensor,
    top_k: torch.Tensor,
    top_p: torch.Tensor,
    seeds: torch.Tensor,
    offsets: torch.Tensor,
    stream: int,
    num_samples: int = 1,
    first_draw: torch.Tensor | None = None,
    *,
    filtered: bool | None = None,
    all_greedy: bool | None = None,
    radix_rounds: int | None = None,
) -> tuple[torch.Tensor, DraftDist]:
    """Draw ``num_samples`` i.i.d. draft tokens per row from its processed distribution.

    logits:       [N, V] any float dtype; temperature [N] float32 (<= 0: greedy);
                  top_k [N] int32; top_p [N] float32; seeds, offsets [N] int64
    stream:       Philox stream of the draws (``DRAFT_STREAM + position`` for drafters);
                  sample s of row r uses draw j = first_draw[r] + s (first_draw [N] int64,
                  None: 0); radix_rounds: the kernel's hint, ignored here
    returns:      tokens [N, num_samples] int64 (greedy rows: the first argmax, repeated),
                  DraftDist of the rows (what the tokens were drawn from)

    Inverse CDF (``sample_inverse_cdf``) of q with uniform philox(seed, offset, stream, s).
    """
    dist = draft_dist(logits, temperature, top_k, top_p, filtered=filtered)
    argmax = logits.float().argmax(-1, keepdim=True).expand(-1, num_samples)  # [N, S]
    if all_greedy is None and temperature.device.type == "cpu":
        all_greedy = bool((temperature <= 0).all())
    if all_greedy:
        return argmax.contiguous(), dist
    q = draft_dist_probs(dist)  # [N, V]
    u = philox_uniform(seeds, offsets, num_samples, stream=stream, first=first_draw)  # [N, S]
    n = q.shape[0]
    flat = sample_inverse_cdf(q.repeat_interleave(num_samples, dim=0), u.reshape(-1))
    tokens = flat.view(n, num_samples)
    return torch.where((temperature <= 0)[:, None], argmax, tokens), dist



def bad_rows(raw: torch.Tensor) -> torch.Tensor:
    """[N, V] float32 -> [N] bool: NaN or +inf anywhere, or every entry -inf (a lone -inf is
    a legal masked token)."""
    return raw.isnan().any(-1) | raw.isposinf().any(-1) | raw.isneginf().all(-1)


def rejection_sample(
    target_logits: torch.Tensor,
    draft_token_ids: torch.Tensor,
    q: DraftDist | None,
    cu_num_draft: torch.Tensor,
    max_num_draft: int,
    temperature: torch.Tensor,
    top_k: torch.Tensor,
    top_p: torch.Tensor,
    seeds: torch.Tensor,
    offsets: torch.Tensor,
    check_finite: bool = True,
    *,
    num_draft: torch.Tensor | None = None,
    filtered: bool | None = None,
    radix_rounds: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Speculative rejection sampling of chain drafts for a ragged batch (the rule is in
    the module docstring).

    target_logits:   [sum_b (n_b + 1), V] float32/float16/bfloat16; sequence b owns rows
                     cu_num_draft[b] + b .. cu_num_draft[b + 1] + b (its last committed
                     token's row scores draft 1, the last row scores the bonus token)
    draft_token_ids: [sum_b n_b] int64; q: DraftDist of sum_b n_b rows, the distribution
                     each draft was sampled from, or None for a point-mass drafter (n-gram)
    cu_num_draft:    [B + 1] int32 cumulative draft counts (n_b may be 0);
                     max_num_draft: host int, k_max >= max_b n_b
    temperature, top_k, top_p: [B] float32 (<= 0: greedy), int32 (<= 0 or >= V: off),
                     float32 in (0, 1] (1: off); seeds, offsets: [B] int64 Philox key, counter
    num_draft:       [B] int32 or None: test only the first min(n_b, num_draft[b]) drafts,
                     rows still laid out by cu_num_draft (a fixed-shape step caps sequences
                     near their token limit); filtered: host hint, False promises no top-k
                     / top-p (skips the sorts); radix_rounds: the kernel's hint, ignored here
    returns:         out_tokens [B, k_max + 1] int64 (accepted drafts, the emitted token,
                     then -1), n_accepted [B] int32 (n_accepted + 1 tokens are valid)

    Bad values (NaN / +inf in a sequence's rows or a row all -inf, draft ids outside [0, V),
    draft counts outside [0, max_num_draft]): check_finite=True raises ValueError naming the
    sequences (host copies); False flags them with n_accepted = -1 and an all -1 row.

    Example::

        >>> logits = torch.tensor([[0.0, 5.0, 0.0], [0.0, 0.0, 5.0]])
        >>> i32, i64 = torch.int32, torch.int64
        >>> rejection_sample(logits, torch.tensor([1]), None, torch.tensor([0, 1], dtype=i32), 1,
        ...                  torch.zeros(1), torch.zeros(1, dtype=i32), torch.ones(1),
        ...                  torch.zeros(1, dtype=i64), torch.zeros(1, dtype=i64))
        (tensor([[1, 2]]), tensor([1], dtype=torch.int32))
    """
    batch, vocab = check_rejection_args(target_logits, draft_token_ids, q, cu_num_draft,
                                        max_num_draft, temperature, top_k, top_p, seeds, offsets,
                                        num_draft)
    if check_finite:
        check_draft_layout(cu_num_draft, draft_token_ids, max_num_draft, vocab)
    grid = _chain_grid(target_logits, draft_token_ids, cu_num_draft, max_num_draft, num_draft)
    out, n_accepted = _chain_verify(grid, target_logits, draft_token_ids.shape[0], q, max_num_draft,
                                    temperature, top_k, top_p, seeds, offsets, filtered)
    if check_finite:
        raise_if_flagged(n_accepted)
    return out, n_accepted


def _chain_grid(target_logits, draft_token_ids, cu_num_draft, k_max: int, num_draft):
    """Ragged layout -> a [B, k_max + 1] grid; a sequence with a bad layout gets n_b = 0.

    returns (start [B] first draft, n [B] drafts tested, rows [B, K+1] target rows,
    drafts [B, K] draft indices, ids [B, K] draft tokens, bad [B] bad layout)
    """
    dev, n_draft = target_logits.device, draft_token_ids.shape[0]
    start, end = cu_num_draft[:-1].long(), cu_num_draft[1:].long()  # [B]
    n = end - start
    layout_ok = (start >= 0) & (n >= 0) & (n <= k_max) & (end <= n_draft)
    n = torch.where(layout_ok, n, 0)
    start = torch.where(layout_ok, start, 0)
    if num_draft is not None:  # test fewer drafts than the slice holds
        n = torch.minimum(n, num_draft.long().clamp(min=0))
    pos = torch.arange(k_max + 1, device=dev)  # [K+1]
    rows = (start + torch.arange(start.shape[0], device=dev))[:, None] + pos[None, :]  # [B, K+1]
    rows = rows.clamp(max=target_logits.shape[0] - 1)
    drafts = (start[:, None] + pos[None, :k_max]).clamp(max=max(n_draft - 1, 0))  # [B, K]
    ids = draft_token_ids[drafts] if n_draft else torch.zeros_like(drafts)  # [B, K]
    return start, n, rows, drafts, ids, ~layout_ok


def _chain_verify(grid, target_logits, n_draft: int, q, k_max: int, temperature, top_k, top_p,
                  seeds, offsets, filtered):
    """The ratio test along each chain and the emitted token (see the module docstring)."""
    start, n, rows, drafts, ids, bad = grid
    batch, vocab = rows.shape[0], target_logits.shape[1]
    dev = target_logits.device
    b_idx = torch.arange(batch, device=dev)
    pos = torch.arange(k_max + 1, device=dev)  # [K+1]
    draft_ok = pos[None, :k_max] < n[:, None]  # [B, K]
    # -- bad sequences: non-finite rows, draft ids outside the vocabulary, bad layout --
    raw = target_logits[rows.flatten()].float()  # [B*(K+1), V]
    id_bad = (ids < 0) | (ids >= vocab)
    bad = bad | (bad_rows(raw).view(batch, k_max + 1) & (pos[None, :] <= n[:, None])).any(1)
    bad |= (id_bad & draft_ok).any(1)
    ids = ids.clamp(0, vocab - 1)
    # -- target distributions of every row: [B, K+1, V] --
    rep = k_max + 1  # per-row copies of the per-sequence parameters
    probs = sampling_probs(raw, temperature.repeat_interleave(rep), top_k.repeat_interleave(rep),
                           top_p.repeat_interleave(rep), filtered=filtered).view(batch, rep, vocab)
    argmax = raw.argmax(-1).view(batch, rep)  # first argmax, greedy rows
    greedy = temperature <= 0  # [B]
    # an all-greedy batch on the CPU needs no random numbers (reading the flag is free there)
    draws = dev.type != "cpu" or not bool(greedy.all())
    # -- ratio test: accept x_i iff u_i * q_i(x_i) < p_i(x_i); a point mass has q_i(x_i) = 1 --
    p_at = probs[:, :k_max].gather(2, ids[..., None])[..., 0]  # [B, K]
    draft_probs = draft_dist_probs(q) if q is not None and n_draft else None  # [sum n_b, V]
    q_at = draft_probs[drafts, ids] if draft_probs is not None else torch.ones_like(p_at)  # [B, K]
    u_accept = (philox_uniform(seeds, offsets, k_max, SAMPLER_ACCEPT_STREAM) if draws
                else torch.zeros_like(p_at))  # [B, K]
    accept = torch.where(greedy[:, None], ids == argmax[:, :k_max], u_accept * q_at < p_at)
    n_acc = torch.cumprod((accept & draft_ok).long(), dim=1).sum(1)  # [B] accepted prefix
    # -- the emitted token: a residual sample after a rejection, else the bonus token --
    dist = _emit_dist(probs[b_idx, n_acc], draft_probs, ids, start, n, n_acc, k_max, n_draft)
    token = argmax[b_idx, n_acc]
    if draws:
        u_sample = philox_uniform(seeds, offsets, k_max + 1, SAMPLER_SAMPLE_STREAM)  # [B, K+1]
        sampled = sample_inverse_cdf(dist, u_sample.gather(1, n_acc[:, None])[:, 0])
        token = torch.where(greedy, token, sampled)  # [B]
    # -- assemble: accepted drafts, the emitted token, -1 padding --
    out = torch.full((batch, k_max + 1), -1, dtype=torch.int64, device=dev)
    out[:, :k_max] = torch.where(pos[None, :k_max] < n_acc[:, None], ids, -1)
    out[b_idx, n_acc] = token
    return torch.where(bad[:, None], -1, out), torch.where(bad, -1, n_acc).to(torch.int32)


def _emit_dist(p_s, draft_probs, ids, start, n, n_acc, k_max: int, n_draft: int) -> torch.Tensor:
    """[B, V] the distribution of the emitted token: the residual max(p - q, 0) after a
    rejection (point mass: p without x; p where the residual sums to 0), else p (bonus).

    p_s: [B, V] target row n_acc; draft_probs: [sum n_b, V] or None; ids: [B, K]
    """
    if not (k_max and n_draft):
        return p_s
    at = n_acc.clamp(max=k_max - 1)  # the rejected position, where n_acc < n
    if draft_probs is None:  # point-mass drafts
        residual = p_s.scatter(1, ids.gather(1, at[:, None]), 0.0)  # p without x
    else:
        q_s = draft_probs[(start + at).clamp(max=n_draft - 1)]  # [B, V]
        residual = (p_s - q_s).clamp(min=0.0)  # max(p - q, 0)
    residual = torch.where(residual.sum(-1, keepdim=True) > 0, residual, p_s)
    return torch.where((n_acc < n)[:, None], residual, p_s)
