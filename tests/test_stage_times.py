"""StageTimes: each stage's wall time, the training loop and the rest, printed and saved at fit end."""

from __future__ import annotations

import json
import time

import lightning.pytorch as pl
from lightning.pytorch.demos.boring_classes import BoringModel

from blur_lightning.training.stage_times import StageTimes, stage


class _SlowEvaluation(pl.Callback):
    def on_fit_start(self, trainer, pl_module):
        with stage(trainer, "before-evaluation"):
            time.sleep(0.2)

    def on_train_end(self, trainer, pl_module):  # fit-end evaluations run here, before StageTimes
        for _ in range(2):  # a stage run twice is summed
            with stage(trainer, "after-evaluation"):
                time.sleep(0.1)


def test_stage_times_are_collected_printed_and_saved(tmp_path, caplog):
    trainer = pl.Trainer(
        max_steps=3, limit_val_batches=0, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=tmp_path, callbacks=[_SlowEvaluation(), StageTimes()],
    )  # fmt: skip
    with caplog.at_level("INFO"):
        trainer.fit(BoringModel())
    saved = json.loads((tmp_path / "stage_times.json").read_text())
    assert saved["before-evaluation"] >= 0.2
    assert saved["after-evaluation"] >= 0.2
    assert "training (3 steps)" in saved
    assert saved["training (3 steps)"] < 0.15  # the fit-end stages are not counted as training
    parts = sum(v for k, v in saved.items() if k != "total")
    assert abs(parts - saved["total"]) < 0.05  # "other" is the remainder: the parts add up
    assert "Stage times:" in caplog.text and "before-evaluation" in caplog.text


def test_stage_without_a_collector_is_a_no_op():
    with stage(None, "anything"):
        pass
