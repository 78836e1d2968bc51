"""The end of an optimizer step, shared by every training loop here: BLUR, fine-tuning, the relearning probe.

Each loop makes its gradient its own way (BLUR's projection, one NLL backward); then the same things
happen, written once here:

* `check_and_clip_`: the step is finite when the loss and every gradient entry are (one rank's
  non-finite value skips the step on all), and the *true* gradient is clipped (core/clipping.py:
  under a GradScaler the gradients stay scaled, the clip compares ||g|| / S with the limit);
* `apply_update`: the optimizer step, or a skip that leaves the parameters and the optimizer state
  untouched and still counts as a step (the caller steps its scheduler once either way, as it must
  on the GradScaler and device paths, which cannot know without a host read). Where the decision
  is made: a GradScaler skips when a NaN is planted in the gradients (and backs its scale off); a
  fused optimizer reads a found_inf flag on the device; any other path reads `finite` on the host
  once, and a skipped step then calls the optimizer with no gradient (torch's optimizers leave a
  parameter without .grad alone).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from blur_lightning.core.clipping import clip_
from blur_lightning.core.nonfinite import agree_across_ranks, plant_nan_


def check_and_clip_(
    loss: torch.Tensor,
    grads: Sequence[torch.Tensor],
    *,
    max_value: float | None = None,
    algorithm: str = "norm",
    scale: torch.Tensor | None = None,
    group=None,
) -> torch.Tensor:
    """Whether the step is finite (0-dim bool, agreed across ranks; no host read), then clip `grads` in place.

    Args:
        loss: the step's loss (any rank's non-finite loss skips the step).
        grads: this rank's gradients (local shards); their norm is finite iff every entry is. foreach:
            no gradient-sized temporary.
        max_value, algorithm: the clip (None: none), as `core.clipping.clip_`.
        scale: the GradScaler scale the gradients carry, or None.
        group: the process group(s) a sharded model's squared norm is summed over (None: one process, DDP).
    """
    norm = None
    if max_value and algorithm == "norm":  # the clip's own global norm serves the check: one pass, not two
        norm = clip_(grads, max_value, algorithm, scale=scale, group=group)
    elif grads:
        norm = torch.nn.utils.get_total_norm(list(grads))
    finite = torch.isfinite(loss) if norm is None else torch.isfinite(loss) & torch.isfinite(norm)
    if max_value and algorithm == "value":  # a clamp would hide an inf: after the check
        clip_(grads, max_value, algorithm, scale=scale, group=group)
    return agree_across_ranks(finite)


def apply_update(
    optimizer,
    finite: torch.Tensor,
    grads: Sequence[torch.Tensor],
    *,
    scale: torch.Tensor | None = None,
    on_device: bool = False,
    fused: bool = False,
    step_kwargs: dict | None = None,
    step: Callable[..., object] | None = None,
) -> bool | None:
    """The update, or a skip that counts as a step (see the module doc). The caller then steps its scheduler.

    Args:
        optimizer: a torch optimizer, or Lightning's wrapper of one.
        finite: 0-dim bool, the same on every rank.
        grads: the gradients a GradScaler checks (a NaN is planted in them on a non-finite step).
        scale: the GradScaler's scale when one decides (16-mixed), else None.
        on_device: the optimizer skips on a device flag (torch's fused Adam/AdamW/SGD, BLURFusedAdamW).
        fused: the optimizer is BLURFusedAdamW (its flag is a keyword of step()).
        step_kwargs: keywords of optimizer.step (BLURFusedAdamW's forget gradients and coefficients).
        step: what steps the optimizer (default optimizer.step; a plain loop with its own GradScaler
            passes one that calls scaler.step and scaler.update).

    Returns:
        The host's reading of `finite` on the host path, None where the device decided (no read).
    """
    inner = getattr(optimizer, "optimizer", optimizer)
    step = step or optimizer.step
    kwargs = dict(step_kwargs or {})
    if scale is not None:
        plant_nan_(grads, finite)
        step(**kwargs)
        return None
    if on_device:
        found_inf = (~finite).float()
        if fused:
            step(**kwargs, found_inf=found_inf)
        else:
            inner.found_inf = found_inf  # torch's fused Adam/AdamW/SGD read it (GradScaler's own protocol)
            try:
                step(**kwargs)
            finally:
                del inner.found_inf
        return None
    if bool(finite):  # the one host read of the step
        step(**kwargs)
        return True
    if fused:  # its own skip flag: the step counts, nothing moves
        step(**kwargs, found_inf=torch.ones((), device=finite.device))
    else:
        optimizer.zero_grad(set_to_none=True)
        step()
    return False
