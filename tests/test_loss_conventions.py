"""Loss conventions against the reference codes, on fixed inputs, computed independently in float64.

    loss              reference formula                                              ours
    SimNPO            -(2/b) mean logsigmoid(b (nll/|y| - delta))  (SimNPO, open-unlearning,  the same
                      the BLUR authors' TOFU code: delta is inside the beta product)
    KL retain         mask="labels": answer tokens, per-sequence mean (ours);
                      mask="all": kl_div(batchmean) over every position (open-unlearning)
    RMU               mask="attention": prompt + answer tokens (ours); mask="labels": answer
                      tokens only (open-unlearning); mask="none": mean over every position,
                      padding included (the WMDP original's mse_loss)
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import build_tiny_llama, make_side

from blur_lightning.losses import functional as losses
from blur_lightning.training.unlearner import BLURUnlearner

VOCAB = 11


def fixed_inputs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    side = make_side(4, 9, seed=seed, vocab_size=VOCAB)  # prompt of 3, padding on rows 1, 2
    logits = torch.randn(4, 9, VOCAB, generator=g, dtype=torch.float64) * 2
    ref_logits = torch.randn(4, 9, VOCAB, generator=g, dtype=torch.float64) * 2
    return side, logits, ref_logits


def reference_simnpo(logits, labels, beta, delta):
    """SimNPO as the reference codes write it: the summed answer NLL over the answer-token count,
    minus delta, times beta. (open-unlearning counts `labels != -100` before the shift; with a
    prompt before every answer that is the same count.)"""
    logp = torch.log_softmax(logits[:, :-1].double(), dim=-1)
    target = labels[:, 1:]
    mask = target != -100
    tok = logp.gather(-1, target.clamp_min(0).unsqueeze(-1)).squeeze(-1) * mask
    nll_sum = -tok.sum(dim=1)
    count = (labels != -100).sum(dim=-1)
    return (-F.logsigmoid(beta * (nll_sum / count - delta)) * 2 / beta).mean()


@pytest.mark.parametrize("beta,delta", [(2.5, 2.0), (2.5, 0.0), (1.0, 0.5)])
def test_simnpo_equals_the_reference_formula(beta, delta):
    side, logits, _ = fixed_inputs()
    assert torch.equal((side["labels"] != -100).sum(-1), (side["labels"][:, 1:] != -100).sum(-1))
    want = reference_simnpo(logits, side["labels"], beta, delta)
    got = losses.simnpo_loss(logits, side["labels"], beta=beta, delta=delta)
    torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-7)


def reference_kl_all_positions(logits, ref_logits):
    """open-unlearning's compute_kl_divergence: KL(ref || policy) over every position, padding
    and the last one included, averaged over B * T rows (kl_div's batchmean on the flat view)."""
    vocab = logits.shape[-1]
    current = torch.log_softmax(logits.double(), dim=-1).view(-1, vocab)
    reference = torch.log_softmax(ref_logits.double(), dim=-1).view(-1, vocab)
    return F.kl_div(current, reference, reduction="batchmean", log_target=True)


def reference_kl_answer_tokens(logits, ref_logits, labels):
    """Ours: KL at the positions that predict an answer token, mean per sequence, then over sequences."""
    logp = torch.log_softmax(logits[:, :-1].double(), dim=-1)
    ref = torch.log_softmax(ref_logits[:, :-1].double(), dim=-1)
    mask = (labels[:, 1:] != -100).double()
    kl = (ref.exp() * (ref - logp)).sum(-1)
    return ((kl * mask).sum(1) / mask.sum(1)).mean()


def test_kl_masks_match_their_references():
    side, logits, ref_logits = fixed_inputs(1)
    labels = side["labels"]
    all_positions = losses.kl_loss(logits, ref_logits, labels, mask="all")
    want_all = reference_kl_all_positions(logits, ref_logits)
    torch.testing.assert_close(all_positions.double(), want_all, rtol=1e-6, atol=0)
    answers = losses.kl_loss(logits, ref_logits, labels, mask="labels")
    want_answers = reference_kl_answer_tokens(logits, ref_logits, labels)
    torch.testing.assert_close(answers.double(), want_answers, rtol=1e-6, atol=0)
    assert losses.kl_loss(logits, ref_logits, labels).item() == answers.item()  # the default
    assert abs(all_positions.item() - answers.item()) > 1e-3  # the inputs tell the two apart
    with pytest.raises(ValueError, match="mask='answers'"):
        losses.kl_loss(logits, ref_logits, labels, mask="answers")


def reference_activation_loss(hidden, target, mask):
    """open-unlearning's RMU compute_activation_loss: per-token MSE over H, masked sum over T,
    over the mask's token count, mean over sequences."""
    sq = (hidden.double() - target.double()).pow(2)
    summed = (sq * mask.unsqueeze(-1).double()).mean(dim=2).sum(dim=1)
    return (summed / mask.sum(-1).double()).mean()


def test_rmu_masks_match_their_references():
    side, _, _ = fixed_inputs(2)
    g = torch.Generator().manual_seed(3)
    hidden = torch.randn(4, 9, 8, generator=g, dtype=torch.float64)
    ref_hidden = torch.randn(4, 9, 8, generator=g, dtype=torch.float64)
    control = losses.rmu_control_vector(8, 6.5, seed=0).double()
    masks = {
        "attention": side["attention_mask"].bool(),
        "labels": side["labels"] != -100,  # open-unlearning: answer tokens (labels not shifted)
    }
    for kind, mask in masks.items():
        got_f = losses.rmu_forget_loss(hidden, control, losses.rmu_mask(side, kind))
        got_r = losses.rmu_retain_loss(hidden, ref_hidden, losses.rmu_mask(side, kind))
        torch.testing.assert_close(got_f.double(), reference_activation_loss(hidden, control.expand_as(hidden), mask))
        torch.testing.assert_close(got_r.double(), reference_activation_loss(hidden, ref_hidden, mask))
    # the WMDP original: torch's mse_loss over every element, padding included
    unmasked = losses.rmu_forget_loss(hidden, control, losses.rmu_mask(side, "none"))
    torch.testing.assert_close(unmasked.double(), F.mse_loss(hidden, control.expand_as(hidden)))
    unmasked_r = losses.rmu_retain_loss(hidden, ref_hidden, losses.rmu_mask(side, "none"))
    torch.testing.assert_close(unmasked_r.double(), F.mse_loss(hidden, ref_hidden))
    with pytest.raises(ValueError, match="rmu_mask='answer'"):
        losses.rmu_mask(side, "answer")


def test_module_passes_the_mask_options_to_the_losses():
    side = make_side(3, 10, seed=4)
    module = BLURUnlearner(build_tiny_llama(), forget_loss="rmu", retain_loss="kl", rmu_layer=1,
                           kl_mask="all", rmu_mask="none", export_dir=None)
    module._reference.append(module._make_reference(module.model))
    with torch.no_grad():
        logits = module.model(input_ids=side["input_ids"], attention_mask=side["attention_mask"]).logits
        ref_logits = module.reference_model(input_ids=side["input_ids"], attention_mask=side["attention_mask"]).logits
        want = losses.kl_loss(logits, ref_logits, side["labels"], mask="all")
        torch.testing.assert_close(module.retain_loss(side), want)
        hidden = module._layer_activations(module.model, side)
        control = module._rmu_control(hidden.shape[-1], hidden.device)
        torch.testing.assert_close(module.forget_loss(side), F.mse_loss(hidden, control.expand_as(hidden)))
    with pytest.raises(ValueError, match="kl_mask='answer'"):
        BLURUnlearner(build_tiny_llama(), kl_mask="answer", export_dir=None)
    with pytest.raises(ValueError, match="rmu_mask='padding'"):
        BLURUnlearner(build_tiny_llama(), rmu_mask="padding", export_dir=None)
