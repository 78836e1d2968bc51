"""Losses as a registry: the built-ins' names and needs, one registration adds a loss, and the frozen
reference model is built exactly when a chosen loss needs what only a model gives.

The expected "built" of every case is written out here by hand (not read from the registry), so a
wrong `needs` entry, or a dispatch that ignores it, fails the table.
"""

from __future__ import annotations

import copy
import functools
import itertools
import os

import lightning.pytorch as pl
import pytest
import torch
from conftest import build_tiny_llama, make_batch
from torch.utils.data import DataLoader

from blur_lightning.data.datamodule import ForgetRetainDataModule
from blur_lightning.losses import functional as losses
from blur_lightning.losses import registry as loss_registry
from blur_lightning.testing.tiny import tiny_llama, tiny_tokenizer
from blur_lightning.training.unlearner import BLURUnlearner

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures")


@pytest.fixture
def registry():
    """loss_registry as it was before the test: what a test registers is gone after it."""
    saved = dict(loss_registry.FORGET), dict(loss_registry.RETAIN)
    yield loss_registry
    for live, kept in zip((loss_registry.FORGET, loss_registry.RETAIN), saved):
        live.clear()
        live.update(kept)


def test_builtin_losses_and_their_needs():
    assert loss_registry.FORGET_LOSSES == ("ga", "npo", "simnpo", "idk", "rmu", "wga", "satimp", "ceu", "undial", "dpo",
                                           "pdu_entropic")
    assert loss_registry.RETAIN_LOSSES == ("nll", "kl", "rmu")
    forget = {name: set(loss.needs) for name, loss in loss_registry.FORGET.items()}
    retain = {name: set(loss.needs) for name, loss in loss_registry.RETAIN.items()}
    assert forget == {"ga": set(), "npo": {"reference_logprobs"}, "simnpo": set(), "idk": {"refusal"},
                      "rmu": {"hidden_states"}, "wga": set(), "satimp": set(), "ceu": set(),
                      "undial": {"reference_logits"},
                      "dpo": {"refusal", "reference_logprobs", "reference_refusal_logprobs"}, "pdu_entropic": set()}
    assert retain == {"nll": set(), "kl": {"reference_logits"}, "rmu": {"hidden_states", "reference_hidden_states"}}
    assert all(loss.role == "forget" for loss in loss_registry.FORGET.values())
    with pytest.raises(ValueError, match=r"forget_loss='altpo': expected one of \('ga', 'npo', .*'pdu_entropic'\)"):
        BLURUnlearner(build_tiny_llama(), forget_loss="altpo", export_dir=None)
    with pytest.raises(ValueError, match=r"retain_loss='ce': expected one of \('nll', 'kl', 'rmu'\)"):
        BLURUnlearner(build_tiny_llama(), retain_loss="ce", export_dir=None)


def test_register_refuses_unknown_needs_roles_and_duplicates(registry):
    with pytest.raises(ValueError, match=r"unknown needs \['reference_model'\]"):
        registry.register("forget", "x", needs={"reference_model"})
    with pytest.raises(ValueError, match="loss role='both'"):
        registry.register("both", "x")
    with pytest.raises(ValueError, match="forget loss 'npo' is registered already"):
        registry.register("forget", "npo")


def fit_batches(module, batches, steps_seen):
    class Record(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            steps_seen.append((outputs["forget_loss"].item(), outputs["retain_loss"].item()))

    trainer = pl.Trainer(accelerator="cpu", devices=1, max_epochs=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=[Record()])
    trainer.fit(module, train_dataloaders=DataLoader(batches, batch_size=None, shuffle=False))
    return trainer


def test_a_loss_is_one_registration(registry):
    """A toy forget loss (half of GA) and a toy retain loss reading the reference's logits (KL over
    every position), each one decorated function: the module accepts the names, its step calls them
    (the first step's losses are the formulas on the initial weights), the reference is built for
    the retain one, and the weights move."""
    with pytest.raises(ValueError, match="forget_loss='half_ga'"):
        BLURUnlearner(build_tiny_llama(), forget_loss="half_ga", export_dir=None)

    @registry.register("forget", "half_ga")
    def half_ga(inputs):
        return 0.5 * losses.gradient_ascent_loss(inputs.logits(), inputs.side["labels"])

    @registry.register("retain", "kl_all", needs={"reference_logits"})
    def kl_all(inputs):
        return losses.kl_loss(inputs.logits(), inputs.reference_logits(), inputs.side["labels"], mask="all")

    model = build_tiny_llama()
    initial = copy.deepcopy(model).eval()
    module = BLURUnlearner(model, forget_loss="half_ga", retain_loss="kl_all", export_dir=None,
                           optimizer=functools.partial(torch.optim.SGD, lr=0.5))
    batches = [make_batch(seed=s) for s in range(3)]
    seen = []
    trainer = fit_batches(module, batches, seen)
    assert trainer.global_step == 3 and module.reference_model is not None
    with torch.no_grad():
        side = batches[0]["forget"]
        logits = initial(input_ids=side["input_ids"], attention_mask=side["attention_mask"]).logits
        want_forget = 0.5 * losses.mean_sequence_nll(logits, side["labels"]).neg().item()
    assert seen[0][0] == pytest.approx(want_forget, rel=1e-5)
    assert seen[0][1] == pytest.approx(0.0, abs=1e-6)  # the policy is the reference before its first step
    assert seen[2][1] > 1e-6  # ... and not after: the toy's reference logits are the frozen copy's
    moved = max((a - b).abs().max().item() for a, b in zip(module.model.parameters(), initial.parameters()))
    assert moved > 1e-4


def test_a_loss_reading_what_it_did_not_declare_is_refused(registry):
    """A loss that reads the reference without declaring it would run where no reference was built."""

    @registry.register("forget", "sneaky")
    def sneaky(inputs):
        return losses.kl_loss(inputs.logits(), inputs.reference_logits(), inputs.side["labels"])

    module = BLURUnlearner(build_tiny_llama(), forget_loss="sneaky", export_dir=None)
    module.configure_model()
    assert module.reference_model is None
    with pytest.raises(RuntimeError, match="forget loss 'sneaky' reads 'reference_logits' but does not declare it"):
        module.forget_loss(make_batch()["forget"])


def _reference_cases():
    for forget, retain in itertools.product(("ga", "npo", "simnpo", "idk", "rmu"), ("nll", "kl", "rmu")):
        for setting in ("auto", "model", "cache") if forget == "npo" else ("auto", "model"):
            # Only KL's logits and RMU's hidden states need the model; NPO's log-probs come from the
            # cache unless npo_reference="model" ("auto" takes the cache when nothing else needs the model).
            built = retain in ("kl", "rmu") or (forget == "npo" and setting == "model")
            yield pytest.param(forget, retain, setting, built, id=f"{forget}-{retain}-{setting}")
    # open-unlearning's further losses with the NLL retain: UNDIAL needs the reference's logits, DPO its
    # log-probs of the refusal answers (which the NPO cache does not hold: it needs the model even with
    # npo_reference="cache", which then serves only the forget answers' side).
    for forget, built in (("wga", False), ("satimp", False), ("ceu", False), ("undial", True), ("dpo", True)):
        for setting in ("auto", "model", "cache") if forget == "dpo" else ("auto",):
            yield pytest.param(forget, "nll", setting, built, id=f"{forget}-nll-{setting}")


@pytest.mark.parametrize("forget,retain,setting,built", list(_reference_cases()))
def test_reference_model_built_exactly_when_needed(monkeypatch, forget, retain, setting, built):
    """Every forget x retain pair and npo_reference setting, one step on numbered QA rows: one deep
    copy of the model exactly when the table says, none otherwise, and the step runs either way."""
    copies = []
    real_deepcopy = copy.deepcopy

    def counting_deepcopy(x, *args):
        if isinstance(x, torch.nn.Module):
            copies.append(type(x).__name__)
        return real_deepcopy(x, *args)

    monkeypatch.setattr(copy, "deepcopy", counting_deepcopy)
    dm = ForgetRetainDataModule(
        forget_path=os.path.join(FIXTURES, "qa", "forget.jsonl"),
        retain_path=os.path.join(FIXTURES, "qa", "retain.jsonl"),
        tokenizer=os.path.join(FIXTURES, "tiny_tokenizer"), batch_size=4, max_length=32, seed=0, idk_column="idk",
    )
    model = tiny_llama(vocab_size=len(tiny_tokenizer()), seed=0, layers=1)
    module = BLURUnlearner(model, forget_loss=forget, retain_loss=retain, npo_reference=setting, rmu_layer=0,
                           export_dir=None, optimizer=functools.partial(torch.optim.SGD, lr=0.1))
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                         limit_val_batches=0)
    trainer.fit(module, datamodule=dm)
    assert trainer.global_step == 1
    assert module.needs_reference is built
    assert (module.reference_model is not None) is built
    assert len(copies) == int(built), copies
    cached = (forget == "npo" and (setting == "cache" or (setting == "auto" and retain == "nll"))) or (
        forget == "dpo" and setting == "cache")
    assert (module._npo_cache is not None) is cached
