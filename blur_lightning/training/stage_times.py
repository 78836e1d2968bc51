"""Wall time of each stage of a fit (model load, evaluations, training, probes), printed at the end.

Callbacks that do long work time it with :func:`stage`; the :class:`StageTimes` callback (in the
trainer's list) collects those, adds the training loop and the rest, prints one table when the fit
ends and writes ``stage_times.json`` in the log dir. Without a ``StageTimes`` callback, :func:`stage`
costs one lookup.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Iterator

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_info


class StageTimes(pl.Callback):
    """Collects stage times; prints and saves them when ``fit`` ends.

    Args:
        filename: the JSON file written in the trainer's log dir (None: print only).
    """

    def __init__(self, filename: str | None = "stage_times.json") -> None:
        self.filename = filename
        self.stages: dict[str, float] = {}
        self._fit_start: float | None = None
        self._train_start: float | None = None
        self._last_batch_end: float | None = None

    def add(self, name: str, seconds: float) -> None:
        """Add `seconds` to stage `name` (a stage run twice is summed)."""
        self.stages[name] = self.stages.get(name, 0.0) + seconds

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            self.stages.clear()
            self._fit_start = time.perf_counter()

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._train_start = time.perf_counter()

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args, **kwargs) -> None:
        self._last_batch_end = time.perf_counter()

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # the loop alone, up to its last batch: fit-end evaluations and probes run in on_train_end
        # hooks (before or after this one) and are timed by their own stages, as are validations
        if self._train_start is not None and self._last_batch_end is not None:
            inner = sum(v for k, v in self.stages.items() if "(validation)" in k)
            self.add(f"training ({trainer.global_step} steps)", self._last_batch_end - self._train_start - inner)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit" or self._fit_start is None:
            return
        total = time.perf_counter() - self._fit_start
        stages = dict(self.stages)
        stages["other (model load, checkpoints, export)"] = max(0.0, total - sum(stages.values()))
        width = max(len(name) for name in stages)
        lines = [f"{'stage':<{width}}  seconds"] + [f"{name:<{width}}  {secs:7.1f}" for name, secs in stages.items()]
        lines.append(f"{'total':<{width}}  {total:7.1f}  ({total / 60:.1f} min)")
        rank_zero_info("Stage times:\n" + "\n".join(lines))
        log_dir = trainer.log_dir or trainer.default_root_dir  # a broadcast under DDP: every rank calls it
        if self.filename and trainer.is_global_zero:
            os.makedirs(log_dir, exist_ok=True)
            with open(os.path.join(log_dir, self.filename), "w") as f:
                json.dump({**{k: round(v, 2) for k, v in stages.items()}, "total": round(total, 2)}, f, indent=2)


def _collector(trainer: pl.Trainer | None) -> StageTimes | None:
    if trainer is None:
        return None
    return next((cb for cb in trainer.callbacks if isinstance(cb, StageTimes)), None)


@contextlib.contextmanager
def stage(trainer: pl.Trainer | None, name: str) -> Iterator[None]:
    """Time the block as stage `name` of the trainer's :class:`StageTimes` (no-op without one)."""
    collector = _collector(trainer)
    start = time.perf_counter()
    try:
        yield
    finally:
        if collector is not None:
            collector.add(name, time.perf_counter() - start)
