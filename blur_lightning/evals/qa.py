"""The QA benchmark of the demo: does the model still know a fact?

Two measures per question, both using exactly the prompt format of training
(:func:`blur_lightning.data.prompts.format_qa`: the chat template when the tokenizer has one):

* **accuracy**: greedy decoding (:func:`greedy_answers`) followed by :func:`is_correct`, a normalized
  containment of the gold answer in the generated text;
* **answer probability**: ``exp(mean log p)`` of the gold answer tokens given the question
  (:func:`answer_probability`), a smooth measure that moves before accuracy flips.

Fast enough on a CPU for a few hundred short questions with a 135M model (about a minute).
"""

from __future__ import annotations

import re
import string
import unicodedata
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from blur_lightning.data.encoding import encode_prompts, encode_qa_rows
from blur_lightning.data.prompts import PromptFormat
from blur_lightning.data.rows import Row, require_columns
from blur_lightning.evals.base import Benchmark, EvalSettings, Results
from blur_lightning.evals.membership import evaluate_privacy, privacy_options
from blur_lightning.evals.replay import DEFAULT_MIN_MARGIN, replay
from blur_lightning.evals.scoring import (
    greedy_continuations,
    model_device,
    sequence_scores,
    sequence_scores_with_top2,
    stop_token_ids,
)
from blur_lightning.losses.functional import IGNORE_INDEX

__all__ = [
    "BENCHMARK",
    "QABenchmark",
    "answer_probability",
    "evaluate_qa",
    "greedy_answers",
    "is_correct",
    "normalize_answer",
    "qa_examples",
]

# Deleted (not replaced by a space) so that "D.C." matches "DC" and "O'Neill" matches "ONeill".
_DELETE = str.maketrans("", "", ".'\u2019`")
_PUNCT_TO_SPACE = str.maketrans({c: " " for c in string.punctuation})
_ARTICLES = re.compile(r"\b(a|an|the)\b")
DEFAULT_MAX_NEW_TOKENS = 16  # what the embedded QA set was curated with


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


def greedy_answers(
    model: Any,
    tokenizer: Any,
    questions: Sequence[str],
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    batch_size: int = 16,
    *,
    prompt_format: str | PromptFormat = "auto",
    desc: str = "qa: generate",
    show_progress: bool = True,
) -> list[str]:
    """Greedy answers to questions, decoded without special tokens and stripped.

    Generation stops at eos or an end-of-turn token; answers come back in the input order.

    Args:
        model: a causal LM with ``generate``.
        tokenizer: its tokenizer (needs a pad token).
        questions: the questions.
        max_new_tokens: most tokens generated per answer.
        batch_size: questions per ``generate`` call.
        prompt_format: as in training (a name of :data:`blur_lightning.data.prompts.PROMPT_FORMATS`).
        desc: the progress bar's label.
        show_progress: show a progress bar (on a terminal).
    """
    prompt_ids = encode_prompts(tokenizer, questions, prompt_format=prompt_format)
    texts = greedy_continuations(
        model, tokenizer, prompt_ids, max_new_tokens, batch_size, stop_ids=stop_token_ids(tokenizer, model),
        desc=desc, show_progress=show_progress,
    )  # fmt: skip
    return [text.strip() for text in texts]


def answer_probability(
    model: Any,
    tokenizer: Any,
    questions: Sequence[str],
    answers: Sequence[str],
    batch_size: int = 16,
    *,
    prompt_format: str | PromptFormat = "auto",
    desc: str = "qa: score",
    show_progress: bool = True,
) -> torch.Tensor:
    """Length-normalized probability of each gold answer given its question.

    ``exp(mean over answer tokens of log p(token | question, previous answer tokens))``, with the
    answer tokens exactly those that carry a label in training (the assistant reply and its
    end-of-turn token), computed in float32.

    Returns:
        Float32 CPU tensor of shape ``(len(questions),)`` with values in ``[0, 1]``; ``nan`` for an
        answer that tokenizes to nothing.
    """
    return _answer_scores(
        model, tokenizer, questions, answers, batch_size, prompt_format=prompt_format, desc=desc,
        show_progress=show_progress,
    )[0]  # fmt: skip


def _answer_scores(
    model: Any,
    tokenizer: Any,
    questions: Sequence[str],
    answers: Sequence[str],
    batch_size: int,
    *,
    prompt_format: str | PromptFormat,
    desc: str,
    show_progress: bool,
    readout: bool = False,
) -> tuple[torch.Tensor, list[tuple[list[int], list[float], list[int]] | None] | None]:
    """:func:`answer_probability`, and with `readout` per row (argmax ids, top-2 margins, answer token
    ids) at the answer positions, from the same forward (None for a row with no answer token)."""
    rows, _ = encode_qa_rows(tokenizer, questions, answers, prompt_format=prompt_format)
    probs = torch.full((len(rows),), float("nan"), dtype=torch.float32)
    tops: list | None = [None] * len(rows) if readout else None
    kept = [i for i, r in enumerate(rows) if r is not None]
    if not kept:
        return probs, tops
    score = sequence_scores_with_top2 if readout else sequence_scores
    out = score(model, tokenizer, [rows[i] for i in kept], batch_size=batch_size, desc=desc,
                show_progress=show_progress)  # fmt: skip
    probs[kept] = (out[0] / out[1]).exp()
    if readout:
        for j, i in enumerate(kept):
            answer_ids = [t for t, label in zip(rows[i]["input_ids"], rows[i]["labels"]) if label != IGNORE_INDEX]
            tops[i] = (*out[2][j], answer_ids)
    return probs, tops


def qa_examples(
    model: Any,
    tokenizer: Any,
    rows: Sequence[Mapping[str, Any]],
    *,
    question_column: str = "question",
    answer_column: str = "answer",
    prob_column: str | None = None,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    batch_size: int = 16,
    prompt_format: str | PromptFormat = "auto",
    name: str = "qa",
    show_progress: bool = True,
    replay_greedy: bool = True,
) -> dict[str, list]:
    """Per-example QA results: ``{"correct": [bool], "answer_prob": [float]}`` in row order.

    See :func:`evaluate_qa` for the arguments; ``name`` labels the progress bars. With
    ``replay_greedy`` (and a ``prob_column``, the model's own answer sentence, on a float32 model),
    a question whose greedy answer is implied by the answer-probability forward is not generated
    again (:mod:`blur_lightning.evals.replay`); only the others go through ``generate``. The texts,
    and so the accuracy, are those of ``generate``.
    """
    if not rows:
        raise ValueError("evaluate_qa needs at least one row")
    questions = [str(r[question_column]) for r in rows]
    golds = [str(r[answer_column]) for r in rows]
    targets = golds if prob_column is None else [str(r[prob_column]) for r in rows]
    # bf16/fp16 logits round ~1e-2 apart between the two computation orders: always generate there,
    # half weights or a half autocast (the training precision's, which evaluations run under)
    half_autocast = torch.is_autocast_enabled(model_device(model).type)
    replaying = replay_greedy and prob_column is not None and _dtype(model) == torch.float32 and not half_autocast
    probs, tops = _answer_scores(
        model, tokenizer, questions, targets, batch_size, prompt_format=prompt_format,
        desc=f"{name}: score", show_progress=show_progress, readout=replaying,
    )  # fmt: skip
    generated: list[str | None] = [None] * len(rows)
    stop = frozenset(stop_token_ids(tokenizer, model)) if replaying else frozenset()
    for i, readout in enumerate(tops or []):
        emitted = replay(*readout, stop, max_new_tokens, DEFAULT_MIN_MARGIN) if readout is not None else None
        if emitted is not None:
            generated[i] = tokenizer.decode(emitted, skip_special_tokens=True).strip()
    todo = [i for i, text in enumerate(generated) if text is None]
    if todo:
        texts = greedy_answers(
            model, tokenizer, [questions[i] for i in todo], max_new_tokens, batch_size,
            prompt_format=prompt_format, desc=f"{name}: generate", show_progress=show_progress,
        )  # fmt: skip
        for i, text in zip(todo, texts):
            generated[i] = text
    return {"correct": [is_correct(g, a) for g, a in zip(generated, golds)], "answer_prob": probs.tolist()}


def _dtype(model: Any) -> torch.dtype | None:
    try:
        return next(model.parameters()).dtype
    except (StopIteration, AttributeError):
        return None


def evaluate_qa(
    model: Any,
    tokenizer: Any,
    rows: Sequence[Mapping[str, Any]],
    *,
    question_column: str = "question",
    answer_column: str = "answer",
    prob_column: str | None = None,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    batch_size: int = 16,
    prompt_format: str | PromptFormat = "auto",
    name: str = "qa",
    show_progress: bool = True,
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
        prompt_format: as in training (a name of :data:`blur_lightning.data.prompts.PROMPT_FORMATS`).
        name: the set's name, for the progress bars.
        show_progress: show progress bars (on a terminal).

    Returns:
        ``{"accuracy": fraction answered correctly by greedy decoding, "answer_prob": mean of
        :func:`answer_probability`, "n": number of rows}``.
    """
    per_example = qa_examples(
        model, tokenizer, rows, question_column=question_column, answer_column=answer_column,
        prob_column=prob_column, max_new_tokens=max_new_tokens, batch_size=batch_size,
        prompt_format=prompt_format, name=name, show_progress=show_progress,
    )  # fmt: skip
    return summarize(per_example)


def summarize(per_example: Mapping[str, Sequence]) -> dict[str, float]:
    """Accuracy, mean answer probability (NaNs left out) and count of per-example QA results."""
    correct, probs = per_example["correct"], torch.tensor(per_example["answer_prob"], dtype=torch.float32)
    return {"accuracy": sum(correct) / len(correct), "answer_prob": float(probs.nanmean()), "n": float(len(correct))}


class QABenchmark(Benchmark):
    """Question/answer sets of any names: greedy accuracy and answer probability per set.

    Options: ``question_column``, ``answer_column``, ``prob_column`` (default ``"response"``, the
    model's own answer sentence, used for a set whose every row has it; others score the answer);
    ``mia_forget_set`` (default ``"forget"`` when a set has that name) and ``mia_holdout_set`` (default
    the first of ``"holdout"``, ``"retain_holdout"`` that is a set: the demo's 90 facts the run never
    trains on), and the memorization / attack options of
    :func:`~blur_lightning.evals.membership.privacy_options`: exact memorization and extraction strength
    of the forget set's scored text, the attacks on it against the holdout set's (results
    ``exact_memorization``, ``mia_loss``, ..., ``privleak`` against ``privleak_ref_auc``, default 0.5).
    """

    table_rows: tuple[str, ...] = (
        "exact_memorization", "extraction_strength", "mia_loss", "mia_zlib", "mia_min_k", "mia_min_k_plus_plus",
        "mia_gradnorm", "mia_reference", "privleak",
    )  # fmt: skip

    name = "qa"

    def evaluate(
        self, model: Any, tokenizer: Any, rows: Mapping[str, Sequence[Row]], settings: EvalSettings,
        options: Mapping[str, Any],
    ) -> Results:  # fmt: skip
        options = dict(options)
        prob_column = options.pop("prob_column", "response")
        question_column = options.get("question_column", "question")
        answer_column = options.get("answer_column", "answer")
        forget_set, holdout_set = self._privacy_sets(rows, options)
        privacy = privacy_options(options, has_holdout=holdout_set is not None)
        results: Results = {}
        for name, split in rows.items():
            require_columns(split, (question_column, answer_column), f"qa set {name!r}")
            has_column = prob_column is not None and all(prob_column in r for r in split)
            per_example = qa_examples(
                model, tokenizer, split, prob_column=prob_column if has_column else None,
                max_new_tokens=settings.max_new_tokens or DEFAULT_MAX_NEW_TOKENS, batch_size=settings.batch_size,
                prompt_format=settings.prompt_format, name=f"qa {name}", show_progress=settings.show_progress,
                **options,
            )  # fmt: skip
            summary = summarize(per_example)
            results[f"{name}/accuracy"] = summary["accuracy"]
            results[f"{name}/answer_prob"] = summary["answer_prob"]
            results[f"{name}/per_example"] = per_example
        if forget_set is not None:
            encode = lambda name: self._scored_rows(  # noqa: E731
                tokenizer, rows[name], question_column, answer_column, prob_column, settings.prompt_format
            )
            if privacy["privleak_ref_auc"] is None:
                privacy["privleak_ref_auc"] = 0.5  # open-unlearning's privleak ref_value
            results.update(evaluate_privacy(
                model, tokenizer, encode(forget_set), encode(holdout_set) if holdout_set else None, privacy,
                batch_size=settings.batch_size, show_progress=settings.show_progress, name=f"qa {forget_set}",
            ))  # fmt: skip
        return results

    @staticmethod
    def _privacy_sets(rows: Mapping[str, Sequence[Row]], options: dict[str, Any]) -> tuple[str | None, str | None]:
        """The sets memorization and the attacks read (``mia_forget_set``, ``mia_holdout_set``), popped and checked."""
        forget = options.pop("mia_forget_set", "forget" if "forget" in rows else None)
        holdout = options.pop("mia_holdout_set", next((n for n in ("holdout", "retain_holdout") if n in rows), None))
        for key, name in (("mia_forget_set", forget), ("mia_holdout_set", holdout)):
            if name is not None and name not in rows:
                raise ValueError(f"qa options.{key}={name!r}: no such set (sets: {sorted(rows)})")
        return forget, holdout if forget is not None else None

    @staticmethod
    def _scored_rows(tokenizer, rows, question_column, answer_column, prob_column, prompt_format) -> list:
        """A set's rows encoded as the answer probability scores them (the ``prob_column`` text where every
        row has it, else the answer); rows whose text has no token are left out."""
        column = prob_column if prob_column is not None and all(prob_column in r for r in rows) else answer_column
        encoded, _ = encode_qa_rows(tokenizer, [str(r[question_column]) for r in rows],
                                    [str(r[column]) for r in rows], prompt_format=prompt_format)  # fmt: skip
        return [r for r in encoded if r is not None]

    def _sets(self, results: Results) -> list[str]:
        return [key.removesuffix("/accuracy") for key in results if key.endswith("/accuracy")]

    def describe(self, results: Results) -> list[str]:
        return [
            f"  {name}: accuracy {results[f'{name}/accuracy']:.1%}, answer prob {results[f'{name}/answer_prob']:.3f}"
            for name in self._sets(results)
        ]

    def report(
        self, before: Results | None, after: Results | None, sizes: Mapping[str, int],
        options: Mapping[str, Any] | None = None,
    ) -> str | None:  # fmt: skip
        before, after = before or {}, after or {}
        lines = [
            "| set | n | accuracy before | accuracy after | answer prob before | answer prob after |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        nan = float("nan")
        for name, n in sizes.items():
            b_acc, a_acc = before.get(f"{name}/accuracy", nan), after.get(f"{name}/accuracy", nan)
            b_prob, a_prob = before.get(f"{name}/answer_prob", nan), after.get(f"{name}/answer_prob", nan)
            lines.append(f"| {name} | {n} | {b_acc:.1%} | {a_acc:.1%} | {b_prob:.3f} | {a_prob:.3f} |")
        privacy = [key for key in self.table_rows if key in before or key in after]
        if privacy:  # memorization of the forget set, attack AUCs forget vs holdout
            lines += ["", "| metric | before | after |", "|---|---:|---:|"]
            lines += [f"| {key} | {before.get(key, nan):.4g} | {after.get(key, nan):.4g} |" for key in privacy]
        return "\n".join(lines)


BENCHMARK = QABenchmark()
