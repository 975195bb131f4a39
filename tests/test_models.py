"""The llama-family runner against transformers: logits parity on tiny random checkpoints.

Oracle: ``AutoModelForCausalLM.from_pretrained`` on the same directory, fp32. Every
parameter of the fixtures (biases, norm weights) is random and non-zero, so a wrongly
loaded or ignored tensor shows in the logits.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from torch.testing import assert_close

from checkpoints import FAMILIES, make_checkpoint
from specdec.models import ConfigError, ModelConfig, load_model

FP32 = dict(atol=1e-4, rtol=1e-4)


def _ids(batch: int, length: int, vocab: int = 97, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


def _hf_logits(path, input_ids: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    # eager: transformers' reference attention (its SDPA path drops Gemma 2's soft-capping)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager").eval()
    with torch.no_grad():
        return model(input_ids).logits.float()


def _check_parity(path, length: int = 37):
    ids = _ids(3, length)
    ours = load_model(path)(ids)
    ref = _hf_logits(path, ids)
    assert ours.shape == ref.shape == (3, length, 97)
    assert ours.dtype == torch.float32
    assert ref.std() > 0.2, "degenerate fixture: logits almost constant"
    assert_close(ours, ref, **FP32)
    return ours


# ---------------------------------------------------------------------- parity


@pytest.fixture(scope="module")
def family_dirs(tmp_path_factory):
    return {f: make_checkpoint(tmp_path_factory.mktemp(f), f) for f in FAMILIES}


@pytest.mark.parametrize("family", FAMILIES)
def test_parity_with_transformers(family_dirs, family):
    _check_parity(family_dirs[family])


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral", "qwen3"])
@pytest.mark.parametrize("num_kv_heads", [1, 2, 4])
def test_parity_gqa_ratios(tmp_path, family, num_kv_heads):
    path = make_checkpoint(tmp_path, family, num_heads=4, num_kv_heads=num_kv_heads, num_layers=2)
    assert load_model(path).config.num_kv_heads == num_kv_heads
    _check_parity(path, length=19)


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral", "qwen3", "qwen3-tied"])
def test_parity_explicit_head_dim(tmp_path, family):
    # head_dim 16 != hidden 32 / heads 4 = 8: q_proj is [64, 32], o_proj [32, 64]
    path = make_checkpoint(tmp_path, family, head_dim=16, num_layers=2)
    model = load_model(path)
    assert model.config.head_dim == 16
    assert model.model.layers[0].self_attn.q_proj.weight.shape == (64, 32)
    _check_parity(path, length=19)


def test_parity_llama_attention_and_mlp_bias(tmp_path):
    path = make_checkpoint(tmp_path, "llama", attention_bias=True, mlp_bias=True, num_layers=2)
    model = load_model(path)
    attn, mlp = model.model.layers[1].self_attn, model.model.layers[1].mlp
    for lin in (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj, mlp.gate_proj, mlp.up_proj, mlp.down_proj):
        assert lin.bias is not None and lin.bias.abs().sum() > 0
    _check_parity(path, length=19)


def test_qwen2_biases_loaded(family_dirs):
    from safetensors.torch import load_file

    path = family_dirs["qwen2"]
    stored = load_file(path / "model.safetensors")
    attn = load_model(path).model.layers[2].self_attn
    for proj in ("q_proj", "k_proj", "v_proj"):
        bias = getattr(attn, proj).bias
        assert bias.abs().sum() > 0
        assert torch.equal(bias, stored[f"model.layers.2.self_attn.{proj}.bias"])
    assert attn.o_proj.bias is None  # qwen2: q/k/v biases only


@pytest.mark.parametrize("family", ["qwen3", "qwen3-tied"])
def test_qwen3_head_norms_loaded(family_dirs, family):
    from safetensors.torch import load_file

    path = family_dirs[family]
    stored = load_file(path / "model.safetensors")
    model = load_model(path)
    cfg = model.config
    assert cfg.architecture == "Qwen3ForCausalLM" and cfg.qk_norm
    assert not cfg.qkv_bias and not cfg.o_bias
    attn = model.model.layers[1].self_attn
    for name in ("q_norm", "k_norm"):
        w = getattr(attn, name).weight
        assert w.shape == (cfg.head_dim,)
        assert torch.equal(w, stored[f"model.layers.1.self_attn.{name}.weight"])
    assert attn.q_proj.bias is None and attn.o_proj.bias is None
    tied = model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert tied == (family == "qwen3-tied") == cfg.tie_word_embeddings
    # the head norms matter: without them the logits move
    for layer in model.model.layers:
        layer.self_attn.q_norm.weight.data.fill_(1.0)
    assert not torch.allclose(model(_ids(1, 9)), load_model(path)(_ids(1, 9)), atol=1e-2)


def test_parity_linear_rope_scaling(tmp_path):
    rope = {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}
    path = make_checkpoint(tmp_path, "llama", rope_parameters=rope, num_layers=2)
    assert load_model(path).config.rope_type == "linear"
    _check_parity(path, length=19)


def test_llama3_rope_changes_frequencies(family_dirs):
    cfg = load_model(family_dirs["llama3-rope"]).config
    assert cfg.rope_type == "llama3"
    plain = ModelConfig(**{**cfg.__dict__, "rope_type": "default", "rope_scaling": {}})
    # the low frequencies are divided by `factor`, the highest is untouched
    scaled, base = cfg.rope_inv_freq(), plain.rope_inv_freq()
    assert scaled[0] == base[0]
    assert_close(scaled[-1], base[-1] / cfg.rope_scaling["factor"])


def test_tied_and_untied(family_dirs):
    tied = load_model(family_dirs["llama-tied"])
    assert tied.config.tie_word_embeddings
    assert tied.lm_head.weight.data_ptr() == tied.model.embed_tokens.weight.data_ptr()
    untied = load_model(family_dirs["llama"])
    assert not untied.config.tie_word_embeddings
    assert untied.lm_head.weight.data_ptr() != untied.model.embed_tokens.weight.data_ptr()
    assert not torch.equal(untied.lm_head.weight, untied.model.embed_tokens.weight)


def test_tied_checkpoint_that_stores_lm_head(family_dirs, tmp_path):
    # some tied checkpoints store lm_head.weight anyway; it must be ignored, not loaded
    from safetensors.torch import load_file, save_file

    path = shutil.copytree(family_dirs["llama-tied"], tmp_path / "tied")
    tensors = load_file(path / "model.safetensors")
    tensors["lm_head.weight"] = torch.zeros_like(tensors["model.embed_tokens.weight"])
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    model = load_model(path)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert_close(model(_ids(1, 5)), load_model(family_dirs["llama-tied"])(_ids(1, 5)), atol=0, rtol=0)


# ---------------------------------------------------------------------- sharded, dtypes


def test_sharded_checkpoint_loads_identically(family_dirs, tmp_path):
    from transformers import AutoModelForCausalLM

    single = family_dirs["qwen2"]
    sharded = tmp_path / "sharded"
    AutoModelForCausalLM.from_pretrained(single).save_pretrained(sharded, max_shard_size="20KB")
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert not (sharded / "model.safetensors").exists()
    a, b = load_model(single), load_model(sharded)
    for (name_a, p_a), (name_b, p_b) in zip(a.named_parameters(), b.named_parameters(), strict=True):
        assert name_a == name_b and torch.equal(p_a, p_b), name_a
    ids = _ids(2, 9)
    assert torch.equal(a(ids), b(ids))


@pytest.mark.parametrize("dtype, tol", [(torch.float16, 1e-2), (torch.bfloat16, 8e-2)])
@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3", "gemma2", "gemma3"])
def test_half_precision_load(family_dirs, family, dtype, tol):
    path = family_dirs[family]
    model = load_model(path, dtype=dtype)
    assert {p.dtype for p in model.parameters()} == {dtype}
    ids = _ids(2, 23)
    logits = model(ids)
    assert logits.dtype == torch.float32
    ref = load_model(path)(ids)
    assert_close(logits, ref, atol=tol * ref.abs().max().item(), rtol=tol)
    # and not trivially close: half precision does change the numbers
    assert not torch.equal(logits, ref)


@pytest.mark.parametrize("dtype, atol", [(torch.float16, 1e-3), (torch.bfloat16, 8e-3)])
def test_half_precision_keeps_fp32_rope_and_matches_transformers(family_dirs, dtype, atol):
    from transformers import AutoModelForCausalLM

    # transformers keeps the non-persistent inv_freq buffer in fp32; a model.to(dtype) after
    # loading would round it to fp16/bf16 and the RoPE angles would drift with the position
    path = family_dirs["llama"]
    model = load_model(path, dtype=dtype)
    inv_freq = model.model.rotary.inv_freq
    assert inv_freq.dtype == torch.float32
    assert torch.equal(inv_freq, model.config.rope_inv_freq())
    # same dtype on both sides: the same op-by-op rounding, so only a sub-ulp difference
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()
    ids = _ids(1, 200)
    with torch.no_grad():
        ref = hf(ids).logits.float()
    assert_close(model(ids), ref, atol=atol, rtol=0)


# ---------------------------------------------------------------------- ModelConfig


def _raw(path) -> dict:
    return json.loads((path / "config.json").read_text())


def test_mistral_sliding_window_shorter_than_the_context_loads(family_dirs):
    raw = _raw(family_dirs["mistral"])
    raw.update(sliding_window=64, max_position_embeddings=256)
    cfg = ModelConfig.from_dict(raw, source="cfg.json")
    assert cfg.sliding_window == 64 and cfg.sliding_layers == (True,) * 3


@pytest.mark.parametrize("window", [None, 256, 4096])
def test_mistral_sliding_window_at_least_context_is_global(family_dirs, window):
    raw = _raw(family_dirs["mistral"])
    raw.update(sliding_window=window, max_position_embeddings=256)
    cfg = ModelConfig.from_dict(raw)
    assert cfg.architecture == "MistralForCausalLM" and cfg.sliding_window is None


@pytest.mark.parametrize("window", [1, 3, 6, 20])
def test_mistral_sliding_window_parity(tmp_path, window):
    # sequences of 37 tokens, windows from 1 to 20: transformers' sliding-window mask
    path = make_checkpoint(tmp_path, "mistral-window", sliding_window=window, num_layers=2)
    model = load_model(path)
    assert model.config.sliding_window == window
    ours = _check_parity(path)
    raw = _raw(path)
    raw["sliding_window"] = None
    (path / "config.json").write_text(json.dumps(raw))
    assert not torch.allclose(ours, load_model(path)(_ids(3, 37)), atol=1e-3)  # the window matters


def test_qwen3_sliding_window_only_when_used(family_dirs, tmp_path):
    raw = _raw(family_dirs["qwen3"])
    raw.update(sliding_window=64, max_position_embeddings=256, use_sliding_window=False)
    raw.pop("layer_types", None)
    assert ModelConfig.from_dict(raw).sliding_window is None
    raw.update(use_sliding_window=True, max_window_layers=1)
    cfg = ModelConfig.from_dict(raw)
    assert cfg.sliding_window == 64 and cfg.sliding_layers == (False, True, True)
    # parity with transformers' per-layer windows (layer 0 global)
    path = make_checkpoint(tmp_path, "qwen3", use_sliding_window=True, sliding_window=5, max_window_layers=1,
                           num_layers=3)
    assert load_model(path).config.sliding_layers == (False, True, True)
    _check_parity(path)


@pytest.mark.parametrize("bad, match", [
    (dict(sliding_window=0), "sliding_window must be a positive integer"),
    (dict(sliding_window=16, layer_types=["sliding_attention"]), "layer_types must list 3"),
    (dict(sliding_window=16, layer_types=["local"] * 3), "layer_types must list 3"),
])
def test_bad_window_config(family_dirs, bad, match):
    raw = _raw(family_dirs["mistral"])
    raw.update(bad)
    with pytest.raises(ConfigError, match=match):
        ModelConfig.from_dict(raw)


@pytest.mark.parametrize("key", ["rope_parameters", "rope_scaling"])
@pytest.mark.parametrize("rope_type", ["yarn", "dynamic", "longrope"])
def test_unsupported_rope_type_refused(family_dirs, key, rope_type):
    raw = _raw(family_dirs["llama"])
    raw.pop("rope_parameters", None)
    raw[key] = {"rope_type": rope_type, "factor": 4.0, "rope_theta": 10000.0}
    with pytest.raises(ConfigError, match=rope_type) as e:
        ModelConfig.from_dict(raw)
    assert "llama3" in str(e.value)  # lists the supported types


def test_unsupported_rope_type_refused_on_load(family_dirs, tmp_path):
    path = shutil.copytree(family_dirs["llama"], tmp_path / "l")
    raw = _raw(path)
    raw["rope_parameters"] = {"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0}
    (path / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ConfigError, match="yarn"):
        load_model(path)


def test_config_fields_of_each_family(family_dirs):
    cfgs = {f: load_model(p).config for f, p in family_dirs.items()}
    assert cfgs["qwen2"].qkv_bias and not cfgs["qwen2"].o_bias
    assert not cfgs["llama"].qkv_bias and not cfgs["mistral"].qkv_bias
    assert cfgs["llama-tied"].tie_word_embeddings and not cfgs["llama"].tie_word_embeddings
    assert cfgs["mistral"].architecture == "MistralForCausalLM"
    for f, cfg in cfgs.items():
        assert cfg.eos_token_ids == (2,) and cfg.bos_token_id == 1
        assert (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim) == (4, 2, 16 if f.startswith("gemma") else 8)
        assert cfg.embed_scale == cfg.sandwich_norms == (cfg.norm_offset == 1.0) == f.startswith("gemma")


def test_gemma_config_fields(family_dirs):
    g2 = load_model(family_dirs["gemma2"]).config
    assert g2.sliding_window == 6 and g2.sliding_layers == (True, False, True)  # alternating
    assert (g2.attn_softcap, g2.final_softcap, g2.hidden_act) == (3.0, 5.0, "gelu_tanh")
    assert g2.attn_scale == 24**-0.5 and not g2.qk_norm and g2.rope_local_theta is None
    g3 = load_model(family_dirs["gemma3"]).config
    assert g3.sliding_layers == (True, True, False) and g3.qk_norm
    assert (g3.attn_softcap, g3.final_softcap) == (None, 5.0)
    assert (g3.rope_local_theta, g3.rope_theta, g3.rope_type) == (10000.0, 1e6, "linear")
    model = load_model(family_dirs["gemma3"])
    assert not torch.equal(model.model.rotary_local.inv_freq, model.model.rotary.inv_freq)


def test_gemma3_legacy_rope_fields(family_dirs):
    raw = _raw(family_dirs["gemma3"])
    raw.pop("rope_parameters")
    raw.pop("layer_types")
    raw.update(rope_theta=1e6, rope_local_base_freq=1e4, rope_scaling={"rope_type": "linear", "factor": 8.0},
               sliding_window_pattern=6, num_hidden_layers=7)
    cfg = ModelConfig.from_dict(raw)
    assert (cfg.rope_local_theta, cfg.rope_theta, cfg.rope_type) == (1e4, 1e6, "linear")
    assert cfg.sliding_layers == (True,) * 5 + (False, True)  # 5 local : 1 global


@pytest.mark.parametrize("family, field", [("gemma2", "attn_logit_softcapping"),
                                           ("gemma2", "final_logit_softcapping"),
                                           ("gemma3", "final_logit_softcapping"),
                                           ("gemma3", "sliding_window")])
def test_gemma_features_matter(family_dirs, tmp_path, family, field):
    # each feature changes the logits (so the parity test above checks it)
    path = shutil.copytree(family_dirs[family], tmp_path / "m")
    ids = _ids(2, 30)
    before = load_model(path)(ids)
    raw = _raw(path)
    raw[field] = None
    (path / "config.json").write_text(json.dumps(raw))
    assert not torch.allclose(before, load_model(path)(ids), atol=1e-2)


def test_unsupported_activation_refused(family_dirs):
    raw = _raw(family_dirs["gemma2"])
    raw["hidden_activation"] = "relu"
    with pytest.raises(ConfigError, match="activation 'relu' is not supported"):
        ModelConfig.from_dict(raw)


def test_eos_token_id_list():
    raw = {"architectures": ["LlamaForCausalLM"], "vocab_size": 10, "hidden_size": 8,
           "intermediate_size": 8, "num_hidden_layers": 1, "num_attention_heads": 2,
           "eos_token_id": [2, 7]}
    cfg = ModelConfig.from_dict(raw)
    assert cfg.eos_token_ids == (2, 7)
    assert cfg.num_kv_heads == 2 and cfg.head_dim == 4  # defaults: MHA, hidden // heads
