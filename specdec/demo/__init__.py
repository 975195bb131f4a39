"""The embedded demo models and ``specdec demo``.

``target/`` and ``draft/`` beside this file are a small llama and a draft about a fifth of
its size, trained by ``scripts/train_demo_pair.py`` on the Python standard library's own
source files, sharing one byte-level BPE tokenizer (see MODEL_CARD.md); ``eagle3/`` is an
EAGLE-3 head trained for the target by ``scripts/train_eagle3.py``.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import NamedTuple

DEMO_DIR = Path(__file__).resolve().parent
TARGET_DIR = DEMO_DIR / "target"
DRAFT_DIR = DEMO_DIR / "draft"
HEAD_DIR = DEMO_DIR / "eagle3"

SNIPPETS = (
    "def fibonacci(n):\n",
    "import os\n\n\ndef list_python_files(path):\n",
    "class Stack:\n    def __init__(self):\n",
    "    def __repr__(self):\n        return",
)

# The contenders of ``specdec demo``, in table order. The head's tree and the default were
# chosen by measuring on a 2-core CPU (README, Quick start): fixed here, never picked at run
# time from one run's noisy timings. Measured there (idle, 3 runs): the head's chain at
# k = 4 1.92-1.93x plain, the draft model 1.63-1.80x, the best tree tried (dynamic:2,5,10:
# top-2 expansion, 5 levels, 10 nodes) 1.48-1.64x; on a CPU a tree's wider verify forward
# and eager drafting cost more than its longer accepted runs (4.06 vs 3.37 tokens per
# target forward) bring back.
CONTENDERS = ("plain", "draft-model", "eagle3", "eagle3-tree")
DEMO_TREE = "dynamic:2,5,10"
BEST_DRAFTER = "eagle3"


class DemoDirs(NamedTuple):
    """The embedded model directories."""

    target: Path
    draft: Path
    head: Path


def demo_dirs() -> DemoDirs:
    """The embedded (target, draft model, EAGLE-3 head) directories; a clear error if one is missing."""
    for d, how in ((TARGET_DIR, "scripts/train_demo_pair.py --out specdec/demo"),
                   (DRAFT_DIR, "scripts/train_demo_pair.py --out specdec/demo"),
                   (HEAD_DIR, "scripts/train_eagle3.py --out specdec/demo/eagle3")):
        if not (d / "model.safetensors").is_file() or not (d / "config.json").is_file():
            raise FileNotFoundError(
                f"the embedded demo model {d} is missing (no config.json / model.safetensors); "
                f"reinstall specdec or run {how}")
    return DemoDirs(TARGET_DIR, DRAFT_DIR, HEAD_DIR)


def best_draft(dirs: DemoDirs) -> Path:
    """The draft directory of ``BEST_DRAFTER``: what ``specdec serve`` and the load benchmark
    use with the embedded target."""
    return {"draft-model": dirs.draft, "eagle3": dirs.head}[BEST_DRAFTER]


def run_demo(max_tokens: int = 64, num_draft_tokens: int = 4, device=None, backend: str = "auto",
             out=None, drafter: str = "best") -> dict:
    """Complete the snippets with every contender in one run (greedy, batch 1, same target):
    plain decoding, the draft model (chain of ``num_draft_tokens``), the EAGLE-3 head (same
    chain) and the head with the dynamic tree ``DEMO_TREE``. Streams the text of ``drafter``
    (``"best"``: ``BEST_DRAFTER``), then prints one row per contender with its speedup over
    plain decoding measured in this run. Each contender is warmed up untimed; the contenders
    take turns snippet by snippet, so a change of machine load hits them alike.

    Returns ``{"drafter": name, "contenders": {name: figures}}`` (figures: the timed run's
    ``RequestMetrics.as_dict()`` plus ``seconds``, ``tokens_per_second`` and ``speedup``).
    """
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        raise ValueError(f"the demo needs max_tokens >= 1 (it compares tokens/s), got {max_tokens!r}")
    if drafter != "best" and drafter not in CONTENDERS:
        raise ValueError(f"unknown demo drafter {drafter!r}; expected 'best' or one of {', '.join(CONTENDERS)}")
    shown = BEST_DRAFTER if drafter == "best" else drafter
    out = sys.stdout if out is None else out
    llms = _load_contenders(demo_dirs(), max_tokens, num_draft_tokens, device, backend)
    some = llms["plain"]
    print(f"specdec demo: {some.config.num_layers}-layer target, device {some.device}, backend {some.backend}; "
          f"k={num_draft_tokens}, head tree {DEMO_TREE}; showing {shown}\n", file=out)

    from .. import SamplingParams

    warm = SamplingParams(max_tokens=8, temperature=0)
    for llm in llms.values():  # warm-up, untimed and left out of the figures
        llm.generate(SNIPPETS[0], warm)
    before = {name: llm.totals() for name, llm in llms.items()}
    seconds = dict.fromkeys(llms, 0.0)
    params = SamplingParams(max_tokens=max_tokens, temperature=0)
    order = [shown] + [name for name in llms if name != shown]
    for snippet in SNIPPETS:
        print("─" * 60, file=out)
        print(snippet, end="", file=out, flush=True)
        for name in order:
            start = time.perf_counter()
            if name == shown:
                for piece in llms[name].stream(snippet, params):
                    print(piece, end="", file=out, flush=True)
            else:
                llms[name].generate(snippet, params)
            seconds[name] += time.perf_counter() - start
        print(file=out)
    figures = {name: {**llm.totals().since(before[name]).as_dict(), "seconds": seconds[name]}
               for name, llm in llms.items()}
    _print_table(figures, shown, out)
    return {"drafter": shown, "contenders": figures}


def _load_contenders(dirs: DemoDirs, max_tokens: int, k: int, device, backend: str) -> dict:
    """One ``LLM`` per contender, each with a KV cache sized for one demo request (the default,
    a share of free memory, would be allocated four times)."""
    from .. import LLM

    common = {"device": device, "backend": backend, "max_num_seqs": 1, "adaptive": False,
              "kv_cache_memory": (max_tokens + 512) * (16 << 10)}  # > 2x the bytes per token of any pair here (fp32)
    return {
        "plain": LLM(dirs.target, **common),
        "draft-model": LLM(dirs.target, draft=dirs.draft, num_draft_tokens=k, **common),
        "eagle3": LLM(dirs.target, draft=dirs.head, num_draft_tokens=k, **common),
        "eagle3-tree": LLM(dirs.target, draft=dirs.head, draft_tree=DEMO_TREE, **common),
    }


def _print_table(figures: dict, shown: str, out) -> None:
    """One row per contender; adds ``tokens_per_second`` and ``speedup`` (vs plain) to ``figures``."""
    for f in figures.values():
        f["tokens_per_second"] = f["num_generated_tokens"] / f["seconds"] if f["seconds"] else 0.0
    plain = figures["plain"]["tokens_per_second"]
    for f in figures.values():
        f["speedup"] = f["tokens_per_second"] / plain if plain else 0.0
    print("─" * 60, file=out)
    print(f"{'contender':<14}{'mean accepted length':>22}{'per draft step':>16}{'acceptance rate':>17}"
          f"{'tokens/s':>10}{'speedup':>9}", file=out)
    for name, f in figures.items():
        rate = f"{f['acceptance_rate']:.3f}" if name != "plain" else "-"
        per_step = f"{f['accepted_length_per_draft_step']:.2f}" if name != "plain" else "-"
        mark = "  <- shown" if name == shown else ""
        print(f"{name:<14}{f['mean_accepted_length']:>22.2f}{per_step:>16}{rate:>17}{f['tokens_per_second']:>10.1f}"
              f"{f['speedup']:>8.2f}x{mark}", file=out)
    print("\nmean accepted length: tokens per target forward, the prefill counted; per draft step: 1 + accepted "
          "drafts per step that verified drafts (vLLM's mean acceptance length); speedup: tokens/s over plain "
          "decoding's, same target, same run", file=out)

