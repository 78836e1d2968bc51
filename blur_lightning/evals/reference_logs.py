"""Reading the field's evaluation logs: a reference model's per-example values, in our vocabulary.

Two layouts, told apart by file name or contents:

* open-unlearning (``src/evals/base.py``): ``TOFU_EVAL.json`` / ``MUSE_EVAL.json``, one entry per
  metric with ``agg_value`` and, per example, ``value_by_index`` keyed by the dataset index as a
  string; ``*_SUMMARY.json`` beside it holds the ``agg_value``\\ s only. Its published retain-model
  logs (hub dataset ``open-unlearning/eval``) are what its ``retain_logs_path`` option points at.
* TOFU's own (locuslab/tofu ``evaluate_util.py``): ``eval_log_forget.json`` (forget),
  ``eval_log.json`` (retain), ``eval_real_author_wo_options.json``, ``eval_real_world_wo_options.json``,
  each ``{statistic: {index: value}}`` with mean token losses ``avg_gt_loss``, ``avg_paraphrased_loss``,
  ``average_perturb_loss`` (a list per example) and ``rougeL_recall``; or all four in one
  ``eval_log_aggregated.json`` keyed by those file names. TOFU's ``aggregate_eval_stat.py`` computes
  forget quality and model utility from them; no aggregate file comes with them.

What a reader gets (:class:`ReferenceLog`): per TOFU split the answer, paraphrase and perturbed
answers' mean token log-probs (minus the logged losses), ROUGE-L recall and truth ratios, in index
order; for MUSE (and open-unlearning's TOFU) the Min-K% membership scores; and the log's own
aggregates under our result keys (``summary``), for a "reference" column beside ours.

Conventions matched (each checked against the reference code and, in the tests, its published numbers):

* open-unlearning's ``forget_truth_ratio`` ``value_by_index`` ``score`` is the raw ratio
  R = P_norm(perturbed) / (P_norm(paraphrased) + 1e-10) whatever the aggregator (``closer_to_1_better``
  only shapes ``agg_value``); its ``ks_test`` (forget quality) compares those raw R of two models. We read
  them as they are: our KS test of R gives its p-value.
* TOFU's logs store losses; R = exp(mean_k L_pert_k - L_para)^-1 = exp(L_para - mean_k L_pert_k), as
  ``aggregate_eval_stat.py`` (which feeds 1 / R to the KS test: same p-value, see evals.metrics).
* open-unlearning's ``mia_min_k`` scores a text by minus its Min-K% log-prob and labels forget 0,
  holdout 1, so its AUC is 1 - ours (MUSE's convention, evals.metrics ``min_k_auc``); its
  ``privleak`` flips both AUCs back, which makes it MUSE's PrivLeak. ``summary["privleak_auc"]`` is
  ours: 1 - its ``mia_min_k``.
* Every ``mia_*`` entry's forget and holdout ``score`` values are kept as the log signs them (a loss's sign,
  evals.mia) in ``attack_scores``, and ``exact_memorization`` / ``extraction_strength``'s per-example
  ``score`` values in ``memorization``: :func:`attack_aucs`, :func:`memorization_means` and
  :func:`privleak` recompute the log's aggregates from them with our code.
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from blur_lightning.evals.metrics import (
    TOFU_UTILITY_KEYS,
    min_k_auc,
    model_utility,
    normalized_probability,
    relative_answer_probability,
    truth_ratio,
    truth_ratio_score,
)
from blur_lightning.evals.mia import attack_auc, privleak_from_auc

__all__ = [
    "MUSE_NAMES",
    "OPEN_UNLEARNING",
    "OPEN_UNLEARNING_EPS",
    "OPEN_UNLEARNING_SPLITS",
    "TOFU",
    "TOFU_FILES",
    "ReferenceLog",
    "SplitLog",
    "attack_aucs",
    "membership_auc",
    "memorization_means",
    "privleak",
    "read_reference_log",
    "tofu_metric_name",
    "tofu_names",
    "tofu_statistics",
]

PathLike = str | Path
OPEN_UNLEARNING, TOFU = "open-unlearning", "tofu"  # the two layouts
# open-unlearning adds 1e-10 to the denominators of its truth ratio and normalized probability
# (memorization.py); TOFU adds nothing. It moves a ratio only where P_norm is near 1e-10.
OPEN_UNLEARNING_EPS = 1e-10
# Our TOFU split names -> open-unlearning's metric-name prefixes (configs/eval/tofu_metrics/*.yaml).
OPEN_UNLEARNING_SPLITS = {"forget": "forget", "retain": "retain", "real_authors": "ra", "world_facts": "wf"}
# Our TOFU split names -> TOFU's own log files.
TOFU_FILES = {
    "forget": "eval_log_forget.json", "retain": "eval_log.json",
    "real_authors": "eval_real_author_wo_options.json", "world_facts": "eval_real_world_wo_options.json",
}  # fmt: skip
_TOFU_AGGREGATED = "eval_log_aggregated.json"
# Our MUSE result keys -> open-unlearning's MUSE metric names (configs/eval/muse_metrics/*.yaml);
# privleak_auc is 1 - mia_min_k (module docstring).
MUSE_NAMES = {
    "verbmem_f": "forget_verbmem_ROUGE", "knowmem_f": "forget_knowmem_ROUGE", "knowmem_r": "retain_knowmem_ROUGE",
    "privleak_auc": "mia_min_k", "privleak": "privleak",
}  # fmt: skip
_EVAL_FILES = {"tofu": "TOFU_EVAL.json", "muse": "MUSE_EVAL.json"}
_TOFU_MARKERS = ("forget_truth_ratio", "forget_Q_A_Prob", "retain_Q_A_Prob", "model_utility", "forget_quality")
_MUSE_MARKERS = ("forget_verbmem_ROUGE", "forget_knowmem_ROUGE", "retain_knowmem_ROUGE")


def tofu_metric_name(split: str, stat: str) -> str:
    """open-unlearning's name of one of our TOFU statistics.

    Args:
        split: "forget", "retain", "real_authors" or "world_facts".
        stat: "prob" (answer probability; on real_authors / world_facts the normalized one),
            "rouge_l_recall", "truth_ratio", or the per-example inputs "answer", "paraphrased", "perturbed".

    Returns:
        e.g. "forget_truth_ratio", "retain_Truth_Ratio", "ra_Q_A_Prob_normalised", "wf_Q_A_PERT_Prob".
    """
    prefix = OPEN_UNLEARNING_SPLITS[split]
    if stat == "truth_ratio":  # open-unlearning spells the forget one in lower case
        return "forget_truth_ratio" if split == "forget" else f"{prefix}_Truth_Ratio"
    if stat == "prob":
        return f"{prefix}_Q_A_Prob" if split in ("forget", "retain") else f"{prefix}_Q_A_Prob_normalised"
    names = {"rouge_l_recall": "Q_A_ROUGE", "answer": "Q_A_Prob", "paraphrased": "Q_A_PARA_Prob",
             "perturbed": "Q_A_PERT_Prob"}  # fmt: skip
    if stat not in names:
        raise ValueError(f"stat={stat!r}: expected prob, rouge_l_recall, truth_ratio, answer, paraphrased or perturbed")
    return f"{prefix}_{names[stat]}"


def tofu_names() -> dict[str, str]:
    """Our TOFU result keys ("forget/prob", "model_utility", ...) -> open-unlearning's metric names."""
    names = {"forget_quality": "forget_quality", "model_utility": "model_utility"}
    for split in OPEN_UNLEARNING_SPLITS:
        for stat in ("prob", "rouge_l_recall", "truth_ratio"):
            names[f"{split}/{stat}"] = tofu_metric_name(split, stat)
    return names


# ============================================================================ what a log holds
@dataclass(frozen=True, eq=False)
class SplitLog:
    """One TOFU split's per-example values in a log, in index order (None: the log lacks them).

    Attributes:
        indices: the dataset indices, ascending.
        answer_logprob: (n,) mean token log-prob of the answer (minus the logged mean loss).
        paraphrased_logprob: (n,) of the paraphrased answer (the answer itself where a split has none).
        perturbed_logprobs: (n, K) of the K perturbed answers.
        rouge_l_recall: (n,) ROUGE-L recall of the greedy answer.
        truth_ratios: (n,) R as the log defines it (module docstring).
    """

    indices: tuple[int, ...]
    answer_logprob: Tensor | None = None
    paraphrased_logprob: Tensor | None = None
    perturbed_logprobs: Tensor | None = None
    rouge_l_recall: Tensor | None = None
    truth_ratios: Tensor | None = None


@dataclass(frozen=True, eq=False)
class ReferenceLog:
    """A reference model's evaluation log (:func:`read_reference_log`); shared between readers: do
    not modify its tensors (the methods return copies).

    Attributes:
        source: the file read (a folder for TOFU's split files).
        layout: ``OPEN_UNLEARNING`` or ``TOFU``.
        benchmark: "tofu" or "muse".
        splits: TOFU split name -> :class:`SplitLog` (the splits the log holds).
        min_k_scores: "forget" / "holdout" -> (n,) Min-K% log-probs (our sign: higher looks more
            seen), where the log has open-unlearning's ``mia_min_k``.
        summary: the log's own aggregates under our result keys (open-unlearning: its ``agg_value``\\ s,
            privleak_auc flipped; TOFU: what ``aggregate_eval_stat.py`` computes, :func:`tofu_statistics`).
        raw_summary: every aggregate of the log under its own names (open-unlearning only).
        attack_scores: open-unlearning metric name ("mia_loss", ...) -> "forget" / "holdout" -> (n,)
            per-example attack scores, signed as the log signs them (higher: less likely a member).
        memorization: "exact_memorization" / "extraction_strength" -> (n,) per-example scores.
    """

    source: str
    layout: str
    benchmark: str
    splits: dict[str, SplitLog] = field(default_factory=dict)
    min_k_scores: dict[str, Tensor] = field(default_factory=dict)
    summary: dict[str, float] = field(default_factory=dict)
    raw_summary: dict[str, float] = field(default_factory=dict)
    attack_scores: dict[str, dict[str, Tensor]] = field(default_factory=dict)
    memorization: dict[str, Tensor] = field(default_factory=dict)

    @property
    def eps(self) -> float:
        """The truth-ratio / normalized-probability epsilon of the layout's code."""
        return OPEN_UNLEARNING_EPS if self.layout == OPEN_UNLEARNING else 0.0

    def forget_truth_ratios(self, expected_size: int | None = None) -> Tensor:
        """The forget set's per-example truth ratios R, in index order, as a float64 copy.

        Args:
            expected_size: the number of forget rows evaluated against them; checked when given.

        Raises:
            ValueError: the log has no forget truth ratios; or holds a different number of forget
                examples than ``expected_size``, or indices other than 0..n-1 (examples are matched
                by index: row i of the evaluated split is the log's index i).
        """
        forget = self.splits.get("forget")
        if forget is None or forget.truth_ratios is None:
            raise ValueError(f"{self.source}: holds no forget-set truth ratios (a {self.benchmark} log)")
        n = len(forget.indices)
        if expected_size is not None and n != expected_size:
            raise ValueError(
                f"{self.source}: the reference holds {n} forget examples, the evaluated forget split "
                f"{expected_size}; evaluate the split the reference model was evaluated on (TOFU's own "
                f"logs of ds_size300 hold the first 300 of forget10: max_rows {{forget: 300}})"
            )
        if forget.indices != tuple(range(n)):
            bad = next(i for i, idx in enumerate(forget.indices) if idx != i)
            raise ValueError(
                f"{self.source}: forget indices must be 0..{n - 1} to match the evaluated rows by index; "
                f"position {bad} holds index {forget.indices[bad]}"
            )
        return forget.truth_ratios.clone()

    def privleak_auc(self) -> float:
        """The model's Min-K% membership AUC in our (MUSE's) convention: the PrivLeak reference.

        Raises:
            ValueError: the log has no membership AUC (open-unlearning's ``mia_min_k``).
        """
        if "privleak_auc" not in self.summary:
            raise ValueError(f"{self.source}: no 'mia_min_k' entry (the membership AUC PrivLeak is relative to)")
        return self.summary["privleak_auc"]


# ============================================================================ reading
def read_reference_log(path: PathLike) -> ReferenceLog:
    """Read a reference model's evaluation log, detecting its layout.

    Args:
        path: open-unlearning's ``TOFU_EVAL.json`` / ``MUSE_EVAL.json`` or the folder holding it;
            TOFU's ``eval_log_forget.json`` (its sibling ``eval_log*.json`` files are read too), the
            folder holding them, or an ``eval_log_aggregated.json``.

    Returns:
        The log (cached per file and modification time: a 13 MB log is parsed once).

    Raises:
        FileNotFoundError: no such file or folder, or a folder without a known log in it.
        ValueError: a file in neither layout, or missing an entry a value needs (the message names
            the file and the key).
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"reference log {str(path)!r}: no such file or folder")
    if path.is_dir():
        path = _log_in_folder(path)
    stat = path.stat()
    return _read_cached(str(path.resolve()), stat.st_mtime_ns, stat.st_size)


def _log_in_folder(folder: Path) -> Path:
    found = [folder / name for name in (*_EVAL_FILES.values(), TOFU_FILES["forget"], _TOFU_AGGREGATED)]
    found = [p for p in found if p.is_file()]
    if len({p.name for p in found} & set(_EVAL_FILES.values())) > 1:
        raise ValueError(f"reference log folder {str(folder)!r} holds both TOFU_EVAL.json and MUSE_EVAL.json: name one")
    if not found:
        expected = ", ".join((*_EVAL_FILES.values(), TOFU_FILES["forget"], _TOFU_AGGREGATED))
        raise FileNotFoundError(f"reference log folder {str(folder)!r} holds none of {expected}")
    return found[0]


@functools.lru_cache(maxsize=8)
def _read_cached(path: str, mtime_ns: int, size: int) -> ReferenceLog:
    data = _load_json(Path(path))
    name = Path(path).name
    if name.endswith("_SUMMARY.json"):
        raise ValueError(
            f"{path}: a summary holds aggregates only; the per-example values are in "
            f"{name.replace('_SUMMARY', '_EVAL')} beside it"
        )
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object (an evaluation log), got {type(data).__name__}")
    if _TOFU_AGGREGATED == name or TOFU_FILES["forget"] in data:
        return _read_tofu({split: data[file] for split, file in TOFU_FILES.items() if file in data}, path)
    if {"avg_paraphrased_loss", "average_perturb_loss"} & data.keys():
        return _read_tofu_files(Path(path), data)
    if name in _EVAL_FILES.values() or any(k in data for k in (*_TOFU_MARKERS, *_MUSE_MARKERS, "mia_min_k")):
        return _read_open_unlearning(data, path)
    raise ValueError(
        f"{path}: neither open-unlearning's TOFU_EVAL.json / MUSE_EVAL.json (entries such as "
        f"'forget_truth_ratio') nor TOFU's eval_log_forget.json ('avg_paraphrased_loss', "
        f"'average_perturb_loss'); found keys {sorted(data)[:8]}"
    )


def _load_json(path: Path) -> Any:
    try:
        with path.open() as f:
            return json.load(f)
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from err


# ---------------------------------------------------------------------------- open-unlearning
def _read_open_unlearning(data: Mapping[str, Any], path: str) -> ReferenceLog:
    name = Path(path).name
    if name == _EVAL_FILES["muse"] or (name != _EVAL_FILES["tofu"] and any(k in data for k in _MUSE_MARKERS)):
        benchmark = "muse"
    elif name == _EVAL_FILES["tofu"] or any(k in data for k in _TOFU_MARKERS):
        benchmark = "tofu"
    else:
        raise ValueError(f"{path}: an open-unlearning log, but neither TOFU's nor MUSE's: name it TOFU_EVAL.json or "
                         "MUSE_EVAL.json")  # fmt: skip
    raw = {
        metric: float(entry["agg_value"])
        for metric, entry in data.items()
        if isinstance(entry, dict) and isinstance(entry.get("agg_value"), (int, float))
    }
    names = tofu_names() if benchmark == "tofu" else MUSE_NAMES
    summary = {ours: raw[theirs] for ours, theirs in names.items() if theirs in raw}
    if "mia_min_k" in raw:
        summary["privleak_auc"] = 1.0 - raw["mia_min_k"]
    if benchmark == "tofu" and "privleak" in raw:
        summary["privleak"] = raw["privleak"]
    splits = {}
    if benchmark == "tofu":
        splits = {s: split for s in OPEN_UNLEARNING_SPLITS if (split := _open_unlearning_split(data, s, path))}
    attacks: dict[str, dict[str, Tensor]] = {}
    for metric, entry in data.items():
        if metric.startswith("mia_") and isinstance(entry, dict):
            attacks[metric] = {}
            for part in ("forget", "holdout"):
                scores = _by_index(_entry(entry, part, f"{path} {metric!r}"), f"{metric} {part}", path)
                attacks[metric][part] = _column(scores, "score", f"{metric} {part}", path)
    # our Min-K% sign: its score is minus the log-prob
    min_k = {part: -scores for part, scores in attacks.get("mia_min_k", {}).items()}
    memorization = {
        metric: _column(_by_index(data[metric], metric, path), "score", metric, path)
        for metric in ("exact_memorization", "extraction_strength") if isinstance(data.get(metric), dict)
    }  # fmt: skip
    return ReferenceLog(path, OPEN_UNLEARNING, benchmark, splits, min_k, summary, raw, attacks, memorization)


def _open_unlearning_split(data: Mapping[str, Any], split: str, path: str) -> SplitLog | None:
    """One split's per-example values; None when the log has none of the split's metrics."""
    stats = ("answer", "paraphrased", "perturbed", "rouge_l_recall", "truth_ratio")
    names = {stat: tofu_metric_name(split, stat) for stat in stats}
    by_index = {
        stat: _by_index(data[name], name, path) for stat, name in names.items() if isinstance(data.get(name), dict)
    }
    if not by_index:
        return None
    indices = _same_indices(by_index, names, path)
    values: dict[str, Tensor] = {}
    if "answer" in by_index:
        values["answer_logprob"] = -_column(by_index["answer"], "avg_loss", names["answer"], path)
    if "perturbed" in by_index:
        values["perturbed_logprobs"] = -_column(by_index["perturbed"], "avg_loss", names["perturbed"], path, 2)
    if "paraphrased" in by_index:
        values["paraphrased_logprob"] = -_column(by_index["paraphrased"], "avg_loss", names["paraphrased"], path)
    elif split in ("real_authors", "world_facts") and "answer_logprob" in values:
        values["paraphrased_logprob"] = values["answer_logprob"]  # no paraphrase: the answer is the base
    if "rouge_l_recall" in by_index:
        values["rouge_l_recall"] = _column(by_index["rouge_l_recall"], "rougeL_recall", names["rouge_l_recall"], path)
    if "truth_ratio" in by_index:
        values["truth_ratios"] = _column(by_index["truth_ratio"], "score", names["truth_ratio"], path)
    return SplitLog(indices, **values)


def _entry(data: Mapping[str, Any], key: str, where: str) -> Any:
    if key not in data:
        raise ValueError(f"{where}: no {key!r} entry (found {sorted(data)[:12]})")
    return data[key]


def _by_index(entry: Mapping[str, Any], name: str, path: str) -> dict[int, Any]:
    """``value_by_index`` with integer keys, ascending."""
    values = _entry(entry, "value_by_index", f"{path} {name!r}")
    if not isinstance(values, dict) or not values:
        raise ValueError(f"{path}: {name!r} value_by_index must be a non-empty object {{index: {{...}}}}")
    try:
        return {int(k): values[k] for k in sorted(values, key=int)}
    except ValueError as err:
        raise ValueError(f"{path}: {name!r} value_by_index keys must be dataset indices ({err})") from err


def _same_indices(by_index: Mapping[str, dict[int, Any]], names: Mapping[str, str], path: str) -> tuple[int, ...]:
    first = next(iter(by_index))
    indices = tuple(by_index[first])
    for stat, values in by_index.items():
        if tuple(values) != indices:
            raise ValueError(
                f"{path}: {names[stat]!r} holds {len(values)} indices, {names[first]!r} {len(indices)}; "
                "a split's metrics must cover the same examples"
            )
    return indices


def _column(values: Mapping[int, Any], key: str, name: str, path: str, ndim: int = 1) -> Tensor:
    """One number (or one list, ``ndim`` 2) per example, float64."""
    column = []
    for index, value in values.items():
        number = value.get(key) if isinstance(value, dict) else None
        if number is None:
            raise ValueError(f"{path}: {name!r} index {index} has no {key!r}")
        column.append(number)
    out = torch.tensor(column, dtype=torch.float64)
    if out.dim() != ndim:
        raise ValueError(f"{path}: {name!r} {key!r} must be {'a list' if ndim == 2 else 'a number'} per example")
    return out


# ---------------------------------------------------------------------------- TOFU's own
def _read_tofu_files(forget_path: Path, forget: Mapping[str, Any]) -> ReferenceLog:
    """TOFU's eval_log_forget.json, and the other split files of its folder that exist."""
    if forget_path.name in TOFU_FILES.values() and forget_path.name != TOFU_FILES["forget"]:
        raise ValueError(
            f"{forget_path}: TOFU's log of another set; name {TOFU_FILES['forget']} (the forget set's) or its folder"
        )
    logs: dict[str, Any] = {"forget": forget}
    for split, name in TOFU_FILES.items():
        if split != "forget" and (forget_path.parent / name).is_file():
            logs[split] = _load_json(forget_path.parent / name)
    return _read_tofu(logs, str(forget_path.parent if forget_path.name == TOFU_FILES["forget"] else forget_path))


def _read_tofu(logs: Mapping[str, Any], source: str) -> ReferenceLog:
    if "forget" not in logs:
        raise ValueError(f"{source}: no {TOFU_FILES['forget']} entry (TOFU's forget-set log)")
    splits = {split: _tofu_split(log, f"{source} {TOFU_FILES[split]}") for split, log in logs.items()}
    reference = ReferenceLog(source, TOFU, "tofu", splits)
    reference.summary.update(tofu_statistics(reference))
    return reference


def _tofu_split(log: Any, where: str) -> SplitLog:
    """One of TOFU's split logs: the truth ratio's two losses are required, the answer's loss and
    ROUGE read where present (a forget-quality reference needs only the first two)."""
    if not isinstance(log, dict):
        raise ValueError(f"{where}: expected a JSON object of statistics, got {type(log).__name__}")
    columns = {}
    for key in ("avg_paraphrased_loss", "average_perturb_loss", "avg_gt_loss", "rougeL_recall"):
        if key not in log and key in ("avg_gt_loss", "rougeL_recall"):
            continue
        values = _entry(log, key, where)
        if not isinstance(values, dict) or not values:
            raise ValueError(f"{where}: {key!r} must be a non-empty object {{index: value}}")
        columns[key] = {int(k): values[k] for k in sorted(values, key=int)}
    indices = tuple(columns["avg_paraphrased_loss"])
    for key, values in columns.items():
        if tuple(values) != indices:
            raise ValueError(f"{where}: {key!r} holds {len(values)} indices, 'avg_paraphrased_loss' {len(indices)}")

    def column(key: str) -> Tensor | None:
        return torch.tensor(list(columns[key].values()), dtype=torch.float64) if key in columns else None

    para, pert = -column("avg_paraphrased_loss"), -column("average_perturb_loss")
    if pert.dim() != 2:
        raise ValueError(f"{where}: 'average_perturb_loss' must hold a list of losses per example")
    answer = column("avg_gt_loss")
    return SplitLog(
        indices, answer_logprob=None if answer is None else -answer, paraphrased_logprob=para,
        perturbed_logprobs=pert, rouge_l_recall=column("rougeL_recall"), truth_ratios=truth_ratio(para, pert),
    )  # fmt: skip


# ============================================================================ statistics from a log
def tofu_statistics(log: ReferenceLog) -> dict[str, float]:
    """TOFU's statistics computed by our metric code from a log's per-example values.

    Under our result keys: "{split}/prob", "{split}/rouge_l_recall", "{split}/truth_ratio" for every
    split the log holds (forget: "closer_to_1", the others "true_better"; the answer probability
    normalized against the perturbed answers on real_authors / world_facts), "model_utility" when all
    nine of its statistics are there. With the layout's own epsilon (``ReferenceLog.eps``), so an
    open-unlearning log gives its ``agg_value``\\ s and TOFU's what ``aggregate_eval_stat.py`` prints.
    """
    stats: dict[str, float] = {}
    for split, values in log.splits.items():
        answer, pert = values.answer_logprob, values.perturbed_logprobs
        if answer is not None and split in ("forget", "retain"):
            stats[f"{split}/prob"] = normalized_probability(answer).mean().item()
        elif answer is not None and pert is not None:
            stats[f"{split}/prob"] = _relative_probability(answer, pert, log.eps).mean().item()
        if values.rouge_l_recall is not None:
            stats[f"{split}/rouge_l_recall"] = values.rouge_l_recall.mean().item()
        ratios = values.truth_ratios  # as the log holds them; else from its losses
        if ratios is None and values.paraphrased_logprob is not None and pert is not None:
            ratios = truth_ratio(values.paraphrased_logprob, pert, eps=log.eps)
        if ratios is not None:
            aggregation = "closer_to_1" if split == "forget" else "true_better"
            stats[f"{split}/truth_ratio"] = truth_ratio_score(ratios, aggregation, log.eps).item()
    if all(key in stats for key in TOFU_UTILITY_KEYS):
        stats["model_utility"] = model_utility(stats).item()
    return stats


def _relative_probability(answer_logprob: Tensor, perturbed_logprobs: Tensor, eps: float) -> Tensor:
    if not eps:
        return relative_answer_probability(answer_logprob, perturbed_logprobs)
    # open-unlearning's p(a) / (p(a) + sum_k p(k) + eps); the softmax form has no place for eps
    answer, perturbed = answer_logprob.double().exp(), perturbed_logprobs.double().exp().sum(dim=1)
    return answer / (answer + perturbed + eps)


def membership_auc(log: ReferenceLog) -> float:
    """The Min-K% membership AUC (our convention) computed by our code from the log's per-example scores.

    Raises:
        ValueError: the log has no per-example ``mia_min_k`` scores.
    """
    if set(log.min_k_scores) != {"forget", "holdout"}:
        raise ValueError(f"{log.source}: no per-example 'mia_min_k' forget and holdout scores")
    auc = min_k_auc(log.min_k_scores["forget"], log.min_k_scores["holdout"]).item()
    if math.isnan(auc):
        raise ValueError(f"{log.source}: 'mia_min_k' scores gave no AUC")
    return auc


def attack_aucs(log: ReferenceLog) -> dict[str, float]:
    """Every ``mia_*`` AUC (open-unlearning's convention, evals.mia) computed by our code from the
    log's per-example forget and holdout scores, under the log's metric names."""
    return {
        metric: attack_auc(parts["forget"], parts["holdout"]).item() for metric, parts in log.attack_scores.items()
    }


def memorization_means(log: ReferenceLog) -> dict[str, float]:
    """``exact_memorization`` / ``extraction_strength`` as the mean of the log's per-example scores."""
    return {metric: values.mean().item() for metric, values in log.memorization.items()}


def privleak(log: ReferenceLog, retain: ReferenceLog | None = None, ref_value: float = 0.5) -> float:
    """open-unlearning's ``privleak`` of a log: from its ``mia_min_k`` AUC (recomputed from the per-example
    scores) against the retain model's log's ``mia_min_k`` AUC, or ``ref_value`` without one (its configs: 0.5).

    Raises:
        ValueError: a log without per-example ``mia_min_k`` scores.
    """
    aucs = attack_aucs(log)
    if "mia_min_k" not in aucs:
        raise ValueError(f"{log.source}: no per-example 'mia_min_k' forget and holdout scores")
    reference = ref_value
    if retain is not None:
        retain_aucs = attack_aucs(retain)
        if "mia_min_k" not in retain_aucs:
            raise ValueError(f"{retain.source}: no per-example 'mia_min_k' scores to take PrivLeak's reference from")
        reference = retain_aucs["mia_min_k"]
    return privleak_from_auc(aucs["mia_min_k"], reference).item()
