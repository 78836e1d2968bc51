"""MUSE (Shi et al. 2024, `muse-bench/MUSE-News`, `-Books`): its splits and its evaluation (muse_bench eval.py).

Hub configs: text corpora (raw, privleak, ...) with a `text` column; knowmem QA with question /
answer; verbmem with prompt / gt. MUSE's GitHub files store text corpora as a JSON list of strings;
those load as {"text": s}. Metric definitions: :mod:`blur_lightning.evals.metrics`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from blur_lightning.data.encoding import encode_continuations, encode_texts
from blur_lightning.data.prompts import MUSE_QA_PROMPT
from blur_lightning.data.rows import Row, require_columns
from blur_lightning.evals.base import Benchmark, EvalSettings, Results, before_after_table, load_source
from blur_lightning.evals.log_export import PER_EXAMPLE, muse_logs
from blur_lightning.evals.membership import DEFAULT_ATTACKS, evaluate_privacy, privacy_options
from blur_lightning.evals.metric_classes import MembershipAUC, RougeL
from blur_lightning.evals.metrics import min_k_scores, priv_leak
from blur_lightning.evals.reference_logs import read_reference_log
from blur_lightning.evals.scoring import generate_greedy, score_rows
from blur_lightning.evals.sharding import GATHERED

__all__ = ["BENCHMARK", "MUSE_AUC_RETRAIN", "MUSE_HUB", "SPLIT_NAMES", "MuseBenchmark", "evaluate_muse", "load_muse"]

PathLike = str | Path
MUSE_HUB = {"news": "muse-bench/MUSE-News", "books": "muse-bench/MUSE-Books"}
# The retrained models' Min-40% membership AUC that MUSE ships for PrivLeak (muse_bench constants).
MUSE_AUC_RETRAIN = {"news": 0.4772, "books": 0.5393}
MUSE_COLUMNS = {
    "raw": ("text",), "privleak": ("text",), "scal": ("text",), "sust": ("text",), "train": ("text",),
    "knowmem": ("question", "answer"), "verbmem": ("prompt", "gt"),
}  # fmt: skip
SPLIT_NAMES = (
    "verbmem", "knowmem_forget", "knowmem_retain", "knowmem_forget_icl", "knowmem_retain_icl",
    "privleak_forget", "privleak_holdout",
)  # fmt: skip
MUSE_QA_STOPS = ("\n\n", "\nQuestion", "Question:")  # cut a few-shot answer where the next shot starts


def load_muse(subset: str, split: str, path: PathLike | None = None, corpus: str = "news") -> list[Row]:
    """Load a MUSE subset/split, e.g. ("knowmem", "forget_qa"), ("verbmem", "forget"), ("raw", "holdout")."""
    if subset not in MUSE_COLUMNS:
        raise ValueError(f"unknown MUSE subset {subset!r}; expected one of {', '.join(MUSE_COLUMNS)}")
    if path is None and corpus not in MUSE_HUB:
        raise ValueError(f"unknown MUSE corpus {corpus!r}; expected one of {', '.join(MUSE_HUB)}")
    rows, source = load_source(path, MUSE_HUB.get(corpus, ""), subset, split)
    require_columns(rows, MUSE_COLUMNS[subset], source)
    return rows


def _cut_at_stops(text: str, stops: Sequence[str]) -> str:
    for stop in stops:
        index = text.find(stop)
        if index >= 0:
            text = text[:index]
    return text.strip()


def _few_shot_prefix(icl_rows: Sequence[Row] | None) -> str:
    if not icl_rows:
        return ""
    return "".join(MUSE_QA_PROMPT.format(question=r["question"]) + f"{r['answer']}\n\n" for r in icl_rows)


def verbmem_references(tokenizer: Any, gts: Sequence[str], max_new_tokens: int) -> list[str]:
    """VerbMem's references as MUSE cuts them: the first `max_new_tokens` ids of the text tokenized
    *with* the tokenizer's special tokens (a bos counts as one), decoded without them."""
    return [
        tokenizer.decode(tokenizer(gt, add_special_tokens=True)["input_ids"][:max_new_tokens], skip_special_tokens=True)
        for gt in gts
    ]


@torch.no_grad()
def evaluate_muse(
    model: torch.nn.Module,
    tokenizer: Any,
    *,
    verbmem_rows: Sequence[Row] | None = None,
    knowmem_forget_rows: Sequence[Row] | None = None,
    knowmem_retain_rows: Sequence[Row] | None = None,
    knowmem_forget_icl_rows: Sequence[Row] | None = None,
    knowmem_retain_icl_rows: Sequence[Row] | None = None,
    privleak_forget_rows: Sequence[Row] | None = None,
    privleak_holdout_rows: Sequence[Row] | None = None,
    auc_retrain: float | None = None,
    retain_logs_path: PathLike | None = None,
    k: float = 0.4,
    verbmem_max_new_tokens: int = 128,
    knowmem_max_new_tokens: int = 32,
    max_length: int = 2048,
    batch_size: int = 8,
    rouge_stemmer: str | None = None,
    show_progress: bool = True,
    privacy: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """MUSE's evaluation of one model (muse_bench eval.py); each part runs when its rows are given.

    Args:
        model: a causal LM.
        tokenizer: its tokenizer.
        verbmem_rows: verbmem/forget (prompt, gt): ROUGE-L F1 of the greedy continuation
            against gt cut as MUSE does (:func:`verbmem_references`).
        knowmem_forget_rows: knowmem/forget_qa (question, answer).
        knowmem_retain_rows: knowmem/retain_qa.
        knowmem_forget_icl_rows: knowmem/forget_qa_icl, few-shot examples before each question.
        knowmem_retain_icl_rows: knowmem/retain_qa_icl.
        privleak_forget_rows: privleak/forget (text).
        privleak_holdout_rows: privleak/holdout (text).
        auc_retrain: a retrained model's membership AUC (MUSE's: `MUSE_AUC_RETRAIN`); PrivLeak is
            reported when given.
        retain_logs_path: instead of `auc_retrain`, the retrained model's open-unlearning
            MUSE_EVAL.json (or its folder): its mia_min_k AUC, flipped to our convention, is the
            reference (as open-unlearning's privleak takes it).
        k: Min-K% fraction.
        verbmem_max_new_tokens: MUSE: 128.
        knowmem_max_new_tokens: MUSE: 32.
        max_length: texts are cut to this many tokens for Min-K%.
        batch_size: sequences per call.
        rouge_stemmer: None (MUSE's `use_stemmer=False`) or "porter" (open-unlearning's MUSE).
        show_progress: show progress bars (on a terminal).
        privacy: memorization / attack options (:func:`muse_privacy_options`); None: neither. Exact
            memorization and extraction strength score verbmem's gt after its prompt and a space (open-unlearning's
            MUSE_forget_verbmem: prompt_key, insert_space, 2048 tokens); the attacks score the privleak texts
            as PrivLeak's Min-K% does (whole texts, ``max_length`` tokens).

    Returns:
        Any of "verbmem_f", "knowmem_f", "knowmem_r" (mean ROUGE-L F1 in [0, 1]; MUSE prints
        x100), "privleak_auc" (MUSE convention, see `min_k_auc`) and "privleak" (percent); and
        per part its per-example values, "{split}/per_example" (rouge_l_f1 for verbmem,
        knowmem_forget, knowmem_retain; min_k for privleak_forget, privleak_holdout), for
        open-unlearning's MUSE_EVAL.json (`log_export.muse_logs`); with ``privacy``, "exact_memorization",
        "extraction_strength" (verbmem) and "mia_{attack}" (privleak forget against holdout) with their
        per-example values.
    """
    auc_retrain = _retain_auc(auc_retrain, retain_logs_path)
    results: dict[str, Any] = {}
    if verbmem_rows is not None:
        require_columns(verbmem_rows, ("prompt", "gt"), "verbmem_rows")
        prompts = [row["prompt"] for row in verbmem_rows]
        references = verbmem_references(tokenizer, [row["gt"] for row in verbmem_rows], verbmem_max_new_tokens)
        outputs = generate_greedy(
            model, tokenizer, prompts, verbmem_max_new_tokens, batch_size, desc="muse verbmem: generate",
            show_progress=show_progress,
        )  # fmt: skip
        rouge = RougeL("f1", rouge_stemmer, **GATHERED)
        rouge.update(outputs, references)
        results["verbmem_f"] = rouge.compute().item()
        results[f"verbmem/{PER_EXAMPLE}"] = {"rouge_l_f1": rouge.per_example().tolist()}

    for key, split, rows, icl_rows in (
        ("knowmem_f", "knowmem_forget", knowmem_forget_rows, knowmem_forget_icl_rows),
        ("knowmem_r", "knowmem_retain", knowmem_retain_rows, knowmem_retain_icl_rows),
    ):
        if rows is None:
            continue
        require_columns(rows, ("question", "answer"), f"{key} rows")
        prefix = _few_shot_prefix(icl_rows)
        prompts = [prefix + MUSE_QA_PROMPT.format(question=row["question"]) for row in rows]
        outputs = generate_greedy(
            model, tokenizer, prompts, knowmem_max_new_tokens, batch_size, desc=f"muse {key}: generate",
            show_progress=show_progress,
        )  # fmt: skip
        rouge = RougeL("f1", rouge_stemmer, **GATHERED)
        rouge.update([_cut_at_stops(o, MUSE_QA_STOPS) for o in outputs], [row["answer"] for row in rows])
        results[key] = rouge.compute().item()
        results[f"{split}/{PER_EXAMPLE}"] = {"rouge_l_f1": rouge.per_example().tolist()}

    if privleak_forget_rows is not None and privleak_holdout_rows is not None:
        require_columns(privleak_forget_rows, ("text",), "privleak_forget_rows")
        require_columns(privleak_holdout_rows, ("text",), "privleak_holdout_rows")
        auc = MembershipAUC(**GATHERED)
        min_k = partial(_min_k, model, tokenizer, k=k, max_length=max_length, batch_size=batch_size,
                        show_progress=show_progress)  # fmt: skip
        forget_scores = min_k([r["text"] for r in privleak_forget_rows], desc="muse privleak_forget: score")
        holdout_scores = min_k([r["text"] for r in privleak_holdout_rows], desc="muse privleak_holdout: score")
        auc.update(forget_scores=forget_scores, holdout_scores=holdout_scores)
        results["privleak_auc"] = auc.compute().item()
        results[f"privleak_forget/{PER_EXAMPLE}"] = {"min_k": forget_scores.tolist()}
        results[f"privleak_holdout/{PER_EXAMPLE}"] = {"min_k": holdout_scores.tolist()}
        if auc_retrain is not None:
            results["privleak"] = priv_leak(results["privleak_auc"], auc_retrain).item()
    if privacy is not None:
        privacy = {**privacy, "memorization": privacy["memorization"] and verbmem_rows is not None,
                   "privleak_ref_auc": None}  # MUSE's PrivLeak is the one above  # fmt: skip
        has_texts = privleak_forget_rows is not None and privleak_holdout_rows is not None
        memorized = encode_continuations(
            tokenizer, [row["prompt"] for row in verbmem_rows or []], [" " + row["gt"] for row in verbmem_rows or []],
            append_eos=False, max_length=max_length,
        )  # fmt: skip
        results.update(evaluate_privacy(
            model, tokenizer, memorized if privacy["memorization"] else [],
            encode_texts(tokenizer, [r["text"] for r in privleak_holdout_rows], max_length) if has_texts else None,
            privacy, batch_size=batch_size, show_progress=show_progress, name="muse",
            mia_forget_rows=encode_texts(tokenizer, [r["text"] for r in privleak_forget_rows], max_length)
            if has_texts else None,
        ))  # fmt: skip
    return results


def muse_privacy_options(options: dict[str, Any], *, has_holdout: bool) -> dict[str, Any]:
    """:func:`~blur_lightning.evals.membership.privacy_options` for MUSE: the attacks default to all of
    :data:`~blur_lightning.evals.membership.DEFAULT_ATTACKS` but ``min_k``, which is MUSE's own PrivLeak
    test above (its convention: every token of a text) and is written as ``mia_min_k``; asking for it
    is an error."""
    if "mia_attacks" not in options:
        options = {**options, "mia_attacks": [a for a in DEFAULT_ATTACKS if a != "min_k"]}
        if options.get("reference_model_path") is not None or options.get("reference_model") is not None:
            options["mia_attacks"].append("reference")
    elif "min_k" in (options["mia_attacks"] or []):
        raise ValueError("muse options.mia_attacks: 'min_k' is MUSE's own PrivLeak test (the privleak splits, "
                         "results privleak_auc / privleak); leave it out")  # fmt: skip
    return privacy_options(options, has_holdout=has_holdout)


def _retain_auc(auc_retrain: float | None, retain_logs_path: PathLike | None) -> float | None:
    """PrivLeak's reference AUC from `auc_retrain` or the retrained model's log (read before any scoring)."""
    if retain_logs_path is None:
        return auc_retrain
    if auc_retrain is not None:
        raise ValueError("muse options: give auc_retrain or retain_logs_path, not both")
    log = read_reference_log(retain_logs_path)
    if log.benchmark != "muse":
        raise ValueError(f"retain_logs_path {str(retain_logs_path)!r}: a {log.benchmark} log, not a MUSE one")
    return log.privleak_auc()


def _min_k(model, tokenizer, texts: Sequence[str], *, k, max_length, batch_size, show_progress, desc) -> Tensor:
    """(N,) float64 Min-K% scores of whole texts (every token after the first is scored)."""
    (scores,) = score_rows(
        model, tokenizer, encode_texts(tokenizer, texts, max_length), reduce=partial(min_k_scores, k=k),
        batch_size=batch_size, desc=desc, show_progress=show_progress,
    )  # fmt: skip
    return scores


class MuseBenchmark(Benchmark):
    """MUSE's parts, each run when its splits are named (privleak needs both of its splits).

    Options: ``corpus`` ("news" or "books": the hub dataset of ``hub:`` specs) and the keywords of
    :func:`evaluate_muse` (``auc_retrain`` or ``retain_logs_path``, ``k``, ``max_length``,
    ``rouge_stemmer``) and the memorization / attack options of :func:`muse_privacy_options`. With
    ``retain_logs_path`` the before/after table has the retrained model's own values beside ours
    ("retrain (ref)").
    """

    name = "muse"
    table_rows: tuple[tuple[str, str, bool], ...] = (
        ("verbmem_f", "VerbMem on forget: ROUGE-L F1", False),
        ("knowmem_f", "KnowMem on forget: ROUGE-L F1", False),
        ("knowmem_r", "KnowMem on retain: ROUGE-L F1", False),
        ("privleak_auc", "Min-K% membership AUC", False),
        ("privleak", "PrivLeak (%)", False),
        ("exact_memorization", "VerbMem texts: exact memorization", False),
        ("extraction_strength", "VerbMem texts: extraction strength", False),
        *((f"mia_{a}", f"{a} attack AUC (forget vs holdout)", False)
          for a in ("loss", "zlib", "min_k_plus_plus", "gradnorm", "reference")),
    )  # fmt: skip

    def repo(self, options: Mapping[str, Any]) -> str | None:
        corpus = options.get("corpus", "news")
        if corpus not in MUSE_HUB:
            raise ValueError(f"corpus={corpus!r}: expected one of {sorted(MUSE_HUB)}")
        return MUSE_HUB[corpus]

    def check_splits(self, names: Sequence[str], options: Mapping[str, Any]) -> None:
        unknown = sorted(set(names) - set(SPLIT_NAMES))
        if unknown:
            raise ValueError(f"muse splits {unknown}: expected any of {SPLIT_NAMES}")
        if len(set(names) & {"privleak_forget", "privleak_holdout"}) == 1:
            raise ValueError("muse privleak needs both privleak_forget and privleak_holdout")
        self.repo(options)
        _retain_auc(options.get("auc_retrain"), options.get("retain_logs_path"))  # a bad log fails before training
        muse_privacy_options(dict(options), has_holdout="privleak_holdout" in names)

    def report(
        self, before: Results | None, after: Results | None, sizes: Mapping[str, int],
        options: Mapping[str, Any] | None = None,
    ) -> str | None:  # fmt: skip
        path = (options or {}).get("retain_logs_path")
        reference = ("retrain (ref)", read_reference_log(path).summary) if path is not None else None
        return before_after_table(self.table_rows, before, after, sizes, reference)

    def field_logs(self, results: Results, options: Mapping[str, Any] | None = None) -> dict[str, Any] | None:
        return muse_logs(results)

    def evaluate(
        self, model: Any, tokenizer: Any, rows: Mapping[str, Sequence[Row]], settings: EvalSettings,
        options: Mapping[str, Any],
    ) -> Results:  # fmt: skip
        options = {k: v for k, v in options.items() if k != "corpus"}
        privacy = muse_privacy_options(options, has_holdout="privleak_holdout" in rows)
        options = {k: v for k, v in options.items() if k not in privacy and k != "reference_model"}
        if settings.max_new_tokens is not None:
            options.setdefault("verbmem_max_new_tokens", settings.max_new_tokens)
            options.setdefault("knowmem_max_new_tokens", settings.max_new_tokens)
        split_rows = {f"{name}_rows": split for name, split in rows.items()}
        return evaluate_muse(
            model, tokenizer, batch_size=settings.batch_size, show_progress=settings.show_progress,
            privacy=privacy, **split_rows, **options,
        )  # fmt: skip


BENCHMARK = MuseBenchmark()
