"""Writing our results in open-unlearning's layout: ``TOFU_EVAL.json`` / ``MUSE_EVAL.json`` and their summaries.

The files open-unlearning's evaluator writes (``src/evals/base.py``): per metric, under its name,
``agg_value`` and ``value_by_index`` ({dataset index as a string: {statistic: value}}); the summary is
``{metric: agg_value}``. What we write is what :func:`~blur_lightning.evals.reference_logs.read_reference_log`
reads back (a tested round trip), so one of our runs of a retain model is a forget-quality reference for
the next, and the field's tools read our runs.

Only the metrics we compute are written, each with the statistics open-unlearning's own entry holds
where we have them (ROUGE entries: ``rougeL_recall`` or ``rougeL_f1`` only). ``exact_memorization`` and
``extraction_strength`` (``value_by_index`` ``score``), ``mia_*`` (``forget`` and ``holdout`` each with
``agg_value`` and per-example ``score``, then ``auc`` and ``agg_value``) and TOFU's ``privleak`` are
written when the evaluation ran them (evals.membership). Not written: ``forget_Q_A_gibberish``,
``forget_Q_A_PARA_ROUGE`` / ``PERT_ROUGE``, ``forget_gibberish``. MUSE's ``mia_min_k`` and ``privleak``
are our MUSE PrivLeak's Min-K% membership test in open-unlearning's sign (score = minus the Min-K%
log-prob, AUC = 1 - ours); that Min-K% follows MUSE's code, which scores every token of a text
(open-unlearning's leaves out the last, as our other MUSE attacks do).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from blur_lightning.evals.metrics import normalized_probability, relative_answer_probability, truth_ratio
from blur_lightning.evals.reference_logs import MUSE_NAMES, OPEN_UNLEARNING_SPLITS, tofu_metric_name

__all__ = ["PER_EXAMPLE", "muse_logs", "privacy_logs", "tofu_logs"]

PER_EXAMPLE = "per_example"  # results["{split}/per_example"]: a split's per-example values
_MUSE_ROUGE_SPLITS = {"verbmem_f": "verbmem", "knowmem_f": "knowmem_forget", "knowmem_r": "knowmem_retain"}


def _by_index(values: Sequence[Any], key: str) -> dict[str, dict[str, Any]]:
    return {str(i): {key: v} for i, v in enumerate(values)}


def _entry(agg_value: float, value_by_index: dict[str, dict[str, Any]] | None = None) -> dict[str, Any]:
    entry: dict[str, Any] = {"agg_value": float(agg_value)}
    if value_by_index is not None:
        entry["value_by_index"] = value_by_index
    return entry


def _mean(values: torch.Tensor) -> float:
    return values.double().mean().item()


def _probability_entry(logprob: torch.Tensor) -> dict[str, Any]:
    """open-unlearning's ``probability`` entry: prob = exp(-avg_loss) per answer (a list per example
    for the perturbed answers); agg_value the mean over everything."""
    prob = normalized_probability(logprob)
    value_by_index = {
        str(i): {"prob": p, "avg_loss": loss} for i, (p, loss) in enumerate(zip(prob.tolist(), (-logprob).tolist()))
    }
    return _entry(_mean(prob), value_by_index)


def tofu_logs(results: Mapping[str, Any], perturbed_mean: str = "geometric") -> dict[str, dict[str, Any]] | None:
    """One TOFU evaluation (:func:`~blur_lightning.evals.tofu.evaluate_tofu`'s results) in open-unlearning's files.

    Args:
        results: the scalars and the per-example values ("{split}/per_example": answer_logprob,
            paraphrased_logprob on forget / retain, perturbed_logprobs, rouge_l_recall).
        perturbed_mean: how the evaluation averaged the perturbed answers ("geometric", TOFU's code, or
            "arithmetic"): the per-example ratios are those its aggregates came from.

    Returns:
        {"TOFU_EVAL.json": ..., "TOFU_SUMMARY.json": ...}; None when the results hold no per-example values.
    """
    logs: dict[str, Any] = {}
    for split in OPEN_UNLEARNING_SPLITS:
        values = results.get(f"{split}/{PER_EXAMPLE}")
        if not isinstance(values, Mapping):
            continue
        answer = torch.tensor(values["answer_logprob"], dtype=torch.float64)
        perturbed = torch.tensor(values["perturbed_logprobs"], dtype=torch.float64)  # (n, K)
        base = answer
        logs[tofu_metric_name(split, "answer")] = _probability_entry(answer)
        if "paraphrased_logprob" in values:
            base = torch.tensor(values["paraphrased_logprob"], dtype=torch.float64)
            logs[tofu_metric_name(split, "paraphrased")] = _probability_entry(base)
        logs[tofu_metric_name(split, "perturbed")] = _probability_entry(perturbed)
        if split in ("real_authors", "world_facts"):
            relative = relative_answer_probability(answer, perturbed)
            logs[tofu_metric_name(split, "prob")] = _entry(
                results[f"{split}/prob"], _by_index(relative.tolist(), "prob")
            )
        rouge = values["rouge_l_recall"]
        logs[tofu_metric_name(split, "rouge_l_recall")] = _entry(
            results[f"{split}/rouge_l_recall"], _by_index(rouge, "rougeL_recall")
        )
        ratios = truth_ratio(base, perturbed, perturbed_mean)  # R itself, whatever the aggregate: its "score"
        logs[tofu_metric_name(split, "truth_ratio")] = _entry(
            results[f"{split}/truth_ratio"], _by_index(ratios.tolist(), "score")
        )
    if not logs:
        return None
    for key in ("forget_quality", "model_utility", "privleak"):
        if key in results:
            logs[key] = _entry(results[key])
    logs.update(privacy_logs(results))
    return _with_summary(logs, "TOFU")


def privacy_logs(results: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """The memorization and attack entries of an evaluation (evals.membership's results) in open-unlearning's
    layout: ``exact_memorization`` / ``extraction_strength`` and ``mia_{attack}``; {} when none ran."""
    logs: dict[str, Any] = {}
    memorization = results.get(f"memorization/{PER_EXAMPLE}")
    if isinstance(memorization, Mapping):
        for key in ("exact_memorization", "extraction_strength"):
            if key in results:
                logs[key] = _entry(results[key], _by_index(memorization[key], "score"))
    forget, holdout = (results.get(f"mia_{part}/{PER_EXAMPLE}") for part in ("forget", "holdout"))
    if isinstance(forget, Mapping) and isinstance(holdout, Mapping):
        for attack in forget:
            name = f"mia_{attack}"
            if name not in results:
                continue
            parts = {part: _entry(sum(v) / len(v), _by_index(v, "score"))
                     for part, v in (("forget", forget[attack]), ("holdout", holdout[attack]))}  # fmt: skip
            logs[name] = {**parts, "auc": results[name], "agg_value": results[name]}
    return logs


def muse_logs(results: Mapping[str, Any]) -> dict[str, dict[str, Any]] | None:
    """One MUSE evaluation (:func:`~blur_lightning.evals.muse.evaluate_muse`'s results) in open-unlearning's files.

    Args:
        results: the scalars and the per-example values ("{split}/per_example": rouge_l_f1 for
            verbmem / knowmem_forget / knowmem_retain; min_k for privleak_forget / privleak_holdout).

    Returns:
        {"MUSE_EVAL.json": ..., "MUSE_SUMMARY.json": ...}; None when the results hold no per-example values.
    """
    logs: dict[str, Any] = {}
    for key, split in _MUSE_ROUGE_SPLITS.items():
        values = results.get(f"{split}/{PER_EXAMPLE}")
        if isinstance(values, Mapping) and key in results:
            logs[MUSE_NAMES[key]] = _entry(results[key], _by_index(values["rouge_l_f1"], "rougeL_f1"))
    forget, holdout = (results.get(f"privleak_{part}/{PER_EXAMPLE}") for part in ("forget", "holdout"))
    if isinstance(forget, Mapping) and isinstance(holdout, Mapping) and "privleak_auc" in results:
        auc = 1.0 - results["privleak_auc"]  # open-unlearning's sign: see the module docstring
        parts = {}
        for part, values in (("forget", forget), ("holdout", holdout)):
            scores = [-v for v in values["min_k"]]
            parts[part] = _entry(sum(scores) / len(scores), _by_index(scores, "score"))
        logs[MUSE_NAMES["privleak_auc"]] = {**parts, "auc": auc, "agg_value": auc}
        if "privleak" in results:
            logs[MUSE_NAMES["privleak"]] = _entry(results["privleak"])
    logs.update({name: entry for name, entry in privacy_logs(results).items() if name not in logs})
    return _with_summary(logs, "MUSE") if logs else None


def _with_summary(logs: dict[str, Any], name: str) -> dict[str, dict[str, Any]]:
    logs = dict(sorted(logs.items()))  # open-unlearning sorts its entries too
    return {f"{name}_EVAL.json": logs, f"{name}_SUMMARY.json": {k: v["agg_value"] for k, v in logs.items()}}
