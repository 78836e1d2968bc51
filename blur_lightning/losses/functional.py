"""Forget and retain losses, as pure functions of logits and labels (no Lightning, no registry here).

Every loss is a mean over sequences of a per-sequence quantity, so that k micro-batches of
equal size, each divided by k, give the same gradient as one batch of their concatenation.

Token conventions: `labels` is (B, T) with -100 on tokens that carry no loss (prompt, padding);
logits at position t predict labels at position t + 1 (the usual causal shift).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# The named losses (FORGET_LOSSES, RETAIN_LOSSES), what each needs (the reference model or not)
# and their calls are registered in loss_registry.py; this file is their math only.
IGNORE_INDEX = -100
# Which positions the KL retain loss and the RMU losses average over (tests/test_loss_conventions.py):
#   KL   "labels": the answer tokens, mean per sequence (ours, the default: the retain NLL's positions)
#        "all": every position, padding included, mean over B*T (open-unlearning, the BLUR authors' TOFU)
#   RMU  "attention": prompt and answer tokens, no padding (ours, the default)
#        "labels": answer tokens only (open-unlearning); "none": every position, padding included
#        (the WMDP original's mse_loss). For text corpora (WMDP) labels == attention mask.
KL_MASKS = ("labels", "all")
RMU_MASKS = ("attention", "labels", "none")


def _compute_dtype(x: torch.Tensor) -> torch.Tensor:
    # bf16/fp16 logits are upcast to float32 for the softmax; float64 (the reference tests) stays float64,
    # so a float64 test checks the formula to ~1e-12 rather than to float32's ~1e-7.
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _shift(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    # logits (B, T, V) -> (B, T-1, V) predicting labels (B, T-1)
    return logits[:, :-1, :], labels[:, 1:]


def token_logprobs(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token log p(label) (B, T-1), zero where masked, and the mask (B, T-1) as float.

    cross_entropy keeps the (B, T, V) log-softmax out of memory: at V=49152, T=128, B=8 a
    materialized float32 log-softmax would be 200 MB per pass.
    """
    logits, labels = _shift(logits, labels)
    mask = labels != IGNORE_INDEX
    safe = labels.masked_fill(~mask, 0)
    batch, steps, vocab = logits.shape
    # Rows of V contiguous logits: class-dim-1 input (B, V, T) is strided and 1.7x slower on CPU.
    nll = F.cross_entropy(_compute_dtype(logits.reshape(-1, vocab)), safe.reshape(-1), reduction="none")
    return -nll.view(batch, steps) * mask, mask.float()


def sequence_logprob(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of answer-token log-probs, number of answer tokens) per sequence, each (B,)."""
    logp, mask = token_logprobs(logits, labels)
    return logp.sum(dim=1), mask.sum(dim=1)


def mean_sequence_nll(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean over sequences of the per-sequence mean token NLL (a sequence with no token counts 0)."""
    total, count = sequence_logprob(logits, labels)
    return (-total / count.clamp_min(1)).mean()


def nll_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Retain NLL (and the `idk` forget loss on refusal answers)."""
    return mean_sequence_nll(logits, labels)


def gradient_ascent_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """GA: minimise the negative NLL of the forget answers (unbounded below: it diverges if run long)."""
    return -mean_sequence_nll(logits, labels)


def npo_loss(
    logits: torch.Tensor, ref_logits: torch.Tensor, labels: torch.Tensor, beta: float = 0.1
) -> torch.Tensor:
    """NPO (Zhang et al. 2024): -(2/beta) * mean log sigmoid(-beta * log(pi_theta(y|x) / pi_ref(y|x))).

    The log-ratio is of whole-sequence likelihoods (sums of answer-token log-probs), as in the
    paper, not of raw logits. It is bounded below by 0 and its gradient fades as pi_theta -> 0,
    which is why the forget gradient norm collapses within a few steps.
    """
    with torch.no_grad():
        ref_logp, _ = sequence_logprob(ref_logits, labels)
    return npo_loss_from_logprobs(logits, ref_logp, labels, beta=beta)


def npo_loss_from_logprobs(
    logits: torch.Tensor, ref_logp: torch.Tensor, labels: torch.Tensor, beta: float = 0.1
) -> torch.Tensor:
    """NPO with the reference's sequence log-probs (B,) given: e.g. cached once per example."""
    logp, _ = sequence_logprob(logits, labels)
    log_ratio = logp - ref_logp.detach()
    return -(2.0 / beta) * F.logsigmoid(-beta * log_ratio).mean()


def simnpo_loss(logits: torch.Tensor, labels: torch.Tensor, beta: float = 2.5, delta: float = 0.0) -> torch.Tensor:
    """SimNPO (Fan et al. 2024), reference-free: -(2/beta) * mean log sigmoid(beta * (nll(y|x)/|y| - delta)).

    delta sits inside the beta product, as in the SimNPO authors' code, open-unlearning and the BLUR
    authors' TOFU code, so a (beta, delta) from their configs (2.5, 2.0 on TOFU) means the same here.
    """
    logp, count = sequence_logprob(logits, labels)
    avg_nll = -logp / count.clamp_min(1)
    return -(2.0 / beta) * F.logsigmoid(beta * (avg_nll - delta)).mean()


def kl_loss(logits: torch.Tensor, ref_logits: torch.Tensor, labels: torch.Tensor, mask: str = "labels") -> torch.Tensor:
    """Retain KL(pi_ref || pi_theta) per token.

    mask="labels": on the positions predicting an answer token, mean per sequence then over
    sequences. mask="all": every position of the (B, T) logits, padding included, mean over the
    B*T positions (open-unlearning's kl_div(batchmean) on the flattened logits).
    """
    if mask not in KL_MASKS:
        raise ValueError(f"kl_mask={mask!r}: expected one of {KL_MASKS}")
    if mask == "labels":
        logits, shifted = _shift(logits, labels)
        ref_logits = ref_logits[:, :-1, :]
    logp = F.log_softmax(logits.float(), dim=-1)
    with torch.no_grad():
        ref_logp = F.log_softmax(ref_logits.float(), dim=-1)
    kl = (ref_logp.exp() * (ref_logp - logp)).sum(dim=-1)  # (B, T-1), or (B, T) for "all"
    if mask == "all":
        return kl.mean()
    weights = (shifted != IGNORE_INDEX).float()
    per_seq = (kl * weights).sum(dim=1) / weights.sum(dim=1).clamp_min(1)
    return per_seq.mean()


def rmu_control_vector(hidden_size: int, steering_coef: float, seed: int = 0) -> torch.Tensor:
    """RMU's target for forget activations: a fixed random unit vector times the steering coefficient.

    Li et al. 2024 (WMDP) draw u uniform in [0, 1)^h, normalise it, and scale by c (6.5 for zephyr-7b).
    """
    g = torch.Generator().manual_seed(seed)
    u = torch.rand(hidden_size, generator=g)
    return steering_coef * u / u.norm()


def rmu_mask(side: dict[str, torch.Tensor], kind: str = "attention") -> torch.Tensor | None:
    """The (B, T) positions the RMU losses average over: "attention", "labels" or "none" (None: all)."""
    if kind not in RMU_MASKS:
        raise ValueError(f"rmu_mask={kind!r}: expected one of {RMU_MASKS}")
    if kind == "none":
        return None
    if kind == "labels":  # activations at position t, as open-unlearning pairs them: no shift
        return side["labels"] != IGNORE_INDEX
    return side["attention_mask"]


def _masked_token_mean(per_token: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean over sequences of the per-sequence mean over masked positions; None: a plain mean."""
    if mask is None:
        return per_token.mean()
    mask = mask.to(per_token.dtype)
    return ((per_token * mask).sum(dim=1) / mask.sum(dim=1).clamp_min(1)).mean()


def rmu_forget_loss(hidden: torch.Tensor, control: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Per-token MSE between layer activations (B, T, H) and control (H,), averaged per `rmu_mask`."""
    per_token = (hidden.float() - control.to(hidden.device)).pow(2).mean(dim=-1)  # (B, T)
    return _masked_token_mean(per_token, mask)


def rmu_retain_loss(hidden: torch.Tensor, ref_hidden: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Per-token MSE between the policy's and the frozen model's activations, averaged per `rmu_mask`."""
    per_token = (hidden.float() - ref_hidden.detach().float()).pow(2).mean(dim=-1)
    return _masked_token_mean(per_token, mask)


# ------------------------------------------------------------ open-unlearning's further forget losses
# By default each is a mean over sequences of a per-sequence mean over answer tokens (this file's
# convention). open-unlearning averages WGA, SatImp, CE-U and PDU's loss over the batch's answer tokens
# pooled together (a long answer weighs more): reduction="token" (the module's `token_reduction`) does
# that; with answers of equal length the two agree. "token" breaks the rule that k micro-batches each
# divided by k give one batch's gradient, as it does in open-unlearning's own accumulation.
# UNDIAL there takes every position (see undial_loss); here only answer positions.
TOKEN_REDUCTIONS = ("sequence", "token")


def _reduce(per_token: torch.Tensor, mask: torch.Tensor, reduction: str) -> torch.Tensor:
    """"sequence": mean per sequence, then over sequences; "token": one mean over the batch's masked positions."""
    if reduction not in TOKEN_REDUCTIONS:
        raise ValueError(f"token_reduction={reduction!r}: expected one of {TOKEN_REDUCTIONS}")
    if reduction == "token":
        mask = mask.to(per_token.dtype)
        return (per_token * mask).sum() / mask.sum().clamp_min(1)
    return _masked_token_mean(per_token, mask)


def _answer_logprobs(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Shifted log-softmax (B, T-1, V) in float32 or wider, the shifted labels made safe to gather, and the mask."""
    logits, shifted = _shift(logits, labels)
    mask = shifted != IGNORE_INDEX
    return F.log_softmax(_compute_dtype(logits), dim=-1), shifted.masked_fill(~mask, 0), mask


def wga_loss(
    logits: torch.Tensor, labels: torch.Tensor, beta: float = 1.0, reduction: str = "sequence"
) -> torch.Tensor:
    """WGA (Wang et al. 2025, weighted gradient ascent): minimise mean of w_t log p(y_t), w_t = p(y_t)^beta.

    The weight is held constant (no gradient through it): tokens the model already finds unlikely
    get little ascent, so the loss saturates instead of diverging as GA does.
    """
    logp, mask = token_logprobs(logits, labels)
    weight = logp.detach().exp() ** beta
    return _reduce(weight * logp, mask, reduction)


def satimp_loss(
    logits: torch.Tensor, labels: torch.Tensor, beta1: float = 5.0, beta2: float = 1.0, reduction: str = "sequence"
) -> torch.Tensor:
    """SatImp (Yang et al. 2025): WGA with w_t = p^beta1 (1 - p)^beta2, p = p(y_t) held constant.

    p^beta1 is the saturation weight (unlikely tokens get little ascent), (1 - p)^beta2 the importance
    weight (tokens already near certain get little too).
    """
    logp, mask = token_logprobs(logits, labels)
    p = logp.detach().exp()
    return _reduce(p**beta1 * (1.0 - p) ** beta2 * logp, mask, reduction)


def ceu_loss(
    logits: torch.Tensor, labels: torch.Tensor, ignore_first_n: int = 1, reduction: str = "sequence"
) -> torch.Tensor:
    """CE-U (Yang et al. 2025, arXiv 2503.01224): cross-entropy to the model's own distribution without y_t.

    The target at each answer position is softmax(logits) with the label's logit at -inf, held
    constant; the first `ignore_first_n` answer tokens of each sequence carry no loss (the paper's
    footnote: the first answer token is often forced by the prompt).
    """
    if ignore_first_n:
        answer = labels != IGNORE_INDEX
        labels = labels.masked_fill(answer & (answer.cumsum(dim=1) <= ignore_first_n), IGNORE_INDEX)
    logp, safe, mask = _answer_logprobs(logits, labels)
    with torch.no_grad():
        target = logp.detach().scatter(-1, safe.unsqueeze(-1), float("-inf")).softmax(dim=-1)
    return _reduce(-(target * logp).sum(dim=-1), mask, reduction)


def undial_loss(
    logits: torch.Tensor, ref_logits: torch.Tensor, labels: torch.Tensor, beta: float = 10.0
) -> torch.Tensor:
    """UNDIAL (Dong et al. 2025): cross-entropy to the reference's distribution with logit(y_t) lowered by beta.

    Self-distillation toward softmax(ref_logits - beta * onehot(y_t)) at the answer positions: bounded
    (a cross-entropy to a fixed target), unlike GA. open-unlearning takes every position, prompt and
    padding included; here only the answer positions (where y_t exists) count.
    """
    logp, safe, mask = _answer_logprobs(logits, labels)
    with torch.no_grad():
        ref = _compute_dtype(ref_logits[:, :-1, :])
        adjusted = ref.scatter_add(-1, safe.unsqueeze(-1), torch.full_like(safe, -beta, dtype=ref.dtype).unsqueeze(-1))
        target = adjusted.softmax(dim=-1)
    return _masked_token_mean(-(target * logp).sum(dim=-1), mask)


def dpo_loss_from_logprobs(
    logits_win: torch.Tensor, labels_win: torch.Tensor, ref_logp_win: torch.Tensor,
    logits_lose: torch.Tensor, labels_lose: torch.Tensor, ref_logp_lose: torch.Tensor, beta: float = 0.1,
) -> torch.Tensor:
    """DPO (Rafailov et al. 2023) as an unlearning loss: -(2/beta) mean log sigmoid(beta (r_win - r_lose)).

    r = log pi_theta(y|x) - log pi_ref(y|x) of whole sequences (sums over answer tokens); with the
    refusal answer as y_win and the forget answer as y_lose it is open-unlearning's IdkDPO. The 2/beta
    scale is theirs (NPO's), not the DPO paper's 1.
    """
    logp_win, _ = sequence_logprob(logits_win, labels_win)
    logp_lose, _ = sequence_logprob(logits_lose, labels_lose)
    margin = (logp_win - ref_logp_win.detach()) - (logp_lose - ref_logp_lose.detach())
    return -(2.0 / beta) * F.logsigmoid(beta * margin).mean()


def entropic_forget_loss(logits: torch.Tensor, labels: torch.Tensor, reduction: str = "sequence") -> torch.Tensor:
    """PDU's forget loss (open-unlearning pdu.py): (max_v z_t,v - mean_v z_t,v)^2 per position, pushed to 0.

    A flat logit row (max equal to mean) is the uniform next-token distribution: the loss drives the
    forget answers' positions towards maximum entropy instead of away from the answer. Positions:
    those whose label is an answer token, unshifted (open-unlearning pairs the mask with the logits
    at the same index, i.e. the logits that predict the token after each answer token).
    reduction="sequence": mean per sequence, then over sequences (ours: k micro-batches / k == one
    batch); "token": one mean over every masked position of the batch (open-unlearning).
    """
    z = _compute_dtype(logits)
    gap = (z.amax(dim=-1) - z.mean(dim=-1)).pow(2)  # (B, T)
    return _reduce(gap, labels != IGNORE_INDEX, reduction)
