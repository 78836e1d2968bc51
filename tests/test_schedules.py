"""Schedules that follow the data: LinearWarmupDecay's lengths in epochs or "auto", resolved at fit
start from the optimizer steps the fit takes (training/step_count.py), and refused when they disagree.

    the count            OptimizerSteps against a simulation of the modules' step rule (k, partial
                         windows, max_epochs, max_steps); real fits take exactly the counted steps
                         (partial windows, max_steps, limit_train_batches int and float)
    the resolution       warmup_epochs rounding, the lr at the warm-up's end and after the last step,
                         the errors (explicit total against the fit, unbounded, warm-up too long)
    resume               the same lrs as one fit; resumed with other epochs: refused with both numbers
    2 gloo processes     DDP, k = 1 and 8, the datamodule's sampler splitting 24 rows: the warm-up is
                         epoch 1's steps and the lr is 0 exactly after the last step (slow)
"""

from __future__ import annotations

import functools
import json
import math
import os
import sys

import lightning.pytorch as pl
import pytest
import torch
from conftest import build_tiny_llama, make_batch

from blur_lightning.training.schedules import LinearWarmupDecay
from blur_lightning.training.step_count import OptimizerSteps, count_optimizer_steps
from blur_lightning.training.unlearner import BLURUnlearner

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "dist_workers"))

from blur_worker import ResumableBatches  # noqa: E402

LR = 0.1


# ============================================================================ the count
def simulated_steps(n: int, k: int, max_epochs: int | None, max_steps: int | None) -> int:
    """The steps of a fit, stepping as the modules do: a step when the window holds k micro-batches
    or the epoch's last batch arrives; the fit stops once max_steps are taken."""
    steps = 0
    for _ in range(max_epochs if max_epochs is not None else 10**6):
        window = 0
        for i in range(n):
            window += 1
            if window == k or i == n - 1:
                steps, window = steps + 1, 0
                if steps == max_steps:
                    return steps
    return steps


@pytest.mark.parametrize("n", [1, 7, 8, 9, 13, 100])
@pytest.mark.parametrize("k", [1, 3, 8])
@pytest.mark.parametrize("max_epochs, max_steps", [(1, None), (10, None), (10, 5), (3, 1000), (None, 11)])
def test_count_matches_the_step_rule(n, k, max_epochs, max_steps):
    count = OptimizerSteps(n, k, max_epochs, max_steps)
    assert count.total == simulated_steps(n, k, max_epochs, max_steps)
    assert count.per_epoch == simulated_steps(n, k, 1, None)


def test_count_without_bounds_or_length():
    assert OptimizerSteps(10, 2, None, None).total is None  # max_epochs -1 and max_steps -1
    unsized = OptimizerSteps(None, 2, 5, 40)  # an iterable loader: only max_steps bounds it
    assert (unsized.per_epoch, unsized.total) == (None, 40)
    assert OptimizerSteps(None, 2, 5, None).total is None
    with pytest.raises(ValueError, match="accumulate_grad_batches must be >= 1, got 0"):
        OptimizerSteps(10, 0, 1, None)


def sgd_module(k: int, scheduler=None) -> BLURUnlearner:
    return BLURUnlearner(
        build_tiny_llama(),
        forget_loss="ga",
        accumulate_grad_batches=k,
        export_dir=None,
        optimizer=functools.partial(torch.optim.SGD, lr=LR),
        scheduler=scheduler,
    )


class RecordLR(pl.Callback):
    """Each optimizer step's (epoch, lr): the lr at the start of the batch that closed its window;
    and each micro-batch's first token (which batch it was)."""

    def __init__(self) -> None:
        self.steps: list[tuple[int, float]] = []
        self.batches: list[int] = []
        self._at_start = (0.0, 0)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._at_start = (trainer.optimizers[0].param_groups[0]["lr"], trainer.global_step)
        self.batches.append(int(batch["forget"]["input_ids"][0, 0]))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step > self._at_start[1]:
            self.steps.append((trainer.current_epoch, self._at_start[0]))


def fit(module, n_batches: int, callbacks=(), ckpt_path=None, **trainer_kwargs) -> pl.Trainer:
    options = dict(
        accelerator="cpu",
        devices=1,
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=list(callbacks),
    )
    trainer = pl.Trainer(**{**options, **trainer_kwargs})
    batches = [make_batch(batch=2, length=8, seed=s) for s in range(n_batches)]
    trainer.fit(module, train_dataloaders=ResumableBatches(batches), ckpt_path=ckpt_path)
    return trainer


@pytest.mark.parametrize(
    "n, k, limits",
    [
        (5, 2, dict(max_epochs=2)),  # 3 windows an epoch, the last of 1 micro-batch
        (7, 3, dict(max_epochs=3, max_steps=5)),  # max_steps ends the fit inside epoch 2
        (9, 4, dict(max_epochs=2, limit_train_batches=6)),  # 6 micro-batches: 4 + a partial 2
        (8, 3, dict(max_epochs=2, limit_train_batches=0.5)),  # 4 micro-batches: 3 + a partial 1
    ],
)
def test_fit_takes_the_counted_steps(n, k, limits):
    """What Lightning really does (is_last_batch at a limited epoch's end, max_steps mid-epoch) is
    what the count says; and the auto schedule ends at lr 0 exactly after the last step."""
    schedule = functools.partial(LinearWarmupDecay, warmup_epochs=1.0, total_steps="auto")
    module, record = sgd_module(k, schedule), RecordLR()
    trainer = fit(module, n, callbacks=[record], **limits)
    count = count_optimizer_steps(trainer, k)
    assert trainer.global_step == count.total == module.lr_schedulers().total_steps == len(record.steps)
    assert module.lr_schedulers().warmup_steps == count.per_epoch
    assert record.steps[-1][1] > 0.0 and trainer.optimizers[0].param_groups[0]["lr"] == 0.0


def test_count_waits_for_lightning_to_load_the_loader():
    """Loading it ourselves before the restore would drop its resume position (see the resume test)."""
    with pytest.raises(RuntimeError, match="train loader is not loaded yet"):
        count_optimizer_steps(pl.Trainer(accelerator="cpu", devices=1, logger=False), 2)


def test_trainer_estimate_counts_micro_batches():
    """Why we count ourselves: Lightning's estimate uses its own accumulation, 1 under manual
    optimization, so it counts micro-batches (10), not the module's steps (ceil(10 / 4) = 3)."""
    module = sgd_module(4)
    trainer = fit(module, 10)
    assert trainer.global_step == count_optimizer_steps(trainer, 4).total == 3
    assert trainer.estimated_stepping_batches == 10


# ============================================================================ the resolution
def schedule(**kwargs) -> tuple[torch.optim.Optimizer, LinearWarmupDecay]:
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1, dtype=torch.float64))], lr=LR)
    return opt, LinearWarmupDecay(opt, **kwargs)


def lrs_of(opt, sched, steps: int) -> list[float]:
    out = []
    for _ in range(steps):
        out.append(opt.param_groups[0]["lr"])  # the lr this optimizer step runs at
        opt.step()
        sched.step()
    return out


@pytest.mark.parametrize(
    "epochs, per_epoch, warmup", [(1.0, 13, 13), (2.0, 13, 26), (0.5, 13, 6), (0.29, 100, 29), (0.0, 13, 0)]
)
def test_warmup_epochs_rounds_down_exactly(epochs, per_epoch, warmup):
    opt, sched = schedule(warmup_epochs=epochs)
    sched.resolve(per_epoch, 10 * per_epoch)
    assert (sched.warmup_steps, sched.total_steps) == (warmup, 10 * per_epoch)
    lrs = lrs_of(opt, sched, 10 * per_epoch)
    assert lrs[0] == (0.0 if warmup else LR)
    assert lrs[warmup] == pytest.approx(LR, rel=1e-12) and max(lrs) == lrs[warmup]
    assert lrs[-1] == pytest.approx(LR / (10 * per_epoch - warmup), rel=1e-12)
    assert opt.param_groups[0]["lr"] == 0.0


def test_resolve_is_idempotent_and_sets_the_current_lr():
    opt, sched = schedule(warmup_steps=0, total_steps="auto")
    assert opt.param_groups[0]["lr"] == LR  # no warm-up: step 0 at the peak, whatever T is
    sched.resolve(4, 8)
    sched.resolve(4, 8)
    assert lrs_of(opt, sched, 8) == pytest.approx([LR * (8 - t) / 8 for t in range(8)], rel=1e-12)


def test_explicit_total_is_checked_against_the_fit():
    count = OptimizerSteps(50, 8, 10, None, ranks=2, devices=2)
    _, sched = schedule(warmup_steps=13, total_steps=130)  # forget10's hand count for one device
    with pytest.raises(ValueError) as err:
        sched.resolve(count.per_epoch, count.total, counted=count.describe())
    text = str(err.value)
    for part in (
        "total_steps=130",
        "takes 70 optimizer steps",
        "never reach 0",
        "devices 2 x num_nodes 1",
        "50 micro-batches",
        "accumulate_grad_batches=8",
        "ceil(50/8) = 7",
        "max_epochs=10 (10 x 7 = 70)",
    ):
        assert part in text, (part, text)
    _, sched = schedule(warmup_steps=2, total_steps=20)
    with pytest.raises(ValueError, match="total_steps=20, but this fit takes 130 .* train on at 0"):
        sched.resolve(13, 130)
    _, sched = schedule(warmup_steps=13, total_steps=130)
    sched.resolve(13, 130)  # agreeing: fine
    assert (sched.warmup_steps, sched.total_steps) == (13, 130)


@pytest.mark.parametrize(
    "kwargs, per_epoch, total, match",
    [
        (dict(warmup_epochs=1.0), 13, None, "total_steps='auto' needs a bounded fit"),
        (dict(warmup_epochs=1.0), None, 40, "warmup_epochs=1.0 needs the steps of an epoch"),
        (dict(warmup_epochs=1.0), 13, 10, r"warmup_epochs=1.0 x 13 steps an epoch = 13 steps and total_steps=10"),
        (dict(warmup_steps=10), 13, 10, "warmup_steps=10 and total_steps=10"),
    ],
)
def test_resolution_errors(kwargs, per_epoch, total, match):
    _, sched = schedule(**kwargs)
    with pytest.raises(ValueError, match=match):
        sched.resolve(per_epoch, total)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(warmup_steps=1, warmup_epochs=1.0), "warmup_steps or warmup_epochs, not both"),
        (dict(warmup_steps=-1), "warmup_steps must be an int >= 0, got -1"),
        (dict(warmup_epochs=float("nan")), "warmup_epochs must be a finite number >= 0"),
        (dict(total_steps="all"), "total_steps must be a positive int or 'auto', got 'all'"),
        (dict(total_steps=0), "total_steps must be a positive int or 'auto', got 0"),
    ],
)
def test_bad_arguments_are_refused_by_name(kwargs, match):
    with pytest.raises(ValueError, match=match):
        schedule(**kwargs)


def test_unresolved_schedule_refuses_to_step():
    opt, sched = schedule(warmup_epochs=1.0)
    assert opt.param_groups[0]["lr"] == 0.0
    with pytest.raises(RuntimeError, match="is not resolved"):
        lrs_of(opt, sched, 2)


def test_fit_with_a_disagreeing_total_fails_at_fit_start():
    """6 micro-batches, k = 2, 2 epochs: 6 steps; a schedule for 99 is refused before any step."""
    module = sgd_module(2, functools.partial(LinearWarmupDecay, warmup_steps=1, total_steps=99))
    with pytest.raises(ValueError) as err:
        fit(module, 6, max_epochs=2)
    text = str(err.value)
    assert "total_steps=99, but this fit takes 6 optimizer steps" in text
    assert "6 micro-batches" in text and "accumulate_grad_batches=2" in text and "max_epochs=2 (2 x 3 = 6)" in text


# ============================================================================ resume
class SaveAt(pl.Callback):
    def __init__(self, path: str, after_batch: int) -> None:
        self.path, self.after_batch, self.seen = path, after_batch, 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.seen += 1
        if self.seen == self.after_batch:
            trainer.save_checkpoint(self.path)


def test_resume_gives_the_same_schedule_and_refuses_another(tmp_path):
    """5 micro-batches, k = 2 (3 steps an epoch), 3 epochs: saved inside epoch 2's second window
    and resumed, the steps run at the lrs of one fit; resumed with 4 epochs, refused by name."""
    auto = functools.partial(LinearWarmupDecay, warmup_epochs=1.0, total_steps="auto")
    straight = RecordLR()
    path = str(tmp_path / "mid.ckpt")
    fit(sgd_module(2, auto), 5, callbacks=[straight, SaveAt(path, 8)], max_epochs=3)
    assert len(straight.steps) == 9 and straight.steps[3] == (1, pytest.approx(LR, rel=1e-12))

    resumed = RecordLR()
    module = sgd_module(2, auto)
    trainer = fit(module, 5, callbacks=[resumed], ckpt_path=path, max_epochs=3)
    assert (module.lr_schedulers().warmup_steps, module.lr_schedulers().total_steps) == (3, 9)
    # micro-batch 8 is inside step 5's window (steps end at micro-batches 2, 4, 5, 7, 9, 10, ...)
    assert resumed.steps == straight.steps[4:] and trainer.optimizers[0].param_groups[0]["lr"] == 0.0
    # and on the same micro-batches: the loader's position came back too (counting the steps must not
    # load the train loader before the restore, Lightning issue 20550: it then drops the loader's state)
    assert resumed.batches == straight.batches[8:]

    with pytest.raises(ValueError) as err:
        fit(sgd_module(2, auto), 5, ckpt_path=path, max_epochs=4)
    text = str(err.value)
    assert "checkpoint's schedule has warmup_steps=3, total_steps=9" in text
    assert "this fit's has warmup_steps=3, total_steps=12" in text and "max_epochs=4 (4 x 3 = 12)" in text


# ============================================================================ 2 gloo processes
SCHEDULE_ROWS = 24  # forget rows; 2 ranks of 12, one row a micro-batch


@pytest.fixture(scope="module")
def two_rank_schedules(tmp_path_factory):
    from test_fsdp import launch

    from blur_lightning.testing.tiny import tiny_tokenizer

    out = str(tmp_path_factory.mktemp("schedules"))
    qa = os.path.join(HERE, "fixtures", "qa")
    with open(os.path.join(qa, "forget.jsonl")) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    rows += [{**r, "question": r["question"] + " Again?"} for r in rows[: SCHEDULE_ROWS - len(rows)]]
    forget = os.path.join(out, "forget.jsonl")
    with open(forget, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    data = dict(
        forget=forget,
        retain=os.path.join(qa, "retain.jsonl"),
        tokenizer=os.path.join(HERE, "fixtures", "tiny_tokenizer"),
    )
    common = dict(
        layout="ddp",
        world=2,
        rows=1,
        data=data,
        vocab=len(tiny_tokenizer()),
        forget_loss="ga",
        optimizer="sgd",
        lr=LR,
        max_epochs=2,
        scheduler=dict(warmup_epochs=1.0, total_steps="auto"),
    )
    cases = [dict(name=f"k{k}", accumulate=k, **common) for k in (1, 8)]
    launch(cases, nproc=2, out=out)
    return out


@pytest.mark.slow
@pytest.mark.timeout(120)
@pytest.mark.parametrize("k", [1, 8])
def test_two_ranks_warm_up_one_epoch_and_end_at_zero(two_rank_schedules, k):
    """The sampler gives each rank 12 of the 24 rows, so an epoch is ceil(12 / k) steps (k = 8: a
    window of 8 and a partial one of 4), 2 epochs in all. Warm-up 1 epoch: every step of epoch 1 is
    below the peak, the first step of epoch 2 is at it; the last step at peak / (T - w) > 0 and the
    lr exactly 0 after it; both ranks alike."""
    results = [torch.load(os.path.join(two_rank_schedules, f"k{k}.rank{r}.pt"), weights_only=False) for r in (0, 1)]
    per_epoch = math.ceil(SCHEDULE_ROWS // 2 / k)
    warmup, total = per_epoch, 2 * per_epoch
    for result in results:
        assert result["schedule"] == (warmup, total) and result["global_step"] == total
        epochs = [epoch for epoch, _ in result["lrs"]]
        lrs = [lr for _, lr in result["lrs"]]
        assert epochs == [0] * per_epoch + [1] * per_epoch
        assert lrs[:warmup] == pytest.approx([LR * t / warmup for t in range(warmup)], rel=1e-12, abs=0)
        assert lrs[warmup] == pytest.approx(LR, rel=1e-12) and max(lrs[:warmup]) < LR
        assert lrs[-1] == pytest.approx(LR / (total - warmup), rel=1e-12) and lrs[-1] > 0
        assert result["final_lr"] == 0.0
    assert results[0]["lrs"] == results[1]["lrs"]
