"""Train an EAGLE-3 draft head for the embedded demo target, on CPU.

The head (one decoder layer, see docs: EAGLE-3 §2.2) reads the target's own hidden
states: the un-normalised residual streams entering three target layers (HF
``hidden_states`` indices, default {2, L//2, L-3}), concatenated and projected by ``fc``.
Per draft step, with u the projected features (first step) or the head's previous
pre-norm output (later steps) and e the target's embedding of the next token:

    x = [RMSNorm(e; input_layernorm) ; RMSNorm(u; hidden_norm)]          # [2H], embedding first
    h = u + o_proj(attn(q_proj x, k_proj x, v_proj x))                   # RoPE at the step's position
    a = h + mlp(RMSNorm(h; post_attention_layernorm))                    # fed to the next step
    logits = lm_head(RMSNorm(a; norm))                                   # [Vd], here Vd = V

Training-time test (§2.4): every position t of a window is an anchor. Step 0 pairs
(fc(g_t), x_{t+1}) at position t, attending the anchors <= t causally. Step s > 0 pairs
the head's own step-(s-1) output at t with x_{t+s+1} at position t + s and attends the
step-0 keys <= t plus its own chain's keys (steps 1..s at t). Step s is trained with
weight 0.8^s on the soft cross-entropy against the target's distribution for x_{t+s+2}.

Data and tokens are those of ``scripts/train_demo_pair.py`` (the Python standard
library's sources, the demo target's own tokenizer, the same 98 % training split).

    python scripts/train_eagle3.py --out A --steps 4800 --lr 3e-3 --warmup 50 --ttt-steps 4 --threads 2
    python scripts/train_eagle3.py --out B --resume A --seed 1 --steps 2000 --lr 1e-3 --warmup 10 --ttt-steps 4 \
        --threads 2
    python scripts/train_eagle3.py --eval specdec/demo/eagle3 --target specdec/demo/target --draft specdec/demo/draft

writes ``OUT/config.json`` (SpecForge layout, ``LlamaForCausalLMEagle3``),
``OUT/model.safetensors`` (bfloat16) and ``OUT/training.json``. ``--eval`` (and the end
of training) measures the mean accepted length with a plain PyTorch greedy chain (k draft
tokens per target forward, full recompute, no engine) on the demo snippets x 64 tokens,
then through the engine on ``--heldout-prompts`` prompts from the held-out split, per
target forward and per draft step, beside ``--draft`` when given.
"""

from __future__ import annotations

import argparse
import json
import math
import pathlib
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from specdec.models import load_model  # noqa: E402  (after the sys.path set-up above)
from specdec.models.llama import RMSNorm, apply_rope  # noqa: E402

TTT_DECAY = 0.8  # loss weight of unrolled step s: 0.8^s


# ---------------------------------------------------------------------------- the head


class Eagle3Head(nn.Module):
    """One EAGLE-3 draft layer with fc, final norm and lm_head; the target's embedding is
    passed in (frozen, not part of the head). Parameter names are the checkpoint's."""

    def __init__(self, *, hidden: int, intermediate: int, heads: int, kv_heads: int, head_dim: int,
                 vocab: int, draft_vocab: int, num_aux: int, target_hidden: int, eps: float, rope_theta: float):
        super().__init__()
        self.hidden, self.heads, self.kv_heads, self.head_dim = hidden, heads, kv_heads, head_dim
        self.vocab = vocab
        self.fc = nn.Linear(num_aux * target_hidden, hidden, bias=False)
        self.midlayer = nn.Module()
        m = self.midlayer
        m.input_layernorm = RMSNorm(hidden, eps)
        m.hidden_norm = RMSNorm(hidden, eps)
        m.self_attn = nn.Module()
        m.self_attn.q_proj = nn.Linear(2 * hidden, heads * head_dim, bias=False)
        m.self_attn.k_proj = nn.Linear(2 * hidden, kv_heads * head_dim, bias=False)
        m.self_attn.v_proj = nn.Linear(2 * hidden, kv_heads * head_dim, bias=False)
        m.self_attn.o_proj = nn.Linear(heads * head_dim, hidden, bias=False)
        m.post_attention_layernorm = RMSNorm(hidden, eps)
        m.mlp = nn.Module()
        m.mlp.gate_proj = nn.Linear(hidden, intermediate, bias=False)
        m.mlp.up_proj = nn.Linear(hidden, intermediate, bias=False)
        m.mlp.down_proj = nn.Linear(intermediate, hidden, bias=False)
        self.norm = RMSNorm(hidden, eps)
        self.lm_head = nn.Linear(hidden, draft_vocab, bias=False)
        inv_freq = 1.0 / rope_theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def rope(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # positions [..., T] -> cos, sin [..., T, D] (halves repeated, rotate_half layout)
        f = positions.float()[..., None] * self.inv_freq
        emb = torch.cat((f, f), dim=-1)
        return emb.cos(), emb.sin()

    def qkv(self, u: torch.Tensor, e: torch.Tensor, positions: torch.Tensor):
        """u, e: [B, T, H]; positions [B, T] -> q [B, h, T, D], k and v [B, h, T, D] (GQA
        repeated), the layer input x's pieces kept for the residual."""
        m = self.midlayer
        x = torch.cat((m.input_layernorm(e), m.hidden_norm(u)), dim=-1)  # [B, T, 2H], embedding first
        B, T, _ = x.shape
        q = m.self_attn.q_proj(x).view(B, T, self.heads, self.head_dim)
        k = m.self_attn.k_proj(x).view(B, T, self.kv_heads, self.head_dim)
        v = m.self_attn.v_proj(x).view(B, T, self.kv_heads, self.head_dim)
        cos, sin = self.rope(positions)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        group = self.heads // self.kv_heads
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        return q, k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)

    def finish(self, u: torch.Tensor, attn_out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """u [B, T, H] (the residual), attn_out [B, h, T, D] -> (logits [B, T, Vd], a [B, T, H])."""
        m = self.midlayer
        B, _, T, _ = attn_out.shape
        h = u + m.self_attn.o_proj(attn_out.transpose(1, 2).reshape(B, T, -1))
        z = m.post_attention_layernorm(h)
        a = h + m.mlp.down_proj(F.silu(m.mlp.gate_proj(z)) * m.mlp.up_proj(z))
        return self.lm_head(self.norm(a)), a

    def forward_causal(self, u: torch.Tensor, e: torch.Tensor, positions: torch.Tensor):
        """Plain causal pass over one chain (prefix then draft steps): u, e [B, T, H]."""
        q, k, v = self.qkv(u, e, positions)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.head_dim**-0.5)
        return self.finish(u, out)


def ttt_forward(head: Eagle3Head, g: torch.Tensor, embed: torch.Tensor, ids: torch.Tensor, steps: int):
    """Training-time test over windows.

    g:     [B, T, C*Ht] target features at positions 0..T-1
    embed: [V, H] the target's embedding table (frozen)
    ids:   [B, T] tokens x_0..x_{T-1}
    Returns logits per step: list of [B, T-1, Vd]; anchor t of step s predicts x_{t+s+2}.
    """
    B, T = ids.shape
    n = T - 1  # anchors t = 0..T-2
    pos = torch.arange(n).expand(B, n)
    scale = head.head_dim**-0.5
    u = head.fc(g[:, :n])
    causal = torch.ones(n, n, dtype=torch.bool).tril()
    keys, values, logits = None, [], []
    for s in range(steps):
        tok = F.pad(ids[:, s + 1:], (0, s))  # x_{t+s+1}; tail rows past the window are masked out of the loss
        q, k, v = head.qkv(u, embed[tok], pos + s)
        if s == 0:
            keys, v0 = k, v
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
        else:
            # scores vs the step-0 prefix (anchors <= t) and vs this chain's own keys of steps 1..s
            values.append((k, v))
            s0 = (q @ keys.transpose(-1, -2) * scale).masked_fill(~causal, float("-inf"))  # [B, h, n, n]
            sd = torch.stack([(q * kr).sum(-1) * scale for kr, _ in values], dim=-1)  # [B, h, n, s]
            p = torch.softmax(torch.cat((s0, sd), dim=-1), dim=-1)
            out = p[..., :n] @ v0 + sum(p[..., n + r, None] * vr for r, (_, vr) in enumerate(values))
        step_logits, u = head.finish(u, out)
        logits.append(step_logits)
    return logits


# ---------------------------------------------------------------------------- the target


class Capture:
    """Forward pre-hooks on the target's decoder layers: the residual stream entering layer
    k (HF hidden_states index k) for each k in ``layers``, in ascending order."""

    def __init__(self, model, layers: tuple[int, ...]):
        self.layers, self.seen = layers, {}
        blocks = model.model.layers
        for k in layers:
            if not 0 <= k < len(blocks):
                raise ValueError(f"aux layer {k} is not an input to one of the target's {len(blocks)} layers")
            blocks[k].register_forward_pre_hook(lambda mod, args, k=k: self.seen.__setitem__(k, args[0]))

    def features(self) -> torch.Tensor:
        g = torch.cat([self.seen[k] for k in self.layers], dim=-1)
        self.seen = {}
        return g


def default_aux_layers(num_layers: int) -> tuple[int, ...]:
    return tuple(sorted({2, num_layers // 2, num_layers - 3}))


# ---------------------------------------------------------------------------- checkpoint


def save_head(head: Eagle3Head, cfg: dict, out: pathlib.Path) -> None:
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to(torch.bfloat16).contiguous() for k, v in head.state_dict().items()}
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")


def head_config(args, tcfg, aux: tuple[int, ...]) -> dict:
    """SpecForge-layout config.json; aux ids in eagle_config use the output-of-layer
    convention (HF index - 1)."""
    return {
        "architectures": ["LlamaForCausalLMEagle3"],
        "model_type": "llama",
        "hidden_size": tcfg.hidden_size,
        "intermediate_size": args.intermediate,
        "num_attention_heads": args.heads,
        "num_key_value_heads": args.kv_heads,
        "head_dim": tcfg.hidden_size // args.heads,
        "num_hidden_layers": 1,
        "hidden_act": "silu",
        "rms_norm_eps": tcfg.rms_norm_eps,
        "rope_theta": 10000.0,
        "max_position_embeddings": 1024,
        "vocab_size": tcfg.vocab_size,
        "draft_vocab_size": tcfg.vocab_size,
        "tie_word_embeddings": False,
        "bos_token_id": 0,
        "eos_token_id": 0,
        "torch_dtype": "bfloat16",
        "eagle_config": {"eagle_aux_hidden_state_layer_ids": [k - 1 for k in aux], "use_aux_hidden_state": True},
    }


def load_head(path: pathlib.Path) -> tuple[Eagle3Head, tuple[int, ...]]:
    """The checkpoint this script writes (fp32 in memory) and its aux layers as HF indices."""
    from safetensors.torch import load_file

    cfg = json.loads((path / "config.json").read_text())
    aux = tuple(k + 1 for k in cfg["eagle_config"]["eagle_aux_hidden_state_layer_ids"])
    sd = load_file(str(path / "model.safetensors"))
    head = Eagle3Head(hidden=cfg["hidden_size"], intermediate=cfg["intermediate_size"],
                      heads=cfg["num_attention_heads"], kv_heads=cfg["num_key_value_heads"], head_dim=cfg["head_dim"],
                      vocab=cfg["vocab_size"], draft_vocab=cfg["draft_vocab_size"], num_aux=len(aux),
                      target_hidden=sd["fc.weight"].shape[1] // len(aux), eps=cfg["rms_norm_eps"],
                      rope_theta=cfg["rope_theta"])
    head.load_state_dict({k: v.float() for k, v in sd.items()}, strict=True)
    return head.eval(), aux


# ---------------------------------------------------------------------------- evaluation


@torch.no_grad()
def greedy_chain(target, capture: Capture, propose, prompt: list[int], max_tokens: int, k: int, eos: int):
    """Greedy speculative decoding by full recompute. ``propose(ids, g, k)`` returns k draft
    tokens for the sequence ``ids`` (g: the target's features for ids). Returns (generated
    tokens, target forwards), the prefill counted as one forward (as the engine does)."""
    ids = list(prompt)
    logits = target(torch.tensor([ids]))[0]
    g = capture.features()[0]
    out, forwards = [int(logits[-1].argmax())], 1
    while len(out) < max_tokens and out[-1] != eos:
        seq = ids + out
        drafts = propose(seq, g, k)
        logits = target(torch.tensor([seq + drafts]))[0]
        g = capture.features()[0]
        greedy = logits[len(seq) - 1:].argmax(-1).tolist()  # target's choice after seq, after each draft
        n = 0
        while n < k and drafts[n] == greedy[n]:
            n += 1
        emitted = greedy[:n + 1]  # accepted drafts (== greedy) plus the bonus / correction
        if eos in emitted:
            emitted = emitted[:emitted.index(eos) + 1]
        out += emitted[:max_tokens - len(out)]
        forwards += 1
        # the features of seq's tokens are exact; the next propose() recomputes from them
        g = g[:len(seq) + n]
    return out, forwards


def head_proposer(head: Eagle3Head, embed: torch.Tensor):
    def propose(seq: list[int], g: torch.Tensor, k: int) -> list[int]:
        # prefix pairs (fc(g_t), x_{t+1}) at positions t = 0..n-1, then chain steps
        u = head.fc(g[None, :len(seq) - 1])  # features of all tokens but the last
        toks = list(seq[1:])  # each paired with the token after it
        drafts = []
        for _ in range(k):
            pos = torch.arange(u.shape[1])[None]
            logits, a = head.forward_causal(u, embed[torch.tensor([toks])], pos)
            nxt = int(logits[0, -1].argmax())
            drafts.append(nxt)
            u = torch.cat((u, a[:, -1:]), dim=1)
            toks.append(nxt)
        return drafts
    return propose


def model_proposer(draft):
    def propose(seq: list[int], g: torch.Tensor, k: int) -> list[int]:
        ids = list(seq)
        for _ in range(k):
            ids.append(int(draft(torch.tensor([ids]))[0, -1].argmax()))
        return ids[len(seq):]
    return propose


def evaluate(target_dir: pathlib.Path, head_dir: pathlib.Path | None, draft_dir: pathlib.Path | None,
             max_tokens: int, k: int) -> dict:
    from transformers import AutoTokenizer

    from specdec.demo import SNIPPETS

    target = load_model(target_dir)
    tok = AutoTokenizer.from_pretrained(str(target_dir))
    eos = target.config.eos_token_ids[0]
    results = {}
    proposers = {}
    if head_dir is not None:
        head, aux = load_head(head_dir)
        proposers["eagle3"] = (head_proposer(head, target.model.embed_tokens.weight.float()), aux)
    if draft_dir is not None:
        proposers["draft_model"] = (model_proposer(load_model(draft_dir)), default_aux_layers(target.num_layers))
    for name, (propose, aux) in proposers.items():
        capture = Capture(target, aux)
        gen = fwd = 0
        for snippet in SNIPPETS:
            out, f = greedy_chain(target, capture, propose, tok.encode(snippet), max_tokens, k, eos)
            gen, fwd = gen + len(out), fwd + f
        for block in target.model.layers:
            block._forward_pre_hooks.clear()
        results[name] = {"tokens": gen, "target_forwards": fwd, "mean_accepted_length": round(gen / fwd, 3)}
        print(f"{name}: {gen} tokens in {fwd} target forwards, mean accepted length {gen / fwd:.3f} "
              f"(k={k}, greedy, {len(SNIPPETS)} snippets x {max_tokens} tokens)", flush=True)
    return results


def heldout_acceptance(target_dir: pathlib.Path, head_dir, draft_dir, val_data: torch.Tensor, num_prompts: int,
                       max_tokens: int, k: int, prompt_len: int = 32) -> dict:
    """τ through the engine on prompts the head never trained on: ``num_prompts`` windows of
    ``prompt_len`` tokens spread evenly over the held-out split, greedy, ``max_tokens`` each,
    for the head and (when given) the draft model. Same prompts, same target for both."""
    from specdec import LLM, SamplingParams

    drafters = {"eagle3": head_dir, **({"draft_model": draft_dir} if draft_dir else {})}
    starts = torch.linspace(0, len(val_data) - prompt_len - 1, num_prompts).long().tolist()
    prompts = [val_data[s:s + prompt_len].tolist() for s in starts]
    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    results = {}
    for name, path in drafters.items():
        llm = LLM(target_dir, draft=str(path), num_draft_tokens=k, adaptive=False, device="cpu", backend="torch")
        llm.generate(prompts, params, progress=False)
        m = llm.metrics()
        results[name] = {"tokens": m["num_generated_tokens"],
                         "mean_accepted_length": round(m["mean_accepted_length"], 3),
                         "accepted_length_per_draft_step": round(m["accepted_length_per_draft_step"], 3),
                         "acceptance_rate": round(m["acceptance_rate"], 3)}
        print(f"{name}: held-out, {num_prompts} prompts x {max_tokens} tokens through the engine: mean accepted "
              f"length {m['mean_accepted_length']:.3f} per target forward, "
              f"{m['accepted_length_per_draft_step']:.3f} per draft step (k={k}, greedy)", flush=True)
    return results


# ---------------------------------------------------------------------------- training


def load_data(target_dir: pathlib.Path, data_mb: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The demo pair's corpus tokenised with the target's tokenizer; (train, validation)."""
    from tokenizers import Tokenizer
    from train_demo_pair import stdlib_files

    tok = Tokenizer.from_file(str(target_dir / "tokenizer.json"))
    eos = tok.token_to_id("<|endoftext|>")
    texts = [f.read_text(encoding="utf-8", errors="replace") for f in stdlib_files(data_mb)]
    ids = []
    for enc in tok.encode_batch(texts, add_special_tokens=False):
        ids += enc.ids + [eos]
    data = torch.tensor(ids, dtype=torch.int64)
    split = int(len(data) * 0.98)
    return data[:split], data[split:]


def windows(data: torch.Tensor, batch: int, seq: int, gen: torch.Generator) -> torch.Tensor:
    starts = torch.randint(0, len(data) - seq, (batch,), generator=gen)
    return torch.stack([data[s:s + seq] for s in starts.tolist()])


def step_losses(target, capture: Capture, head: Eagle3Head, embed: torch.Tensor, ids: torch.Tensor, steps: int):
    """Per-step soft cross-entropy (masked mean) and greedy agreement with the target."""
    with torch.no_grad():
        t_logits = target(ids)  # [B, T, V]
        g = capture.features()
        t_logp = torch.log_softmax(t_logits, dim=-1)
    T = ids.shape[1]
    losses, accs = [], []
    for s, logits in enumerate(ttt_forward(head, g, embed, ids, steps)):
        # anchor t, step s predicts x_{t+s+2}: the target's distribution at position t+s+1
        n = T - 1 - s  # anchors with a target row: t + s + 1 <= T - 1
        p = t_logp[:, s + 1:s + 1 + n].exp()
        lp = torch.log_softmax(logits[:, :n], dim=-1)
        losses.append(-(p * lp).sum(-1).mean())
        accs.append((logits[:, :n].argmax(-1) == p.argmax(-1)).float().mean().item())
    return losses, accs


def train(args) -> None:
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    target_dir, out = pathlib.Path(args.target), pathlib.Path(args.out)
    target = load_model(target_dir)
    for p in target.parameters():
        p.requires_grad_(False)
    tcfg = target.config
    aux = tuple(args.aux_layers) if args.aux_layers else default_aux_layers(target.num_layers)
    capture = Capture(target, aux)
    embed = target.model.embed_tokens.weight.detach().float()
    head = Eagle3Head(hidden=tcfg.hidden_size, intermediate=args.intermediate, heads=args.heads,
                      kv_heads=args.kv_heads, head_dim=tcfg.hidden_size // args.heads, vocab=tcfg.vocab_size,
                      draft_vocab=tcfg.vocab_size, num_aux=len(aux), target_hidden=tcfg.hidden_size,
                      eps=tcfg.rms_norm_eps, rope_theta=10000.0)
    for mod in head.modules():
        if isinstance(mod, nn.Linear):
            nn.init.normal_(mod.weight, std=0.02)
    if args.resume:  # continue from a head this script wrote (same shape and aux layers)
        prev, prev_aux = load_head(pathlib.Path(args.resume))
        if prev_aux != aux:
            raise ValueError(f"--resume {args.resume} reads aux layers {prev_aux}, this run {aux}")
        head.load_state_dict(prev.state_dict())
    elif args.init_lm_head:  # start from the target's own output head (it stays trainable)
        with torch.no_grad():
            head.lm_head.weight.copy_(target.lm_head.weight.float())
            head.norm.weight.copy_(target.model.norm.weight.float())
    n_params = sum(p.numel() for p in head.parameters())

    train_data, val_data = load_data(target_dir, args.data_mb)
    print(f"target {target_dir}: {target.num_layers} layers, aux layers (HF index) {aux}; head {n_params} params; "
          f"{len(train_data)} training tokens", flush=True)
    gen = torch.Generator().manual_seed(args.seed)
    opt = torch.optim.AdamW(head.parameters(), lr=args.lr, weight_decay=0.0, betas=(0.9, 0.95))
    weights = [TTT_DECAY**s for s in range(args.ttt_steps)]
    start, smooth, history = time.time(), None, []
    head.train()
    steps_done = 0
    for step in range(args.steps):
        if args.max_minutes and time.time() - start > args.max_minutes * 60:
            print(f"time cap of {args.max_minutes} min reached after {step} steps", flush=True)
            break
        for grp in opt.param_groups:  # warm-up, then cosine to 10 %
            grp["lr"] = args.lr * min(1.0, (step + 1) / args.warmup) * (
                0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / args.steps)))
        ids = windows(train_data, args.batch, args.seq, gen)
        losses, accs = step_losses(target, capture, head, embed, ids, args.ttt_steps)
        loss = sum(w * step_loss for w, step_loss in zip(weights, losses, strict=True))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(head.parameters(), 1.0)
        opt.step()
        steps_done = step + 1
        cur = [x.item() for x in losses]
        smooth = cur if smooth is None else [0.95 * a + 0.05 * b for a, b in zip(smooth, cur, strict=True)]
        if (step + 1) % args.log_every == 0 or step + 1 == args.steps:
            el = time.time() - start
            print(f"step {step + 1}/{args.steps} ({el:.0f}s): soft CE by step "
                  + " ".join(f"{x:.3f}" for x in smooth) + " | agreement " + " ".join(f"{a:.2f}" for a in accs),
                  flush=True)
            history.append({"step": step + 1, "seconds": round(el), "soft_ce": [round(x, 3) for x in smooth]})
    train_seconds = time.time() - start
    head.eval()

    with torch.no_grad():  # held-out figures
        vgen = torch.Generator().manual_seed(1)
        v_losses, v_accs = [], []
        for _ in range(4):
            losses, accs = step_losses(target, capture, head, embed, windows(val_data, 8, args.seq, vgen),
                                       args.ttt_steps)
            v_losses.append([x.item() for x in losses])
            v_accs.append(accs)
        val_ce = [round(sum(c) / len(c), 3) for c in zip(*v_losses, strict=True)]
        val_acc = [round(sum(c) / len(c), 3) for c in zip(*v_accs, strict=True)]
    print(f"validation soft CE by step {val_ce}, greedy agreement by step {val_acc}", flush=True)

    save_head(head, head_config(args, tcfg, aux), out)
    stats = {
        "command": "python scripts/train_eagle3.py " + " ".join(args.argv),
        "target": str(target_dir), "target_layers": target.num_layers,
        "aux_layers_hf_index": list(aux), "params": n_params,
        "draft_vocab_size": tcfg.vocab_size, "steps": steps_done, "planned_steps": args.steps,
        "batch": args.batch, "seq": args.seq,
        "lr": args.lr, "warmup": args.warmup, "ttt_steps": args.ttt_steps, "ttt_decay": TTT_DECAY,
        "init_lm_head_from_target": args.init_lm_head and not args.resume, "resumed_from": args.resume,
        "seed": args.seed, "threads": args.threads,
        "train_tokens_seen": args.steps * args.batch * args.seq, "train_seconds": round(train_seconds),
        "train_soft_ce_by_step": [round(x, 3) for x in smooth], "val_soft_ce_by_step": val_ce,
        "val_greedy_agreement_by_step": val_acc, "history": history,
    }
    stats["eval"] = evaluate(target_dir, out, pathlib.Path(args.draft) if args.draft else None,
                             args.eval_tokens, args.eval_k)
    stats["eval_settings"] = {"k": args.eval_k, "max_tokens": args.eval_tokens, "greedy": True}
    if args.heldout_prompts:
        stats["eval_heldout"] = heldout_acceptance(target_dir, out, args.draft, val_data, args.heldout_prompts,
                                                   args.eval_tokens, args.eval_k)
    (out / "training.json").write_text(json.dumps(stats, indent=2) + "\n")
    print(json.dumps({k: v for k, v in stats.items() if k != "history"}, indent=2))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--target", default="specdec/demo/target")
    ap.add_argument("--out", default="specdec/demo/eagle3")
    ap.add_argument("--draft", default=None,
                    help="a draft model dir to measure beside the head (--eval, end of training)")
    ap.add_argument("--eval", default=None, metavar="HEAD_DIR", help="only measure acceptance of this head")
    ap.add_argument("--eval-k", type=int, default=4)
    ap.add_argument("--eval-tokens", type=int, default=64)
    ap.add_argument("--heldout-prompts", type=int, default=32,
                    help="also measure τ through the engine on this many held-out prompts (0: skip)")
    ap.add_argument("--steps", type=int, default=900)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--max-minutes", type=float, default=None,
                    help="safety cap on the training time (stops before --steps; recorded)")
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--warmup", type=int, default=50)
    ap.add_argument("--ttt-steps", type=int, default=5)
    ap.add_argument("--aux-layers", type=int, nargs="*", default=None, help="HF hidden_states indices")
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--intermediate", type=int, default=384)
    ap.add_argument("--resume", default=None, metavar="HEAD_DIR", help="start from a head this script wrote")
    ap.add_argument("--no-init-lm-head", dest="init_lm_head", action="store_false")
    ap.add_argument("--data-mb", type=float, default=6.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--log-every", type=int, default=25)
    args = ap.parse_args(argv)
    args.argv = sys.argv[1:] if argv is None else list(argv)
    if args.eval is not None:
        torch.set_num_threads(args.threads)
        target_dir = pathlib.Path(args.target)
        evaluate(target_dir, pathlib.Path(args.eval), pathlib.Path(args.draft) if args.draft else None,
                 args.eval_tokens, args.eval_k)
        if args.heldout_prompts:
            _, val_data = load_data(target_dir, args.data_mb)
            heldout_acceptance(target_dir, args.eval, args.draft, val_data, args.heldout_prompts, args.eval_tokens,
                               args.eval_k)
        return
    train(args)


if __name__ == "__main__":
    main()
