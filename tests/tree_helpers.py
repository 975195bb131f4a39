"""Tree-speculation test helpers shared by test_tree_shape.py, test_tree_drafting.py and
test_tree_engine.py.

* ``tree_checkpoints(root)``: the tiny checkpoints (every family, a draft model, near
  copies), built once per test module by its ``dirs`` fixture;
* ``make_llm``: a torch-backend fp32 ``LLM`` whose KV caches start NaN-filled;
* ``PROMPTS`` / ``MAX_TOKENS`` / ``tree_params``: ragged prompts (one longer than a tree
  forward's 64 tokens, one repetitive) and their greedy ``SamplingParams``;
* ``check_greedy`` (tokens and finish reasons against the no-cache greedy oracle),
  ``check_tree_metrics``, ``check_tree_valid`` and ``record_proposals`` (every step's
  proposed trees).
"""

from __future__ import annotations

import itertools
from types import SimpleNamespace

import torch

from checkpoints import make_checkpoint, perturbed_copy
from engine_helpers import greedy_ref, poison_caches, random_prompts
from specdec import LLM, SamplingParams
from specdec.tree import TreeShape, depths_of

SHAPES = [(2,), (3, 2, 1), (2, 2, 2), (1, 1, 1, 1)]  # the last one is a chain as a tree



def tree_checkpoints(root):
    """The checkpoints of the tree tests under ``root``: one per family, an unrelated
    draft model and near copies of three targets; {name: path}."""
    # mistral-window: a 6-position sliding window, shorter than the sequences
    out = {f: make_checkpoint(root / f, f)
           for f in ("llama", "qwen2", "llama3-rope", "qwen3", "mistral-window", "gemma2", "gemma3")}
    # an unrelated random model with another cache shape (acceptance near 0) ...
    out["draft-model"] = make_checkpoint(root / "draft", "llama", num_layers=2, num_kv_heads=1,
                                         hidden_size=16, intermediate_size=24, seed=1)
    # ... and a near copy of each target (greedy acceptance ~60%, non-first children win often)
    for f in ("llama", "qwen2", "llama3-rope"):
        out[f"near-{f}"] = perturbed_copy(out[f], root / f"near-{f}", noise=0.01, seed=11)
    return out


def make_llm(path, draft=None, **kw):
    """A torch-backend fp32 LLM on CPU whose KV caches are NaN-filled (``poison_caches``)."""
    llm = LLM(str(path), draft=draft, device="cpu", dtype=torch.float32, backend="torch", **kw)
    poison_caches(llm)
    return llm


# ragged, crossing block boundaries, one longer than a tree forward's 64 tokens, one
# repetitive (n-gram hits)
PROMPTS = random_prompts([1, 4, 9, 70]) + [[5, 6, 7, 8] * 3 + [5, 6, 7]]
MAX_TOKENS = [16, 12, 16, 9, 16]  # different lengths: trees near the end are cut shallower


def tree_params(max_tokens=MAX_TOKENS, **kw):
    """One SamplingParams per max_tokens entry; greedy unless ``temperature`` is given."""
    kw.setdefault("temperature", 0.0)
    return [SamplingParams(max_tokens=m, **kw) for m in max_tokens]


def check_greedy(path, prompts, params, outs):
    """Every output is plain greedy decoding of its prompt, with the right finish reason."""
    for prompt, p, out in zip(prompts, params, outs):
        ref = greedy_ref(path, prompt, p.max_tokens, () if p.ignore_eos else (2,))
        assert out.token_ids == ref, (prompt[:8], out.token_ids, ref)
        stopped = len(ref) < p.max_tokens or (not p.ignore_eos and ref[-1] == 2)
        assert out.finish_reason == ("stop" if stopped else "length")


def check_tree_metrics(out, shape: TreeShape):
    """The metrics of one tree-decoded request are consistent with the tree ``shape``."""
    m = out.metrics
    assert m.num_generated == len(out.token_ids)
    assert 0 <= m.num_accepted_tokens <= m.num_draft_tokens <= m.num_steps * shape.num_nodes
    assert m.num_generated <= m.num_steps * (shape.depth + 1)
    assert m.num_generated >= m.num_accepted_tokens + m.num_steps - 1
    acc, prop = m.accepted_per_position, m.proposed_per_position
    assert len(acc) == len(prop) <= shape.depth  # one entry per depth, not per node
    assert sum(acc) == m.num_accepted_tokens  # one accepted token per depth on the path
    assert all(a <= p for a, p in zip(acc, prop))
    assert all(x >= y for x, y in zip(acc, acc[1:])) and all(x >= y for x, y in zip(prop, prop[1:]))


def record_proposals(llm):
    """Wrap the drafter: record (limits, counts, parents, token lists) of every step."""
    steps, propose = [], llm.drafter.propose

    def wrapped(seqs, limits, sampling, device):
        prop = propose(seqs, limits, sampling, device)
        toks = prop.tokens.tolist()
        cu = [0] + list(itertools.accumulate(prop.counts))
        steps.append(SimpleNamespace(limits=list(limits), counts=list(prop.counts), parents=prop.parents,
                                     tokens=[toks[a:b] for a, b in zip(cu, cu[1:])]))
        return prop

    llm.drafter.propose = wrapped
    return steps


def check_tree_valid(parents, tokens, branching, limit, distinct_siblings):
    """A proposed tree: topological, at most ``branching[d-1]`` children at depth d - 1,
    no deeper than ``limit``; siblings distinct where the drafter promises it."""
    depths = depths_of(parents)
    assert all(-1 <= p < i for i, p in enumerate(parents))
    assert max(depths, default=0) <= min(limit, len(branching))
    assert depths == sorted(depths)  # breadth-first
    for u in [-1] + list(range(len(parents))):
        kids = [i for i, p in enumerate(parents) if p == u]
        d = 0 if u < 0 else depths[u]
        assert len(kids) <= (branching[d] if d < len(branching) else 0)
        if distinct_siblings:
            assert len({tokens[i] for i in kids}) == len(kids)
