"""load_model / ModelConfig on broken checkpoints: the right exception, naming the culprit.

Every case copies one good tiny checkpoint, breaks one thing, and checks both the
exception type and that the message names the tensor, file, field or architecture.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from checkpoints import make_checkpoint
from specdec import LLM
from specdec.models import SUPPORTED_ARCHITECTURES, CheckpointError, ConfigError, ModelConfig, load_model


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("good"), "llama")


@pytest.fixture(scope="module")
def good_qwen2(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("good_qwen2"), "qwen2")


@pytest.fixture
def ckpt(good, tmp_path):
    """A fresh, writable copy of the good checkpoint."""
    return shutil.copytree(good, tmp_path / "ckpt")


def _edit_config(path, **changes):
    cfg = json.loads((path / "config.json").read_text())
    for key, value in changes.items():
        if value is _DELETE:
            cfg.pop(key)
        else:
            cfg[key] = value
    (path / "config.json").write_text(json.dumps(cfg))


_DELETE = object()


def test_good_checkpoint_loads(good):
    model = load_model(good)
    assert model.config.architecture == "LlamaForCausalLM"
    assert model(torch.tensor([[1, 2, 3]])).shape == (1, 3, 97)


# ---------------------------------------------------------------------- weights


def test_missing_tensor_named(ckpt):
    name = "model.layers.1.mlp.up_proj.weight"
    tensors = load_file(ckpt / "model.safetensors")
    del tensors[name]
    save_file(tensors, ckpt / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="missing") as e:
        load_model(ckpt)
    assert name in str(e.value)


def test_unexpected_tensor_named(ckpt):
    tensors = load_file(ckpt / "model.safetensors")
    tensors["model.layers.0.self_attn.q_proj.bias"] = torch.zeros(32)
    save_file(tensors, ckpt / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"model\.layers\.0\.self_attn\.q_proj\.bias"):
        load_model(ckpt)


@pytest.mark.parametrize("keep", [0.5, 0.99, 8])
def test_truncated_safetensors_names_file(ckpt, keep):
    f = ckpt / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[:int(len(data) * keep) if keep < 1 else keep])
    with pytest.raises(CheckpointError, match="model.safetensors") as e:
        load_model(ckpt)
    assert str(f) in str(e.value)


def test_not_a_safetensors_file(ckpt):
    (ckpt / "model.safetensors").write_bytes(b"\x00" * 300)
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_model(ckpt)


def test_shape_mismatch_names_tensor_and_shapes(ckpt):
    _edit_config(ckpt, intermediate_size=40)  # the file's MLP weights are [48, 32]
    with pytest.raises(CheckpointError, match=r"mlp\.(gate|up|down)_proj\.weight") as e:
        load_model(ckpt)
    msg = str(e.value)
    assert "48" in msg and "40" in msg


def test_vocab_mismatch_names_embedding(ckpt):
    _edit_config(ckpt, vocab_size=100)
    with pytest.raises(CheckpointError, match=r"embed_tokens\.weight|lm_head\.weight") as e:
        load_model(ckpt)
    assert "97" in str(e.value) and "100" in str(e.value)


def test_no_weight_file(ckpt):
    (ckpt / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_model(ckpt)


def test_pickled_weights_get_a_hint(ckpt):
    (ckpt / "model.safetensors").unlink()
    (ckpt / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(CheckpointError, match="pytorch_model.bin"):
        load_model(ckpt)


# ---------------------------------------------------------------------- sharded index


def _shard(good, out):
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(good).save_pretrained(out, max_shard_size="20KB")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1, "the fixture must make several shards"
    return out, index


def test_index_naming_missing_shard(good, tmp_path):
    out, index = _shard(good, tmp_path / "sharded")
    victim = sorted(set(index["weight_map"].values()))[1]
    (out / victim).unlink()
    with pytest.raises(CheckpointError, match="shard") as e:
        load_model(out)
    assert victim in str(e.value)


def test_malformed_index(good, tmp_path):
    out, _ = _shard(good, tmp_path / "sharded")
    (out / "model.safetensors.index.json").write_text("{ not json")
    with pytest.raises(CheckpointError, match="model.safetensors.index.json"):
        load_model(out)


def test_index_without_weight_map(good, tmp_path):
    out, _ = _shard(good, tmp_path / "sharded")
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}}))
    with pytest.raises(CheckpointError, match="model.safetensors.index.json"):
        load_model(out)


# ---------------------------------------------------------------------- config and path


def test_unsupported_architecture_named_and_supported_listed(ckpt):
    _edit_config(ckpt, architectures=["GPT2LMHeadModel"], model_type="gpt2")
    with pytest.raises(ConfigError, match="GPT2LMHeadModel") as e:
        load_model(ckpt)
    for arch in SUPPORTED_ARCHITECTURES:
        assert arch in str(e.value)


def test_architecture_from_model_type(good_qwen2):
    raw = json.loads((good_qwen2 / "config.json").read_text())
    raw.pop("architectures")
    assert ModelConfig.from_dict(raw).architecture == "Qwen2ForCausalLM"
    raw["model_type"] = "falcon"
    with pytest.raises(ConfigError, match="falcon"):
        ModelConfig.from_dict(raw)


def test_path_does_not_exist(tmp_path):
    missing = tmp_path / "no" / "such" / "model"
    with pytest.raises(FileNotFoundError, match="does not exist") as e:
        load_model(missing)
    assert str(missing) in str(e.value)


def test_llm_path_does_not_exist(tmp_path):
    missing = tmp_path / "nothing-here"
    with pytest.raises(FileNotFoundError, match=str(missing.name)):
        LLM(str(missing))


def test_path_is_a_file(ckpt):
    with pytest.raises(CheckpointError, match="is a file"):
        load_model(ckpt / "config.json")


def test_malformed_config(ckpt):
    (ckpt / "config.json").write_text('{"architectures": ["LlamaForCausalLM"], ')
    with pytest.raises(ConfigError, match="config.json") as e:
        load_model(ckpt)
    assert "JSON" in str(e.value)


def test_config_not_an_object(ckpt):
    (ckpt / "config.json").write_text("[1, 2, 3]")
    with pytest.raises(ConfigError, match="JSON object"):
        load_model(ckpt)


def test_missing_config(ckpt):
    (ckpt / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_model(ckpt)


@pytest.mark.parametrize("field", ["hidden_size", "vocab_size", "num_hidden_layers", "intermediate_size"])
def test_config_missing_required_field(ckpt, field):
    _edit_config(ckpt, **{field: _DELETE})
    with pytest.raises(ConfigError, match=field):
        load_model(ckpt)


@pytest.mark.parametrize("field, value, match", [
    ("hidden_size", 0, "hidden_size"),
    ("num_hidden_layers", -1, "num_layers"),
    ("vocab_size", 9.5, "vocab_size"),
    ("num_key_value_heads", 3, "num_key_value_heads=3"),
])
def test_config_bad_value(ckpt, field, value, match):
    _edit_config(ckpt, **{field: value})
    with pytest.raises(ConfigError, match=match):
        load_model(ckpt)


def test_bad_dtype(good):
    with pytest.raises(TypeError, match="dtype"):
        load_model(good, dtype=torch.int8)
