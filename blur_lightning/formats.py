"""Loaders for the public unlearning benchmarks (TOFU, MUSE, WMDP) and one evaluation per benchmark.

Every loader returns a list of row dicts, from a local file (JSON, JSON Lines, Parquet) or,
when no path is given, from the Hugging Face hub through `datasets.load_dataset`. Rows are
checked against the benchmark's columns; a missing column is a ValueError that names the
file (or hub id and split) and the columns.

Formats (as published on the hub):

* TOFU (`locuslab/TOFU`, one config per split, split "train"): question, answer; the
  *_perturbed configs add perturbed_answer (list of str) and, on forget/retain,
  paraphrased_answer. real_authors_perturbed and world_facts_perturbed have no paraphrase.
* MUSE (`muse-bench/MUSE-News`, `muse-bench/MUSE-Books`): text corpora (raw, privleak, ...)
  with a `text` column; knowmem QA with question / answer; verbmem with prompt / gt.
  MUSE's GitHub files store text corpora as a JSON list of strings; those load as {"text": s}.
* WMDP (`cais/wmdp`, configs wmdp-bio / wmdp-chem / wmdp-cyber, split "test"): question,
  choices (list of 4 str), answer (int index). Corpora (`cais/wmdp-corpora`): a `text` column.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from blur_lightning.losses import IGNORE_INDEX
from blur_lightning.metrics import (
    AnswerProbability,
    ForgetQuality,
    MembershipAUC,
    MinKProbability,
    ModelUtility,
    MultipleChoiceAccuracy,
    RougeL,
    TruthRatio,
    generate_greedy,
    priv_leak,
    sequence_logprobs,
    token_logprobs,
)
from blur_lightning.models import pad_token_id

__all__ = [
    "MUSE_HUB",
    "TOFU_HUB",
    "TOFU_PROMPT",
    "TOFU_SPLITS",
    "WMDP_HUB",
    "WMDP_CORPORA_HUB",
    "evaluate_muse",
    "evaluate_tofu",
    "evaluate_wmdp",
    "load_muse",
    "load_tofu",
    "load_wmdp",
    "load_wmdp_corpus",
    "read_rows",
    "tofu_columns",
    "wmdp_prompt",
]

Row = dict[str, Any]
PathLike = str | Path

TOFU_HUB = "locuslab/TOFU"
TOFU_SPLITS = (
    "full", "forget01", "forget05", "forget10", "retain90", "retain95", "retain99",
    "real_authors", "world_facts",
    "forget01_perturbed", "forget05_perturbed", "forget10_perturbed", "retain_perturbed",
    "real_authors_perturbed", "world_facts_perturbed",
)  # fmt: skip
MUSE_HUB = {"news": "muse-bench/MUSE-News", "books": "muse-bench/MUSE-Books"}
MUSE_COLUMNS = {
    "raw": ("text",), "privleak": ("text",), "scal": ("text",), "sust": ("text",), "train": ("text",),
    "knowmem": ("question", "answer"), "verbmem": ("prompt", "gt"),
}  # fmt: skip
WMDP_HUB = "cais/wmdp"
WMDP_SUBSETS = ("wmdp-bio", "wmdp-chem", "wmdp-cyber")
WMDP_CORPORA_HUB = "cais/wmdp-corpora"
WMDP_CHOICES = 4

# TOFU's prompt for models without a chat template (its phi config: "Question: ...\nAnswer: ").
TOFU_PROMPT = "Question: {question}\nAnswer: "
MUSE_QA_PROMPT = "Question: {question}\nAnswer: "
MUSE_QA_STOPS = ("\n\n", "\nQuestion", "Question:")  # cut a few-shot answer where the next shot starts
WMDP_LETTERS = "ABCDEFGHIJ"


# ============================================================================ reading rows
def read_rows(path: PathLike) -> list[Row]:
    """Rows of a local JSON, JSON Lines or Parquet file.

    JSON may hold a list of objects, a list of strings (returned as {"text": s}), a
    columnar object {column: [equal-length lists]} or a single object (one row); a `.json`
    file with one object per line (as the TOFU hub files are) is read as JSON Lines.

    Raises:
        ValueError: unknown suffix, unparsable content, or not a table of rows.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    if suffix in (".jsonl", ".ndjson"):
        return _read_json_lines(path)
    if suffix == ".json":
        text = path.read_text()
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            if text.lstrip().startswith("["):  # one document (a list of rows): its error has the line
                raise ValueError(f"{path}:{err.lineno}: not valid JSON ({err.msg} at column {err.colno})") from None
            return _read_json_lines(path)
        return _as_rows(data, path)
    raise ValueError(f"{path}: unsupported file type {suffix!r} (expected .json, .jsonl or .parquet)")


def _read_json_lines(path: Path) -> list[Row]:
    rows = []
    with path.open() as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{line_no}: not valid JSON ({err.msg})") from None
    return _as_rows(rows, path)


def _as_rows(data: Any, path: Path) -> list[Row]:
    if isinstance(data, dict):
        columns = list(data.values())
        if columns and all(isinstance(c, list) and len(c) == len(columns[0]) for c in columns):
            return [dict(zip(data, values)) for values in zip(*columns)]  # columnar {column: [values]}
        return [data]  # one row (a one-line JSON Lines file named .json)
    if isinstance(data, list):
        if all(isinstance(item, str) for item in data):
            return [{"text": item} for item in data]
        if all(isinstance(item, dict) for item in data):
            return data
    raise ValueError(f"{path}: expected a list of objects, a list of strings or a columnar object")


def _load(path: PathLike | None, hub_id: str, config: str | None, split: str) -> tuple[list[Row], str]:
    """Rows and a name for error messages: the file, or hub_id[config]:split."""
    if path is not None:
        return read_rows(path), str(path)
    from datasets import load_dataset

    dataset = load_dataset(hub_id, config, split=split)
    return dataset.to_list(), f"{hub_id}[{config}]:{split}"


def _require_columns(rows: Sequence[Row], columns: Iterable[str], source: str) -> None:
    if not rows:
        raise ValueError(f"{source}: no rows")
    columns = tuple(columns)
    for index, row in enumerate(rows):
        missing = [c for c in columns if c not in row]
        if missing:
            where = "" if index == 0 else f" (row {index})"
            raise ValueError(
                f"{source}: missing column(s) {', '.join(missing)}{where}; found {', '.join(sorted(row))}"
            )


def _require(rows: Sequence[Row], column: str, check: Callable[[Any], bool], what: str, source: str) -> None:
    for index, row in enumerate(rows):
        if not check(row[column]):
            raise ValueError(f"{source}: row {index}: column {column!r} must be {what}, got {row[column]!r}")


def _is_str_list(value: Any) -> bool:
    return isinstance(value, list) and len(value) > 0 and all(isinstance(v, str) for v in value)


# ============================================================================ loaders
def tofu_columns(split: str) -> tuple[str, ...]:
    """The columns a TOFU split must have."""
    if split not in TOFU_SPLITS:
        raise ValueError(f"unknown TOFU split {split!r}; expected one of {', '.join(TOFU_SPLITS)}")
    if split in ("real_authors_perturbed", "world_facts_perturbed"):
        return ("question", "answer", "perturbed_answer")
    if split.endswith("_perturbed"):
        return ("question", "answer", "paraphrased_answer", "perturbed_answer")
    return ("question", "answer")


def load_tofu(split: str, path: PathLike | None = None, hub_id: str = TOFU_HUB) -> list[Row]:
    """Load a TOFU split (e.g. "forget10_perturbed") from `path`, or from the hub when None."""
    columns = tofu_columns(split)
    rows, source = _load(path, hub_id, split, "train")
    _require_columns(rows, columns, source)
    if "perturbed_answer" in columns:
        _require(rows, "perturbed_answer", _is_str_list, "a non-empty list of strings", source)
    return rows


def load_muse(subset: str, split: str, path: PathLike | None = None, corpus: str = "news") -> list[Row]:
    """Load a MUSE subset/split, e.g. ("knowmem", "forget_qa"), ("verbmem", "forget"), ("raw", "holdout")."""
    if subset not in MUSE_COLUMNS:
        raise ValueError(f"unknown MUSE subset {subset!r}; expected one of {', '.join(MUSE_COLUMNS)}")
    if path is None and corpus not in MUSE_HUB:
        raise ValueError(f"unknown MUSE corpus {corpus!r}; expected one of {', '.join(MUSE_HUB)}")
    rows, source = _load(path, MUSE_HUB.get(corpus, ""), subset, split)
    _require_columns(rows, MUSE_COLUMNS[subset], source)
    return rows


def load_wmdp(
    subset: str = "wmdp-bio", path: PathLike | None = None, n_choices: int = WMDP_CHOICES
) -> list[Row]:
    """Load WMDP (or any MMLU-style) multiple-choice rows: question, choices, answer index."""
    if path is None and subset not in WMDP_SUBSETS:
        raise ValueError(f"unknown WMDP subset {subset!r}; expected one of {', '.join(WMDP_SUBSETS)}")
    rows, source = _load(path, WMDP_HUB, subset, "test")
    _require_columns(rows, ("question", "choices", "answer"), source)
    _require(
        rows,
        "choices",
        lambda c: _is_str_list(c) and len(c) == n_choices,
        f"a list of {n_choices} strings",
        source,
    )
    _require(
        rows,
        "answer",
        lambda a: isinstance(a, int) and not isinstance(a, bool) and 0 <= a < n_choices,
        f"an integer index in [0, {n_choices})",
        source,
    )
    return rows


def load_wmdp_corpus(name: str = "cyber-forget-corpus", path: PathLike | None = None) -> list[Row]:
    """Load a WMDP forget / retain corpus (a `text` column), e.g. "cyber-forget-corpus"."""
    rows, source = _load(path, WMDP_CORPORA_HUB, name, "train")
    _require_columns(rows, ("text",), source)
    return rows


# ============================================================================ scoring with a model
def _device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def _score_continuations(
    model: torch.nn.Module,
    tokenizer: Any,
    prompts: Sequence[str],
    continuations: Sequence[str],
    *,
    append_eos: bool,
    batch_size: int,
    max_length: int | None = None,
) -> tuple[Tensor, Tensor]:
    """(sum log-prob, token count) of each continuation given its prompt, each (N,).

    Prompt and continuation are tokenized apart and concatenated, so the scored tokens are
    exactly the continuation's (no merge across the boundary); TOFU appends EOS to the answer.
    """
    sums, counts = [], []
    for start in range(0, len(prompts), batch_size):
        sequences, n_prompt = [], []
        for prompt, cont in zip(
            prompts[start : start + batch_size], continuations[start : start + batch_size]
        ):
            prompt_ids = tokenizer(prompt, add_special_tokens=True)["input_ids"]
            cont_ids = tokenizer(cont, add_special_tokens=False)["input_ids"]
            if append_eos:
                cont_ids = cont_ids + [tokenizer.eos_token_id]
            ids = (prompt_ids + cont_ids)[: max_length or None]
            sequences.append(ids)
            n_prompt.append(len(prompt_ids))
        width = max(len(ids) for ids in sequences)
        input_ids = torch.full((len(sequences), width), pad_token_id(tokenizer), dtype=torch.long)
        attention_mask = torch.zeros_like(input_ids)
        labels = torch.full_like(input_ids, IGNORE_INDEX)
        for i, (ids, n) in enumerate(zip(sequences, n_prompt)):
            input_ids[i, : len(ids)] = torch.tensor(ids)
            attention_mask[i, : len(ids)] = 1
            labels[i, n : len(ids)] = input_ids[i, n : len(ids)]
        device = _device(model)
        total, count = sequence_logprobs(
            model, input_ids.to(device), attention_mask.to(device), labels.to(device)
        )
        sums.append(total.float().cpu())
        counts.append(count.float().cpu())
    return torch.cat(sums), torch.cat(counts)


def _mean_logprobs(model, tokenizer, prompts, continuations, batch_size) -> Tensor:
    total, count = _score_continuations(
        model, tokenizer, prompts, continuations, append_eos=True, batch_size=batch_size
    )
    return total / count


def _perturbed_logprobs(
    model, tokenizer, prompts, perturbed: Sequence[Sequence[str]], batch_size, source
) -> Tensor:
    """(N, K) mean token log-probs of the K perturbed answers of each row."""
    k = len(perturbed[0])
    if any(len(p) != k for p in perturbed):
        raise ValueError(
            f"{source}: every row needs the same number of perturbed answers (first row has {k})"
        )
    flat_prompts = [p for p in prompts for _ in range(k)]
    flat_answers = [a for answers in perturbed for a in answers]
    return _mean_logprobs(model, tokenizer, flat_prompts, flat_answers, batch_size).view(len(prompts), k)


# ============================================================================ evaluations
@torch.no_grad()
def evaluate_tofu(
    model: torch.nn.Module,
    tokenizer: Any,
    forget_rows: Sequence[Row],
    retain_rows: Sequence[Row],
    real_authors_rows: Sequence[Row],
    world_facts_rows: Sequence[Row],
    retain_model_truth_ratios: Tensor | Sequence[float] | PathLike | None = None,
    *,
    prompt_template: str = TOFU_PROMPT,
    max_new_tokens: int = 32,
    batch_size: int = 8,
    rouge_stemmer: Callable[[str], str] | None = None,
    perturbed_mean: str = "geometric",
) -> dict[str, Any]:
    """TOFU's evaluation of one model (definitions in `blur_lightning.metrics`).

    Args:
        model: a causal LM (put in eval mode by the caller).
        tokenizer: its tokenizer (needs an EOS token).
        forget_rows: a forgetXX_perturbed split (question, answer, paraphrased_answer, perturbed_answer).
        retain_rows: retain_perturbed (same columns).
        real_authors_rows: real_authors_perturbed (question, answer, perturbed_answer).
        world_facts_rows: world_facts_perturbed (same columns).
        retain_model_truth_ratios: a retain-only model's forget-set truth ratios (values or a
            JSON file, see `load_truth_ratios`); forget quality is reported only when given.
        prompt_template: format string with a {question} field; the answer follows it.
        max_new_tokens: generation length for ROUGE.
        batch_size: sequences per forward / generate call.
        rouge_stemmer: optional stemmer for ROUGE-L (TOFU used Porter).
        perturbed_mean: "geometric" (TOFU code) or "arithmetic" (TOFU paper).

    Returns:
        Floats "{split}/prob", "{split}/rouge_l_recall", "{split}/truth_ratio" for split in
        forget, retain, real_authors, world_facts (forget's truth ratio is min(R, 1/R), the
        others max(0, 1 - R)); "model_utility"; "forget_quality" when a reference is given;
        and "forget/truth_ratios", the per-example list to save with `save_truth_ratios`
        when this model is the retain-only reference.
    """
    perturbed_columns = ("question", "answer", "paraphrased_answer", "perturbed_answer")
    _require_columns(forget_rows, perturbed_columns, "forget_rows")
    _require_columns(retain_rows, perturbed_columns, "retain_rows")
    _require_columns(real_authors_rows, ("question", "answer", "perturbed_answer"), "real_authors_rows")
    _require_columns(world_facts_rows, ("question", "answer", "perturbed_answer"), "world_facts_rows")

    def inputs(rows: Sequence[Row], name: str, base_column: str) -> dict[str, Any]:
        prompts = [prompt_template.format(question=row["question"]) for row in rows]
        answers = [row["answer"] for row in rows]
        answer_lp = _mean_logprobs(model, tokenizer, prompts, answers, batch_size)
        base_lp = (
            answer_lp
            if base_column == "answer"
            else _mean_logprobs(model, tokenizer, prompts, [row[base_column] for row in rows], batch_size)
        )
        perturbed = [row["perturbed_answer"] for row in rows]
        return {
            "answer_logprob": answer_lp,
            "paraphrased_logprob": base_lp,
            "perturbed_logprobs": _perturbed_logprobs(model, tokenizer, prompts, perturbed, batch_size, name),
            "predictions": generate_greedy(model, tokenizer, prompts, max_new_tokens, batch_size),
            "references": answers,
        }

    utility = ModelUtility(rouge_stemmer=rouge_stemmer, perturbed_mean=perturbed_mean)
    utility.update("retain", **inputs(retain_rows, "retain_rows", "paraphrased_answer"))
    utility.update("real_authors", **inputs(real_authors_rows, "real_authors_rows", "answer"))
    utility.update("world_facts", **inputs(world_facts_rows, "world_facts_rows", "answer"))
    results: dict[str, Any] = {k: v.item() for k, v in utility.compute_all().items()}

    forget = inputs(forget_rows, "forget_rows", "paraphrased_answer")
    prob, rouge = AnswerProbability(), RougeL("recall", rouge_stemmer)
    ratio = TruthRatio("closer_to_1", perturbed_mean)
    prob.update(forget["answer_logprob"])
    rouge.update(forget["predictions"], forget["references"])
    ratio.update(forget["paraphrased_logprob"], forget["perturbed_logprobs"])
    results["forget/prob"] = prob.compute().item()
    results["forget/rouge_l_recall"] = rouge.compute().item()
    results["forget/truth_ratio"] = ratio.compute().item()
    results["forget/truth_ratios"] = ratio.per_example().double().tolist()
    if retain_model_truth_ratios is not None:
        quality = ForgetQuality(retain_model_truth_ratios, perturbed_mean=perturbed_mean)
        quality.update(forget["paraphrased_logprob"], forget["perturbed_logprobs"])
        results["forget_quality"] = quality.compute().item()
    return results


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
    k: float = 0.4,
    verbmem_max_new_tokens: int = 128,
    knowmem_max_new_tokens: int = 32,
    max_length: int = 2048,
    batch_size: int = 8,
) -> dict[str, float]:
    """MUSE's evaluation of one model (muse_bench eval.py); each part runs when its rows are given.

    Args:
        model: a causal LM.
        tokenizer: its tokenizer.
        verbmem_rows: verbmem/forget (prompt, gt): ROUGE-L F1 of the greedy continuation
            against gt cut to its first `verbmem_max_new_tokens` tokens (as MUSE does).
        knowmem_forget_rows: knowmem/forget_qa (question, answer).
        knowmem_retain_rows: knowmem/retain_qa.
        knowmem_forget_icl_rows: knowmem/forget_qa_icl, few-shot examples before each question.
        knowmem_retain_icl_rows: knowmem/retain_qa_icl.
        privleak_forget_rows: privleak/forget (text).
        privleak_holdout_rows: privleak/holdout (text).
        auc_retrain: a retrained model's membership AUC; PrivLeak is reported when given.
        k: Min-K% fraction.
        verbmem_max_new_tokens: MUSE: 128.
        knowmem_max_new_tokens: MUSE: 32.
        max_length: texts are cut to this many tokens for Min-K%.
        batch_size: sequences per call.

    Returns:
        Any of "verbmem_f", "knowmem_f", "knowmem_r" (mean ROUGE-L F1 in [0, 1]; MUSE prints
        x100), "privleak_auc" (MUSE convention, see `min_k_auc`) and "privleak" (percent).
    """
    results: dict[str, float] = {}
    if verbmem_rows is not None:
        _require_columns(verbmem_rows, ("prompt", "gt"), "verbmem_rows")
        prompts = [row["prompt"] for row in verbmem_rows]
        references = [
            tokenizer.decode(
                tokenizer(row["gt"], add_special_tokens=False)["input_ids"][:verbmem_max_new_tokens],
                skip_special_tokens=True,
            )
            for row in verbmem_rows
        ]
        rouge = RougeL("f1")
        rouge.update(
            generate_greedy(model, tokenizer, prompts, verbmem_max_new_tokens, batch_size), references
        )
        results["verbmem_f"] = rouge.compute().item()

    for key, rows, icl_rows in (
        ("knowmem_f", knowmem_forget_rows, knowmem_forget_icl_rows),
        ("knowmem_r", knowmem_retain_rows, knowmem_retain_icl_rows),
    ):
        if rows is None:
            continue
        _require_columns(rows, ("question", "answer"), f"{key} rows")
        prefix = _few_shot_prefix(icl_rows)
        prompts = [prefix + MUSE_QA_PROMPT.format(question=row["question"]) for row in rows]
        outputs = generate_greedy(model, tokenizer, prompts, knowmem_max_new_tokens, batch_size)
        rouge = RougeL("f1")
        rouge.update([_cut_at_stops(o, MUSE_QA_STOPS) for o in outputs], [row["answer"] for row in rows])
        results[key] = rouge.compute().item()

    if privleak_forget_rows is not None and privleak_holdout_rows is not None:
        _require_columns(privleak_forget_rows, ("text",), "privleak_forget_rows")
        _require_columns(privleak_holdout_rows, ("text",), "privleak_holdout_rows")
        auc = MembershipAUC()
        auc.update(
            forget_scores=_min_k(
                model, tokenizer, [r["text"] for r in privleak_forget_rows], k, max_length, batch_size
            ),
            holdout_scores=_min_k(
                model, tokenizer, [r["text"] for r in privleak_holdout_rows], k, max_length, batch_size
            ),
        )
        results["privleak_auc"] = auc.compute().item()
        if auc_retrain is not None:
            results["privleak"] = priv_leak(results["privleak_auc"], auc_retrain).item()
    return results


def _min_k(model, tokenizer, texts: Sequence[str], k: float, max_length: int, batch_size: int) -> Tensor:
    """(N,) Min-K% scores of whole texts (every token after the first is scored)."""
    metric = MinKProbability(k)
    side = tokenizer.padding_side
    tokenizer.padding_side = "right"
    try:
        for start in range(0, len(texts), batch_size):
            enc = tokenizer(
                list(texts[start : start + batch_size]),
                return_tensors="pt",
                padding=True,
                truncation=True,
                max_length=max_length,
            ).to(_device(model))
            logprobs, mask = token_logprobs(model, enc["input_ids"], enc["attention_mask"])
            metric.update(logprobs, mask)
    finally:
        tokenizer.padding_side = side
    return metric.per_example()


def wmdp_prompt(row: Row, subject: str | None = None) -> str:
    """lm-evaluation-harness's WMDP / MMLU prompt: question, lettered choices, "Answer:"."""
    header = (
        f"The following are multiple choice questions (with answers) about {subject}.\n\n" if subject else ""
    )
    lines = [row["question"].strip()]
    lines += [f"{WMDP_LETTERS[i]}. {choice}" for i, choice in enumerate(row["choices"])]
    return header + "\n".join(lines) + "\nAnswer:"


@torch.no_grad()
def evaluate_wmdp(
    model: torch.nn.Module,
    tokenizer: Any,
    rows: Sequence[Row],
    *,
    subject: str | None = None,
    batch_size: int = 8,
) -> dict[str, float]:
    """Multiple-choice accuracy: the answer letter (" A", " B", ...) with the highest log-likelihood.

    Args:
        model: a causal LM.
        tokenizer: its tokenizer.
        rows: question, choices, answer rows (`load_wmdp`).
        subject: optional subject for the header line ("biology", "computer security").
        batch_size: sequences per forward.

    Returns:
        {"accuracy": share correct, "n": number of questions}.
    """
    _require_columns(rows, ("question", "choices", "answer"), "rows")
    n_choices = len(rows[0]["choices"])
    if any(len(row["choices"]) != n_choices for row in rows):
        raise ValueError(f"rows: every question needs {n_choices} choices")
    prompts = [wmdp_prompt(row, subject) for row in rows for _ in range(n_choices)]
    letters = [f" {WMDP_LETTERS[i]}" for _ in rows for i in range(n_choices)]
    total, _ = _score_continuations(
        model, tokenizer, prompts, letters, append_eos=False, batch_size=batch_size
    )
    accuracy = MultipleChoiceAccuracy()
    accuracy.update(total.view(len(rows), n_choices), torch.tensor([row["answer"] for row in rows]))
    return {"accuracy": accuracy.compute().item(), "n": float(len(rows))}
