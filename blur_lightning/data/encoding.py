"""Tokenization and padding: QA rows, text chunks and prompt + continuation pairs -> ids, labels, batches.

Shared by training (the data module's batches) and evaluation (every scorer pads through
:func:`pad_side`, the one padding routine). Labels use :data:`blur_lightning.losses.functional.IGNORE_INDEX`
on tokens that carry no loss or score (prompt, padding).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

from blur_lightning.data.prompts import PromptFormat, get_prompt_format
from blur_lightning.losses.functional import IGNORE_INDEX
from blur_lightning.models.attention import PADDED_PREFIX

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

__all__ = [
    "PadCollator",
    "encode_continuations",
    "encode_prompts",
    "encode_qa",
    "encode_qa_rows",
    "encode_text_rows",
    "encode_texts",
    "pad_side",
    "split_prompt_answer",
]

Row = dict[str, list[int]]

def encode_prompts(
    tokenizer: PreTrainedTokenizerBase, questions: Sequence[str], *, prompt_format: str | PromptFormat = "auto"
) -> list[list[int]]:
    """Token ids of the prompts of questions (no answer), as :func:`format_qa` renders them."""
    fmt = get_prompt_format(prompt_format).resolve(tokenizer)
    prompts = [fmt.render(tokenizer, q)[0] for q in questions]
    if not prompts:
        return []
    return tokenizer(prompts, add_special_tokens=fmt.adds_special_tokens(tokenizer))["input_ids"]


def encode_qa(
    tokenizer: PreTrainedTokenizerBase,
    question: str,
    answer: str,
    *,
    max_length: int | None = None,
    prompt_format: str | PromptFormat = "auto",
) -> Row | None:
    """Token ids and labels of one QA row (see :func:`encode_qa_rows`); ``None`` if no answer token fits."""
    rows, _ = encode_qa_rows(tokenizer, [question], [answer], max_length=max_length, prompt_format=prompt_format)
    return rows[0]


def encode_qa_rows(
    tokenizer: PreTrainedTokenizerBase,
    questions: Sequence[str],
    answers: Sequence[str],
    *,
    max_length: int | None = None,
    prompt_format: str | PromptFormat = "auto",
) -> tuple[list[Row | None], int]:
    """Tokenize QA rows as the prompt format renders them (:mod:`blur_lightning.data.prompts`).

    Our formats tokenize prompt and answer apart, so the label boundary is exact; the field's formats
    tokenize as the field's code does (see :func:`split_prompt_answer`). Rows longer than
    ``max_length`` lose the end of their answer; a row whose prompt alone fills ``max_length`` has no
    answer token left and comes back as ``None``.

    Returns:
        ``(rows, shortened)``: per row ``{"input_ids", "labels"}`` (lists of ints, labels ``-100`` on
        the prompt) or ``None``; and how many kept rows lost part of their answer.
    """
    fmt = get_prompt_format(prompt_format).resolve(tokenizer)
    pairs = [fmt.render(tokenizer, q, a) for q, a in zip(questions, answers, strict=True)]
    if not pairs:
        return [], 0
    split = split_prompt_answer(
        tokenizer, [p for p, _ in pairs], [a for _, a in pairs],
        specials=fmt.adds_special_tokens(tokenizer), whole_text=fmt.whole_text,
    )  # fmt: skip
    rows: list[Row | None] = []
    shortened = 0
    for prompt, answer in split:
        if max_length is not None:
            room = max_length - len(prompt)
            if room <= 0 or not answer:
                rows.append(None)
                continue
            if len(answer) > room:
                answer = answer[:room]
                shortened += 1
        rows.append({"input_ids": prompt + answer, "labels": [IGNORE_INDEX] * len(prompt) + answer})
    return rows, shortened


def split_prompt_answer(
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    answer_texts: Sequence[str],
    *,
    specials: bool,
    whole_text: bool,
    append_eos: bool = False,
) -> list[tuple[list[int], list[int]]]:
    """Token ids of each prompt and of the answer text after it.

    Our formats: the prompt (with the tokenizer's special tokens when ``specials``) and the answer
    (without) tokenized apart, ``append_eos`` adding eos to every answer. The field's formats
    (``whole_text``, :attr:`PromptFormat.whole_text`): the
    whole text tokenized at once and cut at the prompt's own token count, then eos appended unless the
    text already ends with it (open-unlearning's ``preprocess_chat_instance``; TOFU counts the
    question's tokens the same way). Where a token spans the border the answer side starts one
    token late, as theirs does.
    """
    eos = tokenizer.eos_token_id
    prompt_ids = tokenizer(list(prompts), add_special_tokens=specials)["input_ids"]
    if not whole_text:
        answer_ids = tokenizer(list(answer_texts), add_special_tokens=False)["input_ids"]
        if append_eos:
            answer_ids = [ids + [eos] for ids in answer_ids]
        return list(zip(prompt_ids, answer_ids, strict=True))
    texts = [p + a for p, a in zip(prompts, answer_texts, strict=True)]
    full_ids = tokenizer(texts, add_special_tokens=specials)["input_ids"]
    out = []
    for prompt, full in zip(prompt_ids, full_ids, strict=True):
        if eos is not None and (not full or full[-1] != eos):
            full = full + [eos]
        out.append((full[: len(prompt)], full[len(prompt) :]))
    return out


def encode_text_rows(tokenizer: PreTrainedTokenizerBase, texts: Sequence[str], max_length: int) -> list[Row]:
    """Tokenize documents and cut each into chunks of at most ``max_length`` tokens.

    Each document gets the tokenizer's own special tokens plus a final eos; chunks never span two
    documents; chunks shorter than 2 tokens (nothing to predict) are dropped. Labels equal the ids.
    """
    ids_list = tokenizer([t for t in texts if t and t.strip()], add_special_tokens=True)["input_ids"]
    eos = tokenizer.eos_token_id
    rows: list[Row] = []
    for ids in ids_list:
        if eos is not None and (not ids or ids[-1] != eos):
            ids = ids + [eos]
        for start in range(0, len(ids), max_length):
            chunk = ids[start : start + max_length]
            if len(chunk) >= 2:
                rows.append({"input_ids": chunk, "labels": list(chunk)})
    return rows


def encode_continuations(
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    continuations: Sequence[str],
    *,
    append_eos: bool,
    max_length: int | None = None,
    whole_text: bool = False,
    specials: bool = True,
) -> list[Row]:
    """Rows scoring each continuation given its prompt (TOFU's answers, WMDP's answer letters).

    Prompt (with the tokenizer's special tokens) and continuation (without) are tokenized apart and
    concatenated, so the scored tokens are exactly the continuation's (no merge across the boundary);
    TOFU appends eos to the answer. ``whole_text``: tokenized as the field's prompt formats are
    (:func:`split_prompt_answer`; eos only where the text does not end with it). Rows are cut to
    ``max_length`` tokens. ``specials``: the prompt gets the tokenizer's special tokens (its bos);
    False for text a chat template rendered, which writes its own.
    """
    if not prompts:
        return []
    split = split_prompt_answer(
        tokenizer, prompts, continuations, specials=specials, whole_text=whole_text, append_eos=append_eos
    )
    rows = []
    for prompt, cont in split:
        ids = (prompt + cont)[: max_length or None]
        rows.append({"input_ids": ids, "labels": ([IGNORE_INDEX] * len(prompt) + cont)[: len(ids)]})
    return rows


def encode_texts(tokenizer: PreTrainedTokenizerBase, texts: Sequence[str], max_length: int) -> list[Row]:
    """Whole texts with the tokenizer's special tokens, cut to ``max_length``; every token after the first
    is scored (MUSE's Min-K% membership scores)."""
    ids_list = tokenizer(list(texts), add_special_tokens=True, truncation=True, max_length=max_length)["input_ids"]
    return [{"input_ids": ids, "labels": list(ids)} for ids in ids_list]


# --------------------------------------------------------------------------------------------
# Collation
# --------------------------------------------------------------------------------------------


def pad_side(
    rows: Sequence[Row],
    pad_token_id: int,
    *,
    prefix: str = "",
    pad_to_multiple_of: int | None = None,
    left: bool = False,
) -> dict[str, torch.Tensor]:
    """Pad rows of ``{"input_ids"}`` (and optionally ``"labels"``) into ``B x T`` tensors.

    Right padding by default (training, scoring); ``left=True`` for generation, which appends on the
    right. Returns ``{prefix+"input_ids", prefix+"attention_mask", prefix+"labels"}`` (int64); padding
    has ``pad_token_id``, attention 0 and label ``-100`` (rows without labels get ``-100`` everywhere).
    Also ``"padded:"+prefix+"attention_mask"``, a Python bool: known here for free, it spares the
    model's forward a read of the mask from the GPU (see ``blur_lightning.models.attention``).
    """
    width = max(len(r["input_ids"]) for r in rows)
    if pad_to_multiple_of:
        width = math.ceil(width / pad_to_multiple_of) * pad_to_multiple_of
    input_ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    for i, row in enumerate(rows):
        n = len(row["input_ids"])
        span = slice(width - n, width) if left else slice(0, n)
        input_ids[i, span] = torch.tensor(row["input_ids"], dtype=torch.long)
        attention_mask[i, span] = 1
        if "labels" in row:
            labels[i, span] = torch.tensor(row["labels"], dtype=torch.long)
    return {
        f"{prefix}input_ids": input_ids,
        f"{prefix}attention_mask": attention_mask,
        f"{prefix}labels": labels,
        f"{PADDED_PREFIX}{prefix}attention_mask": any(len(row["input_ids"]) < width for row in rows),
    }


class PadCollator:
    """Collate examples into batches; a plain, picklable callable (works with worker processes).

    Examples are either single rows (``{"input_ids", "labels"}``, optionally ``alt_input_ids`` and
    ``alt_labels``) or pairs ``{"forget": row, "retain": row}``; pairs become ``{"forget": side,
    "retain": side}``, and ``{"retain": row}`` alone (fine-tuning: data.py) becomes ``{"retain": side}``.
    """

    def __init__(self, pad_token_id: int, pad_to_multiple_of: int | None = None) -> None:
        self.pad_token_id = pad_token_id
        self.pad_to_multiple_of = pad_to_multiple_of

    def side(self, rows: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        batch = pad_side(rows, self.pad_token_id, pad_to_multiple_of=self.pad_to_multiple_of)
        if "alt_input_ids" in rows[0]:
            alt = [{"input_ids": r["alt_input_ids"], "labels": r["alt_labels"]} for r in rows]
            batch.update(pad_side(alt, self.pad_token_id, prefix="alt_", pad_to_multiple_of=self.pad_to_multiple_of))
        if "example_index" in rows[0]:  # (B,) row numbers: per-example values (the cached NPO reference)
            batch["example_index"] = torch.tensor([r["example_index"] for r in rows], dtype=torch.long)
        return batch

    def __call__(self, examples: Sequence[dict[str, Any]]) -> dict[str, Any]:
        sides = [name for name in ("forget", "retain") if isinstance(examples[0].get(name), dict)]
        if sides:
            return {name: self.side([e[name] for e in examples]) for name in sides}
        return self.side(examples)
