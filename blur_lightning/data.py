"""Forget and retain data for unlearning: loading, tokenization, pairing and the batch contract.

Batch contract (what :class:`ForgetRetainDataModule` hands the LightningModule):

* ``train_dataloader()`` yields ``{"forget": side, "retain": side}``;
* each side is a dict of right-padded tensors, all ``B x T`` (``T`` is the longest row of that side in
  the batch, rounded up to ``pad_to_multiple_of`` when set):

  - ``input_ids`` (int64), ``attention_mask`` (int64, 1 on real tokens),
  - ``labels`` (int64): the token ids where the loss counts and ``-100`` elsewhere. For ``qa`` rows
    the loss counts only on the answer tokens (the assistant reply, including its end-of-turn token);
    for ``text`` rows on every real token. Padding is always ``-100``. Labels are *not* shifted:
    Hugging Face models shift them internally;

* the forget side also has ``example_index`` (int64, ``B``): each row's index in ``forget_rows``;
* with ``idk_column`` set, the forget side also has ``alt_input_ids``, ``alt_attention_mask`` and
  ``alt_labels``: the same question answered with the refusal in that column (for the ``idk`` loss);
* ``val_dataloader()`` returns a list of loaders yielding single sides (``input_ids``,
  ``attention_mask``, ``labels``): index 0 is the forget set, index 1 the ``eval_path`` set when
  given; ``val_loader_names`` names them.

Each forget row is paired with a retain row. The retain set is read as an endless stream, reshuffled
on every pass, so a shorter retain set cycles and a longer one is used in full across epochs. The
order of batches is a pure function of ``(seed, epoch)``; the train loader is resumable mid-epoch
(Lightning saves and restores its ``state_dict``), so a run resumed from any checkpoint sees the
same batches as an uninterrupted run.

``datasets`` is imported only inside the functions that load files, so importing this module (and
``blur_lightning``) does not need it.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator, Sequence
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

import lightning.pytorch as L
import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from blur_lightning.attention import PADDED_PREFIX
from blur_lightning.models import ensure_pad_token, load_tokenizer

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

__all__ = [
    "EMBEDDED_DATA_PREFIX",
    "FORMATS",
    "IGNORE_INDEX",
    "EncodedSet",
    "ForgetRetainDataModule",
    "PadCollator",
    "PairSampler",
    "PairedDataset",
    "ResumableDataLoader",
    "encode_prompts",
    "encode_qa",
    "encode_qa_rows",
    "encode_text_rows",
    "format_qa",
    "load_rows",
    "pad_side",
    "resolve_data_path",
]

FORMATS = ("qa", "text")
IGNORE_INDEX = -100
EMBEDDED_DATA_PREFIX = "embedded:"
# Prompt used when the tokenizer has no chat template (or use_chat_template=False).
PLAIN_PROMPT = "Question: {question}\nAnswer:"

_BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet", ".pq": "parquet"}

Row = dict[str, list[int]]


# --------------------------------------------------------------------------------------------
# Loading rows
# --------------------------------------------------------------------------------------------


def resolve_data_path(path: str) -> str:
    """Map ``"embedded:NAME.jsonl"`` to the file in ``blur_lightning/assets/``; pass others through.

    Raises:
        FileNotFoundError: no such embedded file (the message lists those that exist).
    """
    if not path.startswith(EMBEDDED_DATA_PREFIX):
        return path
    name = path[len(EMBEDDED_DATA_PREFIX) :]
    assets = resources.files("blur_lightning.assets")
    target = assets / name
    if not target.is_file():
        available = sorted(p.name for p in assets.iterdir() if p.name.endswith(_EXTENSIONS))
        raise FileNotFoundError(f"embedded data file {name!r} not found; available: {available}")
    return str(target)


_EXTENSIONS = tuple(_BUILDERS)


def _is_local(path: str) -> bool:
    return (
        os.path.exists(path) or Path(path).suffix.lower() in _BUILDERS or path.startswith(("/", "./", "../", "~", "."))
    )


def _has_rows(path: Path, builder: str) -> bool:
    """Cheap emptiness check before ``datasets`` turns an empty file into an obscure error."""
    if builder == "parquet":
        return path.stat().st_size > 0
    with path.open(encoding="utf-8", errors="replace") as f:
        lines = 0
        for line in f:
            if line.strip():
                lines += 1
                # a CSV needs a header and one row; JSON(L) one non-blank line
                if lines >= (2 if builder == "csv" else 1):
                    return True
    return False


def load_rows(path: str, *, subset: str | None = None, split: str = "train") -> Any:
    """Load a table of rows as a ``datasets.Dataset``.

    Args:
        path: a local ``.json``/``.jsonl``/``.csv``/``.parquet`` file, a local directory that
            ``datasets.load_dataset`` understands, ``"embedded:NAME.jsonl"`` (a file shipped in
            ``blur_lightning/assets/``), or a Hugging Face hub dataset name.
        subset: dataset configuration name for hub datasets (e.g. ``"forget10"`` for TOFU).
        split: split to read (local files always have a single ``"train"`` split).

    Raises:
        FileNotFoundError: a local path that does not exist (named in the message).
        ValueError: an empty file or an empty split, or an unknown file type.
    """
    import datasets

    resolved = resolve_data_path(path)
    if _is_local(resolved):
        local = Path(resolved).expanduser()
        if not local.exists():
            raise FileNotFoundError(f"data file not found: {local}")
        if local.is_dir():
            ds = datasets.load_dataset(str(local), subset, split=split)
        else:
            builder = _BUILDERS.get(local.suffix.lower())
            if builder is None:
                raise ValueError(f"{local}: unsupported file type {local.suffix!r}; use one of {_EXTENSIONS}")
            if not _has_rows(local, builder):
                raise ValueError(f"{local}: the file is empty (no rows)")
            # A progress bar per small local file is noise: silence it, then restore the setting.
            quiet = datasets.utils.are_progress_bars_disabled()
            datasets.utils.disable_progress_bars()
            try:
                ds = datasets.load_dataset(builder, data_files=str(local), split="train")
            except Exception as err:  # datasets wraps the parser's error without the line
                raise _unreadable(local, builder, err) from err
            finally:
                if not quiet:
                    datasets.utils.enable_progress_bars()
    else:
        ds = datasets.load_dataset(resolved, subset, split=split)
    if len(ds) == 0:
        raise ValueError(f"{path}: empty set (0 rows in split {split!r})")
    return ds


def _unreadable(path: Path, builder: str, err: Exception) -> ValueError:
    """Why a local file did not load: for JSON the first bad line (formats.read_rows reads it
    again, line by line), else the parser's own reason."""
    if builder == "json":
        from blur_lightning.formats import read_rows

        try:
            read_rows(path)
        except ValueError as bad:
            return bad
    cause = err.__cause__ or err
    reason = str(cause).strip().splitlines()[0][:200] if str(cause).strip() else ""
    return ValueError(f"{path}: could not be read as {builder} ({type(cause).__name__}: {reason})")


def _check_strings(values: Sequence[Any], path: str, column: str) -> None:
    """Each cell a string: a number or a list would otherwise fail deep in the chat template."""
    for index, value in enumerate(values):
        if value is None:
            count = sum(v is None for v in values)
            raise ValueError(f"{path}: column {column!r} is empty in {count} row(s), first row {index}")
        if not isinstance(value, str):
            raise ValueError(
                f"{path}: column {column!r} must hold text; row {index} holds {type(value).__name__} {value!r:.80}"
            )


def _check_columns(ds: Any, required: Sequence[str], path: str, what: str) -> None:
    missing = [c for c in required if c not in ds.column_names]
    if missing:
        raise ValueError(
            f"{path}: missing column(s) {missing} needed for {what}; found columns: {list(ds.column_names)}"
        )


# --------------------------------------------------------------------------------------------
# Prompt format and tokenization
# --------------------------------------------------------------------------------------------


def format_qa(
    tokenizer: PreTrainedTokenizerBase,
    question: str,
    answer: str | None = None,
    *,
    use_chat_template: bool = True,
) -> tuple[str, str]:
    """The prompt text and the answer text of one QA row, as training and evaluation both see them.

    With a chat template, the prompt is the rendered user turn plus the generation prompt and the
    answer is the rest of the rendered conversation (the assistant reply and its end-of-turn token,
    trailing whitespace dropped). Without one, the prompt is ``"Question: {question}\\nAnswer:"`` and
    the answer is ``" {answer}"`` followed by the eos token.

    Returns:
        ``(prompt, answer_text)``; ``answer_text`` is ``""`` when ``answer`` is ``None``.
    """
    if use_chat_template and getattr(tokenizer, "chat_template", None):
        user = [{"role": "user", "content": question}]
        prompt = tokenizer.apply_chat_template(user, add_generation_prompt=True, tokenize=False)
        if answer is None:
            return prompt, ""
        full = tokenizer.apply_chat_template(user + [{"role": "assistant", "content": answer}], tokenize=False)
        if not full.startswith(prompt):
            raise ValueError(
                "the chat template renders the prompt differently with and without the answer; "
                "pass use_chat_template=False"
            )
        return prompt, full[len(prompt) :].rstrip()
    prompt = PLAIN_PROMPT.format(question=question)
    if answer is None:
        return prompt, ""
    return prompt, f" {answer}{tokenizer.eos_token or ''}"


def _prompt_specials(tokenizer: PreTrainedTokenizerBase, use_chat_template: bool) -> bool:
    # A chat template writes its own special tokens; the plain prompt gets the tokenizer's (e.g. bos).
    return not (use_chat_template and getattr(tokenizer, "chat_template", None))


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


# --------------------------------------------------------------------------------------------
# Collation
# --------------------------------------------------------------------------------------------


def pad_side(
    rows: Sequence[Row], pad_token_id: int, *, prefix: str = "", pad_to_multiple_of: int | None = None
) -> dict[str, torch.Tensor]:
    """Right-pad rows of ``{"input_ids", "labels"}`` into ``B x T`` tensors.

    Returns ``{prefix+"input_ids", prefix+"attention_mask", prefix+"labels"}`` (int64); padding has
    ``pad_token_id``, attention 0 and label ``-100``. Also ``"padded:"+prefix+"attention_mask"``, a
    Python bool: known here for free, it spares the model's forward a read of the mask from the GPU
    (see ``blur_lightning.attention``).
    """
    width = max(len(r["input_ids"]) for r in rows)
    if pad_to_multiple_of:
        width = math.ceil(width / pad_to_multiple_of) * pad_to_multiple_of
    input_ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    for i, row in enumerate(rows):
        n = len(row["input_ids"])
        input_ids[i, :n] = torch.tensor(row["input_ids"], dtype=torch.long)
        attention_mask[i, :n] = 1
        labels[i, :n] = torch.tensor(row["labels"], dtype=torch.long)
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
    "retain": side}``.
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
        if "forget" in examples[0]:
            return {
                "forget": self.side([e["forget"] for e in examples]),
                "retain": self.side([e["retain"] for e in examples]),
            }
        return self.side(examples)


# --------------------------------------------------------------------------------------------
# Pairing, ordering, resuming
# --------------------------------------------------------------------------------------------


class EncodedSet(Dataset):
    """A list of encoded rows as a map-style dataset."""

    def __init__(self, rows: Sequence[dict[str, Any]]) -> None:
        self.rows = list(rows)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.rows[index]


class PairedDataset(Dataset):
    """Indexed by ``(forget_index, retain_index)`` pairs, as :class:`PairSampler` yields them."""

    def __init__(self, forget: Sequence[dict[str, Any]], retain: Sequence[dict[str, Any]]) -> None:
        self.forget = list(forget)
        self.retain = list(retain)

    def __len__(self) -> int:
        return len(self.forget)

    def __getitem__(self, index: tuple[int, int]) -> dict[str, Any]:
        forget_index, retain_index = index
        forget = {**self.forget[forget_index], "example_index": forget_index}  # numbered: see PadCollator
        return {"forget": forget, "retain": self.retain[retain_index]}


def _permutation(n: int, seed: int, stream: int, counter: int, shuffle: bool) -> np.ndarray:
    if not shuffle:
        return np.arange(n)
    # SeedSequence of (seed, stream, counter): independent streams, no arithmetic collisions.
    return np.random.default_rng([seed, stream, counter]).permutation(n)


class PairSampler(DistributedSampler):
    """Yields ``(forget_index, retain_index)`` pairs in an order that depends only on (seed, epoch).

    Forget order: a permutation of the forget rows per epoch (identity with ``shuffle=False``),
    padded by repetition to a multiple of ``num_replicas`` like ``DistributedSampler``; rank ``r``
    takes positions ``r, r + num_replicas, ...``. Retain order: the ``g``-th pair of the run
    (``g = epoch * total_size + position``) gets row ``g mod n_retain`` of the retain permutation of
    pass ``g // n_retain``. So a short retain set cycles, reshuffled on every pass, and a long one is
    walked through across epochs instead of restarting each epoch.

    It subclasses ``DistributedSampler`` so that Lightning keeps it (Lightning only replaces samplers
    that are not already distributed) and calls ``set_epoch`` on it every epoch.
    """

    def __init__(
        self,
        dataset: PairedDataset,
        *,
        shuffle: bool = True,
        seed: int = 0,
        num_replicas: int = 1,
        rank: int = 0,
        drop_last: bool = False,
    ) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed, drop_last=drop_last)
        self.n_forget = len(dataset.forget)
        self.n_retain = len(dataset.retain)
        self._skip = 0  # samples to skip on the next __iter__ only (mid-epoch resume)
        self._retain_perms: dict[int, np.ndarray] = {}

    def forget_order(self, epoch: int) -> list[int]:
        """All ranks' forget indices of ``epoch``, padded or trimmed to ``total_size``."""
        order = _permutation(self.n_forget, self.seed, 0, epoch, self.shuffle).tolist()
        if self.drop_last:
            return order[: self.total_size]
        while len(order) < self.total_size:
            order += order[: self.total_size - len(order)]
        return order

    def retain_index(self, position: int) -> int:
        """Retain row of the ``position``-th pair of the run (counted over all epochs and ranks)."""
        cycle, offset = divmod(position, self.n_retain)
        if cycle not in self._retain_perms:
            if len(self._retain_perms) > 4:  # an epoch spans few retain passes; keep memory flat
                self._retain_perms.clear()
            self._retain_perms[cycle] = _permutation(self.n_retain, self.seed, 1, cycle, self.shuffle)
        return int(self._retain_perms[cycle][offset])

    def skip_next(self, samples: int) -> None:
        """Make the next ``__iter__`` start ``samples`` into this rank's share of the epoch."""
        self._skip = samples

    def __iter__(self) -> Iterator[tuple[int, int]]:
        skip, self._skip = self._skip, 0
        order = self.forget_order(self.epoch)
        base = self.epoch * self.total_size
        positions = range(self.rank, self.total_size, self.num_replicas)
        return iter([(order[p], self.retain_index(base + p)) for p in positions[skip:]])

    def __len__(self) -> int:
        return self.num_samples


class ResumableDataLoader(DataLoader):
    """A ``DataLoader`` over a :class:`PairSampler` that can resume mid-epoch.

    Lightning (2.x) stores ``state_dict()`` of every train loader that has ``state_dict`` and
    ``load_state_dict`` in the checkpoint, and calls ``load_state_dict`` before iterating again when
    it restarts mid-epoch. The state is the epoch and how many batches were handed out in it; on
    resume the sampler starts that many batches in (indices only: no data is loaded for the skipped
    batches). ``len()`` stays the full epoch length, as Lightning expects.
    """

    def __init__(self, dataset: PairedDataset, *args: Any, **kwargs: Any) -> None:
        super().__init__(dataset, *args, **kwargs)
        self._epoch = 0
        self._yielded = 0
        self._pending: dict[str, int] | None = None

    @property
    def _pair_sampler(self) -> PairSampler:
        sampler = self.sampler
        if not isinstance(sampler, PairSampler):
            raise TypeError(f"ResumableDataLoader needs a PairSampler, got {type(sampler).__name__}")
        return sampler

    def _fingerprint(self) -> dict[str, int]:
        s = self._pair_sampler
        return {
            "seed": s.seed,
            "n_forget": s.n_forget,
            "n_retain": s.n_retain,
            "num_replicas": s.num_replicas,
            "batch_size": self.batch_size or 0,
            "shuffle": int(s.shuffle),
        }

    def state_dict(self) -> dict[str, int]:
        if self._pending is not None:
            return dict(self._pending)
        # Nothing handed out yet in this epoch: report the epoch Lightning set (0 batches either way).
        epoch = self._epoch if self._yielded else self._pair_sampler.epoch
        return {"epoch": epoch, "batches": self._yielded, **self._fingerprint()}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        expected = self._fingerprint()
        changed = {k: (state_dict.get(k), v) for k, v in expected.items() if state_dict.get(k) != v}
        if changed:
            rank_zero_warn(
                f"the training data changed since the checkpoint (saved, now): {changed}; the resumed "
                "epoch restarts from its first batch instead of continuing exactly"
            )
            self._pending = None
            return
        self._pending = dict(state_dict)

    def __iter__(self) -> Iterator[Any]:
        sampler = self._pair_sampler
        skip = 0
        if self._pending is not None:
            # A state of another epoch is stale (Lightning moved on, e.g. the checkpoint was taken
            # on the epoch's last batch): start that epoch from the top.
            if self._pending["epoch"] == sampler.epoch:
                skip = min(self._pending["batches"], len(self))
            self._pending = None
        self._epoch, self._yielded = sampler.epoch, skip
        sampler.skip_next(skip * (self.batch_size or 1))
        # Creating the base iterator here (on first next(), after Lightning's set_epoch) keeps the
        # epoch right even with worker processes, which prefetch indices as soon as they start.
        for batch in super().__iter__():
            self._yielded += 1
            yield batch


# --------------------------------------------------------------------------------------------
# The LightningDataModule
# --------------------------------------------------------------------------------------------


class ForgetRetainDataModule(L.LightningDataModule):
    """Forget and retain sets, tokenized and paired for unlearning (batch contract: see module doc).

    Args:
        forget_path: forget set: a local JSON/JSONL/CSV/Parquet file, a hub dataset name, or
            ``"embedded:NAME.jsonl"`` (a file in ``blur_lightning/assets/``).
        retain_path: retain set, same forms.
        tokenizer: tokenizer name or path, or ``"embedded:smollm2-135m-instruct"``; the CLI links it
            from the model. A tokenizer without a pad token pads with eos (with a warning).
        format: ``"qa"`` (question/answer rows, loss on the answer tokens only; chat template applied
            when the tokenizer has one) or ``"text"`` (raw documents chunked to ``max_length``).
        question_column: question column of ``qa`` sets.
        answer_column: answer column of ``qa`` sets.
        idk_column: column with a refusal answer to the same question (e.g. ``"idk"``); when set,
            forget batches also carry ``alt_input_ids``/``alt_attention_mask``/``alt_labels``.
        max_length: most tokens per row; ``qa`` answers are cut at the end, rows whose answer does not
            fit at all are skipped (with a warning giving the count).
        batch_size: rows per side per batch.
        shuffle: reshuffle the training pairs every epoch (order = function of seed and epoch).
        seed: seed of the training order.
        num_workers: ``DataLoader`` worker processes.
        eval_path: optional held-out set (same format as the retain set) for validation.
        retain_format: format of the retain and eval sets when different from ``format``.
        text_column: text column of ``text`` sets.
        use_chat_template: apply the tokenizer's chat template to ``qa`` rows when it has one.
        forget_subset: dataset configuration of a hub forget set (e.g. ``"forget10"``).
        retain_subset: dataset configuration of a hub retain set (e.g. ``"retain90"``).
        eval_subset: dataset configuration of a hub eval set.
        split: split to read from hub datasets.
        forget_split: split of the forget set when different from ``split`` (e.g. MUSE ``"forget"``).
        retain_split: split of the retain set when different from ``split`` (e.g. MUSE ``"retain1"``,
            wikitext ``"test"``).
        eval_split: split of the eval set when different from ``split``.
        eval_batch_size: batch size of the validation loaders; defaults to ``batch_size``.
        pad_to_multiple_of: round the padded length up to a multiple of this (e.g. 8 or 64).
        drop_last: drop the last, smaller forget batch of every epoch.
    """

    def __init__(
        self,
        forget_path: str = "embedded:qa_forget.jsonl",
        retain_path: str = "embedded:qa_retain.jsonl",
        tokenizer: str = "embedded:smollm2-135m-instruct",
        format: str = "qa",
        question_column: str = "question",
        answer_column: str = "answer",
        idk_column: str | None = None,
        max_length: int = 128,
        batch_size: int = 8,
        shuffle: bool = True,
        seed: int = 0,
        num_workers: int = 0,
        eval_path: str | None = None,
        retain_format: str | None = None,
        text_column: str = "text",
        use_chat_template: bool = True,
        forget_subset: str | None = None,
        retain_subset: str | None = None,
        eval_subset: str | None = None,
        split: str = "train",
        forget_split: str | None = None,
        retain_split: str | None = None,
        eval_split: str | None = None,
        eval_batch_size: int | None = None,
        pad_to_multiple_of: int | None = None,
        drop_last: bool = False,
    ) -> None:
        super().__init__()
        for name, value in (("format", format), ("retain_format", retain_format or format)):
            if value not in FORMATS:
                raise ValueError(f"{name} must be one of {FORMATS}, got {value!r}")
        if idk_column is not None and format != "qa":
            raise ValueError("idk_column needs format='qa' (a refusal answers a question)")
        if max_length < 2:
            raise ValueError(f"max_length must be at least 2, got {max_length}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.save_hyperparameters()
        self.forget_path = forget_path
        self.retain_path = retain_path
        self.tokenizer_name = tokenizer
        self.format = format
        self.retain_format = retain_format or format
        self.question_column = question_column
        self.answer_column = answer_column
        self.idk_column = idk_column
        self.max_length = max_length
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.num_workers = num_workers
        self.eval_path = eval_path
        self.text_column = text_column
        self.use_chat_template = use_chat_template
        self.forget_subset = forget_subset
        self.retain_subset = retain_subset
        self.eval_subset = eval_subset
        self.split = split
        # One hub dataset often holds forget and retain as two splits of one config (MUSE raw:
        # forget / retain1), or they come from datasets with different splits (WMDP corpora: train,
        # wikitext: test).
        self.splits = {
            "forget": forget_split or split,
            "retain": retain_split or split,
            "eval": eval_split or split,
        }
        self.eval_batch_size = eval_batch_size or batch_size
        self.pad_to_multiple_of = pad_to_multiple_of
        self.drop_last = drop_last

        self.tokenizer: PreTrainedTokenizerBase | None = None
        self.forget_rows: list[dict[str, Any]] | None = None
        self.retain_rows: list[dict[str, Any]] | None = None
        self.eval_rows: list[dict[str, Any]] | None = None
        self.raw: dict[str, list[dict[str, Any]]] = {}

    # ----- setup -----

    def prepare_data(self) -> None:
        """Download hub datasets once per node (local files need nothing)."""
        for path, subset, split in self._sources():
            if not _is_local(resolve_data_path(path)):
                load_rows(path, subset=subset, split=split)

    def _sources(self) -> list[tuple[str, str | None, str]]:
        sources = [
            (self.forget_path, self.forget_subset, self.splits["forget"]),
            (self.retain_path, self.retain_subset, self.splits["retain"]),
        ]
        if self.eval_path is not None:
            sources.append((self.eval_path, self.eval_subset, self.splits["eval"]))
        return sources

    def setup(self, stage: str | None = None) -> None:
        """Load the tokenizer and encode all sets (once; later calls are no-ops)."""
        if self.tokenizer is None:
            self.tokenizer = load_tokenizer(self.tokenizer_name)
        if self.forget_rows is None:
            self.forget_rows = self._encode(
                "forget", self.forget_path, self.forget_subset, self.format, self.idk_column
            )
        if self.retain_rows is None:
            self.retain_rows = self._encode("retain", self.retain_path, self.retain_subset, self.retain_format)
        if self.eval_path is not None and self.eval_rows is None:
            self.eval_rows = self._encode("eval", self.eval_path, self.eval_subset, self.retain_format)

    def set_tokenizer(self, tokenizer: PreTrainedTokenizerBase) -> None:
        """Use an already loaded tokenizer instead of loading ``tokenizer`` by name (call before setup)."""
        self.tokenizer = ensure_pad_token(tokenizer)

    def _encode(
        self, name: str, path: str, subset: str | None, fmt: str, idk_column: str | None = None
    ) -> list[dict[str, Any]]:
        assert self.tokenizer is not None
        ds = load_rows(path, subset=subset, split=self.splits[name])
        if fmt == "text":
            _check_columns(ds, [self.text_column], path, "format 'text'")
            _check_strings(ds[self.text_column], path, self.text_column)
            rows = encode_text_rows(self.tokenizer, ds[self.text_column], self.max_length)
            if not rows:
                raise ValueError(f"{path}: empty set (no text with at least 2 tokens)")
            return rows

        required = [self.question_column, self.answer_column] + ([idk_column] if idk_column else [])
        _check_columns(ds, required, path, "format 'qa'")
        columns = {c: ds[c] for c in required}
        for column, values in columns.items():
            _check_strings(values, path, column)
        questions, answers = columns[self.question_column], columns[self.answer_column]
        kwargs = {"max_length": self.max_length, "use_chat_template": self.use_chat_template}
        encoded, shortened = encode_qa_rows(self.tokenizer, questions, answers, **kwargs)
        alts: list[Row | None] = [None] * len(encoded)
        if idk_column:
            alts, alt_shortened = encode_qa_rows(self.tokenizer, questions, columns[idk_column], **kwargs)
            shortened += alt_shortened

        rows, raw, dropped = [], [], 0
        for i, (row, alt) in enumerate(zip(encoded, alts)):
            if row is None or (idk_column and alt is None):
                dropped += 1
                continue
            if alt is not None:
                row = {**row, "alt_input_ids": alt["input_ids"], "alt_labels": alt["labels"]}
            rows.append(row)
            raw.append({"question": questions[i], "answer": answers[i]})
        if dropped:
            message = (
                f"{path}: {dropped} of {len(encoded)} {name} rows have no answer token left within "
                f"max_length={self.max_length} (the prompt fills it)"
            )
            if not rows:
                raise ValueError(message + "; none left: raise max_length")
            rank_zero_warn(message + "; skipping them")
        if shortened:
            rank_zero_warn(f"{path}: {shortened} {name} answers were cut short to fit max_length={self.max_length}")
        self.raw[name] = raw
        return rows

    # ----- loaders -----

    def _replicas(self) -> tuple[int, int]:
        kwargs = getattr(self.trainer, "distributed_sampler_kwargs", None) if self.trainer is not None else None
        if kwargs:
            return int(kwargs["num_replicas"]), int(kwargs["rank"])
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            return torch.distributed.get_world_size(), torch.distributed.get_rank()
        return 1, 0

    def _collator(self) -> PadCollator:
        assert self.tokenizer is not None
        return PadCollator(self.tokenizer.pad_token_id, self.pad_to_multiple_of)

    def train_dataloader(self) -> ResumableDataLoader:
        """Paired forget/retain batches (see the module docstring for the batch contract)."""
        if self.forget_rows is None or self.retain_rows is None:
            self.setup("fit")
        dataset = PairedDataset(self.forget_rows, self.retain_rows)
        num_replicas, rank = self._replicas()
        sampler = PairSampler(
            dataset,
            shuffle=self.shuffle,
            seed=self.seed,
            num_replicas=num_replicas,
            rank=rank,
            drop_last=self.drop_last,
        )
        return ResumableDataLoader(
            dataset,
            batch_size=self.batch_size,
            sampler=sampler,
            collate_fn=self._collator(),
            num_workers=self.num_workers,
            drop_last=self.drop_last,
        )

    @property
    def val_loader_names(self) -> list[str]:
        """Names of the validation loaders, by ``dataloader_idx``."""
        return ["forget"] + (["eval"] if self.eval_path is not None else [])

    def val_dataloader(self) -> list[DataLoader]:
        """Unshuffled single-side loaders: ``[forget]`` or ``[forget, eval]`` (see ``val_loader_names``)."""
        if self.forget_rows is None:
            self.setup("validate")
        sets = [self.forget_rows] + ([self.eval_rows] if self.eval_path is not None else [])
        return [
            DataLoader(
                EncodedSet([{"input_ids": r["input_ids"], "labels": r["labels"]} for r in rows]),
                batch_size=self.eval_batch_size,
                shuffle=False,
                collate_fn=self._collator(),
                num_workers=self.num_workers,
            )
            for rows in sets
        ]

    def test_dataloader(self) -> list[DataLoader]:
        """The validation loaders, so `trainer.test` (and `blur-lightning test`) runs on the same sets."""
        return self.val_dataloader()

    def qa_rows(self, name: str) -> list[dict[str, Any]]:
        """Raw ``{"question", "answer"}`` rows of a ``qa`` set that survived encoding.

        Args:
            name: ``"forget"``, ``"retain"`` or ``"eval"``.

        Returns:
            The rows, for generation-based evaluation (:func:`blur_lightning.evaluation.evaluate_qa`).
        """
        if name not in self.raw:
            raise KeyError(f"no qa rows named {name!r}; have {sorted(self.raw)} (call setup() first)")
        return self.raw[name]
