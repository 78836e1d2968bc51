"""The BLUR direction fused into AdamW: one pass updates parameters and moments, d never exists.

Per element, with gradients of g bytes and parameter/moments of s bytes each, the unfused step
after pass 1 is pass 2 (read g_r, g_f; write d: 3g) plus AdamW (read d, p, m, v; write p, m, v:
g + 6s); fused it is read g_r, g_f, p, m, v and write p, m, v: 2g + 6s. All bf16 that is 16
bytes instead of 20, 20 instead of 24 with pass 1 counted: the step's floor drops by 1/6.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Mapping, Sequence

import torch
import triton
import triton.language as tl

from blur_lightning.core.backends import local_tensor, resolve_backend

from . import _launch


@triton.jit
def _blur_adamw_kernel(
    ptrs,  # int64 [6, n_tensors]: param, forget, retain, exp_avg, exp_avg_sq, step (float32 [1])
    sizes,  # int64 [n_tensors]
    chunk_tensor,  # int64 [n_chunks]
    chunk_start,  # int64 [n_chunks]
    retain_coef_ptr,  # float32 [1]
    forget_coef_ptr,  # float32 [1]
    lr_ptr,  # float32 [1]
    found_inf_ptr,  # float32 [1]: nonzero skips the whole update (a non-finite step), read on the device
    beta1,
    beta2,
    log2_beta1,  # float64 (host math on Python floats)
    log2_beta2,
    eps,
    weight_decay,
    n_tensors,
    n_chunks,
    chunk,
    P_DTYPE: tl.constexpr,
    F_DTYPE: tl.constexpr,
    R_DTYPE: tl.constexpr,
    M_DTYPE: tl.constexpr,
    V_DTYPE: tl.constexpr,
    HAS_FORGET: tl.constexpr,
    ALIGNED: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    n_programs = tl.num_programs(0)
    offs = tl.arange(0, BLOCK).to(tl.int64)
    retain_coef = tl.load(retain_coef_ptr).to(tl.float32)
    forget_coef = tl.load(forget_coef_ptr).to(tl.float32)
    lr = tl.load(lr_ptr).to(tl.float32)
    decay = 1.0 - lr * weight_decay
    # A skipped step walks no chunks: every program exits at once, p, m and v stay untouched.
    n_walk = n_chunks * (tl.load(found_inf_ptr) == 0.0).to(tl.int32)
    for c in range(pid, n_walk, n_programs):
        t = tl.load(chunk_tensor + c)
        start = tl.load(chunk_start + c)
        end = tl.minimum(start + chunk, tl.load(sizes + t))
        param = tl.load(ptrs + t).to(tl.pointer_type(P_DTYPE))
        forget = tl.load(ptrs + n_tensors + t).to(tl.pointer_type(F_DTYPE))
        retain = tl.load(ptrs + 2 * n_tensors + t).to(tl.pointer_type(R_DTYPE))
        exp_avg = tl.load(ptrs + 3 * n_tensors + t).to(tl.pointer_type(M_DTYPE))
        exp_avg_sq = tl.load(ptrs + 4 * n_tensors + t).to(tl.pointer_type(V_DTYPE))
        step = tl.load(tl.load(ptrs + 5 * n_tensors + t).to(tl.pointer_type(tl.float32))).to(tl.float64)
        # 1 - beta^t in float64: beta2 = 0.999 at t = 1 leaves 1e-3, where float32 keeps 4 digits.
        bias_correction1 = (1.0 - tl.exp2(step * log2_beta1)).to(tl.float32)
        bias_correction2 = (1.0 - tl.exp2(step * log2_beta2)).to(tl.float32)
        step_size = lr / bias_correction1
        bias_correction2_sqrt = tl.sqrt_rn(bias_correction2)
        if ALIGNED:  # every address 16-byte aligned: lets the full blocks use 16-byte vector accesses
            param = tl.multiple_of(param, 16)
            forget = tl.multiple_of(forget, 16)
            retain = tl.multiple_of(retain, 16)
            exp_avg = tl.multiple_of(exp_avg, 16)
            exp_avg_sq = tl.multiple_of(exp_avg_sq, 16)
        n_full = (end - start) // BLOCK
        # Full blocks unmasked (vector loads), then the tail masked: the same body twice, since a
        # @triton.jit helper would tie the kernel to the mode triton was imported in (see dots.py).
        for b in range(0, n_full):
            idx = tl.multiple_of(start + b * BLOCK, BLOCK) + offs
            r = tl.load(retain + idx).to(tl.float32)
            if HAS_FORGET:
                f = tl.load(forget + idx).to(tl.float32)
                # Round d to g_r's dtype, as blur_direction_ storing it in the retain buffer would.
                d = (retain_coef * r + forget_coef * f).to(R_DTYPE).to(tl.float32)
            else:
                d = r
            p = tl.load(param + idx).to(tl.float32) * decay
            m = beta1 * tl.load(exp_avg + idx).to(tl.float32) + (1.0 - beta1) * d
            v = beta2 * tl.load(exp_avg_sq + idx).to(tl.float32) + (1.0 - beta2) * d * d
            p = p - step_size * tl.div_rn(m, tl.sqrt_rn(v) / bias_correction2_sqrt + eps)
            tl.store(param + idx, p.to(P_DTYPE))
            tl.store(exp_avg + idx, m.to(M_DTYPE))
            tl.store(exp_avg_sq + idx, v.to(V_DTYPE))
        idx = start + n_full * BLOCK + offs
        mask = idx < end
        r = tl.load(retain + idx, mask=mask, other=0.0).to(tl.float32)
        if HAS_FORGET:
            f = tl.load(forget + idx, mask=mask, other=0.0).to(tl.float32)
            d = (retain_coef * r + forget_coef * f).to(R_DTYPE).to(tl.float32)
        else:
            d = r
        p = tl.load(param + idx, mask=mask, other=0.0).to(tl.float32) * decay
        m = beta1 * tl.load(exp_avg + idx, mask=mask, other=0.0).to(tl.float32) + (1.0 - beta1) * d
        v = beta2 * tl.load(exp_avg_sq + idx, mask=mask, other=0.0).to(tl.float32) + (1.0 - beta2) * d * d
        p = p - step_size * tl.div_rn(m, tl.sqrt_rn(v) / bias_correction2_sqrt + eps)
        tl.store(param + idx, p.to(P_DTYPE), mask=mask)
        tl.store(exp_avg + idx, m.to(M_DTYPE), mask=mask)
        tl.store(exp_avg_sq + idx, v.to(V_DTYPE), mask=mask)


def blur_adamw_step_(
    params: Sequence[torch.Tensor],
    forget_grads: Sequence[torch.Tensor] | None,
    retain_grads: Sequence[torch.Tensor],
    exp_avgs: Sequence[torch.Tensor],
    exp_avg_sqs: Sequence[torch.Tensor],
    *,
    retain_coef: torch.Tensor | float,
    forget_coef: torch.Tensor | float,
    lr: torch.Tensor | float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    step: torch.Tensor | float | Sequence[torch.Tensor],
    found_inf: torch.Tensor | None = None,
    backend: str = "auto",
) -> None:
    """One AdamW step on the BLUR direction d = retain_coef * g_r + forget_coef * g_f, in one pass.

    Equals `blur_direction_` (which stores d, rounded to g_r's dtype, in the retain buffer) followed
    by `torch.optim.AdamW(fused=True)` with the same hyper-parameters, but d is never written:
    each element of g_r, g_f, p, m, v is read once and p, m, v written once.

    Args:
        params: parameters p (fp32/bf16/fp16, contiguous), updated in place.
        forget_grads: g_f, same numels as params, not modified; None for plain AdamW on g_r.
        retain_grads: g_r, same numels, not modified (unlike blur_direction_, which overwrites it).
        exp_avgs: first moments m, updated in place (any supported dtype).
        exp_avg_sqs: second moments v, updated in place.
        retain_coef: one-element float32 device tensor (BLURStats.retain_coef) or a number.
        forget_coef: likewise (BLURStats.forget_coef).
        lr: learning rate, a number or a one-element device tensor (read on the device: no sync).
        beta1, beta2, eps, weight_decay: AdamW's (decoupled weight decay: p *= 1 - lr * weight_decay).
        step: the step number t of this update, already incremented (1 for the first), for the
            bias corrections 1 - beta^t: a number, a one-element float32 tensor, or one such tensor
            per parameter (torch.optim.AdamW's state["step"] tensors).
        found_inf: a one-element device tensor; nonzero skips the update (p, m, v untouched),
            decided on the device with no host read, as torch's fused AdamW does for GradScaler.
            None: always update. The caller keeps `step` from counting a skipped update.
        backend: "auto" (Triton on CUDA, PyTorch on CPU; env BLUR_BACKEND overrides), "triton", "torch".

    Raises:
        ValueError: length/size/device mismatch, a non-contiguous tensor, an unsupported dtype.
    """
    if not params:
        return
    if resolve_backend(backend, params) == "torch":
        from .reference import blur_adamw_step_ref_

        blur_adamw_step_ref_(
            params,
            forget_grads,
            retain_grads,
            exp_avgs,
            exp_avg_sqs,
            retain_coef=retain_coef,
            forget_coef=forget_coef,
            lr=lr,
            beta1=beta1,
            beta2=beta2,
            eps=eps,
            weight_decay=weight_decay,
            step=step,
            found_inf=found_inf,
        )
        return
    device = params[0].device
    has_forget = forget_grads is not None
    if isinstance(step, (list, tuple)):
        steps = list(step)
    else:
        steps = [_launch.scalar_arg(step, device, "step")] * len(params)
    names = ("params", "forget_grads", "retain_grads", "exp_avgs", "exp_avg_sqs")
    lists = (params, forget_grads if has_forget else retain_grads, retain_grads, exp_avgs, exp_avg_sqs)
    tables = _launch.get_tables(lists, names, scalar_lists=(steps,), scalar_names=("step",))
    retain_coef = _launch.scalar_arg(retain_coef, device, "retain_coef")
    forget_coef = _launch.scalar_arg(forget_coef, device, "forget_coef")
    lr = _launch.scalar_arg(lr, device, "lr")
    found_inf = _launch.scalar_arg(0.0 if found_inf is None else found_inf, device, "found_inf")
    block = _launch.block_size(device)
    for name, value in (("beta1", beta1), ("beta2", beta2)):
        if not 0.0 < value < 1.0:
            raise ValueError(f"{name} must be in (0, 1), got {value}")
    # The kernel computes in float32; rounding the hyper-parameters here makes the interpreter
    # (which would keep Python floats in float64) agree with the GPU: 1 - float32(0.999) differs
    # from 0.001 by 1.3e-5, relative.
    beta1, beta2, eps, weight_decay = (_float32(x) for x in (beta1, beta2, eps, weight_decay))
    for g in tables.groups:
        if g.n_chunks == 0:
            continue
        p_dtype, f_dtype, r_dtype, m_dtype, v_dtype = (_launch.TL_DTYPES[d] for d in g.dtypes)
        _launch.launch(
            _blur_adamw_kernel,
            tables,
            g.n_programs,
            g.ptrs,
            g.sizes,
            g.chunk_tensor,
            g.chunk_start,
            retain_coef,
            forget_coef,
            lr,
            found_inf,
            beta1,
            beta2,
            math.log2(beta1),
            math.log2(beta2),
            eps,
            weight_decay,
            g.n_tensors,
            g.n_chunks,
            g.chunk,
            P_DTYPE=p_dtype,
            F_DTYPE=f_dtype,
            R_DTYPE=r_dtype,
            M_DTYPE=m_dtype,
            V_DTYPE=v_dtype,
            HAS_FORGET=has_forget,
            ALIGNED=g.aligned,
            BLOCK=block,
        )


def _float32(value: float) -> float:
    return struct.unpack("f", struct.pack("f", float(value)))[0]


class BLURFusedAdamW(torch.optim.Optimizer):
    """AdamW whose step applies the BLUR direction on the fly (one pass, no d buffer).

    The retain gradients are the parameters' `.grad`; the forget gradients and the coefficients
    come with each step call. State per parameter is torch.optim.AdamW's (`step` as a float32
    device tensor, `exp_avg`, `exp_avg_sq`), so its state_dict reads like AdamW's.

    Example (manual optimization)::

        stats = compute_stats(forget_grads, [p.grad for p in params], gamma=gamma)
        optimizer.step(forget_grads=forget_grads, stats=stats)

    Args:
        params: parameters or parameter groups, as for torch.optim.AdamW.
        lr: learning rate (a number or a one-element device tensor).
        betas: (beta1, beta2).
        eps: added to the denominator.
        weight_decay: decoupled weight decay.
        backend: "auto" (Triton on CUDA, PyTorch on CPU), "triton" or "torch".
    """

    def __init__(
        self,
        params,
        lr: float | torch.Tensor = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        *,
        backend: str = "auto",
    ):
        if not (isinstance(lr, torch.Tensor) or lr >= 0.0):
            raise ValueError(f"invalid learning rate: {lr}")
        if eps < 0.0 or weight_decay < 0.0:
            raise ValueError(f"eps and weight_decay must be >= 0, got {eps}, {weight_decay}")
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, backend=backend)
        super().__init__(params, defaults)

    def _params_in_order(self) -> list[torch.Tensor]:
        return [p for group in self.param_groups for p in group["params"]]

    @torch.no_grad()
    def step(
        self,
        closure=None,
        *,
        forget_grads: Sequence[torch.Tensor | None] | Mapping[torch.Tensor, torch.Tensor] | None = None,
        stats=None,
        retain_coef: torch.Tensor | float | None = None,
        forget_coef: torch.Tensor | float | None = None,
        found_inf: torch.Tensor | None = None,
    ):
        """One step on d = retain_coef * p.grad + forget_coef * g_f for every parameter with a grad.

        Args:
            closure: re-evaluates the loss (optional, as in torch optimizers).
            forget_grads: g_f, a sequence aligned with all parameters in param-group order, or a
                mapping parameter -> g_f; an entry is needed for every parameter with a grad.
                None: plain AdamW on p.grad.
            stats: a BLURStats (its retain_coef and forget_coef are used), or give the two
                coefficients explicitly.
            retain_coef: factor on p.grad (default 1).
            forget_coef: factor on g_f (default 0).
            found_inf: a one-element device tensor, nonzero to skip this step on the device:
                parameters, moments and step counts stay as they are, with no host read. Default:
                the attribute `found_inf` when set (the convention of torch's fused optimizers).

        DTensor parameters (FSDP2) are stepped through their local shards.

        Returns:
            The closure's loss, or None.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if stats is not None:
            retain_coef, forget_coef = stats.retain_coef, stats.forget_coef
        retain_coef = 1.0 if retain_coef is None else retain_coef
        forget_coef = 0.0 if forget_coef is None else forget_coef
        if found_inf is None:
            found_inf = getattr(self, "found_inf", None)
        if forget_grads is not None and not isinstance(forget_grads, Mapping):
            order = self._params_in_order()
            if len(forget_grads) != len(order):
                raise ValueError(f"forget_grads has {len(forget_grads)} entries for {len(order)} parameters")
            forget_grads = {p: f for p, f in zip(order, forget_grads)}
        for group in self.param_groups:
            params, forget, retain, exp_avgs, exp_avg_sqs, steps = [], [], [], [], [], []
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise ValueError("BLURFusedAdamW does not support sparse gradients")
                state = self.state[p]
                if not state:
                    state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                params.append(local_tensor(p))
                retain.append(local_tensor(p.grad))
                exp_avgs.append(local_tensor(state["exp_avg"]))
                exp_avg_sqs.append(local_tensor(state["exp_avg_sq"]))
                steps.append(state["step"])
                if forget_grads is not None:
                    f = forget_grads.get(p)
                    if f is None:
                        raise ValueError(f"no forget gradient for a parameter of shape {tuple(p.shape)}")
                    forget.append(local_tensor(f))
            if not params:
                continue
            # On the device, like torch's fused AdamW: no sync. A skipped step does not count.
            if found_inf is None:
                torch._foreach_add_(steps, 1.0)
            else:
                # a list of the 0-dim flag, not the flag itself: a 0-dim CPU tensor as the foreach
                # scalar is read back to the host
                keep = 1.0 - found_inf.to(steps[0].device, torch.float32).reshape(())
                torch._foreach_add_(steps, [keep] * len(steps))
            beta1, beta2 = group["betas"]
            blur_adamw_step_(
                params,
                forget if forget_grads is not None else None,
                retain,
                exp_avgs,
                exp_avg_sqs,
                retain_coef=retain_coef,
                forget_coef=forget_coef,
                lr=group["lr"],
                beta1=beta1,
                beta2=beta2,
                eps=group["eps"],
                weight_decay=group["weight_decay"],
                step=steps,
                found_inf=found_inf,
                backend=group["backend"],
            )
        return loss
