"""The relearning probe: was the knowledge removed, or only suppressed?

An unlearned model that answers 0% of the forget questions may still hold the facts, with only
the path to them blocked; then a little fine-tuning on *some* of the forgotten facts brings back
the *others* too (the relearning attacks of Hu et al. 2024 and Deeb & Roger 2024). The probe:

1. split the forget rows in two halves by position (even rows: `relearn`, odd rows: `held_back`);
2. fine-tune a copy of the model on the `relearn` half only (NLL on the answers, AdamW) for
   `steps` steps, as an attacker with part of the data would;
3. measure QA accuracy on the `held_back` half (never seen by the probe) and on any extra
   probe sets (e.g. paraphrased questions), before and after.

Knowledge that comes back on `held_back` was still in the weights. The copy is thrown away: the
model passed in is never changed. `relearn` accuracy after the probe says whether the attack
itself worked (if it did not, a low `held_back` figure proves nothing).
"""

from __future__ import annotations

import copy
import random
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch

from blur_lightning.data import encode_qa_rows, pad_side
from blur_lightning.evaluation import evaluate_qa
from blur_lightning.losses import nll_loss
from blur_lightning.models import pad_token_id

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

Rows = Sequence[Mapping[str, Any]]

__all__ = ["relearning_probe", "split_halves"]


def split_halves(rows: Rows) -> tuple[list[Mapping[str, Any]], list[Mapping[str, Any]]]:
    """(relearn, held_back): even and odd positions, so both halves span the file's order."""
    return list(rows[0::2]), list(rows[1::2])


def relearning_probe(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    forget_rows: Rows,
    *,
    probe_sets: Mapping[str, Rows] | None = None,
    steps: int = 10,
    lr: float = 1e-5,
    batch_size: int = 8,
    train_column: str = "response",
    answer_column: str = "answer",
    prob_column: str | None = "response",
    max_length: int = 96,
    max_new_tokens: int = 16,
    eval_batch_size: int = 32,
    seed: int = 0,
    use_chat_template: bool = True,
    train_rows: Rows | None = None,
) -> dict[str, dict[str, float]]:
    """Fine-tune a copy of `model` on half of the forget rows; measure the other half.

    Args:
        model: the (unlearned) causal LM; not modified.
        tokenizer: its tokenizer.
        forget_rows: QA rows of the forget set (question, answer and `train_column`).
        probe_sets: more sets to measure before and after, name -> rows (e.g. paraphrases of the
            held-back questions). Rows whose answer is a `relearn` answer are dropped from them,
            so every probe measures facts the probe never trained on.
        steps: optimizer steps of the probe (batches of `batch_size` relearn rows, reshuffled
            each pass).
        lr: AdamW learning rate (no weight decay).
        batch_size: rows per step.
        train_column: the column trained on (the model's own answer sentences by default).
        answer_column: the gold answer, for accuracy.
        prob_column: the column whose probability is reported (None: `answer_column`).
        max_length: tokens per training row (prompt + answer).
        max_new_tokens: greedy tokens per answer in the accuracy check.
        eval_batch_size: rows per forward / generate call in the evaluation.
        seed: the order of the relearn batches.
        use_chat_template: as in training.
        train_rows: fine-tune on these rows instead of the relearn half: the control of the
            probe (facts unrelated to the forget set bring back only what any fine-tuning would).

    Returns:
        ``{set name: {"accuracy_before", "accuracy_after", "answer_prob_before",
        "answer_prob_after", "n"}}`` for ``relearn``, ``held_back`` and every probe set.
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if len(forget_rows) < 2:
        raise ValueError(f"the relearning probe needs at least 2 forget rows, got {len(forget_rows)}")
    relearn, held_back = split_halves(forget_rows)
    relearned_answers = {str(row[answer_column]) for row in relearn}
    sets: dict[str, list[Mapping[str, Any]]] = {"relearn": relearn, "held_back": held_back}
    for name, rows in (probe_sets or {}).items():
        kept = [row for row in rows if str(row[answer_column]) not in relearned_answers]
        if not kept:
            raise ValueError(f"probe set {name!r}: no row left once the relearned answers are dropped")
        sets[name] = kept

    def measure(m: torch.nn.Module) -> dict[str, dict[str, float]]:
        kwargs = {
            "answer_column": answer_column, "prob_column": prob_column, "max_new_tokens": max_new_tokens,
            "batch_size": eval_batch_size, "use_chat_template": use_chat_template,
        }
        return {name: evaluate_qa(m, tokenizer, rows, **kwargs) for name, rows in sets.items()}

    before = measure(model)
    attacker = copy.deepcopy(model)
    _fine_tune(
        attacker, tokenizer, relearn if train_rows is None else train_rows, steps=steps, lr=lr,
        batch_size=batch_size, column=train_column,
        max_length=max_length, seed=seed, use_chat_template=use_chat_template,
    )
    after = measure(attacker)
    del attacker
    return {
        name: {
            "accuracy_before": before[name]["accuracy"],
            "accuracy_after": after[name]["accuracy"],
            "answer_prob_before": before[name]["answer_prob"],
            "answer_prob_after": after[name]["answer_prob"],
            "n": before[name]["n"],
        }
        for name in sets
    }


def _fine_tune(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    rows: Rows,
    *,
    steps: int,
    lr: float,
    batch_size: int,
    column: str,
    max_length: int,
    seed: int,
    use_chat_template: bool,
) -> None:
    """Plain NLL fine-tuning on the answers of `rows`, in place."""
    encoded, _ = encode_qa_rows(
        tokenizer, [str(r["question"]) for r in rows], [str(r[column]) for r in rows],
        max_length=max_length, use_chat_template=use_chat_template,
    )
    encoded = [row for row in encoded if row is not None]
    if not encoded:
        raise ValueError(f"no relearn row has an answer token within max_length={max_length}")
    pad_id = pad_token_id(tokenizer)
    device = next(model.parameters()).device
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    rng = random.Random(seed)
    order: list[int] = []
    was_training = model.training
    model.train()
    try:
        for _ in range(steps):
            if len(order) < batch_size:  # a fresh shuffled pass once the current one runs short
                order += rng.sample(range(len(encoded)), len(encoded))
            batch = pad_side([encoded[i] for i in order[:batch_size]], pad_id)
            del order[:batch_size]
            logits = model(
                input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device)
            ).logits
            loss = nll_loss(logits, batch["labels"].to(device))
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    finally:
        model.train(was_training)
