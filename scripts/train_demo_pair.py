"""Train the embedded demo pair: a small llama target and a draft ~1/5 its size, on CPU.

Data: the Python standard library's own source files (present wherever Python is; no
download), minus its test suites. Tokenizer: byte-level BPE trained on the same files
with the ``tokenizers`` library. Both models share it. The target trains on next-token
cross-entropy; the draft then trains on a mix of cross-entropy and KL divergence to the
trained target's distribution (distillation raises how often the target accepts it).

    python scripts/train_demo_pair.py --out specdec/demo --target-layers 12 --target-minutes 28 --draft-minutes 10

writes ``OUT/target`` and ``OUT/draft`` (config.json, model.safetensors in bfloat16,
tokenizer.json, tokenizer_config.json) and ``OUT/MODEL_CARD.md`` with the command, the
steps, the final losses and the acceptance measured with specdec after training.
"""

from __future__ import annotations

import argparse
import json
import math
import pathlib
import random
import sys
import sysconfig
import time

import torch

SPECIAL = ["<|endoftext|>"]


def stdlib_files(limit_mb: float) -> list[pathlib.Path]:
    root = pathlib.Path(sysconfig.get_paths()["stdlib"])
    skip = {"site-packages", "test", "tests", "idle_test", "__pycache__"}
    files = sorted(f for f in root.rglob("*.py") if not skip & set(f.relative_to(root).parts))
    random.Random(0).shuffle(files)
    out, total = [], 0
    for f in files:
        size = f.stat().st_size
        if total + size > limit_mb * 1e6:
            continue
        out.append(f)
        total += size
    return out


def train_tokenizer(texts: list[str], vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=SPECIAL[0], bos_token=SPECIAL[0])


def make_model(vocab: int, dim: int, layers: int, heads: int, kv_heads: int, hidden: int, ctx: int, eos: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=vocab, hidden_size=dim, num_hidden_layers=layers, num_attention_heads=heads,
                      num_key_value_heads=kv_heads, intermediate_size=hidden, max_position_embeddings=ctx,
                      tie_word_embeddings=True, bos_token_id=eos, eos_token_id=eos, rms_norm_eps=1e-5)
    return LlamaForCausalLM(cfg)


def grow(source: pathlib.Path, layers: int, eos: int):
    """A ``layers``-deep copy of the llama at ``source`` that computes the same function:
    source layer i sits at position i * f (f = layers / source layers) and each new layer
    after it starts as a copy of it with ``o_proj`` and ``down_proj`` zeroed (both residual
    branches add nothing), so training starts from the source's loss and the new layers
    learn from there."""
    from transformers import LlamaForCausalLM

    small = LlamaForCausalLM.from_pretrained(source, dtype=torch.float32)
    c = small.config
    if layers % c.num_hidden_layers:
        raise ValueError(f"--target-layers {layers} must be a multiple of {source}'s {c.num_hidden_layers} layers")
    big = make_model(c.vocab_size, c.hidden_size, layers, c.num_attention_heads, c.num_key_value_heads,
                     c.intermediate_size, c.max_position_embeddings, eos)
    f = layers // c.num_hidden_layers
    sd = {k: v for k, v in small.state_dict().items() if not k.startswith("model.layers.")}
    for j in range(layers):
        src = small.model.layers[j // f].state_dict()
        for k, v in src.items():
            fresh = j % f and k.endswith(("o_proj.weight", "down_proj.weight"))
            sd[f"model.layers.{j}.{k}"] = torch.zeros_like(v) if fresh else v.clone()
    big.load_state_dict(sd, strict=False)
    return big


def batches(data: torch.Tensor, batch: int, seq: int, gen: torch.Generator):
    while True:
        starts = torch.randint(0, len(data) - seq - 1, (batch,), generator=gen)
        x = torch.stack([data[s:s + seq + 1] for s in starts.tolist()])
        yield x[:, :-1], x[:, 1:]


def train(model, data, val, *, seconds: float, batch: int, seq: int, lr: float, label: str, seed: int,
          teacher=None, distill: float = 0.0, warmup: int = 100):
    """AdamW on next-token cross-entropy for ``seconds``; with a ``teacher``, the loss mixes
    in ``distill`` x KL(teacher || model) on the teacher's full distribution (the draft
    learns to agree with the target, which is what acceptance measures)."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.1, betas=(0.9, 0.95))
    it = batches(data, batch, seq, gen)
    start, step, loss = time.time(), 0, float("nan")
    model.train()
    while time.time() - start < seconds:
        frac = (time.time() - start) / seconds  # cosine schedule over the time budget
        for g in opt.param_groups:
            g["lr"] = lr * min(1.0, (step + 1) / warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))
        x, y = next(it)
        logits = model(input_ids=x).logits
        loss_t = torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten())
        if teacher is not None:
            with torch.no_grad():
                t_logp = torch.log_softmax(teacher(input_ids=x).logits.float(), dim=-1)
            kl = torch.nn.functional.kl_div(torch.log_softmax(logits, dim=-1), t_logp, log_target=True,
                                            reduction="batchmean") / x.shape[1]
            loss_t = (1 - distill) * loss_t + distill * kl
        opt.zero_grad(set_to_none=True)
        loss_t.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        loss = 0.98 * loss + 0.02 * loss_t.item() if step > 1 else loss_t.item()
        if step % 25 == 0:
            print(f"[{label}] step {step} loss {loss:.3f} ({time.time() - start:.0f}s)", flush=True)
    model.eval()
    with torch.no_grad():
        vx, vy = next(batches(val, 16, seq, torch.Generator().manual_seed(1)))
        val_loss = torch.nn.functional.cross_entropy(model(input_ids=vx).logits.flatten(0, 1), vy.flatten()).item()
    return step, loss, val_loss


def save(model, tokenizer, out: pathlib.Path):
    out.mkdir(parents=True, exist_ok=True)
    model.to(torch.bfloat16).save_pretrained(out)
    tokenizer.save_pretrained(out)
    model.float()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="specdec/demo")
    ap.add_argument("--target-minutes", type=float, default=16.0)
    ap.add_argument("--draft-minutes", type=float, default=10.0)
    ap.add_argument("--distill", type=float, default=0.7, help="weight of the KL-to-target term for the draft")
    ap.add_argument("--data-mb", type=float, default=6.0)
    ap.add_argument("--vocab", type=int, default=2048)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--target-layers", type=int, default=4)
    ap.add_argument("--target-hidden", type=int, default=128)
    ap.add_argument("--target-heads", type=int, default=4)
    ap.add_argument("--target-kv-heads", type=int, default=2)
    ap.add_argument("--target-mlp", type=int, default=384)
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (the machine may be shared)")
    ap.add_argument("--grow-target", default=None, metavar="DIR",
                    help="start the target from the (shallower) llama in DIR, grown to --target-layers "
                         "(function-preserving; its tokenizer is reused) instead of from scratch")
    ap.add_argument("--init-draft", default=None, metavar="DIR", help="start the draft from the model in DIR")
    ap.add_argument("--target-lr", type=float, default=3e-3)
    ap.add_argument("--draft-lr", type=float, default=4e-3)
    ap.add_argument("--warmup", type=int, default=100)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    out = pathlib.Path(args.out)

    files = stdlib_files(args.data_mb)
    texts = [f.read_text(encoding="utf-8", errors="replace") for f in files]
    if args.grow_target:  # the grown target keeps its embeddings, so its tokenizer too
        from transformers import PreTrainedTokenizerFast

        tokenizer = PreTrainedTokenizerFast.from_pretrained(args.grow_target)
    else:
        tokenizer = train_tokenizer(texts, args.vocab)
    eos = tokenizer.convert_tokens_to_ids(SPECIAL[0])
    ids = []
    for t in texts:
        ids += tokenizer.encode(t) + [eos]
    data = torch.tensor(ids, dtype=torch.int64)
    split = int(len(data) * 0.98)
    train_data, val_data = data[:split], data[split:]
    print(f"{len(files)} files, {data.numel()} tokens, vocab {len(tokenizer)}", flush=True)

    if args.grow_target:
        target = grow(pathlib.Path(args.grow_target), args.target_layers, eos)
    else:
        target = make_model(len(tokenizer), args.target_hidden, args.target_layers, args.target_heads,
                            args.target_kv_heads, args.target_mlp, 1024, eos)
    if args.init_draft:
        from transformers import LlamaForCausalLM

        draft = LlamaForCausalLM.from_pretrained(args.init_draft, dtype=torch.float32)
    else:
        draft = make_model(len(tokenizer), 64, 2, 2, 1, 192, 1024, eos)
    n_target = sum(p.numel() for p in target.parameters())
    n_draft = sum(p.numel() for p in draft.parameters())
    print(f"target {n_target / 1e6:.2f}M params, draft {n_draft / 1e6:.2f}M params", flush=True)
    t_steps, t_loss, t_val = train(target, train_data, val_data, seconds=args.target_minutes * 60,
                                   batch=args.batch, seq=args.seq, lr=args.target_lr, label="target", seed=args.seed,
                                   warmup=args.warmup)
    target.eval()
    save(target, tokenizer, out / "target")  # ready for other work while the draft trains
    d_steps, d_loss, d_val = train(draft, train_data, val_data, seconds=args.draft_minutes * 60,
                                   batch=args.batch, seq=args.seq, lr=args.draft_lr, label="draft", seed=args.seed + 1,
                                   teacher=target, distill=args.distill, warmup=args.warmup)
    save(draft, tokenizer, out / "draft")

    stats = {
        "files": len(files), "tokens": int(data.numel()), "vocab": len(tokenizer),
        "target": {"params": n_target, "steps": t_steps, "train_loss": round(t_loss, 3), "val_loss": round(t_val, 3)},
        "draft": {"params": n_draft, "steps": d_steps, "train_loss": round(d_loss, 3), "val_loss": round(d_val, 3)},
        "command": "python scripts/train_demo_pair.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "batch": args.batch, "seq": args.seq, "target_minutes": args.target_minutes,
        "draft_minutes": args.draft_minutes, "distill": args.distill, "threads": args.threads,
        "grow_target": args.grow_target, "init_draft": args.init_draft, "target_lr": args.target_lr,
        "draft_lr": args.draft_lr, "warmup": args.warmup,
        "target_shape": {"layers": args.target_layers, "hidden": args.target_hidden, "heads": args.target_heads,
                         "kv_heads": args.target_kv_heads, "mlp": args.target_mlp},
    }
    (out / "training.json").write_text(json.dumps(stats, indent=2) + "\n")
    print(json.dumps(stats, indent=2))


if __name__ == "__main__":
    main()
