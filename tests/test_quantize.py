"""Weight-only quantization (torchao) for the quantization probe: a rounded copy, the original untouched."""

from __future__ import annotations

import sys
from importlib.util import find_spec

import pytest
import torch

from blur_lightning.models.quantize import DEFAULT_GROUP_SIZE, quantize_weights, quantized_linear_names
from blur_lightning.testing import tiny as testing

needs_torchao = pytest.mark.skipif(
    find_spec("torchao") is None, reason="torchao is not installed (pip install 'blur-lightning[quant]')"
)


@pytest.fixture
def model():
    # hidden 64, MLP 128: every input width is a multiple of the default group (64)
    return testing.tiny_llama(hidden=64, layers=2, seed=0).eval()


def _ids():
    return torch.randint(0, testing.TINY_VOCAB_SIZE, (2, 20), generator=torch.Generator().manual_seed(0))


def _relative_error(model, quantized) -> float:
    with torch.no_grad():
        ref, out = model(_ids()).logits.double(), quantized(_ids()).logits.double()
    return ((out - ref).norm() / ref.norm()).item()


def _effective_weight(layer: torch.nn.Linear) -> torch.Tensor:
    """(out, in) weight the layer applies, read through its forward: works for any weight subclass."""
    with torch.no_grad():
        eye = torch.eye(layer.in_features, dtype=torch.float32)
        out = layer(eye)  # (in, out) = W^T (+ bias)
        if layer.bias is not None:
            out = out - layer.bias
    return out.T


@needs_torchao
def test_logits_close_at_8_bits_further_at_4(model):
    err8 = _relative_error(model, quantize_weights(model, 8))
    err4 = _relative_error(model, quantize_weights(model, 4))
    # measured: 8 bits 0.006, 4 bits 0.12 (random-init weights, 4 bits in groups of 64)
    assert 0.0 < err8 < 0.02, err8
    assert 5 * err8 < err4 < 0.3, (err8, err4)


@needs_torchao
def test_the_input_model_is_bit_identical_afterwards(model):
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    types = {k: type(p) for k, p in model.named_parameters()}
    quantized = quantize_weights(model, 4)
    after = model.state_dict()
    assert before.keys() == after.keys()
    for key, value in before.items():
        assert torch.equal(after[key], value), key
        assert value.dtype == after[key].dtype
    assert {k: type(p) for k, p in model.named_parameters()} == types
    # ... while the copy did change: its attention and MLP weights are no longer the float ones
    q_proj = quantized.model.layers[0].self_attn.q_proj
    assert not torch.equal(_effective_weight(q_proj), model.model.layers[0].self_attn.q_proj.weight)


@needs_torchao
@pytest.mark.parametrize("bits, group", [(8, None), (8, 32), (4, None), (4, 32), (2, 64)])
def test_weights_are_symmetric_round_to_nearest_per_group(model, bits, group):
    quantized = quantize_weights(model, bits, group_size=group)
    original = dict(model.named_modules())
    width = group or (DEFAULT_GROUP_SIZE if bits < 8 else None)
    names = quantized_linear_names(model)
    assert len(names) == 2 * 7  # q, k, v, o, gate, up, down in each of 2 layers; lm_head left float
    for name, layer in quantized.named_modules():
        if name not in names:
            continue
        weight = original[name].weight.detach().double()  # (out, in)
        effective = _effective_weight(layer).double()
        g = width or weight.shape[1]  # per output channel: one group per row
        w_groups = weight.reshape(weight.shape[0], -1, g)
        e_groups = effective.reshape(weight.shape[0], -1, g)
        amax = w_groups.abs().amax(-1, keepdim=True)
        # within half a step of the coarser convention (scale = amax / (2^(b-1) - 1)), in every group:
        # a grouping coarser than asked would break it on the groups of small weights
        bound = amax / (2**bits - 2) + 1e-6
        excess = (e_groups - w_groups).abs() - bound
        worst = excess.argmax()
        assert excess.max() <= 0, f"{name}: |w' - w| above half a step at flat index {worst.item()}"
        levels = max(len(torch.unique(row)) for row in e_groups.reshape(-1, g))
        assert levels <= 2**bits, f"{name}: {levels} distinct values in a group of {g} at {bits} bits"
    assert torch.equal(quantized.lm_head.weight, model.lm_head.weight)


@needs_torchao
def test_tied_output_head_stays_tied_and_float():
    tied = testing.tiny_llama(hidden=64, layers=1, tie_word_embeddings=True).eval()
    quantized = quantize_weights(tied, 4)
    assert quantized.lm_head.weight is quantized.model.embed_tokens.weight
    assert type(quantized.lm_head.weight) is torch.nn.Parameter
    assert 0.0 < _relative_error(tied, quantized) < 0.2


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"bits": 9}, "bits: expected one of"),
        ({"bits": 1}, "bits: expected one of"),
        ({"bits": 4, "group_size": 48}, r"group_size: 48 does not divide the input width 64 of 'model\.layers\.0\."),
        ({"bits": 4, "group_size": 0}, "group_size: expected a positive integer"),
        ({"bits": 8, "skip": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head")},
         "no nn.Linear layer to quantize"),
    ],
)  # fmt: skip
def test_bad_arguments_name_the_field(model, kwargs, match):
    with pytest.raises(ValueError, match=match):
        quantize_weights(model, **kwargs)


def test_missing_torchao_says_how_to_install(model, monkeypatch):
    monkeypatch.setitem(sys.modules, "torchao.quantization", None)  # import fails as if not installed
    with pytest.raises(ImportError, match=r"needs torchao: pip install 'blur-lightning\[quant\]'"):
        quantize_weights(model, 8)


@needs_torchao
@pytest.mark.parametrize("bits", [8, 4])
def test_a_lora_model_is_merged_then_rounded(model, bits):
    """The attack rounds the deployed weights W + (alpha / r) B A: merged by hand and quantized, the same
    logits, and not those of W rounded without the delta. Before, every nn.Linear was rounded, the
    adapters' lora_A / lora_B included: apart at 8 bits (the delta stayed a float sum), a ValueError at 4
    bits (a group of 64 does not divide lora_B's input width, the rank)."""
    pytest.importorskip("peft")
    from blur_lightning.models import adapters

    lora = adapters.add_lora(model, rank=4, alpha=8.0, target_modules="all-linear")
    with torch.no_grad():  # B = 0 at init: give the adapters a delta that rounding can lose
        g = torch.Generator().manual_seed(1)
        for name, p in lora.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    quantized = quantize_weights(lora, bits)
    assert not adapters.has_adapters(quantized)
    assert not any("lora_" in name for name, _ in quantized.named_modules())
    by_hand = quantize_weights(adapters.cpu_copy(lora).merge_and_unload(), bits)
    base_only = quantize_weights(testing.tiny_llama(hidden=64, layers=2, seed=0).eval(), bits)  # W, no delta
    with torch.no_grad():
        torch.testing.assert_close(quantized(_ids()).logits, by_hand(_ids()).logits, rtol=0, atol=0)
        assert not torch.allclose(quantized(_ids()).logits, base_only(_ids()).logits, rtol=1e-3, atol=1e-4)
