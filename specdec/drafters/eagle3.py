"""EAGLE-3 drafting: a one-layer head fed with the target's own hidden states.

The head keeps a one-layer paged KV cache of its own on the target's block tables. Its
entry at position t is computed from the pair (u_t = fc(g_t), x_{t+1}): g_t the target's
captured residual streams at position t (``capture_layers``), x_{t+1} the next committed
token. ``seq.draft_len`` counts the positions holding such target-feature entries.

* ``observe`` (the engine calls it after each step's device-to-host copy, before the
  commit) gets the captured rows of every newly committed position t (the prompt on the
  first step; then the uncached tail, the accepted drafts or tree path) and runs the
  head over their pairs in one forward. That overwrites whatever drafting wrote at those
  positions and leaves, per sequence, the last row's output a and its logits: the
  draft distribution of the token after the pending one.
* ``propose`` starts from that state. Chain: draft 1 from the stored logits, then k - 1
  forwards of (a, d_j) at positions n, n + 1, .. (n = committed tokens). Static tree:
  children i.i.d. from q at every node (greedy requests: the top-b tokens), the head
  re-run level by level over the nodes so far under their ancestor mask. Dynamic tree
  (EAGLE-2): top-K expansion of the best K frontier nodes by cumulative log q for D - 1
  rounds, then the best N - 1 of all candidates, verified as point masses (q = None).
  A sequence without a state (its first step, or back from preemption) drafts nothing.
  Trees live in eagle3_trees.py.
* Chains also run under the fixed-shape runner (CUDA graphs): eagle3_static.py keeps the
  state in static buffers and runs the head over the verified rows inside the verify
  half; ``commit`` then places that state at the new committed length.

Every sampled draft is drawn from q over the full target vocabulary (the head's logits
placed at target ids through d2t, -inf elsewhere) by the backend's ``draft_sample`` with
the model drafter's Philox streams, and q goes to the rejection sampler as a DraftDist.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch

from ..batch import ForwardBatch, SamplingTensors, build_forward_batch
from ..kernels._sampling_core import DraftDist
from ..kv_cache import BlockManager, KVCache
from ..sequence import Sequence
from ..tree import TreeShape
from .base import Drafter, DraftProposal
from .draft_model import DRAFT_STREAM
from .eagle3_head import Eagle3Head, HeadWarmUp
from .eagle3_static import Eagle3StaticStep
from .eagle3_trees import DynamicTree, dynamic_tree, pad_tree_q, static_tree

__all__ = ["DynamicTree", "Eagle3Drafter"]


@dataclass
class _HeadState:
    pos: int | None  # head positions 0 .. pos - 1 hold target-feature entries (None: a
    # fixed-shape step's state, until ``commit`` learns how many drafts were accepted)
    a: torch.Tensor  # [H] the last pair's output: the next draft step's u
    logits: torch.Tensor  # [V] the draft logits of the token after the pending one


class Eagle3Drafter(Drafter):
    """Drafts chains, static trees or dynamic trees with an ``Eagle3Head``.

    head:           the Eagle3Head
    cache:          its KVCache(1, num_blocks, block_size, head kv heads, head_dim)
    blocks:         the target's BlockManager (shared tables and slots)
    capture_layers: the target hidden_states indices the head reads (ascending)
    tree:           a static TreeShape, a DynamicTree, or None for chains
    """

    speculates = True
    samples_q = True
    width = 1  # the fixed-shape draft half reads the head's state, not the target's tokens

    def __init__(self, head: Eagle3Head, cache: KVCache, blocks: BlockManager, ops,
                 capture_layers: tuple[int, ...], tree: TreeShape | DynamicTree | None = None,
                 name: str = "eagle3"):
        self.head, self.cache, self.blocks, self.ops = head, cache, blocks, ops
        self.capture_layers = tuple(capture_layers)
        self.tree = tree
        self.name = name
        self._state: weakref.WeakKeyDictionary[Sequence, _HeadState] = weakref.WeakKeyDictionary()
        self._static: Eagle3StaticStep | None = None  # the fixed-shape step's buffers

    # ------------------------------------------------------------------ features in
    @torch.no_grad()
    def observe(self, seqs: list[Sequence], hidden: torch.Tensor, rows: list[list[int]],
                next_tokens: list[list[int]]) -> None:
        """Extend the head's cache with the target features of newly committed positions.

        seqs:        sequences whose positions seq.target_len .. seq.target_len + m_b - 1
                     were committed this step (target_len not yet advanced)
        hidden:      [R, C * Ht] the verify forward's captured rows (model dtype)
        rows:        host, rows[b] the m_b rows of ``hidden`` of those positions, in order
        next_tokens: host, next_tokens[b][i] the committed token after position
                     target_len + i (the pair's token x_{t+1})
        """
        todo = [(s, r, t) for s, r, t in zip(seqs, rows, next_tokens, strict=True) if r]
        if not todo:
            return
        dev = hidden.device
        index = torch.tensor([i for _, r, _ in todo for i in r], dtype=torch.int64, device=dev)
        tokens = torch.tensor([x for _, _, t in todo for x in t], dtype=torch.int64, device=dev)
        u = self.head.fc(hidden.index_select(0, index), self.ops)  # [sum m_b, H]
        lengths = [len(r) for _, r, _ in todo]
        batch = build_forward_batch(self.blocks, [s.seq_id for s, _, _ in todo], [s.target_len for s, _, _ in todo],
                                    lengths, [1] * len(todo), tokens, dev)
        logits, a = self.head.forward_cached(u, batch, self.cache, self.ops)  # [B, V], [sum m_b, H]
        last = batch.logits_rows
        if last is None:  # build_forward_batch always sets it
            raise RuntimeError("the head's forward batch has no logits rows")
        for b, (seq, _, _) in enumerate(todo):
            pos = seq.target_len + lengths[b]
            self._state[seq] = _HeadState(pos, a[last[b]], logits[b])
            seq.draft_len = pos

    def _ready(self, seq: Sequence) -> bool:
        state = self._state.get(seq)
        return state is not None and state.pos == seq.target_len == seq.draft_len

    def commit(self, seq: Sequence, num_accepted: int) -> None:
        """Eager steps: nothing to do, ``observe`` already rewrote the committed positions.
        After a fixed-shape step: its state now stands at the new committed length."""
        state = self._state.get(seq)
        if state is not None and state.pos is None:
            state.pos = seq.draft_len = len(seq.tokens) + num_accepted

    # ------------------------------------------------------------------ fixed-shape step
    @property
    def static_step(self) -> bool:
        return self.tree is None

    def prepare_static(self, max_batch: int) -> None:
        self._static = Eagle3StaticStep(self, max_batch)

    def _static_step(self) -> Eagle3StaticStep:
        if self._static is None:
            raise RuntimeError("the EAGLE-3 fixed-shape step needs prepare_static() first")
        return self._static

    def static_load(self, seqs: list[Sequence], bucket: int) -> None:
        self._static_step().load([self._state[s] for s in seqs], bucket)

    def static_draft(self, batch, greedy: bool) -> tuple[torch.Tensor, DraftDist | None]:
        return self._static_step().draft(batch, greedy)

    def static_observe(self, batch, verify: ForwardBatch, hidden: torch.Tensor, out: torch.Tensor,
                       n_accepted: torch.Tensor) -> None:
        self._static_step().observe(batch, verify, hidden, out, n_accepted)

    def drafted(self, seqs: list[Sequence], k: int) -> None:
        a, logits = self._static_step().results(len(seqs))
        for b, seq in enumerate(seqs):
            self._state[seq] = _HeadState(None, a[b], logits[b])

    def static_ready(self, seq: Sequence) -> bool:
        return self._ready(seq)

    def prepare_scratch(self, block: int) -> None:
        self.cache.k[:, block].zero_()
        self.cache.v[:, block].zero_()

    def own_forwards(self) -> list[tuple]:
        return [(HeadWarmUp(self.head), self.cache, None)]

    def sample_chain(self, logits: torch.Tensor, sampling: SamplingTensors, j: int):
        """Draft j of a chain: [B, V] logits -> tokens [B], q (B rows), stream DRAFT_STREAM + j."""
        tokens, q = self.draw(logits, sampling, DRAFT_STREAM + j)
        return tokens[:, 0], q

    def keep_path(self, src_slots: torch.Tensor, dst_slots: torch.Tensor) -> None:
        """Nothing to move: the accepted path's head entries are rewritten by ``observe``
        from the target's features at their final positions."""

    # ------------------------------------------------------------------ drafts out
    def propose(self, seqs: list[Sequence], limits: list[int], sampling: SamplingTensors,
                device) -> DraftProposal:
        limits = [n if self._ready(s) else 0 for s, n in zip(seqs, limits, strict=True)]
        active = [b for b, n in enumerate(limits) if n > 0]
        if not active:
            empty = super().propose(seqs, limits, sampling, device)
            if self.tree is not None:
                empty.parents = [[] for _ in seqs]
            return empty
        index = torch.tensor(active, dtype=torch.int64, device=device)
        sub = sampling.select(index)
        states = [self._state[seqs[b]] for b in active]
        a = torch.stack([s.a for s in states])  # [A, H]
        logits = torch.stack([s.logits for s in states])  # [A, V]
        act_seqs, act_limits = [seqs[b] for b in active], [limits[b] for b in active]
        if isinstance(self.tree, DynamicTree):
            tokens, q, counts, parents = dynamic_tree(self, self.tree, act_seqs, act_limits, a, logits, device)
        elif self.tree is not None:
            tokens, q, counts, parents = static_tree(self, self.tree, act_seqs, act_limits, a, logits, sub, device)
        else:
            tokens, q, counts = self._chain(act_seqs, act_limits, a, logits, sub, device)
            parents = None
        all_counts = [0] * len(seqs)
        for b, n in zip(active, counts, strict=True):
            all_counts[b] = n
        if parents is not None:
            all_parents: list[list[int]] = [[] for _ in seqs]
            for b, p in zip(active, parents, strict=True):
                all_parents[b] = p
            parents = all_parents
        if q is not None and self.tree is not None and len(active) < len(seqs):
            q = pad_tree_q(q, all_counts, [b in active for b in range(len(seqs))], device)
        return DraftProposal(tokens, q, all_counts, parents=parents)

    def draw(self, logits, sub: SamplingTensors, stream: int, num: int = 1, first_draw=None):
        return self.ops.draft_sample(logits, sub.temperature, sub.top_k, sub.top_p, sub.seeds, sub.offsets,
                                     stream, num, first_draw, filtered=sub.filtered, all_greedy=sub.all_greedy,
                                     radix_rounds=sub.radix_rounds)

    def _chain(self, seqs, limits, a, logits, sub, device):
        """Draft j (0-based) from the head's output at position n - 1 + j, stream DRAFT_STREAM + j."""
        k = max(limits)
        ids, n = [s.seq_id for s in seqs], [s.target_len for s in seqs]
        drafts, dists = [], []
        for j in range(k):
            tok, q = self.sample_chain(logits, sub, j)
            drafts.append(tok)
            dists.append(q)
            if j + 1 < k:  # the pair (a, d_{j+1}) at position n + j
                batch = build_forward_batch(self.blocks, ids, [p + j for p in n], [1] * len(seqs), [1] * len(seqs),
                                            tok, device)
                logits, a = self.head.forward_cached(a, batch, self.cache, self.ops)
        keep = torch.tensor([i * k + j for i, m in enumerate(limits) for j in range(m)], dtype=torch.int64,
                            device=device)
        tokens = torch.stack(drafts, dim=1).reshape(-1)  # [A * k]
        return tokens[keep], DraftDist.interleave(dists).index_select(keep), list(limits)
