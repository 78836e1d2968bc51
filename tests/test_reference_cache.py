"""NPO's reference log-probs cached at fit start (npo_reference="cache") against the frozen reference model.

The data: the QA fixtures (17 forget rows, 11 retain rows) through ForgetRetainDataModule, shuffled,
batches of 4, 2 micro-batches per step, so a step's batches are a shuffled subset and an epoch ends
inside a window. fp32 tiny Llama with SDPA.
"""

from __future__ import annotations

import functools
import logging
import os
import warnings

import lightning.pytorch as pl
import pytest
import torch

from blur_lightning.data.datamodule import ForgetRetainDataModule
from blur_lightning.losses import npo_reference as reference_cache
from blur_lightning.testing.tiny import tiny_llama, tiny_tokenizer
from blur_lightning.training.unlearner import BLURUnlearner

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures")
TOKENIZER = os.path.join(FIXTURES, "tiny_tokenizer")
ATOL = 1e-6  # fp32: losses and weights, cache vs reference model


def make_dm(**kwargs) -> ForgetRetainDataModule:
    kwargs = {"batch_size": 4, "max_length": 64, "seed": 0, **kwargs}
    return ForgetRetainDataModule(
        forget_path=os.path.join(FIXTURES, "qa", "forget.jsonl"),
        retain_path=os.path.join(FIXTURES, "qa", "retain.jsonl"),
        tokenizer=TOKENIZER,
        **kwargs,
    )


def make_module(npo_reference: str, dropout: float = 0.0, **kwargs) -> BLURUnlearner:
    model = tiny_llama(vocab_size=len(tiny_tokenizer()), seed=0)
    for m in model.modules():  # the reference runs in eval mode: a cache made in train mode would differ
        if hasattr(m, "attention_dropout"):
            m.attention_dropout = dropout
    kwargs = {"accumulate_grad_batches": 2, "gamma": 0.5, "export_dir": None,
              "optimizer": functools.partial(torch.optim.AdamW, lr=1e-2), **kwargs}
    return BLURUnlearner(model, forget_loss="npo", retain_loss="nll", npo_reference=npo_reference, **kwargs)


class Record(pl.Callback):
    def __init__(self) -> None:
        self.losses: list[tuple[float, float]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append((float(outputs["forget_loss"]), float(outputs["retain_loss"])))


def fit(module, dm, max_steps: int, *, ckpt_path=None, callbacks=(), root=None) -> Record:
    pl.seed_everything(0, verbose=False)
    record = Record()
    trainer = pl.Trainer(
        accelerator="cpu", devices=1, max_steps=max_steps, logger=False, enable_checkpointing=bool(callbacks),
        enable_progress_bar=False, enable_model_summary=False, callbacks=[record, *callbacks],
        default_root_dir=root, num_sanity_val_steps=0, limit_val_batches=0,
    )
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Using ModelCheckpoint with manual optimization")
        trainer.fit(module, datamodule=dm, ckpt_path=ckpt_path)
    return record


def weights(module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.model.state_dict().items()}


def max_diff(a: dict, b: dict) -> float:
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


def test_cache_equals_reference_model_path():
    """Losses of every micro-batch and weights after 3 steps: cache = reference model (shuffled
    batches, 2 micro-batches a step, an epoch boundary, dropout 0.2 in the policy's forwards)."""
    by_mode = {}
    for mode in ("model", "cache"):
        module = make_module(mode, dropout=0.2)
        record = fit(module, make_dm(), max_steps=3)
        by_mode[mode] = (module, record.losses, weights(module))
    (ref_module, ref_losses, ref_w), (cache_module, cache_losses, cache_w) = by_mode["model"], by_mode["cache"]
    assert ref_module.reference_model is not None and cache_module.reference_model is None
    assert cache_module._npo_cache.values.shape == (17,)
    assert len(cache_losses) == len(ref_losses) == 5  # micro-batches of 4, 4, 4, 4, 1: steps after 2, 4, 5
    loss_diff = max(abs(a - b) for pa, pb in zip(cache_losses, ref_losses) for a, b in zip(pa, pb))
    weight_diff = max_diff(cache_w, ref_w)
    assert loss_diff <= ATOL, (cache_losses, ref_losses)
    assert weight_diff <= ATOL
    initial = tiny_llama(vocab_size=len(tiny_tokenizer()), seed=0).state_dict()
    assert max_diff(cache_w, initial) > 1e-3  # the comparison means something: the weights moved
    print(f"cache vs model: losses {loss_diff:.2g}, weights {weight_diff:.2g}")


def test_table_is_the_reference_models_value_of_each_row():
    """Each entry: the frozen model's sum of answer-token log-probs of that very row, alone."""
    from blur_lightning.losses import functional as losses

    module = make_module("cache", dropout=0.2)
    dm = make_dm()
    fit(module, dm, max_steps=1)
    reference = tiny_llama(vocab_size=len(tiny_tokenizer()), seed=0).eval()
    collate = dm.collator()
    with torch.no_grad():
        want = torch.stack([
            losses.sequence_logprob(reference(input_ids=b["input_ids"]).logits, b["labels"])[0][0]
            for b in (collate([row]) for row in dm.forget_rows)
        ])
    torch.testing.assert_close(module._npo_cache.values, want, rtol=0, atol=1e-5)


def test_forget_batches_carry_their_row_numbers():
    dm = make_dm()
    dm.setup("fit")
    for batch in dm.train_dataloader():
        side = batch["forget"]
        for ids, mask, index in zip(side["input_ids"], side["attention_mask"], side["example_index"].tolist()):
            assert ids[mask.bool()].tolist() == dm.forget_rows[index]["input_ids"]
    assert "example_index" not in next(iter(dm.val_dataloader()[0]))


def test_resume_takes_the_checkpoints_table_not_the_restored_weights(tmp_path, monkeypatch):
    """4 steps in one go = 2 steps, checkpoint, resume to 4. A table recomputed on resume from the
    restored (partly unlearned) weights is measurably another reference: shown by doing just that."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    ckpt = ModelCheckpoint(dirpath=str(tmp_path), every_n_train_steps=2, save_top_k=-1, filename="{step}")
    full = make_module("cache")
    fit(full, make_dm(), max_steps=4, callbacks=[ckpt], root=str(tmp_path))
    path = os.path.join(str(tmp_path), "step=2.ckpt")
    saved = torch.load(path, weights_only=False)[reference_cache.CHECKPOINT_KEY]
    assert torch.equal(saved["values"], full._npo_cache.values)

    resumed = make_module("cache")
    fit(resumed, make_dm(), max_steps=4, ckpt_path=path)
    assert torch.equal(resumed._npo_cache.values, full._npo_cache.values)
    resume_diff = max_diff(weights(resumed), weights(full))
    assert resume_diff <= ATOL

    # The wrong way, for contrast: ignore the checkpoint's table and compute one at resume.
    def recompute(model, trainer, existing, saved):
        dm = trainer.datamodule
        values = reference_cache.compute_logprobs(model, dm.forget_rows, dm.collator(), batch_size=dm.batch_size,
                                                  device=trainer.strategy.root_device)
        return reference_cache.ReferenceLogProbs(values, "recomputed")

    monkeypatch.setattr(reference_cache, "prepare", recompute)
    wrong = make_module("cache")
    fit(wrong, make_dm(), max_steps=4, ckpt_path=path)
    table_shift = (wrong._npo_cache.values - full._npo_cache.values).abs().max().item()
    wrong_diff = max_diff(weights(wrong), weights(full))
    assert table_shift > 1e-2 and wrong_diff > 100 * ATOL, (table_shift, wrong_diff)
    print(f"resumed: weights {resume_diff:.2g}; recomputed at resume: table off by {table_shift:.3g}, "
          f"weights by {wrong_diff:.3g}")


def test_resume_from_a_checkpoint_without_a_table_refuses(tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint

    ckpt = ModelCheckpoint(dirpath=str(tmp_path), every_n_train_steps=1, save_top_k=-1, filename="{step}")
    fit(make_module("model"), make_dm(), max_steps=1, callbacks=[ckpt], root=str(tmp_path))
    with pytest.raises(ValueError, match="has no 'npo_reference_logprobs'.*npo_reference='model'"):
        fit(make_module("cache"), make_dm(), max_steps=2, ckpt_path=os.path.join(str(tmp_path), "step=1.ckpt"))


def test_other_forget_rows_than_the_tables_refuse(tmp_path):
    module = make_module("cache")
    fit(module, make_dm(), max_steps=1)
    with pytest.raises(ValueError, match="forget rows differ"):
        fit(module, make_dm(max_length=24), max_steps=2)  # shorter rows: other tokens


def test_fit_start_says_what_it_computed(caplog):
    with caplog.at_level(logging.INFO):
        fit(make_module("cache"), make_dm(), max_steps=1)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("NPO reference")]
    assert len(lines) == 1 and "17 forget examples" in lines[0] and " s; no reference model" in lines[0], lines


def test_auto_picks_the_cache_only_when_nothing_else_needs_the_model():
    resolve = reference_cache.resolve_npo_reference
    dm = make_dm()
    dm.setup("fit")
    assert resolve("auto", "npo", "nll", dm) == "cache"
    assert resolve("auto", "npo", "kl", dm) == "model"  # KL needs the reference's logits
    assert resolve("auto", "npo", "rmu", dm) == "model"  # RMU its hidden states
    assert resolve("auto", "npo", "nll", None) == "model"  # ready batches: no row numbers
    assert resolve("cache", "npo", "kl", dm) == "cache"  # allowed: KL keeps the model, NPO uses the table
    assert resolve("auto", "ga", "nll", dm) == resolve("model", "simnpo", "nll", dm) == "none"
    with pytest.raises(ValueError, match="npo_reference='cache' needs the forget examples"):
        resolve("cache", "npo", "nll", None)
    with pytest.raises(ValueError, match="applies to forget_loss='npo' or 'dpo', not 'ga'"):
        BLURUnlearner(tiny_llama(), forget_loss="ga", npo_reference="cache")
    with pytest.raises(ValueError, match=r"npo_reference='none': expected one of \('auto', 'model', 'cache'\)"):
        BLURUnlearner(tiny_llama(), npo_reference="none")


def test_demo_config_uses_the_cache():
    import yaml

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with open(os.path.join(root, "configs", "demo.yaml")) as f:
        model = yaml.safe_load(f)["model"]
    dm = make_dm()
    dm.setup("fit")
    setting = model.get("npo_reference", "auto")
    assert reference_cache.resolve_npo_reference(setting, model["forget_loss"], model["retain_loss"], dm) == "cache"
