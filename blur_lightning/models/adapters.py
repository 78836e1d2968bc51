"""LoRA adapters through `peft`: adding them, the reference as the adapters switched off, export.

With adapters the BLUR step trains only the low-rank matrices (A: r x in, B: out x r per target
projection): the projection's three sums run over them, the optimizer holds state for them, and
the base weights stay frozen. A loss that needs the frozen model (NPO, KL, RMU) gets the same
model with its adapters disabled (peft's `disable_adapter()`): no second copy of the weights.

Export writes two things: the merged model (W + (alpha / r) B A folded into each target weight,
a plain transformers model that `AutoModelForCausalLM.from_pretrained` loads) and, in its
`adapter/` subdirectory, the adapter alone (`PeftModel.from_pretrained(base, that_dir)`).

`peft` is an optional dependency (the `lora` extra): importing this file does not need it; adding
adapters does, and says how to install it.
"""

from __future__ import annotations

import contextlib
import copy
import os
import shutil
import sys
import tempfile
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

ADAPTER_SUBDIR = "adapter"  # the adapter alone, inside the merged export
# Adapters start from this seed whatever the global RNG: every rank, and a resumed run's
# configure_model, build the same A (B starts at zero, so the adapted model equals the base).
INIT_SEED = 0
_INSTALL_HINT = "pip install 'blur-lightning[lora]' (or: pip install peft)"


def _peft():
    try:
        import peft
    except ImportError as err:
        raise ModuleNotFoundError(f"LoRA adapters (lora_rank > 0) need the 'peft' package: {_INSTALL_HINT}") from err
    return peft


def check_settings(rank: int | None, alpha: float, dropout: float, target_modules: Any) -> None:
    """Refuse bad LoRA settings with the field's name (rank None or 0: no adapters, nothing else checked)."""
    if rank is None or rank == 0:
        return
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 0:
        raise ValueError(f"lora_rank={rank!r}: expected an int >= 1 (None or 0: no adapters)")
    if not alpha > 0:  # also refuses NaN
        raise ValueError(f"lora_alpha={alpha!r}: expected a number > 0 (the update is scaled by alpha / rank)")
    if not 0 <= dropout < 1:
        raise ValueError(f"lora_dropout={dropout!r}: expected a probability in [0, 1)")
    ok = target_modules is None or isinstance(target_modules, str) or (
        isinstance(target_modules, Sequence) and target_modules and all(isinstance(t, str) for t in target_modules)
    )
    if not ok:
        raise ValueError(
            f"lora_target_modules={target_modules!r}: expected None (peft's default for the architecture), "
            "'all-linear', or a non-empty list of module names such as ['q_proj', 'v_proj']"
        )


def has_adapters(model: nn.Module | None) -> bool:
    """Whether model is a peft model (its base weights frozen, adapters trained)."""
    peft = sys.modules.get("peft")  # not imported: no peft model can exist
    return peft is not None and model is not None and isinstance(model, peft.PeftModel)


def add_lora(
    model: nn.Module, rank: int, alpha: float, dropout: float = 0.0, target_modules: Sequence[str] | str | None = None
) -> nn.Module:
    """The model with LoRA adapters (peft's `get_peft_model`); a model that has them already is returned as is.

    Args:
        model: a transformers causal LM (on any device, the meta device included).
        rank: r, the adapters' inner dimension.
        alpha: the update is scaled by alpha / r.
        dropout: dropout on the adapters' input (training mode only).
        target_modules: module names to adapt; None takes peft's default for the architecture
            (q_proj and v_proj for Llama), "all-linear" every linear layer but the output head.

    Returns:
        A `peft.PeftModel` whose only trainable parameters are the adapters.
    """
    if has_adapters(model):
        return model
    peft = _peft()
    target = list(target_modules) if target_modules is not None and not isinstance(target_modules, str) else (
        target_modules
    )
    config = peft.LoraConfig(
        r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=target, bias="none", task_type="CAUSAL_LM"
    )
    with torch.random.fork_rng(devices=[]):  # peft initializes A on the CPU, then moves it to the base's device
        torch.manual_seed(INIT_SEED)
        try:
            with warnings.catch_warnings():  # peft asks the model a deprecated transformers question
                warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.* is deprecated")
                return peft.get_peft_model(model, config)
        except ValueError as err:  # e.g. no module matches target_modules
            raise ValueError(f"lora_target_modules={target_modules!r}: {err}") from err


def is_adapter_parameter(name: str) -> bool:
    """Whether a parameter name (of a peft model) belongs to a LoRA adapter."""
    return "lora_" in name


@contextlib.contextmanager
def disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Within: the model computes as its base (adapters off, eval mode, no grad), as a frozen copy would.

    peft's `disable_adapter()` also sets requires_grad on the adapters (off, then on for all of them);
    the flags are put back as they were, so a `trainable_params` subset stays the subset. The modules'
    train/eval flags are put back too (a frozen reference runs in eval mode: no dropout).
    """
    requires_grad = [(p, p.requires_grad) for p in model.parameters()]
    training = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with torch.no_grad(), model.disable_adapter():
            yield model
    finally:
        for p, flag in requires_grad:
            p.requires_grad_(flag)
        for m, flag in training:
            m.training = flag


def cpu_copy(model: nn.Module, state: dict[str, torch.Tensor] | None = None) -> nn.Module:
    """A CPU copy of a peft model (eval mode), for export; the live model is left untouched.

    Merging the live model in place and back would not restore its weights bit for bit. The copy
    is built on the meta device and takes the given tensors: no random init runs and only one CPU
    copy of the weights is made.

    Args:
        model: the trained peft model (its own weights are read when state is None).
        state: its full state dict on the CPU (under FSDP2: gathered first), or None.
    """
    peft = _peft()
    from transformers import AutoModelForCausalLM

    if state is None:
        state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
    # Non-persistent buffers (rotary inv_freq) are not in a state dict: taken from the live model.
    buffers = {k: b.detach().to("cpu", copy=True) for k, b in model.named_buffers()}
    base = model.get_base_model()
    dtype = next(v.dtype for v in state.values() if v.is_floating_point())
    with torch.device("meta"):
        plain = AutoModelForCausalLM.from_config(copy.deepcopy(base.config), dtype=dtype)
    (name, config), *others = ((n, copy.deepcopy(c)) for n, c in model.peft_config.items())
    clone = peft.get_peft_model(plain, config, adapter_name=name)
    for other, other_config in others:
        clone.add_adapter(other, other_config)
    clone.load_state_dict(state, strict=True, assign=True)
    for key, buf in buffers.items():
        owner_name, _, attr = key.rpartition(".")
        owner = clone.get_submodule(owner_name)
        owner.register_buffer(attr, buf, persistent=attr not in owner._non_persistent_buffers_set)
    clone.get_base_model().tie_weights()
    return clone.eval()


def export(model: nn.Module, tokenizer: Any, export_dir: str | os.PathLike, state: dict | None = None) -> Path:
    """Save the merged model (and tokenizer) to export_dir, and the adapter alone to export_dir/adapter.

    A model without adapters is saved as it is (`models.export_hf`). Both are written atomically:
    the adapter goes to a temporary sibling first and is moved in once the merged model is in place.

    Args:
        model: the trained model.
        tokenizer: saved beside the merged model when given.
        export_dir: target directory (replaced).
        state: the model's full CPU state dict when its parameters are sharded (gathered first).
    """
    from blur_lightning.models.loading import export_hf

    if not has_adapters(model):
        return export_hf(model, tokenizer, export_dir)
    export_dir = Path(export_dir)
    export_dir.parent.mkdir(parents=True, exist_ok=True)
    clone = cpu_copy(model, state)
    adapter_tmp = Path(tempfile.mkdtemp(prefix=f".{export_dir.name}.adapter-", dir=export_dir.parent))
    os.chmod(adapter_tmp, 0o755)
    try:
        clone.save_pretrained(adapter_tmp)  # the adapter alone (safetensors + adapter_config.json)
        merged = clone.merge_and_unload()  # W + (alpha / r) B A; the clone's adapters are gone after
        export_hf(merged, tokenizer, export_dir)
        os.replace(adapter_tmp, export_dir / ADAPTER_SUBDIR)
    finally:
        shutil.rmtree(adapter_tmp, ignore_errors=True)
    return export_dir
