"""NPO's reference term, computed once: the frozen model's log-probability of each forget example.

NPO compares the policy's sequence log-probability of a forget example with the frozen reference
model's, log pi_ref(y|x). That reference is the model before its first update and never changes, so
its value is a constant per example: one float. Computed here at fit start (one no-grad pass over
the forget set, with the model about to be trained, in eval mode as the reference model is, through
the same read-free forward, collator and precision context as the training step) and looked up by
the batch's `example_index`, it replaces the frozen copy of the model altogether: one model of
memory, and one of the forwards of every NPO step (policy forget, reference forget, policy retain).

    resolve_npo_reference   "auto" | "model" | "cache" -> what a fit uses ("none" without NPO)
    ReferenceLogProbs       the table (N,) on the device; lookup by a batch's example_index
    prepare                 at fit start: restore the table from the checkpoint, or compute it

Under DDP and FSDP each rank computes a strided share of the examples (the same number of forwards
on every rank, as FSDP's all-gathers need) and one all-reduce gives every rank the whole table, so
whatever the sampler hands a rank, the values of its own examples are there. On resume the table
comes from the checkpoint: the weights restored by then are partly unlearned, and a table computed
from them would be a different reference (and a wrong NPO).

The reference code (open-unlearning, the authors' BLUR code) keeps a reference model and runs it on
every forget batch; the values are the same up to float rounding of a batch's padded width.
"""

from __future__ import annotations

import contextlib
import hashlib
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import nn

from blur_lightning.losses import functional as losses
from blur_lightning.losses import registry as loss_registry
from blur_lightning.models import attention

NPO_REFERENCE = ("auto", "model", "cache")
CHECKPOINT_KEY = "npo_reference_logprobs"
INDEX_KEY = "example_index"  # the forget side's (B,) int64 row numbers, set by the data module's collator


def forget_rows_of(datamodule: Any) -> list[dict] | None:
    """The data module's encoded forget rows, indexed as its batches' `example_index` (None if it has none)."""
    rows = getattr(datamodule, "forget_rows", None)
    return rows if rows and callable(getattr(datamodule, "collator", None)) else None


def check_setting(setting: str, forget_loss: str) -> None:
    """Refuse an unknown npo_reference, or "cache" with a forget loss that needs no reference log-probs."""
    if setting not in NPO_REFERENCE:
        raise ValueError(f"npo_reference={setting!r}: expected one of {NPO_REFERENCE}")
    cacheable = loss_registry.cacheable_forget_losses()
    if setting == "cache" and forget_loss not in cacheable:
        names = " or ".join(map(repr, cacheable))
        raise ValueError(f"npo_reference='cache' applies to forget_loss={names}, not {forget_loss!r}")


def resolve_npo_reference(setting: str, forget_loss: str, retain_loss: str, datamodule: Any) -> str:
    """Where a fit takes NPO's reference log-probs from: "model", "cache", or "none" (no NPO loss).

    "auto" picks the cache when nothing else needs the reference model (a retain "kl" or "rmu" does:
    they need its logits or hidden states; loss_registry.needs_model_outputs) and the data module
    can number its forget examples
    (ForgetRetainDataModule does; a user's own loader of ready batches cannot).

    Raises:
        ValueError: an unknown setting, or "cache" where it cannot apply.
    """
    check_setting(setting, forget_loss)
    if forget_loss not in loss_registry.cacheable_forget_losses():
        return "none"
    if setting == "model":
        return "model"
    numbered = forget_rows_of(datamodule) is not None
    if setting == "cache" and not numbered:
        raise ValueError(
            "npo_reference='cache' needs the forget examples at fit start: fit with a data module that has "
            "`forget_rows` and numbers its batches (ForgetRetainDataModule), or use npo_reference='model'"
        )
    if setting == "auto" and (loss_registry.needs_model_outputs(forget_loss, retain_loss) or not numbered):
        return "model"
    return "cache"


def fingerprint(rows: Sequence[dict]) -> str:
    """A digest of the forget rows' tokens and labels: a table is only valid for the rows it was made of."""
    digest = hashlib.sha256(str(len(rows)).encode())
    for row in rows:
        digest.update(torch.tensor(row["input_ids"], dtype=torch.int32).numpy().tobytes())
        digest.update(torch.tensor(row["labels"], dtype=torch.int32).numpy().tobytes())
    return digest.hexdigest()


class ReferenceLogProbs:
    """log pi_ref(y|x) per forget example, (N,) float32 on the device, and the rows' fingerprint."""

    def __init__(self, values: torch.Tensor, rows_fingerprint: str) -> None:
        self.values = values
        self.fingerprint = rows_fingerprint

    def lookup(self, side: dict[str, torch.Tensor]) -> torch.Tensor:
        """The (B,) reference log-probs of a forget batch: a device gather, no host read."""
        index = side.get(INDEX_KEY)
        if index is None:
            raise ValueError(
                f"npo_reference='cache': the forget batch has no {INDEX_KEY!r} (ForgetRetainDataModule's "
                "collator adds it); batches from another loader need npo_reference='model'"
            )
        return self.values[index]

    def state_dict(self) -> dict[str, Any]:
        return {"values": self.values.detach().cpu(), "fingerprint": self.fingerprint}

    @classmethod
    def from_state(cls, state: dict[str, Any], device: torch.device) -> ReferenceLogProbs:
        return cls(state["values"].to(device), state["fingerprint"])


def _share(n: int, replicas: int, rank: int) -> list[int]:
    """Rank `rank`'s rows r, r + W, ...; every rank gets ceil(n / W) (repeating its last, or row 0)."""
    mine = list(range(rank, n, replicas))
    per_rank = -(-n // replicas)
    return mine + [mine[-1] if mine else 0] * (per_rank - len(mine))


@torch.no_grad()
def compute_logprobs(
    model: nn.Module,
    rows: Sequence[dict],
    collate: Callable[[list[dict]], dict],
    *,
    batch_size: int,
    device: torch.device,
    replicas: int = 1,
    rank: int = 0,
    forward_context: Callable[[], Any] | None = None,
) -> torch.Tensor:
    """Sum of answer-token log-probs of every row under `model` in eval mode, (N,) float32 on `device`.

    Each rank runs the same number of forwards over its share; the shares are combined by one
    all-reduce (max over a table of -inf elsewhere: exact, and replicas of a rank agree) when a
    process group of more than one rank exists.
    """
    n = len(rows)
    share = _share(n, replicas, rank)
    values = torch.full((n,), float("-inf"), dtype=torch.float32, device=device)
    was_training = model.training
    model.eval()  # as the reference model: no dropout
    try:
        for start in range(0, len(share), batch_size):
            index = share[start : start + batch_size]
            side = collate([rows[i] for i in index])
            side = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in side.items()}
            with forward_context() if forward_context is not None else contextlib.nullcontext():
                logits = attention.forward(model, side).logits
            logp, _ = losses.sequence_logprob(logits, side["labels"])
            values[torch.tensor(index, device=device)] = logp.float()
    finally:
        model.train(was_training)
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(values, op=dist.ReduceOp.MAX)
    return values


def prepare(
    model: nn.Module, trainer: Any, existing: ReferenceLogProbs | None, saved: dict[str, Any] | None
) -> ReferenceLogProbs:
    """The table for this fit: the checkpoint's (on resume), this module's own (a second fit on the
    same rows), or computed now from `model`, which must not have been updated yet.

    Args:
        model: the policy, before its first update (unless a table is saved or existing).
        trainer: gives the data module (forget rows, collator, batch size), the device, whether the
            fit resumes (its restored weights are no reference), the ranks (distributed sampler
            kwargs) and the training step's precision context.
        existing: the table of an earlier fit of the same module, if any.
        saved: the checkpoint's entry (`CHECKPOINT_KEY`), if resuming from one that has it.

    Raises:
        ValueError: a resume from a checkpoint without a table, rows that differ from those a
            saved or existing table was made of (a table cannot be recomputed once the model has
            moved), or a value that is not finite.
    """
    datamodule, device = trainer.datamodule, trainer.strategy.root_device
    resuming = trainer.ckpt_path is not None
    rows = forget_rows_of(datamodule)
    if rows is None:
        raise ValueError("npo_reference='cache': the data module has no forget rows")
    digest = fingerprint(rows)
    if resuming and saved is None and existing is None:
        raise ValueError(
            f"npo_reference='cache': the checkpoint has no {CHECKPOINT_KEY!r} (saved with npo_reference="
            "'model', or before the cache existed), and the restored weights are no reference: resume "
            "it with npo_reference='model'"
        )
    for found, where in ((saved, "the checkpoint"), (existing, "this module's earlier fit")):
        if found is None:
            continue
        found_digest = found["fingerprint"] if isinstance(found, dict) else found.fingerprint
        if found_digest != digest:
            raise ValueError(
                f"npo_reference='cache': the forget rows differ from those whose reference log-probs "
                f"{where} holds, and the model has been updated since, so they cannot be recomputed: "
                "use the same forget data, or npo_reference='model'"
            )
        if isinstance(found, dict):
            rank_zero_info(f"NPO reference: {len(rows)} cached log-probs restored from the checkpoint")
            return ReferenceLogProbs.from_state(found, device)
        return found
    sampler_kwargs = trainer.distributed_sampler_kwargs or {}
    replicas, rank = int(sampler_kwargs.get("num_replicas", 1)), int(sampler_kwargs.get("rank", 0))
    batch_size = int(getattr(datamodule, "batch_size", None) or 8)
    start = time.perf_counter()
    values = compute_logprobs(
        model, rows, datamodule.collator(), batch_size=batch_size, device=device,
        replicas=replicas, rank=rank, forward_context=trainer.precision_plugin.train_step_context,
    )
    finite = torch.isfinite(values)
    if not bool(finite.all()):  # read once, at fit start
        bad = int((~finite).nonzero()[0, 0])
        raise ValueError(
            f"npo_reference='cache': the reference log-prob of forget example {bad} is {values[bad].item()} "
            "(the model gives its answer probability 0, or has NaN weights)"
        )
    per_rank = -(-len(rows) // replicas)
    rank_zero_info(
        f"NPO reference: log-probs of {len(rows)} forget examples from the model before its first update "
        f"({-(-per_rank // batch_size)} no-grad batches of <= {batch_size} on each of {replicas} rank(s)) "
        f"in {time.perf_counter() - start:.1f} s; no reference model is kept"
    )
    return ReferenceLogProbs(values, digest)
