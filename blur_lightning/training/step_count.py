"""How many optimizer steps a fit takes, counted the way BLURUnlearner and FineTuner step.

Both modules step by hand (manual optimization, `training/base.py`): with k = the module's
`accumulate_grad_batches`, an optimizer step closes every window of k micro-batches, and the last
batch of an epoch closes the window it is in however short (`_is_last_batch`), so no window runs
across an epoch's end. Per rank:

    n  micro-batches an epoch: the train loader's length after the distributed sampler gave this rank
       its share of the rows (each rank the same: the sampler pads to equal shares) and after
       `limit_train_batches` cut it (Lightning's `trainer.num_training_batches`);
    steps an epoch   s = ceil(n / k)             (the partial last window is one step);
    steps of the fit T = min(max_steps, max_epochs * s)    (-1: no bound on that side).

Lightning's `trainer.estimated_stepping_batches` does the same sum with the Trainer's own
`accumulate_grad_batches`, which manual optimization leaves at 1: it counts micro-batches, k times too
many. A fit stopped early (EarlyStopping, `max_time`, a signal) takes fewer steps than T; the count is
what the run asks for. `OptimizerSteps` is the pure sum; `count_optimizer_steps` reads a trainer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import lightning.pytorch as pl

__all__ = ["OptimizerSteps", "count_optimizer_steps"]


@dataclass(frozen=True)
class OptimizerSteps:
    """The optimizer steps of a fit (see the module doc for the sum).

    Attributes:
        micro_batches_per_epoch: n, one rank's micro-batches in an epoch (after the distributed
            sampler and limit_train_batches); None for a loader without a length.
        accumulate_grad_batches: k, micro-batches per optimizer step (the module's hparam).
        max_epochs: the epoch bound, or None for none (Lightning's -1).
        max_steps: the step bound, or None for none (Lightning's -1).
        ranks: the data-parallel ranks the sampler splits the rows over (devices x num_nodes under
            DDP and FSDP); with `devices`, `num_nodes` and `limit_train_batches` only described.
    """

    micro_batches_per_epoch: int | None
    accumulate_grad_batches: int
    max_epochs: int | None
    max_steps: int | None
    ranks: int = 1
    devices: int = 1
    num_nodes: int = 1
    limit_train_batches: int | float = 1.0

    def __post_init__(self) -> None:
        if self.accumulate_grad_batches < 1:
            raise ValueError(f"accumulate_grad_batches must be >= 1, got {self.accumulate_grad_batches}")
        if self.micro_batches_per_epoch is not None and self.micro_batches_per_epoch < 0:
            raise ValueError(f"micro_batches_per_epoch must be >= 0, got {self.micro_batches_per_epoch}")

    @property
    def per_epoch(self) -> int | None:
        """s = ceil(n / k); None when the loader has no length."""
        if self.micro_batches_per_epoch is None:
            return None
        return math.ceil(self.micro_batches_per_epoch / self.accumulate_grad_batches)

    @property
    def total(self) -> int | None:
        """T = min(max_steps, max_epochs * s); None when nothing bounds the fit."""
        by_epochs = None
        if self.max_epochs is not None and self.per_epoch is not None:
            by_epochs = self.max_epochs * self.per_epoch
        bounds = [b for b in (by_epochs, self.max_steps) if b is not None]
        return min(bounds) if bounds else None

    def describe(self) -> str:
        """How the count was made, for error messages: every input and the sum."""
        n, k, s = self.micro_batches_per_epoch, self.accumulate_grad_batches, self.per_epoch
        ranks = f"{self.ranks} data-parallel rank(s) (devices {self.devices} x num_nodes {self.num_nodes})"
        if n is None:
            epoch = "a train loader without a length: no steps per epoch"
        else:
            epoch = (
                f"{n} micro-batches an epoch per rank (after the distributed sampler and "
                f"limit_train_batches={self.limit_train_batches}) in windows of accumulate_grad_batches={k}, "
                f"a partial last window one step: ceil({n}/{k}) = {s} optimizer steps an epoch"
            )
        epochs = "no max_epochs" if self.max_epochs is None else f"max_epochs={self.max_epochs}"
        if self.max_epochs is not None and s is not None:
            epochs += f" ({self.max_epochs} x {s} = {self.max_epochs * s})"
        steps = "max_steps=-1" if self.max_steps is None else f"max_steps={self.max_steps}"
        total = "unbounded" if self.total is None else str(self.total)
        return f"{ranks}; {epoch}; {epochs}, {steps}: {total} optimizer steps in all"


def count_optimizer_steps(trainer: pl.Trainer, accumulate_grad_batches: int) -> OptimizerSteps:
    """The optimizer steps `trainer`'s fit will take with a module accumulating k micro-batches a step.

    Call it once Lightning has loaded the train loader (on_train_start or later). It does not load
    the loader itself as `trainer.estimated_stepping_batches` does: done before a checkpoint's
    restore (configure_optimizers, on_fit_start), that drops the loader's resume position (Lightning
    issue 20550). Reads one rank's loader length, so every rank must get the same number of
    micro-batches (our samplers pad to equal shares).

    Args:
        trainer: the Trainer of the fit.
        accumulate_grad_batches: k, the module's micro-batches per optimizer step.

    Raises:
        RuntimeError: the train loader is not loaded yet.
    """
    if trainer.train_dataloader is None:
        raise RuntimeError("count_optimizer_steps: the train loader is not loaded yet; call it from on_train_start")
    n = trainer.num_training_batches  # after the sampler's split and limit_train_batches
    sampler_kwargs = getattr(trainer, "distributed_sampler_kwargs", None) or {}
    return OptimizerSteps(
        micro_batches_per_epoch=None if n == float("inf") else int(n),
        accumulate_grad_batches=accumulate_grad_batches,
        max_epochs=None if trainer.max_epochs in (None, -1) else int(trainer.max_epochs),
        max_steps=None if trainer.max_steps == -1 else int(trainer.max_steps),
        ranks=int(sampler_kwargs.get("num_replicas", trainer.world_size)),
        devices=int(trainer.num_devices),
        num_nodes=int(trainer.num_nodes),
        limit_train_batches=trainer.limit_train_batches,
    )
