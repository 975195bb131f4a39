"""Writes into and moves within the paged KV cache, in Triton.

Per layer, the engine scatters the new tokens' keys and values into their cache slots
before attending over them, and after the rejection sampler it compacts the accepted
tree path onto consecutive slots::

    write_kv(k_new, v_new, k_cache, v_cache, slot_mapping)   # [T, H_kv, D] -> cache
    move_kv(k_cache, v_cache, src_slots, dst_slots)          # keep-path compaction

A slot is ``block * block_size + offset`` in the paged layout of
:mod:`specdec.kernels.reference` (the test oracle). Both ops are one kernel,
``_copy_slots_kernel``: one program per row and block of KV heads copies K and V
together, addressing a paged side through its slot and a dense side through the row
index. The torch backend's write_kv / move_kv are the reference's (``reference/kv_ops.py``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._validation import check_kv_cache, require, require_tensor, require_unit_stride, shape_of

__all__ = ["write_kv", "move_kv"]


# --------------------------------------------------------------------------- kernel


# num_slots and h_kv only bound checks and masks of whole rows: not specialised
@triton.jit(do_not_specialize=["num_slots", "h_kv"])
def _copy_slots_kernel(
    src_k_ptr, src_v_ptr, dst_k_ptr, dst_v_ptr, src_slot_ptr, dst_slot_ptr, num_slots, h_kv,
    stride_sk0, stride_sk1, stride_skh, stride_sv0, stride_sv1, stride_svh,
    stride_dk0, stride_dk1, stride_dkh, stride_dv0, stride_dv1, stride_dvh,
    HEAD_DIM: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
    PAGE_SIZE: tl.constexpr, SRC_PAGED: tl.constexpr, DST_PAGED: tl.constexpr,
):
    """Copy row ``i`` ([H_kv, D] of K and of V) from source to destination.

    A paged side is addressed by its slot (``[num_blocks, page, H_kv, D]`` strides
    ``stride_*0`` / ``stride_*1`` for block / in-page offset); a dense side
    (``[N, H_kv, D]``) by ``i`` with ``stride_*0``. Rows whose src or dst slot lies
    outside [0, num_slots) are skipped.
    """
    i = tl.program_id(0).to(tl.int64)
    hb = tl.program_id(1)
    src_slot = tl.load(src_slot_ptr + i).to(tl.int64)
    dst_slot = tl.load(dst_slot_ptr + i).to(tl.int64)
    ok = (src_slot >= 0) & (src_slot < num_slots) & (dst_slot >= 0) & (dst_slot < num_slots)
    if SRC_PAGED:
        src_k_row = (src_slot // PAGE_SIZE) * stride_sk0 + (src_slot % PAGE_SIZE) * stride_sk1
        src_v_row = (src_slot // PAGE_SIZE) * stride_sv0 + (src_slot % PAGE_SIZE) * stride_sv1
    else:
        src_k_row = i * stride_sk0
        src_v_row = i * stride_sv0
    if DST_PAGED:
        dst_k_row = (dst_slot // PAGE_SIZE) * stride_dk0 + (dst_slot % PAGE_SIZE) * stride_dk1
        dst_v_row = (dst_slot // PAGE_SIZE) * stride_dv0 + (dst_slot % PAGE_SIZE) * stride_dv1
    else:
        dst_k_row = i * stride_dk0
        dst_v_row = i * stride_dv0
    h = (hb * BLOCK_H + tl.arange(0, BLOCK_H)).to(tl.int64)[:, None]  # [BLOCK_H, 1]
    d = tl.arange(0, BLOCK_D)[None, :]  # [1, BLOCK_D]
    rows_here = tl.where(ok, h_kv, 0)  # a skipped row copies no head
    mask = (h < rows_here) & (d < HEAD_DIM)
    k = tl.load(src_k_ptr + src_k_row + h * stride_skh + d, mask=mask)
    tl.store(dst_k_ptr + dst_k_row + h * stride_dkh + d, k, mask=mask)
    v = tl.load(src_v_ptr + src_v_row + h * stride_svh + d, mask=mask)
    tl.store(dst_v_ptr + dst_v_row + h * stride_dvh + d, v, mask=mask)


# --------------------------------------------------------------------------- launchers


def _check_kv_rows(name: str, x: torch.Tensor, k_cache: torch.Tensor, rows: int) -> None:
    require_tensor(name, x)
    want = (rows, k_cache.shape[2], k_cache.shape[3])
    require(x.dim() == 3 and tuple(x.shape) == want,
            f"{name} must have shape {want} ([T, H_kv, D] of k_cache "
            f"{shape_of(k_cache)}), got {shape_of(x)}")
    require(x.device == k_cache.device, f"{name} is on {x.device} but k_cache is on "
            f"{k_cache.device}")
    require(x.dtype.is_floating_point, f"{name} must be a float tensor, got {x.dtype}")
    require_unit_stride(name, x)


def _check_slots(name: str, slots: torch.Tensor, k_cache: torch.Tensor) -> None:
    require_tensor(name, slots)
    require(slots.dim() == 1, f"{name} must be 1-D [N], got shape {shape_of(slots)}")
    require(slots.dtype in (torch.int32, torch.int64),
            f"{name} must be int32 or int64, got {slots.dtype}")
    require(slots.device == k_cache.device, f"{name} is on {slots.device} but k_cache is on "
            f"{k_cache.device}")
    require_unit_stride(name, slots)


def _copy_slots(src_k, src_v, dst_k, dst_v, src_slots, dst_slots, page: int, num_slots: int,
                src_paged: bool, dst_paged: bool) -> None:
    """One launch copying K and V rows; see ``_copy_slots_kernel``."""
    n = src_slots.shape[0]
    h_kv, d = dst_k.shape[-2], dst_k.shape[-1]
    block_d = triton.next_power_of_2(d)
    block_h = min(triton.next_power_of_2(h_kv), max(1, 4096 // block_d))
    grid = (n, triton.cdiv(h_kv, block_h))
    _copy_slots_kernel[grid](
        src_k, src_v, dst_k, dst_v, src_slots, dst_slots, num_slots, h_kv,
        src_k.stride(0), src_k.stride(1) if src_paged else 0, src_k.stride(-2),
        src_v.stride(0), src_v.stride(1) if src_paged else 0, src_v.stride(-2),
        dst_k.stride(0), dst_k.stride(1) if dst_paged else 0, dst_k.stride(-2),
        dst_v.stride(0), dst_v.stride(1) if dst_paged else 0, dst_v.stride(-2),
        HEAD_DIM=d, BLOCK_H=block_h, BLOCK_D=block_d, PAGE_SIZE=page,
        SRC_PAGED=src_paged, DST_PAGED=dst_paged, num_warps=4,
    )


def write_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """Scatter new keys and values into the paged cache, in place.

    k, v:            [T, H_kv, D] any float dtype (cast to the cache's), stride 1 in D
    k_cache/v_cache: [num_blocks, block_size, H_kv, D] float16/bfloat16/float32
    slot_mapping:    [T] int32 or int64, slot = block * block_size + offset, each in
                     [0, num_blocks * block_size); a slot outside that range (e.g. -1
                     padding) is skipped. Duplicate slots: one of the writes wins.

    Example::

        >>> kc = torch.zeros(2, 16, 1, 8); vc = torch.zeros(2, 16, 1, 8)
        >>> write_kv(torch.ones(2, 1, 8), torch.ones(2, 1, 8), kc, vc,
        ...          torch.tensor([17, 3]))
        >>> float(kc[1, 1].sum()), float(kc[0, 3].sum())
        (8.0, 8.0)
    """
    check_kv_cache(k_cache, v_cache)
    require_tensor("k", k)
    require(k.dim() == 3, f"k must be [T, H_kv, D], got shape {shape_of(k)}")
    _check_kv_rows("k", k, k_cache, k.shape[0])
    _check_kv_rows("v", v, k_cache, k.shape[0])
    _check_slots("slot_mapping", slot_mapping, k_cache)
    require(slot_mapping.shape[0] == k.shape[0], f"slot_mapping has shape "
            f"{shape_of(slot_mapping)} but k has {k.shape[0]} rows (shape {shape_of(k)})")
    if k.shape[0] == 0:
        return
    # cast on the host (torch rounds to nearest even, like the reference); the kernel copies
    k, v = k.to(k_cache.dtype), v.to(v_cache.dtype)
    nb, page = k_cache.shape[0], k_cache.shape[1]
    _copy_slots(k, v, k_cache, v_cache, slot_mapping, slot_mapping, page, nb * page,
                src_paged=False, dst_paged=True)


def move_kv(k_cache: torch.Tensor, v_cache: torch.Tensor, src_slots: torch.Tensor,
            dst_slots: torch.Tensor) -> None:
    """Copy cache entries ``src_slots[i] -> dst_slots[i]`` in place (keep-path compaction).

    k_cache/v_cache:      [num_blocks, block_size, H_kv, D]
    src_slots, dst_slots: [N] int32 or int64 slots in [0, num_blocks * block_size)
                          (a pair with a slot outside that range is skipped)

    Every source is read before any destination is written (a gather into a temporary
    [N, H_kv, D] and a scatter, two launches), so any overlap between sources and
    destinations is safe, e.g. a tree path shifting down onto its own earlier slots.

    Example::

        >>> kc = torch.arange(4.0).view(1, 4, 1, 1); vc = kc.clone()
        >>> move_kv(kc, vc, torch.tensor([2, 3]), torch.tensor([1, 2]))
        >>> kc.flatten().tolist()
        [0.0, 2.0, 3.0, 3.0]
    """
    check_kv_cache(k_cache, v_cache)
    _check_slots("src_slots", src_slots, k_cache)
    _check_slots("dst_slots", dst_slots, k_cache)
    require(src_slots.shape == dst_slots.shape, f"src_slots has shape {shape_of(src_slots)} "
            f"but dst_slots has {shape_of(dst_slots)}")
    n = src_slots.shape[0]
    if n == 0:
        return
    nb, page, h_kv, d = k_cache.shape
    tmp_k = torch.empty(n, h_kv, d, dtype=k_cache.dtype, device=k_cache.device)
    tmp_v = torch.empty_like(tmp_k)
    # read every source first (gather) ...
    _copy_slots(k_cache, v_cache, tmp_k, tmp_v, src_slots, dst_slots, page, nb * page,
                src_paged=True, dst_paged=False)
    # ... then write every destination (scatter); the launches run in stream order
    _copy_slots(tmp_k, tmp_v, k_cache, v_cache, src_slots, dst_slots, page, nb * page,
                src_paged=False, dst_paged=True)
