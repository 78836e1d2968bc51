"""Progress bars in Lightning's style: tqdm on a terminal, silent in CI logs and when turned off.

Evaluation, generation and the relearning probe report through :func:`progress`; the training bar
(:class:`StepProgressBar`) counts optimizer steps of ``max_steps`` instead of Lightning's
"Epoch 3/-2" when ``max_epochs`` is -1.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator
from typing import Any, TypeVar

from lightning.pytorch.callbacks import TQDMProgressBar
from tqdm.auto import tqdm

__all__ = ["StepProgressBar", "on_terminal", "progress"]

T = TypeVar("T")


def on_terminal() -> bool:
    """Whether stderr is a terminal: a bar redrawn in a CI log is one line per update."""
    return bool(getattr(sys.stderr, "isatty", lambda: False)())


def progress(iterable: Iterable[T], *, total: int | None = None, desc: str = "", enabled: bool = True) -> Iterator[T]:
    """``iterable`` with a transient tqdm bar when `enabled` and on a terminal, else unchanged.

    Args:
        iterable: what to iterate.
        total: its length when it has none.
        desc: the bar's label (e.g. ``"qa forget: generate"``).
        enabled: False turns the bar off (the trainer's progress bar is off).
    """
    if not enabled or not on_terminal():
        return iter(iterable)
    return iter(tqdm(iterable, total=total, desc=desc, leave=False, dynamic_ncols=True))


class StepProgressBar(TQDMProgressBar):
    """Lightning's training bar counting optimizer steps of ``max_steps`` when a run is bounded by steps.

    With ``max_epochs=-1`` and ``max_steps=40`` Lightning's own bar reads "Epoch 3/-2" and restarts
    every epoch; this one reads "Step 17/40" across epochs. Runs bounded by epochs keep Lightning's bar.
    """

    def _by_steps(self) -> bool:
        return self.trainer.max_steps is not None and self.trainer.max_steps > 0

    def on_train_epoch_start(self, trainer: Any, *args: Any) -> None:
        if not self._by_steps():
            return super().on_train_epoch_start(trainer, *args)
        bar = self.train_progress_bar
        if bar.total != trainer.max_steps:
            bar.reset(total=trainer.max_steps)
        bar.n = trainer.global_step
        bar.set_description("Step")
        bar.refresh()

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if not self._by_steps():
            return super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        bar = self.train_progress_bar
        if trainer.global_step != bar.n and self._should_update(trainer.global_step, trainer.max_steps):
            bar.n = trainer.global_step
            bar.set_postfix(self.get_metrics(trainer, pl_module))
            bar.refresh()
