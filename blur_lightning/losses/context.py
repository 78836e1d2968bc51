"""What the losses read, and the frozen reference that gives part of it: BLURUnlearner's loss half.

`LossContext` is loss_registry.LossInputs for one side of one micro-batch: it runs each forward a
loss asks for once, when asked (the policy's logits, a layer's activations, the reference's), and
refuses what the loss did not declare in its `needs`, so the reference model cannot be used where
it was not built. `LossesMixin` gives the LightningModule the reference and the dispatch:

    needs_reference       a chosen loss needs the frozen model (loss_registry.needs_reference_model)
    reference_model       the frozen copy, when one is built (None with LoRA adapters: the policy with
                          its adapters switched off stands in, adapters.disabled; or with NPO's cache)
    forget_loss / retain_loss   loss_registry's entry for the setting, called on a LossContext
"""

from __future__ import annotations

import contextlib
import copy
from typing import Any

import torch
from torch import nn

from blur_lightning.losses import functional as losses
from blur_lightning.losses import npo_reference as reference_cache
from blur_lightning.losses import registry as loss_registry
from blur_lightning.models import adapters, attention


class LossContext:
    """One side of a micro-batch and the model outputs on it, computed lazily (loss_registry.LossInputs)."""

    def __init__(self, module: Any, loss: loss_registry.UnlearningLoss, side: dict[str, torch.Tensor]) -> None:
        self.module, self.loss, self.side = module, loss, side
        self.role, self.hparams = loss.role, module.hparams
        self._done: dict[str, torch.Tensor] = {}

    def _require(self, need: str) -> None:
        if need not in self.loss.needs:
            raise RuntimeError(
                f"{self.role} loss {self.loss.name!r} reads {need!r} but does not declare it in its needs "
                f"{sorted(self.loss.needs)}: register it with needs including {need!r}"
            )

    def _once(self, key: str, make) -> torch.Tensor:
        if key not in self._done:
            self._done[key] = make()
        return self._done[key]

    def logits(self) -> torch.Tensor:
        return self._once("logits", lambda: attention.forward(self.module.model, self.side).logits)

    def refusal_logits(self) -> torch.Tensor:
        self._require("refusal")
        if "alt_input_ids" not in self.side:
            raise ValueError(f"{self.role}_loss={self.loss.name!r} needs refusal answers: set data.idk_column")
        model, side = self.module.model, self.side
        refusals = ("alt_input_ids", "alt_attention_mask")
        return self._once("refusal", lambda: attention.forward(model, side, *refusals).logits)

    def reference_logits(self) -> torch.Tensor:
        self._require("reference_logits")
        return self._once("reference_logits", lambda: self.module._reference_logits(self.side))

    def reference_refusal_logprobs(self) -> torch.Tensor:
        self._require("reference_refusal_logprobs")
        if "alt_input_ids" not in self.side:
            raise ValueError(f"{self.role}_loss={self.loss.name!r} needs refusal answers: set data.idk_column")
        side = self.side

        def make() -> torch.Tensor:
            with self.module._reference_forward() as ref:
                logits = attention.forward(ref, side, "alt_input_ids", "alt_attention_mask").logits
                return losses.sequence_logprob(logits, side["alt_labels"])[0]

        return self._once("reference_refusal_logprobs", make)

    def reference_logprobs(self) -> torch.Tensor:
        self._require("reference_logprobs")
        cache = self.module._npo_cache
        if cache is not None and self.role == "forget":  # the cache holds the forget examples only
            return cache.lookup(self.side)  # (B,): a gather on the device
        ref_logits = self._once("reference_logits", lambda: self.module._reference_logits(self.side))
        with torch.no_grad():
            return losses.sequence_logprob(ref_logits, self.side["labels"])[0]

    def hidden_states(self) -> torch.Tensor:
        self._require("hidden_states")
        return self._once("hidden", lambda: self.module._layer_activations(self.module.model, self.side))

    def reference_hidden_states(self) -> torch.Tensor:
        self._require("reference_hidden_states")

        def make() -> torch.Tensor:
            with self.module._reference_forward() as ref:
                return self.module._layer_activations(ref, self.side)

        return self._once("reference_hidden", make)

    def rmu_control(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.module._rmu_control(hidden.shape[-1], hidden.device)


class LossesMixin:
    """The forget and retain losses of a BLURUnlearner and the frozen reference they may need.

    Mixed into a CausalLMModule (training/base.py), whose `hparams` (forget_loss, retain_loss,
    npo_reference, lora_rank, rmu_*), `model`, `reference_model` and `_reference` it reads, and whose
    `needs_reference_copy` it decides; BLURUnlearner adds `_npo_cache`.
    """

    @property
    def npo_reference(self) -> str:
        """"model", "cache" or "none": the npo_reference setting resolved for this fit's data."""
        hp, datamodule = self.hparams, getattr(self._trainer, "datamodule", None) if self._trainer else None
        return reference_cache.resolve_npo_reference(hp.get("npo_reference", "auto"), hp.forget_loss,
                                                     hp.retain_loss, datamodule)

    @property
    def needs_reference(self) -> bool:
        """Whether a chosen loss needs the frozen model (NPO's log-probs from the cache need none)."""
        hp = self.hparams
        return loss_registry.needs_reference_model(hp.forget_loss, hp.retain_loss, self.npo_reference)

    @property
    def needs_reference_copy(self) -> bool:
        """Whether a loss needs the frozen model and it must be a copy (not the policy, adapters off)."""
        return self.needs_reference and not (self.hparams.lora_rank or adapters.has_adapters(self.model))

    @contextlib.contextmanager
    def _reference_forward(self):
        """Within, under no_grad: the frozen reference, the copy or this model with its adapters off."""
        if self._reference or not adapters.has_adapters(self.model):
            with torch.no_grad():
                yield self.reference_model
        else:
            with adapters.disabled(self.model) as base:
                yield base

    def _make_reference(self, model: nn.Module) -> nn.Module:
        reference = copy.deepcopy(model)
        reference.eval()
        reference.requires_grad_(False)
        return reference

    def _reference_logits(self, side: dict[str, torch.Tensor]) -> torch.Tensor:
        with self._reference_forward() as ref:
            return attention.forward(ref, side).logits

    def _layer_activations(self, model: nn.Module, side: dict[str, torch.Tensor]) -> torch.Tensor:
        """Output of decoder layer rmu_layer, (B, T, H): hidden_states[0] is the embedding output."""
        out = attention.forward(model, side, output_hidden_states=True)
        layer = self.hparams.rmu_layer
        if not 0 <= layer < len(out.hidden_states) - 1:
            raise ValueError(f"rmu_layer={layer}: the model has {len(out.hidden_states) - 1} decoder layers")
        return out.hidden_states[layer + 1]

    def _rmu_control(self, hidden_size: int, device: torch.device) -> torch.Tensor:
        # Made on the CPU (seeded, the same on every rank) and kept on the device: a blocking
        # host-to-device copy per step would make the CPU wait for the GPU's queue to drain.
        control = getattr(self, "_rmu_control_vector", None)
        if control is None or control.numel() != hidden_size or control.device != device:
            control = losses.rmu_control_vector(hidden_size, self.hparams.rmu_steering_coef, self.hparams.rmu_seed)
            if device.type == "cuda":  # once: pinned + non_blocking, queued without waiting
                control = control.pin_memory()
            control = self._rmu_control_vector = control.to(device, non_blocking=True)
        return control

    def forget_loss(self, side: dict[str, torch.Tensor]) -> torch.Tensor:
        """The forget_loss setting's registered loss on the forget side of a micro-batch."""
        loss = loss_registry.get("forget", self.hparams.forget_loss)
        return loss(LossContext(self, loss, side))

    def retain_loss(self, side: dict[str, torch.Tensor]) -> torch.Tensor:
        """The retain_loss setting's registered loss on the retain side of a micro-batch."""
        loss = loss_registry.get("retain", self.hparams.retain_loss)
        return loss(LossContext(self, loss, side))
