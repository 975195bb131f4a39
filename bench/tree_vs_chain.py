"""Chain vs tree drafts of equal node budget: tokens per target forward on a real model.

    python bench/tree_vs_chain.py --target out/stories260K --draft early-exit:4

Prints a markdown table: for each shape (a chain of k tokens, trees with k nodes) and
temperature, the acceptance rate (accepted / proposed draft tokens) and the tokens emitted
per target forward, over a fixed set of prompts and seeds.
"""

from __future__ import annotations

import argparse

from specdec import LLM, SamplingParams
from specdec.tree import TreeShape

PROMPTS = ["Once upon a time", "Tom and Sue went to the park", "The little dog was sad because",
           "One day, a big bird", "Lily wanted to play with her ball", "The sun was hot and"]


def run(target: str, draft: str, budgets=(4, 8), temperatures=(0.0, 1.0), max_tokens: int = 96,
        device=None) -> list[dict]:
    shapes = {4: [None, (2, 1), (4,)], 8: [None, (2, 1, 1, 1), (4, 1), (2, 2)]}
    rows = []
    for budget in budgets:
        for tree in shapes[budget]:
            nodes = budget if tree is None else TreeShape.of(tree).num_nodes
            for t in temperatures:
                llm = LLM(target, draft=draft, num_draft_tokens=budget, draft_tree=tree, device=device, seed=0)
                params = [SamplingParams(max_tokens=max_tokens, temperature=t, seed=i, ignore_eos=True)
                          for i in range(len(PROMPTS))]
                llm.generate(PROMPTS, params, progress=False)
                m = llm.metrics()
                rows.append({"shape": f"chain k={budget}" if tree is None else f"tree {tree}", "nodes": nodes,
                             "temperature": t, "acceptance_rate": m["acceptance_rate"],
                             "tokens_per_forward": m["mean_accepted_length"]})
    return rows


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--target", required=True)
    ap.add_argument("--draft", default="early-exit:4")
    ap.add_argument("--max-tokens", type=int, default=96)
    ap.add_argument("--device", default=None)
    args = ap.parse_args(argv)
    rows = run(args.target, args.draft, max_tokens=args.max_tokens, device=args.device)
    print(f"draft {args.draft}, {len(PROMPTS)} prompts x {args.max_tokens} tokens\n")
    print("| shape | nodes | temperature | acceptance rate | tokens / target forward |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['shape']} | {r['nodes']} | {r['temperature']:g} | {r['acceptance_rate']:.3f} | "
              f"{r['tokens_per_forward']:.2f} |")


if __name__ == "__main__":
    main()
