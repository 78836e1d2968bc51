"""Learning-rate schedules the paper configs name (stepped once per optimizer step by the modules).

    LinearWarmupDecay   linear warm-up from 0, then linear decay to 0: the Hugging Face Trainer's
                        default ("linear", get_linear_schedule_with_warmup), which the BLUR authors'
                        TOFU runs use with one warm-up epoch (open-unlearning's warmup_epochs: 1.0).

A schedule whose lengths follow the data (a warm-up in epochs, the total "auto") is built unresolved
by the CLI's factory and resolved by the module in on_train_start, before the first step, once the
train loader's length is known: the module counts the optimizer steps the fit will take
(`training/step_count.py`) and calls `resolve(steps_per_epoch, total_steps, counted)`. A resumed fit
restores the checkpoint's position first; `resolve` then checks that the lengths come out the same.
The math here knows nothing of Lightning: it takes two integers and a sentence saying how they were
counted (for the errors).
"""

from __future__ import annotations

import math
from fractions import Fraction
from typing import Any, Literal, Protocol, runtime_checkable

import torch
from torch.optim.lr_scheduler import LambdaLR

__all__ = ["LinearWarmupDecay", "ResolvableSchedule"]


@runtime_checkable
class ResolvableSchedule(Protocol):
    """A schedule whose lengths are fixed at fit start from the optimizer steps the fit will take."""

    def resolve(self, steps_per_epoch: int | None, total_steps: int | None, counted: str = "") -> None: ...


class LinearWarmupDecay(LambdaLR):
    """lr factor t / w for t < w, then (T - t) / (T - w), >= 0 (w warm-up steps, T total steps).

    t counts optimizer steps from 0, and optimizer step t runs at factor(t): the first step runs at
    factor 0 (the Trainer's schedule does too), the peak is step w's, the last step (T - 1) runs at
    1 / (T - w), and the lr is exactly 0 once the last step is taken (factor(T) = 0): no step trains
    at lr 0 but the first, when there is a warm-up.

    Lengths that follow the data: `warmup_epochs` E gives w = floor(E * s), s the optimizer steps an
    epoch of this run takes (counted as the module steps: ceil(micro-batches per rank / k), a partial
    last window one step; `training/step_count.py`). With E = 1 the warm-up is every step of epoch 1
    and the peak lr is that of the first step of epoch 2. `total_steps="auto"` takes T = the steps the
    fit will take (min(max_steps, max_epochs * s)). Both are resolved before the first step (the
    module's on_train_start calls `resolve`); an explicit `total_steps` is checked there against the
    fit's count, and a mismatch (a decay that
    ends early and trains on at lr 0, or never reaches 0) is refused with both numbers.

    open-unlearning turns warmup_epochs into floor(E * rows / (batch x accumulation x GPUs)) steps
    (`src/trainer/__init__.py`), which the Trainer version the BLUR authors used paired with its own
    floor(micro-batches / accumulation) steps an epoch (a window there runs across an epoch's end):
    one warm-up epoch was one epoch of steps in both. Our epochs end their last window, so an epoch
    has s = ceil(...) steps and the warm-up is those s: TOFU forget10 on one device, 100 micro-batches
    of 4 with k = 8, warms up over 13 steps where open-unlearning's formula gives 12
    (docs/PAPER_CONFIGS.md). The two agree whenever an epoch is whole windows of full micro-batches
    (rows divisible by batch x accumulation x ranks).

    Args:
        optimizer: the optimizer (LightningCLI injects it).
        warmup_steps: w as optimizer steps (>= 0); None with `warmup_epochs` None: no warm-up.
        total_steps: T as optimizer steps (>= 1), checked against the fit's count before its first step; or
            "auto": the fit's count.
        warmup_epochs: w as epochs of this run's optimizer steps (>= 0, fractions allowed, rounded
            down); instead of `warmup_steps`.

    Raises:
        ValueError: both warm-up lengths given, a negative one, a total that is neither "auto" nor a
            positive int, or warmup_steps >= total_steps when both are steps.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        warmup_steps: int | None = None,
        total_steps: int | Literal["auto"] = "auto",
        warmup_epochs: float | None = None,
    ) -> None:
        if warmup_steps is not None and warmup_epochs is not None:
            raise ValueError(
                f"LinearWarmupDecay: give warmup_steps or warmup_epochs, not both (got warmup_steps={warmup_steps}, "
                f"warmup_epochs={warmup_epochs})"
            )
        if warmup_steps is not None and (isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int)
                                         or warmup_steps < 0):  # fmt: skip
            raise ValueError(f"LinearWarmupDecay: warmup_steps must be an int >= 0, got {warmup_steps!r}")
        if warmup_epochs is not None and not (math.isfinite(warmup_epochs) and warmup_epochs >= 0):
            raise ValueError(f"LinearWarmupDecay: warmup_epochs must be a finite number >= 0, got {warmup_epochs!r}")
        if total_steps != "auto" and (isinstance(total_steps, bool) or not isinstance(total_steps, int)
                                      or total_steps < 1):  # fmt: skip
            raise ValueError(f"LinearWarmupDecay: total_steps must be a positive int or 'auto', got {total_steps!r}")
        if isinstance(total_steps, int) and warmup_epochs is None and (warmup_steps or 0) >= total_steps:
            raise ValueError(
                f"LinearWarmupDecay: expected 0 <= warmup_steps < total_steps, got warmup_steps={warmup_steps}, "
                f"total_steps={total_steps}"
            )
        self.requested = {"warmup_steps": warmup_steps, "warmup_epochs": warmup_epochs, "total_steps": total_steps}
        self.counted = ""  # how the fit's steps were counted, once resolved by a module
        self.restored: tuple[int, int] | None = None  # (w, T) of the checkpoint a fit resumed from
        self.warmup_steps: int | None = None  # w and T, once known
        self.total_steps: int | None = None
        if warmup_epochs is None and total_steps != "auto":  # steps given: usable without a fit
            self.warmup_steps, self.total_steps = warmup_steps or 0, total_steps
        super().__init__(optimizer, self.factor)

    @property
    def resolved(self) -> bool:
        return self.total_steps is not None

    def factor(self, step: int) -> float:
        """The lr factor optimizer step `step` runs at (0-based)."""
        if not self.resolved:
            if step == 0:  # LambdaLR's first evaluation, before the fit is counted: 0 or 1 whatever T is
                wants_warmup = bool(self.requested["warmup_steps"] or self.requested["warmup_epochs"])
                return 0.0 if wants_warmup else 1.0
            raise RuntimeError(
                f"LinearWarmupDecay({self._requested_text()}) is not resolved: the module resolves it at fit start "
                "from the optimizer steps the fit takes; outside a fit, call resolve(steps_per_epoch, total_steps)"
            )
        if step < self.warmup_steps:
            return step / max(1, self.warmup_steps)
        return max(0.0, (self.total_steps - step) / max(1, self.total_steps - self.warmup_steps))

    def resolve(self, steps_per_epoch: int | None, total_steps: int | None, counted: str = "") -> None:
        """Fix w and T from the fit's optimizer steps; check an explicit total against them.

        Idempotent: the lengths are computed from the requested ones every time.

        Args:
            steps_per_epoch: s, the optimizer steps an epoch takes (None: unknown, a loader without a length).
            total_steps: the optimizer steps the fit takes (None: nothing bounds it).
            counted: how the two were counted (devices, micro-batches, k, epochs, max_steps), for errors.

        Raises:
            ValueError: an explicit total_steps that is not the fit's count; "auto" for an unbounded
                fit; warmup_epochs without a length of epoch; a warm-up not shorter than the total;
                lengths other than those of the checkpoint the fit resumed from.
        """
        requested = self.requested
        how = f" ({counted})" if counted else ""
        if requested["total_steps"] == "auto":
            if total_steps is None:
                raise ValueError(
                    f"LinearWarmupDecay: total_steps='auto' needs a bounded fit (max_epochs with a sized train "
                    f"loader, or max_steps){how}"
                )
            total = total_steps
        else:
            total = requested["total_steps"]
            if total_steps is not None and total != total_steps:
                raise ValueError(
                    f"LinearWarmupDecay: total_steps={total}, but this fit takes {total_steps} optimizer steps{how}; "
                    f"the lr would {'reach 0 early and train on at 0' if total < total_steps else 'never reach 0'}. "
                    "Set total_steps: auto, or make the fit take that many steps"
                )
        if requested["warmup_epochs"] is not None:
            if steps_per_epoch is None:
                raise ValueError(
                    f"LinearWarmupDecay: warmup_epochs={requested['warmup_epochs']} needs the steps of an epoch, "
                    f"and the train loader has no length{how}; give warmup_steps instead"
                )
            # Fraction of the decimal text: 0.29 epochs of 100 steps is 29, not floor(28.999999999999996).
            warmup = math.floor(Fraction(repr(float(requested["warmup_epochs"]))) * steps_per_epoch)
            source = f"warmup_epochs={requested['warmup_epochs']} x {steps_per_epoch} steps an epoch = {warmup} steps"
        else:
            warmup = requested["warmup_steps"] or 0
            source = f"warmup_steps={warmup}"
        if warmup >= total:
            raise ValueError(
                f"LinearWarmupDecay: the warm-up must be shorter than the fit, got {source} and "
                f"total_steps={total}{how}"
            )
        if self.restored is not None and self.restored != (warmup, total):
            raise ValueError(
                f"LinearWarmupDecay: the checkpoint's schedule has warmup_steps={self.restored[0]}, "
                f"total_steps={self.restored[1]}, this fit's has warmup_steps={warmup}, total_steps={total}{how}; "
                "resume with the settings that wrote the checkpoint (devices, num_nodes, batch_size, "
                "accumulate_grad_batches, max_epochs, max_steps, limit_train_batches) or start a new fit"
            )
        self.warmup_steps, self.total_steps, self.counted = warmup, total, counted
        # The lr of the current step, now that w and T are known (LambdaLR set it from factor(last_epoch)).
        for group, base_lr in zip(self.optimizer.param_groups, self.base_lrs):
            group["lr"] = base_lr * self.factor(self.last_epoch)
        self._last_lr = [group["lr"] for group in self.optimizer.param_groups]

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore a checkpoint's position and keep its lengths for `resolve` to check (a fit resumed
        on other devices, batch size, accumulation, epochs, max_steps or limit_train_batches would
        otherwise follow the checkpoint's schedule, or this fit's from a position in another)."""
        keep = {"requested": self.requested, "counted": self.counted}
        super().load_state_dict(state_dict)
        self.__dict__.update(keep)  # this fit's request, not the checkpoint's
        self.restored = (self.warmup_steps, self.total_steps) if self.total_steps is not None else None

    def _requested_text(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.requested.items() if v is not None)
