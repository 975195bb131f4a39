"""EAGLE-3 checkpoint dialects on disk -> the fields of ``Eagle3Config`` and normalised tensors.

What each dialect stores and how it is read: see specdec/models/eagle3.py and
docs/EAGLE3_FORMAT.md §1. Everything here validates; nothing is skipped silently: a config key
that changes the math and is not implemented, an unknown, missing or misshapen tensor, or
inconsistent vocabulary maps raise ConfigError / CheckpointError (ValueErrors) naming it. The
tensor checks live in eagle3_tensors.py (``check_tensors``, re-exported here).
"""

from __future__ import annotations

from pathlib import Path

import torch

from .config import ConfigError, read_config_json
from .eagle3_tensors import check_tensors
from .loader import CheckpointError

EAGLE3_ARCHITECTURES = ("LlamaForCausalLMEagle3", "Eagle3LlamaForCausalLM", "EAGLE3LlamaForCausalLM")
DRAFT_ARCHS = ("llama", "qwen3")
DEFAULT_ROPE_THETA = 10000.0  # what every reference trained with when the config names none
LLAMA3_ROPE_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")

__all__ = ["DEFAULT_ROPE_THETA", "DRAFT_ARCHS", "EAGLE3_ARCHITECTURES", "LLAMA3_ROPE_KEYS", "check_tensors",
           "is_eagle3_config", "parse_config", "read_config", "resolve"]


# ---------------------------------------------------------------------------- detection


def read_config(root: Path) -> dict:
    """The JSON object in ``root/config.json`` (an EAGLE-3 head's config)."""
    return read_config_json(root / "config.json", f"no config.json in {root}: is this an EAGLE-3 head directory?")


def is_eagle3_config(raw: dict) -> bool:
    if "speculators_model_type" in raw:
        return raw["speculators_model_type"] == "eagle3"
    archs = raw.get("architectures") or []
    return (any(a in EAGLE3_ARCHITECTURES for a in archs)
            or ("LlamaForCausalLM" in archs and "draft_vocab_size" in raw))


# ---------------------------------------------------------------------------- config


def _bool(d: dict, key: str, default, where: str):
    value = d.get(key, default)
    if value is not None and not isinstance(value, bool):
        raise ConfigError(f"{key} must be true or false, got {value!r}{where}")
    return value


def _either(d: dict, ours: str, theirs: str, default, where: str):
    """A flag spelled with the contract's name or a dialect's; both present must agree."""
    a, b = _bool(d, ours, None, where), _bool(d, theirs, None, where)
    if a is not None and b is not None and a != b:
        raise ConfigError(f"{ours}={a} and {theirs}={b} contradict each other{where}; keep one")
    return a if a is not None else b if b is not None else default


def _int(d: dict, key: str, where: str, default=None):
    if key not in d or d[key] is None:
        if default is None:
            raise ConfigError(f"config is missing required field {key!r}{where}")
        return default
    value = d[key]
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ConfigError(f"{key} must be a positive integer, got {value!r}{where}")
    return value


def _rope(layer: dict, where: str) -> tuple[float, dict | None]:
    """(theta, llama3 scaling or None) from ``rope_parameters`` (transformers 5) or ``rope_theta`` +
    ``rope_scaling``. Theta defaults to 10000 whatever the family (the references train with it)."""
    rope = layer.get("rope_parameters") or layer.get("rope_scaling") or {}
    if not isinstance(rope, dict):
        raise ConfigError(f"rope_scaling must be an object or null, got {rope!r}{where}")
    theta = rope.get("rope_theta", layer.get("rope_theta"))
    theta = DEFAULT_ROPE_THETA if theta is None else theta
    if not isinstance(theta, (int, float)) or isinstance(theta, bool) or theta <= 0:
        raise ConfigError(f"rope_theta must be a positive number, got {theta!r}{where}")
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind == "default":
        return float(theta), None
    if kind != "llama3":
        raise ConfigError(f"rope type {kind!r} of the EAGLE-3 head is not supported{where}; "
                          f"supported: default, llama3")
    missing = [k for k in LLAMA3_ROPE_KEYS if k not in rope]
    if missing:
        raise ConfigError(f"llama3 rope scaling is missing {missing}{where}")
    return float(theta), {"rope_type": "llama3", **{k: rope[k] for k in LLAMA3_ROPE_KEYS}}


def _reject_unsupported(layer: dict, top: dict, where: str) -> None:
    """Config keys that change the draft's math in ways specdec does not implement: refuse them."""
    def no(what: str, fix: str):
        raise ConfigError(f"unsupported EAGLE-3 variant: {what}{where}; {fix}")

    n = layer.get("num_hidden_layers", 1)
    if n != 1:
        no(f"num_hidden_layers={n!r} (multi-layer heads)", "specdec runs one-layer EAGLE-3 heads only")
    act = layer.get("hidden_act", layer.get("hidden_activation", "silu"))
    if act != "silu":
        no(f"hidden_act={act!r}", "the draft layer's MLP is SiLU-gated")
    for key in ("attention_bias", "mlp_bias"):
        if layer.get(key):
            no(f"{key}=true", "the draft layer has no attention or MLP biases")
    if layer.get("use_sliding_window") or "sliding_attention" in (layer.get("layer_types") or ()):
        no("sliding-window attention", "the draft layer attends over the whole context")
    if layer.get("model_type", "llama") == "llama" and layer.get("sliding_window") is not None:
        no(f"sliding_window={layer['sliding_window']!r}", "the draft layer attends over the whole context")
    if layer.get("logit_scale", 1.0) != 1.0:
        no(f"logit_scale={layer['logit_scale']!r}", "the draft logits are lm_head's, unscaled")
    eagle = top.get("eagle_config")
    if not isinstance(eagle, dict):
        eagle = {}
    for d in (top, layer, eagle):
        for key in ("mask_hidden", "parallel_drafting"):
            if key in d and d[key] not in (None, False):
                no(f"{key} (parallel drafting)", "specdec drafts one token per head step")
        if _bool(d, "use_aux_hidden_state", True, where) is False:
            no("use_aux_hidden_state=false (an EAGLE-1/2 style head)", "specdec loads EAGLE-3 heads")


def _aux_ids(top: dict, nested_allowed: bool, where: str) -> tuple[int, ...] | None:
    """The aux layer ids as HF hidden_states indices (see the module docstring for the conventions)."""
    def ints(value, key):
        if value is None:
            return None
        if (not isinstance(value, list) or not value
                or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in value)):
            raise ConfigError(f"{key} must be a non-empty list of non-negative layer ids, got {value!r}{where}")
        if len(set(value)) != len(value):
            raise ConfigError(f"{key} repeats a layer: {value!r}{where}")
        return sorted(value)

    top_ids = ints(top.get("eagle_aux_hidden_state_layer_ids"), "eagle_aux_hidden_state_layer_ids")
    eagle = top.get("eagle_config") if nested_allowed else None
    nested = None
    if eagle is not None:
        if not isinstance(eagle, dict):
            raise ConfigError(f"eagle_config must be an object, got {eagle!r}{where}")
        unknown = set(eagle) - {"eagle_aux_hidden_state_layer_ids", "use_aux_hidden_state", "norm_before_fc"}
        if unknown:
            raise ConfigError(f"unsupported EAGLE-3 variant: eagle_config key(s) {sorted(unknown)}{where}; "
                              f"specdec knows eagle_aux_hidden_state_layer_ids, use_aux_hidden_state, "
                              f"norm_before_fc")
        nested = ints(eagle.get("eagle_aux_hidden_state_layer_ids"), "eagle_config.eagle_aux_hidden_state_layer_ids")
        if nested is not None and nested[0] != 2:  # output of layer i == input to layer i + 1
            nested = [i + 1 for i in nested]
    if top_ids is not None and nested is not None and top_ids != nested:
        raise ConfigError(f"eagle_aux_hidden_state_layer_ids {top_ids} (HF index) and eagle_config's ids "
                          f"(HF index {nested}) name different layers{where}; keep the right one")
    ids = top_ids if top_ids is not None else nested
    return tuple(ids) if ids is not None else None


def _check_eagle3(raw: dict, where: str) -> None:
    """ConfigError unless ``raw`` is an EAGLE-3 head config in a dialect specdec reads."""
    if not is_eagle3_config(raw):
        if "speculators_model_type" in raw:
            raise ConfigError(f"speculators_model_type {raw['speculators_model_type']!r} is not an EAGLE-3 "
                              f"head{where}; specdec loads speculators_model_type \"eagle3\"")
        raise ConfigError(f"not an EAGLE-3 head config{where}: expected speculators_model_type \"eagle3\", "
                          f"architectures {list(EAGLE3_ARCHITECTURES)}, or LlamaForCausalLM with draft_vocab_size")


def _norm_before_fc(raw: dict, speculators: bool, where: str) -> bool:
    """``norm_before_fc``, top-level or (non-speculators dialects) in ``eagle_config``; both must agree."""
    nested = raw.get("eagle_config")
    eagle: dict = nested if isinstance(nested, dict) else {}
    norm_before_fc = _bool(raw, "norm_before_fc", None, where)
    nested_nbf = None if speculators else _bool(eagle, "norm_before_fc", None, where)
    if norm_before_fc is not None and nested_nbf is not None and norm_before_fc != nested_nbf:
        raise ConfigError(f"norm_before_fc and eagle_config.norm_before_fc contradict each other{where}")
    return norm_before_fc if norm_before_fc is not None else bool(nested_nbf)


def _dialect_flags(raw: dict, speculators: bool, where: str) -> dict:
    """fc_bias / norm_before_residual / apply_final_norm / feed_normed_hidden, as each dialect spells them."""
    if speculators:
        return {
            "fc_bias": False,
            "norm_before_residual": _bool(raw, "norm_before_residual", True, where),  # as vLLM reads them
            "apply_final_norm": True,
            "feed_normed_hidden": _bool(raw, "norm_output", False, where),
        }
    return {
        "fc_bias": _either(raw, "fc_bias", "bias", None, where),
        "norm_before_residual": _bool(raw, "norm_before_residual", False, where),
        "apply_final_norm": _either(raw, "apply_final_norm", "norm_output", True, where),
        "feed_normed_hidden": _bool(raw, "feed_normed_hidden", False, where),
    }


def _check_aux_count(raw: dict, aux_layer_ids: tuple | None, where: str) -> None:
    """ConfigError when ``num_aux_layers`` / ``num_aux_hidden_states`` disagree with the aux layer ids."""
    num_aux = 3 if aux_layer_ids is None else len(aux_layer_ids)
    for key in ("num_aux_layers", "num_aux_hidden_states"):
        if raw.get(key) not in (None, num_aux):
            raise ConfigError(f"{key}={raw[key]!r} but the config names {num_aux} aux layers{where}; "
                              f"set eagle_aux_hidden_state_layer_ids to the {raw[key]} layers the head reads")


def parse_config(raw: dict, source: str) -> dict:
    """Eagle3Config fields from a config.json; ``draft_arch``/``fc_bias`` may be None = decided by the tensors."""
    where = f" (in {source})"
    _check_eagle3(raw, where)
    speculators = "speculators_model_type" in raw
    layer = raw.get("transformer_layer_config") if speculators else raw
    if not isinstance(layer, dict):
        raise ConfigError(f"transformer_layer_config must be an object, got {layer!r}{where}")
    _reject_unsupported(layer, raw, where)

    hidden, heads = _int(layer, "hidden_size", where), _int(layer, "num_attention_heads", where)
    vocab = _int(layer, "vocab_size", where)
    theta, scaling = _rope(layer, where)
    model_type = layer.get("model_type", "llama")
    if model_type not in DRAFT_ARCHS:
        raise ConfigError(f"draft layer model_type {model_type!r} is not supported{where}; supported: {DRAFT_ARCHS}")
    # qwen3: with q/k norms (vLLM, older speculators) or plain llama layers (newer speculators)
    draft_arch = "llama" if model_type == "llama" else None
    if not speculators and "draft_arch" in raw:
        draft_arch = raw["draft_arch"]
    norm_before_fc = _norm_before_fc(raw, speculators, where)
    flags = _dialect_flags(raw, speculators, where)
    fields = dict(
        hidden_size=hidden,
        intermediate_size=_int(layer, "intermediate_size", where),
        num_attention_heads=heads,
        num_key_value_heads=_int(layer, "num_key_value_heads", where, default=heads),
        head_dim=_int(layer, "head_dim", where, default=hidden // heads),
        rms_norm_eps=float(layer.get("rms_norm_eps") or 1e-6),
        rope_theta=theta,
        rope_scaling=scaling,
        vocab_size=vocab,
        draft_vocab_size=_int(raw, "draft_vocab_size", where, default=vocab),
        target_hidden_size=_int(raw, "target_hidden_size", where, default=hidden),
        aux_layer_ids=_aux_ids(raw, not speculators, where),
        draft_arch=draft_arch,
        norm_before_fc=norm_before_fc,
        fc_norm=_bool(raw, "fc_norm", False, where),
        has_embed_tokens=None,  # decided by the tensors
        **flags,
    )
    _check_aux_count(raw, fields["aux_layer_ids"], where)
    return fields


# ---------------------------------------------------------------------------- tensors


def _rename(tensors: dict[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
    """Dialect names -> normalised names: ``layers.0.`` -> ``midlayer.``; RoPE caches dropped (derived)."""
    out: dict[str, torch.Tensor] = {}
    for name, t in tensors.items():
        if name.endswith("rotary_emb.inv_freq"):
            continue  # a cache of the config's RoPE frequencies, recomputed from the config
        new = "midlayer." + name[len("layers.0."):] if name.startswith("layers.0.") else name
        if new in out:
            raise CheckpointError(f"{source} holds both {new} and its speculators name layers.0.{new[9:]}; "
                                  f"keep one")
        out[new] = t
    return out


def resolve(raw: dict, tensors: dict[str, torch.Tensor], source: str) -> tuple[dict, dict[str, torch.Tensor]]:
    """(Eagle3Config fields, tensors under normalised names) of a dialect's config.json and state dict;
    the choices the config leaves open (qwen3 q/k norms, fc bias, own embedding) are read off the tensors."""
    f = parse_config(raw, source)
    tensors = _rename(tensors, source)
    m = "midlayer.self_attn."
    if f["draft_arch"] is None:  # qwen3 model_type: q/k norms decide
        norms = [n for n in (m + "q_norm.weight", m + "k_norm.weight") if n in tensors]
        if len(norms) == 1:
            raise CheckpointError(f"{source} holds {norms[0]} but not its pair: a qwen3 draft layer has both "
                                  f"q_norm and k_norm")
        f["draft_arch"] = "qwen3" if norms else "llama"
    if f["fc_bias"] is None:  # no bias flag: SGLang-style heads carry fc.bias exactly when they use it
        f["fc_bias"] = "fc.bias" in tensors
    f["has_embed_tokens"] = "embed_tokens.weight" in tensors
    layer = raw.get("transformer_layer_config") or {}
    tied = raw.get("tie_word_embeddings") or layer.get("tie_word_embeddings")
    if "lm_head.weight" not in tensors and tied:
        raise CheckpointError(f"{source} sets tie_word_embeddings: true and has no lm_head.weight; an EAGLE-3 "
                              f"head needs its own draft-vocabulary lm_head [Vd, H] (the tie is not supported)")
    if f["target_hidden_size"] != f["hidden_size"] and not f["has_embed_tokens"]:
        raise CheckpointError(
            f"{source}: target_hidden_size={f['target_hidden_size']} differs from hidden_size={f['hidden_size']}, "
            f"so the target's embedding cannot feed the head, and it has no embed_tokens.weight "
            f"[{f['vocab_size']}, {f['hidden_size']}]")
    return f, tensors
