"""Load a llama-family checkpoint (HF directory, safetensors only) into ``LlamaForCausalLM``."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open

from .config import ModelConfig
from .llama import LlamaForCausalLM


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded: names the file or tensor at fault."""


def _weight_files(root: Path) -> list[Path]:
    index = root / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index} is not a valid safetensors index ({e})") from None
        files = sorted({root / name for name in weight_map.values()})
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise CheckpointError(f"{index} names shard(s) that do not exist: {', '.join(missing)}")
        return files
    single = root / "model.safetensors"
    if single.is_file():
        return [single]
    others = sorted(p.name for p in root.glob("*.bin")) + sorted(p.name for p in root.glob("*.pt"))
    hint = ""
    if others:
        hint = f" (found {', '.join(others)}: pickled weights are not loaded; convert them to safetensors)"
    raise CheckpointError(f"no model.safetensors or model.safetensors.index.json in {root}{hint}")


def _read_tensors(files: list[Path]) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for f in files:
        try:
            with safe_open(str(f), framework="pt") as handle:
                for name in handle.keys():
                    tensors[name] = handle.get_tensor(name)
        except Exception as e:  # safetensors raises its own error types for corrupt files
            raise CheckpointError(f"cannot read {f}: the file is truncated or not a safetensors file ({e})") from None
    return tensors


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")


def load_tokenizer(path: str | Path):
    """transformers' AutoTokenizer for a model directory, or None when it has none."""
    path = Path(path)
    if not any((path / f).is_file() for f in _TOKENIZER_FILES):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))


def load_model(path: str | Path, device="cpu", dtype: torch.dtype = torch.float32) -> LlamaForCausalLM:
    """Load an HF-style llama / mistral / qwen2 / qwen3 / gemma2 / gemma3 (text) directory.

    path:   directory with config.json and model.safetensors (or a sharded index)
    device: where the parameters go
    dtype:  torch.float32, torch.float16 or torch.bfloat16

    >>> model = load_model("out/stories260K")            # doctest: +SKIP
    >>> logits = model(torch.tensor([[1, 403, 407]]))    # [1, 3, 512]
    """
    root = Path(path)
    if not root.exists():
        raise FileNotFoundError(f"model path {root} does not exist")
    if not root.is_dir():
        raise CheckpointError(f"model path {root} is a file; pass the model directory")
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"dtype must be torch.float32, float16 or bfloat16, got {dtype}")
    cfg = ModelConfig.from_file(root)
    tensors = _read_tensors(_weight_files(root))

    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    expected = {name: p for name, p in model.named_parameters(remove_duplicate=True)}
    if cfg.tie_word_embeddings:
        expected.pop("lm_head.weight", None)
        tensors.pop("lm_head.weight", None)  # some tied checkpoints store it anyway
    missing = sorted(set(expected) - set(tensors))
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise CheckpointError(f"checkpoint {root} is missing tensor(s): {shown}")
    unexpected = sorted(k for k in set(tensors) - set(expected) if not k.endswith("rotary_emb.inv_freq"))
    if unexpected:
        raise CheckpointError(
            f"checkpoint {root} has tensor(s) the {cfg.architecture} config does not expect: "
            f"{', '.join(unexpected[:5])}; is config.json the right one for these weights?"
        )
    for name, param in expected.items():
        if tuple(tensors[name].shape) != tuple(param.shape):
            raise CheckpointError(
                f"tensor {name} in {root} has shape {tuple(tensors[name].shape)} but the config "
                f"implies {tuple(param.shape)}"
            )

    model = model.to_empty(device=device)
    with torch.no_grad():
        for name, param in model.named_parameters(remove_duplicate=True):
            if name in tensors:
                param.copy_(tensors[name].to(dtype))
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    model = model.to(dtype=dtype).eval()
    # RoPE frequencies stay fp32 whatever the weights' dtype, as transformers keeps them
    model.model.rotary.inv_freq = cfg.rope_inv_freq().to(device)
    if model.model.rotary_local is not None:
        model.model.rotary_local.inv_freq = cfg.rope_local_inv_freq().to(device)
    model.fuse_projections()
    return model
