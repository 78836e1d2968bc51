"""TOFU (Maini et al. 2024, `locuslab/TOFU`): its splits, truth-ratio files, and its evaluation.

Splits on the hub (one config per split, split "train"): question, answer; the *_perturbed configs
add perturbed_answer (list of str) and, on forget/retain, paraphrased_answer. real_authors_perturbed
and world_facts_perturbed have no paraphrase. Metric definitions: :mod:`blur_lightning.evals.metrics`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from blur_lightning.data.encoding import encode_continuations
from blur_lightning.data.prompts import TOFU_PROMPT, PromptFormat, get_prompt_format
from blur_lightning.data.rows import Row, is_str_list, require, require_columns
from blur_lightning.evals.base import Benchmark, EvalSettings, Results, before_after_table, load_source
from blur_lightning.evals.log_export import PER_EXAMPLE, tofu_logs
from blur_lightning.evals.membership import evaluate_privacy, privacy_options
from blur_lightning.evals.metric_classes import AnswerProbability, ForgetQuality, ModelUtility, RougeL, TruthRatio
from blur_lightning.evals.qa import is_correct
from blur_lightning.evals.reference_logs import read_reference_log
from blur_lightning.evals.scoring import generate_greedy, sequence_scores
from blur_lightning.evals.sharding import GATHERED

__all__ = [
    "BENCHMARK",
    "SPLIT_NAMES",
    "TOFU_HUB",
    "HOLDOUT_SPLITS",
    "TOFU_SPLITS",
    "HOLDOUT_SPLIT",
    "PRIVACY_TABLE_ROWS",
    "TofuBenchmark",
    "evaluate_tofu",
    "load_tofu",
    "load_truth_ratios",
    "prompt_template",
    "save_truth_ratios",
    "scoring_format",
    "tofu_columns",
    "truth_ratios",
]

PathLike = str | Path
TOFU_HUB = "locuslab/TOFU"
# TOFU's holdout authors (never in full): the membership attacks' non-members
HOLDOUT_SPLITS = ("holdout01", "holdout05", "holdout10")
TOFU_SPLITS = (
    "full", "forget01", "forget05", "forget10", "retain90", "retain95", "retain99",
    "real_authors", "world_facts",
    "forget01_perturbed", "forget05_perturbed", "forget10_perturbed", "retain_perturbed",
    "real_authors_perturbed", "world_facts_perturbed", *HOLDOUT_SPLITS,
)  # fmt: skip
# The evaluation's four sets (the *_perturbed configs).
SPLIT_NAMES = ("forget", "retain", "real_authors", "world_facts")
# An optional fifth: questions the model never saw, for the membership-inference attacks (open-unlearning's
# TOFU_MIA: forget10 against TOFU's holdout10, configs/eval/tofu.yaml holdout_split).
HOLDOUT_SPLIT = "holdout"
# The memorization and attack rows of the before/after tables (TOFU's, the fictitious benchmark's).
PRIVACY_TABLE_ROWS: tuple[tuple[str, str, bool], ...] = (
    ("exact_memorization", "forget: exact memorization", False),
    ("extraction_strength", "forget: extraction strength", False),
    *((f"mia_{attack}", f"{attack} attack AUC (forget vs holdout)", False)
      for attack in ("loss", "zlib", "min_k", "min_k_plus_plus", "gradnorm", "reference")),
    ("privleak", "PrivLeak (%, min_k)", False),
)  # fmt: skip
_PERTURBED_COLUMNS = ("question", "answer", "paraphrased_answer", "perturbed_answer")
_NO_PARAPHRASE_COLUMNS = ("question", "answer", "perturbed_answer")


# ============================================================================ loading
def tofu_columns(split: str) -> tuple[str, ...]:
    """The columns a TOFU split must have."""
    if split not in TOFU_SPLITS:
        raise ValueError(f"unknown TOFU split {split!r}; expected one of {', '.join(TOFU_SPLITS)}")
    if split in ("real_authors_perturbed", "world_facts_perturbed"):
        return _NO_PARAPHRASE_COLUMNS
    if split.endswith("_perturbed"):
        return _PERTURBED_COLUMNS
    return ("question", "answer")


def load_tofu(split: str, path: PathLike | None = None, hub_id: str = TOFU_HUB) -> list[Row]:
    """Load a TOFU split (e.g. "forget10_perturbed") from `path`, or from the hub when None."""
    columns = tofu_columns(split)
    rows, source = load_source(path, hub_id, split, "train")
    require_columns(rows, columns, source)
    if "perturbed_answer" in columns:
        require(rows, "perturbed_answer", is_str_list, "a non-empty list of strings", source)
    return rows


# ============================================================================ truth-ratio files
def load_truth_ratios(path: str | Path) -> Tensor:
    """Read a retain-only model's per-example forget-set truth ratios from a JSON file.

    Accepted layouts: a list of numbers; a dict {index: number}; a dict with a "truth_ratio"
    entry holding either of those (what `save_truth_ratios` writes); or a log of the field,
    read by :func:`~blur_lightning.evals.reference_logs.read_reference_log`: TOFU's
    eval_log_forget.json / eval_log_aggregated.json (R from its mean losses, as TOFU's
    aggregate_eval_stat.py) or open-unlearning's TOFU_EVAL.json (its forget_truth_ratio scores).

    Returns:
        (n,) float64 tensor, in index order when the file is keyed by integers.
    """
    path = Path(path)
    with path.open() as f:
        data = json.load(f)
    tofu_log_keys = {"avg_paraphrased_loss", "average_perturb_loss"}  # TOFU's log holds a "truth_ratio" too
    if isinstance(data, dict) and "truth_ratio" in data and not tofu_log_keys & set(data):
        data = data["truth_ratio"]  # ours: save_truth_ratios, the fictitious build
    elif isinstance(data, dict) and not all(str(k).lstrip("-").isdigit() for k in data):
        return read_reference_log(path).forget_truth_ratios()
    values = _ordered_values(data, path)
    if not values or not all(isinstance(v, (int, float)) for v in values):
        raise ValueError(f"{path}: expected a non-empty list or dict of per-example truth ratios")
    return torch.tensor(values, dtype=torch.float64)


def _ordered_values(data: Any, path: Path) -> list:
    if isinstance(data, list):
        return data
    if isinstance(data, dict):
        keys = list(data)
        if all(str(k).lstrip("-").isdigit() for k in keys):
            keys.sort(key=int)
        return [data[k] for k in keys]
    raise ValueError(f"{path}: expected a JSON list or dict of per-example values, got {type(data).__name__}")


def save_truth_ratios(path: str | Path, ratios: Tensor | Sequence[float]) -> None:
    """Write per-example truth ratios as {"truth_ratio": {index: value}} (what `load_truth_ratios` reads)."""
    values = torch.as_tensor(ratios, dtype=torch.float64).flatten().tolist()
    with Path(path).open("w") as f:
        json.dump({"truth_ratio": {str(i): v for i, v in enumerate(values)}}, f, indent=1)



# ============================================================================ evaluation
def _mean_logprobs(model, tokenizer, prompts, continuations, batch_size, desc, show_progress, whole_text,
                   specials) -> Tensor:  # fmt: skip
    rows = encode_continuations(
        tokenizer, prompts, continuations, append_eos=True, whole_text=whole_text, specials=specials
    )
    total, count = sequence_scores(
        model, tokenizer, rows, batch_size=batch_size, desc=desc, show_progress=show_progress
    )
    return total / count


def _split_inputs(
    model, tokenizer, rows: Sequence[Row], name: str, base_column: str, *, prompt_template: str,
    max_new_tokens: int, batch_size: int, show_progress: bool, answer_template: str = "{answer}",
    whole_text: bool = False, specials: bool = True,
) -> dict[str, Any]:  # fmt: skip
    """Everything TOFU's metrics need of one split: its answers', paraphrases' and perturbed answers'
    mean token log-probs (one scoring pass over all of them) and the greedy generations."""
    prompts = [prompt_template.format(question=row["question"]) for row in rows]
    answers = [row["answer"] for row in rows]
    perturbed = [row["perturbed_answer"] for row in rows]
    k = len(perturbed[0])
    if any(len(p) != k for p in perturbed):
        raise ValueError(f"{name}: every row needs the same number of perturbed answers (first row has {k})")
    n = len(rows)
    paraphrases = [] if base_column == "answer" else [row[base_column] for row in rows]
    all_prompts = prompts + prompts[: len(paraphrases)] + [p for p in prompts for _ in range(k)]
    all_texts = answers + paraphrases + [a for answers_k in perturbed for a in answers_k]
    all_texts = [answer_template.format(answer=a) for a in all_texts]
    mean_lp = _mean_logprobs(
        model, tokenizer, all_prompts, all_texts, batch_size, f"tofu {name}: score", show_progress, whole_text,
        specials,
    )
    answer_lp = mean_lp[:n]
    base_lp = answer_lp if not paraphrases else mean_lp[n : 2 * n]
    inputs = {
        "answer_logprob": answer_lp,
        "paraphrased_logprob": base_lp,
        "perturbed_logprobs": mean_lp[n + len(paraphrases) :].view(n, k),
        "references": answers,
    }
    if max_new_tokens > 0:
        inputs["predictions"] = generate_greedy(
            model, tokenizer, prompts, max_new_tokens, batch_size, desc=f"tofu {name}: generate",
            show_progress=show_progress, add_special_tokens=specials,
        )  # fmt: skip
    return inputs


def prompt_template(tokenizer: Any, prompt_format: str | PromptFormat = "auto") -> str:
    """The prompt TOFU's scoring uses (see :func:`scoring_format`), as a ``prompt_template`` for
    :func:`evaluate_tofu` / :func:`truth_ratios`, which tokenize it with the tokenizer's special
    tokens: a bos the chat template writes is left to the tokenizer. Truth ratios saved for a
    forget-quality reference must be taken with the prompt the evaluation will use."""
    fmt = get_prompt_format(prompt_format).resolve(tokenizer)
    if fmt.chat_template:
        return fmt.prompt_template(tokenizer, strip_bos=True)
    return scoring_format(tokenizer, fmt)["prompt_template"]


def _rendering(tokenizer: Any, template: str, prompt_format: str | PromptFormat | None) -> dict[str, Any]:
    return {"prompt_template": template} if prompt_format is None else scoring_format(tokenizer, prompt_format)


def scoring_format(tokenizer: Any, prompt_format: str | PromptFormat = "auto") -> dict[str, Any]:
    """How TOFU's scoring renders a question and an answer under a prompt format.

    Our formats (``"auto"``, ``"chat"``, ``"qa"``): the chat prompt when the format uses the tokenizer's
    template, TOFU's plain :data:`TOFU_PROMPT` otherwise; the bare answer, tokenized apart, plus eos.
    The field's formats (``"open-unlearning/..."``, ``"tofu/..."``): their prompt and answer text,
    tokenized whole with eos where the text lacks it, as their evaluation scores them (``tofu/phi``:
    the prompt stops before ``Answer: ``, which is scored with the answer and generated by the model,
    as in TOFU's code). Text a chat template rendered keeps its own special tokens (``specials``
    False), as training tokenizes it.

    Returns:
        ``{"prompt_template": "...{question}...", "answer_template": "...{answer}...", "whole_text": bool,
        "specials": bool}``.
    """
    fmt = get_prompt_format(prompt_format).resolve(tokenizer)
    specials = fmt.adds_special_tokens(tokenizer)
    if fmt.is_field_format:
        return {"prompt_template": fmt.prompt_template(tokenizer), "answer_template": fmt.answer_template(tokenizer),
                "whole_text": True, "specials": specials}  # fmt: skip
    template = fmt.prompt_template(tokenizer) if fmt.chat_template else TOFU_PROMPT
    return {"prompt_template": template, "answer_template": "{answer}", "whole_text": False, "specials": specials}


def _accuracy(rows: Sequence[Row], predictions: Sequence[str]) -> float | None:
    """Fraction of greedy answers holding the row's bare "value" (qa.is_correct); None without values
    (TOFU's own answers are whole sentences, which a generation almost never repeats word for word)."""
    if not rows or any("value" not in row for row in rows):
        return None
    return sum(is_correct(p, str(row["value"])) for p, row in zip(predictions, rows)) / len(rows)


def truth_ratios(
    model: torch.nn.Module,
    tokenizer: Any,
    rows: Sequence[Row],
    *,
    prompt_template: str = TOFU_PROMPT,
    batch_size: int = 8,
    perturbed_mean: str = "geometric",
    show_progress: bool = True,
    prompt_format: str | PromptFormat | None = None,
) -> Tensor:
    """Per-example forget-set truth ratios (float64) of one model, without generating: what a retain
    oracle's file holds (`save_truth_ratios`), computed exactly as `evaluate_tofu` computes them
    (``prompt_format``, when given, instead of ``prompt_template``: see :func:`scoring_format`)."""
    require_columns(rows, _PERTURBED_COLUMNS, "truth_ratios rows")
    rendering = _rendering(tokenizer, prompt_template, prompt_format)
    inputs = _split_inputs(
        model, tokenizer, rows, "forget", "paraphrased_answer", max_new_tokens=0, batch_size=batch_size,
        show_progress=show_progress, **rendering,
    )  # fmt: skip
    ratio = TruthRatio("closer_to_1", perturbed_mean, **GATHERED)
    ratio.update(inputs["paraphrased_logprob"], inputs["perturbed_logprobs"])
    return ratio.per_example()


def evaluate_tofu(
    model: torch.nn.Module,
    tokenizer: Any,
    forget_rows: Sequence[Row],
    retain_rows: Sequence[Row],
    real_authors_rows: Sequence[Row],
    world_facts_rows: Sequence[Row],
    retain_model_truth_ratios: Tensor | Sequence[float] | PathLike | None = None,
    *,
    retain_logs_path: PathLike | None = None,
    prompt_template: str = TOFU_PROMPT,
    max_new_tokens: int = 32,
    batch_size: int = 8,
    rouge_stemmer: str | None = "porter",
    perturbed_mean: str = "geometric",
    show_progress: bool = True,
    prompt_format: str | PromptFormat | None = None,
    holdout_rows: Sequence[Row] | None = None,
    privacy: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """TOFU's evaluation of one model (definitions in `blur_lightning.evals.metrics`).

    Args:
        model: a causal LM.
        tokenizer: its tokenizer (needs an EOS token).
        forget_rows: a forgetXX_perturbed split (question, answer, paraphrased_answer, perturbed_answer).
        retain_rows: retain_perturbed (same columns).
        real_authors_rows: real_authors_perturbed (question, answer, perturbed_answer).
        world_facts_rows: world_facts_perturbed (same columns).
        retain_model_truth_ratios: a retain-only model's forget-set truth ratios (values or a
            JSON file, see `load_truth_ratios`); forget quality is reported only when given.
        retain_logs_path: instead, a retain-only model's evaluation log, open-unlearning's
            TOFU_EVAL.json (its published retain90 logs) or TOFU's eval_log_forget.json, or the
            folder holding it (:func:`~blur_lightning.evals.reference_logs.read_reference_log`). Its
            forget examples are matched to the rows by index: it must hold as many as `forget_rows`.
        prompt_template: format string with a {question} field; the answer follows it.
        max_new_tokens: generation length for ROUGE.
        batch_size: sequences per forward / generate call.
        rouge_stemmer: "porter" (TOFU's own evaluation, the default) or None.
        perturbed_mean: "geometric" (TOFU code) or "arithmetic" (TOFU paper).
        show_progress: show progress bars (on a terminal).
        prompt_format: a prompt format (:mod:`blur_lightning.data.prompts`) instead of
            ``prompt_template``: its prompt and answer rendering (see :func:`scoring_format`).
        holdout_rows: questions the model never saw (TOFU's holdout10: question, answer), the
            non-members of the membership-inference attacks.
        privacy: memorization / attack options (:func:`~blur_lightning.evals.membership.privacy_options`);
            None: neither. The forget and holdout answers are scored as the forget answers above
            (prompt, answer, eos); PrivLeak's reference AUC defaults to the retain log's ``mia_min_k``
            when ``retain_logs_path`` holds one, else 0.5 (open-unlearning's ``ref_value``).

    Returns:
        Floats "{split}/prob", "{split}/rouge_l_recall", "{split}/truth_ratio" for split in
        forget, retain, real_authors, world_facts (forget's truth ratio is min(R, 1/R), the
        others max(0, 1 - R)); "{split}/accuracy" where every row of the split has a "value" (the
        fictitious benchmark's bare answers: the fraction of greedy answers holding it);
        "model_utility"; "forget_quality" when a reference is given;
        and "forget/truth_ratios", the per-example list to save with `save_truth_ratios`
        when this model is the retain-only reference; "{split}/per_example" per split, the
        per-example answer_logprob, paraphrased_logprob (forget, retain), perturbed_logprobs and
        rouge_l_recall (what open-unlearning's TOFU_EVAL.json holds: `log_export.tofu_logs`); with
        ``privacy``, "exact_memorization", "extraction_strength" (forget) and "mia_{attack}", "privleak"
        (forget against holdout) and their per-example values (`membership.evaluate_privacy`).
    """
    require_columns(forget_rows, _PERTURBED_COLUMNS, "forget_rows")
    require_columns(retain_rows, _PERTURBED_COLUMNS, "retain_rows")
    require_columns(real_authors_rows, _NO_PARAPHRASE_COLUMNS, "real_authors_rows")
    require_columns(world_facts_rows, _NO_PARAPHRASE_COLUMNS, "world_facts_rows")
    reference = _reference_truth_ratios(retain_model_truth_ratios, retain_logs_path, perturbed_mean, len(forget_rows))
    rendering = _rendering(tokenizer, prompt_template, prompt_format)
    common = {"max_new_tokens": max_new_tokens, "batch_size": batch_size, "show_progress": show_progress, **rendering}

    utility = ModelUtility(rouge_stemmer=rouge_stemmer, perturbed_mean=perturbed_mean, **GATHERED)
    accuracies: dict[str, float | None] = {}
    per_example: dict[str, dict[str, list]] = {}
    for split, rows, base_column in (
        ("retain", retain_rows, "paraphrased_answer"),
        ("real_authors", real_authors_rows, "answer"),
        ("world_facts", world_facts_rows, "answer"),
    ):
        inputs = _split_inputs(model, tokenizer, rows, split, base_column, **common)
        accuracies[split] = _accuracy(rows, inputs["predictions"])
        utility.update(split, **inputs)
        per_example[split] = _per_example(inputs, utility.children_metrics[f"{split}__rouge_l_recall"].per_example())
    results: dict[str, Any] = {k: v.item() for k, v in utility.compute_all().items()}

    forget = _split_inputs(model, tokenizer, forget_rows, "forget", "paraphrased_answer", **common)
    accuracies["forget"] = _accuracy(forget_rows, forget["predictions"])
    results.update({f"{split}/accuracy": value for split, value in accuracies.items() if value is not None})
    prob, rouge = AnswerProbability(**GATHERED), RougeL("recall", rouge_stemmer, **GATHERED)
    ratio = TruthRatio("closer_to_1", perturbed_mean, **GATHERED)
    prob.update(forget["answer_logprob"])
    rouge.update(forget["predictions"], forget["references"])
    ratio.update(forget["paraphrased_logprob"], forget["perturbed_logprobs"])
    results["forget/prob"] = prob.compute().item()
    results["forget/rouge_l_recall"] = rouge.compute().item()
    results["forget/truth_ratio"] = ratio.compute().item()
    results["forget/truth_ratios"] = ratio.per_example().tolist()
    per_example["forget"] = _per_example(forget, rouge.per_example())
    results.update({f"{split}/{PER_EXAMPLE}": values for split, values in per_example.items()})
    if reference is not None:
        quality = ForgetQuality(reference, perturbed_mean=perturbed_mean, **GATHERED)
        quality.update(forget["paraphrased_logprob"], forget["perturbed_logprobs"])
        results["forget_quality"] = quality.compute().item()
    if privacy is not None:
        results.update(_privacy(model, tokenizer, forget_rows, holdout_rows, privacy, rendering, retain_logs_path,
                                batch_size, show_progress))  # fmt: skip
    return results


def _answer_rows(tokenizer: Any, rows: Sequence[Row], rendering: Mapping[str, Any]) -> list[dict[str, list[int]]]:
    """Question-answer rows encoded as the forget answers are scored (prompt, answer, eos)."""
    require_columns(rows, ("question", "answer"), "tofu rows")
    return encode_continuations(
        tokenizer, [rendering["prompt_template"].format(question=r["question"]) for r in rows],
        [rendering.get("answer_template", "{answer}").format(answer=r["answer"]) for r in rows], append_eos=True,
        whole_text=rendering.get("whole_text", False), specials=rendering.get("specials", True),
    )  # fmt: skip


def _privacy(model, tokenizer, forget_rows, holdout_rows, privacy, rendering, retain_logs_path, batch_size,
             show_progress) -> dict[str, Any]:  # fmt: skip
    """Memorization on forget, the attacks on forget against holdout (`membership.evaluate_privacy`)."""
    privacy = dict(privacy)
    if privacy.get("privleak_ref_auc") is None:
        ref = read_reference_log(retain_logs_path).raw_summary.get("mia_min_k") if retain_logs_path else None
        privacy["privleak_ref_auc"] = 0.5 if ref is None else ref  # open-unlearning's privleak ref_value: 0.5
    holdout = _answer_rows(tokenizer, holdout_rows, rendering) if holdout_rows else None
    return evaluate_privacy(
        model, tokenizer, _answer_rows(tokenizer, forget_rows, rendering), holdout, privacy,
        batch_size=batch_size, show_progress=show_progress, name="tofu",
    )  # fmt: skip


def _per_example(inputs: Mapping[str, Any], rouge_l_recall: Tensor) -> dict[str, list]:
    """A split's per-example values for the field's log layout (`log_export.tofu_logs`)."""
    values = {
        "answer_logprob": inputs["answer_logprob"].tolist(),
        "perturbed_logprobs": inputs["perturbed_logprobs"].tolist(),
        "rouge_l_recall": rouge_l_recall.tolist(),
    }
    if inputs["paraphrased_logprob"] is not inputs["answer_logprob"]:  # real_authors / world_facts have none
        values["paraphrased_logprob"] = inputs["paraphrased_logprob"].tolist()
    return values


def _reference_truth_ratios(
    values: Tensor | Sequence[float] | PathLike | None, logs_path: PathLike | None, perturbed_mean: str, n_forget: int
) -> Tensor | None:
    """The retain model's forget truth ratios from `retain_model_truth_ratios` or `retain_logs_path`
    (read before any scoring, so a bad reference fails in seconds, not after the evaluation)."""
    if values is not None and logs_path is not None:
        raise ValueError("tofu options: give retain_model_truth_ratios or retain_logs_path, not both")
    if logs_path is not None:
        if perturbed_mean != "geometric":
            raise ValueError(
                f"retain_logs_path: the field's logs hold truth ratios over the geometric mean of the perturbed "
                f"answers; perturbed_mean={perturbed_mean!r} would compare two definitions (use 'geometric')"
            )
        log = read_reference_log(logs_path)
        if log.benchmark != "tofu":
            raise ValueError(f"retain_logs_path {str(logs_path)!r}: a {log.benchmark} log, not a TOFU one")
        return log.forget_truth_ratios(n_forget)
    if isinstance(values, (str, Path)):
        return load_truth_ratios(values)
    return values


class TofuBenchmark(Benchmark):
    """TOFU's four perturbed sets: forget, retain, real_authors, world_facts (all four needed).

    Options: the keywords of :func:`evaluate_tofu` (``retain_model_truth_ratios`` or
    ``retain_logs_path``, ``rouge_stemmer``, ``perturbed_mean``, ``prompt_template``); without a
    ``prompt_template`` the run's prompt format renders questions and answers (:func:`scoring_format`);
    and the memorization / attack options of :func:`~blur_lightning.evals.membership.privacy_options`
    (exact memorization and extraction strength on forget by default; the attacks when a ``holdout``
    split, e.g. TOFU's ``holdout10``, is named).
    With ``retain_logs_path`` the before/after table has the reference log's own values beside ours
    ("retain (ref)").
    """

    name = "tofu"
    hub_repo = TOFU_HUB
    default_split = "train"
    # The before/after table, in order: (result key, label, as a percentage).
    table_rows: tuple[tuple[str, str, bool], ...] = (
        ("forget_quality", "forget quality (KS p vs retain)", False),
        ("model_utility", "model utility", False),
        *((f"{split}/{stat}", f"{split}: {label}", False) for split in SPLIT_NAMES
          for stat, label in (("prob", "answer probability"), ("rouge_l_recall", "ROUGE-L recall"),
                              ("truth_ratio", "truth ratio"))),
        *PRIVACY_TABLE_ROWS,
    )  # fmt: skip
    reference_title = "retain (ref)"

    def check_splits(self, names: Sequence[str], options: Mapping[str, Any]) -> None:
        if set(names) - {HOLDOUT_SPLIT} != set(SPLIT_NAMES):
            raise ValueError(f"{self.name} needs exactly the splits {SPLIT_NAMES} (and optionally "
                             f"{HOLDOUT_SPLIT!r}, for the membership attacks), got {sorted(names)}")  # fmt: skip
        privacy_options(dict(options), has_holdout=HOLDOUT_SPLIT in names)  # bad options fail before training
        if options.get("retain_logs_path") is not None:
            if options.get("retain_model_truth_ratios") is not None:
                raise ValueError(f"{self.name} options: give retain_model_truth_ratios or retain_logs_path, not both")
            log = read_reference_log(options["retain_logs_path"])  # a bad path or log fails before training
            if log.benchmark != "tofu":
                raise ValueError(f"retain_logs_path {options['retain_logs_path']!r}: a {log.benchmark} log, not TOFU's")
            log.forget_truth_ratios()

    def report(
        self, before: Results | None, after: Results | None, sizes: Mapping[str, int],
        options: Mapping[str, Any] | None = None,
    ) -> str | None:  # fmt: skip
        path = (options or {}).get("retain_logs_path")
        reference = (self.reference_title, read_reference_log(path).summary) if path is not None else None
        return before_after_table(self.table_rows, before, after, sizes, reference)

    def field_logs(self, results: Results, options: Mapping[str, Any] | None = None) -> dict[str, Any] | None:
        return tofu_logs(results, perturbed_mean=(options or {}).get("perturbed_mean", "geometric"))

    def evaluate(
        self, model: Any, tokenizer: Any, rows: Mapping[str, Sequence[Row]], settings: EvalSettings,
        options: Mapping[str, Any],
    ) -> Results:  # fmt: skip
        options = dict(options)
        if "prompt_template" not in options:  # an explicit template wins; else the run's prompt format
            options.setdefault("prompt_format", settings.prompt_format)
        if settings.max_new_tokens is not None:
            options.setdefault("max_new_tokens", settings.max_new_tokens)
        privacy = privacy_options(options, has_holdout=HOLDOUT_SPLIT in rows)
        return evaluate_tofu(
            model, tokenizer, rows["forget"], rows["retain"], rows["real_authors"], rows["world_facts"],
            batch_size=settings.batch_size, show_progress=settings.show_progress,
            holdout_rows=rows.get(HOLDOUT_SPLIT), privacy=privacy, **options,
        )  # fmt: skip


BENCHMARK = TofuBenchmark()
