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
import triton

from .batch import ForwardBatch


def warm_up_eager(engine, modes: tuple[str, ...], batch_sizes: list[int]) -> int:
    """Compile the eager path's kernels of ``engine`` (Triton backend on CUDA only:
    elsewhere nothing is compiled); returns the number of launches made."""
    if engine.ops.name != "triton" or engine.device.type != "cuda":
        return 0
    scratch = engine.cache.scratch_block
    va = importlib.import_module("specdec.kernels.verify_attention")
    drafter = engine.drafter
    trees = getattr(drafter, "tree", None) is not None
    models = [(engine.target, engine.cache, None)] + drafter.own_forwards()
    launches = 0
    for model, cache, num_layers in models:
        k_cache, v_cache = cache.layer(0)
        launches += va.precompile(k_cache, v_cache, model.config.num_heads, scratch, trees=trees,
                                  kinds=model.attention_kinds())
        launches += _one_token_forward(model, cache, engine.ops, scratch, num_layers)
    launches += _sampler_warm_up(engine, modes, trees, batch_sizes)
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


def _sampler_warm_up(engine, modes: tuple[str, ...], trees: bool, batch_sizes: list[int]) -> int:
    """The samplers' eager calls: every sampling mode, every chain length, and every
    power of two of the batch sizes (the samplers' one batch-dependent constexpr maps a
    row to its sequence), with logits in the model's dtype as the engine hands them."""
    dev, ops = engine.device, engine.ops
    V = engine.target.config.vocab_size
    dtype = engine.target.lm_head.weight.dtype
    with_q = engine.drafter.samples_q
    launches = 0
    for B in sorted({triton.next_power_of_2(max(b, 1)) for b in batch_sizes} or {1}):
        for mode in modes:
            filtered = mode == "filtered"
            temperature = torch.full((B,), 0.0 if mode == "greedy" else 1.0, device=dev)
            top_k = torch.full((B,), 5 if filtered else 0, dtype=torch.int32, device=dev)
            top_p = torch.full((B,), 0.9 if filtered else 1.0, device=dev)
            seeds = offsets = torch.zeros(B, dtype=torch.int64, device=dev)
            hints = dict(filtered=filtered, radix_rounds=8 if filtered else 0)
            for k in range(engine.draft_depth + 1):
                logits = torch.zeros(B * (k + 1), V, dtype=dtype, device=dev)
                ids = torch.zeros(B * k, dtype=torch.int64, device=dev)
                q = None
                if with_q and k > 0:  # the draft side: the fused draft sampler makes q
                    rep = lambda t, k=k: t.repeat_interleave(k)  # noqa: E731
                    _, q = ops.draft_sample(torch.zeros(B * k, V, dtype=dtype, device=dev), rep(temperature),
                                            rep(top_k), rep(top_p), rep(seeds), rep(offsets), 16, **hints)
                    launches += 1
                cu = torch.arange(B + 1, dtype=torch.int32, device=dev) * k
                ops.rejection_sample(logits, ids, q, cu, k, temperature, top_k, top_p, seeds, offsets,
                                     check_finite=False, **hints)
                launches += 1
            if trees:
                launches += _tree_sampler_warm_up(engine, B, dtype, with_q, temperature, top_k, top_p, seeds,
                                                  hints["radix_rounds"])
    return launches


def _tree_sampler_warm_up(engine, B: int, dtype, with_q: bool, temperature, top_k, top_p, seeds,
                          radix_rounds: int) -> int:
    """The tree sampler for B chains-as-trees of the drafter's node count, every depth."""
    dev, ops = engine.device, engine.ops
    V = engine.target.config.vocab_size
    n = engine.num_draft_tokens
    logits = torch.zeros(B * (n + 1), V, dtype=dtype, device=dev)
    q = None
    if with_q:
        rep = lambda t: t.repeat_interleave(n + 1)  # noqa: E731
        _, q = ops.draft_sample(torch.zeros(B * (n + 1), V, dtype=dtype, device=dev), rep(temperature),
                                rep(top_k), rep(top_p), rep(seeds), rep(seeds), 16)
    parents = torch.arange(-1, n - 1, dtype=torch.int32, device=dev).repeat(B)
    cu = torch.arange(0, B * n + 1, n, dtype=torch.int32, device=dev)
    ids = torch.zeros(B * n, dtype=torch.int64, device=dev)
    for depth in range(1, engine.draft_depth + 1):
        ops.tree_rejection_sample(logits, ids, parents, q, cu, depth, temperature, top_k, top_p, seeds, seeds,
                                  check_finite=False, radix_rounds=radix_rounds)
    return engine.draft_depth + int(with_q)
