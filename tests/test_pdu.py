"""Mode "pdu" (open-unlearning's primal-dual unlearning): the direction, the dual ascent, its forget loss."""

from __future__ import annotations

import functools

import lightning.pytorch as pl
import pytest
import torch
from conftest import build_tiny_llama, make_batch
from test_module import fit

from blur_lightning.core.projection import blur_direction_
from blur_lightning.losses import functional as losses
from blur_lightning.training.pdu import dual_update
from blur_lightning.training.unlearner import BLURUnlearner

TRUE = torch.tensor(True)


def test_direction_is_lambda_on_retain_and_gamma_on_forget():
    g = torch.Generator().manual_seed(0)
    forget = [torch.randn(7, 3, generator=g, dtype=torch.float64), torch.randn(5, generator=g, dtype=torch.float64)]
    retain = [torch.randn(7, 3, generator=g, dtype=torch.float64), torch.randn(5, generator=g, dtype=torch.float64)]
    expected = [2.5 * r + 0.75 * f for r, f in zip(retain, forget)]
    lam = torch.tensor(2.5, dtype=torch.float64)
    stats = blur_direction_(forget, retain, gamma=0.75, mode="pdu", retain_weight=lam, backend="torch")
    for got, want in zip(retain, expected):
        torch.testing.assert_close(got, want, rtol=1e-15, atol=0)
    assert float(stats.retain_coef) == 2.5 and float(stats.forget_coef) == 0.75


def test_dual_update_follows_the_constraint_and_stops_at_zero():
    lam = torch.tensor(1.0, dtype=torch.float64)
    history = []
    for loss in (0.8, 0.1, 0.0, 0.0, 0.0):  # above eps 0.3 once, then below: lambda rises, falls, clamps at 0
        lam = dual_update(lam, torch.tensor(loss), retain_eps=0.3, step_size=2.0, finite=TRUE)
        history.append(float(lam))
    expected, x = [], 1.0
    for loss in (0.8, 0.1, 0.0, 0.0, 0.0):
        x = max(0.0, x + 2.0 * (loss - 0.3))
        expected.append(x)
    assert history == pytest.approx(expected, abs=1e-7)  # the losses are float32 tensors
    assert history[-1] == 0.0
    # a non-finite step leaves lambda where it was
    same = dual_update(torch.tensor(0.5, dtype=torch.float64), torch.tensor(float("nan")), retain_eps=0.3,
                       step_size=2.0, finite=torch.tensor(False))  # fmt: skip
    assert float(same) == 0.5


def _entropic_by_hand(logits, labels, reduction):
    """The definition position by position: (max - mean)^2 where the label is kept (no shift)."""
    per_seq, all_terms = [], []
    for b in range(logits.shape[0]):
        terms = [float(logits[b, t].max() - logits[b, t].mean()) ** 2 for t in range(logits.shape[1])
                 if labels[b, t] != -100]  # fmt: skip
        per_seq.append(sum(terms) / max(len(terms), 1))
        all_terms += terms
    return sum(per_seq) / len(per_seq) if reduction == "sequence" else sum(all_terms) / len(all_terms)


@pytest.mark.parametrize("reduction", ["sequence", "token"])
@pytest.mark.parametrize(("dtype", "tol"), [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_entropic_forget_loss_matches_its_definition(reduction, dtype, tol):
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(3, 6, 11, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 11, (3, 6), generator=g)
    labels[0, :2] = -100
    labels[1, :5] = -100  # sequences with different answer lengths: the two reductions differ
    got = losses.entropic_forget_loss(logits.to(dtype), labels, reduction)
    want = _entropic_by_hand(logits, labels, reduction)
    assert abs(float(got) - want) <= tol * want
    with pytest.raises(ValueError, match="token_reduction='mean'"):
        losses.entropic_forget_loss(logits, labels, "mean")


def test_pdu_needs_its_retain_eps():
    with pytest.raises(ValueError, match="pdu_retain_eps"):
        BLURUnlearner(build_tiny_llama(), mode="pdu")
    with pytest.raises(ValueError, match="pdu_dual_step_size"):
        BLURUnlearner(build_tiny_llama(), mode="pdu", pdu_retain_eps=0.1, pdu_dual_step_size=-1.0)


class _Record(pl.Callback):
    def __init__(self):
        self.lambdas, self.retain_losses, self.retain_coefs = [], [], []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if "stats" in outputs:
            self.retain_coefs.append(float(outputs["stats"].retain_coef))
            self.retain_losses.append(float(outputs["step_retain_loss"]))
            self.lambdas.append(float(pl_module.pdu_lambda))


def test_a_run_moves_lambda_by_the_rule_and_checkpoints_it(tmp_path, one_thread):
    module = BLURUnlearner(build_tiny_llama(), mode="pdu", forget_loss="pdu_entropic", alpha=2.0, gamma=1.0,
                           pdu_retain_eps=3.0, pdu_dual_step_size=0.5, pdu_dual_warmup_steps=1,
                           optimizer=functools.partial(torch.optim.SGD, lr=0.01), export_dir=None)  # fmt: skip
    record = _Record()
    trainer = fit(module, [make_batch(seed=s) for s in range(4)], callbacks=[record])
    assert trainer.global_step == 4
    # each step uses the lambda before it; the warm-up step leaves it; then the rule on that step's retain loss
    expected, lam = [], 2.0
    for step, loss in enumerate(record.retain_losses):
        assert record.retain_coefs[step] == pytest.approx(lam, rel=1e-6)
        if step >= 1:
            lam = max(0.0, lam + 0.5 * (loss - 3.0))
        expected.append(lam)
    assert record.lambdas == pytest.approx(expected, rel=1e-6)
    assert record.lambdas[0] == 2.0 and record.lambdas[-1] != 2.0
    # the multiplier is module state: a checkpoint carries it
    path = tmp_path / "pdu.ckpt"
    trainer.save_checkpoint(path)
    saved = torch.load(path, weights_only=False)["state_dict"]["pdu_lambda"]
    assert float(saved) == pytest.approx(expected[-1], rel=1e-12)
    fresh = BLURUnlearner(build_tiny_llama(), mode="pdu", pdu_retain_eps=3.0)
    fresh.load_state_dict(torch.load(path, weights_only=False)["state_dict"])
    assert float(fresh.pdu_lambda) == float(saved)


def test_lambda_stays_float64_when_the_module_is_cast_to_half():
    """bf16-true / 16-true convert the whole module; lambda = 100 + 2^-20 would round to 100 in bf16."""
    from lightning.pytorch.plugins.precision import HalfPrecision

    module = BLURUnlearner(build_tiny_llama(), mode="pdu", alpha=100.0, pdu_retain_eps=0.3, export_dir=None)
    module.pdu_lambda.fill_(100.0 + 2**-20)
    module = HalfPrecision("bf16-true").convert_module(module)
    assert next(module.model.parameters()).dtype == torch.bfloat16
    assert module.pdu_lambda.dtype == torch.float64 and float(module.pdu_lambda) == 100.0 + 2**-20
    assert module.float().pdu_lambda.dtype == torch.float64


def test_fused_blur_adamw_gets_lambda_as_its_retain_coefficient(one_thread):
    """BLURFusedAdamW forms d inside its update from the step's coefficients: the same run as AdamW on d."""
    from blur_lightning.kernels import BLURFusedAdamW

    runs = {}
    fused = functools.partial(BLURFusedAdamW, backend="torch")
    for name, optimizer in (("adamw", torch.optim.AdamW), ("fused", fused)):
        record = _Record()
        module = BLURUnlearner(build_tiny_llama(), mode="pdu", forget_loss="pdu_entropic", alpha=2.0, gamma=0.5,
                               pdu_retain_eps=3.0, pdu_dual_step_size=0.5,
                               optimizer=functools.partial(optimizer, lr=1e-3, weight_decay=0.01),
                               export_dir=None)  # fmt: skip
        fit(module, [make_batch(seed=s) for s in range(3)], callbacks=[record])
        runs[name] = (record.lambdas, module.model.state_dict())
    assert runs["fused"][0] == pytest.approx(runs["adamw"][0], rel=1e-6) and runs["adamw"][0][-1] != 2.0
    for key, want in runs["adamw"][1].items():
        torch.testing.assert_close(runs["fused"][1][key], want, rtol=1e-5, atol=1e-6, msg=key)
