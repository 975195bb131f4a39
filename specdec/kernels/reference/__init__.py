"""The naive PyTorch path for every kernel, by op family.

One place for three jobs: the test oracle the Triton kernels are checked against, the
baseline the benchmarks compare with, and the CPU backend of the engine. Everything here
is written for clarity first; shapes are given in the docstrings and inline comments.

    attention.py      verify_attention      ragged queries over the paged KV cache
    kv_ops.py         write_kv, move_kv     scatter new K/V into slots; keep-path moves
    sampling.py       sampling_probs, draft_dist, draft_dist_probs, draft_sample,
                      rejection_sample      row distributions, draft sampler, chain verify
    tree_sampling.py  tree_rejection_sample SpecInfer verification of draft trees
    fused_ops.py      add_rms_norm, rotary, silu_mul   a decoder layer's elementwise ops

The argument checks live in ``.._validation`` / ``.._sampling_validation`` (shared with
the Triton launchers, which never import this package).

Paged KV cache layout shared by every attention function in specdec::

    k_cache, v_cache : [num_blocks, block_size, H_kv, D]
    slot             = block_table[b, pos // block_size] * block_size + pos % block_size

A forward over a ragged batch writes the new tokens' K/V into their slots first
(``write_kv``) and then attends (``verify_attention``): the last ``n_b`` cached positions
of sequence ``b`` are its new tokens (a chain, or the nodes of a draft tree in order).
"""

from ...tree import MAX_TREE_NODES
from .._sampling_core import DraftDist
from ..philox import TREE_ACCEPT_STREAM, TREE_SAMPLE_STREAM
from .attention import _slots_of, verify_attention  # noqa: F401  (_slots_of: the tests build slots with it)
from .fused_ops import add_rms_norm, rotary, silu_mul
from .kv_ops import move_kv, write_kv
from .sampling import draft_dist, draft_dist_probs, draft_sample, rejection_sample, sampling_probs
from .tree_sampling import tree_rejection_sample

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
    # re-exported from their homes for callers that reach them through the reference
    "DraftDist",
    "MAX_TREE_NODES",
    "TREE_ACCEPT_STREAM",
    "TREE_SAMPLE_STREAM",
]
