"""Question-answering checks used by the demo: does the model still know a fact?

Two measures per question, both using exactly the prompt format of training
(:func:`blur_lightning.data.format_qa`: the chat template when the tokenizer has one):

* **accuracy**: greedy decoding (:func:`greedy_answers`) followed by :func:`is_correct`, a normalized
  containment of the gold answer in the generated text;
* **answer probability**: ``exp(mean log p)`` of the gold answer tokens given the question
  (:func:`answer_probability`), a smooth measure that moves before accuracy flips.

Everything runs under ``torch.no_grad`` in eval mode (the model's mode is restored afterwards) and is
fast enough on a CPU for a few hundred short questions with a 135M model (about a minute).
"""

from __future__ import annotations

import re
import string
import unicodedata
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from blur_lightning.data import IGNORE_INDEX, encode_prompts, encode_qa_rows, pad_side
from blur_lightning.models import pad_token_id

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

__all__ = [
    "answer_probability", "evaluate_qa", "greedy_answers", "greedy_continuations", "is_correct", "normalize_answer",
]

# End-of-turn tokens of common chat formats: generation stops at any of them, not only at eos.
_END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>", "<|endoftext|>")
# Deleted (not replaced by a space) so that "D.C." matches "DC" and "O'Neill" matches "ONeill".
_DELETE = str.maketrans("", "", ".'\u2019`")
_PUNCT_TO_SPACE = str.maketrans({c: " " for c in string.punctuation})
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize_answer(text: str) -> str:
    """Lowercase, strip accents, drop ``.`` and apostrophes, turn other punctuation into spaces,
    drop the articles a/an/the, and collapse whitespace.

    ``"Bogotá"`` -> ``"bogota"``, ``"Washington, D.C."`` -> ``"washington dc"``,
    ``"The Hobbit"`` -> ``"hobbit"``.
    """
    text = unicodedata.normalize("NFKD", text)
    text = "".join(c for c in text if not unicodedata.combining(c)).lower()
    text = text.translate(_DELETE).translate(_PUNCT_TO_SPACE)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def is_correct(generated: str, answer: str | Sequence[str]) -> bool:
    """Whether the normalized gold answer occurs in the normalized generation as whole words.

    Both sides go through :func:`normalize_answer`; containment is on word boundaries, so
    ``"Rome"`` is not found in ``"Romania"``. A sequence of answers accepts any of them. An empty gold
    answer is never correct.
    """
    golds = [answer] if isinstance(answer, str) else list(answer)
    haystack = f" {normalize_answer(generated)} "
    return any((gold := normalize_answer(g)) and f" {gold} " in haystack for g in golds)


def _device(model: torch.nn.Module) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


def _stop_token_ids(tokenizer: PreTrainedTokenizerBase, model: Any) -> list[int]:
    stop = set()
    if tokenizer.eos_token_id is not None:
        stop.add(tokenizer.eos_token_id)
    model_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if model_eos is not None:
        stop.update([model_eos] if isinstance(model_eos, int) else model_eos)
    vocab = tokenizer.get_vocab()
    stop.update(vocab[t] for t in _END_OF_TURN if t in vocab)
    return sorted(stop)


def _batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Row indices grouped by similar length (less padding), as batches of ``batch_size``."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


@torch.no_grad()
def greedy_answers(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    questions: Sequence[str],
    max_new_tokens: int = 16,
    batch_size: int = 16,
    *,
    use_chat_template: bool = True,
) -> list[str]:
    """Greedy answers to questions, decoded without special tokens and stripped.

    Prompts are left-padded (generation appends on the right); questions are batched by prompt length
    and the answers returned in the input order. Generation stops at eos or an end-of-turn token.

    Args:
        model: a causal LM with ``generate``.
        tokenizer: its tokenizer (needs a pad token).
        questions: the questions.
        max_new_tokens: most tokens generated per answer.
        batch_size: questions per ``generate`` call.
        use_chat_template: as in training (see :func:`blur_lightning.data.format_qa`).
    """
    prompt_ids = encode_prompts(tokenizer, questions, use_chat_template=use_chat_template)
    texts = greedy_continuations(
        model, tokenizer, prompt_ids, max_new_tokens, batch_size, stop_ids=_stop_token_ids(tokenizer, model)
    )
    return [text.strip() for text in texts]


@torch.no_grad()
def greedy_continuations(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompt_ids: Sequence[Sequence[int]],
    max_new_tokens: int,
    batch_size: int,
    *,
    stop_ids: Sequence[int] | None = None,
) -> list[str]:
    """Greedy continuations of tokenized prompts: left-padded batches of similar length, the new
    tokens decoded without special tokens (not stripped), in the input order.

    Args:
        model: a causal LM with ``generate`` (put in eval mode for the call, then restored).
        tokenizer: its tokenizer, for the pad token and decoding.
        prompt_ids: one list of token ids per prompt.
        max_new_tokens: most tokens generated per prompt.
        batch_size: prompts per ``generate`` call.
        stop_ids: token ids that end a continuation (None: the model's generation config).
    """
    from transformers import GenerationConfig

    if not prompt_ids:
        return []
    pad_id = pad_token_id(tokenizer)
    stop = list(stop_ids) if stop_ids is not None else getattr(model.generation_config, "eos_token_id", None)
    config = GenerationConfig(
        do_sample=False, num_beams=1, max_new_tokens=max_new_tokens, pad_token_id=pad_id, eos_token_id=stop
    )
    device = _device(model)
    texts: list[str] = [""] * len(prompt_ids)
    was_training = model.training
    model.eval()
    try:
        for batch in _batches([len(p) for p in prompt_ids], batch_size):
            width = max(len(prompt_ids[i]) for i in batch)
            input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
            attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
            for row, i in enumerate(batch):
                ids = prompt_ids[i]
                input_ids[row, width - len(ids) :] = torch.tensor(ids, dtype=torch.long)
                attention_mask[row, width - len(ids) :] = 1
            out = model.generate(
                input_ids=input_ids.to(device), attention_mask=attention_mask.to(device), generation_config=config
            )
            for i, text in zip(batch, tokenizer.batch_decode(out[:, width:], skip_special_tokens=True)):
                texts[i] = text
    finally:
        model.train(was_training)
    return texts


@torch.no_grad()
def answer_probability(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    questions: Sequence[str],
    answers: Sequence[str],
    batch_size: int = 16,
    *,
    use_chat_template: bool = True,
) -> torch.Tensor:
    """Length-normalized probability of each gold answer given its question.

    ``exp(mean over answer tokens of log p(token | question, previous answer tokens))``, with the
    answer tokens exactly those that carry a label in training (the assistant reply and its
    end-of-turn token), computed in float32.

    Returns:
        Float32 CPU tensor of shape ``(len(questions),)`` with values in ``[0, 1]``; ``nan`` for an
        answer that tokenizes to nothing.
    """
    rows, _ = encode_qa_rows(tokenizer, questions, answers, use_chat_template=use_chat_template)
    probs = torch.full((len(rows),), float("nan"), dtype=torch.float32)
    kept = [i for i, r in enumerate(rows) if r is not None]
    pad_id = pad_token_id(tokenizer)
    device = _device(model)
    was_training = model.training
    model.eval()
    try:
        for batch in _batches([len(rows[i]["input_ids"]) for i in kept], batch_size):
            indices = [kept[j] for j in batch]
            side = pad_side([rows[i] for i in indices], pad_id)
            logits = model(
                input_ids=side["input_ids"].to(device), attention_mask=side["attention_mask"].to(device)
            ).logits  # B x T x V
            targets = side["labels"][:, 1:].to(device)  # B x T-1: token t is predicted at t-1
            mask = targets != IGNORE_INDEX
            # Only answer positions: a few tokens per row instead of the whole prompt (V = 49k columns).
            logp = -F.cross_entropy(logits[:, :-1][mask].float(), targets[mask], reduction="none")  # n_answer
            row = torch.arange(len(indices), device=device).unsqueeze(1).expand_as(mask)[mask]
            sum_logp = torch.zeros(len(indices), device=device).index_add_(0, row, logp)
            mean_logp = sum_logp / mask.sum(1)
            probs[indices] = mean_logp.exp().cpu()
    finally:
        model.train(was_training)
    return probs


def evaluate_qa(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    rows: Sequence[Mapping[str, Any]],
    *,
    question_column: str = "question",
    answer_column: str = "answer",
    prob_column: str | None = None,
    max_new_tokens: int = 16,
    batch_size: int = 16,
    use_chat_template: bool = True,
) -> dict[str, float]:
    """Accuracy and mean answer probability over QA rows.

    Args:
        model: a causal LM.
        tokenizer: its tokenizer.
        rows: mappings with a question and a gold answer (e.g. the lines of ``qa_holdout.jsonl``).
        question_column: key of the question.
        answer_column: key of the gold answer (judged by :func:`is_correct`).
        prob_column: key of the text whose probability is measured; defaults to ``answer_column``.
            With the embedded QA set, ``"response"`` (the model's own full-sentence answer) gives
            probabilities around 0.5 instead of ~1e-3 for the bare answer.
        max_new_tokens: generation length for the accuracy check.
        batch_size: rows per forward / ``generate`` call.
        use_chat_template: as in training.

    Returns:
        ``{"accuracy": fraction answered correctly by greedy decoding, "answer_prob": mean of
        :func:`answer_probability`, "n": number of rows}``.
    """
    if not rows:
        raise ValueError("evaluate_qa needs at least one row")
    questions = [str(r[question_column]) for r in rows]
    golds = [str(r[answer_column]) for r in rows]
    generated = greedy_answers(
        model, tokenizer, questions, max_new_tokens, batch_size, use_chat_template=use_chat_template
    )
    targets = golds if prob_column is None else [str(r[prob_column]) for r in rows]
    probs = answer_probability(model, tokenizer, questions, targets, batch_size, use_chat_template=use_chat_template)
    correct = sum(is_correct(g, a) for g, a in zip(generated, golds))
    return {
        "accuracy": correct / len(rows),
        "answer_prob": float(probs.nanmean()),
        "n": float(len(rows)),
    }
