"""Activation checkpointing per decoder layer (non-reentrant), the same for one device, DDP and FSDP2.

Each decoder layer keeps only its inputs through the forward and recomputes its activations in the
backward: autograd holds about one (B, T, H) tensor per layer instead of every intermediate (for
Llama ~16 (B, T, H)-sized tensors and the (B, heads, T, T) attention weights per layer), for one
extra forward of each layer per backward. BLUR's step runs two backwards (forget, retain), each
recomputing its own forward.

torch's composable `checkpoint` is used (hooks on the layer, no wrapper module): parameter names,
state dicts and checkpoints are the same with and without it. Under FSDP2 it is applied before
`fully_shard`, the order torch composes them in: in the recompute FSDP2 is in its pre-backward
state, the layer is already gathered and is neither gathered nor freed again.

Non-reentrant checkpointing follows autograd into the layer's parameters whether or not the
layer's input requires grad, so LoRA adapters in frozen layers get their gradients without
`enable_input_require_grads` (the reentrant variant would silently drop them: the "LoRA not
trained under gradient checkpointing" failure).
"""

from __future__ import annotations

from torch import nn

from blur_lightning.models.layers import decoder_layers

_MARK = "_blur_activation_checkpointing"


def enable(model: nn.Module) -> int:
    """Checkpoint every decoder layer of model (idempotent); returns how many layers are checkpointed.

    Raises:
        ValueError: the model has no recognizable decoder layers.
    """
    from torch.distributed._composable import checkpoint

    layers = decoder_layers(model)
    if not layers:
        raise ValueError(
            f"activation_checkpointing=True: found no decoder layers in {type(model).__name__} (neither "
            "`_no_split_modules` classes nor a ModuleList)"
        )
    for layer in layers:
        if not getattr(layer, _MARK, False):
            checkpoint(layer)
            setattr(layer, _MARK, True)
    return len(layers)


def is_enabled(model: nn.Module) -> bool:
    """Whether every decoder layer of model is checkpointed."""
    layers = decoder_layers(model)
    return bool(layers) and all(getattr(layer, _MARK, False) for layer in layers)
