"""Pairing forget with retain rows, the order of batches, and resuming mid-epoch.

The order of batches is a pure function of ``(seed, epoch)``; the train loader is resumable
mid-epoch (Lightning saves and restores its ``state_dict``), so a run resumed from any checkpoint
sees the same batches as an uninterrupted run.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
from lightning.pytorch.utilities import rank_zero_warn
from torch.utils.data import DataLoader, Dataset, DistributedSampler

__all__ = ["EncodedSet", "PairSampler", "PairedDataset", "ResumableDataLoader", "SingleSideDataset"]


class EncodedSet(Dataset):
    """A list of encoded rows as a map-style dataset."""

    def __init__(self, rows: Sequence[dict[str, Any]]) -> None:
        self.rows = list(rows)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.rows[index]


class PairedDataset(Dataset):
    """Indexed by ``(forget_index, retain_index)`` pairs, as :class:`PairSampler` yields them."""

    def __init__(self, forget: Sequence[dict[str, Any]], retain: Sequence[dict[str, Any]]) -> None:
        self.forget = list(forget)
        self.retain = list(retain)

    def __len__(self) -> int:
        return len(self.forget)

    def __getitem__(self, index: tuple[int, int]) -> dict[str, Any]:
        forget_index, retain_index = index
        forget = {**self.forget[forget_index], "example_index": forget_index}  # numbered: see PadCollator
        return {"forget": forget, "retain": self.retain[retain_index]}


class SingleSideDataset(PairedDataset):
    """One set, no pairing (fine-tuning): its rows set the epoch, as forget rows do in a pair, and come
    out numbered as the ``retain`` side: ``{"retain": row}``. The same sampler and resumable loader
    apply; the retain index the sampler pairs with each row is ignored."""

    def __init__(self, rows: Sequence[dict[str, Any]]) -> None:
        super().__init__(rows, rows[:1])

    def __getitem__(self, index: tuple[int, int]) -> dict[str, Any]:
        row_index, _ = index
        return {"retain": {**self.forget[row_index], "example_index": row_index}}


def _permutation(n: int, seed: int, stream: int, counter: int, shuffle: bool) -> np.ndarray:
    if not shuffle:
        return np.arange(n)
    # SeedSequence of (seed, stream, counter): independent streams, no arithmetic collisions.
    return np.random.default_rng([seed, stream, counter]).permutation(n)


class PairSampler(DistributedSampler):
    """Yields ``(forget_index, retain_index)`` pairs in an order that depends only on (seed, epoch).

    Forget order: a permutation of the forget rows per epoch (identity with ``shuffle=False``),
    padded by repetition to a multiple of ``num_replicas`` like ``DistributedSampler``; rank ``r``
    takes positions ``r, r + num_replicas, ...``. Retain order: the ``g``-th pair of the run
    (``g = epoch * total_size + position``) gets row ``g mod n_retain`` of the retain permutation of
    pass ``g // n_retain``. So a short retain set cycles, reshuffled on every pass, and a long one is
    walked through across epochs instead of restarting each epoch.

    It subclasses ``DistributedSampler`` so that Lightning keeps it (Lightning only replaces samplers
    that are not already distributed) and calls ``set_epoch`` on it every epoch.
    """

    def __init__(
        self,
        dataset: PairedDataset,
        *,
        shuffle: bool = True,
        seed: int = 0,
        num_replicas: int = 1,
        rank: int = 0,
        drop_last: bool = False,
    ) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed, drop_last=drop_last)
        self.n_forget = len(dataset.forget)
        self.n_retain = len(dataset.retain)
        self._skip = 0  # samples to skip on the next __iter__ only (mid-epoch resume)
        self._retain_perms: dict[int, np.ndarray] = {}

    def forget_order(self, epoch: int) -> list[int]:
        """All ranks' forget indices of ``epoch``, padded or trimmed to ``total_size``."""
        order = _permutation(self.n_forget, self.seed, 0, epoch, self.shuffle).tolist()
        if self.drop_last:
            return order[: self.total_size]
        while len(order) < self.total_size:
            order += order[: self.total_size - len(order)]
        return order

    def retain_index(self, position: int) -> int:
        """Retain row of the ``position``-th pair of the run (counted over all epochs and ranks)."""
        cycle, offset = divmod(position, self.n_retain)
        if cycle not in self._retain_perms:
            if len(self._retain_perms) > 4:  # an epoch spans few retain passes; keep memory flat
                self._retain_perms.clear()
            self._retain_perms[cycle] = _permutation(self.n_retain, self.seed, 1, cycle, self.shuffle)
        return int(self._retain_perms[cycle][offset])

    def skip_next(self, samples: int) -> None:
        """Make the next ``__iter__`` start ``samples`` into this rank's share of the epoch."""
        self._skip = samples

    def __iter__(self) -> Iterator[tuple[int, int]]:
        skip, self._skip = self._skip, 0
        order = self.forget_order(self.epoch)
        base = self.epoch * self.total_size
        positions = range(self.rank, self.total_size, self.num_replicas)
        return iter([(order[p], self.retain_index(base + p)) for p in positions[skip:]])

    def __len__(self) -> int:
        return self.num_samples


class ResumableDataLoader(DataLoader):
    """A ``DataLoader`` over a :class:`PairSampler` that can resume mid-epoch.

    Lightning (2.x) stores ``state_dict()`` of every train loader that has ``state_dict`` and
    ``load_state_dict`` in the checkpoint, and calls ``load_state_dict`` before iterating again when
    it restarts mid-epoch. The state is the epoch and how many batches were handed out in it; on
    resume the sampler starts that many batches in (indices only: no data is loaded for the skipped
    batches). ``len()`` stays the full epoch length, as Lightning expects.
    """

    def __init__(self, dataset: PairedDataset, *args: Any, **kwargs: Any) -> None:
        super().__init__(dataset, *args, **kwargs)
        self._epoch = 0
        self._yielded = 0
        self._pending: dict[str, int] | None = None

    @property
    def _pair_sampler(self) -> PairSampler:
        sampler = self.sampler
        if not isinstance(sampler, PairSampler):
            raise TypeError(f"ResumableDataLoader needs a PairSampler, got {type(sampler).__name__}")
        return sampler

    def _fingerprint(self) -> dict[str, int]:
        s = self._pair_sampler
        return {
            "seed": s.seed,
            "n_forget": s.n_forget,
            "n_retain": s.n_retain,
            "num_replicas": s.num_replicas,
            "batch_size": self.batch_size or 0,
            "shuffle": int(s.shuffle),
        }

    def state_dict(self) -> dict[str, int]:
        if self._pending is not None:
            return dict(self._pending)
        # Nothing handed out yet in this epoch: report the epoch Lightning set (0 batches either way).
        epoch = self._epoch if self._yielded else self._pair_sampler.epoch
        return {"epoch": epoch, "batches": self._yielded, **self._fingerprint()}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        expected = self._fingerprint()
        changed = {k: (state_dict.get(k), v) for k, v in expected.items() if state_dict.get(k) != v}
        if changed:
            rank_zero_warn(
                f"the training data changed since the checkpoint (saved, now): {changed}; the resumed "
                "epoch restarts from its first batch instead of continuing exactly"
            )
            self._pending = None
            return
        self._pending = dict(state_dict)

    def __iter__(self) -> Iterator[Any]:
        sampler = self._pair_sampler
        skip = 0
        if self._pending is not None:
            # A state of another epoch is stale (Lightning moved on, e.g. the checkpoint was taken
            # on the epoch's last batch): start that epoch from the top.
            if self._pending["epoch"] == sampler.epoch:
                skip = min(self._pending["batches"], len(self))
            self._pending = None
        self._epoch, self._yielded = sampler.epoch, skip
        sampler.skip_next(skip * (self.batch_size or 1))
        # Creating the base iterator here (on first next(), after Lightning's set_epoch) keeps the
        # epoch right even with worker processes, which prefetch indices as soon as they start.
        for batch in super().__iter__():
            self._yielded += 1
            yield batch
