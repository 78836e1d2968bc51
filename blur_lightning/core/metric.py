"""The inner product BLUR projects in: the identity (the paper) or the one an Adam-type optimizer steps in.

BLUR's guarantee for forget_lower, <d, g_f> = gamma ||g_f||^2, is a statement about the direction d.
An Adam-type optimizer does not step along d: roughly, it steps along P d with

    P = diag(1 / (sqrt(v_hat) + eps)),   v_hat = exp_avg_sq / (1 - beta2^t)

(v_hat the bias-corrected second moment before this step, t the optimizer's step count so far).
Projecting in P's inner product,

    d = g_r + (gamma - <g_r, P g_f> / <g_f, P g_f>) g_f,

gives <P d, g_f> = gamma <g_f, P g_f>: the guarantee, now about the step Adam takes. The same
substitution <x, y> -> <x, P y> applies to every mode's sums (core/projection.py).

What is approximate: Adam also folds this step's d into v before it divides (and m carries past
steps), so the step is P' m with P' from the updated v. Using the v the step starts from keeps the
projection one pass, as the plain one, with one more read of v per element.

The first step, before any state exists (or with t = 0), has v = 0: P would be the constant 1 / eps,
which as a ratio is the identity, so the identity is used outright (no 1e8-scaled sums). A step
where some parameters have state and others not (a parameter first trained mid-run) weighs the
state-less ones with 1 / eps, what Adam's own division by sqrt(0) + eps would give them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from blur_lightning.core.backends import local_tensor

PROJECTION_METRICS = ("identity", "adam")


@dataclass(frozen=True)
class AdamMetric:
    """P of an Adam-type optimizer, per gradient tensor: computed on the fly, never stored.

    Attributes:
        exp_avg_sqs: per gradient tensor, the optimizer's second moment (local shard), or None
            where the parameter has no state yet.
        steps: per gradient tensor, the optimizer's step count (a 0-dim tensor or number), or None.
        beta2, eps: the optimizer's.
    """

    exp_avg_sqs: Sequence[torch.Tensor | None]
    steps: Sequence[torch.Tensor | float | None]
    beta2: float
    eps: float

    def weight(self, i: int, like: torch.Tensor) -> torch.Tensor | float:
        """P of tensor i in `like`'s shape and dtype (a temporary of one tensor's size), or 1 / eps without state."""
        v, t = self.exp_avg_sqs[i], self.steps[i]
        if v is None or t is None:
            return 1.0 / self.eps
        v = local_tensor(v).reshape(-1).to(like.dtype)
        # 1 - beta2^t in float64 (at t = 1, beta2 = 0.999 leaves 1e-3, where float32 keeps 4 digits), on
        # the device: AdamW's step is a CPU tensor, BLURFusedAdamW's a device one; no host read either way.
        # t = 0 (state made, no step taken) has v = 0: the clamp makes that 0 / tiny = 0, P = 1 / eps.
        t = torch.as_tensor(t, dtype=torch.float64).to(v.device)
        correction = (-torch.expm1(t * math.log(self.beta2))).clamp_min(1e-30).to(like.dtype)
        return ((v / correction).sqrt_() + self.eps).reciprocal_()


def adam_metric(optimizer, params: Sequence[torch.nn.Parameter]) -> AdamMetric | None:
    """The AdamMetric of `optimizer` for `params` (in order), or None on the first step (the identity).

    Raises:
        ValueError: the optimizer keeps no Adam second moment (SGD, ...), or uses amsgrad (its
            denominator is the running maximum, not v), or the params span groups of different
            beta2 / eps.
    """
    inner = getattr(optimizer, "optimizer", optimizer)
    wanted = {id(p) for p in params}
    groups = [g for g in inner.param_groups if any(id(p) in wanted for p in g["params"])]
    if not groups or not all("betas" in g and "eps" in g for g in groups):
        raise ValueError(
            f"projection_metric='adam' needs an Adam-type optimizer (torch.optim.Adam, AdamW or "
            f"BLURFusedAdamW: betas, eps and exp_avg_sq state); got {type(inner).__name__}"
        )
    if any(g.get("amsgrad", False) for g in groups):
        raise ValueError("projection_metric='adam' does not support amsgrad=True (its step divides by max(v), not v)")
    settings = {(float(g["betas"][1]), float(g["eps"])) for g in groups}
    if len(settings) > 1:
        raise ValueError(f"projection_metric='adam': the trained parameters' groups differ in (beta2, eps): {settings}")
    beta2, eps = settings.pop()
    states = [inner.state.get(p, {}) for p in params]
    if not any("exp_avg_sq" in s for s in states):
        return None
    return AdamMetric([s.get("exp_avg_sq") for s in states], [s.get("step") for s in states], beta2, eps)


def check_metric(name: str) -> None:
    if name not in PROJECTION_METRICS:
        raise ValueError(f"projection_metric={name!r}: expected one of {PROJECTION_METRICS}")
