"""Greedy decoding read off a teacher-forced forward equals ``generate`` where it answers at all."""

from __future__ import annotations

import pytest
import torch

from blur_lightning.evals.replay import replay
from blur_lightning.evals.scoring import sequence_scores_with_top2
from blur_lightning.testing.tiny import tiny_llama, tiny_tokenizer

STOP = frozenset({2})
WIDE = [1.0] * 8  # margins far above the threshold


@pytest.mark.parametrize(
    ("top", "targets", "max_new", "expected"),
    [
        ([5, 6, 2, 9], [5, 6, 2, 9], 16, [5, 6, 2]),  # stops at (and keeps) the stop token
        ([5, 6, 7, 8], [5, 6, 7, 8, 2], 3, [5, 6, 7]),  # cut at max_new_tokens, no stop needed
        ([5, 4, 2], [5, 6, 2], 16, None),  # leaves the target at the second token
        ([5, 6], [5, 6], 16, None),  # the target ends without a stop: the next token is unknown
        ([5, 4, 7], [5, 6, 7], 1, [5]),  # a divergence after max_new_tokens does not matter
    ],
)
def test_replay_rules(top, targets, max_new, expected):
    assert replay(top, WIDE, targets, STOP, max_new) == expected


def test_a_near_tie_is_not_trusted():
    assert replay([5, 6, 2], [1.0, 1e-3, 1.0], [5, 6, 2], STOP, 16, min_margin=1e-2) is None
    assert replay([5, 6, 2], [1.0, 1e-3, 1.0], [5, 6, 2], STOP, 16, min_margin=1e-4) == [5, 6, 2]


def _sharp_tiny_model():
    # A random tiny Llama is nearly uniform (top-2 margins ~1e-3, every position a near tie); a
    # scaled head gives decisive logits like a trained model's (SmolLM2: margins 0.02-1 on its answers).
    model = tiny_llama(seed=3).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(60.0)
    return model


@torch.no_grad()
def test_replay_equals_generate_on_a_model():
    model, tokenizer = _sharp_tiny_model(), tiny_tokenizer()
    stop = frozenset({tokenizer.eos_token_id})
    prompts = ["What is the capital of France?", "Who wrote Pride and Prejudice?", "The quick brown fox", "0 1 2"]
    replayed = 0
    for text in prompts:
        prompt = tokenizer(text)["input_ids"]
        for max_new in (16, 5):
            out = model.generate(
                input_ids=torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                do_sample=False, max_new_tokens=max_new, eos_token_id=sorted(stop), pad_token_id=3,
            )  # fmt: skip
            generated = out[0, len(prompt) :].tolist()
            row = {"input_ids": prompt + generated, "labels": [-100] * len(prompt) + generated}
            _, _, tops = sequence_scores_with_top2(model, tokenizer, [row], batch_size=1, show_progress=False)
            top, margins = tops[0]
            got = replay(top, margins, generated, stop, max_new)
            if got is not None:
                assert got == generated
                replayed += 1
            # a target one token off anywhere before the cut is never taken for the generation
            wrong = list(generated)
            wrong[len(wrong) // 2] = (wrong[len(wrong) // 2] + 1) % tokenizer.vocab_size
            assert replay(top, margins, wrong, stop, max_new) is None
    assert replayed >= 6, f"only {replayed} of 8 generations were read off the forward (margins too small?)"
