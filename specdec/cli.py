"""``specdec`` command line: generate, convert."""

from __future__ import annotations

import argparse
import sys


def _generate(args) -> int:
    from . import LLM, SamplingParams

    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_k=args.top_k,
                            top_p=args.top_p, seed=args.seed, stop=tuple(args.stop),
                            ignore_eos=args.ignore_eos)
    llm = LLM(args.target, draft=args.draft, num_draft_tokens=args.num_draft_tokens, device=args.device,
              backend=args.backend)
    out = llm.generate(args.prompt, params)[0]
    print(args.prompt + out.text)
    m = out.metrics
    drafter = args.draft or "none (plain decoding)"
    print(f"\n[drafter {drafter}] {len(out.token_ids)} tokens in {m.num_steps} target forwards, "
          f"finish={out.finish_reason}", file=sys.stderr)
    print(f"acceptance rate {m.acceptance_rate:.3f} ({m.num_accepted_tokens}/{m.num_draft_tokens} draft tokens), "
          f"mean accepted length {m.mean_accepted_length:.2f} tokens per target forward", file=sys.stderr)
    return 0


def _convert(args) -> int:
    from .models.convert import convert_llama2c

    out = convert_llama2c(args.checkpoint, args.tokenizer, args.out_dir)
    print(f"wrote {out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="specdec", description="Speculative decoding for llama-style models")
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="generate text from a prompt")
    gen.add_argument("--target", required=True, help="target model directory (config.json + safetensors)")
    gen.add_argument("--draft", default=None, help="draft model directory, 'ngram', or 'early-exit:N'")
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--num-draft-tokens", type=int, default=4)
    gen.add_argument("--max-tokens", type=int, default=64)
    gen.add_argument("--temperature", type=float, default=1.0)
    gen.add_argument("--top-k", type=int, default=0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    gen.add_argument("--ignore-eos", action="store_true")
    gen.add_argument("--device", default=None)
    gen.add_argument("--backend", default="auto", choices=("auto", "torch", "triton"))
    gen.set_defaults(func=_generate)

    conv = sub.add_parser("convert", help="convert a checkpoint to an HF-style directory")
    conv_sub = conv.add_subparsers(dest="format", required=True)
    l2c = conv_sub.add_parser("llama2c", help="llama2.c checkpoint + tokenizer.bin")
    l2c.add_argument("checkpoint")
    l2c.add_argument("tokenizer")
    l2c.add_argument("out_dir")
    l2c.set_defaults(func=_convert)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, TypeError, FileNotFoundError, RuntimeError) as e:
        print(f"specdec: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
