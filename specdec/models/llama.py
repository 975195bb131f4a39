"""The llama-family model (llama, mistral, qwen2, qwen3): RMSNorm, RoPE, GQA attention, SwiGLU.

Qwen3 adds an RMSNorm over each query and key head before RoPE (``q_norm``, ``k_norm``);
the cached forward folds it into the rotary launch. Gemma 2/3 switch on, from the config:
scaled embeddings, (1 + w) norm gains, norms after each sublayer, GeGLU, soft-capped
attention scores and logits, per-layer sliding windows and (Gemma 3) q/k norms and a
local RoPE base for the sliding-window layers.

Parameter names follow transformers' ``LlamaForCausalLM`` so a safetensors checkpoint
loads by name. Two forwards:

* ``model(input_ids)`` — ``[B, T]`` -> logits ``[B, T, V]``, no cache, causal. The plain
  reference, matched against transformers in the tests.
* ``model.forward_cached(batch, cache, ops)`` — a ragged batch of new tokens (prefill,
  decode, chain or tree verification alike) that writes its K/V into the paged cache and
  attends through it, returning logits only for the rows asked for.

The cached forward is the hot path and launches few kernels: q, k and v are one GEMM
(and gate and up another) over weights fused at load time (``fuse_projections``; the
separate projections stay as views of the fused tensors), and the backend's fused ops
do residual-add + RMSNorm, RoPE on q and k, and SiLU-times-up in one launch each.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, cast

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig

if TYPE_CHECKING:
    from ..batch import ForwardBatch


class RMSNorm(nn.Module):
    """y = x / sqrt(mean(x^2) + eps) * w; Gemma's (``offset`` 1) scales by (1 + w)."""

    def __init__(self, dim: int, eps: float, offset: float = 0.0):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps
        self.offset = offset

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # statistics in fp32 as transformers does; llama rounds before the gain, Gemma after
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.offset:
            return (x * (self.offset + self.weight.float())).to(dtype)
        return self.weight * x.to(dtype)

    def gain(self) -> torch.Tensor:
        """The effective gain [dim] (offset + w) the fused kernels take, in w's dtype;
        cached by ``fuse_projections`` (weights are frozen after loading)."""
        cached = getattr(self, "_gain", None)
        if cached is not None:
            return cached
        return self.weight if not self.offset else self.weight + self.offset

    def cache_gain(self) -> None:
        self._gain = self.weight.detach() + self.offset if self.offset else None


class SoftCappedLinear(nn.Linear):
    """A linear layer whose outputs are soft-capped: cap * tanh(y / cap) (Gemma's logits)."""

    def __init__(self, in_features: int, out_features: int, cap: float):
        super().__init__(in_features, out_features, bias=False)
        self.cap = cap

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(super().forward(x) / self.cap) * self.cap


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class Rotary(nn.Module):
    """RoPE on the two halves of each head (transformers' layout)."""

    inv_freq: torch.Tensor  # [D / 2] float32 buffer

    def __init__(self, cfg: ModelConfig, local: bool = False):
        super().__init__()
        inv_freq = cfg.rope_local_inv_freq() if local else cfg.rope_inv_freq()
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype):
        # positions: [...]; returns cos, sin: [..., D] (the half-frequencies repeated)
        freqs = positions.float()[..., None] * self.inv_freq.float()
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x: [..., T, heads, D]; cos/sin: [..., T, D]
    return x * cos.unsqueeze(-2) + rotate_half(x) * sin.unsqueeze(-2)


def causal_mask(T: int, window: int | None, device) -> torch.Tensor | None:
    """[T, T] bool, True where query i may see key j: j <= i, and i - j < window when a
    sliding window is set; None for plain causal (SDPA's is_causal)."""
    if window is None:
        return None
    return window_mask(T, window, device)


def window_mask(T: int, window: int, device) -> torch.Tensor:
    """[T, T] bool, True where j <= i and i - j < window (``window`` >= T: plain causal)."""
    i = torch.arange(T, device=device)
    diff = i[:, None] - i[None, :]
    return (diff >= 0) & (diff < window)


class Attention(nn.Module):
    qkv_weight: torch.Tensor  # buffers made by fuse_projections
    qkv_bias: torch.Tensor | None

    def __init__(self, cfg: ModelConfig, layer: int = 0):
        super().__init__()
        # a sliding-window layer sees the last `sliding_window` positions (itself included)
        sliding = bool(cfg.sliding_layers) and cfg.sliding_layers[layer]
        self.sliding_window = cfg.sliding_window if sliding else None
        self.softcap = cfg.attn_softcap  # attention logit soft-capping (Gemma 2)
        self.local_rope = sliding and cfg.rope_local_theta is not None  # Gemma 3's local base
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        h, d = cfg.hidden_size, cfg.head_dim
        self.q_proj = nn.Linear(h, self.num_heads * d, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(h, self.num_kv_heads * d, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(h, self.num_kv_heads * d, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(self.num_heads * d, h, bias=cfg.o_bias)
        # Qwen3 / Gemma 3: RMSNorm over each head of q and k (weights [D]) before RoPE
        self.q_norm = RMSNorm(d, cfg.rms_norm_eps, cfg.norm_offset) if cfg.qk_norm else None
        self.k_norm = RMSNorm(d, cfg.rms_norm_eps, cfg.norm_offset) if cfg.qk_norm else None
        self.scale = cfg.attn_scale if cfg.attn_scale is not None else d**-0.5

    def _qkv(self, x, cos, sin):
        shape = x.shape[:-1]
        q = self.q_proj(x).view(*shape, self.num_heads, self.head_dim)
        k = self.k_proj(x).view(*shape, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).view(*shape, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None and self.k_norm is not None:  # both or neither (cfg.qk_norm)
            q, k = self.q_norm(q), self.k_norm(k)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

    def forward(self, x, cos, sin):
        # x: [B, T, hidden] -> causal attention without a cache
        B, T, _ = x.shape
        q, k, v = self._qkv(x, cos, sin)  # [B, T, heads, D]
        group = self.num_heads // self.num_kv_heads
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # [B, heads, T, D]
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        mask = causal_mask(T, self.sliding_window, x.device)
        if self.softcap is not None:  # scores cap * tanh(s / cap), then the mask (Gemma 2)
            scores = torch.tanh(q @ k.transpose(-1, -2) * self.scale / self.softcap) * self.softcap
            keep = mask if mask is not None else window_mask(T, T, x.device)
            out = torch.softmax(scores.masked_fill(~keep, float("-inf")), dim=-1, dtype=torch.float32).to(q.dtype) @ v
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, scale=self.scale)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, -1))

    def fuse_projections(self) -> None:
        """One [(H + 2 H_kv) D, hidden] weight (and bias) for q, k and v; the three
        projections keep their parameters as views of it."""
        _fuse(self, "qkv", (self.q_proj, self.k_proj, self.v_proj))

    def forward_cached(self, x, inv_freq, batch: ForwardBatch, k_cache, v_cache, ops):
        # x: [T, hidden] ragged new tokens -> write K/V to the cache, attend through it
        T, H, H_kv, D = x.shape[0], self.num_heads, self.num_kv_heads, self.head_dim
        qkv = F.linear(x, self.qkv_weight, self.qkv_bias)  # [T, (H + 2 H_kv) D]
        q, k, v = qkv.split([H * D, H_kv * D, H_kv * D], dim=-1)
        norm = {} if self.q_norm is None or self.k_norm is None else dict(
            q_norm_weight=self.q_norm.gain(), k_norm_weight=self.k_norm.gain(), norm_eps=self.q_norm.eps)
        q, k = ops.rotary(q.view(T, H, D), k.view(T, H_kv, D), batch.positions, inv_freq, **norm)
        v = v.view(T, H_kv, D)
        ops.write_kv(k, v, k_cache, v_cache, batch.slot_mapping)
        out = ops.verify_attention(
            q, k_cache, v_cache, batch.block_table, batch.seq_lens, batch.q_start,
            batch.tree_mask, self.scale, max_query_len=batch.max_query_len,
            max_seq_len=batch.max_seq_len, **self._window_args(),
        )
        return self.o_proj(out.reshape(T, -1))

    def _window_args(self) -> dict:
        """verify_attention's sliding_window / softcap keywords, passed only when set."""
        args: dict[str, float] = {}
        if self.sliding_window is not None:
            args["sliding_window"] = self.sliding_window
        if self.softcap is not None:
            args["softcap"] = self.softcap
        return args


class MLP(nn.Module):
    """SwiGLU (silu) or GeGLU (gelu-tanh, Gemma): down(act(gate(x)) * up(x))."""

    gate_up_weight: torch.Tensor  # buffers made by fuse_projections
    gate_up_bias: torch.Tensor | None

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        h, i, b = cfg.hidden_size, cfg.intermediate_size, cfg.mlp_bias
        self.gate_proj = nn.Linear(h, i, bias=b)
        self.up_proj = nn.Linear(h, i, bias=b)
        self.down_proj = nn.Linear(i, h, bias=b)
        self.gelu = cfg.hidden_act == "gelu_tanh"

    def act(self, gate: torch.Tensor) -> torch.Tensor:
        return F.gelu(gate, approximate="tanh") if self.gelu else F.silu(gate)

    def forward(self, x):
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))

    def fuse_projections(self) -> None:
        """One [2 I, hidden] weight for gate and up (views of it stay as their parameters)."""
        _fuse(self, "gate_up", (self.gate_proj, self.up_proj))

    def forward_cached(self, x, ops):
        gate_up = F.linear(x, self.gate_up_weight, self.gate_up_bias)  # [T, 2 I]
        if self.gelu:  # GeGLU (Gemma)
            return self.down_proj(ops.silu_mul(gate_up, activation="gelu_tanh"))
        return self.down_proj(ops.silu_mul(gate_up))


def _fuse(module: nn.Module, name: str, linears: tuple[nn.Linear, ...]) -> None:
    """Concatenate ``linears``' weights (and biases) into buffers ``{name}_weight`` /
    ``{name}_bias`` of ``module`` and make each linear's parameters views of them."""
    for part in ("weight", "bias"):
        tensors = [getattr(lin, part) for lin in linears]
        if tensors[0] is None:
            module.register_buffer(f"{name}_{part}", None, persistent=False)
            continue
        fused = torch.cat([t.detach() for t in tensors])
        module.register_buffer(f"{name}_{part}", fused, persistent=False)
        start = 0
        for lin, t in zip(linears, tensors, strict=True):
            setattr(lin, part, nn.Parameter(fused[start:start + t.shape[0]], requires_grad=False))
            start += t.shape[0]


class DecoderLayer(nn.Module):
    """Pre-norm (llama): x + attn(norm(x)), then x + mlp(norm(x)). Gemma's sandwich adds
    a norm after each sublayer: ``post_attention_layernorm`` then normalises the attention
    output and ``pre_feedforward_layernorm`` / ``post_feedforward_layernorm`` wrap the MLP."""

    def __init__(self, cfg: ModelConfig, layer: int = 0):
        super().__init__()
        norm = lambda: RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg.norm_offset)  # noqa: E731
        self.input_layernorm = norm()
        self.self_attn = Attention(cfg, layer)
        self.post_attention_layernorm = norm()
        self.mlp = MLP(cfg)
        self.sandwich = cfg.sandwich_norms
        if self.sandwich:
            self.pre_feedforward_layernorm = norm()
            self.post_feedforward_layernorm = norm()

    def forward(self, x, attend):
        if self.sandwich:
            x = x + self.post_attention_layernorm(attend(self.input_layernorm(x)))
            return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))
        x = x + attend(self.input_layernorm(x))
        return x + self.mlp(self.post_attention_layernorm(x))


class Backbone(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg.norm_offset)
        self.rotary = Rotary(cfg)
        # Gemma 3's sliding-window layers rotate with a base of their own
        self.rotary_local = Rotary(cfg, local=True) if cfg.rope_local_theta is not None else None
        self.embed_scale = cfg.hidden_size**0.5 if cfg.embed_scale else None

    def decoder_layers(self, n: int | None = None) -> list[DecoderLayer]:
        """The first ``n`` decoder layers (default all), typed as what they are."""
        return cast("list[DecoderLayer]", list(self.layers)[:n])

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """Token embeddings; Gemma's times sqrt(hidden), the factor rounded to their dtype."""
        x = self.embed_tokens(ids)
        if self.embed_scale is not None:
            x = x * torch.tensor(self.embed_scale, dtype=x.dtype)
        return x


class LlamaForCausalLM(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.model = Backbone(cfg)
        self.lm_head: nn.Linear
        if cfg.final_softcap:  # Gemma: logits cap * tanh(logits / cap)
            self.lm_head = SoftCappedLinear(cfg.hidden_size, cfg.vocab_size, cfg.final_softcap)
        else:
            self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    @property
    def num_layers(self) -> int:
        return len(self.model.layers)

    @torch.no_grad()
    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """input_ids: [B, T] int64 -> logits [B, T, V] float32, causal, no cache."""
        B, T = input_ids.shape
        x = self.model.embed(input_ids)  # [B, T, hidden]
        pos = torch.arange(T, device=input_ids.device).expand(B, T)
        cos, sin = self.model.rotary.cos_sin(pos, x.dtype)
        local = self.model.rotary_local.cos_sin(pos, x.dtype) if self.model.rotary_local is not None else None
        for layer in self.model.decoder_layers():
            c, s = local if layer.self_attn.local_rope and local is not None else (cos, sin)
            x = layer(x, lambda h, a=layer.self_attn, c=c, s=s: a(h, c, s))
        return self.lm_head(self.model.norm(x)).float()

    def attention_kinds(self) -> tuple[tuple[int | None, float | None], ...]:
        """The distinct (sliding_window, softcap) pairs of the layers' attention."""
        kinds = {(layer.self_attn.sliding_window, layer.self_attn.softcap) for layer in self.model.decoder_layers()}
        return tuple(sorted(kinds, key=lambda k: (k[0] or 0, k[1] or 0.0)))

    def fuse_projections(self) -> None:
        """Fuse q/k/v and gate/up weights for the cached forward (``load_model`` does it)."""
        for layer in self.model.decoder_layers():
            layer.self_attn.fuse_projections()
            layer.mlp.fuse_projections()
        for module in self.modules():
            if isinstance(module, RMSNorm):
                module.cache_gain()

    @torch.no_grad()
    def forward_cached(self, batch: ForwardBatch, cache, ops, num_layers: int | None = None,
                       capture: tuple[int, ...] | None = None):
        """Ragged forward through the paged cache.

        batch:      ForwardBatch (tokens [T], positions [T], cache metadata)
        cache:      KVCache with at least ``num_layers`` layers
        ops:        kernel backend (``specdec.kernels.get_backend``)
        num_layers: run only the first N layers, then the final norm and LM head
                    (the early-exit drafter); default all
        returns:    logits [R, V] in the model's dtype (bf16 / fp16 / fp32) for
                    ``batch.logits_rows`` (all T rows if None): the samplers read them
                    as they are and upcast in registers (the torch reference upcasts
                    itself), so no fp32 copy of the logits is made

        capture:    ascending HF hidden_states indices (0 = the embeddings, k = the input
                    of decoder layer k, the un-normalised residual stream): then returns
                    ``(logits, hidden)``, hidden [T, len(capture) * hidden] in the model's
                    dtype for EVERY token row (EAGLE-3 features); None: logits only

        Needs ``fuse_projections()`` first (``load_model`` calls it).
        """
        n = self.num_layers if num_layers is None else num_layers
        wanted = tuple(capture or ())
        captured: list[torch.Tensor] | None = [] if wanted else None
        inv_freq = self.model.rotary.inv_freq
        local = self.model.rotary_local
        h, residual = self.model.embed(batch.tokens), None  # [T, hidden]
        for i, layer in enumerate(self.model.decoder_layers(n)):
            k_cache, v_cache = cache.layer(i)
            attn, post_attn = layer.self_attn, layer.post_attention_layernorm
            x, residual = ops.add_rms_norm(h, residual, layer.input_layernorm.gain(), layer.input_layernorm.eps)
            if captured is not None and i in wanted:  # the stream entering layer i (h + residual)
                captured += [residual] * wanted.count(i)
            freqs = local.inv_freq if attn.local_rope and local is not None else inv_freq
            h = attn.forward_cached(x, freqs, batch, k_cache, v_cache, ops)
            if layer.sandwich:  # Gemma: norm the sublayer outputs before they join the residual
                h, _ = ops.add_rms_norm(h, None, post_attn.gain(), post_attn.eps)
                pre_ff, post_ff = layer.pre_feedforward_layernorm, layer.post_feedforward_layernorm
                x, residual = ops.add_rms_norm(h, residual, pre_ff.gain(), pre_ff.eps)
                h, _ = ops.add_rms_norm(layer.mlp.forward_cached(x, ops), None, post_ff.gain(), post_ff.eps)
            else:
                x, residual = ops.add_rms_norm(h, residual, post_attn.gain(), post_attn.eps)
                h = layer.mlp.forward_cached(x, ops)
        if captured is not None and n in wanted:  # the stream after the last layer run
            captured += [h + residual if residual is not None else h] * wanted.count(n)
        if batch.logits_rows is not None:
            h = h[batch.logits_rows]  # [R, hidden]
            residual = residual[batch.logits_rows] if residual is not None else None
        x, _ = ops.add_rms_norm(h, residual, self.model.norm.gain(), self.model.norm.eps)
        if captured is None:
            return self.lm_head(x)
        if len(captured) != len(wanted):
            raise ValueError(f"capture={wanted} names hidden-state indices outside [0, {n}]")
        return self.lm_head(x), torch.cat(captured, dim=-1)
