"""Clipping d without a pass over it: the factor from the projection's sums, folded into the coefficients.

Used where clipping d in memory is impossible or wrong: BLURFusedAdamW never writes d, and
under a GradScaler d is written scaled (clipping it would act on scale * d, a clip 1024x too
tight at scale 1024). In-memory clipping of a written d is Lightning's (one process) or
`blur_lightning.distributed.fsdp.clip_gradients_` (shards).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from blur_lightning.core.backends import local_tensor
from blur_lightning.core.projection import BLURStats, combine_


def clipped_coefs(
    stats: BLURStats, max_norm: float | None, algorithm: str = "norm"
) -> tuple[torch.Tensor, torch.Tensor]:
    """(retain_coef, forget_coef) scaled so ||d|| <= max_norm ("norm"; unchanged otherwise).

    ||d|| comes from the three global sums (BLURStats.direction_norm): no pass over d and no extra
    all-reduce under FSDP. The factor is clip_grad_norm_'s, min(1, max_norm / (||d|| + 1e-6)).
    """
    retain_coef, forget_coef = stats.retain_coef, stats.forget_coef
    if max_norm is None or algorithm != "norm":
        return retain_coef, forget_coef
    factor = (max_norm / (stats.direction_norm + 1e-6)).clamp(max=1.0).to(retain_coef.dtype)
    return retain_coef * factor, forget_coef * factor


def combine_scaled_(
    forget_grads: Sequence[torch.Tensor],
    retain_grads: Sequence[torch.Tensor],
    stats: BLURStats,
    scale: torch.Tensor,
    *,
    max_value: float | None,
    algorithm: str,
    mode: str,
    backend: str = "auto",
) -> None:
    """d into retain_grads when both gradients carry a GradScaler's `scale`, clipped as the true d.

    stats must hold the true sums (compute_stats(grad_scale=scale)). d stays scaled: the scaler
    unscales it. "norm": the factor from the sums scales both coefficients; "value": d is clamped
    to +-max_value * scale (a 0-dim device bound: no host read).
    """
    forget_grads, retain_grads = [local_tensor(g) for g in forget_grads], [local_tensor(g) for g in retain_grads]
    retain_coef, forget_coef = clipped_coefs(stats, max_value, algorithm)
    combine_(retain_grads, forget_grads, retain_coef, forget_coef,
             mode=mode if max_value is None else "", backend=backend)  # "": the clipped retain_coef applies
    if max_value is not None and algorithm == "value":
        bound = scale * max_value
        for g in retain_grads:
            g.clamp_(min=-bound, max=bound)
