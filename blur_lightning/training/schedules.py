"""Learning-rate schedules the paper configs name (stepped once per optimizer step by BLURUnlearner).

    LinearWarmupDecay   linear warm-up from 0, then linear decay to 0: the Hugging Face Trainer's
                        default ("linear", get_linear_schedule_with_warmup), which the BLUR authors'
                        TOFU runs use with one warm-up epoch (open-unlearning's warmup_epochs: 1.0).
"""

from __future__ import annotations

import torch
from torch.optim.lr_scheduler import LambdaLR


class LinearWarmupDecay(LambdaLR):
    """lr factor t / warmup_steps for t < warmup_steps, then (total_steps - t) / (total_steps - warmup_steps), >= 0.

    t counts optimizer steps from 0, so the first update runs at factor 0, as in the Trainer's schedule;
    the factor is 1 at t = warmup_steps and 0 at t = total_steps.

    Args:
        optimizer: the optimizer (LightningCLI injects it).
        warmup_steps: optimizer steps of the warm-up (>= 0).
        total_steps: optimizer steps of the whole run (> warmup_steps).

    Raises:
        ValueError: warmup_steps < 0 or total_steps <= warmup_steps.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int) -> None:
        if warmup_steps < 0 or total_steps <= warmup_steps:
            raise ValueError(
                f"LinearWarmupDecay: expected 0 <= warmup_steps < total_steps, got warmup_steps={warmup_steps}, "
                f"total_steps={total_steps}"
            )
        self.warmup_steps = warmup_steps
        self.total_steps = total_steps
        super().__init__(optimizer, self.factor)

    def factor(self, step: int) -> float:
        if step < self.warmup_steps:
            return step / max(1, self.warmup_steps)
        return max(0.0, (self.total_steps - step) / max(1, self.total_steps - self.warmup_steps))
