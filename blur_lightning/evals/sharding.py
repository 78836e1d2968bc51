"""Evaluation across processes: each rank scores its share of the batches, every rank gets all results.

Under DDP and FSDP2 every rank holds the same evaluation rows. :mod:`blur_lightning.evals.scoring`
cuts them into length-sorted batches exactly as one process does, gives rank ``r`` the batches
``r, r + W, r + 2W, ...`` (W = world size), and gathers the per-batch results with
``all_gather_object`` (outside the training step: a few KB of floats and strings per batch), so
every rank reassembles the results in the input order and computes the same aggregates. Batches
keep their one-process composition, hence their padding: the numbers are those of one process,
bit for bit on CPU.

FSDP2 all-gathers parameters inside the forward, so every rank must run the same number of
forwards. With a sharded model (DTensor parameters) the ranks' batch lists are padded to equal
length with dummy batches (a repeat of the first batch, its result dropped), and ``generate`` runs
with ``synced_gpus=True`` (transformers' own switch for ZeRO-3 / FSDP: a rank whose sequences have
all stopped keeps stepping until every rank has), so the decoding steps match too. A DDP replica
needs neither: its forward has no collective.

This file knows nothing of benchmarks; it only needs ``torch.distributed``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, TypeVar

import torch
import torch.distributed as dist

__all__ = ["GATHERED", "gather_batch_results", "is_sharded", "lockstep", "process_world", "rank_batches"]

T = TypeVar("T")

# Keywords for the torchmetrics classes of metric_classes.py fed with scoring's results: those are
# already every rank's examples, and compute()'s own cross-rank "cat" would count each one W times
# (a TOFU forget set of 4 held 8 truth ratios on 2 ranks, and the KS test saw every sample twice).
GATHERED: dict[str, Any] = {"sync_on_compute": False}


def process_world() -> tuple[int, int]:
    """(rank, world size) of the default process group; (0, 1) when none is initialized."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_sharded(model: torch.nn.Module) -> bool:
    """Whether any parameter is a DTensor (FSDP2 / HSDP): its forward then holds collectives."""
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())


def lockstep(model: torch.nn.Module) -> bool:
    """Whether every rank must run the same forwards: several processes and a sharded model."""
    return process_world()[1] > 1 and is_sharded(model)


def rank_batches(batches: Sequence[T], rank: int, world_size: int, *, pad: bool) -> list[T | None]:
    """This rank's batches, ``batches[rank::world_size]``; with ``pad``, padded with None (a dummy
    batch to run and drop) to ``ceil(len(batches) / world_size)``, the same count on every rank."""
    mine: list[T | None] = list(batches[rank::world_size])
    if pad:
        mine += [None] * (-(-len(batches) // world_size) - len(mine))
    return mine


def gather_batch_results(local: list[tuple[list[int], Any]]) -> list[tuple[list[int], Any]]:
    """Every rank's ``(row indices, result)`` pairs, on every rank (the local list in one process).

    Args:
        local: this rank's pairs; results must be picklable (CPU tensors, lists, strings).
    """
    _, world_size = process_world()
    if world_size == 1:
        return local
    gathered: list[list[tuple[list[int], Any]] | None] = [None] * world_size
    dist.all_gather_object(gathered, local)
    return [pair for part in gathered for pair in (part or [])]
