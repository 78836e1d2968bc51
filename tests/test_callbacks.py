"""Callbacks and atomic checkpoints of the main job (its QA evaluation and training curves), on a tiny model."""

from __future__ import annotations

import json
import os

import pytest
import torch
from test_module import sgd

from blur_lightning.evals.callback import EvaluationCallback
from blur_lightning.training.checkpoint_io import AtomicCheckpointIO, atomic_torch_save, damaged_checkpoint
from blur_lightning.training.curves import TrainingCurves
from blur_lightning.training.unlearner import BLURUnlearner

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "qa")


def test_qa_eval_and_curves_write_their_files(tmp_path):
    from blur_lightning.data.datamodule import ForgetRetainDataModule
    from blur_lightning.testing.tiny import tiny_llama, tiny_tokenizer

    tokenizer = tiny_tokenizer()
    module = BLURUnlearner(tiny_llama(vocab_size=len(tokenizer)), forget_loss="ga", optimizer=sgd(0.01),
                           export_dir=None)
    module.tokenizer = tokenizer
    data = ForgetRetainDataModule(
        forget_path=os.path.join(FIXTURES, "forget.jsonl"), retain_path=os.path.join(FIXTURES, "retain.jsonl"),
        tokenizer="unused", batch_size=4, max_length=48,
    )
    data.set_tokenizer(tokenizer)
    splits = {"forget": os.path.join(FIXTURES, "forget.jsonl")}
    qa = EvaluationCallback("qa", splits, stages=["fit_start", "fit_end"], max_rows=5, max_new_tokens=3)
    curves = TrainingCurves()
    import lightning.pytorch as pl

    trainer = pl.Trainer(accelerator="cpu", max_steps=3, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
                         callbacks=[qa, curves])
    trainer.fit(module, datamodule=data)
    saved = json.loads((tmp_path / "qa_eval.json").read_text())
    assert saved["sizes"] == {"forget": 5}
    assert [e["stage"] for e in saved["evaluations"]] == ["fit_start", "fit_end"]
    for evaluation in saved["evaluations"]:
        assert 0.0 <= evaluation["metrics"]["forget/accuracy"] <= 1.0
        assert 0.0 < evaluation["metrics"]["forget/answer_prob"] < 1.0
        assert len(evaluation["extras"]["forget/per_example"]["correct"]) == 5
    assert "| forget | 5 |" in (tmp_path / "qa_eval.md").read_text()
    lines = (tmp_path / "training_curves.csv").read_text().splitlines()
    assert len(lines) == 1 + 3 and lines[0].startswith("step,")
    assert (tmp_path / "training_curves.png").stat().st_size > 1000
    # a resumed run keeps the "before" numbers from the checkpointed callback state
    restored = EvaluationCallback("qa", splits, stages=["fit_start", "fit_end"], max_rows=5)
    restored.load_state_dict(qa.state_dict())
    assert restored.evaluations[0] == qa.evaluations[0]


def test_atomic_save_leaves_old_file_on_failure(tmp_path, monkeypatch):
    target = tmp_path / "ckpt" / "last.ckpt"
    atomic_torch_save({"step": 1}, target)
    assert torch.load(target)["step"] == 1

    class Boom:
        def __reduce__(self):
            raise RuntimeError("disk full halfway")

    with pytest.raises(RuntimeError, match="disk full halfway"):
        atomic_torch_save({"step": 2, "bad": Boom()}, target)
    assert torch.load(target)["step"] == 1  # the old checkpoint survived intact
    assert os.listdir(target.parent) == ["last.ckpt"]  # and no temp file was left behind
    io = AtomicCheckpointIO()
    io.save_checkpoint({"step": 3}, str(target))
    assert io.load_checkpoint(str(target))["step"] == 3


def test_damaged_checkpoint_is_named(tmp_path):
    """torch.load takes a flipped bit silently and reports a cut file as a weights_only refusal;
    the zip's own checks (its directory, a CRC per member) find both."""
    good = tmp_path / "good.ckpt"
    atomic_torch_save({"step": 3, "weights": torch.arange(4096.0)}, good)
    assert damaged_checkpoint(good) is None
    data = good.read_bytes()
    cut, flipped = tmp_path / "cut.ckpt", tmp_path / "flipped.ckpt"
    cut.write_bytes(data[: len(data) // 2])
    middle = data.index(torch.arange(4096.0)[1000:1002].numpy().tobytes())  # inside the tensor's bytes
    flipped.write_bytes(data[:middle] + bytes([data[middle] ^ 0x40]) + data[middle + 1 :])
    assert "not a torch.save archive" in damaged_checkpoint(cut)
    assert "is corrupt (CRC mismatch)" in damaged_checkpoint(flipped)
    assert not torch.equal(torch.load(flipped)["weights"], torch.arange(4096.0))  # what torch.load misses
    io = AtomicCheckpointIO()
    for bad in (cut, flipped):
        with pytest.raises(ValueError, match=rf"checkpoint '.*{bad.name}' is damaged"):
            io.load_checkpoint(str(bad))
    assert io.load_checkpoint(str(good))["step"] == 3
    with pytest.raises(FileNotFoundError):
        io.load_checkpoint(str(tmp_path / "missing.ckpt"))
