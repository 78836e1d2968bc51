"""Pass 1 in an Adam-type optimizer's inner product: the plain three sums and the same three weighted by P.

P = 1 / (sqrt(v) / sqrt(1 - beta2^t) + eps), per element, from the optimizer's second moment v and
step t (core/metric.py says why). One launch per dtype group reads g_f, g_r and v once: 2g + s bytes
per element instead of the plain pass's 2g (all bf16: 6 bytes instead of 4; fp32 gradients and
moments: 12 instead of 8). P is formed in registers, never stored. The same precision and
determinism as dots.py: float32 products and in-chunk sums, float64 across chunks, no atomics.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from . import _launch
from .dots import _SUM, _SUM_BLOCK, _sum_partials_kernel

ROWS = 6  # s_rf, s_ff, s_rr, then <g_r, P g_f>, <g_f, P g_f>, <g_r, P g_r>


@triton.jit
def _metric_dots_kernel(
    ptrs,  # int64 [4, n_tensors]: forget, retain, exp_avg_sq, step (float32 [1])
    sizes,
    chunk_tensor,
    chunk_start,
    partials,  # float64 [6, n_partials]
    partial_offset,
    n_partials,
    log2_beta2,  # float64
    eps,
    n_tensors,
    n_chunks,
    chunk,
    F_DTYPE: tl.constexpr,
    R_DTYPE: tl.constexpr,
    V_DTYPE: tl.constexpr,
    ALIGNED: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    n_programs = tl.num_programs(0)
    offs = tl.arange(0, BLOCK).to(tl.int64)
    s_rf = tl.full((), 0.0, dtype=tl.float64)
    s_ff = tl.full((), 0.0, dtype=tl.float64)
    s_rr = tl.full((), 0.0, dtype=tl.float64)
    w_rf = tl.full((), 0.0, dtype=tl.float64)
    w_ff = tl.full((), 0.0, dtype=tl.float64)
    w_rr = tl.full((), 0.0, dtype=tl.float64)
    for c in range(pid, n_chunks, n_programs):
        t = tl.load(chunk_tensor + c)
        start = tl.load(chunk_start + c)
        end = tl.minimum(start + chunk, tl.load(sizes + t))
        forget = tl.load(ptrs + t).to(tl.pointer_type(F_DTYPE))
        retain = tl.load(ptrs + n_tensors + t).to(tl.pointer_type(R_DTYPE))
        exp_avg_sq = tl.load(ptrs + 2 * n_tensors + t).to(tl.pointer_type(V_DTYPE))
        step = tl.load(tl.load(ptrs + 3 * n_tensors + t).to(tl.pointer_type(tl.float32))).to(tl.float64)
        # as the AdamW kernel: 1 - beta2^t in float64, then its square root in float32
        correction_sqrt = tl.sqrt_rn((1.0 - tl.exp2(step * log2_beta2)).to(tl.float32))
        if ALIGNED:
            forget = tl.multiple_of(forget, 16)
            retain = tl.multiple_of(retain, 16)
            exp_avg_sq = tl.multiple_of(exp_avg_sq, 16)
        acc_rf = tl.full((BLOCK,), 0.0, dtype=tl.float32)
        acc_ff = tl.full((BLOCK,), 0.0, dtype=tl.float32)
        acc_rr = tl.full((BLOCK,), 0.0, dtype=tl.float32)
        acc_wrf = tl.full((BLOCK,), 0.0, dtype=tl.float32)
        acc_wff = tl.full((BLOCK,), 0.0, dtype=tl.float32)
        acc_wrr = tl.full((BLOCK,), 0.0, dtype=tl.float32)
        n_full = (end - start) // BLOCK
        for b in range(0, n_full):
            idx = tl.multiple_of(start + b * BLOCK, BLOCK) + offs
            f = tl.load(forget + idx).to(tl.float32)
            r = tl.load(retain + idx).to(tl.float32)
            w = tl.div_rn(1.0, tl.sqrt_rn(tl.load(exp_avg_sq + idx).to(tl.float32)) / correction_sqrt + eps)
            acc_rf += r * f
            acc_ff += f * f
            acc_rr += r * r
            acc_wrf += r * (w * f)
            acc_wff += f * (w * f)
            acc_wrr += r * (w * r)
        idx = start + n_full * BLOCK + offs
        mask = idx < end
        f = tl.load(forget + idx, mask=mask, other=0.0).to(tl.float32)
        r = tl.load(retain + idx, mask=mask, other=0.0).to(tl.float32)
        v = tl.load(exp_avg_sq + idx, mask=mask, other=0.0).to(tl.float32)
        w = tl.div_rn(1.0, tl.sqrt_rn(v) / correction_sqrt + eps)
        acc_rf += r * f
        acc_ff += f * f
        acc_rr += r * r
        acc_wrf += r * (w * f)  # f, r are 0 off the mask: no term from w there
        acc_wff += f * (w * f)
        acc_wrr += r * (w * r)
        s_rf += tl.reduce(acc_rf, 0, _SUM).to(tl.float64)
        s_ff += tl.reduce(acc_ff, 0, _SUM).to(tl.float64)
        s_rr += tl.reduce(acc_rr, 0, _SUM).to(tl.float64)
        w_rf += tl.reduce(acc_wrf, 0, _SUM).to(tl.float64)
        w_ff += tl.reduce(acc_wff, 0, _SUM).to(tl.float64)
        w_rr += tl.reduce(acc_wrr, 0, _SUM).to(tl.float64)
    column = partial_offset + pid
    tl.store(partials + column, s_rf)
    tl.store(partials + n_partials + column, s_ff)
    tl.store(partials + 2 * n_partials + column, s_rr)
    tl.store(partials + 3 * n_partials + column, w_rf)
    tl.store(partials + 4 * n_partials + column, w_ff)
    tl.store(partials + 5 * n_partials + column, w_rr)


def multi_tensor_metric_dots(
    forget_grads: Sequence[torch.Tensor],
    retain_grads: Sequence[torch.Tensor],
    exp_avg_sqs: Sequence[torch.Tensor],
    steps: Sequence[torch.Tensor],
    *,
    beta2: float,
    eps: float,
) -> torch.Tensor:
    """The (6,) float64 sums of core.projection.partial_sums_torch with an AdamMetric, in one pass.

    Args:
        forget_grads, retain_grads: g_f and g_r (contiguous fp32/bf16/fp16, one device).
        exp_avg_sqs: the optimizer's v, element-aligned with the gradients.
        steps: per tensor, the optimizer's step count as a one-element float32 tensor on the same device.
        beta2, eps: the optimizer's.

    Raises:
        ValueError: length/size/device/dtype mismatches (naming the list and index), beta2 outside (0, 1).
    """
    if not 0.0 < beta2 < 1.0:
        raise ValueError(f"beta2 must be in (0, 1), got {beta2}")
    if not forget_grads:
        return torch.zeros(ROWS, dtype=torch.float64)
    device = forget_grads[0].device
    steps = [_launch.scalar_arg(s, device, f"steps[{i}]") for i, s in enumerate(steps)]
    tables = _launch.get_tables(
        (forget_grads, retain_grads, exp_avg_sqs), ("forget_grads", "retain_grads", "exp_avg_sqs"),
        scalar_lists=(steps,), scalar_names=("step",),
    )  # fmt: skip
    n_partials = max(tables.n_programs, 1)
    partials = _launch.new_buffer((ROWS, n_partials), torch.float64, tables.device)
    out = _launch.new_buffer((ROWS,), torch.float64, tables.device)
    block = _launch.block_size(tables.device)
    offset = 0
    for g in tables.groups:
        if g.n_chunks == 0:
            partials[:, offset : offset + g.n_programs] = 0
        else:
            f_dtype, r_dtype, v_dtype = (_launch.TL_DTYPES[d] for d in g.dtypes)
            _launch.launch(
                _metric_dots_kernel, tables, g.n_programs, g.ptrs, g.sizes, g.chunk_tensor, g.chunk_start,
                partials, offset, n_partials, math.log2(beta2), float(eps), g.n_tensors, g.n_chunks, g.chunk,
                F_DTYPE=f_dtype, R_DTYPE=r_dtype, V_DTYPE=v_dtype, ALIGNED=g.aligned, BLOCK=block,
            )  # fmt: skip
        offset += g.n_programs
    _launch.launch(_sum_partials_kernel, tables, 1, partials, out, n_partials, BLOCK=_SUM_BLOCK, ROWS=ROWS)
    return out
