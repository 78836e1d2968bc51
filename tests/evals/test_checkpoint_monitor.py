"""An evaluation metric drives ModelCheckpoint (open-unlearning issues 94 and 187: keep the best
checkpoint by an unlearning metric), and a run may hold several EvaluationCallbacks."""

from __future__ import annotations

import os

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from blur_lightning.data.datamodule import ForgetRetainDataModule
from blur_lightning.evals.callback import EvaluationCallback
from blur_lightning.testing.tiny import tiny_llama, tiny_tokenizer
from blur_lightning.training.unlearner import BLURUnlearner

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: one intra-op thread

FIXTURES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "fixtures")
FORGET = os.path.join(FIXTURES, "qa", "forget.jsonl")


def fit(tmp_path, callbacks, max_steps=3):
    tokenizer = tiny_tokenizer()
    module = BLURUnlearner(tiny_llama(vocab_size=len(tokenizer)), forget_loss="ga", export_dir=None,
                           optimizer=lambda p: torch.optim.SGD(p, lr=0.02))  # fmt: skip
    module.tokenizer = tokenizer
    data = ForgetRetainDataModule(forget_path=FORGET, retain_path=os.path.join(FIXTURES, "qa", "retain.jsonl"),
                                  tokenizer="unused", batch_size=8, max_length=48)  # fmt: skip
    data.set_tokenizer(tokenizer)
    trainer = pl.Trainer(
        accelerator="cpu", max_steps=max_steps, val_check_interval=1, check_val_every_n_epoch=None,
        num_sanity_val_steps=0, logger=False, default_root_dir=tmp_path, enable_progress_bar=False,
        enable_model_summary=False, callbacks=callbacks,
    )  # fmt: skip
    trainer.fit(module, datamodule=data)
    return trainer


def test_model_checkpoint_keeps_the_best_by_an_evaluation_metric(tmp_path):
    """Two ModelCheckpoints on the forget answer probability, one keeping the highest and one the
    lowest: each keeps the step its mode picks from the evaluations, and one of them is not the
    last step (measured: 0.00178, 0.00172, 0.00199 at steps 1-3), so the choice follows the metric."""
    evaluation = EvaluationCallback("qa", {"forget": FORGET}, stages=["validation"], max_rows=6, max_new_tokens=2)
    checkpoints = {
        mode: ModelCheckpoint(dirpath=tmp_path / mode, monitor="qa/forget/answer_prob", mode=mode, save_top_k=1,
                              filename="step{step}", auto_insert_metric_name=False)
        for mode in ("max", "min")
    }  # fmt: skip
    fit(tmp_path, [evaluation, *checkpoints.values()])
    probs = {e["step"]: e["metrics"]["forget/answer_prob"] for e in evaluation.evaluations}
    assert list(probs) == [1, 2, 3]
    best = {"max": max(probs, key=probs.get), "min": min(probs, key=probs.get)}
    assert 3 in best.values() and set(best.values()) != {3}, probs  # one mode keeps an earlier step
    for mode, checkpoint in checkpoints.items():
        assert os.path.basename(checkpoint.best_model_path) == f"step{best[mode]}.ckpt", (mode, probs)
        assert float(checkpoint.best_model_score) == pytest.approx(probs[best[mode]], rel=1e-6)
        assert os.listdir(tmp_path / mode) == [f"step{best[mode]}.ckpt"]


def test_two_evaluation_callbacks_in_one_run_keep_their_own_state(tmp_path):
    """QA on two sets under two prefixes: Lightning refused the second callback (one state_key)."""
    first = EvaluationCallback("qa", {"forget": FORGET}, stages=["validation"], max_rows=2, max_new_tokens=1)
    second = EvaluationCallback("qa", {"forget": FORGET}, stages=["validation"], max_rows=3, max_new_tokens=1,
                                prefix="qa3")  # fmt: skip
    assert first.state_key != second.state_key
    trainer = fit(tmp_path, [first, second], max_steps=1)
    assert [e["step"] for e in first.evaluations] == [1] and [e["step"] for e in second.evaluations] == [1]
    assert {"qa/forget/accuracy", "qa3/forget/accuracy"} <= set(trainer.callback_metrics)
    checkpoint = torch.load(trainer.checkpoint_callback.best_model_path, weights_only=False)
    assert {first.state_key, second.state_key} <= set(checkpoint["callbacks"])
