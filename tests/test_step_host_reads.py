"""The step's host reads, the device-side skip of a non-finite step, and the fused-optimizer path.

On a GPU a host read (item, bool, a blocking copy) stalls the CPU until the stream drains; the
HostReadCounter sees the same dispatcher calls on the CPU, so "no host read per step" is
checked here for every optimizer that can skip on the device.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import itertools
import warnings

import lightning.pytorch as pl
import pytest
import torch
from conftest import build_tiny_llama, make_batch
from torch.utils.data import DataLoader

from blur_lightning.losses import functional as losses
from blur_lightning.models.attention import (
    causal_padding_mask,
    full_causal_attention,
    mark_padding,
    native_transformers_model,
    read_free_sdpa,
)
from blur_lightning.models.attention import forward as read_free_forward
from blur_lightning.testing.host_reads import HostReadCounter
from blur_lightning.training.unlearner import BLURUnlearner


def fused_blur_adamw(**kwargs):
    from blur_lightning.kernels import BLURFusedAdamW

    return functools.partial(BLURFusedAdamW, backend="torch", **kwargs)


OPTIMIZERS = {
    "adamw_fused": lambda: functools.partial(torch.optim.AdamW, lr=1e-2, fused=True),
    "sgd_fused": lambda: functools.partial(torch.optim.SGD, lr=1e-2, momentum=0.9, fused=True),
    "blur_fused_adamw": lambda: fused_blur_adamw(lr=1e-2),
    "adamw_foreach": lambda: functools.partial(torch.optim.AdamW, lr=1e-2, foreach=True),
}
DEVICE_SKIP = ("adamw_fused", "sgd_fused", "blur_fused_adamw")


def fit(module, batches, **kwargs):
    kwargs = {"log_every_n_steps": 1000, **kwargs}
    trainer = pl.Trainer(
        accelerator="cpu", devices=1, max_epochs=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, **kwargs,
    )
    trainer.fit(module, train_dataloaders=DataLoader(batches, batch_size=None, shuffle=False))
    return trainer


def count_step_reads(module, only_in: str | None = None, device_type: str | None = None) -> list[int]:
    """Wrap training_step: the host reads made inside each call (only_in: whose stack names that
    file; device_type: reads of tensors on that device only)."""
    per_call = []
    original = module.training_step

    def counted(batch, batch_idx):
        # on a GPU, CUDA's own sync check runs beside the counter: it sees every stall, even one
        # inside an op the counter does not know
        with HostReadCounter(device_type=device_type) as reads, cuda_sync_warnings(device_type) as syncs:
            out = original(batch, batch_idx)
        found = sum(only_in in stack for stack in reads.stacks) if only_in else reads.count
        per_call.append(found + len(syncs))
        module._last_sites = reads.sites() + "".join(f"\nCUDA sync: {w.message}" for w in syncs)
        return out

    module.training_step = counted
    return per_call


@contextlib.contextmanager
def cuda_sync_warnings(device_type: str | None):
    """The warnings of torch.cuda.set_sync_debug_mode("warn") inside the block (none off CUDA)."""
    if device_type != "cuda":
        yield []
        return
    previous = torch.cuda.get_sync_debug_mode()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        syncs: list = []
        try:
            yield syncs
        finally:
            torch.cuda.set_sync_debug_mode(previous)
            syncs.extend(w for w in caught if "synchroniz" in str(w.message))


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_host_reads_per_step(name):
    """0 reads per step when the optimizer skips on the device; exactly 1 (the finite check) otherwise."""
    module = BLURUnlearner(
        build_tiny_llama(), forget_loss="npo", optimizer=OPTIMIZERS[name](), export_dir=None,
        accumulate_grad_batches=2, gradient_clip_val=0.5,  # clipping must not read either
    )
    # torch's foreach AdamW reads its per-parameter step counts with .item(): CPU tensors even
    # on a GPU (no stall), but indistinguishable here, so that case counts the module's reads only.
    reads = count_step_reads(module, only_in=None if name in DEVICE_SKIP else "blur_lightning/training/unlearner.py")
    fit(module, [make_batch(seed=s) for s in range(4)])
    # micro-batches 1 and 3 end a window (an optimizer step), 0 and 2 only accumulate
    expected = [0, 0, 0, 0] if name in DEVICE_SKIP else [0, 1, 0, 1]
    assert reads == expected, module._last_sites
    assert module.trainer.global_step == 2


@pytest.mark.parametrize("npo_reference", ["model", "cache"])
@pytest.mark.parametrize("name", ["adamw_fused", "adamw_foreach"])
def test_cached_npo_reference_reads_as_the_reference_model(name, npo_reference):
    """Batches of ForgetRetainDataModule (SDPA, padded, numbered rows): the table lookup is a device
    gather, so the cache path reads the host exactly as often as the reference-model path."""
    import os

    from blur_lightning.data.datamodule import ForgetRetainDataModule
    from blur_lightning.testing.tiny import tiny_llama, tiny_tokenizer

    fixtures = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures")
    qa = os.path.join(fixtures, "qa")
    dm = ForgetRetainDataModule(
        forget_path=os.path.join(qa, "forget.jsonl"), retain_path=os.path.join(qa, "retain.jsonl"),
        tokenizer=os.path.join(fixtures, "tiny_tokenizer"), batch_size=4, max_length=64,
    )
    module = BLURUnlearner(
        tiny_llama(vocab_size=len(tiny_tokenizer())), forget_loss="npo", npo_reference=npo_reference,
        optimizer=OPTIMIZERS[name](), export_dir=None, accumulate_grad_batches=2, gradient_clip_val=0.5,
    )
    # foreach AdamW's own .item() on CPU step counts (see test_host_reads_per_step): ours only
    reads = count_step_reads(module, only_in=None if name in DEVICE_SKIP else "/blur_lightning/")
    trainer = pl.Trainer(
        accelerator="cpu", devices=1, max_steps=2, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, log_every_n_steps=1000, limit_val_batches=0,
    )
    trainer.fit(module, datamodule=dm)
    assert (module.reference_model is None) == (npo_reference == "cache")
    assert reads == ([0, 0, 0, 0] if name in DEVICE_SKIP else [0, 1, 0, 1]), module._last_sites


_X = torch.randn(4, 3)
_MASK = _X > 0
COUNTER_CASES = {  # name: (code, reads it makes on CUDA)
    "item": (lambda: _X.sum().item(), 1),
    "if tensor": (lambda: bool(_X.sum() > 0), 1),
    "boolean-mask index": (lambda: _X[_MASK], 1),
    "torch.where(mask)": (lambda: torch.where(_MASK), 1),
    "nonzero": (lambda: _MASK.nonzero(), 1),
    "masked_select": (lambda: _X.masked_select(_MASK), 1),
    "unique": (lambda: torch.unique(_X), 1),
    "repeat_interleave": (lambda: torch.repeat_interleave(torch.tensor([1, 2])), 1),
    "repeat_interleave with output_size": (
        lambda: torch.repeat_interleave(torch.tensor([1, 2]), output_size=3), 0),
    "equal": (lambda: torch.equal(_X, _X), 1),
    "bincount": (lambda: torch.bincount(torch.tensor([1, 3])), 1),
    "x[mask] = scalar (masked_fill on CUDA)": (lambda: _X.clone().__setitem__(_MASK, 0.0), 0),
    # int() and index_put_
    "x[mask] = tensor": (lambda: _X.clone().__setitem__(_MASK, _X[0, 0].expand(int(_MASK.sum()))), 2),
    "integer index": (lambda: _X[torch.tensor([0, 2])], 0),
    "masked_fill": (lambda: _X.masked_fill(_MASK, 0.0), 0),
    "torch.where(mask, x, y)": (lambda: torch.where(_MASK, _X, 0.0), 0),
    "count_nonzero": (lambda: torch.count_nonzero(_MASK), 0),
}


@pytest.mark.parametrize("case", list(COUNTER_CASES))
def test_counter_sees_what_stalls_a_gpu(case):
    """Scalar reads, and ops whose output size comes from the values (CUDA reads a count back
    inside them); ops that stay on the device are not counted."""
    code, expected = COUNTER_CASES[case]
    with HostReadCounter() as reads:
        code()
    assert reads.count == expected, (dict(reads.ops), reads.sites())
    assert sum(reads.ops.values()) == reads.count


def test_counter_device_filter():
    with HostReadCounter(device_type="cuda") as reads:
        _X.sum().item()
        _MASK.nonzero()
    assert reads.count == 0


LOSS_PAIRS = [(f, r, "forget_lower") for f, r in itertools.product(
    ("ga", "npo", "simnpo", "idk", "rmu"), ("nll", "kl", "rmu"))]
MODE_CASES = [("npo", "nll", mode) for mode in ("forget_upper", "penalty", "rmu")]


@pytest.mark.parametrize(("forget_loss", "retain_loss", "mode"), LOSS_PAIRS + MODE_CASES)
def test_every_loss_and_mode_makes_no_host_read(forget_loss, retain_loss, mode):
    """Every forget loss x retain loss (frozen reference and RMU hooks included) and every mode,
    with accumulation and norm clipping, on an SDPA model: 0 reads, the value-shaped ops too."""
    module = BLURUnlearner(
        build_tiny_llama(attn="sdpa"), forget_loss=forget_loss, retain_loss=retain_loss, mode=mode,
        rmu_layer=0, optimizer=OPTIMIZERS["adamw_fused"](), export_dir=None,
        accumulate_grad_batches=2, gradient_clip_val=1.0,
    )
    reads = count_step_reads(module)
    batches = [make_batch(seed=s) for s in range(2)]
    for batch in batches:
        if forget_loss == "idk":  # refusal answers: what the collator adds under data.idk_column
            batch["forget"].update({f"alt_{key}": value for key, value in batch["forget"].items()})
        mark_padding(batch)
    fit(module, batches)
    assert reads == [0, 0], module._last_sites
    assert module.trainer.global_step == 1


def test_logging_steps_make_no_tensor_from_python_numbers():
    """On a logging step, self.log of a Python number builds torch.tensor(x, device=cuda): a
    blocking copy. After the first step (Lightning registers each key once) none is made."""
    module = BLURUnlearner(
        build_tiny_llama(attn="sdpa"), forget_loss="npo", optimizer=OPTIMIZERS["adamw_fused"](), export_dir=None,
        scheduler=lambda optimizer: torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (step + 1)),
    )
    per_call = []
    original = module.training_step

    def counted(batch, batch_idx):
        with HostReadCounter(host_data=True) as reads:
            out = original(batch, batch_idx)
        per_call.append(reads.ops["lift_fresh"])
        module._last_sites = reads.sites()
        return out

    module.training_step = counted
    batches = [make_batch(seed=s) for s in range(3)]
    for batch in batches:
        mark_padding(batch)
    trainer = fit(module, batches, log_every_n_steps=1)
    assert per_call[0] > 0, "the first logging step registers the keys: the check must see that"
    assert per_call[1:] == [0, 0], module._last_sites
    assert trainer.logged_metrics["train/lr"].item() == pytest.approx(1e-2 / 3)


def test_rmu_control_vector_moves_to_the_device_once():
    """RMU's control vector is made on the CPU; a copy to the GPU each step would block (a
    pageable host-to-device copy waits for the stream). "meta" stands in for the GPU here: each
    .to() onto it makes a new tensor, so only a cached vector comes back as the same object."""
    module = BLURUnlearner(build_tiny_llama(), forget_loss="rmu", rmu_layer=0, export_dir=None)
    device = torch.device("meta")
    first = module._rmu_control(64, device)
    assert first.device.type == "meta" and module._rmu_control(64, device) is first
    assert torch.equal(module._rmu_control(64, torch.device("cpu")), losses.rmu_control_vector(64, 6.5, 0))


def test_host_mode_reads_once_per_step():
    module = BLURUnlearner(
        build_tiny_llama(), forget_loss="ga", optimizer=OPTIMIZERS["adamw_fused"](), export_dir=None,
        nonfinite_skip="host",
    )
    reads = count_step_reads(module)
    fit(module, [make_batch(seed=s) for s in range(2)])
    assert reads == [1, 1]


def test_device_mode_refuses_an_optimizer_that_cannot_skip():
    module = BLURUnlearner(
        build_tiny_llama(), forget_loss="ga", optimizer=OPTIMIZERS["adamw_foreach"](), export_dir=None,
        nonfinite_skip="device",
    )
    with pytest.raises(ValueError, match="nonfinite_skip='device'.*AdamW cannot skip"):
        fit(module, [make_batch()])


def test_bad_nonfinite_skip_value():
    with pytest.raises(ValueError, match="nonfinite_skip='never'"):
        BLURUnlearner(build_tiny_llama(), nonfinite_skip="never", export_dir=None)


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_nan_step_is_skipped_bit_identical(name):
    """A NaN retain loss at step 2 of 3: parameters and the whole optimizer state (moments and
    step counts) after it equal those after step 1; step 3 then proceeds; the user is warned."""
    constant = functools.partial(torch.optim.lr_scheduler.LambdaLR, lr_lambda=lambda step: 1.0)
    module = BLURUnlearner(
        build_tiny_llama(), forget_loss="ga", optimizer=OPTIMIZERS[name](), scheduler=constant, export_dir=None
    )
    calls = {"n": 0}
    original = module.retain_loss

    def retain_loss(side):
        calls["n"] += 1
        loss = original(side)
        return loss * float("nan") if calls["n"] == 2 else loss

    module.retain_loss = retain_loss
    snapshots, logged = {}, []

    class Snapshot(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            snapshots[batch_idx] = (
                {k: v.clone() for k, v in pl_module.model.state_dict().items()},
                copy.deepcopy(trainer.optimizers[0].state_dict()),
            )
            logged.append(float(trainer.callback_metrics["train/skipped_steps"]))

    with pytest.warns(RuntimeWarning, match="1 step\\(s\\) skipped"):
        fit(module, [make_batch(seed=s) for s in range(3)], callbacks=[Snapshot()], log_every_n_steps=1)
    assert logged == [0.0, 1.0, 1.0]  # the skip is in its own step's log (it came a step late before)
    (params0, opt0), (params1, opt1), (params2, _) = snapshots[0], snapshots[1], snapshots[2]
    for k in params0:
        assert torch.equal(params0[k], params1[k]), k
    assert any(not torch.equal(params1[k], params2[k]) for k in params1), "step 3 must update"
    for pid, state in opt0["state"].items():
        for key, value in state.items():
            assert torch.equal(value, opt1["state"][pid][key]), (pid, key)
    assert module.skipped_steps.item() == 1
    # A skipped step counts on every path, as under GradScaler: the device skip calls the optimizer
    # with its flag, the host skip calls it with no gradient; the scheduler steps once either way.
    # (Before: the host path advanced neither, so the schedule depended on the optimizer.)
    assert module.trainer.global_step == 3
    assert module.lr_schedulers().last_epoch == 3
    assert not hasattr(module.trainer.optimizers[0].optimizer if hasattr(
        module.trainer.optimizers[0], "optimizer") else module.trainer.optimizers[0], "found_inf")


@pytest.mark.parametrize("mode", ["forget_lower", "forget_upper", "rmu"])
@pytest.mark.parametrize("clip", [None, 0.05])
def test_fused_optimizer_path_equals_projection_then_adamw(mode, clip):
    """BLURFusedAdamW (pass 1 here, d formed inside the update, clipping from the sums) against
    blur_direction_ then torch's AdamW with Lightning's clip_grad_norm_: 3 steps, accumulation 2."""
    batches = [make_batch(seed=s) for s in range(6)]
    common = dict(forget_loss="npo", mode=mode, gamma=0.3, accumulate_grad_batches=2, export_dir=None,
                  gradient_clip_val=clip)
    adamw = dict(lr=1e-2, weight_decay=0.1)
    fused = BLURUnlearner(build_tiny_llama(), optimizer=fused_blur_adamw(**adamw), **common)
    plain = BLURUnlearner(
        build_tiny_llama(), optimizer=functools.partial(torch.optim.AdamW, foreach=False, **adamw), **common
    )
    fit(fused, batches)
    fit(plain, batches)
    start = build_tiny_llama().state_dict()
    for (name, a), b in zip(fused.model.state_dict().items(), plain.model.state_dict().values()):
        moved = (b - start[name]).abs().max().item()
        assert moved > 1e-3, f"{name} did not move"
        # 1e-4 = lr / 100: float32 rounding of d (formed in another order, clipped by a factor
        # from the sums instead of a pass over d) that Adam's d / (sqrt(v) + eps) amplifies where
        # d is tiny (measured: 3.4e-5 on 1 of 1024 q_proj weights, <= 3e-6 elsewhere); a wrong d
        # moves weights by ~lr = 1e-2 per step.
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4, msg=name)


def test_fused_optimizer_refuses_value_clipping():
    module = BLURUnlearner(
        build_tiny_llama(), optimizer=fused_blur_adamw(lr=1e-2), gradient_clip_val=1.0,
        gradient_clip_algorithm="value", export_dir=None,
    )
    with pytest.raises(ValueError, match="gradient_clip_algorithm='value'.*BLURFusedAdamW"):
        fit(module, [make_batch()])


# --------------------------------------------------------------------------------------------
# attention masks: transformers' SDPA path reads a 2D mask back (fast_all) on every forward
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("padded", [True, False, "unmarked"])
@pytest.mark.parametrize("forget_loss", ["npo", "ga"])
def test_sdpa_model_step_makes_no_host_read(padded, forget_loss):
    """An SDPA model with padded, unpadded or unmarked batches (no "padded:" flag from the
    collator: the 4D mask is built), NPO's reference forward included: 0 reads."""
    module = BLURUnlearner(
        build_tiny_llama(attn="sdpa"), forget_loss=forget_loss, optimizer=OPTIMIZERS["adamw_fused"](),
        export_dir=None,
    )
    reads = count_step_reads(module)
    batches = [make_batch(seed=s) for s in range(2)]
    if padded is False:
        for batch in batches:
            for side in batch.values():
                side["attention_mask"].fill_(1)
                side["labels"] = side["input_ids"].clone()
    if padded != "unmarked":
        for batch in batches:
            mark_padding(batch)  # what ForgetRetainDataModule's collator stores
    fit(module, batches)
    assert reads == [0, 0], module._last_sites


@pytest.mark.parametrize(
    "settings",
    [dict(lora_rank=4), dict(activation_checkpointing=True), dict(lora_rank=4, activation_checkpointing=True)],
    ids=["lora", "checkpointing", "lora_checkpointing"],
)
def test_lora_and_checkpointing_steps_make_no_host_read(settings):
    """LoRA (the peft model's SDPA forward switched like its base's; NPO + KL references with the
    adapters disabled) and activation checkpointing (the recompute in the backward): 0 reads."""
    if "lora_rank" in settings:
        pytest.importorskip("peft")
    module = BLURUnlearner(
        build_tiny_llama(attn="sdpa"), forget_loss="npo", retain_loss="kl", optimizer=OPTIMIZERS["adamw_fused"](),
        export_dir=None, **settings,
    )
    reads = count_step_reads(module)
    batches = [make_batch(seed=s) for s in range(2)]
    for batch in batches:
        mark_padding(batch)
    fit(module, batches)
    assert reads == [0, 0], module._last_sites


def test_hf_sdpa_mask_reads_the_host_without_marks():
    """The cost the marks avoid: the same forward with a plain 2D mask reads it back."""
    model = build_tiny_llama(attn="sdpa")
    side = make_batch()["forget"]
    with HostReadCounter() as reads:
        model(input_ids=side["input_ids"], attention_mask=side["attention_mask"], use_cache=False)
    assert reads.count >= 1


@pytest.mark.parametrize("padding", ["right", "left", "none", "unmarked"])
def test_read_free_forward_gives_transformers_logits(padding):
    """attention.forward (no host read) against the model's own forward with the 2D mask: the same
    logits on every real token, for right, left (fully padded query rows must not be NaN), no
    padding (is_causal, no mask), and a mask whose padding was not noted (the 4D mask is built)."""
    model = build_tiny_llama(attn="sdpa").eval()
    side = dict(make_batch(batch=5, length=11)["retain"])
    if padding == "left":
        side["attention_mask"] = side["attention_mask"].flip(-1)
    if padding == "none":
        side["attention_mask"] = torch.ones_like(side["attention_mask"])
    if padding != "unmarked":
        mark_padding(side)
    with torch.no_grad():
        want = model(input_ids=side["input_ids"], attention_mask=side["attention_mask"], use_cache=False).logits
        with HostReadCounter() as reads:
            got = read_free_forward(model, side).logits
    assert reads.count == 0, reads.sites()
    assert model.config._attn_implementation == "sdpa", "the switch must be undone"
    assert torch.isfinite(got).all()
    real = side["attention_mask"].bool()
    assert (real.sum() < real.numel()) == (padding != "none")
    torch.testing.assert_close(got[real], want[real], atol=1e-5, rtol=1e-5)


def test_causal_padding_mask_values():
    mask = causal_padding_mask(torch.tensor([[1, 1, 0], [0, 1, 1]]))
    assert mask.shape == (2, 1, 3, 3)
    assert mask[0, 0].tolist() == [[True, False, False], [True, True, False], [True, True, True]]
    # left padding: the padded query 0 sees itself only; real queries never see key 0
    assert mask[1, 0].tolist() == [[True, False, False], [False, True, False], [False, True, True]]


def test_sliding_window_models_keep_their_masks():
    """A window shorter than the sequence, or local layers: the model is left to build its mask."""
    from transformers import MistralConfig

    config = MistralConfig(sliding_window=8, attn_implementation="sdpa")
    assert full_causal_attention(config, 8) and not full_causal_attention(config, 9)
    config.layer_types = ["full_attention", "sliding_attention"]
    assert not full_causal_attention(config, 4)
    model = build_tiny_llama(attn="sdpa")
    model.config.sliding_window = 4
    with read_free_sdpa(model, 12) as free:
        assert not free and model.config._attn_implementation == "sdpa"


def test_only_native_transformers_models_are_switched():
    """A model class from outside transformers (remote code) may not dispatch attention at call
    time: it keeps its 2D mask. FSDP2's dynamic subclass and DDP-style wrappers still count."""
    from torch.distributed.fsdp import FSDPModule

    model = build_tiny_llama(attn="sdpa")
    assert native_transformers_model(model)

    class Wrapper(torch.nn.Module):
        def __init__(self, module):
            super().__init__()
            self.module = module
            self.config = module.config

    assert native_transformers_model(Wrapper(model))
    fsdp_class = type("FSDPLlamaForCausalLM", (FSDPModule, type(model)), {})  # what fully_shard makes
    model.__class__ = fsdp_class
    assert native_transformers_model(model)

    class RemoteCode(torch.nn.Module):
        def __init__(self, config):
            super().__init__()
            self.config = config

    remote = RemoteCode(model.config)
    assert not native_transformers_model(remote)
    with read_free_sdpa(remote, 12) as free:
        assert not free


def test_mark_padding_nested():
    batch = {
        "forget": {"attention_mask": torch.ones(2, 3, dtype=torch.long), "input_ids": torch.zeros(2, 3)},
        "retain": {"attention_mask": torch.tensor([[1, 1, 0]]), "alt_attention_mask": torch.ones(1, 2)},
    }
    mark_padding(batch)
    assert batch["forget"]["padded:attention_mask"] is False
    assert batch["retain"]["padded:attention_mask"] is True
    assert batch["retain"]["padded:alt_attention_mask"] is False


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize(("name", "forget_loss", "retain_loss", "log_every"), [
    ("adamw_fused", "npo", "nll", 1000), ("blur_fused_adamw", "npo", "nll", 1000),
    ("adamw_fused", "rmu", "rmu", 1000), ("adamw_fused", "simnpo", "kl", 1000),
    ("adamw_fused", "npo", "nll", 1),  # logging steps: self.log must not copy a Python number to the GPU
])
def test_gpu_step_makes_no_device_read(name, forget_loss, retain_loss, log_every):
    """On a GPU (Triton projection, SDPA, padded batches, NPO's reference, RMU's control vector): no
    read of a CUDA value and no blocking copy either way (CUDA's sync debug mode sees both)."""
    from blur_lightning.kernels import BLURFusedAdamW

    optimizer = (
        functools.partial(BLURFusedAdamW, lr=1e-2) if name == "blur_fused_adamw" else OPTIMIZERS[name]()
    )
    module = BLURUnlearner(
        build_tiny_llama(attn="sdpa"), forget_loss=forget_loss, retain_loss=retain_loss, rmu_layer=0,
        optimizer=optimizer, export_dir=None,
    )
    per_call = count_step_reads(module, device_type="cuda")
    trainer = pl.Trainer(
        accelerator="gpu", devices=1, max_epochs=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, log_every_n_steps=log_every,
    )
    trainer.fit(module, train_dataloaders=DataLoader([make_batch(seed=s) for s in range(4)], batch_size=None))
    # a first logging step registers each key (Lightning moves its fresh accumulators to the GPU once)
    checked = per_call[1:] if log_every == 1 else per_call
    assert checked == [0] * len(checked), module._last_sites
