"""LoRA adapters (peft): only they train, the BLUR step runs over them, the reference is the base
with the adapters off (no copy), the merged export loads in plain transformers, resume is exact."""

from __future__ import annotations

import copy
import functools

import lightning.pytorch as pl
import pytest
import torch
from conftest import build_tiny_llama, make_batch
from torch.utils.data import DataLoader

pytest.importorskip("peft")

from blur_lightning.models import adapters  # noqa: E402
from blur_lightning.training.unlearner import BLURUnlearner  # noqa: E402


class Record(pl.Callback):
    """The BLUR stats of each optimizer step."""

    def __init__(self) -> None:
        self.stats = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if outputs and "stats" in outputs:
            self.stats.append({k: float(v) for k, v in outputs["stats"].as_dict().items()})


def fit(module, batches, callbacks=(), ckpt_path=None, **kwargs) -> pl.Trainer:
    trainer = pl.Trainer(
        accelerator="cpu", devices=1, max_epochs=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=list(callbacks), **kwargs,
    )
    trainer.fit(module, train_dataloaders=DataLoader(batches, batch_size=None, shuffle=False), ckpt_path=ckpt_path)
    return trainer


def lora_module(model=None, **kwargs) -> BLURUnlearner:
    options = dict(lora_rank=4, lora_alpha=8.0, export_dir=None, projection_backend="torch",
                   optimizer=functools.partial(torch.optim.SGD, lr=0.05))
    return BLURUnlearner(model if model is not None else build_tiny_llama(), **{**options, **kwargs})


def adapter_state(module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in module.model.named_parameters() if adapters.is_adapter_parameter(n)}


def logits(model, side) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=side["input_ids"], attention_mask=side["attention_mask"]).logits


@pytest.mark.parametrize("forget_loss,retain_loss", [("ga", "nll"), ("npo", "kl")])
def test_only_adapters_train_and_the_step_runs_over_them(forget_loss, retain_loss):
    """Two SGD steps: the second moves the adapters by -lr * d, d from the forget / retain gradients
    of the adapters alone, computed by hand (NPO and KL against the untouched base model), and the
    base weights do not move at all. (The first step moves B off zero, so the second one's
    reference terms and A's gradients are not trivially zero.)"""
    base = build_tiny_llama()
    batches = [make_batch(seed=0), make_batch(seed=1)]
    lr, gamma = 0.05, 0.7
    module = lora_module(copy.deepcopy(base), forget_loss=forget_loss, retain_loss=retain_loss, gamma=gamma,
                         lora_target_modules=["q_proj", "v_proj", "down_proj"])
    record = Record()
    fit(module, batches[:1])
    hand = copy.deepcopy(module.model)  # after step 1
    fit(module, batches[1:], callbacks=[record])
    batch = batches[1]

    # By hand: step 2 from the copy taken after step 1, the reference being the untouched base.
    from blur_lightning.losses import functional as losses

    hand.train()
    names = [n for n, p in hand.named_parameters() if p.requires_grad]
    assert names and all(adapters.is_adapter_parameter(n) for n in names)
    params = [p for p in hand.parameters() if p.requires_grad]
    f, r = batch["forget"], batch["retain"]
    logits_f = hand(input_ids=f["input_ids"], attention_mask=f["attention_mask"]).logits
    logits_r = hand(input_ids=r["input_ids"], attention_mask=r["attention_mask"]).logits
    if forget_loss == "ga":
        lf = losses.gradient_ascent_loss(logits_f, f["labels"])
        lr_ = losses.nll_loss(logits_r, r["labels"])
    else:
        frozen = copy.deepcopy(base).eval()
        lf = losses.npo_loss(logits_f, logits(frozen, f), f["labels"], beta=0.1)
        lr_ = losses.kl_loss(logits_r, logits(frozen, r), r["labels"])
    g_f = torch.cat([g.reshape(-1) for g in torch.autograd.grad(lf, params)]).double()
    g_r = torch.cat([g.reshape(-1) for g in torch.autograd.grad(lr_, params)]).double()
    stats = record.stats[0]
    assert stats["sq_forget"] == pytest.approx(float(g_f @ g_f), rel=1e-5)
    assert stats["sq_retain"] == pytest.approx(float(g_r @ g_r), rel=1e-5)
    d = g_r + (gamma - (g_r @ g_f) / (g_f @ g_f)) * g_f
    theta0 = torch.cat([p.detach().reshape(-1) for p in params]).double()
    trained = dict(module.model.named_parameters())
    theta1 = torch.cat([trained[n].detach().reshape(-1) for n in names]).double()
    torch.testing.assert_close(theta1, theta0 - lr * d, rtol=1e-4, atol=2e-7)
    assert (theta1 - theta0).abs().max() > 1e-4
    base_now = module.model.get_base_model()
    for name, p in hand.get_base_model().named_parameters():
        if not adapters.is_adapter_parameter(name):
            assert torch.equal(p, base_now.get_parameter(name)), name
    assert len(module.optimizers().optimizer.param_groups[0]["params"]) == len(names)


def test_trainable_params_picks_among_adapters_and_survives_the_reference():
    """trainable_params narrows the adapters (layer 1 only), and stays so after NPO's reference
    forwards (peft's disable_adapter turns requires_grad on for every adapter when it exits)."""
    module = lora_module(forget_loss="npo", retain_loss="kl", trainable_params=r"layers\.1\.")
    module.configure_model()
    before = adapter_state(module)
    chosen = {n for n, p in module.model.named_parameters() if p.requires_grad}
    assert chosen and all("layers.1." in n and adapters.is_adapter_parameter(n) for n in chosen)
    fit(module, [make_batch(seed=s) for s in range(2)])
    assert {n for n, p in module.model.named_parameters() if p.requires_grad} == chosen
    after = adapter_state(module)
    for name in before:
        moved = (after[name] - before[name]).abs().max().item()
        if name in chosen and "lora_B" in name:
            assert moved > 1e-5, name
        elif name not in chosen:
            assert moved == 0, name
    with pytest.raises(ValueError, match="matches no LoRA adapter parameter"):
        lora_module(trainable_params=r"mlp\.up_proj", lora_target_modules=["q_proj"]).configure_model()


def test_reference_is_the_base_model_without_a_copy(monkeypatch):
    """NPO + KL with adapters: no deepcopy of the model, and the reference logits are the base
    model's, exactly, while the adapted model's differ (the adapters have moved)."""
    base = build_tiny_llama()
    pristine = copy.deepcopy(base).eval()
    copies = []
    real_deepcopy = copy.deepcopy

    def counting_deepcopy(x, *args):
        if isinstance(x, torch.nn.Module):
            copies.append(type(x).__name__)
        return real_deepcopy(x, *args)

    monkeypatch.setattr(copy, "deepcopy", counting_deepcopy)  # the module's copy, and distributed's
    module = lora_module(base, forget_loss="npo", retain_loss="kl", lora_dropout=0.1)
    fit(module, [make_batch(seed=s) for s in range(3)])
    assert copies == [] and module.reference_model is None and module._reference == []
    side = make_batch(seed=7)["forget"]
    module.model.train()  # the reference must not see dropout even when the policy is in training mode
    ref = module._reference_logits(side)
    assert module.model.training and all(m.training for m in module.model.modules())
    torch.testing.assert_close(ref, logits(pristine, side), rtol=0, atol=1e-6)
    module.model.eval()
    assert (logits(module.model, side) - ref).abs().max() > 1e-4
    assert all(p.requires_grad == adapters.is_adapter_parameter(n) for n, p in module.model.named_parameters())


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied_embeddings"])
def test_export_merged_model_and_adapter(tmp_path, tied):
    """The merged export is a plain LlamaForCausalLM with the adapted model's logits; the adapter
    alone, loaded onto the base, gives them too."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from blur_lightning.testing.tiny import tiny_llama, tiny_tokenizer

    base = tiny_llama(tie_word_embeddings=tied, seed=1)
    pristine = copy.deepcopy(base)
    module = lora_module(base, forget_loss="ga", lora_target_modules="all-linear", export_dir=str(tmp_path / "hf"))
    module.tokenizer = tiny_tokenizer()
    fit(module, [make_batch(seed=s) for s in range(2)])
    side = make_batch(seed=5)["forget"]
    module.model.eval()
    want = logits(module.model, side)
    assert (want - logits(pristine.eval(), side)).abs().max() > 1e-4  # the adapters changed the model

    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    assert type(merged).__name__ == "LlamaForCausalLM"
    assert not any("lora" in k for k in merged.state_dict())
    torch.testing.assert_close(logits(merged.eval(), side), want, rtol=1e-5, atol=1e-5)
    reloaded = PeftModel.from_pretrained(pristine, tmp_path / "hf" / adapters.ADAPTER_SUBDIR)
    torch.testing.assert_close(logits(reloaded.eval(), side), want, rtol=1e-5, atol=1e-5)
    # the live model keeps its adapters (export merges a copy)
    assert adapters.has_adapters(module.model) and any("lora_B" in n for n, _ in module.model.named_parameters())


def test_gradient_accumulation_equals_concatenated_batch():
    micro = [make_batch(batch=3, seed=10), make_batch(batch=3, seed=11)]
    whole = {side: {k: torch.cat([m[side][k] for m in micro]) for k in micro[0][side]} for side in ("forget", "retain")}
    accumulated = lora_module(forget_loss="npo", accumulate_grad_batches=2)
    single = lora_module(forget_loss="npo")
    fit(accumulated, micro)
    fit(single, [whole])
    got, want = adapter_state(accumulated), adapter_state(single)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-7, msg=name)
    assert max(v.abs().max().item() for n, v in want.items() if "lora_B" in n) > 1e-4


class SaveAt(pl.Callback):
    def __init__(self, path, after_batch: int) -> None:
        self.path, self.after_batch = path, after_batch

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if batch_idx + 1 == self.after_batch:
            trainer.save_checkpoint(self.path)


@pytest.mark.parametrize("after_batch", [4, 5], ids=["at_step_2", "inside_window_3"])
def test_resume_restores_adapters_and_optimizer_state(tmp_path, after_batch):
    """4 AdamW steps (accumulation 2) straight, against saved after micro-batch 4 or 5 and resumed:
    the same adapters and the same AdamW moments."""
    import sys

    sys.path.insert(0, str(__import__("pathlib").Path(__file__).parent / "dist_workers"))
    from blur_worker import ResumableBatches

    batches = [make_batch(seed=s) for s in range(8)]
    adamw = functools.partial(torch.optim.AdamW, lr=1e-2)

    def run(callbacks=(), ckpt_path=None):
        module = lora_module(forget_loss="npo", accumulate_grad_batches=2, optimizer=adamw)
        trainer = pl.Trainer(
            accelerator="cpu", devices=1, max_epochs=1, logger=False, enable_checkpointing=False,
            enable_progress_bar=False, enable_model_summary=False, callbacks=list(callbacks),
        )
        trainer.fit(module, train_dataloaders=ResumableBatches(batches), ckpt_path=ckpt_path)
        return module, trainer

    path = str(tmp_path / "mid.ckpt")
    straight, trainer = run([SaveAt(path, after_batch)])
    assert trainer.global_step == 4
    saved = torch.load(path, weights_only=False)
    assert any("lora_A" in k for k in saved["state_dict"])
    resumed, trainer = run(ckpt_path=path)
    assert trainer.global_step == 4
    got, want = adapter_state(resumed), adapter_state(straight)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=1e-7, msg=name)
    state_got = resumed.optimizers().optimizer.state_dict()["state"]
    state_want = straight.optimizers().optimizer.state_dict()["state"]
    assert state_got.keys() == state_want.keys() and len(state_want) == len(want)
    for i in state_want:
        for key in ("exp_avg", "exp_avg_sq", "step"):
            torch.testing.assert_close(state_got[i][key], state_want[i][key], rtol=0, atol=1e-7)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"lora_rank": -2}, "lora_rank=-2"),
        ({"lora_rank": 4, "lora_alpha": 0.0}, "lora_alpha=0.0"),
        ({"lora_rank": 4, "lora_dropout": 1.0}, "lora_dropout=1.0"),
        ({"lora_rank": 4, "lora_target_modules": []}, "lora_target_modules=\\[\\]"),
    ],
)
def test_bad_lora_settings_name_the_field(kwargs, match):
    with pytest.raises(ValueError, match=match):
        BLURUnlearner(build_tiny_llama(), **kwargs)


def test_target_modules_that_match_nothing_name_the_field():
    with pytest.raises(ValueError, match="lora_target_modules=\\['no_such_proj'\\]"):
        lora_module(lora_target_modules=["no_such_proj"]).configure_model()


def test_rank_zero_or_none_means_no_adapters():
    for rank in (None, 0):
        module = BLURUnlearner(build_tiny_llama(), lora_rank=rank, forget_loss="npo")
        module.configure_model()
        assert not adapters.has_adapters(module.model) and module.reference_model is not None


def test_fsdp1_refuses_adapters():
    """FSDP1 flattens a unit's frozen base weights and trainable adapters into one parameter."""
    from types import SimpleNamespace

    from lightning.pytorch.strategies import FSDPStrategy

    module = lora_module()
    module._trainer = SimpleNamespace(strategy=FSDPStrategy())
    with pytest.raises(ValueError, match="lora_rank under FSDP1"):
        module.configure_model()
