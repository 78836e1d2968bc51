"""The CLI: every config parses; a tiny fit writes a checkpoint and an HF export; resume is exact."""

from __future__ import annotations

import glob
import math
import os
import struct
import zipfile

import pytest
import torch
from conftest import save_tiny_model

from blur_lightning.cli import main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(glob.glob(os.path.join(ROOT, "configs", "**", "*.yaml"), recursive=True))


@pytest.mark.parametrize("config", CONFIGS, ids=[os.path.relpath(c, ROOT) for c in CONFIGS])
def test_every_config_parses(config, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", config, "--print_config"])
    assert exit_info.value.code in (None, 0)
    printed = capsys.readouterr().out
    assert "model:" in printed and "data:" in printed


def test_bad_config_value_names_the_field(tmp_path):
    with pytest.raises(SystemExit):
        main(["fit", "--config", os.path.join(ROOT, "configs", "tiny.yaml"), "--model.gamma", "lots"])


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("tiny_model"))


def run_fit(tmp_path, model_dir, *extra):
    root = str(tmp_path)
    args = [
        "fit", "--config", os.path.join(ROOT, "configs", "tiny.yaml"),
        "--model.model", model_dir,
        "--data.forget_path", os.path.join(ROOT, "tests", "fixtures", "qa", "forget.jsonl"),
        "--data.retain_path", os.path.join(ROOT, "tests", "fixtures", "qa", "retain.jsonl"),
        "--trainer.default_root_dir", root,
        "--trainer.logger.init_args.save_dir", root,
        *extra,
    ]
    return main(args)


def test_tiny_fit_writes_checkpoint_and_hf_export(tmp_path, tiny_model_dir):
    cli = run_fit(tmp_path, tiny_model_dir)
    assert cli.trainer.global_step == 2
    ckpts = glob.glob(os.path.join(tmp_path, "**", "*.ckpt"), recursive=True)
    assert any(c.endswith("last.ckpt") for c in ckpts), ckpts
    export = os.path.join(tmp_path, "hf_model")
    assert os.path.isfile(os.path.join(export, "config.json"))
    from transformers import AutoModelForCausalLM, AutoTokenizer

    reloaded = AutoModelForCausalLM.from_pretrained(export)
    AutoTokenizer.from_pretrained(export)
    for (name, a), b in zip(cli.model.model.state_dict().items(), reloaded.state_dict().values()):
        assert torch.equal(a, b), name
    assert os.path.isfile(os.path.join(tmp_path, "training_curves.png"))
    # the forget loss went up (NPO pushes the forget answers down) over the two steps
    import csv

    with open(os.path.join(tmp_path, "training_curves.csv")) as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2


def test_resume_mid_run_matches_uninterrupted(tmp_path, tiny_model_dir):
    straight = run_fit(tmp_path / "straight", tiny_model_dir, "--trainer.max_steps", "4")
    first = run_fit(tmp_path / "interrupted", tiny_model_dir, "--trainer.max_steps", "2")
    ckpt = glob.glob(os.path.join(tmp_path, "interrupted", "**", "*step=2.ckpt"), recursive=True)
    assert ckpt, os.listdir(tmp_path / "interrupted")
    assert first.trainer.global_step == 2
    resumed = run_fit(tmp_path / "resumed", tiny_model_dir, "--trainer.max_steps", "4", "--ckpt_path", ckpt[0])
    assert resumed.trainer.global_step == 4
    for (name, a), b in zip(straight.model.model.state_dict().items(), resumed.model.model.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6, msg=f"{name} differs after resume")


def test_damaged_checkpoint_refused_before_resuming(tmp_path, tiny_model_dir):
    """--ckpt_path on a cut or bit-flipped file: a clear error naming it, not a silent resume
    from wrong weights (a flipped bit loads without complaint in torch.load)."""
    run_fit(tmp_path / "run", tiny_model_dir, "--trainer.max_steps", "1")
    (last,) = glob.glob(os.path.join(tmp_path, "run", "**", "last.ckpt"), recursive=True)
    data = open(last, "rb").read()
    with zipfile.ZipFile(last) as archive:  # a byte inside the largest tensor's stored bytes
        member = max(archive.infolist(), key=lambda info: info.file_size)
    name_len, extra_len = struct.unpack("<HH", data[member.header_offset + 26 : member.header_offset + 30])
    at = member.header_offset + 30 + name_len + extra_len + member.file_size // 2  # local header, then data
    flipped = tmp_path / "flipped.ckpt"
    flipped.write_bytes(data[:at] + bytes([data[at] ^ 0x01]) + data[at + 1 :])
    cut = tmp_path / "cut.ckpt"
    cut.write_bytes(data[:-100])
    for bad, reason in ((flipped, "CRC mismatch"), (cut, "not a torch.save archive")):
        with pytest.raises(ValueError, match=f"ckpt_path '{bad}' is damaged: .*{reason}"):
            run_fit(tmp_path / "resumed", tiny_model_dir, "--trainer.max_steps", "2", "--ckpt_path", str(bad))
    # --ckpt_path last resolves inside the trainer: its load checks the file too
    os.replace(flipped, last)
    with pytest.raises(ValueError, match="checkpoint '.*last.ckpt' is damaged: .*CRC mismatch"):
        run_fit(tmp_path / "run", tiny_model_dir, "--trainer.max_steps", "2", "--ckpt_path", "last")


def test_fused_blur_adamw_from_the_command_line(tmp_path, tiny_model_dir):
    """BLURFusedAdamW injected as the optimizer (the fused path: d formed inside AdamW) by class path."""
    from blur_lightning.kernels import BLURFusedAdamW

    cli = run_fit(
        tmp_path, tiny_model_dir,
        "--model.optimizer", "blur_lightning.kernels.BLURFusedAdamW",
        "--model.optimizer.lr", "1e-3",
        "--model.optimizer.backend", "torch",
    )
    optimizer = cli.trainer.optimizers[0]
    assert isinstance(getattr(optimizer, "optimizer", optimizer), BLURFusedAdamW)
    assert cli.trainer.global_step == 2
    assert all(state["step"].item() == 2.0 for state in optimizer.state.values())


def test_pdu_from_the_command_line_moves_lambda_by_the_rule(tmp_path, tiny_model_dir):
    """mode pdu for 2 steps: finite losses; the log holds the lambda each step used, and each step moves
    it by max(0, lambda + step_size * (its retain loss - eps))."""
    import csv

    cli = run_fit(tmp_path, tiny_model_dir, "--model.mode", "pdu", "--model.forget_loss", "pdu_entropic",
                  "--model.alpha", "3.0", "--model.pdu_retain_eps", "1.0", "--model.pdu_dual_step_size", "0.25")
    assert cli.trainer.global_step == 2
    keys = ("train/pdu_lambda", "train/forget_loss", "train/retain_loss")
    with open(os.path.join(tmp_path, "metrics.csv")) as f:  # a step's values may be written on two rows
        rows = list(dict.fromkeys(tuple(float(r[k]) for k in keys) for r in csv.DictReader(f) if r[keys[0]]))
    assert len(rows) == 2
    losses = [(forget, retain) for _, forget, retain in rows]
    assert all(math.isfinite(f) and math.isfinite(r) for f, r in losses)
    lam = [r[0] for r in rows] + [float(cli.model.pdu_lambda)]
    assert lam[0] == 3.0
    for step, (_, retain) in enumerate(losses):
        assert lam[step + 1] == pytest.approx(max(0.0, lam[step] + 0.25 * (retain - 1.0)), rel=1e-6)
    assert lam[2] != lam[1] != lam[0]


def test_lora_and_activation_checkpointing_from_the_command_line(tmp_path, tiny_model_dir):
    """The switches from the command line on a tiny model: checkpointing gives the same weights as
    without it; LoRA (+ checkpointing) exports a merged model that plain transformers loads, with
    the trained model's logits, and the adapter alone."""
    pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    from blur_lightning.models import activation_checkpointing as checkpointing
    from blur_lightning.models import adapters

    plain = run_fit(tmp_path / "plain", tiny_model_dir)
    ac = run_fit(tmp_path / "ac", tiny_model_dir, "--model.activation_checkpointing=true")
    assert checkpointing.is_enabled(ac.model.model) and not checkpointing.is_enabled(plain.model.model)
    for (name, a), b in zip(plain.model.model.state_dict().items(), ac.model.model.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6, msg=name)

    lora = run_fit(tmp_path / "lora", tiny_model_dir, "--model.lora_rank=4", "--model.lora_alpha=8",
                   "--model.lora_target_modules=[q_proj,v_proj,down_proj]", "--model.activation_checkpointing=true")
    model = lora.model.model
    assert adapters.has_adapters(model) and checkpointing.is_enabled(model)
    assert lora.model.reference_model is None  # NPO's reference: the adapters disabled
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        n for n, _ in model.named_parameters() if adapters.is_adapter_parameter(n)}
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "lora" / "hf_model").eval()
    assert os.path.isfile(tmp_path / "lora" / "hf_model" / adapters.ADAPTER_SUBDIR / "adapter_config.json")
    ids = torch.randint(0, 100, (2, 10), generator=torch.Generator().manual_seed(0))
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, model(input_ids=ids).logits, rtol=1e-5, atol=1e-5)
        base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
        assert (base(input_ids=ids).logits - merged(input_ids=ids).logits).abs().max() > 1e-4
