"""Launch policy of verify_attention, host-side and from shapes only: tile shapes per GPU
architecture, KV splits (flash-decoding) to fill the GPU, the variants to precompile.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import os
from dataclasses import dataclass

import torch
import triton

from ._validation import require


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


# Policy (host-side, from shapes only):
#
# * Query tiles keep every query row of a (sequence, KV head) together, up to 128 rows
#   (GQA group folded in): each extra query tile re-streams that KV head's K/V, so tiles
#   are never shrunk to make more programs.
# * The GPU is filled along the KV range instead (flash-decoding): when the grid has
#   fewer programs than two per SM, each program's KV range is split and
#   ``_combine_splits_kernel`` merges the partial results. The split count is the
#   smallest that reaches ~85 % of the best wave efficiency (as FlashAttention's
#   ``num_splits_heuristic``), each split streaming at least _MIN_SPLIT_TILES KV tiles.
# * Register budget (``_tiles``): D = 256 and sm_80 use narrower KV tiles; float32 (ieee
#   dots) uses 16x16 / 32x16 tiles and is refused on a GPU when a query's GQA group does
#   not fit them (more than 32 query heads per KV head, 16 for head_dim > 128).
#   tests/test_gpu_compile.py compiles the variants for sm_80 and sm_90 and fails on any spill.
# * Split counts are runtime ints and the split flag a constexpr, so one model has a
#   handful of compiled variants (``policy_tiles`` x tree/causal x split/not).

MAX_SPLITS = 32  # partials the combine kernel merges (its BLOCK_S)
_MIN_SPLIT_TILES = 2  # KV tiles a split streams at least
_MAX_FP32_GROUP = {128: 32, 256: 16}  # float32: query heads per KV head a tile can hold


@dataclass(frozen=True)
class Config:
    block_m: int  # tile rows = BLOCK_Q queries x GROUP heads (a power of two >= 16)
    block_n: int  # KV positions per step
    num_warps: int
    num_stages: int
    num_splits: int = 1  # KV splits (flash-decoding); > 1 adds a combine launch


@dataclass(frozen=True)
class Gpu:
    sms: int
    arch: int  # compute capability major * 10 + minor: 80 (A100), 90 (H100/H200)


@functools.cache
def _gpu_of(index: int) -> Gpu:
    props = torch.cuda.get_device_properties(index)
    return Gpu(props.multi_processor_count, props.major * 10 + props.minor)


def gpu_of_device(device: torch.device) -> Gpu | None:
    """SM count and architecture of a CUDA device (host-only, cached); None off CUDA."""
    if device.type != "cuda":
        return None
    return _gpu_of(device.index if device.index is not None else torch.cuda.current_device())


# test-only: a config every launch uses instead of the policy's (see ``forcing``)
_FORCED: Config | None = None


@contextlib.contextmanager
def forcing(cfg: Config):
    """Test-only override: every ``verify_attention`` call inside uses ``cfg``."""
    global _FORCED
    before, _FORCED = _FORCED, cfg
    try:
        yield
    finally:
        _FORCED = before


def _tiles(dtype: torch.dtype, head_dim: int, rows: int, group: int, arch: int) -> Config:
    """Tile shape for ``rows`` query rows per (sequence, KV head) on a GPU of ``arch``.

    Register/shared-memory budget per variant, as compiled offline (ptxas 12.8, no spills):
    bf16 D=128 BM=128 w8: 182-214 regs sm_90 (98.5 KiB smem, 2 CTAs/SM); on sm_80
    mma.sync holds Q, S and acc in registers, so BM >= 64 takes 32-wide KV tiles (178-202
    regs; 64-wide spill 172 B). D=256: BM 128 on sm_90 (249 regs), 64 on sm_80 (255).
    fp32 ieee: BM <= 32 (16 for D=256) with 16-wide KV tiles (60-136 regs; 32x32 spills).
    """
    min_m = max(16, triton.next_power_of_2(group))  # a tile holds a query's whole group
    if dtype == torch.float32:
        block_m = max(min(32 if head_dim <= 128 else 16, triton.next_power_of_2(rows)), min_m)
        return Config(block_m, 16, 8 if block_m >= 32 or head_dim > 128 else 4, 2)
    if head_dim > 128:
        cap = 128 if arch >= 90 else 64
        return Config(max(min(cap, triton.next_power_of_2(rows)), min_m), 32, 8, 2)
    block_m = max(min(128, triton.next_power_of_2(rows)), min_m)
    if arch < 90 and head_dim > 64 and block_m >= 64:
        return Config(block_m, 32, 8, 2)
    return Config(block_m, 64, 8 if block_m >= 128 else 4, 3)


def _num_splits(programs: int, kv_len: int, block_n: int, slots: int) -> int:
    """KV splits for a grid of ``programs`` over ``kv_len`` positions on ``slots`` CTA slots.

    Efficiency of s splits = waves / ceil(waves), waves = programs * s / slots; the
    smallest s within 85 % of the best wins (fewer splits: less combine traffic).
    """
    if programs >= slots:
        return 1
    most = max(1, min(MAX_SPLITS, kv_len // (_MIN_SPLIT_TILES * block_n)))
    eff = [0.0]
    for s in range(1, most + 1):
        waves = programs * s / slots
        eff.append(waves / math.ceil(waves))
    best = max(eff)
    return next(s for s in range(1, most + 1) if eff[s] >= 0.85 * best)


def pick_config(num_seqs: int, h_kv: int, group: int, head_dim: int, max_query_len: int,
                 max_seq_len: int | None, dtype: torch.dtype, device: torch.device) -> Config:
    """Tile sizes and KV splits from host-known sizes only (no device read)."""
    if _FORCED is not None:
        return _FORCED
    rows = max_query_len * group  # tile rows one (sequence, KV head) needs
    gpu = gpu_of_device(device)
    if interpreting() or gpu is None:  # few, large programs: the interpreter pays per program
        block_m = min(128, max(16, triton.next_power_of_2(rows), triton.next_power_of_2(group)))
        return Config(block_m, 128, 1, 1)
    cfg = _tiles(dtype, head_dim, rows, group, gpu.arch)
    if max_seq_len is None:
        return cfg
    programs = num_seqs * h_kv * triton.cdiv(max_query_len, max(1, cfg.block_m // group))
    splits = _num_splits(programs, max_seq_len, cfg.block_n, 2 * gpu.sms)
    return dataclasses.replace(cfg, num_splits=splits)


def policy_tiles(dtype: torch.dtype, head_dim: int, group: int, arch: int,
                  max_rows: int = 1 << 16) -> list[Config]:
    """Every tile config ``_tiles`` can return for this model (num_splits 1)."""
    seen = []
    rows = 1
    while rows <= max_rows:
        cfg = _tiles(dtype, head_dim, rows, group, arch)
        if cfg not in seen:
            seen.append(cfg)
        rows *= 2
    return seen


def check_gpu_support(dtype: torch.dtype, head_dim: int, group: int,
                       device: torch.device) -> None:
    """Refuse, before any work, what would compile to a spilling kernel on a GPU."""
    if gpu_of_device(device) is None or interpreting():
        return
    if dtype == torch.float32:
        most = _MAX_FP32_GROUP[128 if head_dim <= 128 else 256]
        require(group <= most,
                f"float32 attention on a GPU supports at most {most} query heads per KV head at "
                f"head_dim {head_dim} (got {group}): a tile holding a query's whole group would "
                "spill registers in fp32; load the model in bfloat16 or float16")

