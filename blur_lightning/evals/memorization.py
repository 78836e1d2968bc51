"""Memorization metrics as pure functions: exact memorization and extraction strength, per example.

Both read one teacher-forced forward: at each scored position, whether the model's argmax equals the
label (``hits``). Definitions, as open-unlearning computes them (``src/evals/metrics/memorization.py``
on ``tokenwise_vocab_logprobs``):

* Exact memorization (Tirumala et al. 2022): EM = (number of hits) / n over the n answer tokens.
* Extraction strength (Carlini et al. 2021, Schwarzschild et al. 2024): ES = 1 - k / n, with k the
  smallest prefix length such that the argmax predictions reproduce the whole remaining suffix
  ``labels[k:]``. With r the length of the trailing run of hits, k = n - r.
  open-unlearning's loop tries k = 0 .. n - 1 only, so a row whose last token is missed still gets
  k = n - 1, ES = 1 / n instead of 0: ``no_match="open-unlearning"`` (the default) keeps that,
  ``no_match="zero"`` gives 0.

open-unlearning scores the labelled tokens but the last one (its ``[:-1]``: "ignore eos prediction");
:func:`drop_last_scored` removes that position from a mask, and the benchmarks use it for these two
metrics (option ``drop_last_token``). An example with no scored token gives NaN (open-unlearning:
EM None, ES 0; the benchmarks' answers always have one).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor

__all__ = ["NoMatch", "drop_last_scored", "exact_memorization", "extraction_strength", "trailing_hits"]

NoMatch = Literal["open-unlearning", "zero"]


def drop_last_scored(mask: Tensor) -> Tensor:
    """The mask without each row's last true position (open-unlearning leaves out the eos prediction).

    Args:
        mask: (B, T) bool, true on scored positions.

    Returns:
        (B, T) bool copy; a row with one scored position becomes empty.
    """
    mask = mask.bool()
    positions = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
    last = torch.where(mask, positions, torch.full_like(positions, -1)).max(dim=1).values  # (B,)
    return mask & (positions != last[:, None])


def trailing_hits(hits: Tensor, mask: Tensor) -> Tensor:
    """Length of the run of hits that ends at each row's last scored position, (B,) int64.

    Args:
        hits: (B, T) bool, argmax == label (any value where not scored).
        mask: (B, T) bool, true on scored positions (contiguous or not: only scored positions count).
    """
    mask = mask.bool()
    # a miss at a scored position ends the run; count the scored positions after the last miss
    miss = mask & ~hits.bool()
    positions = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
    last_miss = torch.where(miss, positions, torch.full_like(positions, -1)).max(dim=1).values  # (B,)
    return (mask & (positions > last_miss[:, None])).sum(dim=1)


def exact_memorization(hits: Tensor, mask: Tensor) -> Tensor:
    """Exact memorization per example: the fraction of scored tokens whose argmax is the label.

    Args:
        hits: (B, T) bool, argmax == label.
        mask: (B, T) bool, true on scored positions.

    Returns:
        (B,) float64 in [0, 1]; NaN for a row with no scored token.
    """
    mask = mask.bool()
    n = mask.sum(dim=1).double()
    em = (hits.bool() & mask).sum(dim=1).double() / n
    return em.masked_fill(n == 0, math.nan)


def extraction_strength(hits: Tensor, mask: Tensor, no_match: NoMatch = "open-unlearning") -> Tensor:
    """Extraction strength per example: 1 - k / n, k the shortest prefix after which greedy
    teacher-forced predictions reproduce the rest of the answer (module docstring).

    Args:
        hits: (B, T) bool, argmax == label.
        mask: (B, T) bool, true on scored positions.
        no_match: when even the last token is missed: "open-unlearning" (k = n - 1, ES = 1 / n, its
            loop's result) or "zero" (k = n, ES = 0).

    Returns:
        (B,) float64 in [0, 1]; NaN for a row with no scored token.
    """
    if no_match not in ("open-unlearning", "zero"):
        raise ValueError(f"no_match must be 'open-unlearning' or 'zero', got {no_match!r}")
    n = mask.bool().sum(dim=1).double()
    run = trailing_hits(hits, mask).double()
    if no_match == "open-unlearning":
        run = run.clamp_min(1.0)
    es = run / n  # 1 - (n - run) / n
    return es.masked_fill(n == 0, math.nan)
