"""Weight-only quantization of a causal LM, for the quantization probe of unlearning.

Zhang et al. (ICLR 2025, "Catastrophic failure of LLM unlearning via quantization") found that 4-bit
quantization of a gradient-unlearned model brings most of the forgotten knowledge back: unlearning moved
the weights by less than one quantization step, so rounding undoes it. The probe quantizes the unlearned
model (and the retain oracle, the same way) and asks the forget questions again.

The library is torchao (PyTorch's own quantization library), chosen after trying it and
optimum-quanto on this CPU with torch 2.13.0 (both install without touching torch and run 8- and 4-bit
weight-only forwards; figures on SmolLM2-135M-Instruct, a 20-token prompt, one thread, 2 shared cores,
each library's defaults, which round every Linear, the output head included):

    ============  ==========  ============  ==============  ==================  ===============
    library       bits        quantize (s)  forward (s)     rel. logit error    argmax agrees
    ============  ==========  ============  ==============  ==================  ===============
    (float32)     -           -             0.11-0.13       0                   100%
    torchao 0.18  8 per-row   0.52          0.156           0.039               95%
    torchao 0.18  4 group 32  0.68          0.327           0.50                65%
    quanto 0.2.7  8           1.60          0.265           0.044               90%
    quanto 0.2.7  4           2.16          0.324           0.60                55%
    ============  ==========  ============  ==============  ==================  ===============

Through `quantize_weights` (4 bits in groups of 64, the default), on a busier machine (float32 forward
0.34-0.43 s): 8 bits 0.35-0.40 s a forward, relative logit error 0.043, 95% argmax agreement; 4 bits
0.47-0.61 s, 0.59, 53%; quantizing takes 2-4 s. Greedy answers to one capital question: float32 "The
capital of France is Paris.", 8 bits an immediate end of turn, 4 bits "Paris": a 135M model sits close
to its decision margins, so the probe should read probabilities and truth ratios, not one generation.

What is quantized: every ``nn.Linear`` except the output head (``lm_head``), as GPTQ and AWQ leave it;
embeddings stay float. A LoRA model is merged first (W + (alpha / r) B A) and the merged weights are
rounded, as the attack rounds the model a user deploys: rounding the base weights and the adapters
apart would keep the unlearning delta, which lives in the adapters, in full precision. Rounding is
symmetric round-to-nearest (RTN), per output channel at 8 bits and per group of input channels below
(torchao's convention: scale = max|w| / ((q_max - q_min) / 2)).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from torch import nn

from blur_lightning.models import adapters

__all__ = ["DEFAULT_GROUP_SIZE", "SUPPORTED_BITS", "quantize_weights", "quantized_linear_names"]

SUPPORTED_BITS = (2, 3, 4, 5, 6, 7, 8)
# 64 divides every Linear's input width of SmolLM2-135M (576 and 1536); the usual 128 does not divide 576.
DEFAULT_GROUP_SIZE = 64
_INSTALL_HINT = "pip install 'blur-lightning[quant]' (torchao; install it with --no-deps if pip wants another torch)"


def quantized_linear_names(model: nn.Module, skip: Sequence[str] = ("lm_head",)) -> list[str]:
    """Names of the ``nn.Linear`` modules that `quantize_weights` rounds (all but those named in `skip`)."""
    return [
        name
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] not in skip and name not in skip
    ]


def quantize_weights(
    model: nn.Module,
    bits: int,
    *,
    group_size: int | None = None,
    skip: Sequence[str] = ("lm_head",),
) -> nn.Module:
    """A copy of `model` whose Linear weights are rounded to `bits`-bit integers (weight-only, torchao).

    Args:
        model: a float model (a transformers causal LM or any module with ``nn.Linear`` layers; a peft
            LoRA model is merged first, see the module doc); not modified.
        bits: 2 to 8. 8 uses torchao's int8 weight-only kernel, fewer bits its int-x weight-only one.
        group_size: input channels sharing one scale; None: per output channel at 8 bits and
            `DEFAULT_GROUP_SIZE` below. Must divide the input width of every quantized layer.
        skip: module names (or last name parts) left in float; by default the output head.

    Returns:
        The quantized copy, in eval mode, on the model's device. Activations stay in the model's dtype.

    Raises:
        ValueError: unsupported `bits`, a group size that does not divide a layer's input width (the
            message names the layer), or no Linear layer to quantize.
        ImportError: torchao is not installed.
    """
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits: expected one of {SUPPORTED_BITS}, got {bits!r}")
    merged = None
    if adapters.has_adapters(model):  # round W + (alpha / r) B A, not W and the adapters apart
        device = next(model.parameters()).device
        merged = adapters.cpu_copy(model).merge_and_unload().to(device)
        model = merged
    if group_size is None and bits < 8:
        group_size = DEFAULT_GROUP_SIZE
    if group_size is not None and group_size < 1:
        raise ValueError(f"group_size: expected a positive integer or None, got {group_size!r}")
    names = set(quantized_linear_names(model, skip))
    if not names:
        raise ValueError(f"model: no nn.Linear layer to quantize (skip={list(skip)})")
    if group_size is not None:
        for name, module in model.named_modules():
            if name in names and module.in_features % group_size:
                raise ValueError(
                    f"group_size: {group_size} does not divide the input width {module.in_features} of {name!r}"
                )
    try:
        from torchao.quantization import Int8WeightOnlyConfig, IntxWeightOnlyConfig, quantize_
        from torchao.quantization.granularity import PerAxis, PerGroup, PerRow
    except ImportError as err:
        raise ImportError(f"quantize_weights needs torchao: {_INSTALL_HINT}") from err

    if bits == 8:
        # set_inductor_config=False: torchao would otherwise change torch._inductor's global config
        granularity = PerGroup(group_size) if group_size is not None else PerRow()
        config = Int8WeightOnlyConfig(granularity=granularity, set_inductor_config=False)
    else:
        config = IntxWeightOnlyConfig(
            weight_dtype=getattr(torch, f"int{bits}"),
            granularity=PerGroup(group_size) if group_size is not None else PerAxis(0),
        )  # symmetric by default: RTN with no zero point
    # tied weights stay tied in the copy; the input is never touched (a merged copy is already one)
    quantized = (merged if merged is not None else copy.deepcopy(model)).eval()
    quantize_(quantized, config, filter_fn=lambda module, name: name in names)
    return quantized
