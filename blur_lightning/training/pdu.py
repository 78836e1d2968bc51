"""PDU's multiplier: the retain weight lambda of mode "pdu", moved by dual ascent on the retain loss.

open-unlearning's primal-dual unlearning (Entesari et al. 2025, "Constrained Entropic Unlearning")
minimises the forget loss subject to L_retain <= eps. Its Lagrangian gamma L_f + lambda (L_r - eps)
gives the step direction gamma g_f + lambda g_r (core/projection.py, mode "pdu"), and after each
step the multiplier follows the constraint's violation:

    lambda <- max(0, lambda + dual_step_size * (L_r - eps))

with L_r the retain loss of the step just taken, i.e. computed before its parameter update: step t
uses lambda_t and then sets lambda_{t+1} from its own L_r, as open-unlearning does (its compute_loss
scales the loss by the current lambda, then moves lambda with the same L_r).

Where ours differs, on purpose:
- One update per optimizer step, from L_r averaged over the accumulation window and over ranks
  (mean_over_ranks), so every rank holds the same lambda and a run's lambda does not depend on how
  the batch is split. open-unlearning moves lambda inside compute_loss, i.e. once per micro-batch
  (gradient_accumulation_steps times a step, the later micro-batches of a window scaled by a newer
  lambda) and on each rank from its own micro-batch's loss (its ranks' lambdas drift apart). Its
  TOFU run (8 GPUs x batch 4 x accumulation 4; 50 rows a rank an epoch) makes 13 dual updates an
  epoch per rank: the count to match when translating dual_step_size.
- The warm-up counts optimizer steps (`pdu_dual_warmup_steps`) like our schedules' totals, not
  epochs (open-unlearning's dual_warmup_epochs: no update until that many epochs have ended);
  epochs x steps an epoch gives the same point. open-unlearning's other option, one update per epoch
  from the retain loss over the whole retain set in eval mode, is not offered.
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
