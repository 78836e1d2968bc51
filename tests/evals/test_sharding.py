"""The batch sharding helpers in one process (the 2-process runs are in test_multiprocess.py)."""

from __future__ import annotations

import pytest

from blur_lightning.evals.sharding import gather_batch_results, lockstep, process_world, rank_batches
from blur_lightning.testing.tiny import tiny_llama


@pytest.mark.parametrize(
    ("n", "world", "pad", "want"),
    [
        (5, 2, False, [[0, 2, 4], [1, 3]]),
        (5, 2, True, [[0, 2, 4], [1, 3, None]]),  # FSDP2: the same count on every rank
        (1, 2, True, [[0], [None]]),  # a rank with no real batch still runs a dummy forward
        (0, 2, True, [[], []]),
        (4, 1, True, [[0, 1, 2, 3]]),
    ],
)
def test_rank_batches_cover_every_batch_once(n, world, pad, want):
    got = [rank_batches(list(range(n)), r, world, pad=pad) for r in range(world)]
    assert got == want
    assert sorted(b for shard in got for b in shard if b is not None) == list(range(n))


def test_one_process_is_the_identity():
    pairs = [([0, 2], "a"), ([1], "b")]
    assert process_world() == (0, 1)
    assert gather_batch_results(pairs) is pairs
    assert not lockstep(tiny_llama())
