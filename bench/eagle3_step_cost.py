"""Per-step cost of EAGLE-3 drafting on the embedded demo target, eager and fixed-shape.

    python bench/eagle3_step_cost.py          # from the repository root; CPU, ~1 minute

A random head (``tests/eagle3_reference.make_eagle3_head``: H 128, I 384, reading layers
1, 2, 3) drafts for the demo target (4 layers, H 128, V 2048), fp32, torch backend, one
thread, batch 1, 64 greedy tokens, best of 3. Its acceptance is ~0, so the table is the
drafting overhead per target forward, not a speedup. "fixed-shape" runs the runner's
static code eagerly (``decode_runner(use_graphs=False)``), as CUDA graphs would replay it.
"""

from __future__ import annotations

import pathlib
import sys
import tempfile

import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from eagle3_reference import make_eagle3_head  # noqa: E402
from specdec import LLM, SamplingParams  # noqa: E402

PROMPT = [[5, 17, 300, 41, 12, 9, 77, 1000]]


def step_ms(target: str, static: bool, repeats: int = 3, **llm_kwargs) -> tuple[float, int]:
    """Best-of-``repeats`` busy milliseconds per engine step, and the step count."""
    params = SamplingParams(max_tokens=64, temperature=0.0, ignore_eos=True)
    best = steps = None
    for _ in range(repeats):
        llm = LLM(target, device="cpu", dtype=torch.float32, backend="torch", **llm_kwargs)
        if static:
            llm.engine.runner = llm.decode_runner(use_graphs=False)
        llm.generate(PROMPT, SamplingParams(max_tokens=4, temperature=0.0), progress=False)  # warm
        busy = llm.engine.busy_seconds
        out = llm.generate(PROMPT, params, progress=False)[0]
        steps = out.metrics.num_steps
        ms = 1000 * (llm.engine.busy_seconds - busy) / steps
        best = ms if best is None else min(best, ms)
    return best, steps


def main() -> int:
    torch.set_num_threads(1)
    target = str(ROOT / "specdec" / "demo" / "target")
    with tempfile.TemporaryDirectory() as tmp:
        head = str(make_eagle3_head(pathlib.Path(tmp) / "head", vocab_size=2048, target_hidden=128, num_heads=4,
                                    num_kv_heads=2, intermediate_size=384, aux_ids=[1, 2, 3], seed=0))
        cases = [("plain", False, {}), ("plain, fixed-shape", True, {}),
                 ("EAGLE-3 chain k = 4, eager", False, dict(draft=head, num_draft_tokens=4)),
                 ("EAGLE-3 chain k = 4, fixed-shape", True, dict(draft=head, num_draft_tokens=4)),
                 ("EAGLE-3 dynamic:4,4,16 (eager)", False, dict(draft=head, draft_tree="dynamic:4,4,16"))]
        print("| mode | ms / step | steps |\n|---|---|---|")
        for name, static, kwargs in cases:
            ms, steps = step_ms(target, static, **kwargs)
            print(f"| {name} | {ms:.2f} | {steps} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
