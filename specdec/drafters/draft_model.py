"""Model drafters: a separate small model, or the target's own first N layers (early exit).

Both run ``k`` cached forwards per step over the whole batch: the first feeds each
sequence's tokens the draft has not seen yet (the whole prompt on the first step, then
one or two tokens), each later one feeds the previous draft token. Every draft token is
sampled from the draft's processed distribution q (temperature, top-k, top-p of the
request) with the request's own Philox stream by the backend's ``draft_sample`` (a fused
kernel on the Triton backend, the reference on the torch one), and q is handed to the
rejection sampler as a DraftDist: the draft logits plus per-row statistics.

Draft-side state after a step that accepted ``a`` of the drafts: the draft cache holds
the committed prefix and d_1..d_{k-1}, so it stays valid for ``L + min(a, k - 1)``
tokens (L = tokens before the step); later positions are overwritten next step.

The early-exit drafter shares the target's weights *and* its cache: layers < N of the
target's cache hold exactly the K/V the truncated model would compute, so it drafts from
the target's committed length and the verify pass overwrites what it wrote.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from ..batch import ForwardBatch, SamplingTensors, build_forward_batch, build_tree_batch
from ..kernels._sampling_core import INT32_MIN, DraftDist
from ..kernels.philox import DRAFT_STREAM  # the draft token at position j uses DRAFT_STREAM + j
from ..kv_cache import BlockManager, KVCache
from ..models.llama import LlamaForCausalLM
from ..runners.eager import prefill_tails
from ..sequence import Sequence
from ..tree import TreeShape
from .base import Drafter, DraftProposal

if TYPE_CHECKING:
    from ..runners.static import StaticBatch


class ModelDrafter(Drafter):
    """Drafts with ``model`` (its first ``num_layers`` layers) on ``cache``: chains, or
    trees of shape ``tree``; ``shares_target_cache`` for early exit."""

    speculates = True
    samples_q = True

    def __init__(self, model: LlamaForCausalLM, cache: KVCache, blocks: BlockManager, ops,
                 num_layers: int | None = None, shares_target_cache: bool = False,
                 name: str = "model", tree: TreeShape | None = None):
        self.model, self.cache, self.blocks, self.ops = model, cache, blocks, ops
        self.num_layers = num_layers
        self.shares_target_cache = shares_target_cache
        self.name = name
        self.tree = tree

    def _start(self, seq: Sequence) -> int:
        return seq.target_len if self.shares_target_cache else seq.draft_len

    def propose(self, seqs: list[Sequence], limits: list[int], sampling: SamplingTensors,
                device) -> DraftProposal:
        k = max(limits, default=0)
        if k == 0:
            empty = super().propose(seqs, limits, sampling, device)
            if self.tree is not None:  # empty trees: the step keeps the tree sampler's streams
                empty.parents = [[] for _ in seqs]
            return empty
        if self.tree is not None:
            return self._propose_tree(seqs, limits, sampling, self.tree, device)
        ids = [s.seq_id for s in seqs]
        starts = [self._start(s) for s in seqs]
        tails = [s.tokens[st:] for s, st in zip(seqs, starts, strict=True)]
        tokens = torch.tensor([t for tail in tails for t in tail], dtype=torch.int64, device=device)
        lengths = [len(t) for t in tails]
        first = build_forward_batch(self.blocks, ids, starts, lengths, [1] * len(seqs), tokens, device)
        after = [st + n for st, n in zip(starts, lengths, strict=True)]  # draft j sits at position after[b] + j

        def next_batch(j: int, drafted: torch.Tensor) -> ForwardBatch:
            return build_forward_batch(self.blocks, ids, [a + j for a in after], [1] * len(seqs),
                                       [1] * len(seqs), drafted, device)

        drafts, all_q = self.draft_chain(first, next_batch, k, sampling, greedy=False)  # [B, k], B * k rows
        # keep the first n_b drafts of sequence b: a gather with a host-built index
        keep = torch.tensor([b * k + j for b, n in enumerate(limits) for j in range(n)],
                            dtype=torch.int64, device=device)
        self.drafted(seqs, k)
        q = all_q.index_select(keep) if all_q is not None else None  # sampled drafts: never None
        return DraftProposal(drafts.reshape(-1)[keep], q, list(limits))

    def draft_chain(self, batch: ForwardBatch, next_batch, k: int, sampling: SamplingTensors,
                    greedy: bool) -> tuple[torch.Tensor, DraftDist | None]:
        """The k draft forwards of a chain, on the eager path and in the fixed-shape step.

        batch: the first forward (each sequence's unseen tokens, logits of its last one);
        next_batch(j, tokens [B]) -> the forward that feeds draft j.
        Returns drafts [B, k] int64 and q (B * k rows, row b * k + j), None when ``greedy``
        (argmax drafts: greedy rows never read q in the rejection sampler).
        """
        drafts: list[torch.Tensor] = []
        dists: list[DraftDist] = []
        for j in range(k):
            logits = self.model.forward_cached(batch, self.cache, self.ops, self.num_layers)  # [B, V]
            if greedy:
                tokens = logits.argmax(-1)
            else:
                tokens, q = self.sample(logits, sampling, j)
                dists.append(q)
            drafts.append(tokens)
            if j + 1 < k:
                batch = next_batch(j, tokens)
        return torch.stack(drafts, dim=1), None if greedy else DraftDist.interleave(dists)

    # ------------------------------------------------------------------ fixed-shape step
    @property
    def static_step(self) -> bool:
        return self.tree is None

    @property
    def width(self) -> int:
        # a separate model's cache lags one token after a step that accepted every draft,
        # so its first forward takes the last two tokens (re-writing one entry it may hold)
        return 1 if self.shares_target_cache else 2

    def static_draft(self, batch: StaticBatch, greedy: bool) -> tuple[torch.Tensor, DraftDist | None]:
        return self.draft_chain(batch.first_draft(), batch.next_draft, batch.k, batch.sampling, greedy)

    def drafted(self, seqs: list[Sequence], k: int) -> None:
        if k > 0:
            for s in seqs:
                s.draft_len = len(s.tokens) + k - 1  # the draft cache now holds d_1..d_{k-1}

    def static_ready(self, seq: Sequence) -> bool:
        # after plain steps a separate draft cache lags further than one token
        return self.shares_target_cache or seq.draft_len >= len(seq.tokens) - 2

    def prepare_scratch(self, block: int) -> None:
        if not self.shares_target_cache:
            self.cache.k[:, block].zero_()
            self.cache.v[:, block].zero_()

    def own_forwards(self) -> list[tuple]:
        return [] if self.shares_target_cache else [(self.model, self.cache, self.num_layers)]

    def sample(self, logits: torch.Tensor, sampling: SamplingTensors, j: int) -> tuple[torch.Tensor, DraftDist]:
        """Draw draft token ``j`` of every sequence from the draft's processed distribution.

        logits: [B, V] -> tokens [B] int64, q: DraftDist of B rows (what they were drawn
        from), with the backend's ``draft_sample`` and Philox stream DRAFT_STREAM + j
        """
        tokens, q = self.ops.draft_sample(
            logits, sampling.temperature, sampling.top_k, sampling.top_p, sampling.seeds,
            sampling.offsets, DRAFT_STREAM + j, filtered=sampling.filtered,
            all_greedy=sampling.all_greedy, radix_rounds=sampling.radix_rounds)
        return tokens[:, 0], q

    def _propose_tree(self, seqs: list[Sequence], limits: list[int], sampling: SamplingTensors,
                      shape: TreeShape, device) -> DraftProposal:
        """Grow the static tree level by level: level d feeds [root, nodes of depth < d]
        with the tree mask and expands the nodes of depth d - 1.

        Children of a position are drawn from the draft distribution q there: top-b of
        the draft logits for greedy requests, otherwise sampled (see ``_children``).
        """
        B = len(seqs)
        depth = max(limits)
        prefill_tails(self.model, self.cache, self.ops, self.blocks, seqs,
                      [self._start(s) for s in seqs], device, self.num_layers)
        ids = [s.seq_id for s in seqs]
        roots = [len(s.tokens) - 1 for s in seqs]
        root_tokens = torch.tensor([s.tokens[-1] for s in seqs], dtype=torch.int64, device=device)
        n_all = shape.nodes_up_to(depth)
        nodes = torch.zeros(B, n_all, dtype=torch.int64, device=device)  # [B, N]
        q_rows: DraftDist | None = None  # fields as [B, 1 + N, ...]: q at the root and at each node
        greedy = (sampling.temperature <= 0)[:, None]  # [B, 1]
        for d in range(1, depth + 1):
            fed = shape.nodes_up_to(d - 1)
            tokens = torch.cat([root_tokens[:, None], nodes[:, :fed]], dim=1).reshape(-1)
            batch = build_tree_batch(self.blocks, ids, roots, [list(shape.parents[:fed])] * B, tokens, device)
            logits = self.model.forward_cached(batch, self.cache, self.ops, self.num_layers)
            frontier = [0] if d == 1 else [1 + i for i in range(fed) if shape.depths[i] == d - 1]
            f = len(frontier)
            lf = logits.view(B, 1 + fed, -1)[:, frontier]  # [B, F, V]
            rep = lambda t, f=f: t.repeat_interleave(f)  # noqa: E731  per-row sampling params
            b = shape.branching[d - 1]
            # the b children of frontier position i are draws i * b .. i * b + b - 1 of the
            # sequence's stream DRAFT_STREAM + d, i.i.d. from q there
            first_draw = (torch.arange(f, dtype=torch.int64, device=device) * b).repeat(B)
            children, q = self.ops.draft_sample(
                lf.flatten(0, 1), rep(sampling.temperature), rep(sampling.top_k), rep(sampling.top_p),
                rep(sampling.seeds), rep(sampling.offsets), DRAFT_STREAM + d, b, first_draw,
                filtered=sampling.filtered, all_greedy=sampling.all_greedy,
                radix_rounds=sampling.radix_rounds)  # [B * F, b], B * F rows
            if q_rows is None:
                q_rows = _empty_tree_dist(q, B, 1 + n_all)
            for field, value in zip(q_rows, q, strict=True):
                field[:, frontier] = value.view(B, f, *value.shape[1:])
            first = shape.nodes_up_to(d - 1)  # children of level d occupy [first, first + f * b)
            top_b = lf.topk(b, dim=-1).indices.reshape(B, -1)  # greedy rows: the b best tokens
            if sampling.all_greedy:
                nodes[:, first:first + f * b] = top_b
            else:
                nodes[:, first:first + f * b] = torch.where(greedy, top_b, children.view(B, f * b))
        counts = [shape.nodes_up_to(lim) for lim in limits]
        keep_tok = torch.tensor([b * n_all + i for b, n in enumerate(counts) for i in range(n)],
                                dtype=torch.int64, device=device)
        keep_q = torch.tensor([b * (1 + n_all) + r for b, n in enumerate(counts) for r in range(1 + n)],
                              dtype=torch.int64, device=device)
        for s in seqs:
            # the draft cache holds the prefix, the root, and (in node order) the nodes of depth < `depth`
            s.draft_len = len(s.tokens) + depth - 1
        if q_rows is None:
            raise ValueError(f"a draft tree needs depth >= 1, got limits {limits}")
        q_all = DraftDist(*(t.flatten(0, 1) for t in q_rows)).index_select(keep_q)
        return DraftProposal(nodes.reshape(-1)[keep_tok], q_all, counts,
                             parents=[list(shape.parents[:n]) for n in counts])

    def keep_path(self, src_slots: torch.Tensor, dst_slots: torch.Tensor) -> None:
        if not self.shares_target_cache:
            self.cache.keep_path(src_slots, dst_slots)

    def commit(self, seq: Sequence, num_accepted: int) -> None:
        # still valid: the committed prefix and the accepted drafts among d_1..d_{k-1}
        seq.draft_len = min(seq.draft_len, len(seq.tokens) + num_accepted)



def _empty_tree_dist(q: DraftDist, batch: int, rows: int) -> DraftDist:
    """DraftDist fields shaped [batch, rows, ...] for a tree's q rows, filled with a
    harmless q (rows that are never a frontier: their q is never read)."""
    dev, vocab = q.logits.device, q.logits.shape[1]
    return DraftDist(
        torch.zeros(batch, rows, vocab, dtype=q.logits.dtype, device=dev),
        torch.ones(batch, rows, device=dev), torch.zeros(batch, rows, device=dev),
        torch.ones(batch, rows, device=dev),
        torch.full((batch, rows), INT32_MIN, dtype=torch.int32, device=dev),
    )
