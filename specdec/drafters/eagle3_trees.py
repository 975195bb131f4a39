"""EAGLE-3 draft trees: static trees (i.i.d. children) and EAGLE-2 dynamic trees.

Both grow from each sequence's head state (the output ``a`` and draft logits of its last
committed position). Node i of sequence b sits at position n_b - 1 + depth(i) and in
head-cache position n_b + i (n_b committed tokens); the head is re-run level by level
over the nodes so far under their ancestor mask (the attention's tree mask covers only
a forward's new tokens). See ``Eagle3Drafter`` (specdec/drafters/eagle3.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from ..batch import ForwardBatch, SamplingTensors
from ..kernels._sampling_core import DraftDist
from ..tree import MAX_DRAFT_NODES, TreeShape, _to_int64, depths_of
from .draft_model import DRAFT_STREAM, _empty_tree_dist

if TYPE_CHECKING:
    from .eagle3 import Eagle3Drafter

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



def node_batch(drafter: Eagle3Drafter, seqs, parents: list[list[int]], tokens: torch.Tensor, device,
                masks: torch.Tensor | None = None, logits_rows: torch.Tensor | None = None) -> ForwardBatch:
    """Head forward over tree nodes only: node i of sequence b at position n_b - 1 +
    depth(i), in head-cache position n_b + i, seeing the committed prefix and its
    ancestors-or-self (``masks`` [T] int64 when given, else built from ``parents``)."""
    positions, slots, mask_list, q_start, seq_lens = [], [], [], [0], []
    for seq, ps in zip(seqs, parents, strict=True):
        n = seq.target_len
        positions += [n - 1 + d for d in depths_of(ps)]
        slots += drafter.blocks.slots(seq.seq_id, list(range(n, n + len(ps))))
        if masks is None:
            bits: list[int] = []
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
        block_table=drafter.blocks.block_table_tensor([s.seq_id for s in seqs], device=device),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=device),
        q_start=torch.tensor(q_start, dtype=torch.int32, device=device), tree_mask=masks,
        logits_rows=logits_rows, max_query_len=max(len(p) for p in parents), max_seq_len=max(seq_lens))

def static_tree(drafter: Eagle3Drafter, shape: TreeShape, seqs, limits, a_root, root_logits, sub, device):
    """Level d samples the children of the depth d - 1 positions (the root for d = 1)
    i.i.d. from q there (stream DRAFT_STREAM + d, draws f * b .. f * b + b - 1 of
    frontier position f, as the model drafter); greedy requests take the top-b."""
    A = len(seqs)
    depth = max(limits)
    n_all = shape.nodes_up_to(depth)
    H = a_root.shape[1]
    nodes = torch.zeros(A, n_all, dtype=torch.int64, device=device)
    a_nodes = torch.zeros(A, n_all, H, dtype=a_root.dtype, device=device)
    q_rows: DraftDist | None = None
    greedy = (sub.temperature <= 0)[:, None]
    for d in range(1, depth + 1):
        fed = shape.nodes_up_to(d - 1)
        if d == 1:
            frontier, lf = [0], root_logits[:, None]  # [A, 1, V]
        else:
            ps = list(shape.parents[:fed])
            u = torch.cat([a_root[:, None], a_nodes[:, :fed]], dim=1)[:, [p + 1 for p in ps]]  # [A, fed, H]
            batch = node_batch(drafter, seqs, [ps] * A, nodes[:, :fed].reshape(-1), device)
            logits, a = drafter.head.forward_cached(u.reshape(A * fed, H), batch, drafter.cache, drafter.ops)
            a_nodes[:, :fed] = a.view(A, fed, H)
            frontier = [1 + i for i in range(fed) if shape.depths[i] == d - 1]  # tree rows
            lf = logits.view(A, fed, -1)[:, [f - 1 for f in frontier]]  # [A, F, V]
        f, b = len(frontier), shape.branching[d - 1]
        rep = lambda t, f=f: t.repeat_interleave(f)  # noqa: E731
        rep_sub = SamplingTensors(rep(sub.temperature), rep(sub.top_k), rep(sub.top_p), rep(sub.seeds),
                                  rep(sub.offsets), all_greedy=sub.all_greedy, filtered=sub.filtered,
                                  radix_rounds=sub.radix_rounds)
        first_draw = (torch.arange(f, dtype=torch.int64, device=device) * b).repeat(A)
        children, q = drafter.draw(lf.flatten(0, 1), rep_sub, DRAFT_STREAM + d, b, first_draw)  # [A * F, b]
        if q_rows is None:
            q_rows = _empty_tree_dist(q, A, 1 + n_all)
        for field, value in zip(q_rows, q, strict=True):
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
    if q_rows is None:
        raise ValueError(f"a draft tree needs depth >= 1, got limits {limits}")
    q_all = DraftDist(*(t.flatten(0, 1) for t in q_rows)).index_select(keep_q)
    return nodes.reshape(-1)[keep_tok], q_all, counts, [list(shape.parents[:n]) for n in counts]

def pad_tree_q(q: DraftDist, counts: list[int], active: list[bool], device) -> DraftDist:
    """Tree q rows of the active sequences -> rows of every sequence (one harmless,
    never-read root row for each sequence without drafts)."""
    filler = _empty_tree_dist(q.narrow(0, 1), 1, 1)
    filler = DraftDist(*(t.flatten(0, 1) for t in filler))
    parts, row = [], 0
    for n, on in zip(counts, active, strict=True):
        if on:
            parts.append(q.narrow(row, 1 + n))
            row += 1 + n
        else:
            parts.append(filler)
    return DraftDist.cat(parts)

def dynamic_tree(drafter: Eagle3Drafter, tree: DynamicTree, seqs, limits, a_root, root_logits, device):
    """EAGLE-2 expansion (see the module docstring); candidates are point masses."""
    K, A = tree.top_k, len(seqs)
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
        batch = node_batch(drafter, seqs, ps, fed_tok.reshape(-1), device, masks=fed_mask.reshape(-1),
                                 logits_rows=rows)
        batch.positions = torch.tensor(
            [s.target_len - 1 + 1 + i // K for s in seqs for i in range(F_)], dtype=torch.int64, device=device)
        logits, a = drafter.head.forward_cached(fed_u.reshape(A * F_, H), batch, drafter.cache, drafter.ops)
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
        chosen: set[int] = set()
        for i in order:  # parents precede children in (score, index) order; kept connected
            if len(chosen) == tree.num_nodes:
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
