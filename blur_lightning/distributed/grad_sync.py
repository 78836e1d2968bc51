"""Which backward passes reduce their gradients across ranks: one per side per optimizer step, or every one.

With k micro-batches per optimizer step BLUR runs 2k backward passes (forget, retain, forget, ...).
DDP all-reduces and FSDP2 reduce-scatters after every backward it is not told to skip: 2k gradient
reductions per step. The update needs only each side's sum over the window, and the reduction is
a mean, which is linear: each rank can add up its own micro-batches and reduce the sum once, in the
window's last micro-batch (or the epoch's last, which may close a shorter window). That is
`gradient_sync="per_step"`: 2 reductions per step, one per side (the fine-tuner: 1), each one
all-reduce per DDP bucket or one reduce-scatter per fully_shard group; "per_micro_batch" reduces
after every backward (what DDP and FSDP2 do by default).

How each layout skips a reduction, and what it costs:

    layout        a skipped backward                                   extra memory
    one process   nothing to skip                                      -
    DDP           `require_backward_grad_sync` off (what `no_sync()`    none: .grad holds the local sums
                  sets): DDP's reducer leaves .grad to autograd         where it would hold the reduced ones
    FSDP2, HSDP   `set_requires_gradient_sync(False)` on the root       two UNSHARDED gradients per rank (one
                  (reduce-scatter and HSDP's all-reduce both off):      per side, in reduce_dtype when set)
                  FSDP2 adds the gradient into the unsharded            while the window is open: 8 bytes per
                  parameter's own                                       parameter in fp32, not divided by ranks
    FSDP1         not done: every backward reduces (a warning says so once)

DDP: `no_sync()` must enclose the forward too, or DDP's forward epilogue arms the reducer for the next
backward whatever the flag says then. Lightning's manual optimization runs training_step inside DDP's
forward with the flag off at the epilogue (`_DDPForwardRedirection`) and arms the reducer itself
before each backward (`manual_backward`, only while the flag is on), so setting the flag around each
backward is enough.

FSDP2 keeps the local sum in one place per parameter, which both sides would write. The forget
side's unsharded sums are therefore held here while the retain backward runs, and put back before
the next forget backward: the same pointer swap the module does with the sharded `.grad`, one
level down. Each side's reducing backward then reduce-scatters exactly its own k-micro-batch sum.

A checkpoint inside a window (`flush`) first reduces the local sums into the saved gradients, so a
checkpoint never holds rank-local values: DDP all-reduces `.grad` and the stash, FSDP2 reduces each
unsharded sum into its shard (a mean over the data-parallel ranks, as FSDP2's own). The later
micro-batches' local sums add onto those means, and the sums stay exact.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

GRADIENT_SYNC = ("per_step", "per_micro_batch")

_LOCAL, _DDP, _FSDP2, _EVERY = "local", "ddp", "fsdp2", "every"


def check_setting(gradient_sync: str) -> None:
    if gradient_sync not in GRADIENT_SYNC:
        raise ValueError(f"gradient_sync={gradient_sync!r}: expected one of {GRADIENT_SYNC}")


class GradientSync:
    """Which of a step's backward passes reduce their gradients, and the bookkeeping that makes skipping them exact.

    The module asks `reduces(closes_window)` once per micro-batch and runs each backward inside
    `backward(reduce=..., stashed=...)`; `stashed` marks the side whose gradients the module keeps
    aside between its backward passes (BLUR's forget side). `flush` reduces the pending local
    sums (before a checkpoint inside a window); `release` turns every reduction back on.

    Args:
        mode: "per_step" or "per_micro_batch" (see the module doc).
        accumulate: micro-batches per optimizer step (k); with k = 1 every backward reduces anyway.
    """

    def __init__(self, mode: str, accumulate: int) -> None:
        check_setting(mode)
        self.mode = mode
        self.accumulate = accumulate
        self._layout: str | None = None  # decided on the first backward of a fit
        self._ddp: Any = None  # DistributedDataParallel
        self._fsdp_root: Any = None  # the fully_shard-ed policy (an FSDPModule)
        self._fsdp_params: list[Any] = []  # FSDP2's FSDPParam of each trainable parameter, in module order
        self._fsdp_reducing: bool | None = None  # what set_requires_gradient_sync was last told
        # FSDP2: the stashed side's unsharded local sums, (grad, accumulated grad in reduce_dtype) per FSDPParam
        self._held: list[tuple[torch.Tensor | None, torch.Tensor | None]] | None = None
        self.pending = False  # local sums not reduced yet (a backward skipped its reduction)

    # ------------------------------------------------------------------ set-up
    def attach(self, strategy: Any, model: nn.Module) -> None:
        """Read the layout from the strategy and the model; once per fit, before the first backward."""
        from torch.nn.parallel import DistributedDataParallel

        from blur_lightning.distributed import fsdp as distributed

        self.detach()
        self._layout = _LOCAL
        if not self._skips():
            return
        wrapped = getattr(strategy, "model", None)
        if isinstance(wrapped, DistributedDataParallel):
            self._layout, self._ddp = _DDP, wrapped
        elif _is_fsdp2(model):
            self._layout, self._fsdp_root = _FSDP2, model
            self._fsdp_params = [fp for fp in _fsdp_params(model) if fp.sharded_param.requires_grad]
        elif distributed.is_fsdp1(strategy):
            self._layout = _EVERY
            warnings.warn(
                "gradient_sync='per_step' under FSDP1 (strategy='fsdp'): every backward still reduces its "
                "gradients (only DDP and FSDP2 skip the reductions of a window's earlier micro-batches)",
                RuntimeWarning,
                stacklevel=2,
            )

    @property
    def attached(self) -> bool:
        return self._layout is not None

    def _skips(self) -> bool:
        return self.mode == "per_step" and self.accumulate > 1

    def reduces(self, closes_window: bool) -> bool:
        """Whether this micro-batch's backward passes reduce their gradients."""
        return closes_window or not self._skips() or self._layout in (_LOCAL, _EVERY)

    # ------------------------------------------------------------------ one backward
    @contextmanager
    def backward(self, *, reduce: bool, stashed: bool = False) -> Iterator[None]:
        """Run one backward pass inside this, reducing its gradients across ranks or not.

        Args:
            reduce: from `reduces`; the window's last micro-batch reduces, the others accumulate locally.
            stashed: this side's gradients are kept aside by the module between its backward passes
                (BLUR's forget side; the retain side and the fine-tuner's stay in `.grad`).
        """
        if self._layout == _DDP:
            before, self._ddp.require_backward_grad_sync = self._ddp.require_backward_grad_sync, reduce
            try:  # manual_backward arms DDP's reducer only while the flag is on
                yield
            finally:
                self._ddp.require_backward_grad_sync = before
        elif self._layout == _FSDP2:
            if self._fsdp_reducing is not reduce:
                self._fsdp_root.set_requires_gradient_sync(reduce)
                self._fsdp_reducing = reduce
            others = self._swap_unsharded(self._held) if stashed else None
            try:
                yield
            finally:
                if stashed:
                    held = self._swap_unsharded(others)
                    self._held = None if all(g is None and a is None for g, a in held) else held
        else:
            yield
        self.pending = not reduce and self._layout in (_DDP, _FSDP2)

    def _swap_unsharded(self, incoming):
        """Put `incoming` (or nothing) into FSDP2's unsharded gradient slots; return what was there.

        FSDP2 adds a skipped backward's gradient into `_unsharded_param.grad`, or, when reduce_dtype
        differs from the compute dtype, into `unsharded_accumulated_grad` (torch 2.13,
        `FSDPParamGroup.post_backward`); the reducing backward reduce-scatters whichever is set.
        """
        out = []
        for i, fsdp_param in enumerate(self._fsdp_params):
            param = getattr(fsdp_param, "_unsharded_param", None)  # made on the first all-gather
            out.append((None if param is None else param.grad, fsdp_param.unsharded_accumulated_grad))
            grad, accumulated = incoming[i] if incoming is not None else (None, None)
            if param is not None:
                param.grad = grad
            elif grad is not None:
                raise RuntimeError("FSDP2 holds no unsharded parameter to put a held gradient back into")
            fsdp_param.unsharded_accumulated_grad = accumulated
        return out

    # ------------------------------------------------------------------ checkpoints, the end of a fit
    def flush(self, params: Sequence[nn.Parameter], stash: list[torch.Tensor | None] | None) -> list | None:
        """Reduce an open window's local sums into `.grad` and `stash` (a collective: every rank calls it).

        Args:
            params: the trainable parameters, in the stash's order.
            stash: the stashed side's gradients (BLUR's forget stash), or None where there is no
                stashed side (the fine-tuner).

        Returns:
            The stash to keep (a zero stands in where a side had no gradient yet).
        """
        if not self.pending:
            return stash
        sides = ("forget", "retain") if stash is not None else ("retain",)
        stash = list(stash) if stash is not None else None
        if self._layout == _DDP:
            group = self._ddp.process_group
            world = dist.get_world_size(group)
            for i, p in enumerate(params):
                for side in sides:
                    grad = stash[i] if side == "forget" else p.grad
                    if grad is None:  # every rank reduces every tensor, in the same order
                        grad = torch.zeros_like(p)
                    dist.all_reduce(grad, group=group)
                    grad.div_(world)
                    if side == "forget":
                        stash[i] = grad
                    else:
                        p.grad = grad
        elif self._layout == _FSDP2:
            index = {id(p): i for i, p in enumerate(params)}
            held = self._held or [(None, None)] * len(self._fsdp_params)
            retain = self._swap_unsharded(None)  # FSDP2's slots emptied: the sums move into the shards
            for fsdp_param, forget_local, retain_local in zip(self._fsdp_params, held, retain):
                p = fsdp_param.sharded_param
                i = index[id(p)]
                if stash is not None:
                    stash[i] = _add_reduced(stash[i], _local_sum(forget_local), fsdp_param)
                p.grad = _add_reduced(p.grad, _local_sum(retain_local), fsdp_param)
            self._held = None
        self.pending = False
        return stash

    def release(self) -> None:
        """Every backward reduces again (FSDP2's sync back on; DDP's flag comes back after each backward)."""
        if self._layout == _FSDP2 and self._fsdp_reducing is False:
            self._fsdp_root.set_requires_gradient_sync(True)
        self._fsdp_reducing = None
        self._held = None
        self.pending = False

    def detach(self) -> None:
        """Release, and read the layout again before the next backward (each fit wraps the model anew)."""
        self.release()
        self._layout, self._ddp, self._fsdp_root, self._fsdp_params = None, None, None, []


# --------------------------------------------------------------------------------------------
# FSDP2 internals (torch 2.13: torch/distributed/fsdp/_fully_shard)
# --------------------------------------------------------------------------------------------
def _is_fsdp2(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def _fsdp_params(root: nn.Module) -> list[Any]:
    """Every FSDPParam under the fully_shard-ed root, each once."""
    from torch.distributed.fsdp import FSDPModule

    out, seen = [], set()
    for module in root.modules():
        if not isinstance(module, FSDPModule):
            continue
        for group in module._get_fsdp_state()._fsdp_param_groups:
            for fsdp_param in group.fsdp_params:
                if id(fsdp_param) not in seen:
                    seen.add(id(fsdp_param))
                    out.append(fsdp_param)
    return out


def _local_sum(slots: tuple[torch.Tensor | None, torch.Tensor | None]) -> torch.Tensor | None:
    grad, accumulated = slots
    if accumulated is None:
        return grad
    return accumulated if grad is None else accumulated + grad


def _add_reduced(sharded_grad, local_sum: torch.Tensor | None, fsdp_param):
    """sharded_grad + this parameter's shard of the mean over the data-parallel ranks of `local_sum`.

    Every rank calls this for every trainable parameter in the same order (a zero stands in for a
    missing sum), as the reduction is a collective. The mean is taken over every mesh dimension,
    as FSDP2 does (reduce-scatter over the shard dim, all-reduce over HSDP's replicate dim).
    """
    from torch.distributed.tensor import DTensor, Partial, Replicate

    p = fsdp_param.sharded_param
    mesh, placements = p.device_mesh, tuple(p.placements)
    dtype = fsdp_param.reduce_dtype or p.dtype
    if local_sum is None:
        local_sum = torch.zeros(p.shape, dtype=dtype, device=p.device)
    partial = DTensor.from_local(local_sum.to(dtype), mesh, [Partial("avg")] * mesh.ndim, run_check=False)
    # Partial -> Replicate is an all-reduce per mesh dim, Replicate -> Shard a slice of it (rare: checkpoints only)
    mean = partial.redistribute(mesh, [Replicate()] * mesh.ndim).redistribute(mesh, placements).to_local()
    if sharded_grad is not None:
        sharded_grad.to_local().add_(mean)
        return sharded_grad
    # a tensor of its own, not a slice of the whole mean: the memory is freed, and a resumed run's
    # freshly allocated copy then sums in the same order (CPU reductions depend on the alignment)
    own = mean.to(p.dtype, copy=True)
    return DTensor.from_local(own, mesh, placements, run_check=False, shape=p.shape, stride=p.stride())
