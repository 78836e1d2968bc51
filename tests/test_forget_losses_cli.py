"""open-unlearning's further forget losses from the command line: their TOFU configs carry open-unlearning's
hyperparameters, and each loss runs two steps of a tiny fit under BLUR's forget_lower and penalty modes."""

from __future__ import annotations

import csv
import math
import os

import pytest
import torch
from conftest import save_tiny_model

from blur_lightning.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: one intra-op thread

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# open-unlearning's configs/trainer/<Method>.yaml values, written out (not read from our configs)
OU_SETTINGS = {
    "wga": ({"wga_beta": 1.0}, 1e-5, 5),
    "satimp": ({"satimp_beta1": 5.0, "satimp_beta2": 1.0}, 1e-5, 5),
    "ceu": ({"ceu_ignore_first_n": 1}, 1e-5, 10),
    "undial": ({"undial_beta": 10.0}, 1e-4, 10),
    "dpo": ({"dpo_beta": 0.1}, 1e-5, 10),
}


@pytest.mark.parametrize("loss", list(OU_SETTINGS))
def test_config_has_open_unlearnings_hyperparameters(loss, capsys):
    import yaml

    config = os.path.join(ROOT, "configs", "tofu", f"llama3.2-1b_forget10_{loss}.yaml")
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", config, "--print_config"])
    assert exit_info.value.code in (None, 0)
    cfg = yaml.safe_load(capsys.readouterr().out)
    settings, lr, epochs = OU_SETTINGS[loss]
    assert cfg["model"]["forget_loss"] == loss
    assert {k: cfg["model"][k] for k in settings} == settings
    assert cfg["model"]["optimizer"]["init_args"]["lr"] == lr
    assert cfg["trainer"]["max_epochs"] == epochs
    assert cfg["data"]["idk_column"] == ("idk" if loss == "dpo" else None)


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("tiny_model"), layers=1)


@pytest.mark.parametrize("mode", ["forget_lower", "penalty"])
@pytest.mark.parametrize("loss", [*OU_SETTINGS, "pdu_entropic"])  # PDU's own loss (its mode: tests/test_pdu.py)
def test_two_step_fit(loss, mode, tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    root = str(tmp_path)
    cli = main([
        "fit", "--config", os.path.join(ROOT, "configs", "tiny.yaml"),
        "--model.model", tiny_model_dir, "--model.forget_loss", loss, "--model.mode", mode,
        "--model.export_dir", "null",
        "--data.forget_path", os.path.join(ROOT, "tests", "fixtures", "qa", "forget.jsonl"),
        "--data.retain_path", os.path.join(ROOT, "tests", "fixtures", "qa", "retain.jsonl"),
        "--data.idk_column", "idk",
        "--trainer.callbacks", "[]", "--trainer.enable_checkpointing", "false",
        "--trainer.default_root_dir", root, "--trainer.logger.init_args.save_dir", root,
    ])  # fmt: skip
    assert cli.trainer.global_step == 2
    with open(tmp_path / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    forget = [float(r[k]) for r in rows for k in r if k in ("train/forget_loss", "train/retain_loss") and r[k]]
    assert len(forget) >= 4 and all(math.isfinite(v) for v in forget), forget
    start = AutoModelForCausalLM.from_pretrained(tiny_model_dir).state_dict()
    moved = [n for n, v in cli.model.model.state_dict().items() if not torch.equal(v, start[n])]
    assert len(moved) == len(start), sorted(set(start) - set(moved))
    assert (cli.model.reference_model is not None) == (loss in ("undial", "dpo"))
