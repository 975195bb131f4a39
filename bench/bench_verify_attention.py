"""Verification attention: eager reference vs SDPA + mask vs the Triton kernel.

    python -m pytest bench/bench_verify_attention.py --benchmark-only   # pytest-benchmark
    PYTHONPATH=. python bench/bench_verify_attention.py                 # GPU markdown table

On a GPU the sweep is B = 8, 32 query heads, 8 KV heads, head_dim 128, bf16, page 16,
prefix 512..16384, draft tree 1..64 nodes (random parents). Without one it is a smoke
run at tiny sizes under Triton's interpreter.

Peers, all timed on the same inputs with a device synchronise inside the timed call:
  eager        specdec.kernels.reference.verify_attention (per-sequence loop)
  sdpa_gqa     torch SDPA with a boolean mask and enable_gqa=True
  sdpa_repeat  torch SDPA with a boolean mask, K/V repeated to H heads
  triton       specdec.kernels.verify_attention.verify_attention
SDPA needs dense K/V: the gather from the paged cache (``k_cache[block_table]``) and the
head repeat are INSIDE the timing, since a paged engine has to do them every layer. The
boolean mask [B, 1, n, L] is built once outside it (per-step metadata shared by layers).

Bandwidth counts each byte the op must move once:
    bytes = sum_b seq_lens[b] * H_kv * D * 2 (K and V) * elem  +  2 * T * H * D * elem (q, out)
    GB/s  = bytes / time
and FLOPs the visible (query, key) pairs: 4 * D * H * sum_t visible_keys(t) (QK^T and PV).

The KV copies (``test_kv_copy``) time specdec.kernels.kv_cache_ops.write_kv and move_kv,
the torch backend's (the reference) vs the Triton backend's.
"""

from __future__ import annotations

import functools
import importlib
import math
import random

import pytest
import torch
import torch.nn.functional as F

from specdec.kernels import reference as ref
from specdec.kernels.kv_cache_ops import move_kv, write_kv

KV_IMPLS = {"torch": (ref.write_kv, ref.move_kv), "triton": (write_kv, move_kv)}  # per backend

# the module, not the function of the same name that specdec.kernels may re-export
va = importlib.import_module("specdec.kernels.verify_attention")
policy = importlib.import_module("specdec.kernels._attention_policy")

GPU = torch.cuda.is_available()
DEVICE = "cuda" if GPU else "cpu"
PAGE = 16


# --------------------------------------------------------------------------- inputs


def tree_masks(n: int, seed: int) -> tuple[torch.Tensor, list[int]]:
    """Random tree of n nodes (parent < child): ancestor bitmasks [n] int64, depths."""
    rng = random.Random(seed)
    bits, depth = [], []
    for i in range(n):
        p = rng.randrange(i) if i else -1
        bits.append((1 << i) | (bits[p] if p >= 0 else 0))
        depth.append(depth[p] + 1 if p >= 0 else 0)
    signed = [b - (1 << 64) if b >= 1 << 63 else b for b in bits]
    return torch.tensor(signed, dtype=torch.int64), depth


def make_inputs(B: int, H: int, H_kv: int, D: int, prefix: int, tree: int,
                dtype=torch.bfloat16, device=DEVICE, seed: int = 0, causal: bool = False) -> dict:
    """B sequences with ``prefix`` cached tokens and a ``tree``-node draft each.

    causal=True: the new tokens are a chain with tree_mask=None (prefill; any length).
    """
    g = torch.Generator(device="cpu").manual_seed(seed)
    length = prefix + tree
    blocks = math.ceil(length / PAGE)
    num_blocks = B * blocks + 1
    k_cache = torch.randn(num_blocks, PAGE, H_kv, D, generator=g).to(device, dtype)
    v_cache = torch.randn(num_blocks, PAGE, H_kv, D, generator=g).to(device, dtype)
    block_table = torch.randperm(num_blocks, generator=g)[: B * blocks].view(B, blocks)
    q = torch.randn(B * tree, H, D, generator=g).to(device, dtype)
    mask, depth = (None, list(range(tree))) if causal else tree_masks(tree, seed)
    return dict(
        q=q, k_cache=k_cache, v_cache=v_cache,
        block_table=block_table.to(device, torch.int32),
        seq_lens=torch.full((B,), length, dtype=torch.int32, device=device),
        q_start=torch.arange(0, B * tree + 1, tree, dtype=torch.int32, device=device),
        tree_mask=None if causal else mask.repeat(B).to(device), scale=D ** -0.5,
        # host-side metadata, not kernel arguments
        _n=tree, _depth=depth, _bt64=block_table.to(device),
    )


def kernel_args(inp: dict) -> dict:
    return {k: v for k, v in inp.items() if not k.startswith("_")}


def sdpa_mask(inp: dict) -> torch.Tensor:
    """[B, 1, n, L] bool (True = attend) over the gathered [0, max_blocks * PAGE) keys."""
    B, n = inp["block_table"].shape[0], inp["_n"]
    L = inp["block_table"].shape[1] * PAGE
    prefix = inp["seq_lens"][:, None] - n  # [B, 1]
    pos = torch.arange(L, device=inp["q"].device)[None, :]  # [1, L]
    j = (pos - prefix).clamp(0, 63)  # [B, L]
    if inp["tree_mask"] is None:  # causal: query i sees new token j <= i
        i = torch.arange(n, device=pos.device)
        sees = (j[:, None, :] <= i[None, :, None]) & (pos >= prefix)[:, None, :]
    else:
        bits = inp["tree_mask"].view(B, n)  # [B, n]
        sees = ((bits[:, :, None] >> j[:, None, :]) & 1).bool()  # [B, n, L]
    visible = (pos < prefix)[:, None, :] | (sees & (pos < prefix + n)[:, None, :])
    return visible[:, None]


def sdpa_paged(inp: dict, mask: torch.Tensor, enable_gqa: bool) -> torch.Tensor:
    """Gather the paged K/V densely, then SDPA with the boolean mask."""
    q, k_cache, v_cache, bt = inp["q"], inp["k_cache"], inp["v_cache"], inp["_bt64"]
    B, n = bt.shape[0], inp["_n"]
    T, H, D = q.shape
    group = H // k_cache.shape[2]
    k = k_cache[bt].flatten(1, 2).transpose(1, 2)  # [B, H_kv, L, D]
    v = v_cache[bt].flatten(1, 2).transpose(1, 2)
    if not enable_gqa:
        k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)  # [B, H, L, D]
    qb = q.view(B, n, H, D).transpose(1, 2)  # [B, H, n, D]
    kwargs = dict(enable_gqa=True) if enable_gqa else {}
    o = F.scaled_dot_product_attention(qb, k, v, attn_mask=mask, scale=inp["scale"], **kwargs)
    return o.transpose(1, 2).reshape(T, H, D)


def runner(impl: str, inp: dict):
    """A zero-argument callable computing the attention with ``impl``."""
    args = kernel_args(inp)
    if impl == "eager":
        return lambda: ref.verify_attention(**args)
    if impl in ("sdpa_gqa", "sdpa_repeat"):
        mask = sdpa_mask(inp)
        return lambda: sdpa_paged(inp, mask, enable_gqa=impl == "sdpa_gqa")
    if impl == "triton":
        n, max_len = inp["_n"], int(inp["seq_lens"].max())
        return lambda: va.verify_attention(**args, max_query_len=n, max_seq_len=max_len)
    raise ValueError(f"unknown impl {impl!r}")


def traffic(inp: dict) -> tuple[int, int]:
    """(bytes, flops) by the formulas in the module docstring."""
    q, kc = inp["q"], inp["k_cache"]
    T, H, D = q.shape
    elem = q.element_size()
    B, n = inp["block_table"].shape[0], inp["_n"]
    kv_tokens = int(inp["seq_lens"].sum())
    nbytes = kv_tokens * kc.shape[2] * D * 2 * elem + 2 * T * H * D * elem
    prefix = kv_tokens // B - n
    visible = B * sum(prefix + d + 1 for d in inp["_depth"])
    return nbytes, 4 * D * H * visible


def _sync():
    if GPU:
        torch.cuda.synchronize()


# --------------------------------------------------------------------------- pytest-benchmark

if GPU:
    SHAPE = dict(B=8, H=32, H_kv=8, D=128, dtype=torch.bfloat16)
    SWEEP = [(p, t) for p in (512, 2048, 4096, 16384) for t in (1, 4, 16, 64)]
else:  # interpreter smoke run
    SHAPE = dict(B=2, H=4, H_kv=2, D=32, dtype=torch.float32)
    SWEEP = [(40, 1), (40, 8)]


@pytest.mark.parametrize("impl", ["eager", "sdpa_gqa", "sdpa_repeat", "triton"])
@pytest.mark.parametrize("prefix,tree", SWEEP, ids=[f"prefix{p}-tree{t}" for p, t in SWEEP])
def test_verify_attention(benchmark, impl, prefix, tree):
    inp = make_inputs(prefix=prefix, tree=tree, **SHAPE)
    fn = runner(impl, inp)
    # every peer computes the same thing (the SDPA mask and gather included)
    tol = 3e-2 if SHAPE["dtype"] == torch.bfloat16 else 1e-4
    torch.testing.assert_close(fn().float(), ref.verify_attention(**kernel_args(inp)).float(),
                               atol=tol, rtol=tol)

    def timed():
        fn()
        _sync()

    benchmark.pedantic(timed, rounds=20 if GPU else 2, warmup_rounds=3 if GPU else 1)
    if benchmark.stats is None:  # --benchmark-disable: ran once, nothing to report
        return
    nbytes, flops = traffic(inp)
    sec = benchmark.stats.stats.median
    benchmark.extra_info.update(
        {"GB/s": round(nbytes / sec / 1e9, 1), "TFLOP/s": round(flops / sec / 1e12, 2),
         "gather_in_timing": impl.startswith("sdpa")})


KV_ROWS = (8 * 64, 8, 128) if GPU else (16, 2, 32)  # write: T new tokens, H_kv, D


@pytest.mark.parametrize("impl", ["torch", "triton"])
@pytest.mark.parametrize("op", ["write_kv", "move_kv"])
def test_kv_copy(benchmark, op, impl):
    # bytes = rows * H_kv * D * elem * 2 (K and V) * 2 (read + write)
    T, h_kv, d = KV_ROWS
    dtype = torch.bfloat16 if GPU else torch.float32
    num_slots = 64 * T
    k_cache = torch.zeros(num_slots // PAGE, PAGE, h_kv, d, dtype=dtype, device=DEVICE)
    v_cache = torch.zeros_like(k_cache)
    slots = torch.randperm(num_slots, device=DEVICE)[:T]
    if op == "write_kv":
        k = torch.randn(T, h_kv, d, dtype=dtype, device=DEVICE)
        rows, fn = T, lambda: KV_IMPLS[impl][0](k, k, k_cache, v_cache, slots)
    else:  # compaction: every sequence moves ~1/8 of its tree down by a few slots
        rows = T // 8
        src = torch.sort(slots[:rows]).values
        dst = (src - 3).clamp(min=0)
        fn = lambda: KV_IMPLS[impl][1](k_cache, v_cache, src, dst)  # noqa: E731

    def timed():
        fn()
        _sync()

    benchmark.pedantic(timed, rounds=50 if GPU else 2, warmup_rounds=3 if GPU else 1)
    if benchmark.stats is None:  # --benchmark-disable
        return
    nbytes = rows * h_kv * d * k_cache.element_size() * 2 * 2
    benchmark.extra_info["GB/s"] = round(nbytes / benchmark.stats.stats.median / 1e9, 2)


# --------------------------------------------------------------------------- GPU table


def _time_us(fn) -> float:
    if GPU:
        import triton.testing

        return 1e3 * triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")
    import time

    fn()
    t0 = time.perf_counter()
    fn()
    return 1e6 * (time.perf_counter() - t0)


def _check_against_reference(inp: dict, **kwargs) -> float:
    args = kernel_args(inp)
    out = va.verify_attention(**args, **kwargs).float()
    want = ref.verify_attention(**args).float()
    torch.testing.assert_close(out, want, atol=3e-2, rtol=3e-2)
    return (out - want).abs().max().item()


def print_tables(shape: dict, cases: list[tuple[int, int]], prefill: int,
                 configs: list[tuple[int, ...]], kv_rows: tuple[int, ...]) -> None:
    """Check against the reference, then print markdown tables (see run_gpu_table)."""
    B, H, H_kv, D = shape["B"], shape["H"], shape["H_kv"], shape["D"]
    head_prefix, head_tree = cases[0]
    head = make_inputs(prefix=head_prefix, tree=head_tree, **shape)
    dev = torch.cuda.get_device_name() if GPU else "cpu (interpreter)"
    print(f"device: {dev}, torch {torch.__version__}")

    # -- correctness at the benchmarked sizes: tree, decode with KV splits, prefill --
    err = _check_against_reference(head, max_query_len=head_tree)
    print(f"max |triton - reference| prefix {head_prefix}, tree {head_tree}: {err:.3g}")
    dec = make_inputs(prefix=head_prefix, tree=1, **shape)
    err = _check_against_reference(dec, max_query_len=1, max_seq_len=head_prefix + 1)
    print(f"max |triton - reference| decode (split-KV allowed): {err:.3g}")
    pre = make_inputs(prefix=0, tree=prefill, causal=True, **dict(shape, B=2))
    err = _check_against_reference(pre, max_query_len=prefill)
    print(f"max |triton - reference| prefill 2 x {prefill} causal: {err:.3g}")
    mask = sdpa_mask(head)
    err = sdpa_paged(head, mask, True).float() - ref.verify_attention(**kernel_args(head)).float()
    print(f"max |sdpa_gqa - reference| headline: {err.abs().max().item():.3g}")
    del dec, pre

    # -- timings --
    impls = ["eager", "sdpa_gqa", "sdpa_repeat", "triton"]
    print(f"\nB={B}, H={H}, H_kv={H_kv}, D={D}, {shape['dtype']}, page {PAGE}; "
          "SDPA times include the paged gather (and the head repeat for sdpa_repeat)")
    print("\n| prefix | tree | " + " | ".join(f"{i} µs" for i in impls)
          + " | triton GB/s | triton TFLOP/s | best SDPA GB/s |")
    print("|" + "---|" * (len(impls) + 5))
    for prefix, tree in cases:
        inp = make_inputs(prefix=prefix, tree=tree, **shape)
        us = {i: _time_us(runner(i, inp)) for i in impls}
        nbytes, flops = traffic(inp)
        best_sdpa = min(us["sdpa_gqa"], us["sdpa_repeat"])
        print(f"| {prefix} | {tree} | " + " | ".join(f"{us[i]:.1f}" for i in impls)
              + f" | {nbytes / us['triton'] / 1e3:.0f} | {flops / us['triton'] / 1e6:.1f}"
              f" | {nbytes / best_sdpa / 1e3:.0f} |")
        del inp

    # -- tile configs for the headline case (the heuristic's pick is marked) --
    args = kernel_args(head)
    picked = policy.pick_config(B, H_kv, H // H_kv, D, head_tree, head_prefix + head_tree,
                             shape["dtype"], head["q"].device)
    nbytes, _ = traffic(head)
    print(f"\nheadline tile configs (picked: {picked})\n\n| block_m | block_n | warps | stages "
          "| splits | µs | GB/s |\n|---|---|---|---|---|---|---|")
    for bm, bn, w, st, sp in configs:
        cfg = policy.Config(bm, bn, w, st, sp)
        try:
            us = _time_us(functools.partial(va._launch_attention, **args, max_query_len=head_tree, cfg=cfg))
            print(f"| {bm} | {bn} | {w} | {st} | {sp} | {us:.1f} | {nbytes / us / 1e3:.0f} |")
        except Exception as exc:  # e.g. out of shared memory for this config
            print(f"| {bm} | {bn} | {w} | {st} | {sp} | failed: {type(exc).__name__} | |")

    # -- KV copies: the choice behind write_kv / move_kv --
    print("\n| op | rows | torch µs | triton µs |\n|---|---|---|---|")
    nb = 4 * max(kv_rows)
    k_cache = torch.zeros(nb, PAGE, H_kv, D, dtype=shape["dtype"], device=DEVICE)
    v_cache = torch.zeros_like(k_cache)
    for rows in kv_rows:
        slots = torch.randperm(nb * PAGE, device=DEVICE)[:rows]
        k = torch.randn(rows, H_kv, D, device=DEVICE).to(shape["dtype"])
        t = [_time_us(functools.partial(KV_IMPLS[i][0], k, k, k_cache, v_cache, slots))
             for i in ("torch", "triton")]
        print(f"| write_kv | {rows} | {t[0]:.1f} | {t[1]:.1f} |")
        src = torch.sort(slots).values
        dst = (src - 3).clamp(min=0)
        t = [_time_us(functools.partial(KV_IMPLS[i][1], k_cache, v_cache, src, dst))
             for i in ("torch", "triton")]
        print(f"| move_kv | {rows} | {t[0]:.1f} | {t[1]:.1f} |")


def run_gpu_table() -> None:
    """One-shot GPU report: checks, then markdown tables on stdout.

    Headline: B=8, H=32, H_kv=8, D=128, prefix 4096, 64-node tree, bf16 (eager /
    SDPA + mask / triton, µs and GB/s), a few other (prefix, tree) points, a tile-config
    sweep of the headline, and write_kv / move_kv torch vs triton.
    """
    if not GPU:
        raise RuntimeError("run_gpu_table needs a CUDA device")
    torch.manual_seed(0)
    print_tables(
        shape=dict(B=8, H=32, H_kv=8, D=128, dtype=torch.bfloat16),
        cases=[(4096, 64), (512, 64), (16384, 64), (4096, 16), (4096, 1), (16384, 1),
               (16384, 16)],
        prefill=2048,
        configs=[(64, 64, 4, 3, 1), (64, 32, 4, 3, 1), (64, 128, 4, 2, 1), (128, 64, 8, 3, 1),
                 (128, 32, 8, 3, 1), (64, 64, 4, 2, 1), (64, 64, 8, 3, 1), (64, 64, 4, 3, 2)],
        kv_rows=(8, 512),
    )


# --------------------------------------------------------------------------- budgets

HEADLINE_GOAL_US = 64.0  # B=8, 32/8 heads, D=128, prefix 4,096, 64-node tree, bf16
DECODE_FLOOR_FACTOR = 1.5  # decode at B=1, prefix 4,096: within 1.5x of the K/V read floor
HBM_BYTES_PER_S = 4.17e12  # H200 copy bandwidth measured on the GPU image (TOOLCHAIN.md)


def _kernel_us(fn) -> float:
    """Median µs of ``fn`` replayed from a CUDA graph (the launch overhead a graph step
    pays, not the Python of an eager call); the interpreter's wall time on CPU."""
    if not GPU:
        return _time_us(fn)
    import triton.testing

    fn()  # compile outside the capture
    torch.cuda.synchronize()
    return 1e3 * triton.testing.do_bench_cudagraph(fn, rep=100, return_mode="median")


def run_budget_table(shape: dict | None = None, prefix: int = 4096, tree: int = 64,
                     hbm: float = HBM_BYTES_PER_S) -> bool:
    """The attention budgets, one row printed (and flushed) as each is measured:
    headline tree verification vs the 64 µs goal, and decode at B=1 vs 1.5x the K/V read
    floor (bytes of K and V over ``hbm``), each with the previous policy for comparison.
    Every timed launch is first checked against the reference. Returns whether both
    budgets hold."""
    shape = shape or dict(B=8, H=32, H_kv=8, D=128, dtype=torch.bfloat16)
    H, H_kv, D = shape["H"], shape["H_kv"], shape["D"]
    print("| case | config | µs | budget µs | verdict |\n|---|---|---|---|---|", flush=True)
    ok = True
    for name, inp in (("tree", make_inputs(prefix=prefix, tree=tree, **shape)),
                      ("decode B=1", make_inputs(prefix=prefix, tree=1, causal=True, **dict(shape, B=1)))):
        args, n = kernel_args(inp), inp["_n"]
        max_len = prefix + n
        kv_bytes = int(inp["seq_lens"].sum()) * H_kv * D * 2 * inp["q"].element_size()
        budget = HEADLINE_GOAL_US if name == "tree" else DECODE_FLOOR_FACTOR * kv_bytes / hbm * 1e6
        picked = policy.pick_config(inp["block_table"].shape[0], H_kv, H // H_kv, D, n, max_len,
                                   shape["dtype"], inp["q"].device)
        old = policy.Config(64 if name == "tree" else 16, 64, 4, 3, 1)  # queries split, no KV split
        for label, cfg in (("policy", picked), ("previous", old)):
            with policy.forcing(cfg):
                _check_against_reference(inp, max_query_len=n, max_seq_len=max_len)
                us = _kernel_us(functools.partial(va.verify_attention, **args, max_query_len=n, max_seq_len=max_len))
            verdict = ("ok" if us <= budget else "OVER") if label == "policy" else "reference"
            ok &= verdict != "OVER"
            print(f"| {name} prefix {prefix} | {label} m{cfg.block_m} n{cfg.block_n} w{cfg.num_warps} "
                  f"s{cfg.num_stages} splits {cfg.num_splits} | {us:.1f} | {budget:.1f} | {verdict} |", flush=True)
        del inp
    return ok


def test_budget_table_smoke(benchmark):
    """The budget table's code path at tiny sizes (on CPU: under the interpreter)."""
    if GPU:
        pytest.skip("on a GPU run run_budget_table() itself")
    benchmark.pedantic(lambda: None, rounds=1)
    run_budget_table(shape=dict(B=2, H=4, H_kv=2, D=32, dtype=torch.float32), prefix=40, tree=8)


def test_table_smoke(benchmark):
    """The GPU report's code path at tiny sizes (on CPU: under the interpreter)."""
    if GPU:
        pytest.skip("on a GPU run run_gpu_table() itself")
    benchmark.pedantic(lambda: None, rounds=1)
    print_tables(shape=dict(B=2, H=4, H_kv=2, D=32, dtype=torch.float32),
                 cases=[(40, 8), (20, 1)], prefill=70,
                 configs=[(16, 16, 4, 1, 1), (32, 16, 4, 1, 2)], kv_rows=(4,))


if __name__ == "__main__":
    run_gpu_table()
