"""The authors' way of computing the BLUR direction, kept for comparison (benchmarks and tests).

It lives outside the training path on purpose: its per-parameter `.item()` calls are the habit
this package replaces.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def authors_projection(
    forget_grads: Sequence[torch.Tensor],
    retain_grads: Sequence[torch.Tensor],
    *,
    gamma: float,
    eps: float = 1e-12,
) -> list[torch.Tensor]:
    """forget_lower the way the paper's code does it: the `reference` provider of the benchmark.

    Clones both gradients, one Python loop with three `.item()` host syncs per parameter, the
    coefficient as a host float, and a new tensor for each d (the caller would assign it to .grad).
    Kept here so the benchmark measures the habit we replace, not a straw man of our own making.
    """
    forget = [f.detach().clone() for f in forget_grads]
    retain = [r.detach().clone() for r in retain_grads]
    s_rf = s_ff = s_rr = 0.0
    for f, r in zip(forget, retain):
        s_rf += (r * f).sum().item()
        s_ff += (f * f).sum().item()
        s_rr += (r * r).sum().item()  # logged as ||g_r|| in their code; we report it too
    forget_coef = gamma - s_rf / s_ff if s_ff > eps else 0.0
    directions = []
    while retain:  # free each clone once its d exists: the peak stays at two copies, not three
        r, f = retain.pop(0), forget.pop(0)
        directions.append(r + forget_coef * f)
    return directions
