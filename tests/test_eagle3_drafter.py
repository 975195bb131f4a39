"""The EAGLE-3 head and drafter against an independent full-recompute reference.

* capture: ``forward_cached(capture=...)`` returns, for every token row, transformers'
  ``output_hidden_states[k]`` of the plain forward (k = the input of decoder layer k);
* the drafter's draft logits equal ``tests/eagle3_reference.py`` (plain float64
  PyTorch, the whole draft sequence recomputed from scratch, no cache, no backend ops)
  to 1e-4 in fp32: after the prompt's prefill, along a chain of draft steps, and after
  a partial acceptance (the target features of the accepted draft and the bonus token
  overwrite what drafting wrote); for a full and a reduced (d2t) draft vocabulary,
  shared and own embeddings, θ default and explicit, norm_before_residual;
* the dynamic-tree option's parser.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from checkpoints import make_checkpoint
from eagle3_reference import (
    hf_hidden_states,
    load_tensors,
    make_eagle3_head,
    reference_chain_logits,
)
from specdec import LLM
from specdec.batch import SamplingTensors, build_forward_batch
from specdec.drafters.eagle3 import DynamicTree, Eagle3Drafter
from specdec.kernels._sampling_core import DraftDist
from specdec.sampling_params import SamplingParams
from specdec.sequence import Sequence

V, HT, LAYERS = 32, 32, 4
PROMPT = [3, 17, 5, 9, 30, 2, 11, 8, 21, 4, 6]  # 11 tokens: crosses blocks of 4


@pytest.fixture(scope="module")
def target(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("e3t") / "t", "llama", vocab_size=V, hidden_size=HT,
                           num_layers=LAYERS, num_heads=4, num_kv_heads=2, std=0.5, seed=3)


@pytest.fixture(scope="module")
def deep_target(tmp_path_factory):
    """7 layers: the default aux set {2, L // 2, L - 3} = {2, 3, 4} is 3 distinct layers
    (on the 4-layer target it collapses, and the loader refuses it)."""
    return make_checkpoint(tmp_path_factory.mktemp("e3d") / "t", "llama", vocab_size=V, hidden_size=HT,
                           num_layers=7, num_heads=4, num_kv_heads=2, std=0.5, seed=4)


HEADS = {
    "full-vocab": dict(aux_ids=[1, 2, 3]),
    "d2t-own-embed": dict(draft_vocab_size=12, own_embed=True, hidden_size=24, num_heads=3, num_kv_heads=1,
                          aux_ids=[0, 2, 3], rope_theta=500.0),
    "default-ids-norm-before-residual": dict(norm_before_residual=True, num_heads=4, num_kv_heads=2),
}


def test_capture_equals_hf_hidden_states(target):
    llm = LLM(str(target), device="cpu", dtype=torch.float32, backend="torch", block_size=4)
    capture = (0, 1, 3, 4)  # 4 = after the last layer (pre-norm; HF's last entry is post-norm)
    llm.blocks.allocate(0, len(PROMPT))
    batch = build_forward_batch(llm.blocks, [0], [0], [len(PROMPT)], [1], torch.tensor(PROMPT), "cpu")
    logits, hidden = llm.target.forward_cached(batch, llm.cache, llm.ops, capture=capture)
    assert hidden.shape == (len(PROMPT), len(capture) * HT) and logits.shape == (1, V)
    ref = hf_hidden_states(target, PROMPT, capture[:3])
    torch.testing.assert_close(hidden[:, :3 * HT], ref, atol=1e-5, rtol=1e-5)
    # index L is the stream after the last layer: its RMSNorm is what the logits read
    model = llm.target.model
    normed = model.norm(hidden[-1:, 3 * HT:])
    torch.testing.assert_close(llm.target.lm_head(normed), logits, atol=1e-5, rtol=1e-5)
    plain = llm.target.forward_cached(batch, llm.cache, llm.ops)
    assert torch.equal(plain, logits)
    with pytest.raises(ValueError, match="outside"):
        llm.target.forward_cached(batch, llm.cache, llm.ops, capture=(7,))


class _Recorder:
    """Wraps ``draft_sample``: records the draft logits of every call."""

    def __init__(self, fn):
        self.fn, self.logits = fn, []

    def __call__(self, logits, *args, **kwargs):
        self.logits.append(logits.clone())
        return self.fn(logits, *args, **kwargs)


@pytest.mark.parametrize("variant, backend", [(v, "torch") for v in HEADS] + [("d2t-own-embed", "triton")])
def test_draft_logits_equal_full_recompute(request, tmp_path, variant, backend):
    explicit = "aux_ids" in HEADS[variant]
    target = request.getfixturevalue("target" if explicit else "deep_target")
    layers_of_target = LAYERS if explicit else 7
    head_dir = make_eagle3_head(tmp_path / "h", vocab_size=V, target_hidden=HT, seed=5, **HEADS[variant])
    tensors, cfg = load_tensors(head_dir)
    llm = LLM(str(target), draft=str(head_dir), num_draft_tokens=3, device="cpu", dtype=torch.float32,
              backend=backend, block_size=4)
    drafter = llm.drafter
    assert isinstance(drafter, Eagle3Drafter)
    layers = drafter.capture_layers
    default = tuple(sorted((2, layers_of_target // 2, layers_of_target - 3)))  # {2, L // 2, L - 3}
    assert layers == tuple(HEADS[variant].get("aux_ids", default)) and len(set(layers)) == 3
    embed = llm.target.model.embed_tokens.weight.detach()
    seq = Sequence(0, PROMPT, SamplingParams(temperature=0.0), seed=0)
    llm.blocks.allocate(0, len(PROMPT) + 8)
    rec = _Recorder(llm.ops.draft_sample)
    drafter.ops = dataclasses.replace(drafter.ops, draft_sample=rec)

    def verify(tokens, start):  # one target forward with capture over new tokens at `start`
        batch = build_forward_batch(llm.blocks, [0], [start], [len(tokens)], [1], torch.tensor(tokens), "cpu")
        return llm.target.forward_cached(batch, llm.cache, llm.ops, capture=layers)[1]

    def check(got, ref):
        ref = ref.float()
        assert torch.equal(torch.isinf(got), torch.isinf(ref))  # -inf outside the draft vocabulary
        fin = torch.isfinite(ref)
        torch.testing.assert_close(got[fin], ref[fin], atol=1e-4, rtol=1e-4)

    # -- 1. prefill: the prompt's features, the pending token x_n = 7 --
    hidden = verify(PROMPT, 0)
    drafter.observe([seq], hidden, [list(range(len(PROMPT)))], [PROMPT[1:] + [7]])
    seq.tokens.append(7)
    seq.target_len = len(PROMPT)
    assert seq.draft_len == seq.target_len
    feats = hf_hidden_states(target, PROMPT, layers)
    ref0 = reference_chain_logits(tensors, cfg, embed, feats, seq.tokens, [])[0]
    check(drafter._state[seq].logits, ref0)
    # -- 2. a chain of 3 draft steps --
    sampling = SamplingTensors.of([seq], "cpu")
    prop = drafter.propose([seq], [3], sampling, "cpu")
    drafts = prop.tokens.tolist()
    assert prop.counts == [3] and len(rec.logits) == 3
    refs = reference_chain_logits(tensors, cfg, embed, feats, seq.tokens, drafts[:2])
    for got, ref in zip(rec.logits, refs, strict=True):
        check(got[0], ref)
    assert drafts == [int(r.argmax()) for r in refs]  # greedy drafts: argmax over the target ids
    torch.testing.assert_close(prop.q.logits, torch.stack(rec.logits)[:, 0])
    # -- 3. verify: d_1 accepted, a bonus token that differs from d_2 --
    bonus = (drafts[1] + 1) % V
    hidden = verify([7] + drafts, len(PROMPT))  # positions n .. n + 3
    drafter.observe([seq], hidden, [[0, 1]], [[drafts[0], bonus]])
    seq.tokens += [drafts[0], bonus]
    seq.target_len = len(seq.tokens) - 1
    feats = hf_hidden_states(target, seq.tokens[:-1], layers)
    ref = reference_chain_logits(tensors, cfg, embed, feats, seq.tokens, [])[0]
    check(drafter._state[seq].logits, ref)
    # -- 4. and one more draft step from there --
    rec.logits.clear()
    prop = drafter.propose([seq], [2], SamplingTensors.of([seq], "cpu"), "cpu")
    refs = reference_chain_logits(tensors, cfg, embed, feats, seq.tokens, prop.tokens.tolist()[:1])
    for got, ref in zip(rec.logits, refs, strict=True):
        check(got[0], ref)


def test_dynamic_tree_parse():
    assert DynamicTree.parse("dynamic:4,5,24") == DynamicTree(4, 5, 24)
    t = DynamicTree.parse("dynamic:8,8,60")
    assert t.num_nodes == 59 and t.cache_slots == 59
    assert DynamicTree.parse("dynamic:9,8,20").cache_slots == 63
    for bad in ("dynamic:0,3,8", "dynamic:3,0,8", "dynamic:3,3,1", "dynamic:3,3,65", "dynamic:10,8,20",
                "dynamic:3,3", "dynamic:a,3,8", "static:3,3,8"):
        with pytest.raises(ValueError, match="dynamic:K,D,N"):
            DynamicTree.parse(bad)


@pytest.mark.parametrize("tree", [None, (2, 2), "dynamic:2,3,6"])
def test_a_sequence_without_features_drafts_nothing_and_keeps_the_row_layout(target, tmp_path, tree):
    """In a batch, a sequence whose head has no features yet (its prefill) drafts nothing;
    the other's drafts and q rows (tree: the root row and one per node) are exactly what
    it proposes alone, and the empty one still has its root row."""
    head_dir = make_eagle3_head(tmp_path / "h", vocab_size=V, target_hidden=HT, aux_ids=[1, 2, 3], seed=8)
    llm = LLM(str(target), draft=str(head_dir), num_draft_tokens=2, draft_tree=tree, device="cpu",
              dtype=torch.float32, backend="torch", block_size=4)
    drafter = llm.drafter
    ready = Sequence(0, PROMPT, SamplingParams(temperature=1.0), seed=3)
    fresh = Sequence(1, PROMPT[:5], SamplingParams(temperature=1.0), seed=4)
    for s in (ready, fresh):
        llm.blocks.allocate(s.seq_id, len(s.tokens) + 16)
    batch = build_forward_batch(llm.blocks, [0], [0], [len(PROMPT)], [1], torch.tensor(PROMPT), "cpu")
    hidden = llm.target.forward_cached(batch, llm.cache, llm.ops, capture=drafter.capture_layers)[1]
    drafter.observe([ready], hidden, [list(range(len(PROMPT)))], [PROMPT[1:] + [7]])
    ready.tokens.append(7)
    ready.target_len = len(PROMPT)
    alone = drafter.propose([ready], [2], SamplingTensors.of([ready], "cpu"), "cpu")
    both = drafter.propose([fresh, ready], [2, 2], SamplingTensors.of([fresh, ready], "cpu"), "cpu")
    assert both.counts == [0] + alone.counts and alone.counts[0] > 0
    assert torch.equal(both.tokens, alone.tokens)
    if tree is None:
        assert both.parents is None
        torch.testing.assert_close(both.q, alone.q)
    else:
        assert both.parents == [[]] + alone.parents
        if alone.q is None:  # dynamic: point masses
            assert both.q is None
        else:
            assert both.q.logits.shape[0] == 1 + alone.q.logits.shape[0]  # the empty tree's root row
            torch.testing.assert_close(DraftDist(*(t[1:] for t in both.q)), alone.q)
