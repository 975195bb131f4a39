"""An independent plain-PyTorch EAGLE-3 head: full recompute, no cache, no backend ops.

The equations of the EAGLE-3 format notes (§2.2, §2.3), written out directly from the
normalised state dict, plus helpers to write random heads in the SpecForge layout.
``reference_chain_logits`` recomputes the whole draft sequence from scratch for every
draft step, so it has no notion of a cache, of slots, or of entries to overwrite.
"""

from __future__ import annotations

import json
import pathlib

import torch


def rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.double()
    return (w.double() * xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps))


def rope(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    """x [T, heads, D] float64 rotated by positions [T] (half-split layout)."""
    d = x.shape[-1]
    inv = 1.0 / (theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
    ang = positions.double()[:, None] * inv  # [T, D/2]
    cos, sin = torch.cat([ang.cos(), ang.cos()], -1)[:, None], torch.cat([ang.sin(), ang.sin()], -1)[:, None]
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], -1) * sin


def head_forward(t: dict, cfg: dict, embed: torch.Tensor, u: torch.Tensor, tokens: list[int],
                 positions: list[int]):
    """The draft layer over a causal sequence of pairs (u_i, tokens[i]) at positions[i].

    returns: logits [T, V] over the target vocabulary (-inf outside the draft vocabulary),
             a [T, H] (the next step's u), float64
    """
    eps, theta = cfg["rms_norm_eps"], cfg.get("rope_theta", 10000.0)
    H, heads, kv = cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"]
    D = cfg.get("head_dim") or H // heads
    T = u.shape[0]
    w = {k: v.double() for k, v in t.items() if v.is_floating_point()}
    u = u.double()
    e = (w["embed_tokens.weight"] if "embed_tokens.weight" in w else embed.double())[torch.tensor(tokens)]
    x = torch.cat([rms_norm(e, w["midlayer.input_layernorm.weight"], eps),
                   rms_norm(u, w["midlayer.hidden_norm.weight"], eps)], -1)
    p = "midlayer.self_attn."
    q = (x @ w[p + "q_proj.weight"].T).view(T, heads, D)
    k = (x @ w[p + "k_proj.weight"].T).view(T, kv, D)
    v = (x @ w[p + "v_proj.weight"].T).view(T, kv, D)
    pos = torch.tensor(positions)
    q, k = rope(q, pos, theta), rope(k, pos, theta)
    k, v = k.repeat_interleave(heads // kv, 1), v.repeat_interleave(heads // kv, 1)
    scores = torch.einsum("thd,shd->hts", q, k) / D ** 0.5
    scores = scores.masked_fill(~torch.ones(T, T, dtype=torch.bool).tril(), float("-inf"))
    o = torch.einsum("hts,shd->thd", scores.softmax(-1), v).reshape(T, -1)
    residual = rms_norm(u, w["midlayer.hidden_norm.weight"], eps) if cfg.get("norm_before_residual") else u
    h1 = residual + o @ w[p + "o_proj.weight"].T
    z = rms_norm(h1, w["midlayer.post_attention_layernorm.weight"], eps)
    m = "midlayer.mlp."
    a = h1 + (torch.nn.functional.silu(z @ w[m + "gate_proj.weight"].T) * (z @ w[m + "up_proj.weight"].T)
              ) @ w[m + "down_proj.weight"].T
    draft = rms_norm(a, w["norm.weight"], eps) @ w["lm_head.weight"].T  # [T, Vd]
    vd = draft.shape[1]
    d2t = t["d2t"] if "d2t" in t else torch.zeros(vd, dtype=torch.int64)
    full = torch.full((T, cfg["vocab_size"]), float("-inf"), dtype=torch.float64)
    full[:, torch.arange(vd) + d2t] = draft
    return full, a


def fc(t: dict, g: torch.Tensor) -> torch.Tensor:
    out = g.double() @ t["fc.weight"].double().T
    return out + t["fc.bias"].double() if "fc.bias" in t else out


def reference_chain_logits(t: dict, cfg: dict, embed: torch.Tensor, feats: torch.Tensor, tokens: list[int],
                           drafts: list[int]) -> list[torch.Tensor]:
    """Draft logits of a chain, by full recompute.

    feats:  [n, C * Ht] target features g_0..g_{n-1} of tokens[:n]
    tokens: x_0..x_n (x_n the pending token: the pairs are (g_t, x_{t+1}), t < n)
    drafts: d_1..d_j drafted after x_n
    returns: j + 1 logits [V]: of d_1 (the head after the prefix), then after each draft
    """
    n = feats.shape[0]
    us = list(fc(t, feats))
    toks, pos = list(tokens[1:n + 1]), list(range(n))
    logits, a = head_forward(t, cfg, embed, torch.stack(us), toks, pos)
    out = [logits[-1]]
    for i, d in enumerate(drafts, start=1):
        us.append(a[-1])
        toks.append(d)
        pos.append(n - 1 + i)
        logits, a = head_forward(t, cfg, embed, torch.stack(us), toks, pos)  # from scratch
        out.append(logits[-1])
    return out


def hf_hidden_states(path, tokens: list[int], layers) -> torch.Tensor:
    """[T, len(layers) * H] transformers' output_hidden_states[k] of the plain forward."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(path), torch_dtype=torch.float32)
    with torch.no_grad():
        hs = model(torch.tensor([tokens]), output_hidden_states=True).hidden_states
    return torch.cat([hs[k][0] for k in layers], -1)


def make_eagle3_head(path: pathlib.Path, *, vocab_size: int, target_hidden: int, hidden_size: int | None = None,
                     num_heads: int = 2, num_kv_heads: int = 1, intermediate_size: int = 24,
                     draft_vocab_size: int | None = None, aux_ids=None, own_embed: bool = False,
                     rope_theta: float | None = None, std: float = 0.3, seed: int = 0, **extra) -> pathlib.Path:
    """Write a random EAGLE-3 head in the SpecForge layout (config.json + model.safetensors).

    draft_vocab_size < vocab_size: a reduced vocabulary with random sorted target ids (d2t, t2d);
    aux_ids: top-level ``eagle_aux_hidden_state_layer_ids`` (HF hidden_states indices)
    """
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=g) * std  # noqa: E731
    H = hidden_size or target_hidden
    D = H // num_heads
    C = len(aux_ids) if aux_ids is not None else 3
    vd = draft_vocab_size or vocab_size
    t = {"fc.weight": rnd(H, C * target_hidden),
         "midlayer.input_layernorm.weight": 1 + rnd(H), "midlayer.hidden_norm.weight": 1 + rnd(H),
         "midlayer.self_attn.q_proj.weight": rnd(num_heads * D, 2 * H),
         "midlayer.self_attn.k_proj.weight": rnd(num_kv_heads * D, 2 * H),
         "midlayer.self_attn.v_proj.weight": rnd(num_kv_heads * D, 2 * H),
         "midlayer.self_attn.o_proj.weight": rnd(H, num_heads * D),
         "midlayer.post_attention_layernorm.weight": 1 + rnd(H),
         "midlayer.mlp.gate_proj.weight": rnd(intermediate_size, H),
         "midlayer.mlp.up_proj.weight": rnd(intermediate_size, H),
         "midlayer.mlp.down_proj.weight": rnd(H, intermediate_size),
         "norm.weight": 1 + rnd(H), "lm_head.weight": rnd(vd, H) * 3}
    if own_embed:
        t["embed_tokens.weight"] = rnd(vocab_size, H)
    if vd < vocab_size:
        ids = torch.randperm(vocab_size, generator=g)[:vd].sort().values
        t["d2t"] = ids - torch.arange(vd)
        t["t2d"] = torch.zeros(vocab_size, dtype=torch.bool)
        t["t2d"][ids] = True
    cfg = {"architectures": ["LlamaForCausalLMEagle3"], "model_type": "llama", "hidden_size": H,
           "intermediate_size": intermediate_size, "num_attention_heads": num_heads,
           "num_key_value_heads": num_kv_heads, "num_hidden_layers": 1, "rms_norm_eps": 1e-6,
           "vocab_size": vocab_size, "draft_vocab_size": vd, "max_position_embeddings": 16,
           "tie_word_embeddings": False, "head_dim": D, **extra}
    if rope_theta is not None:
        cfg["rope_theta"] = rope_theta
    if target_hidden != H:
        cfg["target_hidden_size"] = target_hidden
    if aux_ids is not None:
        cfg["eagle_aux_hidden_state_layer_ids"] = list(aux_ids)
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(cfg))
    save_file({k: v.contiguous() for k, v in t.items()}, path / "model.safetensors")
    return path


def load_tensors(path) -> tuple[dict, dict]:
    from safetensors.torch import load_file

    path = pathlib.Path(path)
    return load_file(path / "model.safetensors"), json.loads((path / "config.json").read_text())
