"""EAGLE-3 draft heads: the normalised config, the checkpoint loader, the check against a target.

One decoder layer that drafts from the target's own hidden states (docs/EAGLE3_FORMAT.md §2.2):

    u      = fc(g)                 g = [r_a ; r_b ; r_c], the target's residual streams entering
                                   the aux layers a < b < c, each [Ht]   (first step only)
    x      = [RMSNorm(E[y]; input_layernorm) ; RMSNorm(u; hidden_norm)]          [2H]
    h1     = u + o_proj(attn(q, k, v of x, RoPE))     (u -> RMSNorm(u) if norm_before_residual)
    a      = h1 + mlp(RMSNorm(h1; post_attention_layernorm))
    logits = lm_head(RMSNorm(a; norm))                 [Vd]; target id = d + d2t[d]

The published heads come in three dialects, all read into one form:

* SafeAILab / SpecForge: a flat llama config.json (``architectures`` LlamaForCausalLMEagle3,
  Eagle3LlamaForCausalLM, or LlamaForCausalLM with ``draft_vocab_size``), tensors ``midlayer.*``;
  ids in ``eagle_config.eagle_aux_hidden_state_layer_ids`` count outputs of layers (HF index =
  id + 1) unless the first id is 2, a top-level ``eagle_aux_hidden_state_layer_ids`` is an HF index.
* speculators: ``speculators_model_type: "eagle3"``, the layer's llama/qwen3 config nested in
  ``transformer_layer_config``, tensors ``layers.0.*``, top-level ids = HF index,
  ``norm_before_residual`` True when missing.
* specdec's normalised layout (``specdec convert eagle3``): the flat dialect with every flag
  explicit under the names of ``Eagle3Config`` and the ids as a top-level HF index.

Weights are read from safetensors only (``model.safetensors`` or a sharded index); a
``pytorch_model.bin`` release goes through ``specdec convert eagle3 IN OUT`` first.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .config import ConfigError, ModelConfig
from .loader import CheckpointError, _read_tensors, _weight_files

EAGLE3_ARCHITECTURES = ("LlamaForCausalLMEagle3", "Eagle3LlamaForCausalLM", "EAGLE3LlamaForCausalLM")
DRAFT_ARCHS = ("llama", "qwen3")
DEFAULT_ROPE_THETA = 10000.0  # what every reference trained with when the config names none
_LLAMA3_ROPE_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


@dataclass(frozen=True)
class Eagle3Config:
    """An EAGLE-3 head's shape and variant flags, whatever dialect it was stored in.

    The flags select the variants of §1.2; the drafter implements all of them:
    g -> RMSNorm(g; input_norm) if norm_before_fc -> per-chunk RMSNorm(g_i; fc_norm.i) if fc_norm
    -> fc (+ fc.bias if fc_bias). The next draft step's u is the layer output a, or RMSNorm(a; norm)
    if feed_normed_hidden; lm_head reads RMSNorm(a; norm) if apply_final_norm, else a.
    """

    hidden_size: int                 # draft H
    intermediate_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int                    # config head_dim else H // heads
    rms_norm_eps: float
    rope_theta: float                # draft config's, default 10000.0; never bounded by max_position_embeddings
    rope_scaling: dict | None        # {"rope_type": "llama3", factor, low/high_freq_factor, original_max_...} or None
    vocab_size: int                  # target vocabulary V
    draft_vocab_size: int            # Vd (== V when no d2t/t2d)
    target_hidden_size: int          # fc input = len(aux_layer_ids) * target_hidden_size
    aux_layer_ids: tuple[int, ...] | None   # HF hidden_states index = input to decoder layer k; None = default
    draft_arch: str                  # "llama" | "qwen3" (qwen3: q_norm/k_norm [head_dim] in the attention)
    fc_bias: bool
    norm_before_residual: bool       # residual = RMSNorm(u; hidden_norm) instead of u
    norm_before_fc: bool             # one RMSNorm over the concat g (tensor input_norm.weight [C*Ht])
    fc_norm: bool                    # per-aux-chunk RMSNorm before fc (fc_norm.{i}.weight [Ht])
    apply_final_norm: bool           # final norm before lm_head (SpecForge norm_output, default True)
    feed_normed_hidden: bool         # next step's u = post-norm (speculators/vLLM norm_output, default False)
    has_embed_tokens: bool           # checkpoint carries embed_tokens.weight

    def __post_init__(self):
        for name in ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads",
                     "head_dim", "vocab_size", "draft_vocab_size", "target_hidden_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"EAGLE-3 head: {name} must be a positive integer, got {value!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(f"EAGLE-3 head: num_attention_heads={self.num_attention_heads} is not a multiple "
                              f"of num_key_value_heads={self.num_key_value_heads}")
        if self.draft_vocab_size > self.vocab_size:
            raise ConfigError(f"EAGLE-3 head: draft_vocab_size={self.draft_vocab_size} exceeds the target "
                              f"vocabulary vocab_size={self.vocab_size}")
        if self.draft_arch not in DRAFT_ARCHS:
            raise ConfigError(f"EAGLE-3 head: draft_arch {self.draft_arch!r} is not one of {DRAFT_ARCHS}")
        if not (self.rms_norm_eps > 0 and self.rope_theta > 0):
            raise ConfigError(f"EAGLE-3 head: rms_norm_eps and rope_theta must be positive, got "
                              f"{self.rms_norm_eps!r} and {self.rope_theta!r}")
        if self.rope_scaling is not None and (self.rope_scaling.get("rope_type") != "llama3"
                                              or set(self.rope_scaling) != {"rope_type", *_LLAMA3_ROPE_KEYS}):
            raise ConfigError(f"EAGLE-3 head: rope_scaling must be None or a llama3 dict with keys "
                              f"{_LLAMA3_ROPE_KEYS}, got {self.rope_scaling!r}")
        ids = self.aux_layer_ids
        if ids is not None and (not ids or list(ids) != sorted(set(ids)) or ids[0] < 0):
            raise ConfigError(f"EAGLE-3 head: aux_layer_ids must be distinct non-negative ids in ascending "
                              f"order, got {ids!r}")

    @property
    def num_aux_layers(self) -> int:
        """C: how many target hidden states fc reads (fc.weight is [H, C * target_hidden_size])."""
        return 3 if self.aux_layer_ids is None else len(self.aux_layer_ids)

    def aux_layers(self, num_target_layers: int) -> tuple[int, ...]:
        """The captured HF hidden_states indices (input to decoder layer k, 0 = embeddings), ascending.

        Explicit ids as stored; otherwise the default {2, L//2, L-3} of every reference
        implementation. Raises ValueError when an id is not a decoder layer of an
        L-layer target or the default set has fewer than 3 distinct layers (L in 4..6).
        """
        L = num_target_layers
        if self.aux_layer_ids is None:
            ids = (2, L // 2, L - 3)
            if len(set(ids)) != 3 or min(ids) < 0:
                raise ValueError(
                    f"the EAGLE-3 head names no aux layers and the default {{2, L//2, L-3}} = {sorted(ids)} is "
                    f"not 3 distinct layers of this {L}-layer target; set eagle_aux_hidden_state_layer_ids "
                    f"(HF hidden_states index) in the head's config.json to the layers it was trained on")
            return tuple(sorted(ids))
        bad = [k for k in self.aux_layer_ids if k >= L]
        if bad:
            raise ValueError(
                f"EAGLE-3 aux layer id(s) {bad} (HF hidden_states index = input to decoder layer k) are out "
                f"of range for a {L}-layer target (0..{L - 1}); the head was trained for a deeper target")
        return self.aux_layer_ids

    def rope_inv_freq(self) -> torch.Tensor:
        """Inverse RoPE frequencies [head_dim // 2] float32 of the draft layer (llama3 scaling applied)."""
        scaling = {k: v for k, v in (self.rope_scaling or {}).items() if k != "rope_type"}
        return ModelConfig(
            architecture="LlamaForCausalLM", vocab_size=self.vocab_size, hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size, num_layers=1, num_heads=self.num_attention_heads,
            num_kv_heads=self.num_key_value_heads, head_dim=self.head_dim, rope_theta=self.rope_theta,
            rope_type="llama3" if self.rope_scaling else "default", rope_scaling=scaling,
        ).rope_inv_freq()


# ---------------------------------------------------------------------------- detection


def _read_config(root: Path) -> dict:
    path = root / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"no config.json in {root}: is this an EAGLE-3 head directory?")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path} must hold a JSON object, got {type(raw).__name__}")
    return raw


def _is_eagle3_config(raw: dict) -> bool:
    if "speculators_model_type" in raw:
        return raw["speculators_model_type"] == "eagle3"
    archs = raw.get("architectures") or []
    return (any(a in EAGLE3_ARCHITECTURES for a in archs)
            or ("LlamaForCausalLM" in archs and "draft_vocab_size" in raw))


def is_eagle3_dir(path: str | Path) -> bool:
    """Whether ``path`` is a directory whose config.json describes an EAGLE-3 head (reads nothing else).

    >>> is_eagle3_dir("heads/EAGLE3-LLaMA3.1-Instruct-8B")   # doctest: +SKIP
    True
    """
    root = Path(path)
    try:
        raw = json.loads((root / "config.json").read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return False
    return isinstance(raw, dict) and _is_eagle3_config(raw)


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
    missing = [k for k in _LLAMA3_ROPE_KEYS if k not in rope]
    if missing:
        raise ConfigError(f"llama3 rope scaling is missing {missing}{where}")
    return float(theta), {"rope_type": "llama3", **{k: rope[k] for k in _LLAMA3_ROPE_KEYS}}


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
    eagle = top.get("eagle_config") if isinstance(top.get("eagle_config"), dict) else {}
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


def _parse_config(raw: dict, source: str) -> dict:
    """Eagle3Config fields from a config.json; ``draft_arch``/``fc_bias`` may be None = decided by the tensors."""
    where = f" (in {source})"
    if not _is_eagle3_config(raw):
        if "speculators_model_type" in raw:
            raise ConfigError(f"speculators_model_type {raw['speculators_model_type']!r} is not an EAGLE-3 "
                              f"head{where}; specdec loads speculators_model_type \"eagle3\"")
        raise ConfigError(f"not an EAGLE-3 head config{where}: expected speculators_model_type \"eagle3\", "
                          f"architectures {list(EAGLE3_ARCHITECTURES)}, or LlamaForCausalLM with draft_vocab_size")
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
    eagle = raw.get("eagle_config") if isinstance(raw.get("eagle_config"), dict) else {}
    norm_before_fc = _bool(raw, "norm_before_fc", None, where)
    nested_nbf = None if speculators else _bool(eagle, "norm_before_fc", None, where)
    if norm_before_fc is not None and nested_nbf is not None and norm_before_fc != nested_nbf:
        raise ConfigError(f"norm_before_fc and eagle_config.norm_before_fc contradict each other{where}")
    norm_before_fc = norm_before_fc if norm_before_fc is not None else bool(nested_nbf)
    if speculators:
        flags = dict(
            fc_bias=False,
            norm_before_residual=_bool(raw, "norm_before_residual", True, where),  # as vLLM reads them
            apply_final_norm=True,
            feed_normed_hidden=_bool(raw, "norm_output", False, where),
        )
    else:
        flags = dict(
            fc_bias=_either(raw, "fc_bias", "bias", None, where),
            norm_before_residual=_bool(raw, "norm_before_residual", False, where),
            apply_final_norm=_either(raw, "apply_final_norm", "norm_output", True, where),
            feed_normed_hidden=_bool(raw, "feed_normed_hidden", False, where),
        )
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
    num_aux = 3 if fields["aux_layer_ids"] is None else len(fields["aux_layer_ids"])
    for key in ("num_aux_layers", "num_aux_hidden_states"):
        if raw.get(key) not in (None, num_aux):
            raise ConfigError(f"{key}={raw[key]!r} but the config names {num_aux} aux layers{where}; "
                              f"set eagle_aux_hidden_state_layer_ids to the {raw[key]} layers the head reads")
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


def _expected_shapes(f: dict) -> tuple[dict[str, tuple], dict[str, tuple]]:
    """(required, optional) normalised tensor names -> shapes for the config fields ``f``."""
    H, I, hd = f["hidden_size"], f["intermediate_size"], f["head_dim"]
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
        m + "mlp.gate_proj.weight": (I, H),
        m + "mlp.up_proj.weight": (I, H),
        m + "mlp.down_proj.weight": (H, I),
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
    opt = {"embed_tokens.weight": (f["vocab_size"], H)}
    maps = {"d2t": (f["draft_vocab_size"],), "t2d": (f["vocab_size"],)}
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


def _normalise(raw: dict, tensors: dict[str, torch.Tensor], source: str) -> tuple[Eagle3Config, dict]:
    """(config, normalised tensors) from a dialect's config.json and its raw state dict."""
    f = _parse_config(raw, source)
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
    if "lm_head.weight" not in tensors and raw.get("tie_word_embeddings"):
        raise CheckpointError(f"{source} sets tie_word_embeddings: true and has no lm_head.weight; an EAGLE-3 "
                              f"head needs its own draft-vocabulary lm_head [Vd, H] (the tie is not supported)")
    if f["target_hidden_size"] != f["hidden_size"] and not f["has_embed_tokens"]:
        raise CheckpointError(
            f"{source}: target_hidden_size={f['target_hidden_size']} differs from hidden_size={f['hidden_size']}, "
            f"so the target's embedding cannot feed the head, and it has no embed_tokens.weight "
            f"[{f['vocab_size']}, {f['hidden_size']}]")
    cfg = Eagle3Config(**f)

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
        hints = dict(_MISSING_HINTS, **{n: "the config sets fc_norm: true" for n in required if n.startswith("fc_norm.")},
                     **{n: "a qwen3 draft layer has q/k norms" for n in required if n.endswith("_norm.weight")
                        and n.startswith(m)})
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
        _check_vocab_maps(out["d2t"], out["t2d"], cfg.vocab_size, source)
    else:  # full draft vocabulary: identity maps
        out["d2t"] = torch.zeros(cfg.vocab_size, dtype=torch.int64)
        out["t2d"] = torch.ones(cfg.vocab_size, dtype=torch.bool)
    return cfg, out


def _pickled_weights(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if p.name.endswith((".bin", ".pt", ".pth")))


def load_eagle3(path: str | Path) -> tuple[Eagle3Config, dict[str, torch.Tensor]]:
    """Load an EAGLE-3 head directory of any dialect into (config, normalised tensors).

    Tensors (normalised names, dtypes as stored; d2t int64 [Vd], t2d bool [V] always present,
    identity maps d2t = 0, t2d = true when the draft vocabulary is the target's):
    ``fc.weight`` [H, C*Ht] (+ ``fc.bias`` [H]), ``midlayer.{input_layernorm,hidden_norm,
    post_attention_layernorm}.weight`` [H], ``midlayer.self_attn.{q,k,v}_proj.weight`` [*, 2H],
    ``midlayer.self_attn.o_proj.weight``, ``midlayer.self_attn.{q,k}_norm.weight`` [head_dim] (qwen3),
    ``midlayer.mlp.{gate,up,down}_proj.weight``, ``norm.weight`` [H], ``lm_head.weight`` [Vd, H],
    ``embed_tokens.weight`` [V, H] (optional), ``input_norm.weight`` [C*Ht], ``fc_norm.{i}.weight`` [Ht].

    Raises ValueError (ConfigError / CheckpointError) naming the key or tensor at fault: an
    unsupported variant, an unknown, missing or misshapen tensor, inconsistent vocabulary maps,
    pickled weights only (run ``specdec convert eagle3 IN OUT``).

    >>> cfg, tensors = load_eagle3("heads/EAGLE3-LLaMA3.1-Instruct-8B")   # doctest: +SKIP
    >>> cfg.aux_layers(32), tensors["lm_head.weight"].shape
    ((2, 16, 29), torch.Size([32000, 4096]))
    """
    root = Path(path)
    if not root.exists():
        raise FileNotFoundError(f"EAGLE-3 head path {root} does not exist")
    if not root.is_dir():
        raise CheckpointError(f"EAGLE-3 head path {root} is a file; pass the head's directory")
    raw = _read_config(root)
    _parse_config(raw, str(root / "config.json"))  # config errors before any weight is read
    has_safetensors = (root / "model.safetensors").is_file() or (root / "model.safetensors.index.json").is_file()
    if not has_safetensors and _pickled_weights(root):
        raise CheckpointError(
            f"{root} holds pickled PyTorch weights ({', '.join(_pickled_weights(root))}); specdec loads EAGLE-3 heads "
            f"from safetensors only: run `specdec convert eagle3 {root} OUT_DIR` and load OUT_DIR")
    tensors = _read_tensors(_weight_files(root))
    return _normalise(raw, tensors, str(root))


def check_against_target(cfg: Eagle3Config, target_config) -> None:
    """Raise ValueError when the head cannot draft for the target (a ``ModelConfig``).

    Checks the vocabulary (V), the width of the captured states (target_hidden_size), the
    embedding width when the head borrows the target's embedding, and the aux layers.
    """
    V, Ht = target_config.vocab_size, target_config.hidden_size
    L = getattr(target_config, "num_layers", None) or target_config.num_hidden_layers
    if cfg.vocab_size != V:
        raise ValueError(f"the EAGLE-3 head was trained for a vocabulary of {cfg.vocab_size} tokens but the "
                         f"target has {V}: the head belongs to another target model")
    if cfg.target_hidden_size != Ht:
        raise ValueError(f"the EAGLE-3 head reads target hidden states of width {cfg.target_hidden_size} "
                         f"(target_hidden_size) but the target's hidden_size is {Ht}: the head belongs to "
                         f"another target model")
    if not cfg.has_embed_tokens and cfg.hidden_size != Ht:
        raise ValueError(f"the EAGLE-3 head has no embed_tokens and its hidden_size {cfg.hidden_size} differs "
                         f"from the target's {Ht}, so the target's embedding cannot be shared")
    cfg.aux_layers(L)


def normalised_config(cfg: Eagle3Config, torch_dtype: str | None = None) -> dict:
    """The config.json of specdec's normalised layout: SpecForge-style flat keys, every flag
    explicit under Eagle3Config's names, aux ids as a top-level HF hidden_states index (or null)."""
    d = asdict(cfg)
    d.pop("has_embed_tokens")  # the tensors say it
    ids = d.pop("aux_layer_ids")
    out = {
        "architectures": ["LlamaForCausalLMEagle3"],
        "model_type": cfg.draft_arch,
        "num_hidden_layers": 1,
        "hidden_act": "silu",
        "tie_word_embeddings": False,
        **d,
        "eagle_aux_hidden_state_layer_ids": list(ids) if ids is not None else None,
    }
    if torch_dtype is not None:
        out["torch_dtype"] = torch_dtype
    return out
