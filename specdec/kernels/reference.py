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

import math

import torch
import torch.nn.functional as F

from ._validation import require, require_same_device, require_tensor, require_unit_stride, shape_of
from ._sampling_core import INT32_MIN, DraftDist, inverse_temperature, key_of
from .philox import SAMPLER_ACCEPT_STREAM, SAMPLER_SAMPLE_STREAM, philox_uniform, sample_inverse_cdf

__all__ = [
    "write_kv",
    "move_kv",
    "verify_attention",
    "sampling_probs",
    "draft_dist",
    "draft_dist_probs",
    "draft_sample",
    "rejection_sample",
    "tree_rejection_sample",
    "add_rms_norm",
    "rotary",
    "silu_mul",
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
    *,
    sliding_window: int | None = None,
    softcap: float | None = None,
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
    sliding_window: None, or W >= 1: a query at position p sees only keys at positions
                  > p - W (mistral / Gemma local layers). Positions: a committed key's is
                  its cache index; a causal query i's is prefix + i; a tree node's is
                  prefix + depth, depth = its ancestors among the new tokens (popcount of
                  its mask - 1), the position the engine rotates it by
    softcap:      None, or c > 0: scores become c * tanh(scores / c) before the mask
                  (Gemma 2's attention logit soft-capping)
    returns:      [T, H, D] in q's dtype

    Query i of sequence b sees every cached position < seq_lens[b] - n_b (the committed
    prefix), plus the new positions its mask allows, less those outside its window. A
    query that sees nothing yields zeros.
    """
    _check_window_args(sliding_window, softcap)
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
        if sliding_window is not None:
            q_pos, k_pos = _token_positions(tree_mask, t0, t1, prefix, pos)  # [n], [L]
            visible = visible & (q_pos[:, None] - k_pos[None, :] < sliding_window)
        scores = torch.einsum("nhd,lhd->hnl", q[t0:t1].float(), k) * scale  # [H, n, L]
        if softcap is not None:
            scores = softcap * torch.tanh(scores / softcap)
        scores = scores.masked_fill(~visible[None], float("-inf"))
        probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # all-masked rows -> 0
        out[t0:t1] = torch.einsum("hnl,lhd->nhd", probs, v)
    return out.to(q.dtype)


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


def _check_window_args(sliding_window, softcap) -> None:
    require(sliding_window is None or (isinstance(sliding_window, int) and not isinstance(sliding_window, bool)
                                       and sliding_window >= 1),
            f"sliding_window must be None or an integer >= 1, got {sliding_window!r}")
    require(softcap is None or (isinstance(softcap, (int, float)) and not isinstance(softcap, bool)
                                and math.isfinite(softcap) and softcap > 0),
            f"softcap must be None or a finite float > 0, got {softcap!r}")


def _token_positions(tree_mask, t0: int, t1: int, prefix: int, pos: torch.Tensor):
    """Positions of one sequence's queries [n] and of its cached keys [L] (see
    ``verify_attention``): new token j sits at prefix + j (causal) or prefix + depth_j."""
    n = t1 - t0
    if tree_mask is None:
        new_pos = prefix + torch.arange(n, device=pos.device)
    else:
        bits = (tree_mask[t0:t1, None] >> torch.arange(64, device=pos.device)) & 1  # [n, 64]
        new_pos = prefix + bits.sum(-1) - 1  # depth = ancestors among the new tokens
    k_pos = pos.clone()
    k_pos[prefix:] = new_pos
    return new_pos, k_pos


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


# ---------------------------------------------------------------------------------------
# Rejection sampling (chain drafts). Shared argument checks live here so the Triton
# launcher in rejection_sampling.py applies exactly the same ones.
# ---------------------------------------------------------------------------------------

_LOGIT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _check_tensors(expected: dict, target_logits: torch.Tensor, sizes: str) -> None:
    """``expected``: name -> (tensor, dtype, shape); each must match and share the logits' device."""
    for name, (t, dtype, shape) in expected.items():
        if tuple(t.shape) != shape:
            raise ValueError(f"{name} must have shape {shape} ({sizes}), got {tuple(t.shape)}")
        if t.dtype != dtype:
            raise ValueError(f"{name} must be {dtype}, got {t.dtype}")
        if t.device != target_logits.device:
            raise ValueError(
                f"{name} is on {t.device} but target_logits is on {target_logits.device}")


def _check_ragged(target_logits, draft_token_ids, cu, cu_name: str, count: str) -> tuple[int, int, int, int]:
    """The layout checks both samplers share: logits [rows, V] of a logit dtype, ``cu``
    [B + 1], draft ids 1-D. Returns (rows, V, B, number of drafts)."""
    if target_logits.dim() != 2 or target_logits.shape[1] < 1:
        raise ValueError(
            f"target_logits must be [rows, V] with V >= 1, got {tuple(target_logits.shape)}")
    if target_logits.dtype not in _LOGIT_DTYPES:
        raise ValueError(
            f"target_logits must be float32, float16 or bfloat16, got {target_logits.dtype}")
    if cu.dim() != 1 or cu.shape[0] < 1:
        raise ValueError(f"{cu_name} must be [B + 1], got {tuple(cu.shape)}")
    if draft_token_ids.dim() != 1:
        raise ValueError(
            f"draft_token_ids must be 1-D [sum {count}], got {tuple(draft_token_ids.shape)}")
    rows, vocab = target_logits.shape
    return rows, vocab, cu.shape[0] - 1, draft_token_ids.shape[0]


def check_draft_dist(q, rows: int, vocab: int, target_logits: torch.Tensor) -> None:
    """``q``: None or a DraftDist of ``rows`` rows over ``vocab`` tokens on the logits'
    device: logits [rows, V] of a logit dtype with stride(1) == 1, inv_t / m / z [rows]
    float32, thr [rows] int32."""
    if q is None:
        return
    if not isinstance(q, DraftDist):
        raise TypeError(f"the draft distribution must be a DraftDist or None, got "
                        f"{type(q).__name__} (build one with reference.draft_dist or the "
                        f"backend's draft_sample)")
    if q.logits.dtype not in _LOGIT_DTYPES:
        raise ValueError(f"q.logits must be float32, float16 or bfloat16, got {q.logits.dtype}")
    if q.logits.dim() == 2 and q.logits.shape[1] > 1 and q.logits.stride(1) != 1:
        raise ValueError(f"q.logits must have stride 1 in its last dimension, got {q.logits.stride()}")
    _check_tensors({
        "q.logits": (q.logits, q.logits.dtype, (rows, vocab)),
        "q.inv_t": (q.inv_t, torch.float32, (rows,)),
        "q.m": (q.m, torch.float32, (rows,)),
        "q.z": (q.z, torch.float32, (rows,)),
        "q.thr": (q.thr, torch.int32, (rows,)),
    }, target_logits, f"{rows} draft rows, V={vocab}")


def _per_sequence(batch: int, temperature, top_k, top_p, seeds, offsets) -> dict:
    """The per-sequence sampling tensors' expected dtype and shape, for ``_check_tensors``."""
    return {
        "temperature": (temperature, torch.float32, (batch,)),
        "top_k": (top_k, torch.int32, (batch,)),
        "top_p": (top_p, torch.float32, (batch,)),
        "seeds": (seeds, torch.int64, (batch,)),
        "offsets": (offsets, torch.int64, (batch,)),
    }


def _check_rejection_args(
    target_logits, draft_token_ids, q, cu_num_draft, max_num_draft,
    temperature, top_k, top_p, seeds, offsets, num_draft=None,
) -> tuple[int, int]:
    """Shape, dtype and device checks that need no device read. Returns (B, V)."""
    rows, vocab, batch, n_draft = _check_ragged(target_logits, draft_token_ids, cu_num_draft,
                                                "cu_num_draft", "n_b")
    expected = {
        "draft_token_ids": (draft_token_ids, torch.int64, (n_draft,)),
        "cu_num_draft": (cu_num_draft, torch.int32, (batch + 1,)),
        **_per_sequence(batch, temperature, top_k, top_p, seeds, offsets),
    }
    if num_draft is not None:
        expected["num_draft"] = (num_draft, torch.int32, (batch,))
    _check_tensors(expected, target_logits, f"B={batch}, sum n_b={n_draft}, V={vocab}")
    check_draft_dist(q, n_draft, vocab, target_logits)
    if rows != n_draft + batch:
        raise ValueError(f"target_logits has {rows} rows; {batch} sequences with {n_draft} drafts "
                         f"in all need sum (n_b + 1) = {n_draft + batch}")
    if not isinstance(max_num_draft, int) or max_num_draft < 0:
        raise ValueError(f"max_num_draft must be a host int >= 0, got {max_num_draft!r}")
    if n_draft > batch * max_num_draft:
        raise ValueError(f"{n_draft} drafts cannot fit {batch} sequences of at most "
                         f"max_num_draft={max_num_draft}")
    return batch, vocab


def _host_counts(cu_t: torch.Tensor, total: int, cu_name: str, counts: str, limit: int,
                 limit_text: str) -> torch.Tensor:
    """Copy cumulative counts to the host and check them: from 0 to ``total``, each count
    in [0, limit]. Returns the host int64 copy."""
    cu = cu_t.cpu().long()
    symbol = counts.split()[-1]  # n_b or N_b
    if cu[0] != 0 or cu[-1] != total:
        raise ValueError(f"{cu_name} must run from 0 to sum {symbol} = {total}, "
                         f"got {int(cu[0])} .. {int(cu[-1])}")
    n = cu[1:] - cu[:-1]
    wrong = ((n < 0) | (n > limit)).nonzero().flatten().tolist()
    if wrong:
        raise ValueError(f"{counts} must be in [0, {limit_text}]; "
                         f"sequence(s) {wrong} have {n[wrong].tolist()}")
    return cu


def _check_draft_layout(cu_num_draft, draft_token_ids, max_num_draft: int, vocab: int) -> None:
    """Checks that read device values (one host copy): cu_num_draft and draft token ids."""
    cu = _host_counts(cu_num_draft, draft_token_ids.shape[0], "cu_num_draft", "draft counts n_b",
                      max_num_draft, f"max_num_draft={max_num_draft}")
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
    """Speculative rejection sampling of chain drafts for a ragged batch.

    target_logits:   [sum_b (n_b + 1), V] float32/float16/bfloat16. Sequence b owns rows
                     cu_num_draft[b] + b .. cu_num_draft[b + 1] + b: the row of its last
                     committed token (scores draft 1), then one row per draft token (the
                     last one scores the bonus token).
    draft_token_ids: [sum_b n_b] int64
    q:               DraftDist of sum_b n_b rows, the distribution each draft was sampled
                     from (``_sampling_core.DraftDist``), or None for a point-mass
                     drafter (n-gram)
    cu_num_draft:    [B + 1] int32 cumulative draft counts; n_b may be 0
    max_num_draft:   host int, k_max >= max_b n_b
    temperature:     [B] float32, <= 0 means greedy
    top_k:           [B] int32, <= 0 (or >= V) disables
    top_p:           [B] float32 in (0, 1], 1 disables
    seeds, offsets:  [B] int64, the Philox key and counter of each sequence
    check_finite:    raise ValueError on bad values (costs host copies, see below)
    num_draft:       [B] int32 or None (keyword). Test only the first min(n_b, num_draft[b])
                     drafts of sequence b, its rows and drafts still laid out by
                     cu_num_draft: a fixed-shape step drafts k for every sequence and caps
                     those near their token limit
    filtered:        host hint (keyword): False promises no top-k / top-p (skips the
                     sorts); radix_rounds: the kernel's hint, ignored here
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
    batch, vocab = _check_rejection_args(target_logits, draft_token_ids, q, cu_num_draft,
                                         max_num_draft, temperature, top_k, top_p, seeds, offsets,
                                         num_draft)
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
    if num_draft is not None:  # test fewer drafts than the slice holds
        n = torch.minimum(n, num_draft.long().clamp(min=0))
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
                           top_p.repeat_interleave(rep), filtered=filtered).view(batch, rep, vocab)
    argmax = raw.argmax(-1).view(batch, rep)  # first argmax, greedy rows
    greedy = temperature <= 0  # [B]
    # an all-greedy batch on the CPU needs no random numbers (reading the flag is free there)
    draws = dev.type != "cpu" or not bool(greedy.all())
    # -- ratio test: accept x_i iff u_i * q_i(x_i) < p_i(x_i); a point mass has q_i(x_i) = 1 --
    p_at = probs[:, :k_max].gather(2, ids[..., None])[..., 0]  # [B, K]
    q_at = torch.ones_like(p_at)
    draft_probs = draft_dist_probs(q) if q is not None and n_draft else None  # [sum n_b, V]
    if draft_probs is not None:
        q_at = draft_probs[drafts, ids]  # [B, K]
    u_accept = (philox_uniform(seeds, offsets, k_max, SAMPLER_ACCEPT_STREAM) if draws
                else torch.zeros_like(p_at))  # [B, K]
    accept = torch.where(greedy[:, None], ids == argmax[:, :k_max], u_accept * q_at < p_at)
    accept &= draft_ok
    n_acc = torch.cumprod(accept.long(), dim=1).sum(1)  # [B] length of the accepted prefix
    # -- the emitted token: a residual sample after a rejection, else the bonus token --
    p_s = probs[b_idx, n_acc]  # [B, V] the row the token is drawn from
    dist = p_s
    if k_max and n_draft:
        at = n_acc.clamp(max=k_max - 1)  # the rejected position, where n_acc < n
        if draft_probs is None:  # point-mass drafts
            residual = p_s.scatter(1, ids.gather(1, at[:, None]), 0.0)  # p without x
        else:
            q_s = draft_probs[(start + at).clamp(max=n_draft - 1)]  # [B, V]
            residual = (p_s - q_s).clamp(min=0.0)  # max(p - q, 0)
        residual = torch.where(residual.sum(-1, keepdim=True) > 0, residual, p_s)
        dist = torch.where((n_acc < n)[:, None], residual, p_s)
    if draws:
        u_sample = philox_uniform(seeds, offsets, k_max + 1, SAMPLER_SAMPLE_STREAM)  # [B, K+1]
        sampled = sample_inverse_cdf(dist, u_sample.gather(1, n_acc[:, None])[:, 0])
        token = torch.where(greedy, argmax[b_idx, n_acc], sampled)  # [B]
    else:
        token = argmax[b_idx, n_acc]
    # -- assemble: accepted drafts, the emitted token, -1 padding --
    out = torch.full((batch, k_max + 1), -1, dtype=torch.int64, device=dev)
    out[:, :k_max] = torch.where(pos[None, :k_max] < n_acc[:, None], ids, -1)
    out[b_idx, n_acc] = token
    out = torch.where(bad[:, None], -1, out)
    n_accepted = torch.where(bad, -1, n_acc).to(torch.int32)
    if check_finite:
        _raise_if_flagged(n_accepted)
    return out, n_accepted


# ---------------------------------------------------------------------------------------
# Tree verification: SpecInfer's multi-step speculative sampling over a draft tree. The
# argument checks are shared with the Triton launcher in tree_sampling.py.
# ---------------------------------------------------------------------------------------

MAX_TREE_NODES = 64  # a tree's ancestor mask is one 64-bit word per node
TREE_ACCEPT_STREAM = 2  # Philox stream of the acceptance uniform of node i (j = i)
TREE_SAMPLE_STREAM = 3  # Philox stream of the emitted sample from tree row r (j = r)


def _check_tree_args(
    target_logits, draft_token_ids, parents, q, cu_num_nodes, max_depth,
    temperature, top_k, top_p, seeds, offsets,
) -> tuple[int, int]:
    """Shape, dtype and device checks of ``tree_rejection_sample`` that read no device
    value. Returns (B, V)."""
    for name, t in (("target_logits", target_logits), ("draft_token_ids", draft_token_ids),
                    ("parents", parents), ("cu_num_nodes", cu_num_nodes),
                    ("temperature", temperature), ("top_k", top_k), ("top_p", top_p),
                    ("seeds", seeds), ("offsets", offsets)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    rows, vocab, batch, n_nodes = _check_ragged(target_logits, draft_token_ids, cu_num_nodes,
                                                "cu_num_nodes", "N_b")
    if rows != n_nodes + batch:
        raise ValueError(f"target_logits has {rows} rows; {batch} sequences with {n_nodes} nodes "
                         f"in all need sum (N_b + 1) = {n_nodes + batch}")
    expected = {
        "draft_token_ids": (draft_token_ids, torch.int64, (n_nodes,)),
        "parents": (parents, torch.int32, (n_nodes,)),
        "cu_num_nodes": (cu_num_nodes, torch.int32, (batch + 1,)),
        **_per_sequence(batch, temperature, top_k, top_p, seeds, offsets),
    }
    _check_tensors(expected, target_logits, f"B={batch}, sum N_b={n_nodes}, rows={rows}, V={vocab}")
    check_draft_dist(q, rows, vocab, target_logits)
    if (not isinstance(max_depth, int) or isinstance(max_depth, bool)
            or not 0 <= max_depth <= MAX_TREE_NODES):
        raise ValueError(f"max_depth must be a host int in [0, {MAX_TREE_NODES}], "
                         f"got {max_depth!r}")
    if n_nodes > batch * MAX_TREE_NODES:
        raise ValueError(f"{n_nodes} nodes cannot fit {batch} trees of at most "
                         f"{MAX_TREE_NODES} nodes")
    return batch, vocab


def _tree_depths(par: torch.Tensor) -> torch.Tensor:
    """Depth of every node (children of the root have depth 1) by pointer jumping.

    par:     [B, M] int64 local parent index, -1 for a child of the root (and for padding);
             every entry must be < its own column index (checked by the callers)
    returns: [B, M] int64

    After step s, ``anc`` is the 2**s-th ancestor and ``depth`` the number of edges to it;
    six steps cover any depth <= 64.
    """
    anc = par.clone()
    depth = torch.ones_like(par)
    for _ in range(6):
        has = anc >= 0
        at = anc.clamp(min=0)
        depth = depth + torch.where(has, depth.gather(1, at), 0)
        anc = torch.where(has, anc.gather(1, at), -1)
    return depth


def _tree_table(cu_num_nodes, values, fill):
    """Ragged per-node values -> [B, MAX_TREE_NODES] (``fill`` past N_b); sequences with
    a bad slice (N_b outside [0, 64], out of bounds) get N_b = 0.

    Returns (table [B, M], n [B] int64, start [B] int64, layout_ok [B] bool).
    """
    m, total = MAX_TREE_NODES, values.shape[0]
    start, end = cu_num_nodes[:-1].long(), cu_num_nodes[1:].long()
    n = end - start
    layout_ok = (start >= 0) & (n >= 0) & (n <= m) & (end <= total)
    n = torch.where(layout_ok, n, 0)
    start = torch.where(layout_ok, start, 0)
    j = torch.arange(m, device=values.device)
    flat = (start[:, None] + j[None, :]).clamp(max=max(total - 1, 0))  # [B, M]
    table = values[flat].long() if total else torch.zeros_like(flat)
    table = torch.where(j[None, :] < n[:, None], table, fill)
    return table, n, start, layout_ok


def _check_tree_layout(cu_num_nodes, draft_token_ids, parents, max_depth: int,
                       vocab: int) -> None:
    """Checks that read device values (host copies): node counts, token ids, parents,
    depths. Raises ValueError naming the sequences."""
    cu = _host_counts(cu_num_nodes, draft_token_ids.shape[0], "cu_num_nodes", "node counts N_b",
                      MAX_TREE_NODES, str(MAX_TREE_NODES))
    tok, n, _, _ = _tree_table(cu, draft_token_ids.cpu(), 0)
    par, _, _, _ = _tree_table(cu, parents.cpu(), -1)
    j = torch.arange(MAX_TREE_NODES)
    seqs = ((tok < 0) | (tok >= vocab)).any(1).nonzero().flatten().tolist()
    if seqs:
        raise ValueError(f"draft_token_ids of sequence(s) {seqs} lie outside [0, V={vocab})")
    seqs = ((par < -1) | (par >= j)).any(1).nonzero().flatten().tolist()
    if seqs:
        raise ValueError(f"parents of sequence(s) {seqs} are not in [-1, i) for node i "
                         f"(nodes must be numbered in topological order)")
    depth = torch.where(j < n[:, None], _tree_depths(par), 0)
    seqs = (depth > max_depth).any(1).nonzero().flatten().tolist()
    if seqs:
        raise ValueError(f"trees of sequence(s) {seqs} are deeper than max_depth={max_depth} "
                         f"(depths {depth[seqs].amax(1).tolist()})")


def _sibling_residual(p_cur: torch.Tensor, q: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
    """p' after its child x was rejected: max(p' - q, 0) (point mass: p' without x),
    renormalised; p' itself where that sums to 0.

    p_cur: [B, V] float32 rows summing to 1; q: [B, V] float32 or None; x: [B] int64
    """
    if q is not None:
        residual = (p_cur - q).clamp(min=0.0)
    else:
        residual = p_cur.scatter(1, x[:, None], 0.0)
    total = residual.sum(-1, keepdim=True)  # [B, 1]
    return torch.where(total > 0, residual / torch.where(total > 0, total, 1.0), p_cur)


def tree_rejection_sample(
    target_logits: torch.Tensor,
    draft_token_ids: torch.Tensor,
    parents: torch.Tensor,
    q: DraftDist | None,
    cu_num_nodes: torch.Tensor,
    max_depth: int,
    temperature: torch.Tensor,
    top_k: torch.Tensor,
    top_p: torch.Tensor,
    seeds: torch.Tensor,
    offsets: torch.Tensor,
    check_finite: bool = True,
    *,
    radix_rounds: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Speculative verification of draft trees for a ragged batch (SpecInfer).

    Sequence b has N_b <= 64 draft nodes numbered 0..N_b-1 in topological order (a parent's
    index is below its children's); the children of a position are tried in increasing
    node index (a breadth-first numbering makes siblings contiguous; not required).
    Tree row 0 of a sequence is its root (the last committed token), tree row 1 + i is
    node i; a sequence's rows start at cu_num_nodes[b] + b.

    target_logits:   [sum_b (N_b + 1), V] float32/float16/bfloat16, target logits of every
                     tree row; row r scores the children of tree position r
    draft_token_ids: [sum_b N_b] int64, the token of each node
    parents:         [sum_b N_b] int32, parent node index within the sequence, -1 for the
                     children of the root
    q:               DraftDist (``_sampling_core``) of sum_b (N_b + 1) rows with
                     target_logits' row layout: row r is the draft distribution q_r the
                     children of tree position r were drawn from (after the drafter's own
                     temperature / top-k / top-p); rows of childless positions are not
                     read. None: the children are deterministic candidates (top-b of a
                     drafter, n-gram continuations).
    cu_num_nodes:    [B + 1] int32 cumulative node counts; N_b may be 0
    max_depth:       host int D in [0, 64] >= the depth of every tree (children of the
                     root have depth 1)
    temperature, top_k, top_p, seeds, offsets, check_finite: as in ``rejection_sample``;
    radix_rounds: the kernel's hint, ignored here
    returns:         out_tokens [B, D + 1] int64 (the accepted path's tokens, one emitted
                     token, then -1), n_accepted [B] int32 (path length), accepted_nodes
                     [B, D] int32 (node indices of the accepted path, root to leaf, then -1)

    The walk starts at the root; at position u with p_u = ``sampling_probs`` of its row:
      - greedy (temperature <= 0): move to the first child whose token is the first argmax
        of the raw logits; if none, emit that argmax;
      - q None (deterministic candidates): p' = p_u; for each child c in order
        accept x_c with probability p'(x_c) (u_c < p'(x_c)); on rejection p' <- p' with
        x_c zeroed, renormalised (a duplicate of a rejected sibling has p'(x) = 0);
      - q given (children of u i.i.d. from q_u): multi-step speculative sampling
        (Miao et al. 2024, "SpecInfer", Algorithm 2, Theorem 4.2). p' = p_u; for each child c
        in order accept x_c with probability min(1, p'(x_c) / q_u(x_c)), i.e. iff
        u_c * q_u(x_c) < p'(x_c); on rejection p' <- max(p' - q_u, 0), renormalised;
      - on acceptance move to c; when every child of u is rejected (or u has none) emit a
        sample of the final p'. If a residual sums to 0, p' is kept unchanged: exactly
        that needs p' <= q_u everywhere, i.e. p' == q_u, where every x with q_u(x) > 0 is
        accepted, so it is reached only through rounding (or a child with q_u(x_c) = 0).
    Uniforms (``philox.py``): u_c = Philox stream 2, draw c (node index); the emitted
    sample from tree row r uses stream 3, draw r, by inverse CDF (``sample_inverse_cdf``).

    Why the sampled rule is exact (the proof of SpecInfer's Theorem 4.2): let r be the
    current p' and x_1..x_k the untried children, i.i.d. from q and independent of the
    uniforms and of the earlier siblings. Claim: the token leaving u has law r. k = 0: it is
    a sample of r. k >= 1: x_1 = x is accepted with probability q(x) min(1, r(x)/q(x)) =
    min(q, r)(x); it is rejected with probability beta = sum_x max(r - q, 0)(x) (as
    sum min(q, r) + sum max(r - q, 0) = sum r = 1), and then — x_2..x_k still i.i.d. q,
    because they are independent of (x_1, u_1) — by induction the token has law
    max(r - q, 0) / beta. In all: min(q, r) + max(r - q, 0) = r. With r = p_u the token
    leaving the root has the target law; given that the accepted child c carries it, c's
    own children are i.i.d. from q_c independently of everything used so far, so the
    same argument at c gives the next token law p_c, and so on down the path (the bonus
    token after a leaf is a plain sample of p_leaf). The deterministic rule is the same
    argument with q = the point mass at x_c (min(q, r) = r(x_c) at x_c); it holds for
    any candidates chosen independently of the sampler's uniforms, so q=None
    is exact whatever the drafter did — q only raises the acceptance rate, and
    is exact only under the contract below.

    What a drafter must do for q to be right: draw the children of each
    position u i.i.d. (with replacement, duplicates kept) from exactly q_u = row u of q,
    with fresh randomness per position (never Philox streams 0..15 of the
    sequence's (seed, offset)). The number of children of u, and q_u itself, may depend
    on anything outside u's own subtree (a fixed branching, a budget split by the
    ancestors' draft scores), never on the tokens drawn for u's children. Children drawn
    without replacement (Sequoia), de-duplicated, or top-b (EAGLE) break this rule: the
    first two need Jeon et al. 2024's recursive rejection sampling (q renormalised after
    each rejection), not provided here; for any of them pass q=None.

    Bad values (flagged with n_accepted = -1 and all -1 outputs when check_finite=False,
    a ValueError naming the sequences otherwise): NaN / +inf / an all -inf row among the
    rows the walk reads (rows off the accepted path are never read), token ids outside
    [0, V), parents outside [-1, i), trees deeper than max_depth, N_b outside [0, 64].

    Example::

        >>> logits = torch.tensor([[0.0, 5.0, 0.0], [0.0, 0.0, 9.0], [0.0, 0.0, 5.0]])
        >>> i32, i64 = torch.int32, torch.int64
        >>> tree_rejection_sample(logits, torch.tensor([2, 1]), torch.tensor([-1, -1], dtype=i32),
        ...                       None, torch.tensor([0, 2], dtype=i32), 1, torch.zeros(1),
        ...                       torch.zeros(1, dtype=i32), torch.ones(1),
        ...                       torch.zeros(1, dtype=i64), torch.zeros(1, dtype=i64))
        (tensor([[1, 2]]), tensor([1], dtype=torch.int32), tensor([[1]], dtype=torch.int32))
    """
    batch, vocab = _check_tree_args(target_logits, draft_token_ids, parents, q,
                                    cu_num_nodes, max_depth, temperature, top_k, top_p,
                                    seeds, offsets)
    if check_finite:
        _check_tree_layout(cu_num_nodes, draft_token_ids, parents, max_depth, vocab)
    dev = target_logits.device
    m, d_max = MAX_TREE_NODES, max_depth
    n_rows = target_logits.shape[0]
    b_idx = torch.arange(batch, device=dev)
    j = torch.arange(m, device=dev)
    # -- ragged nodes -> [B, M] tables; bad trees are flagged and never walked --
    tok, n, start, layout_ok = _tree_table(cu_num_nodes, draft_token_ids, 0)  # [B, M]
    par, _, _, _ = _tree_table(cu_num_nodes, parents, -1)  # [B, M]
    valid = j[None, :] < n[:, None]  # [B, M]
    par_ok = (par >= -1) & (par < j[None, :])
    depth = _tree_depths(torch.where(par_ok, par, -1))
    bad = ~layout_ok | (valid & ((tok < 0) | (tok >= vocab) | ~par_ok | (depth > d_max))).any(1)
    tok = tok.clamp(0, vocab - 1)
    root_row = start + b_idx  # [B] the row of each sequence's root
    u_accept = philox_uniform(seeds, offsets, m, TREE_ACCEPT_STREAM)  # [B, M]
    u_emit = philox_uniform(seeds, offsets, m + 1, TREE_SAMPLE_STREAM)  # [B, M + 1]
    greedy = temperature <= 0  # [B]
    # -- the walk, one tree level per step, all sequences together --
    node = torch.full((batch,), -1, dtype=torch.int64, device=dev)  # current position
    n_acc = torch.zeros(batch, dtype=torch.int64, device=dev)
    path = torch.full((batch, d_max), -1, dtype=torch.int64, device=dev)
    token = torch.full((batch,), -1, dtype=torch.int64, device=dev)
    running = ~bad
    q_probs = draft_dist_probs(q) if q is not None else None  # [rows, V] q of every row
    for level in range(d_max + 1):
        row = (root_row + 1 + node).clamp(0, n_rows - 1)  # [B] tree row of the position
        raw = target_logits[row].float()  # [B, V]
        row_bad = raw.isnan().any(-1) | raw.isposinf().any(-1) | raw.isneginf().all(-1)
        bad |= running & row_bad
        running &= ~row_bad
        p = sampling_probs(raw, temperature, top_k, top_p)  # [B, V] p_u
        argmax = raw.argmax(-1)  # [B] first argmax (greedy)
        q_u = q_probs[row] if q_probs is not None else None  # [B, V] q_u
        is_child = valid & (par == node[:, None])  # [B, M]
        chosen = torch.full((batch,), -1, dtype=torch.int64, device=dev)
        p_cur = p  # p': the target less what the rejected siblings took
        for c in range(min(m, draft_token_ids.shape[0])):  # children in node order
            trying = running & (chosen < 0) & is_child[:, c]  # [B]
            if not bool(trying.any()):  # a host sync per node: fine on the CPU path
                continue
            x = tok[:, c]  # [B]
            p_x = p_cur.gather(1, x[:, None])[:, 0]
            q_x = q_u.gather(1, x[:, None])[:, 0] if q_u is not None else torch.ones_like(p_x)
            accept = torch.where(greedy, x == argmax, u_accept[:, c] * q_x < p_x)
            chosen = torch.where(trying & accept, c, chosen)
            p_cur = torch.where((trying & ~accept)[:, None], _sibling_residual(p_cur, q_u, x), p_cur)
        # -- every child rejected (or none): emit a sample of p' (greedy: the argmax) --
        stop = running & (chosen < 0)
        u = u_emit.gather(1, (node + 1)[:, None])[:, 0]
        emitted = torch.where(greedy, argmax, sample_inverse_cdf(p_cur, u))
        token = torch.where(stop, emitted, token)
        advance = running & (chosen >= 0)
        if level < d_max:
            path[:, level] = torch.where(advance, chosen, -1)
        n_acc += advance.long()
        node = torch.where(advance, chosen, node)
        running = advance
    # -- assemble: path tokens, the emitted token, -1 padding; bad sequences all -1 --
    out = torch.full((batch, d_max + 1), -1, dtype=torch.int64, device=dev)
    out[:, :d_max] = torch.where(path >= 0, tok.gather(1, path.clamp(min=0)), -1)
    out[b_idx, n_acc] = token
    out = torch.where(bad[:, None], -1, out)
    path = torch.where(bad[:, None], -1, path)
    n_accepted = torch.where(bad, -1, n_acc).to(torch.int32)
    if check_finite:
        _raise_if_flagged(n_accepted)
    return out, n_accepted, path.to(torch.int32)


# ---------------------------------------------------------------------------------------
# Fused elementwise ops of a decoder layer: residual add + RMSNorm, RoPE on q and k,
# SiLU(gate) * up. Each reproduces llama.py's module math bit for bit (same ops in the
# same order and dtypes). The argument checks are shared with the Triton launchers in
# fused_ops.py, so both paths refuse the same inputs with the same messages.
# ---------------------------------------------------------------------------------------

_ACTIVATION_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _require_activation(name: str, t: torch.Tensor, rank: int, layout: str) -> None:
    """A ``rank``-D float16/bfloat16/float32 tensor with stride 1 in its last dimension."""
    require_tensor(name, t)
    require(t.dim() == rank, f"{name} must be {rank}-D {layout}, got shape {shape_of(t)}")
    require(t.dtype in _ACTIVATION_DTYPES,
            f"{name} must be float16, bfloat16 or float32, got {t.dtype}")
    require_unit_stride(name, t)


def _check_add_rms_norm_args(x, residual, weight, eps) -> None:
    _require_activation("x", x, 2, "[T, N]")
    n = x.shape[1]
    require(n >= 1, f"x must have at least one column, got shape {shape_of(x)}")
    if residual is not None:
        _require_activation("residual", residual, 2, "[T, N]")
        require(residual.shape == x.shape,
                f"residual must have x's shape {shape_of(x)}, got {shape_of(residual)}")
        require(residual.dtype == x.dtype, f"residual is {residual.dtype} but x is {x.dtype}")
        require_same_device("x", x, residual=residual)
    _require_activation("weight", weight, 1, "[N]")
    require(weight.shape[0] == n, f"weight must have shape ({n},) (N of x {shape_of(x)}), "
            f"got {shape_of(weight)}")
    require(weight.dtype == x.dtype, f"weight is {weight.dtype} but x is {x.dtype}")
    require_same_device("x", x, weight=weight)
    require(isinstance(eps, (int, float)) and not isinstance(eps, bool) and math.isfinite(eps)
            and eps >= 0, f"eps must be a host float >= 0, got {eps!r}")


def _check_rotary_args(q, k, positions, inv_freq, q_norm_weight=None, k_norm_weight=None,
                       norm_eps=1e-6) -> None:
    _require_activation("q", q, 3, "[T, H, D]")
    _require_activation("k", k, 3, "[T, H_kv, D]")
    t, _, d = q.shape
    require(k.shape[0] == t and k.shape[2] == d,
            f"k must have shape ({t}, H_kv, {d}) (T and D of q {shape_of(q)}), got {shape_of(k)}")
    require(d >= 2 and d % 2 == 0, f"the head dim D must be even, got q of shape {shape_of(q)}")
    require(k.dtype == q.dtype, f"k is {k.dtype} but q is {q.dtype}")
    require_tensor("positions", positions)
    require(positions.dim() == 1 and positions.shape[0] == t,
            f"positions must have shape ({t},) (T of q), got {shape_of(positions)}")
    require(positions.dtype in (torch.int32, torch.int64),
            f"positions must be int64 or int32, got {positions.dtype}")
    require_unit_stride("positions", positions)
    require_tensor("inv_freq", inv_freq)
    require(inv_freq.dim() == 1 and inv_freq.shape[0] == d // 2,
            f"inv_freq must have shape ({d // 2},) (D / 2 of q {shape_of(q)}), "
            f"got {shape_of(inv_freq)}")
    require(inv_freq.dtype == torch.float32, f"inv_freq must be float32 (RoPE frequencies "
            f"stay fp32 whatever the model's dtype), got {inv_freq.dtype}")
    require_unit_stride("inv_freq", inv_freq)
    require_same_device("q", q, k=k, positions=positions, inv_freq=inv_freq)
    require((q_norm_weight is None) == (k_norm_weight is None),
            "q_norm_weight and k_norm_weight go together: pass both (a per-head q/k norm) or neither")
    for name, w in (("q_norm_weight", q_norm_weight), ("k_norm_weight", k_norm_weight)):
        if w is None:
            continue
        _require_activation(name, w, 1, "[D]")
        require(w.shape[0] == d, f"{name} must have shape ({d},) (D of q {shape_of(q)}), "
                f"got {shape_of(w)}")
        require(w.dtype == q.dtype, f"{name} is {w.dtype} but q is {q.dtype}")
        require_same_device("q", q, **{name: w})
    require(isinstance(norm_eps, (int, float)) and not isinstance(norm_eps, bool)
            and math.isfinite(norm_eps) and norm_eps >= 0,
            f"norm_eps must be a host float >= 0, got {norm_eps!r}")


ACTIVATIONS = ("silu", "gelu_tanh")


def _check_silu_mul_args(gate_up, activation: str = "silu") -> None:
    require(activation in ACTIVATIONS,
            f"activation must be one of {', '.join(ACTIVATIONS)}, got {activation!r}")
    _require_activation("gate_up", gate_up, 2, "[T, 2 I]")
    require(gate_up.shape[1] >= 2 and gate_up.shape[1] % 2 == 0,
            f"gate_up must be [T, 2 I] with an even, non-zero last dim, got {shape_of(gate_up)}")


def add_rms_norm(
    x: torch.Tensor,
    residual: torch.Tensor | None,
    weight: torch.Tensor,
    eps: float,
    *,
    check: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Residual add, then RMSNorm: the two ops between a decoder layer's sublayers.

    x:        [T, N] float16/bfloat16/float32, stride 1 in N: a sublayer's output (or the
              embeddings, for the first layer)
    residual: [T, N] x's dtype, or None (nothing to add yet)
    weight:   [N] x's dtype, the norm's gain
    eps:      host float >= 0, added to the mean square
    check:    validate the arguments (keyword; the backend's hot-path calls skip it, for
              every op here, since the model builds their arguments itself)
    returns:  normed [T, N] and new_residual [T, N], both in x's dtype;
              new_residual = x + residual, or x itself (not a copy) when residual is None

    The norm is llama.py's ``RMSNorm.forward`` of new_residual op for op (transformers'
    order: fp32 statistics, the normalised row rounded to x's dtype, then the gain)::

        h = r.float(); h = h * rsqrt(mean(h^2) + eps); normed = weight * h.to(x.dtype)
    """
    if check:
        _check_add_rms_norm_args(x, residual, weight, eps)
    r = x if residual is None else x + residual  # [T, N], rounded to x.dtype
    h = r.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)  # [T, N] fp32
    return weight * h.to(r.dtype), r


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def _head_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """llama.py's ``RMSNorm`` over the last dim (each head): fp32 statistics, the
    normalised row rounded to x's dtype, then the gain."""
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def rotary(
    q: torch.Tensor,
    k: torch.Tensor,
    positions: torch.Tensor,
    inv_freq: torch.Tensor,
    *,
    q_norm_weight: torch.Tensor | None = None,
    k_norm_weight: torch.Tensor | None = None,
    norm_eps: float = 1e-6,
    check: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(Per-head RMSNorm, then) RoPE on the query and key heads of T tokens
    (transformers' half-split layout).

    q:         [T, H, D] float16/bfloat16/float32, any token/head strides, stride 1 in D
               (e.g. a view into a fused qkv projection's output); D even
    k:         [T, H_kv, D] q's dtype, same layout rules
    positions: [T] int64 (or int32), each token's absolute position, exact below 2**24
    inv_freq:  [D / 2] float32, the rotation frequencies (``ModelConfig.rope_inv_freq``)
    q_norm_weight, k_norm_weight: [D] q's dtype or None (both or neither): Qwen3's
               ``q_norm`` / ``k_norm``, an RMSNorm over each head (eps ``norm_eps``)
               applied before the rotation, as llama.py's ``RMSNorm`` computes it
    returns:   q_rot [T, H, D], k_rot [T, H_kv, D], contiguous, in q's dtype

    llama.py's ``Rotary.cos_sin`` then ``apply_rope`` op for op: angles in fp32, cos and
    sin rounded to q's dtype, then ``x * cos + rotate_half(x) * sin`` in q's dtype::

        theta = positions.float()[:, None] * inv_freq     # [T, D/2]
        emb = cat(theta, theta)                            # [T, D]
        x1, x2 = halves of x -> x * cos(emb) + cat(-x2, x1) * sin(emb)
    """
    if check:
        _check_rotary_args(q, k, positions, inv_freq, q_norm_weight, k_norm_weight, norm_eps)
    if q_norm_weight is not None:
        q, k = _head_rms_norm(q, q_norm_weight, norm_eps), _head_rms_norm(k, k_norm_weight, norm_eps)
    freqs = positions.float()[:, None] * inv_freq.float()  # [T, D/2]
    emb = torch.cat((freqs, freqs), dim=-1)  # [T, D]
    cos = emb.cos().to(q.dtype)[:, None]  # [T, 1, D]
    sin = emb.sin().to(q.dtype)[:, None]
    q_rot = (q * cos + _rotate_half(q) * sin).contiguous()
    k_rot = (k * cos + _rotate_half(k) * sin).contiguous()
    return q_rot, k_rot


def silu_mul(gate_up: torch.Tensor, *, activation: str = "silu", check: bool = True) -> torch.Tensor:
    """SwiGLU's activation: SiLU of the gate half times the up half (GeGLU's with
    ``activation="gelu_tanh"``: ``F.gelu(gate, approximate="tanh") * up``, Gemma's MLP).

    gate_up: [T, 2 I] float16/bfloat16/float32, stride 1 in its last dim: the gate
             projection's output in columns [0, I), the up projection's in [I, 2 I)
    returns: [T, I] in gate_up's dtype, ``F.silu(gate) * up`` as llama.py's MLP computes it

    The gate half is made contiguous first: on the CPU, ``F.silu`` of a strided view takes
    a scalar path for some elements whose fp32 result differs in the last bit from the
    vectorised path a contiguous ``gate_proj(x)`` output gets.
    """
    if check:
        _check_silu_mul_args(gate_up, activation)
    i = gate_up.shape[1] // 2
    gate = gate_up[:, :i].contiguous()
    act = F.gelu(gate, approximate="tanh") if activation == "gelu_tanh" else F.silu(gate)
    return act * gate_up[:, i:]
