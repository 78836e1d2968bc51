"""Where a causal LM keeps its transformer blocks: the unit of sharding (FSDP), wrapping (FSDP1) and
activation checkpointing."""

from __future__ import annotations

from torch import nn


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The transformer blocks: HF's `_no_split_modules` classes, else the largest ModuleList's items."""
    names = set(getattr(model, "_no_split_modules", None) or ())
    layers = [m for m in model.modules() if type(m).__name__ in names]
    if layers:
        return layers
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList)]
    return list(max(lists, key=len)) if lists else []
