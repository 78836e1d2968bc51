"""Pass 2 of the projection: d = retain_coef * g_r + forget_coef * g_f, written into g_r in place.

Reads g_r and g_f once and writes d once (3 N elements of traffic, the floor for an in-place
combine). The two coefficients are read from device memory by every program: no host float,
so no synchronisation between pass 1 and pass 2.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from . import _launch


@triton.jit
def _combine_kernel(
    ptrs,  # int64 [2, n_tensors]: forget then retain addresses
    sizes,  # int64 [n_tensors]
    chunk_tensor,  # int64 [n_chunks]
    chunk_start,  # int64 [n_chunks]
    retain_coef_ptr,  # float32 [1]
    forget_coef_ptr,  # float32 [1]
    n_tensors,
    n_chunks,
    chunk,
    F_DTYPE: tl.constexpr,
    R_DTYPE: tl.constexpr,
    ALIGNED: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    n_programs = tl.num_programs(0)
    offs = tl.arange(0, BLOCK).to(tl.int64)
    retain_coef = tl.load(retain_coef_ptr).to(tl.float32)
    forget_coef = tl.load(forget_coef_ptr).to(tl.float32)
    for c in range(pid, n_chunks, n_programs):
        t = tl.load(chunk_tensor + c)
        start = tl.load(chunk_start + c)
        end = tl.minimum(start + chunk, tl.load(sizes + t))
        forget = tl.load(ptrs + t).to(tl.pointer_type(F_DTYPE))
        retain = tl.load(ptrs + n_tensors + t).to(tl.pointer_type(R_DTYPE))
        if ALIGNED:  # every address 16-byte aligned: lets the full blocks use 16-byte vector accesses
            forget = tl.multiple_of(forget, 16)
            retain = tl.multiple_of(retain, 16)
        n_full = (end - start) // BLOCK
        for b in range(0, n_full):  # full blocks: no mask, so loads and stores vectorize
            idx = tl.multiple_of(start + b * BLOCK, BLOCK) + offs
            f = tl.load(forget + idx).to(tl.float32)
            r = tl.load(retain + idx).to(tl.float32)
            tl.store(retain + idx, (retain_coef * r + forget_coef * f).to(R_DTYPE))
        idx = start + n_full * BLOCK + offs  # the tail
        mask = idx < end
        f = tl.load(forget + idx, mask=mask, other=0.0).to(tl.float32)
        r = tl.load(retain + idx, mask=mask, other=0.0).to(tl.float32)
        tl.store(retain + idx, (retain_coef * r + forget_coef * f).to(R_DTYPE), mask=mask)


def multi_tensor_combine_(
    retain_grads: Sequence[torch.Tensor],
    forget_grads: Sequence[torch.Tensor],
    retain_coef: torch.Tensor,
    forget_coef: torch.Tensor,
) -> None:
    """In place: retain_grads[i] <- retain_coef * retain_grads[i] + forget_coef * forget_grads[i].

    Args:
        retain_grads: g_r, contiguous fp32/bf16/fp16 tensors on one CUDA device (CPU: interpreter).
            Overwritten with d, computed in float32 and rounded once to each tensor's dtype.
        forget_grads: g_f, same numels in the same order (dtypes may differ). Not modified.
        retain_coef: one-element tensor on the same device (float32; other float dtypes are cast).
        forget_coef: likewise.

    Raises:
        ValueError: length/size/device mismatch, a non-contiguous tensor, an unsupported dtype,
            a coefficient that is not a one-element tensor on the tensors' device.
    """
    if len(forget_grads) != len(retain_grads):
        raise ValueError(
            f"length mismatch: retain_grads has {len(retain_grads)} tensors, "
            f"forget_grads has {len(forget_grads)}"
        )
    if not retain_grads:
        return
    # Same list order as multi_tensor_dots, so the projection's two passes share one cached table.
    tables = _launch.get_tables((forget_grads, retain_grads), ("forget_grads", "retain_grads"))
    retain_coef = _launch.scalar_arg(retain_coef, tables.device, "retain_coef")
    forget_coef = _launch.scalar_arg(forget_coef, tables.device, "forget_coef")
    block = _launch.block_size(tables.device)
    for g in tables.groups:
        if g.n_chunks == 0:
            continue
        _launch.launch(
            _combine_kernel,
            tables,
            g.n_programs,
            g.ptrs,
            g.sizes,
            g.chunk_tensor,
            g.chunk_start,
            retain_coef,
            forget_coef,
            g.n_tensors,
            g.n_chunks,
            g.chunk,
            F_DTYPE=_launch.TL_DTYPES[g.dtypes[0]],
            R_DTYPE=_launch.TL_DTYPES[g.dtypes[1]],
            ALIGNED=g.aligned,
            BLOCK=block,
        )
