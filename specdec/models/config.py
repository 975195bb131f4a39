"""ModelConfig: the part of an HF ``config.json`` a llama-family runner needs."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM",
                           "Qwen3ForCausalLM", "Gemma2ForCausalLM", "Gemma3ForCausalLM")
GEMMA = ("Gemma2ForCausalLM", "Gemma3ForCausalLM")
SUPPORTED_ROPE_TYPES = ("default", "llama3", "linear")


class ConfigError(ValueError):
    """A config.json that specdec cannot run, with the reason and the file."""


@dataclass(frozen=True)
class ModelConfig:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_type: str = "default"
    rope_scaling: dict = field(default_factory=dict)
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False  # RMSNorm over each q and k head before RoPE (Qwen3)
    # sliding-window attention: layer i attends over the last `sliding_window` positions
    # when sliding_layers[i] (mistral: every layer; Qwen2/3 with use_sliding_window: the
    # layers >= max_window_layers); None: every layer is global
    sliding_window: int | None = None
    sliding_layers: tuple[bool, ...] = ()
    # Gemma 2/3: embeddings x sqrt(hidden), RMSNorm gain (1 + w), norms before and after
    # attention and MLP, GeGLU (gelu-tanh), scale query_pre_attn_scalar^-0.5, soft-capping
    # of attention scores and final logits (Gemma 2), a RoPE base of its own for the
    # sliding-window layers (Gemma 3)
    hidden_act: str = "silu"  # "silu" or "gelu_tanh"
    embed_scale: bool = False
    norm_offset: float = 0.0
    sandwich_norms: bool = False
    attn_scale: float | None = None  # None: head_dim ** -0.5
    attn_softcap: float | None = None
    final_softcap: float | None = None
    rope_local_theta: float | None = None  # default RoPE with this base on sliding layers
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    source: str = "<dict>"

    def __post_init__(self):
        where = f" (in {self.source})"
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers",
                     "num_heads", "num_kv_heads", "head_dim", "max_position_embeddings"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}{where}")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(
                f"num_attention_heads={self.num_heads} is not a multiple of "
                f"num_key_value_heads={self.num_kv_heads}{where}"
            )
        if self.sliding_window is not None:
            if not isinstance(self.sliding_window, int) or self.sliding_window < 1:
                raise ConfigError(f"sliding_window must be a positive integer or null, got "
                                  f"{self.sliding_window!r}{where}")
            if len(self.sliding_layers) != self.num_layers:
                raise ConfigError(f"layer_types names {len(self.sliding_layers)} layers but the model has "
                                  f"{self.num_layers}{where}")
        if self.rope_type not in SUPPORTED_ROPE_TYPES:
            raise ConfigError(
                f"rope type {self.rope_type!r} is not supported{where}; "
                f"supported: {', '.join(SUPPORTED_ROPE_TYPES)}"
            )

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_file(cls, path: str | Path) -> ModelConfig:
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        raw = read_config_json(path, f"no config.json at {path}: is this a model directory?")
        return cls.from_dict(raw, source=str(path))

    @classmethod
    def from_dict(cls, raw: dict, source: str = "<dict>") -> ModelConfig:
        where = f" (in {source})"
        arch = _architecture(raw, where)

        def need(key):
            return _need(raw, key, where)

        hidden, heads = need("hidden_size"), need("num_attention_heads")
        max_pos = raw.get("max_position_embeddings", 2048)
        window, sliding_layers = _sliding_window(arch, raw, need("num_hidden_layers"), max_pos, where)
        theta, rope_type, rope, local_theta = _rope_fields(arch, raw, where)
        gemma = arch in GEMMA
        act = _activation(raw, gemma, where)
        head_dim = raw.get("head_dim") or hidden // heads
        query_scalar = raw.get("query_pre_attn_scalar") if gemma else None

        eos = raw.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, (list, tuple)) else (() if eos is None else (eos,))
        attention_bias = bool(raw.get("attention_bias", False))
        is_qwen2 = arch == "Qwen2ForCausalLM"  # q/k/v biases always, o_proj none
        return cls(
            architecture=arch,
            vocab_size=need("vocab_size"),
            hidden_size=hidden,
            intermediate_size=need("intermediate_size"),
            num_layers=need("num_hidden_layers"),
            num_heads=heads,
            num_kv_heads=raw.get("num_key_value_heads") or heads,
            head_dim=head_dim,
            rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
            rope_theta=float(theta),
            rope_type=rope_type,
            rope_scaling={k: v for k, v in rope.items() if k not in ("rope_theta", "rope_type", "type")},
            max_position_embeddings=max_pos,
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            qkv_bias=is_qwen2 or attention_bias,
            o_bias=attention_bias and not is_qwen2,
            mlp_bias=bool(raw.get("mlp_bias", False)),
            qk_norm=arch in ("Qwen3ForCausalLM", "Gemma3ForCausalLM"),
            sliding_window=window,
            sliding_layers=sliding_layers,
            hidden_act=act,
            embed_scale=gemma,
            norm_offset=1.0 if gemma else 0.0,
            sandwich_norms=gemma,
            attn_scale=float(query_scalar) ** -0.5 if query_scalar else None,
            attn_softcap=raw.get("attn_logit_softcapping") if gemma else None,
            final_softcap=raw.get("final_logit_softcapping") if gemma else None,
            rope_local_theta=float(local_theta) if local_theta is not None else None,
            bos_token_id=raw.get("bos_token_id"),
            eos_token_ids=eos_ids,
            source=source,
        )

    # ------------------------------------------------------------------ rope
    def rope_local_inv_freq(self) -> torch.Tensor:
        """Gemma 3's sliding-window layers: default RoPE with base ``rope_local_theta``."""
        if self.rope_local_theta is None:
            raise ValueError("this model has no sliding-window RoPE base (rope_local_theta is None)")
        d = self.head_dim
        return (1.0 / (self.rope_local_theta ** (torch.arange(0, d, 2, dtype=torch.float32) / d))).float()

    def rope_inv_freq(self) -> torch.Tensor:
        """Inverse frequencies [head_dim // 2] float32, with the configured scaling."""
        d = self.head_dim
        inv_freq = 1.0 / (self.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float32) / d))
        s = self.rope_scaling
        if self.rope_type == "linear":
            inv_freq = inv_freq / s["factor"]
        elif self.rope_type == "llama3":
            # Llama 3.1: keep high frequencies, divide low ones by `factor`, blend between.
            factor, lo, hi = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
            old_ctx = s["original_max_position_embeddings"]
            wavelen = 2 * math.pi / inv_freq
            scaled = torch.where(wavelen > old_ctx / lo, inv_freq / factor, inv_freq)
            smooth = (old_ctx / wavelen - lo) / (hi - lo)
            blended = (1 - smooth) * scaled / factor + smooth * scaled
            medium = (wavelen >= old_ctx / hi) & (wavelen <= old_ctx / lo)
            inv_freq = torch.where(medium, blended, scaled)
        return inv_freq.float()  # float32 throughout, as transformers computes it


def read_config_json(path: Path, missing: str) -> dict:
    """The JSON object in ``path`` (config.json, generation_config.json).

    Raises FileNotFoundError(``missing``) when there is no such file, ConfigError when it is not
    valid JSON or not a JSON object.
    """
    if not path.is_file():
        raise FileNotFoundError(missing)
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path} must hold a JSON object, got {type(raw).__name__}")
    return raw


def _need(raw: dict, key: str, where: str):
    """``raw[key]``; ConfigError naming the field when it is missing."""
    if key not in raw:
        raise ConfigError(f"config is missing required field {key!r}{where}")
    return raw[key]


def _architecture(raw: dict, where: str) -> str:
    """The supported architecture ``raw`` names (``architectures[0]``, else by ``model_type``)."""
    archs = raw.get("architectures") or []
    arch = archs[0] if archs else _ARCH_OF_MODEL_TYPE.get(raw.get("model_type", ""))
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ConfigError(
            f"unsupported architecture {arch or raw.get('model_type')!r}{where}; "
            f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    return arch


def _rope_fields(arch: str, raw: dict, where: str) -> tuple[float, str, dict, float | None]:
    """(theta, rope type, the full-attention rope dict, sliding layers' theta or None) of ``raw``."""
    # transformers >= 5 keeps theta and scaling in `rope_parameters` (per layer type for
    # Gemma 3); older files use `rope_theta` + `rope_scaling` (+ `rope_local_base_freq`).
    rope: dict[str, Any] = dict(raw.get("rope_parameters") or raw.get("rope_scaling") or {})
    local_theta = raw.get("rope_local_base_freq") if arch == "Gemma3ForCausalLM" else None
    if "full_attention" in rope or "sliding_attention" in rope:
        local = dict(rope.get("sliding_attention") or {})
        if local.get("rope_type", "default") != "default":
            raise ConfigError(f"sliding-window layers' rope type {local.get('rope_type')!r} is not "
                              f"supported{where}; supported: default")
        local_theta = local.get("rope_theta", local_theta)
        rope = dict(rope.get("full_attention") or {})
    theta: float = rope.get("rope_theta", raw.get("rope_theta", 10000.0))
    rope_type: str = rope.get("rope_type") or rope.get("type") or "default"
    return theta, rope_type, rope, local_theta


def _activation(raw: dict, gemma: bool, where: str) -> str:
    """The MLP activation, as the runner names it: ``"silu"`` or ``"gelu_tanh"``."""
    act = raw.get("hidden_activation") or raw.get("hidden_act") or ("gelu_pytorch_tanh" if gemma else "silu")
    act = {"silu": "silu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_tanh": "gelu_tanh"}.get(act)
    if act is None:
        raise ConfigError(f"activation {raw.get('hidden_activation') or raw.get('hidden_act')!r} is not "
                          f"supported{where}; supported: silu, gelu_pytorch_tanh")
    return act


def _sliding_window(arch: str, raw: dict, num_layers: int, max_pos: int, where: str):
    """(window, per-layer flags) of a config, or (None, ()) when no layer's window is
    shorter than the context (a window >= max_position_embeddings changes nothing)."""
    window = raw.get("sliding_window")
    if arch in ("Qwen2ForCausalLM", "Qwen3ForCausalLM") and not raw.get("use_sliding_window"):
        window = None  # Qwen2/3 apply their window only with use_sliding_window
    if window is None or (isinstance(window, int) and window >= max_pos):
        return None, ()
    if not isinstance(window, int) or isinstance(window, bool) or window < 1:
        raise ConfigError(f"sliding_window must be a positive integer or null, got {window!r}{where}")
    types = raw.get("layer_types")
    if types is None:
        if arch in GEMMA:  # Gemma 2: every other layer; Gemma 3: 5 local : 1 global
            every = 2 if arch == "Gemma2ForCausalLM" else raw.get("sliding_window_pattern", 6)
            types = ["sliding_attention" if (i + 1) % every else "full_attention" for i in range(num_layers)]
        elif arch in ("Qwen2ForCausalLM", "Qwen3ForCausalLM"):
            first = raw.get("max_window_layers", num_layers)
            types = ["sliding_attention" if i >= first else "full_attention" for i in range(num_layers)]
        else:
            types = ["sliding_attention"] * num_layers
    known = {"sliding_attention", "full_attention"}
    if not isinstance(types, list) or len(types) != num_layers or not set(types) <= known:
        raise ConfigError(f"layer_types must list {num_layers} of {sorted(known)}, got {types!r}{where}")
    sliding = tuple(t == "sliding_attention" for t in types)
    return (window, sliding) if any(sliding) else (None, ())


_ARCH_OF_MODEL_TYPE = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "gemma2": "Gemma2ForCausalLM",
    "gemma3_text": "Gemma3ForCausalLM",
}


@dataclass(frozen=True)
class GenerationDefaults:
    """What a checkpoint's ``generation_config.json`` sets for generation.

    eos_token_ids: ids that end generation (an int or a list in the file), or None when
                   the file gives none; ``LLM`` stops at these and at config.json's
    temperature, top_k, top_p: the model's sampling defaults, or None where the file has
                   none; ``"do_sample": false`` in the file makes the temperature 0
                   (greedy), as transformers decodes greedily then
    source:        the file read, or "<none>"

    A request's own values win over these (``SamplingParams.with_defaults``).
    """

    eos_token_ids: tuple[int, ...] | None = None
    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    source: str = "<none>"

    @classmethod
    def from_dir(cls, path: str | Path) -> GenerationDefaults:
        """Read ``path/generation_config.json``; all-None defaults when there is none."""
        file = Path(path) / "generation_config.json"
        if not file.is_file():
            return cls()
        return cls.from_dict(read_config_json(file, f"no {file}"), source=str(file))

    @classmethod
    def from_dict(cls, raw: dict, source: str = "<dict>") -> GenerationDefaults:
        from ..sampling_params import SamplingParams

        eos = raw.get("eos_token_id")
        eos_ids = None if eos is None else tuple(eos) if isinstance(eos, (list, tuple)) else (eos,)
        if eos_ids is not None and not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0
                                           for t in eos_ids):
            raise ConfigError(f"eos_token_id must be a token id or a list of them, got {eos!r} (in {source})")
        values: dict[str, Any] = {name: raw.get(name) for name in ("temperature", "top_k", "top_p")}
        if raw.get("do_sample") is False:
            values["temperature"] = 0.0
        try:
            SamplingParams(**values)  # the request ranges apply to the model's defaults too
        except ValueError as e:
            raise ConfigError(f"{source} sets a sampling default specdec cannot use: {e}") from None
        return cls(eos_token_ids=eos_ids, source=source, **values)

    def sampling(self) -> dict:
        """``temperature``, ``top_k``, ``top_p`` for ``SamplingParams.with_defaults``."""
        return {"temperature": self.temperature, "top_k": self.top_k, "top_p": self.top_p}
