"""generation_config.json: EOS ids and the model's default sampling values.

Oracle: plain greedy decoding with no-cache forwards (tests/engine_helpers.py's ``greedy_ref``).
A model default of greedy (``do_sample: false``) or of top_k 1 makes an unset request
decode greedily; an explicit value must override it and then (seeded) sample something
else.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from checkpoints import make_checkpoint
from engine_helpers import PROMPTS, greedy_ref
from specdec import LLM, SamplingParams
from specdec.models import ConfigError, GenerationDefaults

N = 12


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("gen"), "qwen3", num_layers=2)


def _with_generation_config(base, tmp_path, **gen):
    path = shutil.copytree(base, tmp_path / "m")
    (path / "generation_config.json").write_text(json.dumps(gen))
    return path


def _llm(path, draft=None):
    return LLM(str(path), draft=draft, num_draft_tokens=3, device="cpu", dtype=torch.float32, backend="torch",
               block_size=4)


@pytest.mark.parametrize("gen, field, model_value", [
    (dict(do_sample=False, temperature=0.7), "temperature", 0.0),
    (dict(temperature=0.6, top_k=1, top_p=0.9), "top_k", 1),
])
@pytest.mark.parametrize("draft", [None, "ngram"])
def test_unset_values_take_the_models_and_given_ones_win(base, tmp_path, gen, field, model_value, draft):
    path = _with_generation_config(base, tmp_path, bos_token_id=1, eos_token_id=2, **gen)
    llm = _llm(path, draft)
    prompts = PROMPTS[1:4]
    # unset: the model's value; both defaults make decoding greedy
    req = llm.submit(prompts[0], SamplingParams(max_tokens=N, seed=1))
    assert getattr(req.params, field) == model_value
    outs = llm.generate(prompts, SamplingParams(max_tokens=N, seed=1, ignore_eos=True))
    for prompt, out in zip(prompts, outs):
        assert out.token_ids == greedy_ref(base, prompt, N)
    # given (even the library default): it wins, and sampling departs from greedy
    given = SamplingParams(max_tokens=N, seed=1, ignore_eos=True, **{field: 1.0 if field == "temperature" else 0})
    req = llm.submit(prompts[0], given)
    assert getattr(req.params, field) == getattr(given, field)
    outs = llm.generate(prompts, given)
    assert any(o.token_ids != greedy_ref(base, p, N) for p, o in zip(prompts, outs))
    # the other values of the file fill in around the given one
    if field == "top_k":
        assert (req.params.temperature, req.params.top_p) == (0.6, 0.9)


def test_no_generation_config_keeps_the_library_defaults(base, tmp_path):
    path = shutil.copytree(base, tmp_path / "m")
    (path / "generation_config.json").unlink()
    llm = _llm(path)
    assert llm.generation_defaults == GenerationDefaults()
    p = llm.submit([5, 6], SamplingParams(max_tokens=2)).params
    assert (p.temperature, p.top_k, p.top_p) == (1.0, 0, 1.0)
    assert llm.eos_token_ids == (2,)  # config.json's


@pytest.mark.parametrize("draft", [None, "early-exit:1"])
def test_eos_list_stops_generation(base, tmp_path, draft):
    prompt = PROMPTS[2]
    ref = greedy_ref(base, prompt, N)
    # EOS ids from the file's list: the 4th greedy token (its first occurrence) ends it
    stop_at = next(i for i in range(3, N) if ref[i] not in ref[:i])
    other = next(t for t in range(3, 97) if t not in ref)  # never generated: only the list's 2nd stops
    path = _with_generation_config(base, tmp_path, eos_token_id=[other, ref[stop_at]], do_sample=False)
    llm = _llm(path, draft)
    assert llm.eos_token_ids == (2, other, ref[stop_at])  # config.json's, then the file's
    out = llm.generate([prompt], SamplingParams(max_tokens=N))[0]
    assert out.token_ids == ref[:stop_at + 1] and out.finish_reason == "stop"
    # ignore_eos still overrides it
    out = llm.generate([prompt], SamplingParams(max_tokens=N, ignore_eos=True))[0]
    assert out.token_ids == ref


@pytest.mark.parametrize("gen, match", [
    (dict(temperature=-1.0), "temperature"),
    (dict(top_p=0.0), "top_p"),
    (dict(eos_token_id=["a"]), "eos_token_id"),
])
def test_bad_generation_config_names_the_file(base, tmp_path, gen, match):
    path = _with_generation_config(base, tmp_path, **gen)
    with pytest.raises(ConfigError, match=match) as e:
        _llm(path)
    assert "generation_config.json" in str(e.value)


def test_generation_defaults_from_dict():
    g = GenerationDefaults.from_dict({"eos_token_id": 7, "temperature": 0.6, "top_p": 0.95, "do_sample": True})
    assert (g.eos_token_ids, g.temperature, g.top_k, g.top_p) == ((7,), 0.6, None, 0.95)
    assert GenerationDefaults.from_dict({"eos_token_id": [1, 2], "do_sample": False}).temperature == 0.0
    assert GenerationDefaults.from_dict({}).eos_token_ids is None
