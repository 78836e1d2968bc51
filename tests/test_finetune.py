"""FineTuner: plain NLL fine-tuning through the unlearner's module, data module (no forget set) and CLI."""

from __future__ import annotations

import glob
import os

import pytest
import torch
from conftest import build_tiny_llama, make_side
from test_module import fit, sgd

from blur_lightning.data.datamodule import ForgetRetainDataModule
from blur_lightning.losses import functional as losses
from blur_lightning.training.finetune import FineTuner

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QA = os.path.join(ROOT, "tests", "fixtures", "qa")


def test_one_step_is_sgd_on_the_nll_of_the_retain_side():
    lr = 0.1
    batch = {"retain": make_side(4, 10, seed=3)}
    module = FineTuner(build_tiny_llama(), optimizer=sgd(lr), export_dir=None)
    by_hand = build_tiny_llama()
    logits = by_hand(input_ids=batch["retain"]["input_ids"], attention_mask=batch["retain"]["attention_mask"]).logits
    losses.nll_loss(logits, batch["retain"]["labels"]).backward()
    expected = [p.detach() - lr * p.grad for p in by_hand.parameters()]
    fit(module, [batch])
    assert module.trainer.global_step == 1
    for (name, p), e in zip(module.model.named_parameters(), expected):
        torch.testing.assert_close(p.detach(), e, rtol=1e-5, atol=1e-7, msg=name)


def test_accumulation_equals_the_concatenated_batch():
    micro = [{"retain": make_side(3, 10, seed=s)} for s in (5, 6)]  # equal token counts: means compose
    whole = {"retain": {k: torch.cat([m["retain"][k] for m in micro]) for k in micro[0]["retain"]}}
    accumulated = FineTuner(build_tiny_llama(), optimizer=sgd(0.1), accumulate_grad_batches=2, export_dir=None)
    single = FineTuner(build_tiny_llama(), optimizer=sgd(0.1), export_dir=None)
    fit(accumulated, micro)
    fit(single, [whole])
    assert accumulated.trainer.global_step == 1 == single.trainer.global_step
    for a, b in zip(accumulated.model.parameters(), single.model.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)  # the same batches and optimizer state


def test_a_non_finite_step_is_skipped_and_touches_nothing():
    batch = {"retain": make_side(2, 8, seed=1)}
    module = FineTuner(build_tiny_llama(), optimizer=sgd(0.1), export_dir=None)
    before = [p.detach().clone() for p in module.model.parameters()]
    with torch.no_grad():
        module.model.get_input_embeddings().weight[batch["retain"]["input_ids"][0, 0]] = float("nan")
    before[0] = module.model.get_input_embeddings().weight.detach().clone()
    with pytest.warns(RuntimeWarning, match="skipped"):
        fit(module, [batch])
    assert int(module.skipped_steps) == 1
    for a, b in zip(module.model.parameters(), before):
        torch.testing.assert_close(a.detach(), b, equal_nan=True)


def test_a_forget_set_is_refused_not_ignored():
    module = FineTuner(build_tiny_llama(), optimizer=sgd(0.1), export_dir=None)
    with pytest.raises(ValueError, match="forget_path: null"):
        fit(module, [{"forget": make_side(2, 8, seed=1), "retain": make_side(2, 8, seed=2)}])


def test_without_a_forget_set_the_retain_rows_set_the_epoch():
    from blur_lightning.testing.tiny import tiny_tokenizer

    data = ForgetRetainDataModule(forget_path=None, retain_path=os.path.join(QA, "retain.jsonl"), batch_size=4,
                                  max_length=48)  # fmt: skip
    data.set_tokenizer(tiny_tokenizer())
    data.setup("fit")
    assert data.forget_rows is None and data.val_loader_names == [] and data.val_dataloader() == []
    batches = list(data.train_dataloader())
    n = len(data.retain_rows)
    assert len(batches) == -(-n // 4)
    assert all(set(b) == {"retain"} for b in batches)
    seen = torch.cat([b["retain"]["example_index"] for b in batches]).tolist()
    assert sorted(seen) == list(range(n))  # every row once an epoch
    assert torch.equal(batches[0]["retain"]["labels"] != -100, batches[0]["retain"]["labels"] >= 0)


def test_the_finetune_command_trains_checkpoints_exports_and_resumes(tmp_path):
    from blur_lightning.cli import finetune_main
    from blur_lightning.testing.tiny import save_tiny_model

    model_dir = tmp_path / "base"
    save_tiny_model(model_dir)

    import yaml

    config = yaml.safe_load(open(os.path.join(ROOT, "configs", "tiny.yaml")))
    for unlearning_only in ("forget_loss", "retain_loss", "mode", "gamma"):
        del config["model"][unlearning_only]
    (tmp_path / "finetune.yaml").write_text(yaml.safe_dump(config))

    def run(root, *extra):
        return finetune_main([
            "--config", str(tmp_path / "finetune.yaml"), "--model.model", str(model_dir),
            "--data.forget_path", "null", "--data.retain_path", os.path.join(QA, "retain.jsonl"),
            "--trainer.default_root_dir", str(root), "--trainer.logger.init_args.save_dir", str(root),
            *extra,
        ])  # fmt: skip

    cli = run(tmp_path / "a", "--trainer.max_steps", "2")
    assert isinstance(cli.model, FineTuner) and cli.trainer.global_step == 2
    assert os.path.isfile(tmp_path / "a" / "hf_model" / "config.json")
    (ckpt,) = glob.glob(str(tmp_path / "a" / "**" / "*step=2.ckpt"), recursive=True)  # tiny.yaml: every step
    resumed = run(tmp_path / "b", "--trainer.max_steps", "4", "--ckpt_path", ckpt)
    straight = run(tmp_path / "c", "--trainer.max_steps", "4")
    assert resumed.trainer.global_step == 4 == straight.trainer.global_step
    for a, b in zip(resumed.model.model.parameters(), straight.model.model.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)  # the same batches and optimizer state


@pytest.mark.parametrize("algorithm", ["norm", "value"])
def test_clipping_under_16_mixed_acts_on_the_true_gradient(algorithm):
    """SGD at lr 1 moves the weights by exactly the clipped gradient: its norm (or largest entry) is the
    clip value, 0.1, whatever the loss scale (1024 here). Before the shared clip, FineTuner clipped the
    scaled gradient before the scaler unscaled it: a step of 0.1 / 1024 = 9.8e-5."""
    from test_precision import fit_fp16, fp16_plugin, weights

    module = FineTuner(build_tiny_llama(), optimizer=sgd(1.0), export_dir=None,
                       gradient_clip_val=0.1, gradient_clip_algorithm=algorithm)  # fmt: skip
    before = weights(module)
    batch = {"retain": make_side(4, 10, seed=3)}
    fit_fp16(module, [batch], fp16_plugin(1024.0))
    assert module.trainer.global_step == 1 and int(module.skipped_steps) == 0
    delta = torch.cat([(weights(module)[k] - before[k]).reshape(-1) for k in before]).double()
    measured = delta.norm().item() if algorithm == "norm" else delta.abs().max().item()
    assert measured == pytest.approx(0.1, rel=1e-3), f"{algorithm}: a step of {measured:.4g}, expected the clip 0.1"


def test_a_clip_value_of_zero_means_no_clip_and_a_negative_one_is_refused():
    """Lightning's convention: gradient_clip_val 0 turns clipping off (before the shared clip it did, through
    Lightning's own; a 0 limit taken literally would zero every update, a negative one reverse it)."""
    batch = {"retain": make_side(4, 10, seed=3)}
    zero = FineTuner(build_tiny_llama(), optimizer=sgd(0.1), export_dir=None, gradient_clip_val=0.0)
    none = FineTuner(build_tiny_llama(), optimizer=sgd(0.1), export_dir=None)
    fit(zero, [batch])
    fit(none, [batch])
    for a, b in zip(zero.model.parameters(), none.model.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    with pytest.raises(ValueError, match="gradient_clip_val=-1.0: expected a number >= 0"):
        FineTuner(build_tiny_llama(), export_dir=None, gradient_clip_val=-1.0)
