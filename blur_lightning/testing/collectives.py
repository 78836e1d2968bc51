"""Count the collectives a piece of code issues, gradient-sized ones apart, from torch's profiler.

DDP's reducer calls its process group from C++ (inside autograd), so wrapping `torch.distributed`'s
Python functions would miss it; the profiler sees every collective at the backend's own level
(`gloo:all_reduce`, `nccl:all_reduce`, `nccl:_reduce_scatter_base`, ...), whoever called it, with
the size of its tensor:

    with CollectiveCounter() as comms:
        module.manual_backward(loss)
    comms.gradient      # all-reduces and reduce-scatters of more than SCALAR_NUMEL elements

Gloo has no reduce-scatter of its own: torch runs FSDP2's as one all-reduce of the whole input,
seen once here. What is left out of `gradient`: the BLUR projection's all-reduce of its 3 sums,
the one-byte finiteness vote, FSDP2's all-gathers and DDP's buffer broadcasts (`kinds` has them all).
"""

from __future__ import annotations

import math
import re
from collections import Counter

import torch

SCALAR_NUMEL = 8  # the projection's sums are 3 values, the finiteness vote 1: no gradient is this small here
_BACKEND_EVENT = re.compile(r"^(gloo|nccl|mpi|ucc|xccl):(\w+)$")
_REDUCTIONS = ("all_reduce", "reduce_scatter")


class CollectiveCounter:
    """A context manager: the collectives issued inside it, by backend op, and the gradient-sized reductions.

    Attributes (after exit):
        kinds: Counter of backend op names ("all_reduce", "broadcast", "allgather", ...).
        gradient: reductions (all-reduce, reduce-scatter) of more than SCALAR_NUMEL elements.
        gradient_numel: the elements those reductions carried, summed.
    """

    def __init__(self) -> None:
        self.kinds: Counter[str] = Counter()
        self.gradient = 0
        self.gradient_numel = 0
        self._profiler: torch.profiler.profile | None = None

    def __enter__(self) -> CollectiveCounter:
        self._profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True)
        self._profiler.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        assert self._profiler is not None
        self._profiler.__exit__(*exc)
        for event in self._profiler.events():
            match = _BACKEND_EVENT.match(event.name)
            if match is None:
                continue
            op = match.group(2)
            self.kinds[op] += 1
            shapes = [s for s in (event.input_shapes or []) if s]
            numel = sum(math.prod(s) for s in shapes)
            if any(r in op for r in _REDUCTIONS) and numel > SCALAR_NUMEL:
                self.gradient += 1
                self.gradient_numel += numel
        self._profiler = None
