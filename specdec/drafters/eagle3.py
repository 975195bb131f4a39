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
from ..tree import MAX_DRAFT_NODES, TreeShape, _to_int64, depths_of
from .base import Drafter, DraftProposal
from .draft_model import DRAFT_STREAM, _empty_tree_dist
from .eagle3_head import Eagle3Head, HeadWarmUp
from .eagle3_static import Eagle3StaticStep

DYNAMIC = "dynamic:"


@dataclass(frozen=True)
class DynamicTree:
    """EAGLE-2 dynamic tree: ``top_k`` children per expanded node and ``top_k`` expanded
    nodes per depth, ``depth`` levels at most, ``num_tokens`` tokens verified (root + the
    best ``num_tokens - 1`` nodes)."""

    top_k: int
    depth: int
    num_tokens: int

    @property
    def num_nodes(self) -> int:
        return self.num_tokens - 1

    @property
    def cache_slots(self) -> int:
        """Head-cache positions a step writes past the committed ones: the verified nodes,
        or the nodes drafting feeds (top_k per expanded depth), whichever is more."""
        return max(self.num_nodes, self.top_k * (self.depth - 1))

    @classmethod
    def parse(cls, spec: str) -> DynamicTree:
        """``"dynamic:K,D,N"`` -> DynamicTree(K, D, N)."""
        usage = ("draft_tree='dynamic:K,D,N' needs integers K >= 1 (top-k), D >= 1 (depth) and "
                 f"2 <= N <= {MAX_DRAFT_NODES + 1} (tokens verified, root included) with K * (D - 1) <= "
                 f"{MAX_DRAFT_NODES}; e.g. 'dynamic:4,5,24'")
        if not isinstance(spec, str) or not spec.startswith(DYNAMIC):
            raise ValueError(f"{usage}; got {spec!r}")
        parts = spec[len(DYNAMIC):].split(",")
        if len(parts) != 3 or not all(p.strip().isdigit() for p in parts):
            raise ValueError(f"{usage}; got {spec!r}")
        k, d, n = (int(p) for p in parts)
        if k < 1 or d < 1 or not 2 <= n <= MAX_DRAFT_NODES + 1 or k * (d - 1) > MAX_DRAFT_NODES:
            raise ValueError(f"{usage}; got {spec!r}")
        return cls(k, d, n)


@dataclass
class _HeadState:
    pos: int | None  # head positions 0 .. pos - 1 hold target-feature entries (None: a
    # fixed-shape step's state, until ``commit`` learns how many drafts were accepted)
    a: torch.Tensor  # [H] the last pair's output: the next draft step's u
    logits: torch.Tensor  # [V] the draft logits of the token after the pending one


def _rows(sampling: SamplingTensors, index: torch.Tensor) -> SamplingTensors:
    """The sampling tensors of a subset of the batch (host facts kept: still true)."""
    return SamplingTensors(*(getattr(sampling, f).index_select(0, index)
                             for f in ("temperature", "top_k", "top_p", "seeds", "offsets")),
                           all_greedy=sampling.all_greedy, filtered=sampling.filtered,
                           radix_rounds=sampling.radix_rounds)


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
        todo = [(s, r, t) for s, r, t in zip(seqs, rows, next_tokens) if r]
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

    def static_load(self, seqs: list[Sequence], bucket: int) -> None:
        self._static.load([self._state[s] for s in seqs], bucket)

    def static_draft(self, batch, greedy: bool) -> tuple[torch.Tensor, DraftDist | None]:
        return self._static.draft(batch, greedy)

    def static_observe(self, batch, verify: ForwardBatch, hidden: torch.Tensor, out: torch.Tensor,
                       n_accepted: torch.Tensor) -> None:
        self._static.observe(batch, verify, hidden, out, n_accepted)

    def drafted(self, seqs: list[Sequence], k: int) -> None:
        a, logits = self._static.results(len(seqs))
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
        tokens, q = self._sample(logits, sampling, DRAFT_STREAM + j)
        return tokens[:, 0], q

    def keep_path(self, src_slots: torch.Tensor, dst_slots: torch.Tensor) -> None:
        """Nothing to move: the accepted path's head entries are rewritten by ``observe``
        from the target's features at their final positions."""

    # ------------------------------------------------------------------ drafts out
    def propose(self, seqs: list[Sequence], limits: list[int], sampling: SamplingTensors,
                device) -> DraftProposal:
        limits = [n if self._ready(s) else 0 for s, n in zip(seqs, limits)]
        active = [b for b, n in enumerate(limits) if n > 0]
        if not active:
            empty = super().propose(seqs, limits, sampling, device)
            if self.tree is not None:
                empty.parents = [[] for _ in seqs]
            return empty
        index = torch.tensor(active, dtype=torch.int64, device=device)
        sub = _rows(sampling, index)
        states = [self._state[seqs[b]] for b in active]
        a = torch.stack([s.a for s in states])  # [A, H]
        logits = torch.stack([s.logits for s in states])  # [A, V]
        act_seqs, act_limits = [seqs[b] for b in active], [limits[b] for b in active]
        if isinstance(self.tree, DynamicTree):
            tokens, q, counts, parents = self._dynamic(act_seqs, act_limits, a, logits, device)
        elif self.tree is not None:
            tokens, q, counts, parents = self._static_tree(act_seqs, act_limits, a, logits, sub, device)
        else:
            tokens, q, counts = self._chain(act_seqs, act_limits, a, logits, sub, device)
            parents = None
        all_counts = [0] * len(seqs)
        for b, n in zip(active, counts):
            all_counts[b] = n
        if parents is not None:
            all_parents = [[] for _ in seqs]
            for b, p in zip(active, parents):
                all_parents[b] = p
            parents = all_parents
        if q is not None and self.tree is not None and len(active) < len(seqs):
            q = self._pad_tree_q(q, all_counts, [b in active for b in range(len(seqs))], device)
        return DraftProposal(tokens, q, all_counts, parents=parents)

    def _sample(self, logits, sub: SamplingTensors, stream: int, num: int = 1, first_draw=None):
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

    def _node_batch(self, seqs, parents: list[list[int]], tokens: torch.Tensor, device,
                    masks: torch.Tensor | None = None, logits_rows: torch.Tensor | None = None) -> ForwardBatch:
        """Head forward over tree nodes only: node i of sequence b at position n_b - 1 +
        depth(i), in head-cache position n_b + i, seeing the committed prefix and its
        ancestors-or-self (``masks`` [T] int64 when given, else built from ``parents``)."""
        positions, slots, mask_list, q_start, seq_lens = [], [], [], [0], []
        for seq, ps in zip(seqs, parents):
            n = seq.target_len
            positions += [n - 1 + d for d in depths_of(ps)]
            slots += self.blocks.slots(seq.seq_id, list(range(n, n + len(ps))))
            if masks is None:
                bits = []
                for i, p in enumerate(ps):
                    bits.append((bits[p] if p >= 0 else 0) | (1 << i))
                mask_list += [_to_int64(m) for m in bits]
            q_start.append(q_start[-1] + len(ps))
            seq_lens.append(n + len(ps))
        if masks is None:
            masks = torch.tensor(mask_list, dtype=torch.int64, device=device)
        return ForwardBatch(
            tokens=tokens, positions=torch.tensor(positions, dtype=torch.int64, device=device),
            slot_mapping=torch.tensor(slots, dtype=torch.int64, device=device),
            block_table=self.blocks.block_table_tensor([s.seq_id for s in seqs], device=device),
            seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=device),
            q_start=torch.tensor(q_start, dtype=torch.int32, device=device), tree_mask=masks,
            logits_rows=logits_rows, max_query_len=max(len(p) for p in parents), max_seq_len=max(seq_lens))

    def _static_tree(self, seqs, limits, a_root, root_logits, sub, device):
        """Level d samples the children of the depth d - 1 positions (the root for d = 1)
        i.i.d. from q there (stream DRAFT_STREAM + d, draws f * b .. f * b + b - 1 of
        frontier position f, as the model drafter); greedy requests take the top-b."""
        shape, A = self.tree, len(seqs)
        depth = max(limits)
        n_all = shape.nodes_up_to(depth)
        H = a_root.shape[1]
        nodes = torch.zeros(A, n_all, dtype=torch.int64, device=device)
        a_nodes = torch.zeros(A, n_all, H, dtype=a_root.dtype, device=device)
        q_rows = None
        greedy = (sub.temperature <= 0)[:, None]
        for d in range(1, depth + 1):
            fed = shape.nodes_up_to(d - 1)
            if d == 1:
                frontier, lf = [0], root_logits[:, None]  # [A, 1, V]
            else:
                ps = list(shape.parents[:fed])
                u = torch.cat([a_root[:, None], a_nodes[:, :fed]], dim=1)[:, [p + 1 for p in ps]]  # [A, fed, H]
                batch = self._node_batch(seqs, [ps] * A, nodes[:, :fed].reshape(-1), device)
                logits, a = self.head.forward_cached(u.reshape(A * fed, H), batch, self.cache, self.ops)
                a_nodes[:, :fed] = a.view(A, fed, H)
                frontier = [1 + i for i in range(fed) if shape.depths[i] == d - 1]  # tree rows
                lf = logits.view(A, fed, -1)[:, [f - 1 for f in frontier]]  # [A, F, V]
            f, b = len(frontier), shape.branching[d - 1]
            rep = lambda t, f=f: t.repeat_interleave(f)  # noqa: E731
            rep_sub = SamplingTensors(rep(sub.temperature), rep(sub.top_k), rep(sub.top_p), rep(sub.seeds),
                                      rep(sub.offsets), all_greedy=sub.all_greedy, filtered=sub.filtered,
                                      radix_rounds=sub.radix_rounds)
            first_draw = (torch.arange(f, dtype=torch.int64, device=device) * b).repeat(A)
            children, q = self._sample(lf.flatten(0, 1), rep_sub, DRAFT_STREAM + d, b, first_draw)  # [A * F, b]
            if q_rows is None:
                q_rows = _empty_tree_dist(q, A, 1 + n_all)
            for field, value in zip(q_rows, q):
                field[:, frontier] = value.view(A, f, *value.shape[1:])
            first = shape.nodes_up_to(d - 1)
            top_b = lf.topk(b, dim=-1).indices.reshape(A, -1)
            nodes[:, first:first + f * b] = top_b if sub.all_greedy else torch.where(
                greedy, top_b, children.view(A, f * b))
        counts = [shape.nodes_up_to(m) for m in limits]
        keep_tok = torch.tensor([b * n_all + i for b, n in enumerate(counts) for i in range(n)],
                                dtype=torch.int64, device=device)
        keep_q = torch.tensor([b * (1 + n_all) + r for b, n in enumerate(counts) for r in range(1 + n)],
                              dtype=torch.int64, device=device)
        q_all = DraftDist(*(t.flatten(0, 1) for t in q_rows)).index_select(keep_q)
        return nodes.reshape(-1)[keep_tok], q_all, counts, [list(shape.parents[:n]) for n in counts]

    def _pad_tree_q(self, q: DraftDist, counts: list[int], active: list[bool], device) -> DraftDist:
        """Tree q rows of the active sequences -> rows of every sequence (one harmless,
        never-read root row for each sequence without drafts)."""
        filler = _empty_tree_dist(q.narrow(0, 1), 1, 1)
        filler = DraftDist(*(t.flatten(0, 1) for t in filler))
        parts, row = [], 0
        for n, on in zip(counts, active):
            if on:
                parts.append(q.narrow(row, 1 + n))
                row += 1 + n
            else:
                parts.append(filler)
        return DraftDist.cat(parts)

    def _dynamic(self, seqs, limits, a_root, root_logits, device):
        """EAGLE-2 expansion (see the module docstring); candidates are point masses."""
        K, A = self.tree.top_k, len(seqs)
        depth = max(limits)  # <= the tree's D (the engine's draft depth)
        H = a_root.shape[1]
        logq = torch.log_softmax(root_logits.float(), dim=-1)
        top = logq.topk(K, dim=-1)
        rec_tok, rec_score = [top.indices], [top.values]  # records, [A, K] then [A, K * K] per round
        rec_parent = [torch.full((A, K), -1, dtype=torch.int64, device=device)]
        front_rec = torch.arange(K, device=device).expand(A, K)  # [A, K] record index of each frontier node
        front_score, front_tok = top.values, top.indices
        fed_tok = front_tok  # [A, F] every expanded node so far (depths 1 .. r)
        fed_u = a_root[:, None].expand(A, K, H)  # [A, F, H] the u of each (its parent's a)
        fed_mask = (torch.ones(A, 1, dtype=torch.int64, device=device) << torch.arange(K, device=device))
        n_rec = K
        for r in range(1, depth):
            F_ = fed_tok.shape[1]
            rows = (torch.arange(A, device=device)[:, None] * F_ + torch.arange(F_ - K, F_, device=device)).reshape(-1)
            ps = [[-1] * F_] * A  # positions come from depths: every fed node of round s has depth s
            batch = self._node_batch(seqs, ps, fed_tok.reshape(-1), device, masks=fed_mask.reshape(-1),
                                     logits_rows=rows)
            batch.positions = torch.tensor(
                [s.target_len - 1 + 1 + i // K for s in seqs for i in range(F_)], dtype=torch.int64, device=device)
            logits, a = self.head.forward_cached(fed_u.reshape(A * F_, H), batch, self.cache, self.ops)
            a_front = a.view(A, F_, H)[:, F_ - K:]  # [A, K] outputs of the depth-r frontier
            child = torch.log_softmax(logits.float(), dim=-1).clamp(max=0.0).topk(K, dim=-1)  # [A * K, K]
            cum = (front_score[:, :, None] + child.values.view(A, K, K)).reshape(A, K * K)
            toks = child.indices.view(A, K * K)
            rec_tok.append(toks)
            rec_score.append(cum)
            rec_parent.append(front_rec[:, :, None].expand(A, K, K).reshape(A, K * K))
            best = cum.topk(K, dim=-1).indices  # [A, K] the next frontier among the K * K
            front_rec, front_score, front_tok = n_rec + best, cum.gather(1, best), toks.gather(1, best)
            n_rec += K * K
            if r + 1 < depth:
                src = best // K  # frontier slot of each new node's parent
                fed_tok = torch.cat([fed_tok, front_tok], dim=1)
                fed_u = torch.cat([fed_u, a_front.gather(1, src[:, :, None].expand(A, K, H))], dim=1)
                own = torch.ones(A, K, dtype=torch.int64, device=device) << torch.arange(F_, F_ + K, device=device)
                fed_mask = torch.cat([fed_mask, fed_mask[:, F_ - K:].gather(1, src) | own], dim=1)
        # -- the best N - 1 records of each sequence (one host copy) --
        tok_all = torch.cat(rec_tok, dim=1)  # [A, M]
        score, parent = torch.cat(rec_score, dim=1).tolist(), torch.cat(rec_parent, dim=1).tolist()
        depth_of = [1] * K + [2 + i // (K * K) for i in range(n_rec - K)]
        flat, counts, parents = [], [], []
        for b, limit in enumerate(limits):
            order = sorted((i for i in range(n_rec) if depth_of[i] <= limit), key=lambda i: (-score[b][i], i))
            chosen = set()
            for i in order:  # parents precede children in (score, index) order; kept connected
                if len(chosen) == self.tree.num_nodes:
                    break
                if parent[b][i] < 0 or parent[b][i] in chosen:
                    chosen.add(i)
            keep = sorted(chosen)
            new = {i: j for j, i in enumerate(keep)}
            parents.append([new[parent[b][i]] if parent[b][i] >= 0 else -1 for i in keep])
            counts.append(len(keep))
            flat += [b * n_rec + i for i in keep]
        tokens = tok_all.reshape(-1)[torch.tensor(flat, dtype=torch.int64, device=device)]
        return tokens, None, counts, parents
