"""End-to-end decoding throughput, every contender measured in one run on the same pair.

    python bench/e2e.py --shape tiny                 # CPU smoke run (seconds)
    python bench/e2e.py --shape llama-3.2-1b         # on a GPU: the real sizes

The pair is synthetic at real sizes: the target has llama-3.2-1B's shape with random
weights, the draft is its first D layers (``early-exit:D`` inside specdec; a separate
checkpoint of those layers for transformers' assisted generation). The output
projections of the target's later layers (o_proj, down_proj) are scaled by ε, so the
later layers barely change the residual stream and acceptance is set from ~1 (ε = 0)
downward.

Contenders, tokens/s = generated tokens / wall seconds (synchronised):
  specdec plain        LLM(target), the same engine with no drafter
  specdec spec         LLM(target, draft="early-exit:D", num_draft_tokens=k)
  hf static            transformers generate(cache_implementation="static"), compiled on CUDA
  hf assisted          transformers generate(assistant_model=draft), batch 1 only

For the speculative run the table also gives the acceptance rate α, the mean accepted
length, the measured cost ratio c = (draft step time) / (target step time), and the
speedup Leviathan et al. (2023) predict from them: (1 − α^(k+1)) / ((1 − α)(k·c + 1)).
"""

from __future__ import annotations

import argparse
import pathlib
import tempfile
import time

import torch

SHAPES = {
    # name: (hidden, layers, heads, kv heads, intermediate, vocab, context)
    "tiny": (64, 4, 4, 2, 176, 512, 512),
    "llama-3.2-1b": (2048, 16, 32, 8, 8192, 128256, 4096),
}


def make_pair(root: pathlib.Path, shape: str, draft_layers: int, eps: float, dtype) -> tuple[str, str]:
    """Write the synthetic target and its first-``draft_layers`` draft; returns both dirs."""
    from transformers import LlamaConfig, LlamaForCausalLM

    hidden, layers, heads, kv, inter, vocab, ctx = SHAPES[shape]
    cfg = dict(vocab_size=vocab, hidden_size=hidden, num_attention_heads=heads, num_key_value_heads=kv,
               intermediate_size=inter, max_position_embeddings=ctx, tie_word_embeddings=True,
               bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    target = LlamaForCausalLM(LlamaConfig(num_hidden_layers=layers, **cfg)).to(dtype)
    with torch.no_grad():
        for i, layer in enumerate(target.model.layers):
            if i >= draft_layers:
                layer.self_attn.o_proj.weight.mul_(eps)
                layer.mlp.down_proj.weight.mul_(eps)
    target.save_pretrained(root / "target")
    draft = LlamaForCausalLM(LlamaConfig(num_hidden_layers=draft_layers, **cfg)).to(dtype)
    state = {k: v for k, v in target.state_dict().items()
             if not k.startswith("model.layers.") or int(k.split(".")[2]) < draft_layers}
    draft.load_state_dict(state, strict=False)
    draft.save_pretrained(root / "draft")
    return str(root / "target"), str(root / "draft")


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def _timed(fn, device) -> float:
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start


def _prompts(batch: int, length: int, vocab: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(1)
    return [torch.randint(3, vocab, (length,), generator=gen).tolist() for _ in range(batch)]


def bench_specdec(target, draft, prompts, max_tokens, temperature, k, device):
    from specdec import LLM, SamplingParams

    params = [SamplingParams(max_tokens=max_tokens, temperature=temperature, seed=i, ignore_eos=True)
              for i in range(len(prompts))]
    llm = LLM(target, draft=draft, num_draft_tokens=k, device=device, max_num_seqs=len(prompts))
    llm.generate(prompts[:1], SamplingParams(max_tokens=4, temperature=temperature), progress=False)  # warm-up
    seconds = _timed(lambda: llm.generate(prompts, params, progress=False), device)
    m = llm.metrics()
    return m["num_generated_tokens"] - 4, seconds, m


def bench_hf(target, draft, prompts, max_tokens, temperature, device, dtype, assisted: bool):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(target, dtype=dtype).to(device).eval()
    kwargs = dict(max_new_tokens=max_tokens, min_new_tokens=max_tokens, do_sample=temperature > 0,
                  pad_token_id=0)
    if temperature > 0:
        kwargs["temperature"] = temperature
    if assisted:
        kwargs["assistant_model"] = AutoModelForCausalLM.from_pretrained(draft, dtype=dtype).to(device).eval()
    else:
        kwargs["cache_implementation"] = "static"
        if torch.device(device).type == "cuda":
            model.forward = torch.compile(model.forward, mode="reduce-overhead", fullgraph=True)
    ids = torch.tensor(prompts, device=device)
    with torch.no_grad():
        model.generate(ids, **{**kwargs, "max_new_tokens": 4, "min_new_tokens": 4})  # warm-up / compile
        seconds = _timed(lambda: model.generate(ids, **kwargs), device)
    return len(prompts) * max_tokens, seconds


def leviathan_speedup(alpha: float, k: int, c: float) -> float:
    """Expected speedup of k-token speculation with acceptance α and draft/target cost c."""
    if alpha >= 1.0:
        return (k + 1) / (k * c + 1)
    return (1 - alpha ** (k + 1)) / ((1 - alpha) * (k * c + 1))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", choices=list(SHAPES), default="tiny")
    ap.add_argument("--draft-layers", type=int, default=2)
    ap.add_argument("--eps", type=float, default=0.0)
    ap.add_argument("-k", "--num-draft-tokens", type=int, default=4)
    ap.add_argument("--batches", default="1,16,64")
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--skip-hf", action="store_true", help="leave out transformers' contenders")
    args = ap.parse_args(argv)
    dtype = torch.bfloat16 if args.device.startswith("cuda") else torch.float32
    k, d = args.num_draft_tokens, args.draft_layers
    name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "CPU"
    with tempfile.TemporaryDirectory() as tmp:
        target, draft = make_pair(pathlib.Path(tmp), args.shape, d, args.eps, dtype)
        vocab = SHAPES[args.shape][5]
        print(f"# e2e on {name}, {time.strftime('%Y-%m-%d')}: {args.shape} target, early-exit:{d} draft, "
              f"ε={args.eps}, k={k}, prompt {args.prompt_len}, {args.max_tokens} new tokens\n")
        print("| batch | T | specdec plain tok/s | specdec spec tok/s | spec / plain | hf static tok/s | "
              "hf assisted tok/s | α | mean accepted | c | predicted | achieved / predicted |")
        print("|---|---|---|---|---|---|---|---|---|---|---|---|")
        for batch in (int(b) for b in args.batches.split(",")):
            prompts = _prompts(batch, args.prompt_len, vocab)
            for temperature in (0.0, 1.0):
                n_plain, s_plain, _ = bench_specdec(target, None, prompts, args.max_tokens, temperature, k, args.device)
                n_spec, s_spec, m = bench_specdec(target, f"early-exit:{d}", prompts, args.max_tokens,
                                                  temperature, k, args.device)
                # c: a draft step (the first D layers) against a target step, both plain decoding
                n_draft, s_draft, _ = bench_specdec(draft, None, prompts, args.max_tokens, temperature, k, args.device)
                c = (s_draft / n_draft) / (s_plain / n_plain)
                alpha = m["acceptance_rate"]
                predicted = leviathan_speedup(alpha, k, c)
                achieved = (n_spec / s_spec) / (n_plain / s_plain)
                hf_static = hf_assisted = "—"
                if not args.skip_hf:
                    n, s = bench_hf(target, draft, prompts, args.max_tokens, temperature, args.device, dtype, False)
                    hf_static = f"{n / s:.1f}"
                    if batch == 1:
                        n, s = bench_hf(target, draft, prompts, args.max_tokens, temperature, args.device, dtype, True)
                        hf_assisted = f"{n / s:.1f}"
                print(f"| {batch} | {temperature:g} | {n_plain / s_plain:.1f} | {n_spec / s_spec:.1f} | "
                      f"{achieved:.2f} | {hf_static} | {hf_assisted} | {alpha:.3f} | "
                      f"{m['mean_accepted_length']:.2f} | {c:.2f} | {predicted:.2f} | {achieved / predicted:.2f} |",
                      flush=True)


if __name__ == "__main__":
    main()
