"""Model drafters: a separate small model, or the target's own first N layers (early exit).

Both run ``k`` cached forwards per step over the whole batch: the first feeds each
sequence's tokens the draft has not seen yet (the whole prompt on the first step, then
one or two tokens), each later one feeds the previous draft token. Every draft token is
sampled from the draft's processed distribution q (temperature, top-k, top-p of the
request) with the request's own Philox stream, and q is handed to the rejection sampler.

Draft-side state after a step that accepted ``a`` of the drafts: the draft cache holds
the committed prefix and d_1..d_{k-1}, so it stays valid for ``L + min(a, k - 1)``
tokens (L = tokens before the step); later positions are overwritten next step.

The early-exit drafter shares the target's weights *and* its cache: layers < N of the
target's cache hold exactly the K/V the truncated model would compute, so it drafts from
the target's committed length and the verify pass overwrites what it wrote.
"""

from __future__ import annotations

import torch

from ..batch import SamplingTensors, build_forward_batch
from ..kernels.philox import philox_uniform, sample_inverse_cdf
from ..kernels.reference import sampling_probs
from ..kv_cache import BlockManager, KVCache
from ..models.llama import LlamaForCausalLM
from ..sequence import Sequence
from .base import DraftProposal, Drafter

# Philox stream of the draft token at position j (0-based): DRAFT_STREAM + j.
DRAFT_STREAM = 16


class ModelDrafter(Drafter):
    def __init__(self, model: LlamaForCausalLM, cache: KVCache, blocks: BlockManager, ops,
                 num_layers: int | None = None, shares_target_cache: bool = False,
                 name: str = "model"):
        self.model, self.cache, self.blocks, self.ops = model, cache, blocks, ops
        self.num_layers = num_layers
        self.shares_target_cache = shares_target_cache
        self.name = name

    def _start(self, seq: Sequence) -> int:
        return seq.target_len if self.shares_target_cache else seq.draft_len

    def propose(self, seqs: list[Sequence], limits: list[int], sampling: SamplingTensors,
                device) -> DraftProposal:
        k = max(limits, default=0)
        if k == 0:
            return super().propose(seqs, limits, sampling, device)
        ids = [s.seq_id for s in seqs]
        starts = [self._start(s) for s in seqs]
        tails = [s.tokens[st:] for s, st in zip(seqs, starts)]
        tokens = torch.tensor([t for tail in tails for t in tail], dtype=torch.int64, device=device)
        lengths = [len(t) for t in tails]
        drafts, probs = [], []
        for j in range(k):
            batch = build_forward_batch(self.blocks, ids, starts, lengths, [1] * len(seqs), tokens, device)
            logits = self.model.forward_cached(batch, self.cache, self.ops, self.num_layers)  # [B, V]
            q = sampling_probs(logits, sampling.temperature, sampling.top_k, sampling.top_p)  # [B, V]
            u = philox_uniform(sampling.seeds, sampling.offsets, 1, stream=DRAFT_STREAM + j)[:, 0]
            tokens = sample_inverse_cdf(q, u)  # [B]
            drafts.append(tokens)
            probs.append(q)
            starts = [st + n for st, n in zip(starts, lengths)]
            lengths = [1] * len(seqs)
        # keep the first n_b drafts of sequence b: a gather with a host-built index
        keep = torch.tensor([b * k + j for b, n in enumerate(limits) for j in range(n)],
                            dtype=torch.int64, device=device)
        all_tokens = torch.stack(drafts, dim=1).reshape(-1)  # [B * k]
        all_probs = torch.stack(probs, dim=1).flatten(0, 1)  # [B * k, V]
        for s in seqs:
            s.draft_len = len(s.tokens) + k - 1  # the draft cache now holds d_1..d_{k-1}
        return DraftProposal(all_tokens[keep], all_probs[keep], list(limits))

    def commit(self, seq: Sequence, num_accepted: int) -> None:
        # still valid: the committed prefix and the accepted drafts among d_1..d_{k-1}
        seq.draft_len = min(seq.draft_len, len(seq.tokens) + num_accepted)

    def kv_bytes_per_block(self, block_size: int) -> int:
        if self.shares_target_cache:
            return 0
        cfg = self.model.config
        return KVCache.bytes_per_block(cfg.num_layers, block_size, cfg.num_kv_heads,
                                       cfg.head_dim, self.cache.k.dtype)
