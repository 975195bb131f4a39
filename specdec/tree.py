"""Draft trees: static shapes, ancestor bitmasks, and the batched per-step tree tensors.

A tree of N draft nodes hangs under the *root*, the last committed token. Nodes are
numbered in breadth-first order, so a parent's index is below its children's, siblings
are contiguous, and the nodes of depth <= d form a prefix (truncating a tree to a depth
keeps a valid tree). Node i sits at RoPE position ``L - 1 + depth[i]`` (L = committed
tokens) and, during a tree forward, in cache slot position ``L + i``.

In a tree forward the new tokens of a sequence are ``[root, node 0, ..., node N-1]``;
new token t may see new token j when bit j of its mask is set: the root sees itself,
node i sees the root and its ancestors-or-self. With one int64 per token that allows
N <= 63 nodes.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

MAX_TREE_NODES = 64  # new tokens one int64 ancestor mask addresses (a bit each): the kernels' limit
MAX_DRAFT_NODES = MAX_TREE_NODES - 1  # root + 63 nodes fill the 64 bits of an int64 mask


def _to_int64(bits: int) -> int:
    """A 64-bit pattern as the signed value torch.int64 stores."""
    return bits - (1 << 64) if bits >= 1 << 63 else bits


@functools.lru_cache(maxsize=256)
def tree_layout(parents: tuple[int, ...]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(depths, masks) of a tree, computed once per shape: a static tree costs its
    per-node loop on the first step only.

    >>> tree_layout((-1, -1, 0))
    ((1, 1, 2), (1, 3, 5, 11))
    """
    return tuple(depths_of(parents)), tuple(tree_masks(parents))


def tree_masks(parents) -> list[int]:
    """Masks of ``[root, node 0, ...]``: bit 0 is the root, bit i + 1 node i.

    >>> tree_masks([-1, -1, 0])      # root -> {0, 1}, 0 -> {2}
    [1, 3, 5, 11]
    """
    if len(parents) > MAX_DRAFT_NODES:
        raise ValueError(f"a draft tree holds at most {MAX_DRAFT_NODES} nodes, got {len(parents)}")
    masks = [1]
    for i, p in enumerate(parents):
        if not -1 <= p < i:
            raise ValueError(f"node {i} has parent {p}; parents must precede their children")
        masks.append(masks[p + 1] | (1 << (i + 1)))
    return [_to_int64(m) for m in masks]


@dataclass(frozen=True)
class TreeShape:
    """A static tree: every node at depth d has ``branching[d]`` children.

    >>> TreeShape.of((2, 1)).parents
    (-1, -1, 0, 1)
    """

    branching: tuple[int, ...]
    parents: tuple[int, ...]
    depths: tuple[int, ...]  # 1-based: children of the root have depth 1

    @classmethod
    def of(cls, branching) -> TreeShape:
        branching = tuple(branching)
        if not branching or any(isinstance(b, bool) or not isinstance(b, int) or b < 1 for b in branching):
            raise ValueError(f"draft_tree must be a non-empty tuple of integers >= 1, got {branching!r}")
        parents: list[int] = []
        depths: list[int] = []
        frontier = [-1]
        for d, b in enumerate(branching, start=1):
            nxt = []
            for p in frontier:
                for _ in range(b):
                    nxt.append(len(parents))
                    parents.append(p)
                    depths.append(d)
            frontier = nxt
        if len(parents) > MAX_DRAFT_NODES:
            raise ValueError(
                f"draft_tree={branching} has {len(parents)} nodes; at most {MAX_DRAFT_NODES} fit one "
                "verification pass"
            )
        return cls(branching, tuple(parents), tuple(depths))

    @property
    def num_nodes(self) -> int:
        return len(self.parents)

    @property
    def depth(self) -> int:
        return len(self.branching)

    def nodes_up_to(self, depth: int) -> int:
        """How many nodes have depth <= ``depth`` (a prefix of the node order)."""
        return sum(1 for d in self.depths if d <= depth)


def depths_of(parents) -> list[int]:
    """1-based depth of every node (children of the root have depth 1)."""
    depths: list[int] = []
    for p in parents:
        depths.append(1 if p < 0 else depths[p] + 1)
    return depths
