"""The EAGLE-3 draft head: one decoder layer over [embedding ; feature], with a paged KV
cache of its own (one layer) that shares the target's block tables and slots.

Per new token (pair of a feature u [H] and a token y, at position p), in the model's dtype
with fp32 norm statistics (the backend's ops, as models/llama.py's cached forward)::

    x      = [RMSNorm(E[y]; w_in) ; RMSNorm(u; w_hidden)]                 [2H]
    q,k,v  = W_q x, W_k x, W_v x;  q,k = RoPE(p) (the head's own theta / scaling)
    o      = attention over the head's cache (causal or tree mask)
    h1     = r + W_o o,            r = u (norm_before_residual: RMSNorm(u; w_hidden))
    a      = h1 + MLP(RMSNorm(h1; w_post))
    logits = W_lm RMSNorm(a; w_norm)   -> [Vd], scattered to target ids t = d + d2t[d]

``a`` (``feed_normed_hidden``: its normed value) is the next draft step's u; the target
features g [C * Ht] enter through ``u = fc(g)`` (``Eagle3Head.fc``).
"""

from __future__ import annotations

from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import nn

from ..batch import ForwardBatch
from ..models.eagle3 import Eagle3Config


class Eagle3Head(nn.Module):
    """The head's weights (normalised names, see the EAGLE-3 contract) and its cached forward.

    cfg:     Eagle3Config
    tensors: the normalised state dict (``load_eagle3``)
    embed:   [V, H] the target's embedding table, used when the head has none
    """

    def __init__(self, cfg: Eagle3Config, tensors: dict[str, torch.Tensor], embed: torch.Tensor | None,
                 device=None, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.cfg = cfg
        get = lambda name: tensors[name].to(device=device, dtype=dtype)  # noqa: E731
        opt = lambda name: get(name) if name in tensors else None  # noqa: E731
        if cfg.has_embed_tokens:
            self.embed = get("embed_tokens.weight")
        elif embed is None:
            raise ValueError("the EAGLE-3 head has no embed_tokens.weight: pass the target's embedding table")
        else:
            self.embed = embed
        p = "midlayer."
        self.fc_weight, self.fc_bias = get("fc.weight"), opt("fc.bias")
        self.input_norm = opt("input_norm.weight")  # norm_before_fc: one norm over the concat
        self.fc_norms = [get(f"fc_norm.{i}.weight") for i in range(self.fc_weight.shape[1] // cfg.target_hidden_size)
                         ] if cfg.fc_norm else None
        self.w_in, self.w_hidden = get(p + "input_layernorm.weight"), get(p + "hidden_norm.weight")
        self.w_post, self.w_norm = get(p + "post_attention_layernorm.weight"), get("norm.weight")
        a = p + "self_attn."
        self.qkv_weight = torch.cat([get(a + "q_proj.weight"), get(a + "k_proj.weight"), get(a + "v_proj.weight")])
        self.o_weight = get(a + "o_proj.weight")
        self.q_norm, self.k_norm = opt(a + "q_norm.weight"), opt(a + "k_norm.weight")
        m = p + "mlp."
        self.gate_up_weight = torch.cat([get(m + "gate_proj.weight"), get(m + "up_proj.weight")])
        self.down_weight = get(m + "down_proj.weight")
        self.lm_head = get("lm_head.weight")  # [Vd, H]
        d2t = tensors["d2t"].to(device=device, dtype=torch.int64)
        self.target_ids = torch.arange(cfg.draft_vocab_size, device=device) + d2t  # [Vd] draft id -> target id
        self.inv_freq = cfg.rope_inv_freq().to(device)  # the head's own theta / llama3 scaling
        self.scale = cfg.head_dim ** -0.5
        self.dtype = dtype

    # ------------------------------------------------------------------ pieces
    def fc(self, g: torch.Tensor, ops) -> torch.Tensor:
        """Target features g [T, C * Ht] -> u [T, H] (with the optional input norms)."""
        eps = self.cfg.rms_norm_eps
        if self.input_norm is not None:  # first one norm over the concat, then the per-chunk norms
            g, _ = ops.add_rms_norm(g.contiguous(), None, self.input_norm, eps)
        if self.fc_norms is not None:
            chunks = g.split(self.cfg.target_hidden_size, dim=-1)
            g = torch.cat([ops.add_rms_norm(c.contiguous(), None, w, eps)[0]
                           for c, w in zip(chunks, self.fc_norms, strict=True)], dim=-1)
        return F.linear(g, self.fc_weight, self.fc_bias)

    def full_logits(self, draft_logits: torch.Tensor) -> torch.Tensor:
        """[T, Vd] -> [T, V]: each draft id's logit at its target id, -inf elsewhere."""
        out = draft_logits.new_full((draft_logits.shape[0], self.cfg.vocab_size), float("-inf"))
        out[:, self.target_ids] = draft_logits
        return out

    # ------------------------------------------------------------------ the cached forward
    @torch.no_grad()
    def forward_cached(self, u: torch.Tensor, batch: ForwardBatch, cache, ops) -> tuple[torch.Tensor, torch.Tensor]:
        """One draft-layer pass over a ragged batch of (u, token) pairs.

        u:       [T, H] the feature of each pair (fc(g) of the target, or a previous output)
        batch:   ForwardBatch of the pairs' tokens (positions, head-cache slots, masks)
        cache:   the head's KVCache (one layer)
        returns: logits [R, V] over the target vocabulary (-inf outside the draft one) for
                 ``batch.logits_rows`` (all rows if None), and the next u [T, H] of every row
        """
        cfg = self.cfg
        eps = cfg.rms_norm_eps
        T, H, H_kv, D = u.shape[0], cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        u = u.to(self.dtype).contiguous()
        e, _ = ops.add_rms_norm(F.embedding(batch.tokens, self.embed), None, self.w_in, eps)
        un, _ = ops.add_rms_norm(u, None, self.w_hidden, eps)
        x = torch.cat([e, un], dim=-1)  # [T, 2H], embedding first
        q, k, v = F.linear(x, self.qkv_weight).split([H * D, H_kv * D, H_kv * D], dim=-1)
        norm = {} if self.q_norm is None else dict(q_norm_weight=self.q_norm, k_norm_weight=self.k_norm,
                                                   norm_eps=eps)
        q, k = ops.rotary(q.view(T, H, D), k.view(T, H_kv, D), batch.positions, self.inv_freq, **norm)
        k_cache, v_cache = cache.layer(0)
        ops.write_kv(k, v.reshape(T, H_kv, D), k_cache, v_cache, batch.slot_mapping)
        o = ops.verify_attention(q, k_cache, v_cache, batch.block_table, batch.seq_lens, batch.q_start,
                                 batch.tree_mask, self.scale, max_query_len=batch.max_query_len,
                                 max_seq_len=batch.max_seq_len)
        h1 = (un if cfg.norm_before_residual else u) + F.linear(o.reshape(T, -1), self.o_weight)
        z, h1 = ops.add_rms_norm(h1, None, self.w_post, eps)
        a = h1 + F.linear(ops.silu_mul(F.linear(z, self.gate_up_weight)), self.down_weight)  # [T, H]
        rows = a if batch.logits_rows is None else a[batch.logits_rows]
        normed = ops.add_rms_norm(rows, None, self.w_norm, eps)[0] if cfg.apply_final_norm else rows
        logits = self.full_logits(F.linear(normed, self.lm_head))
        if cfg.feed_normed_hidden:
            a = ops.add_rms_norm(a, None, self.w_norm, eps)[0]
        return logits, a


class HeadWarmUp:
    """The head as warm-up (specdec/warmup.py) compiles a model's kernels: its attention
    shape (``config.num_heads``, ``attention_kinds``: causal, no window, no cap) and one
    cached forward of a (zero feature, token) pair with fc applied to zero features."""

    def __init__(self, head: Eagle3Head):
        self.head = head
        self.config = SimpleNamespace(num_heads=head.cfg.num_attention_heads)

    def attention_kinds(self) -> tuple[tuple[None, None], ...]:
        return ((None, None),)

    def forward_cached(self, batch: ForwardBatch, cache, ops, num_layers=None) -> torch.Tensor:
        cfg, dev = self.head.cfg, batch.tokens.device
        g = torch.zeros(batch.tokens.shape[0], cfg.num_aux_layers * cfg.target_hidden_size, dtype=self.head.dtype,
                        device=dev)
        return self.head.forward_cached(self.head.fc(g, ops), batch, cache, ops)[0]
