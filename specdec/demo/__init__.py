"""The embedded demo pair and ``specdec demo``.

``target/`` and ``draft/`` beside this file are a small llama and a draft about a fifth of
its size, trained by ``scripts/train_demo_pair.py`` on the Python standard library's own
source files, sharing one byte-level BPE tokenizer (see MODEL_CARD.md).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

DEMO_DIR = Path(__file__).resolve().parent
TARGET_DIR = DEMO_DIR / "target"
DRAFT_DIR = DEMO_DIR / "draft"

SNIPPETS = (
    "def fibonacci(n):\n",
    "import os\n\n\ndef list_python_files(path):\n",
    "class Stack:\n    def __init__(self):\n",
    "    def __repr__(self):\n        return",
)


def demo_dirs() -> tuple[Path, Path]:
    """The embedded (target, draft) directories; a clear error if they are missing."""
    for d in (TARGET_DIR, DRAFT_DIR):
        if not (d / "model.safetensors").is_file():
            raise FileNotFoundError(
                f"the embedded demo model {d} is missing; reinstall specdec or run "
                "scripts/train_demo_pair.py --out specdec/demo"
            )
    return TARGET_DIR, DRAFT_DIR


def run_demo(max_tokens: int = 64, num_draft_tokens: int = 4, device=None, backend: str = "auto",
             out=None) -> dict:
    """Complete the snippets with speculative decoding, streaming the text, then compare
    tokens/s with plain decoding of the same target, measured in this run (greedy, batch 1).

    Returns the measured figures (also printed).
    """
    from .. import LLM, SamplingParams

    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        raise ValueError(f"the demo needs max_tokens >= 1 (it compares tokens/s), got {max_tokens!r}")
    out = sys.stdout if out is None else out
    target, draft = demo_dirs()
    spec = LLM(target, draft=draft, num_draft_tokens=num_draft_tokens, device=device, backend=backend)
    plain = LLM(target, device=device, backend=backend)
    params = SamplingParams(max_tokens=max_tokens, temperature=0)
    print(f"specdec demo: target {spec.config.num_layers} layers / draft {draft.name}, "
          f"k={num_draft_tokens}, device {spec.device}, backend {spec.backend}\n", file=out)

    warm = SamplingParams(max_tokens=4, temperature=0)
    for llm in (spec, plain):  # warm-up, untimed and left out of the figures
        llm.generate(SNIPPETS[0], warm)
    spec_before, plain_before = spec.metrics(), plain.metrics()
    spec_time = plain_time = 0.0
    for snippet in SNIPPETS:
        print("─" * 60, file=out)
        print(snippet, end="", file=out, flush=True)
        start = time.perf_counter()
        for piece in spec.stream(snippet, params):
            print(piece, end="", file=out, flush=True)
        spec_time += time.perf_counter() - start
        print(file=out)
        start = time.perf_counter()
        plain.generate(snippet, params)
        plain_time += time.perf_counter() - start

    m = _since(spec.metrics(), spec_before)
    p = _since(plain.metrics(), plain_before)
    spec_tps = m["num_generated_tokens"] / spec_time
    plain_tps = p["num_generated_tokens"] / plain_time
    by_pos = ", ".join(f"{r:.2f}" for r in m["acceptance_rate_by_position"])
    print("─" * 60, file=out)
    print(f"acceptance rate        {m['acceptance_rate']:.3f}  (by draft position: {by_pos})", file=out)
    print(f"mean accepted length   {m['mean_accepted_length']:.2f} tokens per target forward", file=out)
    print(f"speculative            {spec_tps:.1f} tokens/s  ({m['num_generated_tokens']} tokens)", file=out)
    print(f"plain decoding         {plain_tps:.1f} tokens/s  ({p['num_generated_tokens']} tokens)", file=out)
    print(f"speedup                {spec_tps / plain_tps:.2f}x (same target, same run)", file=out)
    return {**m, "speculative_tokens_per_second": spec_tps, "plain_tokens_per_second": plain_tps}


def _since(now: dict, before: dict) -> dict:
    """Counters accumulated between two ``LLM.metrics()`` snapshots, with the rates redone."""
    keys = ("num_steps", "num_generated_tokens", "num_draft_tokens", "num_accepted_tokens")
    d = {k: now[k] - before[k] for k in keys}
    d["acceptance_rate"] = d["num_accepted_tokens"] / d["num_draft_tokens"] if d["num_draft_tokens"] else 0.0
    d["mean_accepted_length"] = d["num_generated_tokens"] / d["num_steps"] if d["num_steps"] else 0.0
    pairs = zip(now["accepted_per_position"], now["proposed_per_position"],
                before["accepted_per_position"] + [0] * len(now["accepted_per_position"]),
                before["proposed_per_position"] + [0] * len(now["proposed_per_position"]),
                strict=False)  # `before` is padded with zeros past its own length: read as far as `now`
    d["acceptance_rate_by_position"] = [(a - a0) / (p - p0) if p > p0 else 0.0 for a, p, a0, p0 in pairs]
    return d
