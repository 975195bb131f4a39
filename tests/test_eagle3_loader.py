"""EAGLE-3 head loading: every dialect into one form, the aux-layer conventions, the converter,
and each refusal with its message. Heads are tiny random ones written by tests/eagle3_heads.py."""

import dataclasses
import json
import re

import pytest
import torch
from safetensors.torch import load_file, save_file

from eagle3_heads import write_head
from specdec.cli import main
from specdec.models.config import ModelConfig
from specdec.models.convert import convert_eagle3
from specdec.models.eagle3 import (
    Eagle3Config,
    check_against_target,
    is_eagle3_dir,
    load_eagle3,
    normalise,
)

V, HT, L = 97, 32, 8


def target(vocab=V, hidden=HT, layers=L) -> ModelConfig:
    return ModelConfig(architecture="LlamaForCausalLM", vocab_size=vocab, hidden_size=hidden, intermediate_size=48,
                       num_layers=layers, num_heads=4, num_kv_heads=2, head_dim=hidden // 4)


TARGET = target()


def load_any(path, tmp_path):
    """load_eagle3, through the converter for a pickled SafeAILab release."""
    if (path / "pytorch_model.bin").is_file():
        path = convert_eagle3(path, tmp_path / (path.name + "-converted"))
    return load_eagle3(path)


def expected_tensors(written, cfg):
    """What load_eagle3 returns for ``written``: identity vocabulary maps added for a full vocabulary."""
    out = dict(written)
    if "d2t" not in out:
        out["d2t"] = torch.zeros(cfg.vocab_size, dtype=torch.int64)
        out["t2d"] = torch.ones(cfg.vocab_size, dtype=torch.bool)
    return out


def assert_same_tensors(got, want):
    assert sorted(got) == sorted(want)
    for name in want:
        assert got[name].dtype == want[name].dtype, name
        assert torch.equal(got[name], want[name]), name


def edit_config(path, **changes):
    cfg = json.loads((path / "config.json").read_text())
    for key, value in changes.items():
        if value is ...:
            cfg.pop(key, None)
        else:
            cfg[key] = value
    (path / "config.json").write_text(json.dumps(cfg))


def edit_tensors(path, drop=(), **add):
    file = path / "model.safetensors"
    tensors = load_file(file)
    for name in drop:
        del tensors[name]
    tensors.update(add)
    save_file(tensors, str(file))


# ---------------------------------------------------------------------- dialects load alike


@pytest.mark.parametrize("draft_vocab", [None, 40], ids=["full-vocab", "reduced-vocab"])
@pytest.mark.parametrize("own_embed", [False, True], ids=["shared-embed", "own-embed"])
def test_dialects_load_to_the_same_head(tmp_path, draft_vocab, own_embed):
    loaded = {}
    for dialect in ("safeailab", "specforge", "speculators"):
        written = write_head(tmp_path / dialect, dialect, target_config=TARGET, draft_vocab=draft_vocab,
                             own_embed=own_embed, seed=3)
        cfg, tensors = load_any(tmp_path / dialect, tmp_path)
        assert_same_tensors(tensors, expected_tensors(written, cfg))
        loaded[dialect] = cfg
    cfg = loaded["specforge"]
    assert loaded["safeailab"] == cfg and loaded["speculators"] == cfg
    Vd = draft_vocab or V
    assert (cfg.hidden_size, cfg.intermediate_size, cfg.num_attention_heads, cfg.num_key_value_heads,
            cfg.head_dim) == (HT, 2 * HT + 8, 4, 2, HT // 4)
    assert (cfg.vocab_size, cfg.draft_vocab_size, cfg.target_hidden_size) == (V, Vd, HT)
    assert (cfg.rope_theta, cfg.rope_scaling, cfg.rms_norm_eps) == (10000.0, None, 1e-5)
    assert cfg.has_embed_tokens is own_embed and cfg.draft_arch == "llama"
    assert not (cfg.fc_bias or cfg.norm_before_residual or cfg.norm_before_fc or cfg.fc_norm
                or cfg.feed_normed_hidden)
    assert cfg.apply_final_norm
    assert cfg.aux_layer_ids is None and cfg.aux_layers(L) == (2, 4, 5)  # {2, L//2, L-3}
    check_against_target(cfg, TARGET)


def test_reduced_vocabulary_maps(tmp_path):
    written = write_head(tmp_path, "specforge", target_config=TARGET, draft_vocab=40)
    _, t = load_eagle3(tmp_path)
    target_ids = torch.arange(40) + t["d2t"]
    assert torch.equal(target_ids, t["t2d"].nonzero().flatten())
    assert t["d2t"].dtype == torch.int64 and t["t2d"].dtype == torch.bool
    assert torch.equal(t["d2t"], written["d2t"]) and not torch.equal(t["d2t"], torch.zeros(40, dtype=torch.int64))


def test_full_vocab_identity_maps_on_disk_are_accepted(tmp_path):
    write_head(tmp_path, "specforge", target_config=TARGET)
    edit_tensors(tmp_path, d2t=torch.zeros(V, dtype=torch.int64), t2d=torch.ones(V, dtype=torch.bool))
    cfg, t = load_eagle3(tmp_path)
    assert cfg.draft_vocab_size == V and torch.equal(t["d2t"], torch.zeros(V, dtype=torch.int64))


def test_sharded_safetensors(tmp_path):
    written = write_head(tmp_path / "one", "specforge", target_config=TARGET, draft_vocab=40, own_embed=True)
    sharded = tmp_path / "sharded"
    sharded.mkdir()
    (sharded / "config.json").write_text((tmp_path / "one" / "config.json").read_text())
    tensors = load_file(tmp_path / "one" / "model.safetensors")
    names = sorted(tensors)
    weight_map = {}
    for i, part in enumerate((names[: len(names) // 2], names[len(names) // 2 :])):
        file = f"model-0000{i + 1}-of-00002.safetensors"
        save_file({n: tensors[n] for n in part}, str(sharded / file))
        weight_map |= {n: file for n in part}
    (sharded / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    cfg, t = load_eagle3(sharded)
    assert_same_tensors(t, expected_tensors(written, cfg))


def test_bfloat16_weights_keep_their_dtype(tmp_path):
    write_head(tmp_path, "speculators", target_config=TARGET, dtype=torch.bfloat16)
    _, t = load_eagle3(tmp_path)
    assert t["fc.weight"].dtype == torch.bfloat16 and t["d2t"].dtype == torch.int64


def test_qwen3_draft_layer(tmp_path):
    written = write_head(tmp_path, "speculators", target_config=TARGET, arch="qwen3", draft_vocab=50)
    cfg, t = load_eagle3(tmp_path)
    assert cfg.draft_arch == "qwen3" and cfg.head_dim == 2 * HT // 4  # head_dim from the config, != H / heads
    assert t["midlayer.self_attn.q_proj.weight"].shape == (4 * cfg.head_dim, 2 * HT)
    assert_same_tensors(t, expected_tensors(written, cfg))
    # the same layer written flat (model_type "qwen3") loads the same
    write_head(tmp_path / "flat", "specforge", target_config=TARGET, arch="qwen3", draft_vocab=50)
    assert load_eagle3(tmp_path / "flat")[0] == cfg


def test_qwen3_model_type_without_qk_norms_is_a_llama_layer(tmp_path):
    # newer speculators releases build qwen3 drafts from llama decoder layers (no q/k norms)
    write_head(tmp_path, "speculators", target_config=TARGET, arch="qwen3")
    edit_tensors(tmp_path, drop=("layers.0.self_attn.q_norm.weight", "layers.0.self_attn.k_norm.weight"))
    assert load_eagle3(tmp_path)[0].draft_arch == "llama"


def test_rope_from_the_draft_config(tmp_path):
    write_head(tmp_path, "specforge", target_config=TARGET)
    rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
    edit_config(tmp_path, rope_theta=..., rope_parameters=rope)
    cfg = load_eagle3(tmp_path)[0]
    assert cfg.rope_theta == 500000.0 and cfg.rope_scaling == {k: v for k, v in rope.items() if k != "rope_theta"}
    # the same frequencies a llama3-scaled target of that head_dim uses
    want = ModelConfig(architecture="LlamaForCausalLM", vocab_size=V, hidden_size=HT, intermediate_size=48,
                       num_layers=1, num_heads=4, num_kv_heads=2, head_dim=8, rope_theta=500000.0,
                       rope_type="llama3", rope_scaling={k: rope[k] for k in rope if k not in ("rope_type",
                                                                                              "rope_theta")})
    torch.testing.assert_close(cfg.rope_inv_freq(), want.rope_inv_freq(), rtol=0, atol=0)
    assert not torch.equal(cfg.rope_inv_freq(), 1.0 / 500000.0 ** (torch.arange(0, 8, 2) / 8))


# ---------------------------------------------------------------------- aux layer ids


@pytest.mark.parametrize("dialect, convention, on_disk", [
    ("specforge", "output", ("eagle_config", [0, 3, 5])),   # SpecForge: outputs of layers -> +1
    ("specforge", "hf", ("eagle_aux_hidden_state_layer_ids", [1, 4, 6])),
    ("safeailab", "output", ("eagle_config", [0, 3, 5])),
    ("speculators", "hf", ("eagle_aux_hidden_state_layer_ids", [1, 4, 6])),
])
def test_explicit_aux_ids_both_conventions(tmp_path, dialect, convention, on_disk):
    write_head(tmp_path / "h", dialect, target_config=TARGET, ids=[1, 4, 6], ids_convention=convention)
    raw = json.loads((tmp_path / "h" / "config.json").read_text())
    key, value = on_disk
    assert (raw[key]["eagle_aux_hidden_state_layer_ids"] if key == "eagle_config" else raw[key]) == value
    cfg = load_any(tmp_path / "h", tmp_path)[0]
    assert cfg.aux_layer_ids == (1, 4, 6) and cfg.aux_layers(L) == (1, 4, 6)
    assert cfg.num_aux_layers == 3


def test_nested_ids_starting_at_2_are_hf_indices(tmp_path):
    write_head(tmp_path, "specforge", target_config=TARGET, ids=[2, 4, 5], ids_convention="nested-hf")
    assert load_eagle3(tmp_path)[0].aux_layers(L) == (2, 4, 5)


@pytest.mark.parametrize("ids, convention", [([1, 3], "hf"), ([1, 2, 4, 6], "output")])
def test_aux_layer_count_sets_the_fc_width(tmp_path, ids, convention):
    write_head(tmp_path, "specforge", target_config=TARGET, ids=ids, ids_convention=convention)
    cfg, t = load_eagle3(tmp_path)
    assert cfg.aux_layers(L) == tuple(ids) and t["fc.weight"].shape == (HT, len(ids) * HT)


def test_unsorted_ids_are_captured_ascending(tmp_path):
    write_head(tmp_path, "speculators", target_config=TARGET, ids=[1, 4, 6])
    edit_config(tmp_path, eagle_aux_hidden_state_layer_ids=[6, 1, 4])
    assert load_eagle3(tmp_path)[0].aux_layer_ids == (1, 4, 6)


def test_default_aux_layers_for_real_depths():
    cfg = dataclasses.replace(_some_config(), aux_layer_ids=None)
    assert [cfg.aux_layers(n) for n in (32, 80, 36, 3, 7)] == [(2, 16, 29), (2, 40, 77), (2, 18, 33),
                                                               (0, 1, 2), (2, 3, 4)]


def _some_config(**changes) -> Eagle3Config:
    base = {"hidden_size": 32, "intermediate_size": 72, "num_attention_heads": 4, "num_key_value_heads": 2,
            "head_dim": 8, "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "rope_scaling": None, "vocab_size": V,
            "draft_vocab_size": V, "target_hidden_size": HT, "aux_layer_ids": None, "draft_arch": "llama",
            "fc_bias": False, "norm_before_residual": False, "norm_before_fc": False, "fc_norm": False,
            "apply_final_norm": True, "feed_normed_hidden": False, "has_embed_tokens": False}
    return Eagle3Config(**(base | changes))


# ---------------------------------------------------------------------- variant flags


@pytest.mark.parametrize("dialect, flags, want", [
    ("specforge", {"norm_before_residual": True}, {"norm_before_residual": True}),
    ("speculators", {"norm_before_residual": True}, {"norm_before_residual": True}),
    ("specforge", {"norm_output": False}, {"apply_final_norm": False}),        # SpecForge: no final norm
    ("speculators", {"norm_output": True}, {"feed_normed_hidden": True}),      # speculators: feed post-norm
    ("speculators", {"norm_before_fc": True}, {"norm_before_fc": True}),
    ("specforge", {"norm_before_fc": "nested"}, {"norm_before_fc": True}),  # vLLM reads it in eagle_config
    ("specforge", {"fc_norm": True, "norm_output": True}, {"fc_norm": True}),
    ("speculators", {"fc_norm": True, "norm_before_fc": True}, {"fc_norm": True, "norm_before_fc": True}),
    ("specforge", {"bias": True}, {"fc_bias": True}),
])
def test_variant_flags(tmp_path, dialect, flags, want):
    nested = flags.get("norm_before_fc") == "nested"
    written = write_head(tmp_path / "h", dialect, target_config=TARGET,
                         flags={"norm_before_fc": True} if nested else flags)
    if nested:
        edit_config(tmp_path / "h", norm_before_fc=..., eagle_config={"norm_before_fc": True})
    cfg, t = load_eagle3(tmp_path / "h")
    defaults = {"fc_bias": False, "norm_before_residual": False, "norm_before_fc": False, "fc_norm": False,
                "apply_final_norm": True, "feed_normed_hidden": False}
    assert {k: getattr(cfg, k) for k in defaults} == defaults | want
    assert_same_tensors(t, expected_tensors(written, cfg))


def test_speculators_norm_before_residual_defaults_to_true(tmp_path):
    write_head(tmp_path, "speculators", target_config=TARGET)
    edit_config(tmp_path, norm_before_residual=...)
    assert load_eagle3(tmp_path)[0].norm_before_residual is True


def test_fc_bias_without_flag_follows_the_tensor(tmp_path):
    write_head(tmp_path, "specforge", target_config=TARGET, flags={"bias": True})
    edit_config(tmp_path, bias=...)
    assert load_eagle3(tmp_path)[0].fc_bias is True


def test_wider_target_with_own_embedding(tmp_path):
    wide = target(hidden=48)
    write_head(tmp_path, "specforge", target_config=wide, hidden_size=32, own_embed=True)
    cfg, t = load_eagle3(tmp_path)
    assert (cfg.hidden_size, cfg.target_hidden_size) == (32, 48) and t["fc.weight"].shape == (32, 3 * 48)
    check_against_target(cfg, wide)
    assert t["embed_tokens.weight"].shape == (V, 32)


def test_tied_flag_is_ignored_when_lm_head_exists(tmp_path):
    write_head(tmp_path, "specforge", target_config=TARGET)
    edit_config(tmp_path, tie_word_embeddings=True)
    assert load_eagle3(tmp_path)[0].draft_vocab_size == V


# ---------------------------------------------------------------------- converter


@pytest.mark.parametrize("dialect, kwargs", [
    ("safeailab", {"draft_vocab": 40}),
    ("specforge", {"own_embed": True, "ids": [1, 4, 6]}),
    ("speculators", {"arch": "qwen3", "draft_vocab": 50, "ids": [1, 3, 7],
                     "flags": {"norm_before_residual": True, "norm_output": True, "fc_norm": True,
                               "norm_before_fc": True}}),
    ("specforge", {"flags": {"bias": True, "norm_output": False}, "ids": [2, 3], "ids_convention": "nested-hf"}),
])
def test_convert_round_trip(tmp_path, dialect, kwargs):
    written = write_head(tmp_path / "in", dialect, target_config=TARGET, **kwargs)
    out = convert_eagle3(tmp_path / "in", tmp_path / "out")
    cfg, t = load_eagle3(out)
    assert_same_tensors(t, expected_tensors(written, cfg))
    if dialect != "safeailab":
        assert load_eagle3(tmp_path / "in")[0] == cfg
    # the normalised layout: SpecForge names, every flag explicit, ids as HF indices
    raw = json.loads((out / "config.json").read_text())
    assert raw["architectures"] == ["LlamaForCausalLMEagle3"]
    for field in dataclasses.fields(Eagle3Config):
        if field.name not in ("aux_layer_ids", "has_embed_tokens"):
            assert raw[field.name] == getattr(cfg, field.name), field.name
    ids = kwargs.get("ids")
    assert raw["eagle_aux_hidden_state_layer_ids"] == ids and "eagle_config" not in raw
    names = set(load_file(out / "model.safetensors"))
    assert not any(n.startswith("layers.") for n in names)
    assert ("d2t" in names) == (cfg.draft_vocab_size < V)
    cfg2, t2 = load_eagle3(convert_eagle3(out, tmp_path / "again"))  # converting the layout changes nothing
    assert cfg2 == cfg
    assert_same_tensors(t2, t)


def test_convert_cli(tmp_path, capsys):
    write_head(tmp_path / "in", "safeailab", target_config=TARGET, draft_vocab=40)
    assert main(["convert", "eagle3", str(tmp_path / "in"), str(tmp_path / "out")]) == 0
    assert "wrote" in capsys.readouterr().out
    assert is_eagle3_dir(tmp_path / "out") and load_eagle3(tmp_path / "out")[0].draft_vocab_size == 40
    assert main(["convert", "eagle3", str(tmp_path / "in"), str(tmp_path / "in")]) == 2
    assert "choose another output directory" in capsys.readouterr().err


def test_convert_refuses_a_bad_head_before_writing(tmp_path):
    write_head(tmp_path / "in", "safeailab", target_config=TARGET)
    edit_config(tmp_path / "in", num_hidden_layers=2)
    with pytest.raises(ValueError, match="num_hidden_layers=2"):
        convert_eagle3(tmp_path / "in", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_is_eagle3_dir(tmp_path):
    for dialect in ("safeailab", "specforge", "speculators"):
        write_head(tmp_path / dialect, dialect, target_config=TARGET)
        assert is_eagle3_dir(tmp_path / dialect)
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "vocab_size": V}))
    assert not is_eagle3_dir(plain)
    assert not is_eagle3_dir(tmp_path / "absent")
    (tmp_path / "eagle1").mkdir()
    (tmp_path / "eagle1" / "config.json").write_text(json.dumps({"speculators_model_type": "eagle"}))
    assert not is_eagle3_dir(tmp_path / "eagle1")


# ---------------------------------------------------------------------- errors


def test_pickled_weights_need_the_converter(tmp_path):
    write_head(tmp_path, "safeailab", target_config=TARGET)
    with pytest.raises(ValueError, match=r"pytorch_model\.bin.*safetensors only.*specdec convert eagle3"):
        load_eagle3(tmp_path)


@pytest.mark.parametrize("name, match", [
    ("mask_hidden", r"does not know: mask_hidden \(parallel drafting"),
    ("layers.1.mlp.up_proj.weight", r"layers\.1\.mlp\.up_proj\.weight \(multi-layer"),
    ("input_norm.weight", r"input_norm\.weight \(the config does not set norm_before_fc"),
    ("fc_norm.0.weight", r"fc_norm\.0\.weight \(the config does not set fc_norm"),
    ("layers.0.self_attn.q_norm.weight", r"q_norm\.weight \(q/k norms belong to a qwen3"),
    ("foo.weight", r"does not know: foo\.weight; refusing to skip"),
])
def test_unknown_tensor(tmp_path, name, match):
    write_head(tmp_path, "speculators", target_config=TARGET)
    edit_tensors(tmp_path, **{name: torch.ones(32)})
    with pytest.raises(ValueError, match=match):
        load_eagle3(tmp_path)


@pytest.mark.parametrize("dialect, name, flags, match", [
    ("specforge", "midlayer.mlp.up_proj.weight", {}, r"missing tensor\(s\): midlayer\.mlp\.up_proj\.weight"),
    ("speculators", "layers.0.hidden_norm.weight", {}, r"missing tensor\(s\): midlayer\.hidden_norm\.weight"),
    ("specforge", "lm_head.weight", {}, r"missing tensor\(s\): lm_head\.weight \(an EAGLE-3 head has its own"),
    ("specforge", "input_norm.weight", {"norm_before_fc": True}, r"input_norm\.weight \(the config sets norm_bef"),
    ("specforge", "fc_norm.2.weight", {"fc_norm": True}, r"fc_norm\.2\.weight \(the config sets fc_norm"),
    ("specforge", "fc.bias", {"fc_bias": True}, r"fc\.bias \(the config sets bias/fc_bias"),
])
def test_missing_tensor(tmp_path, dialect, name, flags, match):
    write_head(tmp_path, dialect, target_config=TARGET, flags=flags)
    edit_tensors(tmp_path, drop=(name,))
    with pytest.raises(ValueError, match=match):
        load_eagle3(tmp_path)


@pytest.mark.parametrize("name", ["d2t", "t2d"])
def test_missing_vocabulary_map(tmp_path, name):
    write_head(tmp_path, "specforge", target_config=TARGET, draft_vocab=40)
    edit_tensors(tmp_path, drop=(name,))
    with pytest.raises(ValueError, match=rf"missing tensor\(s\): {name} \(draft_vocab_size < vocab_size"):
        load_eagle3(tmp_path)


def test_qwen3_needs_both_qk_norms(tmp_path):
    write_head(tmp_path, "speculators", target_config=TARGET, arch="qwen3")
    edit_tensors(tmp_path, drop=("layers.0.self_attn.k_norm.weight",))
    with pytest.raises(ValueError, match=r"q_norm\.weight but not its pair"):
        load_eagle3(tmp_path)


@pytest.mark.parametrize("name, shape, match", [
    ("fc.weight", (32, 64), r"fc\.weight .* shape \(32, 64\) but the config implies \(32, 96\)"),
    ("lm_head.weight", (41, 32), r"lm_head\.weight .* shape \(41, 32\) but the config implies \(40, 32\)"),
    ("midlayer.self_attn.q_proj.weight", (32, 32), r"q_proj\.weight .* implies \(32, 64\)"),
    ("embed_tokens.weight", (96, 32), r"embed_tokens\.weight .* implies \(97, 32\)"),
    ("t2d", (96,), r"t2d .* implies \(97,\)"),
])
def test_wrong_shape(tmp_path, name, shape, match):
    write_head(tmp_path, "specforge", target_config=TARGET, draft_vocab=40)
    value = torch.zeros(shape, dtype=torch.bool) if name == "t2d" else torch.zeros(shape)
    edit_tensors(tmp_path, **{name: value})
    with pytest.raises(ValueError, match=match):
        load_eagle3(tmp_path)


def test_inconsistent_vocabulary_maps(tmp_path):
    written = write_head(tmp_path, "specforge", target_config=TARGET, draft_vocab=40)
    t2d = written["t2d"].clone()
    first, absent = int(t2d.nonzero()[0]), int((~t2d).nonzero()[0])
    t2d[first], t2d[absent] = False, True
    edit_tensors(tmp_path, t2d=t2d)
    with pytest.raises(ValueError, match="d2t and t2d .* disagree"):
        load_eagle3(tmp_path)
    d2t = written["d2t"].clone()
    d2t[5] = d2t[4] - 1  # target ids no longer ascending
    edit_tensors(tmp_path, d2t=d2t, t2d=written["t2d"])
    with pytest.raises(ValueError, match="distinct ascending target ids"):
        load_eagle3(tmp_path)


def test_full_vocab_maps_must_be_identity(tmp_path):
    write_head(tmp_path, "specforge", target_config=TARGET)
    d2t = torch.zeros(V, dtype=torch.int64)
    d2t[-1] = 1  # maps the last draft id past the vocabulary
    edit_tensors(tmp_path, d2t=d2t, t2d=torch.ones(V, dtype=torch.bool))
    with pytest.raises(ValueError, match="distinct ascending target ids in \\[0, 97\\)"):
        load_eagle3(tmp_path)


@pytest.mark.parametrize("dialect", ["specforge", "speculators"])
def test_tied_head_without_lm_head(tmp_path, dialect):
    write_head(tmp_path, dialect, target_config=TARGET, own_embed=True)
    raw = json.loads((tmp_path / "config.json").read_text())
    (raw.get("transformer_layer_config") or raw)["tie_word_embeddings"] = True
    (tmp_path / "config.json").write_text(json.dumps(raw))
    edit_tensors(tmp_path, drop=("lm_head.weight",))
    with pytest.raises(ValueError, match="tie_word_embeddings: true and has no lm_head.weight"):
        load_eagle3(tmp_path)


def test_wider_target_needs_own_embedding(tmp_path):
    write_head(tmp_path, "specforge", target_config=target(hidden=48), hidden_size=32)
    with pytest.raises(ValueError, match="target_hidden_size=48 differs from hidden_size=32.*no embed_tokens"):
        load_eagle3(tmp_path)


@pytest.mark.parametrize("changes, match", [
    ({"num_hidden_layers": 2}, "unsupported EAGLE-3 variant: num_hidden_layers=2"),
    ({"mask_hidden": True}, r"unsupported EAGLE-3 variant: mask_hidden \(parallel drafting\)"),
    ({"hidden_act": "gelu"}, "unsupported EAGLE-3 variant: hidden_act='gelu'"),
    ({"attention_bias": True}, "unsupported EAGLE-3 variant: attention_bias=true"),
    ({"logit_scale": 0.5}, "unsupported EAGLE-3 variant: logit_scale=0.5"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope type 'yarn' of the EAGLE-3 head is not supp"),
    ({"eagle_config": {"use_aux_hidden_state": False}}, "use_aux_hidden_state=false"),
    ({"eagle_config": {"eagle_aux_hidden_state_layer_ids": [1, 3, 5], "parallel_drafting": 1}},
     "unsupported EAGLE-3 variant: parallel_drafting"),
    ({"eagle_config": {"fancy_mode": True}}, r"eagle_config key\(s\) \['fancy_mode'\]"),
    ({"num_aux_layers": 4}, "num_aux_layers=4 but the config names 3 aux layers"),
    ({"norm_output": True, "apply_final_norm": False}, "apply_final_norm=False and norm_output=True contradict"),
    ({"eagle_aux_hidden_state_layer_ids": [1, 4, 6], "eagle_config": {"eagle_aux_hidden_state_layer_ids": [1, 4, 6]}},
     r"\[1, 4, 6\] \(HF index\) and eagle_config's ids \(HF index \[2, 5, 7\]\) name different layers"),
    ({"eagle_aux_hidden_state_layer_ids": [1, 1, 4]}, "repeats a layer"),
    ({"draft_vocab_size": 98}, "draft_vocab_size=98 exceeds the target vocabulary vocab_size=97"),
    ({"hidden_size": ...}, "missing required field 'hidden_size'"),
    ({"norm_before_residual": "yes"}, "norm_before_residual must be true or false"),
])
def test_unsupported_or_bad_config(tmp_path, changes, match):
    write_head(tmp_path, "specforge", target_config=TARGET)
    edit_config(tmp_path, **changes)
    with pytest.raises(ValueError, match=match):
        load_eagle3(tmp_path)


@pytest.mark.parametrize("changes, layer_changes, match", [
    ({"speculators_model_type": "eagle"}, {}, "speculators_model_type 'eagle' is not an EAGLE-3 head"),
    ({}, {"num_hidden_layers": 3}, "num_hidden_layers=3"),
    ({}, {"model_type": "mistral"}, "model_type 'mistral' is not supported"),
    ({}, {"use_sliding_window": True}, "sliding-window attention"),
    ({"norm_output": "no"}, {}, "norm_output must be true or false"),
])
def test_unsupported_speculators_config(tmp_path, changes, layer_changes, match):
    write_head(tmp_path, "speculators", target_config=TARGET)
    raw = json.loads((tmp_path / "config.json").read_text())
    raw.update(changes)
    raw["transformer_layer_config"].update(layer_changes)
    (tmp_path / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ValueError, match=match):
        load_eagle3(tmp_path)


def test_both_tensor_spellings(tmp_path):
    write_head(tmp_path, "speculators", target_config=TARGET)
    edit_tensors(tmp_path, **{"midlayer.norm_extra": torch.ones(1), "midlayer.hidden_norm.weight": torch.ones(32)})
    with pytest.raises(ValueError, match=r"both midlayer\.hidden_norm\.weight and its speculators name"):
        load_eagle3(tmp_path)


@pytest.mark.parametrize("tgt, match", [
    (target(vocab=98), "vocabulary of 97 tokens but the target has 98"),
    (target(hidden=48), "target hidden states of width 32 .* target's hidden_size is 48"),
    (target(layers=6), r"aux layer id\(s\) \[6\] .* out of range for a 6-layer target \(0\.\.5\)"),
])
def test_target_mismatch(tmp_path, tgt, match):
    write_head(tmp_path, "specforge", target_config=TARGET, ids=[1, 4, 6], ids_convention="hf")
    cfg = load_eagle3(tmp_path)[0]
    with pytest.raises(ValueError, match=match):
        check_against_target(cfg, tgt)


def test_shared_embedding_needs_the_target_width(tmp_path):
    cfg = _some_config(target_hidden_size=48)
    with pytest.raises(ValueError, match="no embed_tokens and its hidden_size 32 differs from the target's 48"):
        check_against_target(cfg, target(hidden=48))
    check_against_target(dataclasses.replace(cfg, has_embed_tokens=True), target(hidden=48))


@pytest.mark.parametrize("layers", [4, 5, 6])
def test_default_aux_layers_must_be_distinct(layers):
    with pytest.raises(ValueError, match=re.escape(f"not 3 distinct layers of this {layers}-layer target")):
        _some_config().aux_layers(layers)


def test_config_validation():
    with pytest.raises(ValueError, match="aux_layer_ids must be distinct non-negative ids in ascending order"):
        _some_config(aux_layer_ids=(3, 1))
    with pytest.raises(ValueError, match="draft_arch 'mamba'"):
        _some_config(draft_arch="mamba")
    with pytest.raises(ValueError, match="rope_scaling must be None or a llama3 dict"):
        _some_config(rope_scaling={"rope_type": "linear", "factor": 2.0})


# ---------------------------------------------------------------------- published configs (meta-tensor weights)

LLAMA31_8B_SAFEAILAB = {  # docs/EAGLE3_FORMAT.md §1.2, SafeAILab's training config
    "architectures": ["LlamaForCausalLM"], "bos_token_id": 128000, "eos_token_id": 128001, "hidden_act": "silu",
    "hidden_size": 4096, "intermediate_size": 14336, "max_position_embeddings": 2048, "model_type": "llama",
    "num_attention_heads": 32, "num_key_value_heads": 8, "num_hidden_layers": 1, "pad_token_id": 0,
    "rms_norm_eps": 1e-05, "tie_word_embeddings": False, "torch_dtype": "float16", "vocab_size": 128256,
    "draft_vocab_size": 32000,
}
LLAMA33_70B_SPECFORGE = {  # SpecForge configs/llama3-70B-eagle3 keys, output-of-layer ids
    **LLAMA31_8B_SAFEAILAB, "architectures": ["LlamaForCausalLMEagle3"], "hidden_size": 8192, "head_dim": 128,
    "intermediate_size": 28672, "num_attention_heads": 64, "rope_theta": 500000.0,
    "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                     "original_max_position_embeddings": 8192, "rope_type": "llama3"},
    "eagle_config": {"eagle_aux_hidden_state_layer_ids": [1, 39, 76], "use_aux_hidden_state": True},
}
QWEN3_8B_SPECULATORS = {  # speculators layout of a Qwen3-8B head (qwen3 layer with q/k norms)
    "architectures": ["Eagle3Speculator"], "speculators_model_type": "eagle3", "draft_vocab_size": 32000,
    "target_hidden_size": None, "eagle_aux_hidden_state_layer_ids": [2, 18, 33], "norm_before_fc": False,
    "transformer_layer_config": {"model_type": "qwen3", "hidden_size": 4096, "intermediate_size": 12288,
                                 "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128,
                                 "num_hidden_layers": 1, "vocab_size": 151936, "rms_norm_eps": 1e-6,
                                 "rope_theta": 1000000.0, "max_position_embeddings": 40960,
                                 "sliding_window": None, "use_sliding_window": False, "hidden_act": "silu"},
    "speculators_config": {"algorithm": "eagle3"},
}


def _meta_head(H, inter, heads, kv, hd, V, Vd, Ht, prefix="midlayer.", qk_norms=False):
    m = prefix
    shapes = {"fc.weight": (H, 3 * Ht), m + "input_layernorm.weight": (H,), m + "hidden_norm.weight": (H,),
              m + "self_attn.q_proj.weight": (heads * hd, 2 * H), m + "self_attn.k_proj.weight": (kv * hd, 2 * H),
              m + "self_attn.v_proj.weight": (kv * hd, 2 * H), m + "self_attn.o_proj.weight": (H, heads * hd),
              m + "post_attention_layernorm.weight": (H,), m + "mlp.gate_proj.weight": (inter, H),
              m + "mlp.up_proj.weight": (inter, H), m + "mlp.down_proj.weight": (H, inter), "norm.weight": (H,),
              "lm_head.weight": (Vd, H)}
    if qk_norms:
        shapes |= {m + "self_attn.q_norm.weight": (hd,), m + "self_attn.k_norm.weight": (hd,)}
    tensors = {n: torch.empty(s, device="meta", dtype=torch.bfloat16) for n, s in shapes.items()}
    used = torch.arange(0, 2 * Vd, 2)  # every other target id
    t2d = torch.zeros(V, dtype=torch.bool)
    t2d[used] = True
    return tensors | {"d2t": used - torch.arange(Vd), "t2d": t2d}


@pytest.mark.parametrize("raw, tensors, layers, want", [
    (LLAMA31_8B_SAFEAILAB, _meta_head(4096, 14336, 32, 8, 128, 128256, 32000, 4096), 32,
     {"aux": (2, 16, 29), "rope_theta": 10000.0, "rope_scaling": None, "draft_arch": "llama",
      "norm_before_residual": False}),
    (LLAMA33_70B_SPECFORGE, _meta_head(8192, 28672, 64, 8, 128, 128256, 32000, 8192), 80,
     {"aux": (2, 40, 77), "rope_theta": 500000.0, "draft_arch": "llama", "norm_before_residual": False}),
    (QWEN3_8B_SPECULATORS, _meta_head(4096, 12288, 32, 8, 128, 151936, 32000, 4096, "layers.0.", True), 36,
     {"aux": (2, 18, 33), "rope_theta": 1000000.0, "draft_arch": "qwen3", "norm_before_residual": True}),
], ids=["llama3.1-8b-safeailab", "llama3.3-70b-specforge", "qwen3-8b-speculators"])
def test_published_configs(raw, tensors, layers, want):
    cfg, t = normalise(raw, tensors, "<published>")
    check_against_target(cfg, target(vocab=cfg.vocab_size, hidden=cfg.hidden_size, layers=layers))
    assert cfg.aux_layers(layers) == want.pop("aux")
    assert {k: getattr(cfg, k) for k in want} == want
    assert t["midlayer.self_attn.q_proj.weight"].shape == (cfg.num_attention_heads * 128, 2 * cfg.hidden_size)
    assert cfg.draft_vocab_size == 32000 and torch.equal(torch.arange(32000) + t["d2t"], torch.arange(0, 64000, 2))
