"""Attention masks for the training forwards, chosen so that no forward reads the GPU back.

transformers (5.x) builds the attention mask of every forward on the host side, and on the SDPA
path it looks at the data to do so: with a 2D padding mask it checks whether the mask is all ones
(`fast_all`, to use SDPA's is_causal kernels), without one it checks position_ids for packed
sequences. Each check is a `.item()`-like read: on a GPU the CPU waits there until the stream has
drained, at every forward (3 per NPO step: forget, reference, retain).

Here the padding is noted on the host while the batch is still on the CPU: the collator of
`ForgetRetainDataModule` stores `"padded:attention_mask"` (a Python bool) beside each mask, and
`mark_padding` does the same for other CPU batches. For the duration of our own forward calls
the model's attention implementation is switched from "sdpa" to READ_FREE_SDPA: the same SDPA
function, registered without a mask function, so transformers builds no mask. We pass what it
would have built: nothing when there is no padding (SDPA's is_causal path), else the 4D boolean
causal-and-padding mask, built on the device. An unmarked mask (a user's own loader) always gets
the 4D mask: correct and read-free, but without SDPA's is_causal kernels.

The switch is only made for models whose every layer is full causal attention (no sliding window
shorter than the sequence, no local layers), and is undone after each call: evaluation and
generation outside the training step see the model exactly as loaded.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

READ_FREE_SDPA = "blur_read_free_sdpa"
PADDED_PREFIX = "padded:"  # side[PADDED_PREFIX + mask key]: a host bool, set before the transfer
_registered = False


def mark_padding(batch) -> None:
    """For every CPU attention mask in the (nested) batch dict, store whether it has padding.

    Reading a CPU tensor costs no device sync; masks already on a device are left unmarked.
    """
    if not isinstance(batch, dict):
        return
    for key, value in list(batch.items()):
        if isinstance(value, dict):
            mark_padding(value)
        elif key.endswith("attention_mask") and isinstance(value, torch.Tensor) and value.device.type == "cpu":
            batch[PADDED_PREFIX + key] = not bool(value.all())


def causal_padding_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, T) padding mask -> (B, 1, T, T) boolean SDPA mask: query i sees key j <= i that is not padding.

    Every query also sees itself, so a padding query (left padding) has no all-masked row, which
    would give NaN; its output is never used. Built on the mask's device, no host read. The same
    size as the mask transformers builds for a padded batch.
    """
    length = attention_mask.shape[-1]
    mask = _causal(length, attention_mask.device)[None, None] & attention_mask.bool()[:, None, None, :]
    mask.diagonal(dim1=-2, dim2=-1).fill_(True)
    return mask


_CAUSAL: dict[torch.device, torch.Tensor] = {}


def _causal(length: int, device: torch.device) -> torch.Tensor:
    """A (length, length) lower-triangular boolean view: the top-left block of one cached matrix per
    device (grown to the longest length seen), so a forward allocates only its (B, 1, T, T) mask."""
    cached = _CAUSAL.get(device)
    if cached is None or cached.shape[0] < length:
        cached = torch.ones(length, length, dtype=torch.bool, device=device).tril()
        _CAUSAL[device] = cached
    return cached[:length, :length]


def full_causal_attention(config, length: int) -> bool:
    """Whether every layer of the model attends causally to all earlier tokens at this length."""
    layer_types = getattr(config, "layer_types", None)
    if layer_types and any(t != "full_attention" for t in layer_types):
        return False
    window = getattr(config, "sliding_window", None)
    if window and getattr(config, "use_sliding_window", True) and window < length:
        return False
    return not getattr(config, "is_encoder_decoder", False)


def _register() -> None:
    global _registered
    if _registered:
        return
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    AttentionInterface.register(READ_FREE_SDPA, sdpa_attention_forward)
    _registered = True


def native_transformers_model(model: nn.Module) -> bool:
    """Whether the model (or the module a DDP/FSDP1 wrapper holds, or a peft model's base) is a class
    of transformers itself.

    Those dispatch attention through AttentionInterface at call time, so the switch reaches every
    layer; a remote-code model may pick its attention class once and expect another mask type.
    """
    for m in (model, getattr(model, "module", None)):
        # a peft model (LoRA) calls its base model, whose layers dispatch as the base's own
        base = m.get_base_model() if m is not None and hasattr(type(m), "get_base_model") else m
        if base is not None and any(c.__module__.startswith("transformers.models.") for c in type(base).__mro__):
            return True
    return False


@contextlib.contextmanager
def read_free_sdpa(model: nn.Module, length: int):
    """Within: the model's SDPA attention builds no mask (yields True), when that is safe; else
    the model is left as it is (yields False)."""
    config = getattr(model, "config", None)
    if (
        getattr(config, "_attn_implementation", None) != "sdpa"
        or not full_causal_attention(config, length)
        or not native_transformers_model(model)
    ):
        yield False
        return
    _register()
    config._attn_implementation = READ_FREE_SDPA
    try:
        yield True
    finally:
        config._attn_implementation = "sdpa"


def forward(model: nn.Module, side: dict, ids_key: str = "input_ids", mask_key: str = "attention_mask", **kwargs):
    """model(input_ids=side[ids_key], attention_mask=..., use_cache=False, **kwargs) with no host read
    on the SDPA path (see the module doc); eager and flash attention get the 2D mask as given."""
    input_ids = side[ids_key]
    mask = side.get(mask_key)
    with read_free_sdpa(model, input_ids.shape[-1]) as free:
        if free and mask is not None:
            mask = None if side.get(PADDED_PREFIX + mask_key) is False else causal_padding_mask(mask)
        return model(input_ids=input_ids, attention_mask=mask, use_cache=False, **kwargs)
