"""The fictitious benchmark: TOFU's evaluation on planted facts, with an exact retain oracle.

The rows are blur_lightning.data.fictitious_people's splits (TOFU's columns plus the bare ``value`` of each fact),
the target and the oracle are built by blur_lightning.fictitious.build. What it adds to TOFU's evaluation:

* ``forget_quality`` against the oracle's saved per-example truth ratios (option
  ``oracle_truth_ratios``: a file written once per oracle, or the values; or ``retain_logs_path``:
  the oracle's evaluation log in the field's layout, e.g. the ``TOFU_EVAL.json`` an evaluation
  callback wrote for it). The oracle evaluated against its own file gets exactly 1.0;
* ``{split}/accuracy``: greedy answers that hold the fact's value (qa.is_correct), on every split;
* ``forget/paraphrased_accuracy`` and ``forget/paraphrased_prob``: the same facts asked the other way
  (``paraphrased_question``, never trained on): knowledge, not a memorized string.

Everything else (model utility, ROUGE-L, probabilities, truth ratios, exact memorization and extraction
strength of the forget answers) is :func:`evaluate_tofu`'s. The membership-inference attacks need people the
evaluated model never saw, and a build has none for the target: it is fine-tuned on ``full``, every person
(validation10 included; only the oracle is not). So they run only when a ``holdout`` split is named (e.g. the
rows of another build's people, rendered the same way); by default the fictitious benchmark reports no
attack, rather than an AUC against people the target was trained on.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from blur_lightning.data.fictitious_people import qa_rows
from blur_lightning.data.rows import Row, require_columns
from blur_lightning.evals.base import EvalSettings, Results
from blur_lightning.evals.qa import evaluate_qa
from blur_lightning.evals.tofu import PRIVACY_TABLE_ROWS, SPLIT_NAMES, TofuBenchmark

__all__ = ["BENCHMARK", "FictitiousBenchmark"]

# What the before/after table shows, in order: (result key, label, as a percentage).
TABLE: tuple[tuple[str, str, bool], ...] = (
    ("forget_quality", "forget quality (KS p vs oracle)", False),
    ("model_utility", "model utility", False),
    ("forget/accuracy", "forget: accuracy", True),
    ("forget/paraphrased_accuracy", "forget, paraphrased: accuracy", True),
    ("forget/prob", "forget: answer probability", False),
    ("forget/rouge_l_recall", "forget: ROUGE-L recall", False),
    ("forget/truth_ratio", "forget: truth ratio", False),
    ("retain/accuracy", "retain: accuracy", True),
    ("real_authors/accuracy", "real authors: accuracy", True),
    ("world_facts/accuracy", "world facts: accuracy", True),
    *PRIVACY_TABLE_ROWS,
)


class FictitiousBenchmark(TofuBenchmark):
    """TOFU's four sets from blur_lightning.data.fictitious_people, forget quality against the oracle's file.

    Options: ``oracle_truth_ratios`` (a JSON file of blur_lightning.fictitious.build, or the values) or
    ``retain_logs_path`` (the oracle's evaluation log, read by
    :func:`~blur_lightning.evals.reference_logs.read_reference_log`); without either no forget quality.
    ``paraphrased: false`` skips the paraphrased questions; every other keyword of
    :func:`~blur_lightning.evals.tofu.evaluate_tofu` but ``retain_model_truth_ratios`` is passed on.
    """

    name = "fictitious"
    hub_repo = None
    default_split = None
    table_rows = TABLE
    reference_title = "oracle (ref)"

    def check_splits(self, names: Sequence[str], options: Mapping[str, Any]) -> None:
        if "retain_model_truth_ratios" in options:
            raise ValueError("fictitious: name the oracle's file as options.oracle_truth_ratios")
        if options.get("oracle_truth_ratios") is not None and options.get("retain_logs_path") is not None:
            raise ValueError("fictitious options: give oracle_truth_ratios or retain_logs_path, not both")
        super().check_splits(names, options)

    def evaluate(
        self, model: Any, tokenizer: Any, rows: Mapping[str, Sequence[Row]], settings: EvalSettings,
        options: Mapping[str, Any],
    ) -> Results:  # fmt: skip
        options = dict(options)
        self.check_splits(list(rows), options)
        oracle = options.pop("oracle_truth_ratios", None)
        paraphrased = options.pop("paraphrased", True)
        for name in SPLIT_NAMES:
            require_columns(rows[name], ("value",), f"fictitious split {name!r}")
        if oracle is not None:
            options["retain_model_truth_ratios"] = oracle
        results = super().evaluate(model, tokenizer, rows, settings, options)
        if paraphrased:
            qa = evaluate_qa(
                model, tokenizer, qa_rows(rows["forget"], paraphrased=True), prob_column="response",
                max_new_tokens=settings.max_new_tokens or 32, batch_size=settings.batch_size,
                prompt_format=settings.prompt_format, name="fictitious forget paraphrased",
                show_progress=settings.show_progress,
            )  # fmt: skip
            results["forget/paraphrased_accuracy"] = qa["accuracy"]
            results["forget/paraphrased_prob"] = qa["answer_prob"]
        return results


BENCHMARK = FictitiousBenchmark()
