"""Prompt-lookup drafting: continue the longest recent n-gram that occurred before."""

from __future__ import annotations

import torch

from ..batch import SamplingTensors
from ..sequence import Sequence
from ..tree import TreeShape
from .base import Drafter, DraftProposal


def ngram_propose(tokens: list[int], k: int, max_ngram: int = 4, min_ngram: int = 1) -> list[int]:
    """Up to ``k`` tokens that followed the latest earlier occurrence of the longest
    suffix n-gram of ``tokens`` (n from ``max_ngram`` down to ``min_ngram``).

    >>> ngram_propose([5, 6, 7, 8, 5, 6], k=2)
    [7, 8]
    """
    n_tok = len(tokens)
    if k <= 0:
        return []
    for n in range(min(max_ngram, n_tok - 1), min_ngram - 1, -1):
        suffix = tokens[n_tok - n:]
        # latest earlier start i (< n_tok - n) with tokens[i:i+n] == suffix
        for i in range(n_tok - n - 1, -1, -1):
            if tokens[i:i + n] == suffix:
                return tokens[i + n:i + n + k]
    return []


def ngram_continuations(tokens: list[int], length: int, max_ngram: int = 4, min_ngram: int = 1,
                        limit: int = 16) -> list[list[int]]:
    """Distinct continuations (up to ``length`` tokens) of earlier matches of the suffix:
    longest n-gram first, then the most recent match first; at most ``limit``.

    >>> ngram_continuations([5, 6, 7, 5, 6, 8, 5, 6], length=2)
    [[8, 5], [7, 5]]
    """
    n_tok, out, seen = len(tokens), [], set()
    for n in range(min(max_ngram, n_tok - 1), min_ngram - 1, -1):
        suffix = tokens[n_tok - n:]
        for i in range(n_tok - n - 1, -1, -1):
            if tokens[i:i + n] == suffix:
                cont = tokens[i + n:i + n + length]
                if cont and tuple(cont) not in seen:
                    seen.add(tuple(cont))
                    out.append(cont)
                    if len(out) == limit:
                        return out
    return out


def continuation_tree(conts: list[list[int]], branching: tuple[int, ...]) -> tuple[list[int], list[int]]:
    """Merge continuations into a tree where a node at depth d has <= branching[d] children.

    Returns (tokens, parents) in breadth-first order (parents before children).

    >>> continuation_tree([[1, 2], [1, 3], [4]], (2, 2))
    ([1, 4, 2, 3], [-1, -1, 0, 0])
    """
    children: dict[int, list[int]] = {-1: []}  # node -> child node ids (insertion ids)
    token_of: dict[int, int] = {}  # node -> its token
    depth_of = {-1: 0}
    for cont in conts:
        node = -1
        for tok in cont[:len(branching)]:
            nxt = next((c for c in children[node] if token_of[c] == tok), None)
            if nxt is None:
                if len(children[node]) >= branching[depth_of[node]]:
                    break
                nxt = len(token_of)
                token_of[nxt], depth_of[nxt], children[nxt] = tok, depth_of[node] + 1, []
                children[node].append(nxt)
            node = nxt
    order, frontier = [], children[-1]
    while frontier:  # breadth first
        order += frontier
        frontier = [c for n in frontier for c in children[n]]
    index = {n: i for i, n in enumerate(order)}
    parent_of = {c: p for p, cs in children.items() for c in cs}
    return [token_of[n] for n in order], [index.get(parent_of[n], -1) for n in order]


class NgramDrafter(Drafter):
    """No model: the draft is a point mass on what followed the matched n-gram."""

    name = "ngram"
    speculates = True
    static_step = False  # drafts come from the host, one list per sequence

    def __init__(self, max_ngram: int = 4, min_ngram: int = 1, tree: TreeShape | None = None):
        if not 1 <= min_ngram <= max_ngram:
            raise ValueError(f"need 1 <= min_ngram <= max_ngram, got {min_ngram}, {max_ngram}")
        self.max_ngram, self.min_ngram = max_ngram, min_ngram
        self.tree = tree

    def propose(self, seqs: list[Sequence], limits: list[int], sampling: SamplingTensors,
                device) -> DraftProposal:
        if self.tree is not None:
            return self._propose_tree(seqs, limits, self.tree, device)
        drafts = [ngram_propose(s.tokens, lim, self.max_ngram, self.min_ngram)
                  for s, lim in zip(seqs, limits, strict=True)]
        flat = [t for d in drafts for t in d]
        return DraftProposal(torch.tensor(flat, dtype=torch.int64, device=device), None,
                             [len(d) for d in drafts])

    def _propose_tree(self, seqs: list[Sequence], limits: list[int], tree: TreeShape, device) -> DraftProposal:
        """Several distinct continuations, merged into a tree of the configured shape."""
        tokens, parents = [], []
        for seq, lim in zip(seqs, limits, strict=True):
            branching = tree.branching[:lim]
            conts = ngram_continuations(seq.tokens, len(branching), self.max_ngram, self.min_ngram,
                                        limit=tree.num_nodes)
            toks, ps = continuation_tree(conts, branching) if branching else ([], [])
            tokens += toks
            parents.append(ps)
        return DraftProposal(torch.tensor(tokens, dtype=torch.int64, device=device), None,
                             [len(p) for p in parents], parents=parents)
