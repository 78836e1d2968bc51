"""The open optimizer step: what lives across the micro-batches of one step, as one object.

With k = accumulate_grad_batches, an optimizer step spans k micro-batches. Between them the
module holds the forget gradients aside (the stash; the retain ones stay in `.grad`), the loss
sums for the step's logs, and how many micro-batches the window has seen. A checkpoint can fall
inside the window (a time-based ModelCheckpoint, a requeue signal), so the window saves and loads
itself: `state_dict` gives full CPU tensors by parameter name, and the distributed code
(`blur_lightning.distributed.fsdp`) turns the gradients into shards where a checkpoint is sharded.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class AccumulationWindow:
    """The micro-batches seen, the forget stash and the loss sums of the optimizer step in progress.

    Attributes:
        micro_step: micro-batches seen since the last optimizer step (0: no window is open).
        forget_stash: the forget gradient of each trainable parameter (None: none yet), aside while
            the retain backward writes `.grad`; None before the first forget backward of the window.
        loss_sums: each loss's sum over the window's micro-batches, already divided by k.
    """

    micro_step: int = 0
    forget_stash: list[torch.Tensor | None] | None = None
    loss_sums: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def is_open(self) -> bool:
        return self.micro_step > 0

    def add_loss(self, name: str, value: torch.Tensor) -> None:
        self.loss_sums[name] = self.loss_sums[name] + value if name in self.loss_sums else value

    def stash_for(self, n: int) -> list[torch.Tensor | None]:
        """The stash, or n Nones before the window's first forget backward."""
        return self.forget_stash if self.forget_stash is not None else [None] * n

    def close(self) -> None:
        """After the optimizer step: an empty window."""
        self.micro_step = 0
        self.forget_stash = None
        self.loss_sums = {}

    def state_dict(
        self, names: Sequence[str], retain_grads: Sequence[torch.Tensor | None]
    ) -> dict[str, Any]:
        """The open window as tensors by parameter name (`names`, in the stash's order), with the
        retain gradients (`.grad`, which the module owns). Tensors are returned as they are: the
        caller gathers or shards them for its checkpoint format."""
        stash = self.stash_for(len(names))
        return {
            "micro_step": self.micro_step,
            "loss_sums": {k: v.detach().cpu() for k, v in self.loss_sums.items()},
            "names": list(names),
            "forget": {n: g for n, g in zip(names, stash) if g is not None},
            "retain": {n: g for n, g in zip(names, retain_grads) if g is not None},
        }

    @staticmethod
    def check_names(state: dict[str, Any], names: Sequence[str]) -> None:
        """A saved window reopens only over the same trainable parameters, in the same order."""
        if list(names) != list(state["names"]):
            raise ValueError(
                "the checkpoint's open accumulation window is for different trainable parameters "
                f"({len(state['names'])} saved, {len(names)} now)"
            )

    def load_state_dict(
        self, state: dict[str, Any], names: Sequence[str], device: torch.device
    ) -> list[torch.Tensor | None]:
        """Reopen a saved window over the same trainable parameters (`names`); the forget gradients
        must already be on their devices (or shards). Returns the retain gradients in `names`'
        order, for the caller to put into `.grad`."""
        self.check_names(state, names)
        self.micro_step = int(state["micro_step"])
        self.loss_sums = {k: v.to(device) for k, v in state["loss_sums"].items()}
        self.forget_stash = [state["forget"].get(n) for n in names]
        return [state["retain"].get(n) for n in names]
