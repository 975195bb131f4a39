"""The naive PyTorch path for every kernel.

One place for three jobs: the test oracle the Triton kernels are checked against, the
baseline the benchmarks compare with, and the CPU backend of the engine. Everything here
is written for clarity first; shapes are given in the docstrings and inline comments.

Paged KV cache layout shared by every attention function in specdec::

    k_cache, v_cache : [num_blocks, block_size, H_kv, D]
    slot             = block_table[b, pos // block_size] * block_size + pos % block_size

A forward over a ragged batch writes the new tokens' K/V into their slots first
(``write_kv``) and then attends (``verify_attention``): the last ``n_b`` cached positions
of sequence ``b`` are its new tokens (a chain, or the nodes of a draft tree in order).
"""

from __future__ import annotations

import torch

from .philox import SAMPLER_ACCEPT_STREAM, SAMPLER_SAMPLE_STREAM, philox_uniform, sample_inverse_cdf

__all__ = [
    "write_kv",
    "move_kv",
    "verify_attention",
    "chain_tree_mask",
    "sampling_probs",
    "rejection_sample",
]


def write_kv(
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Scatter new keys and values into the paged cache.

    k, v:            [T, H_kv, D]
    k_cache/v_cache: [num_blocks, block_size, H_kv, D] (written in place)
    slot_mapping:    [T] int64, flat slot index ``block * block_size + offset``
    """
    num_blocks, block_size, h_kv, d = k_cache.shape
    k_cache.view(num_blocks * block_size, h_kv, d)[slot_mapping] = k.to(k_cache.dtype)
    v_cache.view(num_blocks * block_size, h_kv, d)[slot_mapping] = v.to(v_cache.dtype)


def move_kv(
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    src_slots: torch.Tensor,
    dst_slots: torch.Tensor,
) -> None:
    """Copy cache entries ``src_slots[i] -> dst_slots[i]`` (keep-path compaction).

    All sources are read before any destination is written, so overlapping moves
    (a tree path shifting down onto its own earlier slots) are safe.
    """
    num_blocks, block_size, h_kv, d = k_cache.shape
    for cache in (k_cache, v_cache):
        flat = cache.view(num_blocks * block_size, h_kv, d)
        flat[dst_slots] = flat[src_slots].clone()


def chain_tree_mask(n: int, device=None) -> torch.Tensor:
    """Ancestor bitmask of a chain of ``n`` <= 64 nodes: node i sees nodes 0..i.

    Returns [n] int64 with bit j of entry i set when node j is i or an ancestor of i.
    """
    if not 0 <= n <= 64:
        raise ValueError(f"a tree mask holds at most 64 nodes, got {n}")
    i = torch.arange(n, dtype=torch.int64, device=device)
    # (1 << (i + 1)) - 1 overflows to -1 for i = 63, which is exactly "all 64 bits set".
    return torch.where(i == 63, torch.full_like(i, -1), (1 << (i + 1)) - 1)


def _slots_of(block_table_row: torch.Tensor, length: int, block_size: int) -> torch.Tensor:
    pos = torch.arange(length, device=block_table_row.device)
    return block_table_row[pos // block_size].to(torch.int64) * block_size + pos % block_size


def verify_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    q_start: torch.Tensor,
    tree_mask: torch.Tensor | None,
    scale: float,
) -> torch.Tensor:
    """Attention of ragged query tokens over the paged KV cache.

    q:            [T, H, D]   queries of all sequences, concatenated
    k_cache:      [num_blocks, block_size, H_kv, D]   (H % H_kv == 0, GQA)
    v_cache:      [num_blocks, block_size, H_kv, D]
    block_table:  [B, max_blocks] int32
    seq_lens:     [B] int32   cached tokens of each sequence *including* its n_b new ones
    q_start:      [B + 1] int32  cumulative query offsets; n_b = q_start[b+1] - q_start[b]
    tree_mask:    [T] int64 or None. Bit j of tree_mask[t] is set when query t may see
                  the j-th new token of its own sequence (itself and its tree ancestors).
                  None means causal order among the new tokens (prefill, decode, chain).
    scale:        softmax scale, usually D ** -0.5
    returns:      [T, H, D] in q's dtype

    Query i of sequence b sees every cached position < seq_lens[b] - n_b (the committed
    prefix), plus the new positions its mask allows. A query that sees nothing yields
    zeros.
    """
    T, H, D = q.shape
    block_size, h_kv = k_cache.shape[1], k_cache.shape[2]
    group = H // h_kv
    out = torch.zeros(T, H, D, dtype=torch.float32, device=q.device)
    starts = q_start.tolist()
    lens = seq_lens.tolist()
    flat_k = k_cache.view(-1, h_kv, D)
    flat_v = v_cache.view(-1, h_kv, D)
    for b, length in enumerate(lens):
        t0, t1 = starts[b], starts[b + 1]
        n = t1 - t0
        if n == 0:
            continue
        slots = _slots_of(block_table[b], length, block_size)
        k = flat_k[slots].float().repeat_interleave(group, dim=1)  # [L, H, D]
        v = flat_v[slots].float().repeat_interleave(group, dim=1)  # [L, H, D]
        prefix = length - n
        pos = torch.arange(length, device=q.device)  # [L]
        qi = torch.arange(n, device=q.device)  # [n]
        if tree_mask is None:
            visible = pos[None, :] <= prefix + qi[:, None]  # [n, L]
        else:
            j = (pos - prefix).clamp(min=0)
            bits = (tree_mask[t0:t1, None] >> j[None, :]) & 1  # [n, L]
            visible = (pos[None, :] < prefix) | ((pos[None, :] >= prefix) & (bits == 1))
        scores = torch.einsum("nhd,lhd->hnl", q[t0:t1].float(), k) * scale  # [H, n, L]
        scores = scores.masked_fill(~visible[None], float("-inf"))
        probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # all-masked rows -> 0
        out[t0:t1] = torch.einsum("hnl,lhd->nhd", probs, v)
    return out.to(q.dtype)


def sampling_probs(
    logits: torch.Tensor,
    temperature: torch.Tensor,
    top_k: torch.Tensor,
    top_p: torch.Tensor,
) -> torch.Tensor:
    """The distribution a sequence samples from: temperature, then top-k, then top-p.

    logits:      [N, V] any float dtype
    temperature: [N] float32; 0 means greedy (a point mass on the first argmax)
    top_k:       [N] int32; 0 (or >= V) disables it
    top_p:       [N] float32 in (0, 1]; 1 disables it
    returns:     [N, V] float32 probabilities, each row sums to 1

    Ties are kept together, so the rule is a pair of thresholds a kernel can find with a
    pivot search instead of a sort:
      top-k keeps x  iff  logit(x) >= the k-th largest logit;
      top-p keeps x  iff  the (top-k renormalised) mass of tokens strictly more likely
                          than x is < top_p (the token crossing p is kept).
    """
    x = logits.float()
    n, v = x.shape
    greedy = temperature <= 0
    t = torch.where(greedy, torch.ones_like(temperature), temperature).float()
    x = x / t[:, None]
    # -- top-k: threshold at the k-th largest logit --
    k = torch.where((top_k <= 0) | (top_k >= v), torch.full_like(top_k, v), top_k).long()
    kth = torch.sort(x, dim=-1, descending=True).values.gather(1, (k - 1)[:, None])  # [N, 1]
    x = x.masked_fill(x < kth, float("-inf"))
    probs = torch.softmax(x, dim=-1)
    # -- top-p: mass strictly above each token --
    sorted_p, _ = torch.sort(probs, dim=-1, descending=True)
    cum = torch.cumsum(sorted_p, dim=-1)  # cum[i] = mass of the i+1 largest
    # mass strictly greater than p(x): cumulative mass of sorted entries > p(x)
    # (entries of the descending sort that are > p(x)), found by binary search
    n_greater = torch.searchsorted(-sorted_p, -probs, side="left")  # [N, V]
    above = torch.where(
        n_greater > 0, cum.gather(1, (n_greater - 1).clamp(min=0)), torch.zeros_like(probs)
    )
    keep = above < top_p.float()[:, None]
    probs = probs * keep
    probs = probs / probs.sum(-1, keepdim=True)
    # -- greedy rows: point mass on the first argmax of the raw logits --
    onehot = torch.zeros_like(probs)
    onehot.scatter_(1, logits.float().argmax(-1, keepdim=True), 1.0)
    return torch.where(greedy[:, None], onehot, probs)


# ---------------------------------------------------------------------------------------
# Rejection sampling (chain drafts). Shared argument checks live here so the Triton
# launcher in rejection_sampling.py applies exactly the same ones.
# ---------------------------------------------------------------------------------------

_LOGIT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _check_rejection_args(
    target_logits, draft_token_ids, draft_probs, cu_num_draft, max_num_draft,
    temperature, top_k, top_p, seeds, offsets,
) -> tuple[int, int]:
    """Shape, dtype and device checks that need no device read. Returns (B, V)."""
    if target_logits.dim() != 2 or target_logits.shape[1] < 1:
        raise ValueError(
            f"target_logits must be [rows, V] with V >= 1, got {tuple(target_logits.shape)}")
    if target_logits.dtype not in _LOGIT_DTYPES:
        raise ValueError(
            f"target_logits must be float32, float16 or bfloat16, got {target_logits.dtype}")
    rows, vocab = target_logits.shape
    if cu_num_draft.dim() != 1 or cu_num_draft.shape[0] < 1:
        raise ValueError(f"cu_num_draft must be [B + 1], got {tuple(cu_num_draft.shape)}")
    batch = cu_num_draft.shape[0] - 1
    if draft_token_ids.dim() != 1:
        raise ValueError(
            f"draft_token_ids must be 1-D [sum n_b], got {tuple(draft_token_ids.shape)}")
    n_draft = draft_token_ids.shape[0]
    expected = {
        "draft_token_ids": (draft_token_ids, torch.int64, (n_draft,)),
        "cu_num_draft": (cu_num_draft, torch.int32, (batch + 1,)),
        "temperature": (temperature, torch.float32, (batch,)),
        "top_k": (top_k, torch.int32, (batch,)),
        "top_p": (top_p, torch.float32, (batch,)),
        "seeds": (seeds, torch.int64, (batch,)),
        "offsets": (offsets, torch.int64, (batch,)),
    }
    if draft_probs is not None:
        expected["draft_probs"] = (draft_probs, torch.float32, (n_draft, vocab))
    for name, (t, dtype, shape) in expected.items():
        if tuple(t.shape) != shape:
            raise ValueError(f"{name} must have shape {shape} (B={batch}, sum n_b={n_draft}, "
                             f"V={vocab}), got {tuple(t.shape)}")
        if t.dtype != dtype:
            raise ValueError(f"{name} must be {dtype}, got {t.dtype}")
        if t.device != target_logits.device:
            raise ValueError(
                f"{name} is on {t.device} but target_logits is on {target_logits.device}")
    if rows != n_draft + batch:
        raise ValueError(f"target_logits has {rows} rows; {batch} sequences with {n_draft} drafts "
                         f"in all need sum (n_b + 1) = {n_draft + batch}")
    if not isinstance(max_num_draft, int) or max_num_draft < 0:
        raise ValueError(f"max_num_draft must be a host int >= 0, got {max_num_draft!r}")
    if n_draft > batch * max_num_draft:
        raise ValueError(f"{n_draft} drafts cannot fit {batch} sequences of at most "
                         f"max_num_draft={max_num_draft}")
    return batch, vocab


def _check_draft_layout(cu_num_draft, draft_token_ids, max_num_draft: int, vocab: int) -> None:
    """Checks that read device values (one host copy): cu_num_draft and draft token ids."""
    cu = cu_num_draft.cpu().long()
    n_draft = draft_token_ids.shape[0]
    if cu[0] != 0 or cu[-1] != n_draft:
        raise ValueError(f"cu_num_draft must run from 0 to sum n_b = {n_draft}, "
                         f"got {int(cu[0])} .. {int(cu[-1])}")
    n = cu[1:] - cu[:-1]
    wrong = ((n < 0) | (n > max_num_draft)).nonzero().flatten().tolist()
    if wrong:
        raise ValueError(f"draft counts n_b must be in [0, max_num_draft={max_num_draft}]; "
                         f"sequence(s) {wrong} have {n[wrong].tolist()}")
    ids = draft_token_ids.cpu()
    out_of_range = ((ids < 0) | (ids >= vocab)).nonzero().flatten()
    if out_of_range.numel():
        seqs = torch.unique(torch.searchsorted(cu, out_of_range, right=True) - 1).tolist()
        raise ValueError(f"draft_token_ids of sequence(s) {seqs} lie outside [0, V={vocab})")


def _raise_if_flagged(n_accepted: torch.Tensor) -> None:
    """Raise naming the sequences flagged with n_accepted = -1 (one host copy)."""
    flagged = (n_accepted < 0).nonzero().flatten().tolist()
    if flagged:
        raise ValueError(f"target_logits of sequence(s) {flagged} contain NaN or +inf, "
                         f"or a row that is all -inf")


def rejection_sample(
    target_logits: torch.Tensor,
    draft_token_ids: torch.Tensor,
    draft_probs: torch.Tensor | None,
    cu_num_draft: torch.Tensor,
    max_num_draft: int,
    temperature: torch.Tensor,
    top_k: torch.Tensor,
    top_p: torch.Tensor,
    seeds: torch.Tensor,
    offsets: torch.Tensor,
    check_finite: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Speculative rejection sampling of chain drafts for a ragged batch.

    target_logits:   [sum_b (n_b + 1), V] float32/float16/bfloat16. Sequence b owns rows
                     cu_num_draft[b] + b .. cu_num_draft[b + 1] + b: the row of its last
                     committed token (scores draft 1), then one row per draft token (the
                     last one scores the bonus token).
    draft_token_ids: [sum_b n_b] int64
    draft_probs:     [sum_b n_b, V] float32, the distribution q each draft was sampled
                     from, or None for a point-mass drafter (n-gram)
    cu_num_draft:    [B + 1] int32 cumulative draft counts; n_b may be 0
    max_num_draft:   host int, k_max >= max_b n_b
    temperature:     [B] float32, <= 0 means greedy
    top_k:           [B] int32, <= 0 (or >= V) disables
    top_p:           [B] float32 in (0, 1], 1 disables
    seeds, offsets:  [B] int64, the Philox key and counter of each sequence
    check_finite:    raise ValueError on bad values (costs host copies, see below)
    returns:         out_tokens [B, k_max + 1] int64 padded with -1, n_accepted [B] int32

    The rule (Leviathan et al. 2023, Chen et al. 2023), with p_i = ``sampling_probs`` of
    row i and q_i the draft distribution of draft i (0-based):
      - greedy: accept while x_i == argmax(row i) (first argmax of the raw logits), then
        emit the argmax of the next row;
      - otherwise accept x_i iff ``u_i * q_i(x_i) < p_i(x_i)``, u_i = Philox stream 0,
        draw i; a point-mass drafter has q_i(x_i) = 1. On the first rejection emit a
        sample of the residual max(p_i - q_i, 0) (point mass: p_i with x_i removed),
        renormalised, or of p_i when the residual sums to 0; if all n_b drafts are
        accepted, emit a sample of p_{n_b} (the bonus token). The emitted sample uses
        inverse CDF (``sample_inverse_cdf``) with Philox stream 1, draw = its row index.
    out_tokens[b] = accepted drafts, the emitted token, then -1; n_accepted[b] counts the
    accepted drafts, so n_accepted[b] + 1 tokens are valid.

    Bad values: NaN or +inf anywhere in a sequence's rows, or one of its rows all -inf
    (a lone -inf is a legal masked token), draft ids outside [0, V), or draft counts out
    of [0, max_num_draft]. With check_finite=True they raise ValueError naming the
    sequences (host copies of cu_num_draft, the draft ids and n_accepted); with
    check_finite=False nothing is copied to the host and such a sequence returns
    n_accepted = -1 and an all -1 row.

    Example::

        >>> logits = torch.tensor([[0.0, 5.0, 0.0], [0.0, 0.0, 5.0]])
        >>> i32, i64 = torch.int32, torch.int64
        >>> rejection_sample(logits, torch.tensor([1]), None, torch.tensor([0, 1], dtype=i32), 1,
        ...                  torch.zeros(1), torch.zeros(1, dtype=i32), torch.ones(1),
        ...                  torch.zeros(1, dtype=i64), torch.zeros(1, dtype=i64))
        (tensor([[1, 2]]), tensor([1], dtype=torch.int32))
    """
    batch, vocab = _check_rejection_args(target_logits, draft_token_ids, draft_probs, cu_num_draft,
                                         max_num_draft, temperature, top_k, top_p, seeds, offsets)
    if check_finite:
        _check_draft_layout(cu_num_draft, draft_token_ids, max_num_draft, vocab)
    dev = target_logits.device
    k_max = max_num_draft
    n_draft = draft_token_ids.shape[0]
    # -- ragged layout -> a [B, k_max + 1] grid; a sequence with a bad layout gets n_b = 0 --
    start, end = cu_num_draft[:-1].long(), cu_num_draft[1:].long()  # [B]
    n = end - start
    layout_ok = (start >= 0) & (n >= 0) & (n <= k_max) & (end <= n_draft)
    n = torch.where(layout_ok, n, 0)
    start = torch.where(layout_ok, start, 0)
    b_idx = torch.arange(batch, device=dev)
    pos = torch.arange(k_max + 1, device=dev)  # [K+1]
    row_ok = pos[None, :] <= n[:, None]  # [B, K+1]
    draft_ok = pos[None, :k_max] < n[:, None]  # [B, K]
    rows = (start + b_idx)[:, None] + pos[None, :]  # [B, K+1]
    rows = rows.clamp(max=target_logits.shape[0] - 1)
    drafts = (start[:, None] + pos[None, :k_max]).clamp(max=max(n_draft - 1, 0))  # [B, K]
    ids = draft_token_ids[drafts] if n_draft else torch.zeros_like(drafts)  # [B, K]
    # -- bad sequences: non-finite rows, draft ids outside the vocabulary, bad layout --
    raw = target_logits[rows.flatten()].float()  # [B*(K+1), V]
    row_bad = raw.isnan().any(-1) | raw.isposinf().any(-1) | raw.isneginf().all(-1)
    id_bad = (ids < 0) | (ids >= vocab)
    bad = (row_bad.view(batch, k_max + 1) & row_ok).any(1) | (id_bad & draft_ok).any(1)
    bad |= ~layout_ok
    ids = ids.clamp(0, vocab - 1)
    # -- target distributions of every row: [B, K+1, V] --
    rep = k_max + 1  # per-row copies of the per-sequence parameters
    probs = sampling_probs(raw, temperature.repeat_interleave(rep), top_k.repeat_interleave(rep),
                           top_p.repeat_interleave(rep)).view(batch, rep, vocab)
    argmax = raw.argmax(-1).view(batch, rep)  # first argmax, greedy rows
    greedy = temperature <= 0  # [B]
    # -- ratio test: accept x_i iff u_i * q_i(x_i) < p_i(x_i); a point mass has q_i(x_i) = 1 --
    p_at = probs[:, :k_max].gather(2, ids[..., None])[..., 0]  # [B, K]
    q_at = torch.ones_like(p_at)
    if draft_probs is not None and n_draft:
        q_at = draft_probs[drafts, ids]  # [B, K]
    u_accept = philox_uniform(seeds, offsets, k_max, SAMPLER_ACCEPT_STREAM)  # [B, K]
    accept = torch.where(greedy[:, None], ids == argmax[:, :k_max], u_accept * q_at < p_at)
    accept &= draft_ok
    n_acc = torch.cumprod(accept.long(), dim=1).sum(1)  # [B] length of the accepted prefix
    # -- the emitted token: a residual sample after a rejection, else the bonus token --
    p_s = probs[b_idx, n_acc]  # [B, V] the row the token is drawn from
    dist = p_s
    if k_max and n_draft:
        at = n_acc.clamp(max=k_max - 1)  # the rejected position, where n_acc < n
        if draft_probs is None:
            residual = p_s.scatter(1, ids.gather(1, at[:, None]), 0.0)  # p without x
        else:
            q_s = draft_probs[(start + at).clamp(max=n_draft - 1)]  # [B, V]
            residual = (p_s - q_s).clamp(min=0.0)  # max(p - q, 0)
        residual = torch.where(residual.sum(-1, keepdim=True) > 0, residual, p_s)
        dist = torch.where((n_acc < n)[:, None], residual, p_s)
    u_sample = philox_uniform(seeds, offsets, k_max + 1, SAMPLER_SAMPLE_STREAM)  # [B, K+1]
    sampled = sample_inverse_cdf(dist, u_sample.gather(1, n_acc[:, None])[:, 0])
    token = torch.where(greedy, argmax[b_idx, n_acc], sampled)  # [B]
    # -- assemble: accepted drafts, the emitted token, -1 padding --
    out = torch.full((batch, k_max + 1), -1, dtype=torch.int64, device=dev)
    out[:, :k_max] = torch.where(pos[None, :k_max] < n_acc[:, None], ids, -1)
    out[b_idx, n_acc] = token
    out = torch.where(bad[:, None], -1, out)
    n_accepted = torch.where(bad, -1, n_acc).to(torch.int32)
    if check_finite:
        _raise_if_flagged(n_accepted)
    return out, n_accepted
