"""Tiny random checkpoints of every supported family, written with transformers' save_pretrained."""

from __future__ import annotations

import pathlib
import shutil

import torch

FAMILIES = ("llama", "llama3-rope", "llama-tied", "mistral", "mistral-window", "qwen2", "qwen3",
            "qwen3-tied", "gemma2", "gemma3")
WINDOW = 6  # mistral-window's sliding window: shorter than the tests' sequences


def make_checkpoint(path: pathlib.Path, family: str = "llama", *, vocab_size: int = 97,
                    hidden_size: int = 32, num_layers: int = 3, num_heads: int = 4,
                    num_kv_heads: int = 2, intermediate_size: int = 48,
                    max_position_embeddings: int = 256, std: float = 0.3, seed: int = 0,
                    **extra) -> pathlib.Path:
    """Save a randomly initialised HF model of ``family`` to ``path``; returns ``path``.

    Every parameter (biases and norms included) is drawn from N(0, std), so biases and
    norm weights are exercised and the logits are far from uniform (greedy is stable).
    """
    from transformers import (
        Gemma2Config,
        Gemma2ForCausalLM,
        Gemma3ForCausalLM,
        Gemma3TextConfig,
        LlamaConfig,
        LlamaForCausalLM,
        MistralConfig,
        MistralForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
        Qwen3Config,
        Qwen3ForCausalLM,
    )

    common = dict(vocab_size=vocab_size, hidden_size=hidden_size, num_hidden_layers=num_layers,
                  num_attention_heads=num_heads, num_key_value_heads=num_kv_heads,
                  intermediate_size=intermediate_size, max_position_embeddings=max_position_embeddings,
                  bos_token_id=1, eos_token_id=2)
    common.update(extra)
    if family == "llama":
        model = LlamaForCausalLM(LlamaConfig(**common))
    elif family == "llama3-rope":
        rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 32}
        model = LlamaForCausalLM(LlamaConfig(rope_parameters=rope, **common))
    elif family == "llama-tied":
        model = LlamaForCausalLM(LlamaConfig(tie_word_embeddings=True, **common))
    elif family == "mistral":
        model = MistralForCausalLM(MistralConfig(sliding_window=None, **common))
    elif family == "mistral-window":
        common.setdefault("sliding_window", WINDOW)
        model = MistralForCausalLM(MistralConfig(**common))
    elif family == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**common))
    elif family in ("qwen3", "qwen3-tied"):
        # head_dim is explicit in Qwen3 (128 in every release, != hidden / heads in some)
        common.setdefault("head_dim", common["hidden_size"] // common["num_attention_heads"])
        model = Qwen3ForCausalLM(Qwen3Config(tie_word_embeddings=family == "qwen3-tied", **common))
    elif family == "gemma2":
        # alternating local/global layers; caps small enough to bite on random weights
        common.setdefault("head_dim", 16)
        common.setdefault("sliding_window", WINDOW)
        model = Gemma2ForCausalLM(Gemma2Config(attn_logit_softcapping=3.0, final_logit_softcapping=5.0,
                                               query_pre_attn_scalar=24, **common))
    elif family == "gemma3":
        # local layers (base 10^4) and a global one (base 10^6, linear scaling 8), q/k norms
        common.setdefault("head_dim", 16)
        common.setdefault("sliding_window", WINDOW)
        n = common["num_hidden_layers"]
        common.setdefault("layer_types", ["full_attention" if (i + 1) % 3 == 0 else "sliding_attention"
                                          for i in range(n)])
        rope = {"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1000000.0}}
        model = Gemma3ForCausalLM(Gemma3TextConfig(rope_parameters=rope, query_pre_attn_scalar=24,
                                                   final_logit_softcapping=5.0, **common))
    else:
        raise ValueError(f"unknown family {family!r}")
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * std)
    model.eval()
    model.save_pretrained(path)
    return pathlib.Path(path)


def perturbed_copy(src: pathlib.Path, dst: pathlib.Path, noise: float, seed: int) -> pathlib.Path:
    """``src``'s checkpoint with N(0, noise) added to every weight: a "near" draft."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    gen = torch.Generator().manual_seed(seed)
    weights = load_file(dst / "model.safetensors")
    weights = {k: w + noise * torch.randn(w.shape, generator=gen) for k, w in weights.items()}
    save_file(weights, dst / "model.safetensors", metadata={"format": "pt"})
    return pathlib.Path(dst)
