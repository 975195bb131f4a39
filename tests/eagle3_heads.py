"""Tiny random EAGLE-3 heads written to disk in each published dialect (a shared test helper).

``write_head(dir, dialect, *, target_config, ...)`` writes config.json + weights the way the
dialect's own tools do and returns the tensors it wrote under the normalised names of
specdec/models/eagle3.py, so a test can compare what ``load_eagle3`` reads with what was
written. The same arguments (seed included) give the same tensor values in every dialect.

Dialects:
  "safeailab"   flat llama config (architectures ["LlamaForCausalLM"], draft_vocab_size, no
                rope_theta / head_dim), ``midlayer.*``, pickled ``pytorch_model.bin`` (load it
                through ``convert_eagle3``)
  "specforge"   flat config, architectures ["LlamaForCausalLMEagle3"], rope_theta and head_dim
                explicit, ``midlayer.*``, ``model.safetensors``
  "speculators" speculators_model_type "eagle3", nested transformer_layer_config,
                ``layers.0.*``, ``model.safetensors``, norm_before_residual written explicitly
                (false unless ``flags`` says otherwise)
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

DIALECTS = ("safeailab", "specforge", "speculators")
ID_CONVENTIONS = ("hf", "output", "nested-hf")


def _target_dims(target_config) -> tuple[int, int, int]:
    """(V, Ht, L) of a ModelConfig-like object or an HF config dict."""
    if isinstance(target_config, dict):
        return target_config["vocab_size"], target_config["hidden_size"], target_config["num_hidden_layers"]
    return target_config.vocab_size, target_config.hidden_size, target_config.num_layers


def write_head(dir, dialect: str, *, target_config, draft_vocab: int | None = None, own_embed: bool = False,
               ids=None, ids_convention: str | None = None, arch: str = "llama", seed: int = 0,
               hidden_size: int | None = None, flags: dict | None = None,
               dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Write a random one-layer EAGLE-3 head for ``target_config`` into ``dir``; returns its tensors.

    dir:            directory to write (created)
    dialect:        "safeailab" | "specforge" | "speculators" (module docstring)
    target_config:  ModelConfig (vocab_size, hidden_size, num_layers) or an HF config dict
    draft_vocab:    Vd < V: a reduced draft vocabulary (seeded random ascending subset, d2t/t2d
                    written); None: the full vocabulary, no maps
    own_embed:      write embed_tokens.weight [V, H]
    ids:            aux layers as HF hidden_states indices (input to decoder layer k), ascending;
                    None: no ids in the config (the default {2, L//2, L-3})
    ids_convention: how ``ids`` are written: "hf" top-level eagle_aux_hidden_state_layer_ids as is;
                    "output" eagle_config.eagle_aux_hidden_state_layer_ids = ids - 1 (SpecForge's
                    output-of-layer convention; refused when min(ids) is 0 or 3, which a reader
                    cannot tell apart); "nested-hf" eagle_config ids as is (needs min(ids) == 2).
                    None: "hf" for speculators, "output" otherwise. speculators takes "hf" only.
    arch:           "llama" | "qwen3" (q_norm/k_norm [head_dim], head_dim = 2 * H // heads);
                    qwen3 is written as model_type "qwen3" (not for safeailab)
    seed:           torch.Generator seed of every value
    hidden_size:    draft H (default: the target's); != the target's writes target_hidden_size and
                    needs own_embed=True to load
    flags:          extra config keys written verbatim (top level) that also add their tensors:
                    norm_before_fc -> input_norm.weight [C*Ht], fc_norm -> fc_norm.{i}.weight [Ht],
                    bias / fc_bias -> fc.bias [H]; others (norm_before_residual, norm_output, ...)
                    only go into the config
    dtype:          floating dtype of the weights

    Returns {normalised name: tensor} of everything written (d2t/t2d only when reduced).

    Draft shape: H = hidden_size or Ht, 4 heads, 2 kv heads, intermediate 2H + 8, eps 1e-5,
    rope_theta 10000; weights N(0, 0.3²), norm gains 1 + N(0, 0.3²).
    """
    if dialect not in DIALECTS:
        raise ValueError(f"dialect must be one of {DIALECTS}, got {dialect!r}")
    if arch not in ("llama", "qwen3") or (arch == "qwen3" and dialect == "safeailab"):
        raise ValueError(f"arch {arch!r} cannot be written in the {dialect} dialect")
    V, Ht, _ = _target_dims(target_config)
    flags = dict(flags or {})
    H = hidden_size or Ht
    heads, kv_heads = 4, 2
    hd = (H // heads) * (2 if arch == "qwen3" else 1)
    inter = 2 * H + 8
    Vd = draft_vocab or V
    C = 3 if ids is None else len(ids)
    gen = torch.Generator().manual_seed(seed)

    def w(*shape):
        return (torch.randn(shape, generator=gen) * 0.3).to(dtype)

    def gain(n):
        return (1 + torch.randn(n, generator=gen) * 0.3).to(dtype)

    m = "midlayer."
    t = {
        "fc.weight": w(H, C * Ht),
        m + "input_layernorm.weight": gain(H),
        m + "hidden_norm.weight": gain(H),
        m + "self_attn.q_proj.weight": w(heads * hd, 2 * H),
        m + "self_attn.k_proj.weight": w(kv_heads * hd, 2 * H),
        m + "self_attn.v_proj.weight": w(kv_heads * hd, 2 * H),
        m + "self_attn.o_proj.weight": w(H, heads * hd),
        m + "post_attention_layernorm.weight": gain(H),
        m + "mlp.gate_proj.weight": w(inter, H),
        m + "mlp.up_proj.weight": w(inter, H),
        m + "mlp.down_proj.weight": w(H, inter),
        "norm.weight": gain(H),
        "lm_head.weight": w(Vd, H),
    }
    if arch == "qwen3":
        t[m + "self_attn.q_norm.weight"] = gain(hd)
        t[m + "self_attn.k_norm.weight"] = gain(hd)
    if flags.get("bias") or flags.get("fc_bias"):
        t["fc.bias"] = w(H)
    if flags.get("norm_before_fc"):
        t["input_norm.weight"] = gain(C * Ht)
    if flags.get("fc_norm"):
        t.update({f"fc_norm.{i}.weight": gain(Ht) for i in range(C)})
    if own_embed:
        t["embed_tokens.weight"] = w(V, H)
    if Vd < V:
        used = torch.randperm(V, generator=gen)[:Vd].sort().values  # ascending target ids
        t["d2t"] = used - torch.arange(Vd)  # target id = draft id + d2t[draft id]
        t["t2d"] = torch.zeros(V, dtype=torch.bool)
        t["t2d"][used] = True

    layer = {
        "model_type": arch,
        "hidden_size": H,
        "intermediate_size": inter,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "num_hidden_layers": 1,
        "hidden_act": "silu",
        "rms_norm_eps": 1e-5,
        "max_position_embeddings": 2048,  # must not bound the draft's RoPE
        "vocab_size": V,
        "tie_word_embeddings": False,
    }
    if dialect != "safeailab":
        layer.update(rope_theta=10000.0, head_dim=hd)
    convention = ids_convention or ("hf" if dialect == "speculators" else "output")
    id_keys = {} if ids is None else _id_keys(list(ids), convention, dialect)
    extra = {"draft_vocab_size": Vd, **({"target_hidden_size": Ht} if H != Ht else {})}
    if dialect == "speculators":
        config = {
            "architectures": ["Eagle3Speculator"],
            "speculators_model_type": "eagle3",
            "speculators_version": "0.3.0",
            "transformer_layer_config": layer,
            "norm_before_residual": False,
            "speculators_config": {"algorithm": "eagle3", "default_proposal_method": "greedy",
                                   "proposal_methods": [{"proposal_type": "greedy", "speculative_tokens": 3}],
                                   "verifier": {"name_or_path": None, "architectures": ["LlamaForCausalLM"]}},
            **extra, **id_keys, **flags,
        }
        names = {k.replace(m, "layers.0.", 1) if k.startswith(m) else k: v for k, v in t.items()}
    else:
        arch_name = "LlamaForCausalLM" if dialect == "safeailab" else "LlamaForCausalLMEagle3"
        config = {"architectures": [arch_name], **layer, "torch_dtype": str(dtype).removeprefix("torch."),
                  **extra, **id_keys, **flags}
        names = dict(t)

    out = Path(dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    if dialect == "safeailab":
        torch.save({k: v.clone() for k, v in names.items()}, out / "pytorch_model.bin")
    else:
        save_file({k: v.clone().contiguous() for k, v in names.items()}, str(out / "model.safetensors"))
    return t


def _id_keys(ids: list[int], convention: str, dialect: str) -> dict:
    if convention not in ID_CONVENTIONS:
        raise ValueError(f"ids_convention must be one of {ID_CONVENTIONS}, got {convention!r}")
    if ids != sorted(set(ids)):
        raise ValueError(f"ids must be distinct and ascending, got {ids}")
    if dialect == "speculators" and convention != "hf":
        raise ValueError("speculators configs carry top-level HF-index ids only")
    if convention == "hf":
        return {"eagle_aux_hidden_state_layer_ids": ids}
    if convention == "nested-hf":
        if ids[0] != 2:
            raise ValueError(f"nested ids are read as HF indices only when the first is 2, got {ids}")
        return {"eagle_config": {"eagle_aux_hidden_state_layer_ids": ids, "use_aux_hidden_state": True}}
    if ids[0] in (0, 3):
        raise ValueError(f"ids {ids} cannot be written output-of-layer: the first would be {ids[0] - 1}")
    return {"eagle_config": {"eagle_aux_hidden_state_layer_ids": [i - 1 for i in ids],
                             "use_aux_hidden_state": True}}
