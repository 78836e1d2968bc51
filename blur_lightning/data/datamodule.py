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

Without a forget set (``forget_path=None``: fine-tuning, blur_lightning.training.finetune) the retain rows set
the epoch and the train loader yields ``{"retain": side}`` only, numbered with ``example_index``; the
validation loaders are then the eval set alone, if any.

Each forget row is paired with a retain row. The retain set is read as an endless stream, reshuffled
on every pass, so a shorter retain set cycles and a longer one is used in full across epochs. The
order of batches is a pure function of ``(seed, epoch)``; the train loader is resumable mid-epoch
(Lightning saves and restores its ``state_dict``), so a run resumed from any checkpoint sees the
same batches as an uninterrupted run.

Rows are read by :mod:`blur_lightning.data.rows`, tokenized by :mod:`blur_lightning.data.encoding` and paired
by :mod:`blur_lightning.data.sampling`; this module composes them into the LightningDataModule.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import lightning.pytorch as L
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch.utils.data import DataLoader

from blur_lightning.data.encoding import PadCollator, encode_qa_rows, encode_text_rows
from blur_lightning.data.prompts import get_prompt_format
from blur_lightning.data.rows import check_strings, is_local, load_rows, require_columns, resolve_embedded
from blur_lightning.data.sampling import EncodedSet, PairedDataset, PairSampler, ResumableDataLoader, SingleSideDataset
from blur_lightning.models.loading import ensure_pad_token, load_tokenizer

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

__all__ = ["FORMATS", "VAL_LOADER_NAMES", "ForgetRetainDataModule"]

FORMATS = ("qa", "text")
# The validation loaders, by dataloader_idx: the forget set, then the eval set when one is given.
VAL_LOADER_NAMES = ("forget", "eval")

Row = dict[str, list[int]]


class ForgetRetainDataModule(L.LightningDataModule):
    """Forget and retain sets, tokenized and paired for unlearning (batch contract: see module doc).

    Args:
        forget_path: forget set: a local JSON/JSONL/CSV/Parquet file, a hub dataset name, or
            ``"embedded:NAME.jsonl"`` (a file in ``blur_lightning/assets/``); None: no forget set,
            the retain set alone is the training set (fine-tuning, see the module docstring).
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
        prompt_format: how ``qa`` rows become text, a name of
            :data:`blur_lightning.data.prompts.PROMPT_FORMATS`: ``"auto"`` (the tokenizer's chat
            template when it has one, else ``"qa"``), ``"qa"``, or the format a reference model was
            trained with (``"open-unlearning/llama3-instruct"``, ``"tofu/phi"``...).
        use_chat_template: deprecated; ``False`` is ``prompt_format="qa"``.
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
        forget_path: str | None = "embedded:qa_forget.jsonl",
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
        prompt_format: str = "auto",
        use_chat_template: bool | None = None,
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
        if use_chat_template is not None:
            if prompt_format != "auto":
                raise ValueError(
                    f"use_chat_template={use_chat_template} and prompt_format={prompt_format!r} both given: "
                    "set prompt_format only (use_chat_template is deprecated)"
                )
            prompt_format = "auto" if use_chat_template else "qa"
            use_chat_template = None  # saved hyperparameters rebuild the module from prompt_format alone
        get_prompt_format(prompt_format)  # an unknown name fails here, naming the known ones
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
        self.prompt_format = prompt_format
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
            if not is_local(resolve_embedded(path)):
                load_rows(path, subset=subset, split=split)

    def _sources(self) -> list[tuple[str, str | None, str]]:
        sources = [(self.retain_path, self.retain_subset, self.splits["retain"])]
        if self.forget_path is not None:
            sources.insert(0, (self.forget_path, self.forget_subset, self.splits["forget"]))
        if self.eval_path is not None:
            sources.append((self.eval_path, self.eval_subset, self.splits["eval"]))
        return sources

    def setup(self, stage: str | None = None) -> None:
        """Load the tokenizer and encode all sets (once; later calls are no-ops)."""
        if self.tokenizer is None:
            self.tokenizer = load_tokenizer(self.tokenizer_name)
        if self.forget_rows is None and self.forget_path is not None:
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
        rows_in = load_rows(path, subset=subset, split=self.splits[name])
        if fmt == "text":
            require_columns(rows_in, [self.text_column], path, "format 'text'")
            texts = check_strings(rows_in, self.text_column, path)
            rows = encode_text_rows(self.tokenizer, texts, self.max_length)
            if not rows:
                raise ValueError(f"{path}: empty set (no text with at least 2 tokens)")
            return rows

        required = [self.question_column, self.answer_column] + ([idk_column] if idk_column else [])
        require_columns(rows_in, required, path, "format 'qa'")
        columns = {c: check_strings(rows_in, c, path) for c in required}
        questions, answers = columns[self.question_column], columns[self.answer_column]
        kwargs = {"max_length": self.max_length, "prompt_format": self.prompt_format}
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

    def collator(self) -> PadCollator:
        """How this module pads a list of encoded rows into a batch (the NPO reference cache batches the
        forget rows with it, so its log-probs are computed on exactly the training batches' padding)."""
        assert self.tokenizer is not None
        return PadCollator(self.tokenizer.pad_token_id, self.pad_to_multiple_of)

    def train_dataloader(self) -> ResumableDataLoader:
        """Paired forget/retain batches (see the module docstring for the batch contract)."""
        if self.retain_rows is None or (self.forget_rows is None and self.forget_path is not None):
            self.setup("fit")
        if self.forget_path is None:
            dataset: PairedDataset = SingleSideDataset(self.retain_rows)
        else:
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
            collate_fn=self.collator(),
            num_workers=self.num_workers,
            drop_last=self.drop_last,
        )

    @property
    def val_loader_names(self) -> list[str]:
        """Names of the validation loaders, by ``dataloader_idx``."""
        names = list(VAL_LOADER_NAMES[: 2 if self.eval_path is not None else 1])
        return names if self.forget_path is not None else names[1:]

    def val_dataloader(self) -> list[DataLoader]:
        """Unshuffled single-side loaders: ``[forget]`` or ``[forget, eval]`` (see ``val_loader_names``)."""
        if self.retain_rows is None:
            self.setup("validate")
        sets = ([self.forget_rows] if self.forget_path is not None else []) + (
            [self.eval_rows] if self.eval_path is not None else []
        )
        return [
            DataLoader(
                EncodedSet([{"input_ids": r["input_ids"], "labels": r["labels"]} for r in rows]),
                batch_size=self.eval_batch_size,
                shuffle=False,
                collate_fn=self.collator(),
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
            The rows, for generation-based evaluation (:func:`blur_lightning.evals.qa.evaluate_qa`).
        """
        if name not in self.raw:
            raise KeyError(f"no qa rows named {name!r}; have {sorted(self.raw)} (call setup() first)")
        return self.raw[name]
