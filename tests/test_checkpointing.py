"""Activation checkpointing: the same weights as without it, and fewer bytes held by autograd."""

from __future__ import annotations

import functools

import lightning.pytorch as pl
import pytest
import torch
from conftest import make_batch
from torch.utils.data import DataLoader

from blur_lightning.models import activation_checkpointing as checkpointing
from blur_lightning.testing.tiny import tiny_llama
from blur_lightning.training.unlearner import BLURUnlearner

VOCAB = 101


def build(**kwargs) -> BLURUnlearner:
    model = tiny_llama(vocab_size=VOCAB, hidden=32, layers=3, max_position_embeddings=64, seed=0)
    options = dict(export_dir=None, projection_backend="torch", optimizer=functools.partial(torch.optim.AdamW, lr=1e-2))
    return BLURUnlearner(model, **{**options, **kwargs})


def fit(module, batches) -> None:
    trainer = pl.Trainer(
        accelerator="cpu", devices=1, max_epochs=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False,
    )
    trainer.fit(module, train_dataloaders=DataLoader(batches, batch_size=None, shuffle=False))


CASES = {
    "full_npo_nll": dict(forget_loss="npo", retain_loss="nll"),
    "full_rmu": dict(forget_loss="rmu", retain_loss="rmu", mode="rmu", rmu_layer=1),
    # dropout on the adapters: the recompute must replay the same masks (RNG state preserved)
    "lora_npo_kl_dropout": dict(forget_loss="npo", retain_loss="kl", lora_rank=4, lora_dropout=0.1,
                                lora_target_modules=["q_proj", "v_proj", "up_proj"]),
}


@pytest.mark.parametrize("name", list(CASES))
def test_same_weights_with_and_without_checkpointing(name):
    """fp32, 3 AdamW steps of 2 micro-batches each: every weight within 1e-6."""
    pytest.importorskip("peft") if "lora" in name else None
    batches = [make_batch(batch=3, length=16, seed=s) for s in range(6)]
    results = {}
    for on in (False, True):
        torch.manual_seed(0)  # the same dropout masks in both runs
        module = build(activation_checkpointing=on, accumulate_grad_batches=2, **CASES[name])
        fit(module, batches)
        assert checkpointing.is_enabled(module.model) == on
        assert module.trainer.global_step == 3
        results[on] = {n: p.detach().clone() for n, p in module.model.named_parameters()}
    init = dict(build(**CASES[name]).model.named_parameters()) if "lora" not in name else None
    worst = max((results[True][n] - results[False][n]).abs().max().item() for n in results[False])
    assert worst <= 1e-6, f"{name}: max abs diff {worst:.3g}"
    trained = [n for n in results[False] if "lora_B" in n] if "lora" in name else list(results[False])
    reference = {n: torch.zeros_like(results[False][n]) for n in trained} if "lora" in name else init
    moved = max((results[False][n] - reference[n].detach()).abs().max().item() for n in trained)
    assert moved > 1e-3, f"{name}: weights moved only {moved:.3g}"
    print(f"{name}: max abs diff with/without checkpointing {worst:.3g} (weights moved {moved:.3g})")


class SavedActivationBytes:
    """Bytes of the tensors autograd holds for backward, alive at once (storages counted once,
    parameters excluded), and the peak of that through a forward."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.params = {p.untyped_storage().data_ptr() for p in model.parameters()}
        self.alive: dict[int, list[int]] = {}  # storage pointer -> [references, bytes]
        self.current = self.peak = 0

    def pack(self, tensor: torch.Tensor):
        storage = tensor.untyped_storage()
        key = storage.data_ptr()
        if key in self.params or storage.nbytes() == 0:
            return tensor
        entry = self.alive.setdefault(key, [0, storage.nbytes()])
        if entry[0] == 0:
            self.current += entry[1]
            self.peak = max(self.peak, self.current)
        entry[0] += 1
        return _Held(self, key, tensor)

    def unpack(self, packed):
        return packed.tensor if isinstance(packed, _Held) else packed

    def release(self, key: int) -> None:
        entry = self.alive[key]
        entry[0] -= 1
        if entry[0] == 0:
            self.current -= entry[1]
            del self.alive[key]


class _Held:
    def __init__(self, owner: SavedActivationBytes, key: int, tensor: torch.Tensor) -> None:
        self.owner, self.key, self.tensor = owner, key, tensor

    def __del__(self) -> None:
        self.owner.release(self.key)


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_checkpointing_holds_fewer_bytes_at_the_peak_of_the_forward(lora):
    """The forget forward of a 4-layer model, B=4, T=48: autograd's saved tensors at their peak,
    plus what the checkpoint itself keeps (each layer's input, B x T x H fp32, held by its
    recompute closure rather than by a saved-tensor hook), against no checkpointing."""
    if lora:
        pytest.importorskip("peft")
    side = make_batch(batch=4, length=48, seed=3)["forget"]
    peaks = {}
    for on in (False, True):
        model = tiny_llama(vocab_size=VOCAB, hidden=64, layers=4, max_position_embeddings=64, seed=0,
                           attn_implementation="eager")
        module = BLURUnlearner(model, forget_loss="ga", activation_checkpointing=on, export_dir=None,
                               lora_rank=8 if lora else None)
        module.configure_model()
        module.model.train()
        meter = SavedActivationBytes(module.model)
        with torch.autograd.graph.saved_tensors_hooks(meter.pack, meter.unpack):
            loss = module.forget_loss(side)
        peak = meter.peak
        loss.backward()  # the recompute runs here (and still works under the meter's hooks)
        assert meter.current == 0
        grads = [p.grad for p in module.trainable_parameters()]
        assert all(g is not None for g in grads) and any(g.abs().max() > 0 for g in grads)
        peaks[on] = peak
    kept_inputs = 4 * side["input_ids"].numel() * 64 * 4  # layers x (B, T, H) fp32
    ratio = (peaks[True] + kept_inputs) / peaks[False]
    print(f"saved bytes at the forward's peak: {peaks[False]} without, {peaks[True]} + {kept_inputs} kept "
          f"inputs with checkpointing: ratio {ratio:.3f}")
    assert ratio < 0.35, ratio


def test_no_decoder_layers_is_a_clear_error():
    with pytest.raises(ValueError, match="activation_checkpointing=True: found no decoder layers"):
        checkpointing.enable(torch.nn.Linear(2, 2))


def test_idempotent():
    model = tiny_llama(vocab_size=VOCAB, hidden=32, layers=2, seed=0)
    hooks = [len(layer._forward_pre_hooks) for layer in model.model.layers]
    assert checkpointing.enable(model) == 2 and checkpointing.enable(model) == 2
    assert [len(layer._forward_pre_hooks) for layer in model.model.layers] == [h + 1 for h in hooks]
    assert checkpointing.is_enabled(model)
