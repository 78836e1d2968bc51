"""Clipping on the true gradients: folded into the projection's coefficients, or in memory.

One convention, torch's clip_grad_norm_: every element is multiplied by min(1, max_norm / (norm + 1e-6)).
Two ways to apply it, each on every layout (one process, DDP, FSDP1, FSDP2/HSDP):

* From the projection's sums (`clipped_coefs`, `combine_clipped_`): d = a g_r + b g_f has
  ||d||^2 = a^2 s_rr + 2ab s_rf + b^2 s_ff, known from the three global sums the projection already
  reduced. Norm clipping is then one more scalar in the coefficients: no pass over d, no extra
  all-reduce, and the same numbers for the fused AdamW kernel, which never writes d.
* In memory (`clip_`): for a gradient that is not a BLUR combination (fine-tuning, relearning) and for
  value clipping (every element is needed). The squared norm is summed over the same process groups
  as the projection's sums, so a sharded model is clipped by its global norm, not per rank.

Under 16-mixed precision the gradients carry the GradScaler's scale S and stay scaled (the scaler
unscales them in its step): both ways take `scale` and clip the true gradient, i.e. compare
||g|| / S with max_norm and clamp to +-max_value * S. Clipping the scaled gradient instead would be
S times too tight (a step of 0.1 / 1024 for a clip of 0.1 at S = 1024).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from blur_lightning.core.backends import local_tensor
from blur_lightning.core.projection import BLURStats, all_reduce_sums, combine_

ALGORITHMS = ("norm", "value")


def check_algorithm(algorithm: str) -> None:
    if algorithm not in ALGORITHMS:
        raise ValueError(f"gradient_clip_algorithm={algorithm!r}: expected one of {ALGORITHMS}")


def check_clip_value(value: float | None) -> None:
    """None or 0: no clipping (Lightning's convention); a negative limit would reverse the update."""
    if value is not None and not value >= 0:  # also refuses NaN
        raise ValueError(f"gradient_clip_val={value!r}: expected a number >= 0 (0 or null: no clipping)")


def clipped_coefs(
    stats: BLURStats, max_norm: float | None, algorithm: str = "norm"
) -> tuple[torch.Tensor, torch.Tensor]:
    """(retain_coef, forget_coef) scaled so ||d|| <= max_norm ("norm"; unchanged otherwise).

    ||d|| is BLURStats.direction_norm, the true one (compute_stats divides the sums by the scale's
    square), so the factor is right whatever scale the gradients carry: the coefficients are ratios.
    """
    retain_coef, forget_coef = stats.retain_coef, stats.forget_coef
    if not max_norm or algorithm != "norm":  # None or 0: no clip (Lightning's convention for 0)
        return retain_coef, forget_coef
    factor = (max_norm / (stats.direction_norm + 1e-6)).clamp(max=1.0).to(retain_coef.dtype)
    return retain_coef * factor, forget_coef * factor


def combine_clipped_(
    forget_grads: Sequence[torch.Tensor],
    retain_grads: Sequence[torch.Tensor],
    stats: BLURStats,
    *,
    max_value: float | None,
    algorithm: str = "norm",
    mode: str,
    scale: torch.Tensor | None = None,
    backend: str = "auto",
) -> None:
    """Pass 2 of the projection with clipping: d into retain_grads, clipped as the true d.

    stats: compute_stats of these gradients (with grad_scale=scale). "norm": the factor from the sums
    scales both coefficients (no pass over d); "value": d is clamped to +-max_value (times the scale)
    after it is written, a 0-dim device bound: no host read. d keeps the scale the gradients carry.
    """
    forget_grads, retain_grads = [local_tensor(g) for g in forget_grads], [local_tensor(g) for g in retain_grads]
    retain_coef, forget_coef = clipped_coefs(stats, max_value, algorithm)
    clipped = bool(max_value) and algorithm == "norm"  # None or 0: no clip
    combine_(retain_grads, forget_grads, retain_coef, forget_coef,
             mode="" if clipped else mode, backend=backend)  # fmt: skip  ("": a clipped retain_coef is not 1)
    if max_value and algorithm == "value":
        _clamp_(retain_grads, max_value, scale)


def clip_(
    grads: Sequence[torch.Tensor],
    max_value: float,
    algorithm: str = "norm",
    *,
    scale: torch.Tensor | None = None,
    group=None,
) -> torch.Tensor | None:
    """Clip gradients in place as the true gradients, over every shard of `group`.

    "norm": the global norm is the square root of the local squared norms summed over `group` (None:
    these tensors are the whole model, as in one process and under DDP), divided by `scale`; every
    local shard is multiplied by min(1, max_value / (norm + 1e-6)), a 0-dim device factor (no host
    read). "value": an elementwise clamp to +-max_value * scale, local by nature.

    Returns:
        The true global norm before clipping (0-dim float64 device tensor) for "norm", else None.
    """
    check_algorithm(algorithm)
    local = [local_tensor(g) for g in grads]
    if algorithm == "value":
        _clamp_(local, max_value, scale)
        return None
    if not local:
        return None
    device = local[0].device
    sq = torch.zeros(1, dtype=torch.float64, device=device)
    for g in local:
        wide = g.reshape(-1).to(torch.promote_types(g.dtype, torch.float32))
        sq += torch.dot(wide, wide).to(torch.float64)
    all_reduce_sums(sq, group)
    norm = sq.sqrt()[0]
    if scale is not None:
        norm = norm / scale.to(norm.dtype)
    factor = (max_value / (norm + 1e-6)).clamp(max=1.0)
    for g in local:
        g.mul_(factor.to(g.dtype))
    return norm


def _clamp_(grads: Sequence[torch.Tensor], max_value: float, scale: torch.Tensor | None) -> None:
    bounds: dict[torch.dtype, torch.Tensor] = {}  # one 0-dim bound per dtype, not one per parameter
    for g in grads:
        if scale is None:
            g.clamp_(-max_value, max_value)
            continue
        if g.dtype not in bounds:  # the bound in the gradient's dtype: exact for GradScaler's powers of two
            bounds[g.dtype] = scale.to(g.dtype) * max_value
        g.clamp_(min=-bounds[g.dtype], max=bounds[g.dtype])
