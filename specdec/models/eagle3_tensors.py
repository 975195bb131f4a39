"""An EAGLE-3 head's tensors (under normalised names) checked against its ``Eagle3Config`` fields.

Nothing is skipped: an unknown, missing or misshapen tensor, a non-float weight, or vocabulary
maps that are corrupt or do not belong together raise CheckpointError naming it and what to change.
Re-exported by ``specdec.models.eagle3_dialects``.
"""

from __future__ import annotations

import torch

from .loader import CheckpointError


def _expected_shapes(f: dict) -> tuple[dict[str, tuple], dict[str, tuple]]:
    """(required, optional) normalised tensor names -> shapes for the config fields ``f``."""
    H, ffn, hd = f["hidden_size"], f["intermediate_size"], f["head_dim"]
    q_rows, kv_rows = f["num_attention_heads"] * hd, f["num_key_value_heads"] * hd
    Ht, C = f["target_hidden_size"], 3 if f["aux_layer_ids"] is None else len(f["aux_layer_ids"])
    m = "midlayer."
    req = {
        "fc.weight": (H, C * Ht),
        m + "input_layernorm.weight": (H,),
        m + "hidden_norm.weight": (H,),
        m + "self_attn.q_proj.weight": (q_rows, 2 * H),  # input [RMSNorm(e) ; RMSNorm(u)]
        m + "self_attn.k_proj.weight": (kv_rows, 2 * H),
        m + "self_attn.v_proj.weight": (kv_rows, 2 * H),
        m + "self_attn.o_proj.weight": (H, q_rows),
        m + "post_attention_layernorm.weight": (H,),
        m + "mlp.gate_proj.weight": (ffn, H),
        m + "mlp.up_proj.weight": (ffn, H),
        m + "mlp.down_proj.weight": (H, ffn),
        "norm.weight": (H,),
        "lm_head.weight": (f["draft_vocab_size"], H),
    }
    if f["fc_bias"]:
        req["fc.bias"] = (H,)
    if f["draft_arch"] == "qwen3":
        req[m + "self_attn.q_norm.weight"] = (hd,)
        req[m + "self_attn.k_norm.weight"] = (hd,)
    if f["norm_before_fc"]:
        req["input_norm.weight"] = (C * Ht,)
    if f["fc_norm"]:
        req.update({f"fc_norm.{i}.weight": (Ht,) for i in range(C)})
    opt: dict[str, tuple] = {"embed_tokens.weight": (f["vocab_size"], H)}
    maps: dict[str, tuple] = {"d2t": (f["draft_vocab_size"],), "t2d": (f["vocab_size"],)}
    (req if f["draft_vocab_size"] < f["vocab_size"] else opt).update(maps)
    return req, opt


# why a present tensor the config does not expect is there, and what to change
_UNEXPECTED_HINTS = {
    "fc.bias": "the config does not set bias/fc_bias: true",
    "input_norm.weight": "the config does not set norm_before_fc: true",
    "midlayer.self_attn.q_norm.weight": "q/k norms belong to a qwen3 draft layer (model_type \"qwen3\")",
    "midlayer.self_attn.k_norm.weight": "q/k norms belong to a qwen3 draft layer (model_type \"qwen3\")",
    "mask_hidden": "parallel drafting is not supported",
}
_MISSING_HINTS = {
    "lm_head.weight": "an EAGLE-3 head has its own draft-vocabulary lm_head [Vd, H]",
    "d2t": "draft_vocab_size < vocab_size needs the d2t/t2d vocabulary maps",
    "t2d": "draft_vocab_size < vocab_size needs the d2t/t2d vocabulary maps",
    "input_norm.weight": "the config sets norm_before_fc: true",
    "fc.bias": "the config sets bias/fc_bias: true",
}


def _listed(names: list[str], hints: dict[str, str]) -> str:
    shown = [n + (f" ({hints[n]})" if n in hints else "") for n in names[:5]]
    return ", ".join(shown) + (f" and {len(names) - 5} more" if len(names) > 5 else "")


def _check_vocab_maps(d2t: torch.Tensor, t2d: torch.Tensor, vocab: int, source: str) -> None:
    """SafeAILab/SpecForge build the maps from ascending used ids: target = arange(Vd) + d2t is
    strictly increasing, inside the vocabulary, and equals nonzero(t2d)."""
    target = torch.arange(d2t.numel()) + d2t
    if d2t.numel() and (target[0] < 0 or target[-1] >= vocab or bool((target[1:] <= target[:-1]).any())):
        raise CheckpointError(f"d2t in {source} does not map the draft vocabulary to distinct ascending target "
                              f"ids in [0, {vocab}): the vocabulary maps are corrupt")
    if not torch.equal(target, t2d.nonzero().flatten()):
        raise CheckpointError(f"d2t and t2d in {source} disagree: arange(Vd) + d2t must equal the ids where t2d "
                              f"is true; the vocabulary maps do not belong together")


def _integer_map(t: torch.Tensor, name: str, source: str) -> torch.Tensor:
    if name == "t2d" and t.dtype != torch.bool:
        if t.is_floating_point() or bool(((t != 0) & (t != 1)).any()):
            raise CheckpointError(f"t2d in {source} must be bool (or 0/1 integers), got {t.dtype}")
        return t.bool()
    if name == "d2t" and (t.is_floating_point() or t.dtype == torch.bool):
        raise CheckpointError(f"d2t in {source} must hold integers, got {t.dtype}")
    return t.to(torch.int64) if name == "d2t" else t


def check_tensors(f: dict, tensors: dict[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
    """The head's tensors checked against its config fields ``f``: none unknown, none missing, shapes,
    dtypes, vocabulary maps (identity maps added for a full draft vocabulary)."""
    m = "midlayer.self_attn."
    required, optional = _expected_shapes(f)
    unexpected = sorted(set(tensors) - set(required) - set(optional))
    if unexpected:
        hints = dict(_UNEXPECTED_HINTS,
                     **{n: "the config does not set fc_norm: true" for n in unexpected if n.startswith("fc_norm.")},
                     **{n: "multi-layer heads are not supported" for n in unexpected
                        if n.startswith(("layers.", "midlayers."))})
        raise CheckpointError(f"{source} has tensor(s) specdec's EAGLE-3 head does not know: "
                              f"{_listed(unexpected, hints)}; refusing to skip them (is config.json "
                              f"the right one for these weights?)")
    missing = sorted(set(required) - set(tensors))
    if missing:
        hints = dict(_MISSING_HINTS,
                     **{n: "the config sets fc_norm: true" for n in required if n.startswith("fc_norm.")},
                     **{n: "a qwen3 draft layer has q/k norms" for n in required
                        if n.startswith(m) and n.endswith("_norm.weight")})
        raise CheckpointError(f"{source} is missing tensor(s): {_listed(missing, hints)}")
    shapes = {**required, **optional}
    out = {}
    for name, t in tensors.items():
        if tuple(t.shape) != shapes[name]:
            raise CheckpointError(f"tensor {name} in {source} has shape {tuple(t.shape)} but the config implies "
                                  f"{shapes[name]}; is config.json the right one for these weights?")
        if name in ("d2t", "t2d"):
            t = _integer_map(t, name, source)
        elif not t.is_floating_point():
            raise CheckpointError(f"tensor {name} in {source} has dtype {t.dtype}; weights must be floating point")
        out[name] = t.contiguous()
    if "d2t" in out or "t2d" in out:
        if "d2t" not in out or "t2d" not in out:
            raise CheckpointError(f"{source} is missing tensor(s): {'t2d' if 'd2t' in out else 'd2t'} (the "
                                  f"vocabulary maps come in pairs)")
        _check_vocab_maps(out["d2t"], out["t2d"], f["vocab_size"], source)
    else:  # full draft vocabulary: identity maps
        out["d2t"] = torch.zeros(f["vocab_size"], dtype=torch.int64)
        out["t2d"] = torch.ones(f["vocab_size"], dtype=torch.bool)
    return out
