"""Skipping a non-finite BLUR step: where it is decided, how ranks agree, and GradScaler's part.

A step whose losses or gradients are not finite is skipped, parameters and optimizer state
untouched. Three ways, picked per step by BLURUnlearner:

    device     optimizers that read a `found_inf` flag (BLURFusedAdamW; torch's Adam/AdamW/SGD
               with fused=True): decided on the device, no host read.
    host       any other optimizer: one host read of a boolean per step.
    scaler     16-mixed precision: GradScaler decides, as it does for any fp16 run. Its
               unscale_ must see the step as non-finite, so a NaN is planted in one element of
               the direction (`plant_nan_`); it then skips the update AND backs its scale off
               (a skip that bypassed the scaler left the scale where it overflowed, forever).

Every rank takes the same decision: the flag is all-reduced over the default group
(`agree_across_ranks`, one byte), since losses are rank-local even where the gradient sums are
global (DDP, FSDP): one rank's infinite loss skips the step on all of them.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

import torch

from blur_lightning.core.backends import local_tensor

NONFINITE_SKIP = ("auto", "device", "host")


def is_fused_blur_optimizer(optimizer) -> bool:
    """Whether optimizer is a BLURFusedAdamW, without importing Triton when it cannot be one."""
    adamw = sys.modules.get("blur_lightning.kernels.adamw")
    return adamw is not None and isinstance(optimizer, adamw.BLURFusedAdamW)


def skips_on_device(optimizer) -> bool:
    """Whether optimizer.step reads a `found_inf` device flag and then leaves everything untouched.

    torch's fused Adam, AdamW and SGD do (it is how GradScaler skips without a sync); the foreach
    and for-loop implementations refuse the flag.
    """
    if is_fused_blur_optimizer(optimizer):
        return True
    if isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW, torch.optim.SGD)):
        return all(group.get("fused") for group in optimizer.param_groups)
    return False


def agree_across_ranks(finite: torch.Tensor) -> torch.Tensor:
    """The step is finite only if it is finite on every rank: a MIN all-reduce of one byte.

    A no-op (the flag itself) without an initialized process group of more than one rank. On
    the device, no host read.
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
        return finite
    flag = finite.to(torch.uint8)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return flag.bool()


def grad_scaler(trainer):
    """The precision plugin's GradScaler (16-mixed), else None."""
    plugin = getattr(trainer, "precision_plugin", None) if trainer is not None else None
    return getattr(plugin, "scaler", None)


def current_scale(scaler) -> torch.Tensor | None:
    """The scale the gradients carry, a device tensor (no host read); None without a scaler.

    GradScaler.get_scale() would return a Python float, a host read; its `_scale` tensor is set
    by the first scale() call, which every manual_backward makes before a step.
    """
    if scaler is None or not scaler.is_enabled():
        return None
    return scaler._scale


def plant_nan_(grads: Sequence[torch.Tensor], finite: torch.Tensor) -> None:
    """Write NaN into one element of the first non-empty gradient when `finite` is False.

    One element is enough for GradScaler's non-finite check over all gradients; a torch.where
    on the device, no host read, nothing written in the usual (finite) case but that element.
    """
    for g in map(local_tensor, grads):  # a DTensor's local shard: what the (sharded) scaler checks
        if g.numel() and g.is_contiguous():
            first = g.view(-1)[:1]
            first.copy_(torch.where(finite, first, torch.full_like(first, float("nan"))))
            return


class SkipWatch:
    """The device's skipped-step count, read on the host without stalling the stream.

    post() queues a non-blocking copy into pinned memory and records an event; read() returns the
    copied value once the event has passed (None before), so the warning about a skipped step
    comes at most a step late and the step itself never waits. On the CPU there is no stream to
    stall and the value is read at once.
    """

    def __init__(self) -> None:
        self._host: torch.Tensor | None = None
        self._event = None

    def post(self, count: torch.Tensor) -> None:
        if count.device.type != "cuda":
            self._host, self._event = count.detach().clone(), None
            return
        if self._host is None:
            self._host = torch.zeros((), dtype=count.dtype, pin_memory=True)
        self._host.copy_(count.detach(), non_blocking=True)
        if self._event is None:
            self._event = torch.cuda.Event()
        self._event.record()  # re-recorded each step: query() then tracks the newest copy

    def read(self, wait: bool = False) -> int | None:
        if self._host is None:
            return None
        if self._event is not None:
            if wait:
                self._event.synchronize()
            elif not self._event.query():
                return None
        # tolist(): a read of host memory, which HostReadCounter rightly does not count.
        return int(self._host.tolist())
