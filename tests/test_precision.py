"""16-mixed precision: BLUR under Lightning's GradScaler plugin (run on the CPU with torch.amp.GradScaler).

The gradients come out of manual_backward multiplied by the loss scale S. What must hold:
  * a non-finite step is skipped by the scaler, which then backs S off, so training recovers
    (a skip that bypassed scaler.update() left S where it overflowed: every later step skipped);
  * clipping acts on the true direction (norm and value), not on S times it;
  * the projection's sums and logged norms are the true ones (independent of S).
"""

from __future__ import annotations

import functools

import lightning.pytorch as pl
import pytest
import torch
from conftest import build_tiny_llama, make_batch
from lightning.pytorch.plugins import MixedPrecision
from test_step_host_reads import count_step_reads
from torch.utils.data import DataLoader

from blur_lightning.training.unlearner import BLURUnlearner


def fp16_plugin(init_scale: float, **kwargs) -> MixedPrecision:
    scaler = torch.amp.GradScaler("cpu", init_scale=init_scale, growth_interval=10_000, **kwargs)
    return MixedPrecision("16-mixed", "cpu", scaler=scaler)


def fit_fp16(module, batches, plugin, callbacks=()):
    trainer = pl.Trainer(
        accelerator="cpu", devices=1, max_epochs=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, plugins=[plugin], callbacks=list(callbacks),
        log_every_n_steps=1000,
    )
    trainer.fit(module, train_dataloaders=DataLoader(batches, batch_size=None, shuffle=False))
    return trainer


class RecordStats(pl.Callback):
    def __init__(self):
        self.stats = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if outputs and "stats" in outputs:
            s = outputs["stats"]
            self.stats.append({k: float(getattr(s, k)) for k in ("sq_forget", "sq_retain", "dot_rf", "direction_norm")})


def weights(module):
    return {k: v.detach().clone() for k, v in module.model.state_dict().items()}


def optimizer_factory(name: str, lr: float):
    if name == "blur_fused":
        from blur_lightning.kernels import BLURFusedAdamW

        return functools.partial(BLURFusedAdamW, lr=lr, backend="torch")
    if name == "adamw_fused":  # takes the scale and the skip flag from the scaler on the device
        return functools.partial(torch.optim.AdamW, lr=lr, fused=True)
    return functools.partial(torch.optim.SGD, lr=lr)


@pytest.mark.parametrize("optimizer", ["sgd", "adamw_fused", "blur_fused"])
def test_overflow_backs_the_scale_off_then_trains(optimizer):
    """S = 2^40 overflows the fp16 backward: each such step is skipped AND backs the scale off (by
    2^-8 here instead of GradScaler's 1/2, to keep the test short) until the steps are finite and
    training proceeds. Before: 8 of 8 skipped, the scale stayed 2^40, the weights never moved."""
    module = BLURUnlearner(build_tiny_llama(), forget_loss="ga", optimizer=optimizer_factory(optimizer, 0.01),
                           export_dir=None)
    before = weights(module)
    plugin = fp16_plugin(2.0**40, backoff_factor=2.0**-8)
    with pytest.warns(RuntimeWarning, match="skipped"):
        trainer = fit_fp16(module, [make_batch(seed=s) for s in range(8)], plugin)
    skipped = int(module.skipped_steps)
    scale = plugin.scaler.get_scale()
    after = weights(module)
    moved = max((after[k] - before[k]).abs().max().item() for k in before)
    print(f"skipped {skipped} of 8, final scale 2^{torch.log2(torch.tensor(scale)).item():.0f}, moved {moved:.3g}")
    assert 1 <= skipped < 8
    assert scale < 2.0**40
    assert moved > 1e-4
    assert trainer.global_step == 8  # the scaler's skips still count as optimizer steps


@pytest.mark.parametrize("algorithm", ["norm", "value"])
@pytest.mark.parametrize("optimizer", ["sgd", "blur_fused"])
def test_clipping_acts_on_the_true_direction(algorithm, optimizer):
    """SGD at lr 1 moves the weights by exactly the clipped d: its norm (or largest entry) is the
    clip value, 0.1, whatever the loss scale (1024 here; before: 0.1 / 1024 = 9.77e-5)."""
    if optimizer == "blur_fused" and algorithm == "value":
        pytest.skip("BLURFusedAdamW refuses value clipping (d is never written)")
    # BLURFusedAdamW: d is never written, so it is compared with plain AdamW on the same step below
    factory = optimizer_factory(optimizer, 1.0 if optimizer == "sgd" else 1e-3)
    module = BLURUnlearner(build_tiny_llama(), forget_loss="ga", optimizer=factory, export_dir=None,
                           gradient_clip_val=0.1, gradient_clip_algorithm=algorithm)
    before = weights(module)
    record = RecordStats()
    fit_fp16(module, [make_batch(seed=0)], fp16_plugin(1024.0), [record])
    delta = torch.cat([(weights(module)[k] - before[k]).reshape(-1) for k in before]).double()
    true_norm = record.stats[0]["direction_norm"]
    assert true_norm > 0.1  # the clip is active
    if optimizer == "sgd":
        measured = delta.norm().item() if algorithm == "norm" else delta.abs().max().item()
        print(f"{algorithm}: step {measured:.6g} (||d|| {true_norm:.4g})")
        assert measured == pytest.approx(0.1, rel=1e-4)
    else:
        reference = BLURUnlearner(build_tiny_llama(), forget_loss="ga", export_dir=None, gradient_clip_val=0.1,
                                  optimizer=functools.partial(torch.optim.AdamW, lr=1e-3))
        fit_fp16(reference, [make_batch(seed=0)], fp16_plugin(1024.0))
        for k, v in weights(reference).items():
            torch.testing.assert_close(weights(module)[k], v, rtol=1e-5, atol=1e-7, msg=k)


def test_sums_and_logged_norms_do_not_depend_on_the_scale():
    """The same fp16 step under S = 2^10 and S = 2^14 (powers of two: scaling is exact): the sums
    are the true gradients' (before: 16^2 = 256 times apart, ||d|| 16 times)."""
    runs = {}
    for scale in (2.0**10, 2.0**14):
        module = BLURUnlearner(build_tiny_llama(), forget_loss="npo", export_dir=None,
                               optimizer=functools.partial(torch.optim.SGD, lr=0.01))
        record = RecordStats()
        fit_fp16(module, [make_batch(seed=s) for s in range(2)], fp16_plugin(scale), [record])
        runs[scale] = record.stats
    low, high = runs[2.0**10], runs[2.0**14]
    for step, (a, b) in enumerate(zip(low, high)):
        for key in ("sq_forget", "sq_retain", "direction_norm"):
            print(step, key, a[key], b[key])
            assert b[key] == pytest.approx(a[key], rel=1e-3), (step, key, a[key], b[key])


@pytest.mark.parametrize("name,expected", [("sgd", 1), ("adamw_fused", 0)])
def test_fp16_step_host_reads(name, expected):
    """Under the scaler the step reads the host at most once (GradScaler.step's check of found_inf);
    a fused torch optimizer takes the scale and the flag on the device: no read at all."""
    factory = {"sgd": functools.partial(torch.optim.SGD, lr=1e-2),
               "adamw_fused": functools.partial(torch.optim.AdamW, lr=1e-2, fused=True)}[name]
    module = BLURUnlearner(build_tiny_llama(), forget_loss="npo", optimizer=factory, export_dir=None,
                           gradient_clip_val=0.5)
    reads = count_step_reads(module)
    fit_fp16(module, [make_batch(seed=s) for s in range(2)], fp16_plugin(1024.0))
    assert reads == [expected, expected], module._last_sites
