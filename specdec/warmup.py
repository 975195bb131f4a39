"""Compile every Triton variant a served step can launch, before the first request.

CUDA-graph steps compile their kernels when ``DecodeRunner.warm_up`` captures them. The
general (eager) path — prefill, trees, n-gram drafts, a step the graphs do not cover —
would otherwise compile on first use, mid-serving, a few seconds per variant. Here, on
the scratch block no sequence owns:

* attention: every variant the tile policy can choose for each model's cache
  (``verify_attention.precompile``; batch size and split count are runtime ints);
* one single-token forward of each model: the fused norm / RoPE / SiLU ops and write_kv;
* the samplers in every mode at every chain length a step may ask for
  (``_sampler_warm_up``), the tree sampler and the keep-path copy when drafting trees.
"""

from __future__ import annotations

import importlib

import torch

from .drafters.draft_model import ModelDrafter
from .models.llama import ForwardBatch

_SCRATCH_NOTE = "the cache has no scratch block past the block manager's (LLM allocates one)"


def warm_up_eager(engine, modes: tuple[str, ...]) -> int:
    """Compile the eager path's kernels of ``engine`` (Triton backend on CUDA only:
    elsewhere nothing is compiled); returns the number of launches made."""
    if engine.ops.name != "triton" or engine.device.type != "cuda":
        return 0
    scratch = engine.blocks.num_blocks
    if engine.cache.k.shape[1] <= scratch:
        raise ValueError(f"warm-up needs a scratch block: {_SCRATCH_NOTE}")
    va = importlib.import_module("specdec.kernels.verify_attention")
    drafter = engine.drafter
    trees = getattr(drafter, "tree", None) is not None
    models = [(engine.target, engine.cache, None)]
    if isinstance(drafter, ModelDrafter) and not drafter.shares_target_cache:
        models.append((drafter.model, drafter.cache, drafter.num_layers))
    launches = 0
    for model, cache, num_layers in models:
        k_cache, v_cache = cache.layer(0)
        launches += va.precompile(k_cache, v_cache, model.config.num_heads, scratch, trees=trees,
                                  kinds=model.attention_kinds())
        launches += _one_token_forward(model, cache, engine.ops, scratch, num_layers)
    launches += _sampler_warm_up(engine, modes, trees)
    if trees:  # keep-path compaction: a slot of the scratch block onto itself
        slot = torch.full((1,), scratch * engine.blocks.block_size, dtype=torch.int64, device=engine.device)
        engine.cache.keep_path(slot, slot)
        launches += 1
    torch.cuda.synchronize(engine.device)
    return launches


def _one_token_forward(model, cache, ops, scratch: int, num_layers) -> int:
    """Token 0 at position 0 of the scratch block through every layer: the fused ops
    and write_kv compile (attention's variants are precompiled)."""
    dev = cache.k.device
    bs = cache.k.shape[2]
    i32 = dict(dtype=torch.int32, device=dev)
    batch = ForwardBatch(
        tokens=torch.zeros(1, dtype=torch.int64, device=dev), positions=torch.zeros(1, dtype=torch.int64, device=dev),
        slot_mapping=torch.full((1,), scratch * bs, dtype=torch.int64, device=dev),
        block_table=torch.full((1, 1), scratch, **i32), seq_lens=torch.ones(1, **i32),
        q_start=torch.arange(2, **i32), tree_mask=None, logits_rows=None, max_query_len=1, max_seq_len=1,
    )
    model.forward_cached(batch, cache, ops, num_layers)
    return 1


def _sampler_warm_up(engine, modes: tuple[str, ...], trees: bool) -> int:
    """The samplers' eager calls (today's public launchers; one place to change when
    their signatures do): one sequence, every sampling mode, every chain length."""
    dev, ops = engine.device, engine.ops
    V = engine.target.config.vocab_size
    with_q = isinstance(engine.drafter, ModelDrafter)
    launches = 0
    for mode in modes:
        temperature = torch.full((1,), 0.0 if mode == "greedy" else 1.0, device=dev)
        top_k = torch.full((1,), 5 if mode == "filtered" else 0, dtype=torch.int32, device=dev)
        top_p = torch.ones(1, device=dev)
        seeds = offsets = torch.zeros(1, dtype=torch.int64, device=dev)
        for k in range(engine.draft_depth + 1):
            logits = torch.zeros(k + 1, V, device=dev)
            ids = torch.zeros(k, dtype=torch.int64, device=dev)
            q = torch.full((k, V), 1.0 / V, device=dev) if with_q and k > 0 else None
            cu = torch.tensor([0, k], dtype=torch.int32, device=dev)
            ops.rejection_sample(logits, ids, q, cu, k, temperature, top_k, top_p, seeds, offsets,
                                 check_finite=False)
            launches += 1
        if trees:
            n = engine.num_draft_tokens
            logits = torch.zeros(n + 1, V, device=dev)
            q = torch.full((n + 1, V), 1.0 / V, device=dev) if with_q else None
            parents = torch.arange(-1, n - 1, dtype=torch.int32, device=dev)
            cu = torch.tensor([0, n], dtype=torch.int32, device=dev)
            for depth in range(1, engine.draft_depth + 1):
                ops.tree_rejection_sample(logits, torch.zeros(n, dtype=torch.int64, device=dev), parents, q, cu,
                                          depth, temperature, top_k, top_p, seeds, offsets, check_finite=False)
                launches += 1
    return launches
