"""Plain-PyTorch references of the kernels: what the tests compare against and the benchmarks time.

They are written for clarity, not speed: one tensor at a time, temporaries allowed. Given float64
tensors they compute in float64 (the tests' oracle); given fp32/bf16/fp16 they compute in float32
and round once on the way out, as the kernels do.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def _opmath(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def multi_tensor_dots_ref(
    forget_grads: Sequence[torch.Tensor], retain_grads: Sequence[torch.Tensor]
) -> torch.Tensor:
    """[<g_r, g_f>, ||g_f||^2, ||g_r||^2] in float64 throughout: shape (3,), float64."""
    device = retain_grads[0].device if retain_grads else torch.device("cpu")
    sums = torch.zeros(3, dtype=torch.float64, device=device)
    for f, r in zip(forget_grads, retain_grads):
        f64, r64 = f.reshape(-1).double(), r.reshape(-1).double()
        sums += torch.stack([torch.dot(r64, f64), torch.dot(f64, f64), torch.dot(r64, r64)])
    return sums


def multi_tensor_metric_dots_ref(
    forget_grads: Sequence[torch.Tensor],
    retain_grads: Sequence[torch.Tensor],
    exp_avg_sqs: Sequence[torch.Tensor],
    steps: Sequence[torch.Tensor | float],
    beta2: float,
    eps: float,
) -> torch.Tensor:
    """The plain three sums, then <g_r, P g_f>, <g_f, P g_f>, <g_r, P g_r> with
    P = 1 / (sqrt(v / (1 - beta2^t)) + eps), in float64 throughout: shape (6,)."""
    device = retain_grads[0].device if retain_grads else torch.device("cpu")
    sums = torch.zeros(6, dtype=torch.float64, device=device)
    for f, r, v, t in zip(forget_grads, retain_grads, exp_avg_sqs, steps):
        f64, r64 = f.reshape(-1).double(), r.reshape(-1).double()
        p = 1.0 / ((v.reshape(-1).double() / (1.0 - beta2 ** float(t))).sqrt() + eps)
        sums += torch.stack([torch.dot(r64, f64), torch.dot(f64, f64), torch.dot(r64, r64),
                             torch.dot(r64, p * f64), torch.dot(f64, p * f64), torch.dot(r64, p * r64)])  # fmt: skip
    return sums


def combine_ref(
    retain_grads: Sequence[torch.Tensor],
    forget_grads: Sequence[torch.Tensor],
    retain_coef: torch.Tensor | float,
    forget_coef: torch.Tensor | float,
) -> list[torch.Tensor]:
    """New float64 tensors d_i = retain_coef * g_r_i + forget_coef * g_f_i (inputs untouched)."""
    a = torch.as_tensor(retain_coef, dtype=torch.float64)
    b = torch.as_tensor(forget_coef, dtype=torch.float64)
    return [
        a.to(r.device) * r.double() + b.to(r.device) * f.double() for r, f in zip(retain_grads, forget_grads)
    ]


def blur_adamw_step_ref_(
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
) -> None:
    """The fused step, one tensor at a time: AdamW (torch.optim.AdamW's math) on d, in place.

    d = retain_coef * g_r + forget_coef * g_f, rounded to g_r's dtype (what blur_direction_ would
    have stored in the retain buffer); then, with t = step (already incremented, 1 for the first):

        p <- p * (1 - lr * weight_decay)
        m <- beta1 * m + (1 - beta1) * d
        v <- beta2 * v + (1 - beta2) * d^2
        p <- p - lr / (1 - beta1^t) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)

    forget_grads None: plain AdamW on g_r (the coefficients are ignored). retain_grads untouched.
    found_inf nonzero: p, m and v keep their values, chosen by torch.where on the device (a
    product with 0 would not do: the skipped step's d is inf or nan).
    """
    steps = list(step) if isinstance(step, (list, tuple)) else [step] * len(params)
    for i, (p, r, m, v) in enumerate(zip(params, retain_grads, exp_avgs, exp_avg_sqs)):
        opmath = _opmath(p.dtype)
        lr_t = torch.as_tensor(lr, dtype=opmath, device=p.device)
        t = torch.as_tensor(steps[i], dtype=opmath, device=p.device)
        if forget_grads is None:
            d = r.to(opmath)
        else:
            a = torch.as_tensor(retain_coef, dtype=opmath, device=p.device)
            b = torch.as_tensor(forget_coef, dtype=opmath, device=p.device)
            d = (a * r.to(opmath) + b * forget_grads[i].to(opmath)).to(r.dtype).to(opmath)
        p32, m32, v32 = p.to(opmath), m.to(opmath), v.to(opmath)
        p32 = p32 * (1 - lr_t * weight_decay)
        m32 = beta1 * m32 + (1 - beta1) * d
        v32 = beta2 * v32 + (1 - beta2) * d * d
        bias_correction1 = 1 - torch.pow(beta1, t)
        bias_correction2 = 1 - torch.pow(beta2, t)
        denom = v32.sqrt() / bias_correction2.sqrt() + eps
        p32 = p32 - (lr_t / bias_correction1) * m32 / denom
        if found_inf is not None:
            skip = found_inf.to(p.device).reshape(()) != 0
            p32 = torch.where(skip, p.to(opmath), p32)
            m32 = torch.where(skip, m.to(opmath), m32)
            v32 = torch.where(skip, v.to(opmath), v32)
        p.copy_(p32)
        m.copy_(m32)
        v.copy_(v32)
