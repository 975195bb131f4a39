"""Every Triton kernel compiles for sm_90 and sm_80 with no spills: checked without a GPU.

tests/gpu_offline.py runs the real launchers on CPU tensors with a stand-in Triton driver
reporting an H100/H200 (sm_90, 132 SMs) and then an A100 (sm_80, 108 SMs); Triton's real
CUDA pipeline and ptxas compile every kernel they launch. It runs here in two
subprocesses (one per arch, side by side) without TRITON_INTERPRET and with a fresh
Triton cache, so nothing compiled by an earlier run can make this pass.

Checked: each case compiles (or, for float32 attention the GPU cannot run without
spilling, is refused before any launch with a clear error); shared memory within the
arch's opt-in limit; registers x threads within the SM's register file; no ptxas spill in
any variant; the attention policy's budgets at the headline shapes (K/V read at most twice
per KV head for the B=8, 64-node tree; >= 64 programs for decode at B=1 over 4,096
positions); attention variants that differ only by batch size are compiled once.
"""

from __future__ import annotations

import json
import math
import os
import pathlib
import subprocess
import sys

import pytest

import gpu_offline as g

ROOT = pathlib.Path(__file__).resolve().parents[1]
ARCHS = (90, 80)


@pytest.fixture(scope="module")
def compiled(tmp_path_factory) -> dict[int, list[dict]]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    procs = {}
    for arch in ARCHS:  # one process per arch, so the two compile side by side
        cache = tmp_path_factory.mktemp(f"triton-cache-sm{arch}")
        procs[arch] = subprocess.Popen(
            [sys.executable, str(ROOT / "tests" / "gpu_offline.py"), str(arch)], cwd=ROOT,
            env=dict(env, TRITON_CACHE_DIR=str(cache)), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True)
    out = {}
    for arch, proc in procs.items():
        try:
            stdout, stderr = proc.communicate(timeout=600)
        except subprocess.TimeoutExpired:
            for p in procs.values():
                p.kill()
            pytest.fail(f"offline compile for sm_{arch} took over 600 s")
        assert proc.returncode == 0, f"tests/gpu_offline.py {arch} failed:\n{stderr[-4000:]}"
        data = json.loads(stdout.strip().splitlines()[-1])
        if "skip" in data:
            pytest.skip(f"offline GPU compile test: {data['skip']}")
        out[arch] = data["results"]
    return out


def _launches(results, kernel=None):
    for r in results:
        for launch in r["launches"]:
            if kernel is None or launch["kernel"] == kernel:
                yield r, launch


def _case(results, label):
    (found,) = [r for r in results if r["label"] == label]
    return found


@pytest.mark.parametrize("arch", ARCHS)
def test_every_case_compiles_or_is_refused_up_front(compiled, arch):
    results = compiled[arch]
    errors = [f"{r['label']}: {r['error']}" for r in results if r["error"] and "refused" not in r["label"]]
    assert not errors, "\n".join(errors)
    for r in results:
        if "refused" in r["label"]:
            assert r["error"] and "float32 attention on a GPU supports at most" in r["error"], r
            assert r["launches"] == [], "refused only after launching"
    kernels = {launch["kernel"] for _, launch in _launches(results)}
    want = {"_verify_attention_kernel", "_combine_splits_kernel", "_partials_kernel", "_row_finish_kernel",
            "_radix_hist_kernel", "_radix_step_kernel", "_chain_accept_kernel", "_chain_emit_kernel",
            "_draft_chunk_kernel", "_draft_emit_kernel", "_tree_partials_kernel", "_tree_rows_kernel",
            "_tree_walk_kernel"}
    if arch == 90:
        want |= {"_add_rms_norm_kernel", "_rotary_kernel", "_silu_mul_kernel", "_copy_slots_kernel"}
    assert want <= kernels, f"never compiled: {want - kernels}"


@pytest.mark.parametrize("arch", ARCHS)
def test_resources_within_the_arch_limits_and_no_spills(compiled, arch):
    bad = []
    for r, launch in _launches(compiled[arch]):
        if r["label"].startswith("control:"):
            continue
        where = f"sm_{arch} {r['label']} {launch['kernel']} {launch['constexprs']}"
        if "regs" not in launch or "spill_stores" not in launch:
            bad.append(f"{where}: no ptxas -v report was captured")
            continue
        if launch["spill_stores"] or launch["spill_loads"]:
            bad.append(f"{where}: spills {launch['spill_stores']} B stored / {launch['spill_loads']} B loaded")
        if launch["shared"] > g.MAX_SHARED[arch]:
            bad.append(f"{where}: {launch['shared']} B of shared memory > {g.MAX_SHARED[arch]}")
        if launch["regs"] * launch["num_warps"] * 32 > 65536:
            bad.append(f"{where}: {launch['regs']} registers x {launch['num_warps']} warps > 64K")
    assert not bad, "\n".join(bad)


def test_the_spill_check_sees_a_spilling_variant(compiled):
    # the control case forces 32 x 32 fp32 tiles, which ptxas spills: the report must show it
    (control,) = [r for r in compiled[90] if r["label"].startswith("control:")]
    (launch,) = control["launches"]
    assert launch["spill_stores"] > 0 and launch["regs"] == 255


@pytest.mark.parametrize("arch", ARCHS)
def test_headline_tree_reads_each_kv_head_at_most_twice_and_fills_the_gpu(compiled, arch):
    # B=8, 32 query / 8 KV heads, D=128, 4,096 prefix, 64-node tree: every query tile of a
    # (sequence, KV head) streams that head's whole K/V once
    (launch,) = [x for x in _case(compiled[arch], "attn 8B tree64 B=8")["launches"]
                 if x["kernel"] == "_verify_attention_kernel"]
    block_q = launch["constexprs"]["BLOCK_M"] // 4
    tiles = math.ceil(64 / block_q)
    assert tiles <= 2, f"K/V streamed {tiles}x per KV head (BLOCK_M={launch['constexprs']['BLOCK_M']})"
    assert launch["grid"][1:] == [8, 8]
    splits = launch["grid"][0] // tiles
    assert math.prod(launch["grid"]) >= g.SM_COUNT[arch], f"grid {launch['grid']} leaves SMs idle"
    assert splits == 1 or launch["constexprs"]["SPLIT"]


@pytest.mark.parametrize("arch", ARCHS)
def test_each_sampler_spreads_a_batch_one_row_over_at_least_32_programs(compiled, arch):
    # at batch 1 and V = 128,256 the vocabulary is split across programs: the largest
    # launch of each sampler has >= 32 of them (one program per sequence before)
    for prefix in ("rejection B=1", "draft sample N=1", "tree B=1"):
        grids = [math.prod(launch["grid"]) for r in compiled[arch] if r["label"].startswith(prefix)
                 for launch in r["launches"]]
        assert grids and max(grids) >= 32, f"sm_{arch} {prefix}: largest launch {max(grids, default=0)} programs"


@pytest.mark.parametrize("arch", ARCHS)
def test_decode_at_batch_one_fills_the_gpu_in_the_eager_path(compiled, arch):
    # the eager engine passes max_seq_len = the longest sequence (4,097 here)
    (launch,) = [x for x in _case(compiled[arch], "attn 8B decode B=1")["launches"]
                 if x["kernel"] == "_verify_attention_kernel"]
    assert math.prod(launch["grid"]) >= 64, launch["grid"]


def test_batch_size_and_split_count_do_not_make_new_attention_variants(compiled):
    # the split count, block-table width and split strides are not specialised: decode
    # at B=1 (28 splits) and B=16 (2 splits) run the same compiled kernel, and so do the
    # chain and tree cases at two batch sizes
    results = compiled[90]
    pairs = [("attn 8B decode B=1", "attn 8B decode B=16"), ("attn 8B chain k=4 B=1", "attn 8B chain k=4 B=16"),
             ("attn 8B tree64 B=8", "attn 8B tree64 B=1"), ("attn 8B decode B=1", "attn 8B decode B=1 graph")]
    for a, b in pairs:
        first, second = _case(results, a), _case(results, b)
        assert second["new_variants"] == 0, f"{b} compiled again after {a}"
        assert [x["variant"] for x in first["launches"]] == [x["variant"] for x in second["launches"]]
    # and no two compiled attention variants differ only in how Triton specialised an int
    variants = {}
    for _, launch in _launches(results, "_verify_attention_kernel"):
        key = (json.dumps(launch["constexprs"], sort_keys=True), launch["signature"], launch["num_warps"])
        variants.setdefault(key, set()).add(launch["attrs"])
    again = {k: v for k, v in variants.items() if len(v) > 1}
    assert variants and not again, f"attention variants specialised on int values: {again}"
