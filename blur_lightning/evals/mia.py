"""Membership-inference attacks as pure functions: one score per example, and the forget/holdout AUC.

The six attacks of open-unlearning (``src/evals/metrics/mia/*.py``), each scoring a text so that a
*higher* score means *less* likely a member (the sign of a loss), as open-unlearning signs them:

* ``loss`` (Yeom et al. 2018): the mean token loss L = -mean log p over the labelled tokens.
* ``zlib`` (Carlini et al. 2021): L / len(zlib.compress(text as UTF-8)), text = the labelled tokens
  decoded without special tokens.
* ``min_k`` (Shi et al. 2023): minus the mean of the lowest floor(k n) token log-probs (at least one);
  k = 0.4 in open-unlearning's TOFU and MUSE configs.
* ``min_k_plus_plus`` (Zhang et al. 2024): the same over z_t = (log p(x_t) - mu_t) / sigma_t, with mu_t
  and sigma_t^2 the mean and variance of log p(v) under the model's own next-token distribution p(.)
  at position t (sigma^2 clamped at 1e-6, as open-unlearning).
* ``gradnorm`` (Wang et al. 2024, arXiv 2402.17012): the p-norm (p = 2) of the gradient of the
  example's mean token loss, per parameter tensor, averaged over the trainable tensors (what
  open-unlearning computes: the mean of per-tensor norms, not one norm over all parameters).
* ``reference`` (Carlini et al. 2022): L_target - L_reference, the same text's mean token loss under
  a reference model (open-unlearning: a ``reference_model_path``, e.g. the retain model).

Which tokens count, as open-unlearning: ``loss``, ``zlib`` and ``reference`` every labelled token
(``evaluate_probability``); ``min_k``, ``min_k_plus_plus`` and ``gradnorm`` all but the last one
(``tokenwise_logprobs``'s ``[:-1]``; :func:`blur_lightning.evals.memorization.drop_last_scored`).

AUC (open-unlearning ``mia_auc``): scikit-learn's ``roc_auc_score`` with forget labelled 0 and
holdout 1 on these scores, i.e. P(score(holdout) > score(forget)) with ties 1/2: 1 when the forget
texts look far more familiar than the holdout ones, 0.5 when the attack cannot tell them apart. This
is :func:`blur_lightning.evals.metrics.auroc` (holdout positive), the function MUSE's ``min_k_auc``
calls on log-prob scores (opposite sign): for Min-K% open-unlearning's AUC is 1 - MUSE's.

PrivLeak (open-unlearning ``privleak``): ((1 - AUC) - (1 - AUC_ref)) / ((1 - AUC_ref) + 1e-10) x 100
on ``mia_min_k`` AUCs, AUC_ref the retain model's (its logs) or ``ref_value`` 0.5 in the configs:
MUSE's PrivLeak (:func:`blur_lightning.evals.metrics.priv_leak`) of the flipped AUCs.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence

import torch
from torch import Tensor

from blur_lightning.evals.metrics import auroc, min_k_scores, priv_leak

__all__ = [
    "ATTACKS",
    "MIA_NAMES",
    "OPEN_UNLEARNING_PRIVLEAK_EPS",
    "attack_auc",
    "gradnorm_score",
    "log_prob_moments",
    "loss_scores",
    "min_k_attack_scores",
    "min_k_plus_plus_scores",
    "privleak_from_auc",
    "reference_scores",
    "zlib_scores",
]

ATTACKS = ("loss", "zlib", "min_k", "min_k_plus_plus", "gradnorm", "reference")
# our attack name -> open-unlearning's metric name (configs/eval/{tofu,muse}_metrics/mia_*.yaml)
MIA_NAMES = {attack: f"mia_{attack}" for attack in ATTACKS}
# open-unlearning's privleak adds 1e-10 to the reference in the denominator (privacy.py)
OPEN_UNLEARNING_PRIVLEAK_EPS = 1e-10
# open-unlearning clamps Min-K%++'s variance here (min_k_plus_plus.py)
MIN_VARIANCE = 1e-6


def loss_scores(token_logprobs: Tensor, mask: Tensor) -> Tensor:
    """LOSS attack: the mean token loss -mean(log p) over the scored tokens, (B,) float64 (NaN: none)."""
    mask = mask.bool()
    total = torch.where(mask, token_logprobs.double(), torch.zeros((), dtype=torch.float64)).sum(dim=1)
    return -total / mask.sum(dim=1).double()


def zlib_scores(losses: Tensor, texts: Sequence[str]) -> Tensor:
    """ZLib attack: mean token loss divided by the zlib-compressed size (bytes) of the text, (B,) float64.

    Args:
        losses: (B,) mean token losses (:func:`loss_scores`).
        texts: the B scored texts (the labelled tokens decoded without special tokens).
    """
    if len(texts) != losses.numel():
        raise ValueError(f"zlib_scores: {losses.numel()} losses but {len(texts)} texts")
    sizes = torch.tensor([len(zlib.compress(t.encode("utf-8"))) for t in texts], dtype=torch.float64)
    return losses.double().flatten().cpu() / sizes


def min_k_attack_scores(token_logprobs: Tensor, mask: Tensor, k: float = 0.4) -> Tensor:
    """Min-K% attack in open-unlearning's sign: minus MUSE's Min-K% score (:func:`min_k_scores`), (B,) float64."""
    return -min_k_scores(token_logprobs, mask, k)


def log_prob_moments(log_probs: Tensor) -> tuple[Tensor, Tensor]:
    """Mean and variance of log p(v) under p itself, per position: what Min-K%++ normalizes by.

    Args:
        log_probs: (..., V) log-softmax of the next-token logits.

    Returns:
        (mu, var), each (...,) in log_probs' dtype: mu = sum_v p(v) log p(v),
        var = sum_v p(v) log p(v)^2 - mu^2 (not clamped here).
    """
    probs = log_probs.exp()
    mu = (probs * log_probs).sum(dim=-1)
    return mu, (probs * log_probs.square()).sum(dim=-1) - mu.square()


def min_k_plus_plus_scores(
    token_logprobs: Tensor, vocab_mean: Tensor, vocab_var: Tensor, mask: Tensor, k: float = 0.4
) -> Tensor:
    """Min-K%++ attack: minus the mean of the lowest floor(k n) z-scores (log p - mu) / sigma, (B,) float64.

    Args:
        token_logprobs: (B, T) log p of the label at each position.
        vocab_mean: (B, T) mu at each position (:func:`log_prob_moments`).
        vocab_var: (B, T) sigma^2 at each position (clamped at 1e-6 here).
        mask: (B, T) bool, true on scored positions.
        k: fraction of positions kept.
    """
    sigma = vocab_var.double().clamp_min(MIN_VARIANCE).sqrt()
    z = (token_logprobs.double() - vocab_mean.double()) / sigma
    return -min_k_scores(z, mask, k)


def reference_scores(target_losses: Tensor, reference_losses: Tensor) -> Tensor:
    """Reference attack: L_target - L_reference per example, (B,) float64."""
    return target_losses.double() - reference_losses.double()


def gradnorm_score(grads: Sequence[Tensor], p: float = 2) -> Tensor:
    """GradNorm attack of one example: the mean over parameter tensors of each gradient's p-norm (0-dim float64).

    Args:
        grads: the example's loss gradient, one tensor per trainable parameter (None-free).
        p: 1, 2 or inf.
    """
    if p not in (1, 2, float("inf")):
        raise ValueError(f"gradnorm p must be 1, 2 or inf, got {p}")
    if not grads:
        raise ValueError("gradnorm_score needs at least one gradient tensor")
    return torch.stack([torch.linalg.vector_norm(g.double(), ord=p) for g in grads]).mean()


def attack_auc(forget_scores: Tensor, holdout_scores: Tensor) -> Tensor:
    """open-unlearning's ``mia_*`` AUC: P(score(holdout) > score(forget)), ties 1/2 (0-dim float64)."""
    return auroc(holdout_scores, forget_scores)


def privleak_from_auc(
    auc: Tensor | float, reference_auc: Tensor | float = 0.5, eps: float = OPEN_UNLEARNING_PRIVLEAK_EPS
) -> Tensor:
    """open-unlearning's ``privleak`` (%) from two ``mia_min_k`` AUCs in its convention (module docstring).

    Args:
        auc: the evaluated model's ``mia_min_k`` AUC.
        reference_auc: the retain model's (open-unlearning's default ``ref_value``: 0.5).
        eps: added to the flipped reference in the denominator (open-unlearning: 1e-10; 0: MUSE's formula).
    """
    flipped = 1.0 - torch.as_tensor(auc, dtype=torch.float64)
    return priv_leak(flipped, 1.0 - torch.as_tensor(reference_auc, dtype=torch.float64), eps=eps)
