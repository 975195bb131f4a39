"""EAGLE-3 head checkpoints: the normalised config and a SpecForge-layout loader.

A minimal stand-in of the shared ``Eagle3Config`` / ``load_eagle3`` / ``is_eagle3_dir``
interface (SpecForge / SafeAILab layout only: flat llama config, ``midlayer.*`` keys,
``model.safetensors``), enough for the drafter and its tests.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

EAGLE3_ARCHITECTURES = ("LlamaForCausalLMEagle3", "Eagle3LlamaForCausalLM")


@dataclass(frozen=True)
class Eagle3Config:
    hidden_size: int  # draft H
    intermediate_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int  # config head_dim else H // heads
    rms_norm_eps: float
    rope_theta: float  # draft config's, default 10000.0; never bounded by max_position_embeddings
    rope_scaling: dict | None  # llama3-type or None
    vocab_size: int  # target vocabulary V
    draft_vocab_size: int  # Vd (== V when no d2t/t2d)
    target_hidden_size: int  # fc input = len(aux_layer_ids) * target_hidden_size
    aux_layer_ids: tuple[int, ...] | None  # HF hidden_states index; None = default {2, L//2, L-3}
    draft_arch: str  # "llama" | "qwen3"
    fc_bias: bool
    norm_before_residual: bool
    norm_before_fc: bool
    fc_norm: bool
    apply_final_norm: bool
    feed_normed_hidden: bool
    has_embed_tokens: bool

    def aux_layers(self, num_target_layers: int) -> tuple[int, ...]:
        """The captured HF hidden_states indices (input to decoder layer k), ascending."""
        L = num_target_layers
        ids = self.aux_layer_ids if self.aux_layer_ids is not None else (2, L // 2, L - 3)
        ids = tuple(sorted(ids))
        bad = [i for i in ids if not 0 <= i <= L]
        if bad:
            raise ValueError(f"EAGLE-3 aux layer ids {bad} are outside [0, {L}] for a {L}-layer target")
        return ids


def is_eagle3_dir(path) -> bool:
    """Whether ``path`` holds an EAGLE-3 head (reads config.json only)."""
    cfg = Path(path) / "config.json"
    if not cfg.is_file():
        return False
    try:
        raw = json.loads(cfg.read_text())
    except (json.JSONDecodeError, OSError):
        return False
    return raw.get("speculators_model_type") == "eagle3" or any(
        a in EAGLE3_ARCHITECTURES for a in raw.get("architectures") or ())


def _config(raw: dict, tensors: dict) -> Eagle3Config:
    h, heads = raw["hidden_size"], raw["num_attention_heads"]
    vocab = raw["vocab_size"]
    eagle = raw.get("eagle_config") or {}
    ids = raw.get("eagle_aux_hidden_state_layer_ids")
    if ids is None and eagle.get("eagle_aux_hidden_state_layer_ids") is not None:
        ids = list(eagle["eagle_aux_hidden_state_layer_ids"])
        if ids and ids[0] != 2:  # nested ids count outputs of layers: HF index = id + 1
            ids = [i + 1 for i in ids]
    target_h = raw.get("target_hidden_size") or h
    return Eagle3Config(
        hidden_size=h, intermediate_size=raw["intermediate_size"], num_attention_heads=heads,
        num_key_value_heads=raw.get("num_key_value_heads", heads), head_dim=raw.get("head_dim") or h // heads,
        rms_norm_eps=raw.get("rms_norm_eps", 1e-6), rope_theta=float(raw.get("rope_theta", 10000.0)),
        rope_scaling=raw.get("rope_scaling"), vocab_size=vocab,
        draft_vocab_size=raw.get("draft_vocab_size", vocab), target_hidden_size=target_h,
        aux_layer_ids=tuple(ids) if ids is not None else None, draft_arch="llama",
        fc_bias="fc.bias" in tensors, norm_before_residual=bool(raw.get("norm_before_residual", False)),
        norm_before_fc=False, fc_norm=False, apply_final_norm=True, feed_normed_hidden=False,
        has_embed_tokens="embed_tokens.weight" in tensors,
    )


def load_eagle3(path) -> tuple[Eagle3Config, dict[str, torch.Tensor]]:
    """(config, normalised state dict) of a SpecForge-layout head directory."""
    from safetensors.torch import load_file

    path = Path(path)
    raw = json.loads((path / "config.json").read_text())
    tensors = load_file(path / "model.safetensors")
    cfg = _config(raw, tensors)
    if "d2t" not in tensors:
        tensors["d2t"] = torch.zeros(cfg.draft_vocab_size, dtype=torch.int64)
    tensors.pop("t2d", None)
    return cfg, tensors


def check_against_target(cfg: Eagle3Config, target_config) -> None:
    """Raise a clear ValueError when the head does not fit the target."""
    if cfg.vocab_size != target_config.vocab_size:
        raise ValueError(f"the EAGLE-3 head has a vocabulary of {cfg.vocab_size} tokens but the target has "
                         f"{target_config.vocab_size}")
    if cfg.target_hidden_size != target_config.hidden_size:
        raise ValueError(f"the EAGLE-3 head expects target hidden size {cfg.target_hidden_size} but the target "
                         f"has {target_config.hidden_size}")
    if not cfg.has_embed_tokens and cfg.hidden_size != target_config.hidden_size:
        raise ValueError("the EAGLE-3 head has no embed_tokens and its hidden size differs from the target's")
    cfg.aux_layers(target_config.num_layers)
