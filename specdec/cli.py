"""``specdec`` command line: generate, demo, convert, bench, serve."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


def _generate(args) -> int:
    from . import LLM, SamplingParams

    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_k=args.top_k,
                            top_p=args.top_p, seed=args.seed, stop=tuple(args.stop),
                            ignore_eos=args.ignore_eos)
    llm = LLM(args.target, draft=args.draft, num_draft_tokens=args.num_draft_tokens, device=args.device,
              backend=args.backend, draft_tree=args.draft_tree)
    if args.chat:  # the prompt is one user message; print only the reply
        prompt = llm.render_chat([{"role": "user", "content": args.prompt}])
    else:
        prompt = args.prompt
        print(args.prompt, end="", flush=True)
    for piece in llm.stream(prompt, params):
        print(piece, end="", flush=True)
    print()
    m = llm.metrics()
    by_pos = ", ".join(f"{r:.2f}" for r in m["acceptance_rate_by_position"]) or "-"
    print(f"\n[drafter {args.draft or 'none (plain decoding)'}] {m['num_generated_tokens']} tokens in "
          f"{m['num_steps']} target forwards, {m['tokens_per_second']:.1f} tokens/s", file=sys.stderr)
    print(f"acceptance rate {m['acceptance_rate']:.3f} ({m['num_accepted_tokens']}/{m['num_draft_tokens']} draft "
          f"tokens; by position: {by_pos}), mean accepted length {m['mean_accepted_length']:.2f} tokens per "
          f"target forward, {m['accepted_length_per_draft_step']:.2f} per draft step", file=sys.stderr)
    return 0


def _convert(args) -> int:
    from pathlib import Path

    from .models.convert import convert_llama2c

    if Path(args.out_dir).exists() and not Path(args.out_dir).is_dir():
        raise ValueError(f"{args.out_dir} exists and is not a directory: choose another output directory")
    out = convert_llama2c(args.checkpoint, args.tokenizer, args.out_dir)
    print(f"wrote {out}")
    return 0


def _convert_eagle3(args) -> int:
    from .models.convert import convert_eagle3
    from .models.eagle3 import load_eagle3

    out = convert_eagle3(args.in_dir, args.out_dir)
    cfg, _ = load_eagle3(out)  # the written directory loads back
    ids = "default {2, L//2, L-3}" if cfg.aux_layer_ids is None else list(cfg.aux_layer_ids)
    print(f"wrote {out} (EAGLE-3 head: hidden {cfg.hidden_size}, draft vocabulary {cfg.draft_vocab_size} of "
          f"{cfg.vocab_size}, aux layers {ids} as HF hidden_states indices)")
    return 0


def _demo(args) -> int:
    from .demo import run_demo

    run_demo(max_tokens=args.max_tokens, num_draft_tokens=args.num_draft_tokens, device=args.device,
             backend=args.backend, drafter=args.drafter)
    return 0


def _serve(args) -> int:
    from . import LLM
    from .demo import best_draft, demo_dirs
    from .server import serve

    draft: str | Path | None
    if args.target is None:
        if args.draft is not None:
            raise ValueError("--draft needs --target (without --target the embedded demo target is served with "
                             "its EAGLE-3 head)")
        dirs = demo_dirs()
        target, draft = dirs.target, best_draft(dirs)
        name = args.served_model_name or "specdec-demo"
    else:
        target, draft = args.target, args.draft
        name = args.served_model_name or Path(args.target).resolve().name
    if args.no_draft:
        draft = None
    llm = LLM(target, draft=draft, num_draft_tokens=args.num_draft_tokens, device=args.device,
              backend=args.backend, draft_tree=args.draft_tree, max_num_seqs=args.max_num_seqs)
    llm.warm_up()  # with CUDA graphs: capture and time every batch bucket before the first request
    serve(llm, name, args.host, args.port, api_key=args.api_key or os.environ.get("SPECDEC_API_KEY"),
          max_waiting=args.max_waiting, max_body_bytes=args.max_body_bytes,
          shutdown_timeout=args.shutdown_timeout, log_level=args.log_level)
    return 0


def _port(text: str) -> int:
    if not text.isdigit() or not 0 <= int(text) <= 65535:
        raise argparse.ArgumentTypeError(f"expected a port number in [0, 65535], got {text!r}")
    return int(text)


def _branching(text: str) -> tuple[int, ...] | str:
    """--draft-tree: a static tree ``3,2,1,1`` or an EAGLE-3 head's dynamic tree ``dynamic:K,D,N``."""
    if text.startswith("dynamic:"):
        from .drafters.eagle3 import DynamicTree

        try:
            DynamicTree.parse(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
        return text
    try:
        return tuple(int(b) for b in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers like 3,2,1,1 (or dynamic:K,D,N with an "
                                         f"EAGLE-3 head), got {text!r}") from None


def _add_generate_arguments(gen: argparse.ArgumentParser) -> None:
    """``specdec generate``'s arguments."""
    gen.add_argument("--target", required=True, help="target model directory (config.json + safetensors)")
    gen.add_argument("--draft", default=None,
                     help="draft model directory, EAGLE-3 head directory, 'ngram', or 'early-exit:N'")
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--chat", action="store_true",
                     help="send the prompt as one user message through the model's chat template")
    gen.add_argument("--num-draft-tokens", type=int, default=4)
    gen.add_argument("--draft-tree", type=_branching, default=None, metavar="B1,B2,...|dynamic:K,D,N",
                     help="draft a static tree instead of a chain, e.g. 3,2,1,1; with an EAGLE-3 head also "
                          "an EAGLE-2 dynamic tree, e.g. dynamic:4,5,24 (top-K, depth D, N tokens verified)")
    gen.add_argument("--max-tokens", type=int, default=64)
    gen.add_argument("--temperature", type=float, default=None,
                     help="default: the model's generation_config.json value, else 1.0")
    gen.add_argument("--top-k", type=int, default=None,
                     help="default: the model's generation_config.json value, else 0 (off)")
    gen.add_argument("--top-p", type=float, default=None,
                     help="default: the model's generation_config.json value, else 1.0 (off)")
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    gen.add_argument("--ignore-eos", action="store_true")
    gen.add_argument("--device", default=None)
    gen.add_argument("--backend", default="auto", choices=("auto", "torch", "triton"))
    gen.set_defaults(func=_generate)


def _add_demo_arguments(demo: argparse.ArgumentParser) -> None:
    """``specdec demo``'s arguments."""
    from .benchmark import positive_int

    demo.add_argument("--max-tokens", type=positive_int, default=64)
    demo.add_argument("--num-draft-tokens", type=positive_int, default=4)
    demo.add_argument("--device", default=None)
    demo.add_argument("--backend", default="auto", choices=("auto", "torch", "triton"))
    demo.add_argument("--drafter", default="best", choices=("best", "plain", "draft-model", "eagle3", "eagle3-tree"),
                      help="whose text is streamed (all are measured); best: the EAGLE-3 variant measured "
                      "fastest on a 2-core CPU (README: Quick start)")
    demo.set_defaults(func=_demo)


def _add_serve_arguments(srv: argparse.ArgumentParser) -> None:
    """``specdec serve``'s arguments."""
    from .benchmark import positive_int

    srv.add_argument("--target", default=None, help="target model directory (default: the embedded demo target)")
    srv.add_argument("--draft", default=None, help="draft model directory, EAGLE-3 head directory, 'ngram', or "
                     "'early-exit:N' "
                     "(default with the demo: its EAGLE-3 head)")
    srv.add_argument("--no-draft", action="store_true", help="plain decoding (no drafter)")
    srv.add_argument("--num-draft-tokens", type=positive_int, default=4)
    srv.add_argument("--draft-tree", type=_branching, default=None, metavar="B1,B2,...|dynamic:K,D,N")
    srv.add_argument("--host", default="127.0.0.1", help="address to bind (default loopback only)")
    srv.add_argument("--port", type=_port, default=8000)
    srv.add_argument("--api-key", default=None,
                     help="require 'Authorization: Bearer KEY' on /v1/* (default: $SPECDEC_API_KEY, else open)")
    srv.add_argument("--max-waiting", type=positive_int, default=None,
                     help="answer 503 + Retry-After while this many requests wait for the batch")
    srv.add_argument("--max-num-seqs", type=positive_int, default=64, help="requests decoded together")
    srv.add_argument("--max-body-bytes", type=positive_int, default=1 << 20)
    srv.add_argument("--served-model-name", default=None)
    srv.add_argument("--shutdown-timeout", type=float, default=30.0,
                     help="seconds in-flight requests get to finish after SIGTERM before they are aborted")
    srv.add_argument("--device", default=None)
    srv.add_argument("--backend", default="auto", choices=("auto", "torch", "triton"))
    srv.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"))
    srv.set_defaults(func=_serve)


def _add_convert_arguments(conv: argparse.ArgumentParser) -> None:
    """``specdec convert``'s formats (llama2c, eagle3) and their arguments."""
    conv_sub = conv.add_subparsers(dest="format", required=True)
    l2c = conv_sub.add_parser("llama2c", help="llama2.c checkpoint + tokenizer.bin")
    l2c.add_argument("checkpoint")
    l2c.add_argument("tokenizer")
    l2c.add_argument("out_dir")
    l2c.set_defaults(func=_convert)
    e3 = conv_sub.add_parser("eagle3", help="EAGLE-3 head (SafeAILab .bin, SpecForge, speculators) -> "
                             "specdec's safetensors layout")
    e3.add_argument("in_dir", help="the head's directory (config.json + pytorch_model.bin or safetensors)")
    e3.add_argument("out_dir", help="directory to write (config.json + model.safetensors)")
    e3.set_defaults(func=_convert_eagle3)


def build_parser() -> argparse.ArgumentParser:
    """The ``specdec`` command line: one subcommand each, its arguments added by the helpers above."""
    from . import benchmark

    parser = argparse.ArgumentParser(prog="specdec", description="Speculative decoding for llama-style models")
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="generate text from a prompt")
    _add_generate_arguments(gen)

    demo = sub.add_parser("demo", help="the embedded demo target decoded plainly, with its draft model and with its "
                          "EAGLE-3 head (chain and tree), compared in one run")
    _add_demo_arguments(demo)

    bench = sub.add_parser("bench", help="end-to-end tokens/s: plain, speculative and transformers, one table",
                           description=benchmark.__doc__.split("\n\n")[0])
    benchmark.add_arguments(bench)
    bench.set_defaults(func=benchmark.run)

    srv = sub.add_parser("serve", help="OpenAI-compatible HTTP server (completions, chat, metrics)",
                         description="Serve a target (and drafter) over an OpenAI-compatible HTTP API. "
                                     "Without --target: the embedded demo target and its EAGLE-3 head.")
    _add_serve_arguments(srv)

    conv = sub.add_parser("convert", help="convert a checkpoint to an HF-style directory")
    _add_convert_arguments(conv)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, TypeError, OSError, RuntimeError) as e:
        print(f"specdec: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
