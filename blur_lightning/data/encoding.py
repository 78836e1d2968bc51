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

from blur_lightning.data.prompts import format_qa, has_chat_template
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
]

Row = dict[str, list[int]]

def _prompt_specials(tokenizer: PreTrainedTokenizerBase, use_chat_template: bool) -> bool:
    # A chat template writes its own special tokens; the plain prompt gets the tokenizer's (e.g. bos).
    return not (use_chat_template and has_chat_template(tokenizer))


def encode_prompts(
    tokenizer: PreTrainedTokenizerBase, questions: Sequence[str], *, use_chat_template: bool = True
) -> list[list[int]]:
    """Token ids of the prompts of questions (no answer), as :func:`format_qa` renders them."""
    prompts = [format_qa(tokenizer, q, use_chat_template=use_chat_template)[0] for q in questions]
    if not prompts:
        return []
    return tokenizer(prompts, add_special_tokens=_prompt_specials(tokenizer, use_chat_template))["input_ids"]


def encode_qa(
    tokenizer: PreTrainedTokenizerBase,
    question: str,
    answer: str,
    *,
    max_length: int | None = None,
    use_chat_template: bool = True,
) -> Row | None:
    """Token ids and labels of one QA row (see :func:`encode_qa_rows`); ``None`` if no answer token fits."""
    rows, _ = encode_qa_rows(
        tokenizer, [question], [answer], max_length=max_length, use_chat_template=use_chat_template
    )
    return rows[0]


def encode_qa_rows(
    tokenizer: PreTrainedTokenizerBase,
    questions: Sequence[str],
    answers: Sequence[str],
    *,
    max_length: int | None = None,
    use_chat_template: bool = True,
) -> tuple[list[Row | None], int]:
    """Tokenize QA rows: prompt and answer tokenized separately, so the label boundary is exact.

    Rows longer than ``max_length`` lose the end of their answer; a row whose prompt alone fills
    ``max_length`` has no answer token left and comes back as ``None``.

    Returns:
        ``(rows, shortened)``: per row ``{"input_ids", "labels"}`` (lists of ints, labels ``-100`` on
        the prompt) or ``None``; and how many kept rows lost part of their answer.
    """
    pairs = [
        format_qa(tokenizer, q, a, use_chat_template=use_chat_template) for q, a in zip(questions, answers, strict=True)
    ]
    if not pairs:
        return [], 0
    specials = _prompt_specials(tokenizer, use_chat_template)
    prompt_ids = tokenizer([p for p, _ in pairs], add_special_tokens=specials)["input_ids"]
    answer_ids = tokenizer([a for _, a in pairs], add_special_tokens=False)["input_ids"]
    rows: list[Row | None] = []
    shortened = 0
    for prompt, answer in zip(prompt_ids, answer_ids):
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
) -> list[Row]:
    """Rows scoring each continuation given its prompt (TOFU's answers, WMDP's answer letters).

    Prompt (with the tokenizer's special tokens) and continuation (without) are tokenized apart and
    concatenated, so the scored tokens are exactly the continuation's (no merge across the boundary);
    TOFU appends eos to the answer. Rows are cut to ``max_length`` tokens.
    """
    if not prompts:
        return []
    prompt_ids = tokenizer(list(prompts), add_special_tokens=True)["input_ids"]
    cont_ids = tokenizer(list(continuations), add_special_tokens=False)["input_ids"]
    rows = []
    for prompt, cont in zip(prompt_ids, cont_ids, strict=True):
        if append_eos:
            cont = cont + [tokenizer.eos_token_id]
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
