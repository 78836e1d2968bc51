"""PDU's multiplier: the retain weight lambda of mode "pdu", moved by dual ascent on the retain loss.

open-unlearning's primal-dual unlearning (Entesari et al. 2025, "Constrained Entropic Unlearning")
minimises the forget loss subject to L_retain <= eps. Its Lagrangian gamma L_f + lambda (L_r - eps)
gives the step direction gamma g_f + lambda g_r (core/projection.py, mode "pdu"), and after each
step the multiplier follows the constraint's violation:

    lambda <- max(0, lambda + dual_step_size * (L_r - eps))

with L_r the retain loss of the step just taken (computed before its update, as open-unlearning's
trainer does, which updates inside the loss of the same step). Our L_r is the step's mean over its
accumulation window and over ranks, so every rank holds the same lambda. open-unlearning counts
its warm-up in epochs (dual_warmup_epochs, 5 in its PDU config) and also offers a once-per-epoch
update over the whole retain set; ours counts optimizer steps (`pdu_dual_warmup_steps`) and
updates per step only.
"""

from __future__ import annotations

import torch


def dual_update(
    lam: torch.Tensor, retain_loss: torch.Tensor, *, retain_eps: float, step_size: float, finite: torch.Tensor
) -> torch.Tensor:
    """max(0, lam + step_size * (retain_loss - retain_eps)), or lam on a skipped (non-finite) step. No host read."""
    moved = (lam + step_size * (retain_loss.to(lam.dtype) - retain_eps)).clamp_min(0.0)
    return torch.where(finite, moved, lam)


def mean_over_ranks(value: torch.Tensor) -> torch.Tensor:
    """The mean of a 0-dim tensor over every rank (each rank's data differs under DDP, FSDP and HSDP)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return value
    total = value.detach().clone()
    dist.all_reduce(total, op=dist.ReduceOp.SUM)  # gloo has no AVG
    return total / dist.get_world_size()


def check_settings(mode: str, retain_eps: float | None, step_size: float, warmup_steps: int) -> None:
    """Refuse what PDU cannot run with, naming the setting."""
    if mode != "pdu":
        return
    if retain_eps is None:
        raise ValueError("mode='pdu' needs pdu_retain_eps: the retain loss level the constraint keeps (L_r <= eps)")
    if not step_size >= 0:
        raise ValueError(f"pdu_dual_step_size={step_size!r}: expected a number >= 0")
    if warmup_steps < 0:
        raise ValueError(f"pdu_dual_warmup_steps={warmup_steps!r}: expected an integer >= 0")
