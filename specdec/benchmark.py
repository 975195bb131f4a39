"""End-to-end decoding throughput, every contender measured in one run on the same pair.

    specdec bench --shape tiny --batches 1,2          # CPU smoke run (seconds)
    specdec bench --pair demo --batches 1 --skip-hf   # the embedded demo pair
    specdec bench --shape llama-3.2-1b --batches 1,16,64   # on a GPU: the real sizes

``python -m specdec bench`` and ``python bench/e2e.py`` take the same options.

Two pairs (``--pair``):
  synthetic  (default) real sizes, random weights: the target has the shape chosen with
             ``--shape``, the draft is its first D layers (``early-exit:D`` inside specdec;
             a separate checkpoint of those layers for transformers' assisted generation).
             The output projections of the target's later layers (o_proj, down_proj) are
             scaled by ε, so the later layers barely change the residual stream and
             acceptance is set from ~1 (ε = 0) downward.
  demo       the embedded demo pair (``specdec/demo``): a small trained target and its
             separately trained draft model, which both specdec and transformers use.

Or ``--draft DIR [--target DIR]``: any drafter specdec loads (early-exit:N, a draft model
directory, an EAGLE-3 head directory) on the given target, by default the demo target.

Prompts are random token ids in [3, vocab), so acceptance is that of the pair on noise.

Contenders, tokens/s = generated tokens / wall seconds (synchronised):
  specdec plain        LLM(target), the same engine with no drafter
  specdec spec         LLM(target, draft=<early-exit:D or the draft dir>, num_draft_tokens=k)
  hf static            transformers generate(cache_implementation="static"), compiled on CUDA
  hf assisted          transformers generate(assistant_model=draft), batch 1 only

For the speculative run the table also gives, over the timed requests: the acceptance
rate α = accepted / proposed draft tokens, the mean accepted length = generated tokens /
steps, draft/step = proposed draft tokens / steps (per sequence; below k where max_tokens
clips the last drafts, or where ``--adaptive`` chooses fewer), the measured cost ratio
c = (draft step time) / (target step time) from the draft and the target each decoding
plainly, and the speedup Leviathan et al. (2023) predict for fixed-k speculation from
them: (1 − α^(k+1)) / ((1 − α)(k·c + 1)). An EAGLE-3 head cannot decode on its own
(it reads the target's hidden states), so for a head c, the prediction and achieved /
predicted are n/a, and so is transformers' assisted generation.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import tempfile
import time
from typing import Any

import torch

from .models.eagle3 import is_eagle3_dir

SHAPES = {
    # name: (hidden, layers, heads, kv heads, intermediate, vocab, context)
    "tiny": (64, 4, 4, 2, 176, 512, 512),
    "llama-3.2-1b": (2048, 16, 32, 8, 8192, 128256, 4096),
}
# LLM(...) counters whose difference across the timed run gives its figures
_COUNTERS = ("num_steps", "num_generated_tokens", "num_draft_tokens", "num_accepted_tokens")


def make_pair(root: pathlib.Path, shape: str, draft_layers: int, eps: float, dtype) -> tuple[str, str]:
    """Write the synthetic target and its first-``draft_layers`` draft; returns both dirs."""
    from transformers import LlamaConfig, LlamaForCausalLM

    hidden, layers, heads, kv, inter, vocab, ctx = SHAPES[shape]
    cfg: dict[str, Any] = dict(vocab_size=vocab, hidden_size=hidden, num_attention_heads=heads, num_key_value_heads=kv,
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


def first_layers(target: str, num_layers: int, out: pathlib.Path, dtype) -> str:
    """Write the target's first ``num_layers`` layers (with its norm and head) as a model
    of its own: the early-exit draft as transformers' assisted generation needs it."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(target, dtype=dtype)
    model.model.layers = model.model.layers[:num_layers]
    model.config.num_hidden_layers = num_layers
    for key in ("layer_types",):  # per-layer lists in newer configs follow the cut
        if isinstance(getattr(model.config, key, None), list):
            setattr(model.config, key, getattr(model.config, key)[:num_layers])
    model.save_pretrained(out)
    return str(out)


def _pair(args, root: pathlib.Path, dtype) -> tuple[str, str | None, str, str]:
    """(target dir, draft dir, specdec's draft argument, a label for the table heading).
    The draft dir is None for an EAGLE-3 head: it cannot decode on its own."""
    if args.draft is not None:
        target = args.target
        if target is None:  # --draft alone: against the embedded demo target
            from .demo import demo_dirs

            target = str(demo_dirs()[0])
        draft = args.draft
        if draft.startswith("early-exit:"):
            n = int(draft.split(":", 1)[1])
            return target, first_layers(target, n, root / "draft", dtype), draft, f"{target} with {draft}"
        if is_eagle3_dir(draft):
            return target, None, draft, f"{target} with EAGLE-3 head {draft}"
        return target, draft, draft, f"{target} with draft model {draft}"
    if args.pair == "demo":
        from .demo import demo_dirs

        target, draft = (str(d) for d in demo_dirs()[:2])
        layers = [_config(d)["num_hidden_layers"] for d in (target, draft)]
        return target, draft, draft, f"demo pair ({layers[0]}-layer target, {layers[1]}-layer draft model)"
    d = args.draft_layers
    target, draft = make_pair(root, args.shape, d, args.eps, dtype)
    label = f"synthetic pair ({args.shape} target, early-exit:{d} draft, ε={args.eps})"
    return target, draft, f"early-exit:{d}", label


def _config(model_dir: str) -> dict:
    return json.loads((pathlib.Path(model_dir) / "config.json").read_text())


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


def make_llm(target, draft, k, device, max_batch, **llm_kwargs):
    """One specdec contender, built once and reused for every row of the table. Its KV
    cache is sized for the benchmark (several contenders share the GPU)."""
    from . import LLM

    budget = 2 << 30 if torch.device(device).type == "cuda" else 256 << 20
    return LLM(target, draft=draft, num_draft_tokens=k, device=device, max_num_seqs=max_batch,
               kv_cache_memory=budget, **llm_kwargs)


def bench_specdec(llm, prompts, max_tokens, temperature, device):
    """Time ``llm`` generating ``max_tokens`` for every prompt after a warm-up; returns
    (generated tokens, seconds, counters of the timed run alone)."""
    from . import SamplingParams

    params = [SamplingParams(max_tokens=max_tokens, temperature=temperature, seed=i, ignore_eos=True)
              for i in range(len(prompts))]
    # warm-up: capture the decode graphs of every batch size the run passes through (it
    # shrinks as requests finish) and compile the kernels, outside the timed region
    llm.warm_up(list(range(1, len(prompts) + 1)), ("greedy" if temperature == 0 else "sample",))
    llm.generate(prompts[:1], SamplingParams(max_tokens=4, temperature=temperature), progress=False)
    before = llm.metrics()
    seconds = _timed(lambda: llm.generate(prompts, params, progress=False), device)
    after = llm.metrics()
    m = {key: after[key] - before[key] for key in _COUNTERS}
    m["acceptance_rate"] = m["num_accepted_tokens"] / m["num_draft_tokens"] if m["num_draft_tokens"] else 0.0
    m["mean_accepted_length"] = m["num_generated_tokens"] / m["num_steps"]
    m["draft_per_step"] = m["num_draft_tokens"] / m["num_steps"]
    return m["num_generated_tokens"], seconds, m


def weight_roofline(llm) -> tuple[float, str] | None:
    """Batch-1 tokens/s if every decode step only read the target's weights once at the
    card's peak memory bandwidth (None off CUDA or where torch does not report it)."""
    if llm.device.type != "cuda":
        return None
    props = torch.cuda.get_device_properties(llm.device)
    clock_khz, bus_bits = getattr(props, "memory_clock_rate", 0), getattr(props, "memory_bus_width", 0)
    if not clock_khz or not bus_bits:
        return None
    bandwidth = 2 * clock_khz * 1e3 * bus_bits / 8  # bytes/s, double data rate
    weights = sum(p.numel() * p.element_size() for p in llm.target.parameters())
    return bandwidth / weights, f"{weights / 1e9:.2f} GB of weights at {bandwidth / 1e12:.2f} TB/s"


def bench_hf(target, draft, prompts, max_tokens, temperature, device, dtype, assisted: bool):
    """Time transformers' ``generate`` (static cache, or assisted by ``draft``); returns
    (generated tokens, seconds)."""
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
    kwargs["attention_mask"] = torch.ones_like(ids)  # equal lengths, no padding (the demo's pad id is its eos)
    with torch.no_grad():
        model.generate(ids, **{**kwargs, "max_new_tokens": 4, "min_new_tokens": 4})  # warm-up / compile
        seconds = _timed(lambda: model.generate(ids, **kwargs), device)
    return len(prompts) * max_tokens, seconds


def leviathan_speedup(alpha: float, k: int, c: float) -> float:
    """Expected speedup of k-token speculation with acceptance α and draft/target cost c
    (Leviathan et al. 2023): (1 − α^(k+1)) / ((1 − α)(k·c + 1)).

    >>> round(leviathan_speedup(0.8, 4, 0.05), 3)
    2.801
    """
    if alpha >= 1.0:
        return (k + 1) / (k * c + 1)
    return (1 - alpha ** (k + 1)) / ((1 - alpha) * (k * c + 1))


def _prediction(draft_plain, bench: tuple, alpha: float, k: int, plain_s_per_token: float):
    """(c, Leviathan's predicted speedup): c = a draft step against a target step, both
    decoding plainly; (None, None) when the drafter cannot decode on its own (EAGLE-3)."""
    if draft_plain is None:
        return None, None
    n_draft, s_draft, _ = bench_specdec(draft_plain, *bench)
    c = (s_draft / n_draft) / plain_s_per_token
    return c, leviathan_speedup(alpha, k, c)


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.2f}"


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {value}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The benchmark's options, shared by ``specdec bench`` and ``bench/e2e.py``."""
    parser.add_argument("--pair", choices=("synthetic", "demo"), default="synthetic",
                        help="synthetic: random weights at --shape, early-exit draft; demo: the embedded demo pair")
    parser.add_argument("--target", default=None, help="a model directory: benchmark it instead of --pair "
                        "(needs --draft)")
    parser.add_argument("--draft", default=None, help="early-exit:N, a draft model directory or an EAGLE-3 head "
                        "directory; without --target: against the embedded demo target")
    parser.add_argument("--shape", choices=list(SHAPES), default="tiny", help="synthetic pair only")
    parser.add_argument("--draft-layers", type=int, default=2, help="synthetic pair only")
    parser.add_argument("--eps", type=float, default=0.0, help="synthetic pair only")
    parser.add_argument("-k", "--num-draft-tokens", type=positive_int, default=4)
    parser.add_argument("--batches", default="1,16,64", help="comma-separated batch sizes")
    parser.add_argument("--prompt-len", type=positive_int, default=32)
    parser.add_argument("--max-tokens", type=positive_int, default=64)
    parser.add_argument("--device", default=None, help="default: cuda when present, else cpu")
    parser.add_argument("--adaptive", action=argparse.BooleanOptionalAction, default=None,
                        help="adaptive speculation in the speculative run (default: the engine's)")
    parser.add_argument("--cuda-graphs", action=argparse.BooleanOptionalAction, default=None,
                        help="CUDA graphs in every specdec run (default: the engine's)")
    parser.add_argument("--skip-hf", action="store_true", help="leave out transformers' contenders")
    parser.add_argument("--hf-batches", default=None,
                        help="comma-separated batch sizes for transformers' contenders (default: all of --batches)")


def run(args: argparse.Namespace) -> int:
    """Print the markdown table for parsed ``args`` (see :func:`add_arguments`); returns 0."""
    if args.target is not None and args.draft is None:
        raise SystemExit("specdec bench: --target needs --draft (early-exit:N, a draft model directory or an "
                         "EAGLE-3 head directory); --draft alone runs against the embedded demo target")
    device, dtype, name = _device(args.device)
    k = args.num_draft_tokens
    # pass the engine options only when set: the defaults are the engine's, the heading lists the rest
    engine = {} if args.cuda_graphs is None else {"cuda_graphs": args.cuda_graphs}
    spec_only = {} if args.adaptive is None else {"adaptive": args.adaptive}
    options = "".join(f", {key}={value}" for key, value in {**spec_only, **engine}.items())
    rows = []
    batches = [int(b) for b in args.batches.split(",")]
    hf_batches = batches if args.hf_batches is None else [int(b) for b in args.hf_batches.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        target, draft, spec_draft, label = _pair(args, pathlib.Path(tmp), dtype)
        vocab = _config(target)["vocab_size"]
        # the contenders: the target plain, the target speculating, the draft plain (for c)
        plain = make_llm(target, None, k, device, max(batches), **engine)
        spec = make_llm(target, spec_draft, k, device, max(batches), **engine, **spec_only)
        # an EAGLE-3 head cannot decode plainly: no c, no prediction (n/a in the table)
        draft_plain = make_llm(draft, None, k, device, max(batches), **engine) if draft is not None else None
        roofline = weight_roofline(plain)
        print(f"# e2e on {name}, {time.strftime('%Y-%m-%d')}: {label}, k={k}{options}, "
              f"prompt {args.prompt_len}, {args.max_tokens} new tokens")
        if roofline:
            print(f"# batch-1 weight-bandwidth roofline: {roofline[0]:.0f} tok/s ({roofline[1]})")
        if draft_plain is None:
            print("# c, predicted: n/a — an EAGLE-3 head drafts from the target's hidden states and cannot "
                  "decode on its own, so the plain-decoding cost ratio c does not exist for it")
        print("\n| batch | T | specdec plain tok/s | specdec spec tok/s | spec / plain | hf static tok/s | "
              "hf assisted tok/s | α | mean accepted | draft/step | c | predicted | achieved / predicted |")
        print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
        for batch in batches:
            prompts = _prompts(batch, args.prompt_len, vocab)
            for temperature in (0.0, 1.0):
                bench = (prompts, args.max_tokens, temperature, device)
                n_plain, s_plain, _ = bench_specdec(plain, *bench)
                n_spec, s_spec, m = bench_specdec(spec, *bench)
                achieved = (n_spec / s_spec) / (n_plain / s_plain)
                c, predicted = _prediction(draft_plain, bench, m["acceptance_rate"], k, s_plain / n_plain)
                hf_static = hf_assisted = "—"
                if not args.skip_hf and batch in hf_batches:
                    hf_static, hf_assisted = _hf_cells(target, draft, bench, dtype)
                ratio = achieved / predicted if predicted is not None else None
                print(f"| {batch} | {temperature:g} | {n_plain / s_plain:.1f} | {n_spec / s_spec:.1f} | "
                      f"{achieved:.2f} | {hf_static} | {hf_assisted} | {m['acceptance_rate']:.3f} | "
                      f"{m['mean_accepted_length']:.2f} | {m['draft_per_step']:.2f} | {_fmt(c)} | {_fmt(predicted)} | "
                      f"{_fmt(ratio)} |", flush=True)
                rows.append((batch, temperature, achieved, ratio, n_plain / s_plain))
    _print_summary(rows, roofline, batches)
    return 0


def _device(asked: str | None) -> tuple[str, torch.dtype, str]:
    """(device, dtype, device name) for ``--device``: cuda when present and not asked otherwise."""
    device = asked or ("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {device} was asked for but there is no CUDA device: pass --device cpu")
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    name = torch.cuda.get_device_name() if device.startswith("cuda") else "CPU"
    return device, dtype, name


def _hf_cells(target, draft, bench: tuple, dtype: torch.dtype) -> tuple[str, str]:
    """The table's (hf static, hf assisted) tok/s cells; assisted only at batch 1 with a draft model."""
    prompts, max_tokens, temperature, device = bench
    n, s = bench_hf(target, draft, prompts, max_tokens, temperature, device, dtype, False)
    hf_static, hf_assisted = f"{n / s:.1f}", "—"
    if len(prompts) == 1 and draft is not None:
        n, s = bench_hf(target, draft, prompts, max_tokens, temperature, device, dtype, True)
        hf_assisted = f"{n / s:.1f}"
    return hf_static, hf_assisted


def _print_summary(rows: list[tuple], roofline, batches: list[int]) -> None:
    """The lines under the table: spec / plain range, achieved / predicted spread, batch-1 roofline share.

    ``rows``: (batch, temperature, spec / plain, achieved / predicted or None, plain tok/s) per row.
    """
    best = max(rows, key=lambda r: r[2])
    ratios = [r[3] for r in rows if r[3] is not None]
    spread = f"{min(ratios):.2f}–{max(ratios):.2f}" if ratios else "n/a (EAGLE-3 head)"
    print(f"\nspec / plain {min(r[2] for r in rows):.2f}–{best[2]:.2f} (best at batch {best[0]}, T={best[1]:g}); "
          f"achieved / predicted {spread}")
    if roofline and 1 in batches:
        plain_1 = max(r[4] for r in rows if r[0] == 1)
        print(f"batch-1 plain decoding at {plain_1 / roofline[0]:.0%} of the weight-bandwidth roofline")


def main(argv: list[str] | None = None) -> int:
    """``python bench/e2e.py [options]``: the same as ``specdec bench [options]``."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))
