"""What a distributed set-up tells the training module: the interface between the module and the strategy code.

CausalLMModule (training/base.py) declares `strategy_hooks: StrategyHooks` (all None: one process, or
DDP, which needs nothing); `blur_lightning.distributed.fsdp.install_hooks` fills it for FSDP2, HSDP and FSDP1 when the
model is sharded (docs/FSDP.md, "The module's strategy hooks"). The module calls a hook where one
is set and its single-process behaviour otherwise; nothing is looked up by name.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass
class StrategyHooks:
    """The two places where a sharded model needs more than one process's logic.

    Attributes:
        projection_group: (module, strategy) -> the process group(s) the projection's three sums
            are all-reduced over, or None for no reduction. None: no reduction (one process, DDP).
        export: (module, export_dir) -> None, gathering full weights (a collective on every rank)
            and saving them from rank 0. None: save_pretrained of the local model on rank 0.
    """

    projection_group: Callable[[Any, Any], Any] | None = None
    export: Callable[[Any, str], None] | None = None
