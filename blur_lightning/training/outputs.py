"""What a training step hands to the callbacks: the documented type of `training_step`'s return value.

Lightning passes it to every callback's `on_train_batch_end` as `outputs`; `TrainingCurves` and the
tests read it. Keys beyond these are not promised.
"""

from __future__ import annotations

from typing import TypedDict

import torch

from blur_lightning.core.projection import BLURStats


class StepOutput(TypedDict, total=False):
    """BLURUnlearner.training_step's return value, one per micro-batch.

    Attributes:
        forget_loss: this micro-batch's forget loss (detached).
        retain_loss: this micro-batch's retain loss (detached).
        stats: the projection's sums and coefficients; only on the micro-batch that ended an
            optimizer step (the other keys below come with it).
        step_forget_loss: the optimizer step's forget loss, the mean over its micro-batches.
        step_retain_loss: the same for the retain loss.
    """

    forget_loss: torch.Tensor
    retain_loss: torch.Tensor
    stats: BLURStats
    step_forget_loss: torch.Tensor
    step_retain_loss: torch.Tensor


class FineTuneOutput(TypedDict):
    """FineTuner.training_step's return value: this micro-batch's loss (detached)."""

    loss: torch.Tensor
