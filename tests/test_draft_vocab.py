"""Draft models whose vocabulary is padded to another size than the target's.

Pairs such as Qwen2.5-0.5B + 7B (151,936 vs 152,064 rows) or Gemma 3 1B + 12B share a
tokenizer and differ only in padding rows. Here a V = 8 target gets two drafts made from
a noisy copy of it: one cut to 6 rows (the target's ids 6 and 7 are "padding" the draft
cannot propose, but the target can still emit), one grown to 10 (rows the target lacks).
All three directories hold the same 6-token tokenizer.

* ``fit_vocab``: the draft's logits over its real rows are unchanged, padding ids get
  -inf, padding embeddings are zero;
* greedy speculative output equals plain greedy decoding;
* the chi-square test of the joint law of 3 sampled tokens (tests/stats.py) passes with
  either draft, and rejects a wrong rule (the residual taken from p) with the cut one;
* pairs that do not qualify are refused before anything is allocated, with the reason.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file, save_file

from checkpoints import make_checkpoint, perturbed_copy
from engine_helpers import greedy_ref
from exact_law import ARCH, N_TOKENS, V, exact_joint
from sampler_rules import ALPHA, POWER_ALPHA, residual_from_p
from specdec import LLM, SamplingParams
from specdec.models import load_model
from specdec.models.vocab import fit_vocab
from stats import chi_square_test

PROMPT = [3, 1, 2, 0, 5, 2, 0, 4, 3, 1, 2, 0, 5, 2]
N_SAMPLES = 4096
WORDS = 6  # the shared tokenizer's ids: 0..5


def _tokenizer(path, words: int = WORDS, order=None) -> None:
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    ids = list(range(words)) if order is None else order
    tok = Tokenizer(models.WordLevel(vocab={f"w{i}": ids[i] for i in range(words)}, unk_token="w0"))
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="w0").save_pretrained(path)


def _resized(src, dst, rows: int, seed: int):
    """``src`` with its embedding (and output head when untied) cut or grown to ``rows``."""
    shutil.copytree(src, dst)
    gen = torch.Generator().manual_seed(seed)
    weights = load_file(dst / "model.safetensors")
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        if name in weights:
            w = weights[name]
            extra = torch.randn(max(0, rows - len(w)), w.shape[1], generator=gen) * 0.5
            weights[name] = torch.cat((w[:rows], extra)).contiguous()
    save_file(weights, dst / "model.safetensors", metadata={"format": "pt"})
    cfg = json.loads((dst / "config.json").read_text())
    (dst / "config.json").write_text(json.dumps({**cfg, "vocab_size": rows}))
    return dst


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("draft_vocab")
    target = make_checkpoint(root / "target", num_layers=2, seed=1, **ARCH)
    near = perturbed_copy(target, root / "near", noise=0.25, seed=3)
    small, big = _resized(near, root / "small", 6, 0), _resized(near, root / "big", 10, 1)
    for d in (target, small, big):
        _tokenizer(d)
    return SimpleNamespace(target=target, small=small, big=big, near=near, model=load_model(target))


def _llm(pair, draft, **kw) -> LLM:
    return LLM(str(pair.target), draft=str(draft), num_draft_tokens=2, device="cpu", dtype=torch.float32,
               backend="torch", block_size=4, seed=0, **kw)


def test_fit_vocab_keeps_real_rows_and_masks_padding(pair):
    ids = torch.tensor([PROMPT[:6] + [7, 6]])  # the target's padding ids fed in too
    small = load_model(pair.small)
    before = small(ids[:, :6])
    fit_vocab(small, V)
    after = small(ids)
    assert after.shape[-1] == V and torch.equal(after[:, :6, :6], before)  # positions 0..5: the same prefix
    assert torch.isneginf(after[..., 6:]).all() and torch.isfinite(after[..., :6]).all()
    assert torch.equal(small.model.embed_tokens.weight[6:], torch.zeros(2, ARCH["hidden_size"]))
    big = load_model(pair.big)
    before = big(ids)[..., :V]
    fit_vocab(big, V)
    assert torch.equal(big(ids), before) and big.model.embed_tokens.weight.shape[0] == V


@pytest.mark.parametrize("static", [False, True], ids=["eager", "fixed-shape"])
@pytest.mark.parametrize("which", ["small", "big"])
def test_greedy_equals_plain_greedy(pair, which, static):
    prompts = [PROMPT, [1, 2], [5, 4, 3, 2, 1, 0, 1, 2, 3], [7, 6, 1, 7, 6]]  # the last: padding ids in the prompt
    llm = _llm(pair, getattr(pair, which))
    if static:  # the step CUDA graphs capture on a GPU, run here without graphs
        llm.engine.runner = llm.decode_runner(use_graphs=False)
    outs = llm.generate(prompts, SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))
    for prompt, out in zip(prompts, outs, strict=True):
        assert out.token_ids == greedy_ref(pair.target, prompt, 12)
    assert llm.metrics()["num_accepted_tokens"] > 0  # the near draft agrees often


def _outcomes(llm: LLM):
    params = [SamplingParams(max_tokens=N_TOKENS, temperature=1.0, seed=i, ignore_eos=True) for i in range(N_SAMPLES)]
    toks = torch.tensor([o.token_ids for o in llm.generate([PROMPT] * N_SAMPLES, params)])
    return torch.bincount((toks * V ** torch.arange(N_TOKENS - 1, -1, -1)).sum(1), minlength=V ** N_TOKENS)


@pytest.mark.slow
@pytest.mark.parametrize("which", ["small", "big"])
def test_samples_target_distribution(pair, which):
    joint, _ = exact_joint(pair.model, PROMPT, SamplingParams(temperature=1.0))
    assert joint.view(-1, V)[:, 6:].sum() > 0.05  # the target does emit the small draft's padding ids
    llm = _llm(pair, getattr(pair, which), max_num_seqs=512)
    res = chi_square_test(_outcomes(llm), joint)
    assert res.impossible == 0 and res.p_value > ALPHA, res
    m = llm.metrics()
    assert 0.2 < m["acceptance_rate"] < 0.95, m  # acceptances and rejections both frequent


@pytest.mark.slow
def test_a_wrong_rule_is_rejected(pair):
    joint, _ = exact_joint(pair.model, PROMPT, SamplingParams(temperature=1.0))
    llm = _llm(pair, pair.small, max_num_seqs=512)
    llm.engine.ops = dataclasses.replace(llm.engine.ops, rejection_sample=residual_from_p)
    res = chi_square_test(_outcomes(llm), joint)
    assert res.p_value < POWER_ALPHA, f"a wrong sampler passed the distribution test: {res}"


def test_pairs_that_do_not_qualify_are_refused(pair, tmp_path):
    bare = _resized(pair.near, tmp_path / "bare", 6, 0)  # no tokenizer files
    with pytest.raises(ValueError, match=r"vocabulary of 6 tokens but the target .* has 8: .* the draft directory "
                                         r".* has no tokenizer files"):
        _llm(pair, bare)
    other = _resized(pair.near, tmp_path / "other", 6, 0)
    _tokenizer(other, order=[1, 0, 2, 3, 4, 5])  # w0 and w1 swapped
    with pytest.raises(ValueError, match="their tokenizers differ"):
        _llm(pair, other)
    wide = _resized(pair.near, tmp_path / "wide", 6, 0)
    target = shutil.copytree(pair.target, tmp_path / "target")
    for d in (wide, target):
        _tokenizer(d, words=7)  # id 6 is a real token the 6-row draft would cut off
    with pytest.raises(ValueError, match="ids up to 6: the smaller vocabulary would cut real tokens off"):
        LLM(str(target), draft=str(wide), device="cpu", dtype=torch.float32, backend="torch")
