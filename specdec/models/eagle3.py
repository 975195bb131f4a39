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
from .eagle3_dialects import (
    DRAFT_ARCHS,
    EAGLE3_ARCHITECTURES,
    LLAMA3_ROPE_KEYS,
    check_tensors,
    is_eagle3_config,
    parse_config,
    read_config,
    resolve,
)
from .loader import CheckpointError, _read_tensors, _weight_files

__all__ = ["EAGLE3_ARCHITECTURES", "Eagle3Config", "check_against_target", "is_eagle3_dir", "load_eagle3", "normalise",
           "normalised_config"]


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
                                              or set(self.rope_scaling) != {"rope_type", *LLAMA3_ROPE_KEYS}):
            raise ConfigError(f"EAGLE-3 head: rope_scaling must be None or a llama3 dict with keys "
                              f"{LLAMA3_ROPE_KEYS}, got {self.rope_scaling!r}")
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
    return isinstance(raw, dict) and is_eagle3_config(raw)


def normalise(raw: dict, tensors: dict[str, torch.Tensor], source: str) -> tuple[Eagle3Config, dict]:
    """(config, normalised tensors) of a dialect's config.json and raw state dict (names as on disk)."""
    fields, tensors = resolve(raw, tensors, source)
    cfg = Eagle3Config(**fields)
    return cfg, check_tensors(fields, tensors, source)


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
    raw = read_config(root)
    parse_config(raw, str(root / "config.json"))  # config errors before any weight is read
    has_safetensors = (root / "model.safetensors").is_file() or (root / "model.safetensors.index.json").is_file()
    if not has_safetensors and _pickled_weights(root):
        raise CheckpointError(
            f"{root} holds pickled PyTorch weights ({', '.join(_pickled_weights(root))}); specdec loads EAGLE-3 heads "
            f"from safetensors only: run `specdec convert eagle3 {root} OUT_DIR` and load OUT_DIR")
    tensors = _read_tensors(_weight_files(root))
    return normalise(raw, tensors, str(root))


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
