"""Forget and retain losses as a registry: each one a name, what it needs, and its call.

A loss is registered once, with the inputs it reads beyond the policy's logits of the batch:

    @register("forget", "npo", needs={"reference_logprobs"})
    def _npo(inputs: LossInputs) -> torch.Tensor:
        return losses.npo_loss_from_logprobs(inputs.logits(), inputs.reference_logprobs(), ...)

and that is all it takes: the module's `forget_loss` / `retain_loss` settings accept the name, its
step calls it (BLURUnlearner.forget_loss / retain_loss dispatch here), and the frozen reference
model is built only when a chosen loss needs what only a model gives. The needs:

    reference_logprobs       log pi_ref(y|x) per sequence (B,): NPO's reference term. On the forget
                             side it can come from the cache computed at fit start (reference_cache.py,
                             the npo_reference setting), so it alone needs no reference model there.
    reference_logits         the frozen model's logits (B, T, V): KL. Only a model gives them.
    reference_hidden_states  the frozen model's activations of rmu_layer (B, T, H): RMU retain.
    hidden_states            the policy's activations of rmu_layer (B, T, H): RMU. No reference.
    refusal                  the batch's refusal answers (alt_input_ids, alt_labels): IDK, DPO.
    reference_refusal_logprobs  log pi_ref(refusal|x) per sequence (B,): DPO's preferred side. Only a
                             model gives it (the NPO cache holds the forget answers' log-probs, which
                             serve DPO's dispreferred side: npo_reference="cache" still needs the model).

A loss reads its inputs through `LossInputs` (loss_inputs.LossContext implements it), which computes
each lazily and refuses one the loss did not declare: a loss cannot use the reference without the
reference being built for it. The pattern is open-unlearning's (a dict of trainers and metrics,
one decorator to register) with torchtune's habit of stating what a loss is given as a Protocol.
The math stays in losses.py, which knows nothing of this file.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from blur_lightning.losses import functional as losses

NEEDS = ("reference_logprobs", "reference_logits", "reference_hidden_states", "hidden_states", "refusal",
         "reference_refusal_logprobs")
# What only the frozen model gives; the forget side's reference_logprobs can come from the cache.
FROM_MODEL_ONLY = frozenset({"reference_logits", "reference_hidden_states", "reference_refusal_logprobs"})
FROM_REFERENCE = FROM_MODEL_ONLY | {"reference_logprobs"}
ROLES = ("forget", "retain")


class LossInputs(Protocol):
    """What a loss's call may read: one side of a micro-batch and the model outputs on it."""

    role: str  # "forget" or "retain"
    side: dict[str, torch.Tensor]  # input_ids, attention_mask, labels (B, T), and alt_* with refusals
    hparams: Any  # the module's settings (npo_beta, kl_mask, rmu_mask, ...)

    def logits(self) -> torch.Tensor:
        """The policy's logits (B, T, V), with grad."""

    def refusal_logits(self) -> torch.Tensor:
        """The policy's logits on the refusal answers (B, T', V) ("refusal")."""

    def reference_logprobs(self) -> torch.Tensor:
        """log pi_ref(y|x) per sequence (B,), no grad ("reference_logprobs")."""

    def reference_logits(self) -> torch.Tensor:
        """The frozen reference's logits (B, T, V), no grad ("reference_logits")."""

    def reference_refusal_logprobs(self) -> torch.Tensor:
        """log pi_ref(refusal|x) per sequence (B,), no grad ("reference_refusal_logprobs")."""

    def hidden_states(self) -> torch.Tensor:
        """The policy's output activations of decoder layer rmu_layer (B, T, H) ("hidden_states")."""

    def reference_hidden_states(self) -> torch.Tensor:
        """The reference's activations of rmu_layer (B, T, H), no grad ("reference_hidden_states")."""

    def rmu_control(self, hidden: torch.Tensor) -> torch.Tensor:
        """RMU's control vector (H,) on hidden's device, made once."""


@dataclass(frozen=True)
class UnlearningLoss:
    """One registered loss: `name`, its `role` ("forget"/"retain"), its `needs` and its call."""

    name: str
    role: str
    needs: frozenset[str]
    compute: Callable[[LossInputs], torch.Tensor]

    def __call__(self, inputs: LossInputs) -> torch.Tensor:
        """The scalar loss of one micro-batch side (a mean over sequences: losses.py's convention)."""
        return self.compute(inputs)


FORGET: dict[str, UnlearningLoss] = {}
RETAIN: dict[str, UnlearningLoss] = {}
_REGISTRIES = {"forget": FORGET, "retain": RETAIN}


def register(role: str, name: str, needs: Iterable[str] = ()) -> Callable:
    """Decorator: register `compute(inputs) -> loss` as the `role` loss `name` needing `needs`.

    Raises:
        ValueError: an unknown role or need, or a name already registered for the role.
    """
    if role not in ROLES:
        raise ValueError(f"loss role={role!r}: expected one of {ROLES}")
    needs = frozenset(needs)
    if not needs <= set(NEEDS):
        raise ValueError(f"{role} loss {name!r}: unknown needs {sorted(needs - set(NEEDS))}; expected some of {NEEDS}")
    registry = _REGISTRIES[role]
    if name in registry:
        raise ValueError(f"{role} loss {name!r} is registered already")

    def decorate(compute: Callable[[LossInputs], torch.Tensor]) -> Callable[[LossInputs], torch.Tensor]:
        registry[name] = UnlearningLoss(name, role, needs, compute)
        return compute

    return decorate


def get(role: str, name: str) -> UnlearningLoss:
    """The registered loss, or a ValueError naming the setting (forget_loss / retain_loss) and the choices."""
    registry = _REGISTRIES[role]
    if name not in registry:
        raise ValueError(f"{role}_loss={name!r}: expected one of {tuple(registry)}")
    return registry[name]


def needs_model_outputs(forget_loss: str, retain_loss: str) -> bool:
    """Whether a chosen loss needs what only a reference model gives (the cache cannot stand in).

    The cache holds the forget examples' log-probs, so a retain loss's reference_logprobs needs the model.
    """
    return bool(get("forget", forget_loss).needs & FROM_MODEL_ONLY or get("retain", retain_loss).needs & FROM_REFERENCE)


def cacheable_forget_losses() -> tuple[str, ...]:
    """The forget losses whose reference need the NPO cache can serve (npo_reference="cache")."""
    return tuple(name for name, loss in FORGET.items() if "reference_logprobs" in loss.needs)


def needs_reference_model(forget_loss: str, retain_loss: str, npo_reference: str) -> bool:
    """Whether the fit needs the frozen reference (a copy, or the policy with its adapters off).

    Args:
        forget_loss, retain_loss: registered names.
        npo_reference: the resolved setting: "cache" serves the forget side's reference_logprobs.
    """
    cached = npo_reference == "cache"
    forget_logprobs = "reference_logprobs" in get("forget", forget_loss).needs
    return needs_model_outputs(forget_loss, retain_loss) or (forget_logprobs and not cached)


# ---------------------------------------------------------------------------------- forget losses
@register("forget", "ga")
def _gradient_ascent(inputs: LossInputs) -> torch.Tensor:
    return losses.gradient_ascent_loss(inputs.logits(), inputs.side["labels"])


@register("forget", "npo", needs={"reference_logprobs"})
def _npo(inputs: LossInputs) -> torch.Tensor:
    # the policy's forward first, then the reference's: the order the RNG (dropout) has always seen
    logits = inputs.logits()
    return losses.npo_loss_from_logprobs(logits, inputs.reference_logprobs(), inputs.side["labels"],
                                         beta=inputs.hparams.npo_beta)


@register("forget", "simnpo")
def _simnpo(inputs: LossInputs) -> torch.Tensor:
    hp = inputs.hparams
    return losses.simnpo_loss(inputs.logits(), inputs.side["labels"], beta=hp.simnpo_beta, delta=hp.simnpo_delta)


@register("forget", "idk", needs={"refusal"})
def _idk(inputs: LossInputs) -> torch.Tensor:
    return losses.nll_loss(inputs.refusal_logits(), inputs.side["alt_labels"])


@register("forget", "rmu", needs={"hidden_states"})
def _rmu_forget(inputs: LossInputs) -> torch.Tensor:
    hidden = inputs.hidden_states()
    mask = losses.rmu_mask(inputs.side, inputs.hparams.rmu_mask)
    return losses.rmu_forget_loss(hidden, inputs.rmu_control(hidden), mask)


# ------------------------------------------------- open-unlearning's further forget losses (issue 20)
@register("forget", "wga")
def _wga(inputs: LossInputs) -> torch.Tensor:
    return losses.wga_loss(inputs.logits(), inputs.side["labels"], beta=inputs.hparams.wga_beta,
                           reduction=inputs.hparams.token_reduction)


@register("forget", "satimp")
def _satimp(inputs: LossInputs) -> torch.Tensor:
    hp = inputs.hparams
    return losses.satimp_loss(inputs.logits(), inputs.side["labels"], beta1=hp.satimp_beta1, beta2=hp.satimp_beta2,
                              reduction=hp.token_reduction)


@register("forget", "ceu")
def _ceu(inputs: LossInputs) -> torch.Tensor:
    return losses.ceu_loss(inputs.logits(), inputs.side["labels"], ignore_first_n=inputs.hparams.ceu_ignore_first_n,
                           reduction=inputs.hparams.token_reduction)


@register("forget", "undial", needs={"reference_logits"})
def _undial(inputs: LossInputs) -> torch.Tensor:
    logits = inputs.logits()
    return losses.undial_loss(logits, inputs.reference_logits(), inputs.side["labels"], beta=inputs.hparams.undial_beta)


@register("forget", "dpo", needs={"refusal", "reference_logprobs", "reference_refusal_logprobs"})
def _idk_dpo(inputs: LossInputs) -> torch.Tensor:
    # preferred: the refusal answer; dispreferred: the forget answer (open-unlearning's IdkDPO)
    side = inputs.side
    logits_lose, logits_win = inputs.logits(), inputs.refusal_logits()
    return losses.dpo_loss_from_logprobs(
        logits_win, side["alt_labels"], inputs.reference_refusal_logprobs(),
        logits_lose, side["labels"], inputs.reference_logprobs(), beta=inputs.hparams.dpo_beta,
    )


@register("forget", "pdu_entropic")
def _pdu_entropic(inputs: LossInputs) -> torch.Tensor:
    return losses.entropic_forget_loss(inputs.logits(), inputs.side["labels"], inputs.hparams.token_reduction)


# ---------------------------------------------------------------------------------- retain losses
@register("retain", "nll")
def _nll(inputs: LossInputs) -> torch.Tensor:
    return losses.nll_loss(inputs.logits(), inputs.side["labels"])


@register("retain", "kl", needs={"reference_logits"})
def _kl(inputs: LossInputs) -> torch.Tensor:
    logits = inputs.logits()
    return losses.kl_loss(logits, inputs.reference_logits(), inputs.side["labels"], inputs.hparams.kl_mask)


@register("retain", "rmu", needs={"hidden_states", "reference_hidden_states"})
def _rmu_retain(inputs: LossInputs) -> torch.Tensor:
    hidden = inputs.hidden_states()
    ref_hidden = inputs.reference_hidden_states()
    return losses.rmu_retain_loss(hidden, ref_hidden, losses.rmu_mask(inputs.side, inputs.hparams.rmu_mask))


# The built-in names, in registration order (a loss registered later is in FORGET / RETAIN).
FORGET_LOSSES = tuple(FORGET)
RETAIN_LOSSES = tuple(RETAIN)
