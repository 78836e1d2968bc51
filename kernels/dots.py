"""Pass 1 of the projection: s_rf = <g_r, g_f>, s_ff = ||g_f||^2, s_rr = ||g_r||^2 over a list of tensors.

One launch per dtype group reads each element of g_f and g_r once (2 N elements of traffic,
the floor), then one single-program launch adds the per-program partials. Precision: products
and the in-chunk running sums in float32 (at most chunk / block = 32 terms per lane, then a tree
over the block), chunk sums added in float64. Determinism: a chunk always lands on the same
program and every sum runs in a fixed order, no atomics: equal inputs give bitwise-equal sums.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from . import _launch

# Only builtins and tl.reduce with triton's own sum combiner inside the kernels, no @jit helpers
# such as tl.zeros or tl.sum: a helper is decorated for the compiler or the interpreter when
# triton is imported, so a process that imported triton before TRITON_INTERPRET=1 was set (a
# test session where another module imported lightning first) could not interpret a kernel
# calling one. The interpreter recognises this combiner and reduces with numpy.
_SUM = tl.standard._sum_combine


@triton.jit
def _dots_kernel(
    ptrs,  # int64 [2, n_tensors]: forget then retain addresses
    sizes,  # int64 [n_tensors]
    chunk_tensor,  # int64 [n_chunks]
    chunk_start,  # int64 [n_chunks]
    partials,  # float64 [3, n_partials]: rows s_rf, s_ff, s_rr
    partial_offset,  # this group's first column in partials
    n_partials,
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
    s_rf = tl.full((), 0.0, dtype=tl.float64)
    s_ff = tl.full((), 0.0, dtype=tl.float64)
    s_rr = tl.full((), 0.0, dtype=tl.float64)
    for c in range(pid, n_chunks, n_programs):
        t = tl.load(chunk_tensor + c)
        start = tl.load(chunk_start + c)
        end = tl.minimum(start + chunk, tl.load(sizes + t))
        forget = tl.load(ptrs + t).to(tl.pointer_type(F_DTYPE))
        retain = tl.load(ptrs + n_tensors + t).to(tl.pointer_type(R_DTYPE))
        if ALIGNED:  # every address 16-byte aligned: lets the full blocks use 16-byte vector loads
            forget = tl.multiple_of(forget, 16)
            retain = tl.multiple_of(retain, 16)
        acc_rf = tl.full((BLOCK,), 0.0, dtype=tl.float32)
        acc_ff = tl.full((BLOCK,), 0.0, dtype=tl.float32)
        acc_rr = tl.full((BLOCK,), 0.0, dtype=tl.float32)
        n_full = (end - start) // BLOCK
        for b in range(0, n_full):  # full blocks: no mask, so the loads vectorize
            idx = tl.multiple_of(start + b * BLOCK, BLOCK) + offs
            f = tl.load(forget + idx).to(tl.float32)
            r = tl.load(retain + idx).to(tl.float32)
            acc_rf += r * f
            acc_ff += f * f
            acc_rr += r * r
        idx = start + n_full * BLOCK + offs  # the tail (all-false mask when there is none)
        mask = idx < end
        f = tl.load(forget + idx, mask=mask, other=0.0).to(tl.float32)
        r = tl.load(retain + idx, mask=mask, other=0.0).to(tl.float32)
        acc_rf += r * f
        acc_ff += f * f
        acc_rr += r * r
        s_rf += tl.reduce(acc_rf, 0, _SUM).to(tl.float64)
        s_ff += tl.reduce(acc_ff, 0, _SUM).to(tl.float64)
        s_rr += tl.reduce(acc_rr, 0, _SUM).to(tl.float64)
    column = partial_offset + pid
    tl.store(partials + column, s_rf)
    tl.store(partials + n_partials + column, s_ff)
    tl.store(partials + 2 * n_partials + column, s_rr)


@triton.jit
def _sum_partials_kernel(
    partials,  # float64 [ROWS, n_partials]
    out,  # float64 [ROWS]
    n_partials,
    BLOCK: tl.constexpr,
    ROWS: tl.constexpr = 3,
):
    offs = tl.arange(0, BLOCK)
    for row in tl.static_range(ROWS):
        acc = tl.full((BLOCK,), 0.0, dtype=tl.float64)
        for start in range(0, n_partials, BLOCK):
            idx = start + offs
            acc += tl.load(partials + row * n_partials + idx, mask=idx < n_partials, other=0.0)
        tl.store(out + row, tl.reduce(acc, 0, _SUM))


_SUM_BLOCK = 1024


def multi_tensor_dots(
    forget_grads: Sequence[torch.Tensor],
    retain_grads: Sequence[torch.Tensor],
    *,
    device: torch.device | None = None,
) -> torch.Tensor:
    """[s_rf, s_ff, s_rr] = [<g_r, g_f>, ||g_f||^2, ||g_r||^2] summed over every tensor of the lists.

    Args:
        forget_grads: g_f, a list of contiguous fp32/bf16/fp16 tensors on one CUDA device (CPU
            tensors run under the Triton interpreter). Not modified.
        retain_grads: g_r, same numels in the same order; dtypes may differ from g_f's and
            within the list (one launch per dtype group). Not modified.
        device: where the zeros go for empty lists (default CPU).

    Returns:
        float64 tensor of shape (3,) on the tensors' device. No host synchronisation.

    Raises:
        ValueError: length/size/device mismatch, a non-contiguous tensor, an unsupported dtype.
    """
    if len(forget_grads) != len(retain_grads):
        raise ValueError(
            f"length mismatch: forget_grads has {len(forget_grads)} tensors, "
            f"retain_grads has {len(retain_grads)}"
        )
    if not forget_grads:
        return torch.zeros(3, dtype=torch.float64, device=device or "cpu")
    tables = _launch.get_tables((forget_grads, retain_grads), ("forget_grads", "retain_grads"))
    n_partials = max(tables.n_programs, 1)
    if tables.partials is None or _launch.POISON:
        # Cached with the tables: the finalize kernel reads it before the next call's kernels
        # (same stream) overwrite it, so steady state allocates only the 24-byte result.
        tables.partials = _launch.new_buffer((3, n_partials), torch.float64, tables.device)
    out = _launch.new_buffer((3,), torch.float64, tables.device)
    block = _launch.block_size(tables.device)
    offset = 0
    for g in tables.groups:
        if g.n_chunks == 0:  # only zero-element tensors: write zero partials
            tables.partials[:, offset : offset + g.n_programs] = 0
        else:
            _launch.launch(
                _dots_kernel,
                tables,
                g.n_programs,
                g.ptrs,
                g.sizes,
                g.chunk_tensor,
                g.chunk_start,
                tables.partials,
                offset,
                n_partials,
                g.n_tensors,
                g.n_chunks,
                g.chunk,
                F_DTYPE=_launch.TL_DTYPES[g.dtypes[0]],
                R_DTYPE=_launch.TL_DTYPES[g.dtypes[1]],
                ALIGNED=g.aligned,
                BLOCK=block,
            )
        offset += g.n_programs
    _launch.launch(_sum_partials_kernel, tables, 1, tables.partials, out, n_partials, BLOCK=_SUM_BLOCK)
    return out
