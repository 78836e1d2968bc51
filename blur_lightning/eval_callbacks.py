"""UnlearningEvalCallback: a benchmark's own evaluation (TOFU, MUSE, WMDP or plain QA) inside a run.

The callback loads the benchmark's eval splits once (local files or the hub), runs the matching
evaluation of :mod:`blur_lightning.formats` (or :func:`blur_lightning.evaluation.evaluate_qa`) at
the stages it is given, logs every scalar through Lightning, and keeps a JSON summary and a bar
plot of all evaluations of the run in the log dir (rewritten after each evaluation):

* ``validation``: ``on_validation_epoch_end`` (fit's validation and ``blur-lightning validate``;
  not the sanity check), logged with ``pl_module.log`` at the current step;
* ``test``: ``on_test_epoch_end`` (``blur-lightning test``), logged with ``pl_module.log``;
* ``fit_start``: before the first step (the "before" numbers; kept across a resume);
* ``fit_end``: ``on_train_end``, while the model is still on its device (Lightning's
  ``on_fit_end`` runs after the strategy moved it to the CPU: hours for a 7B model).

``self.log`` is not allowed in the last two hooks, so their metrics go to ``trainer.loggers``
directly, at the same step numbers.

Split specs: a local JSON / JSONL / Parquet file (``embedded:NAME`` for a packaged asset), or
``hub:CONFIG``, ``hub:CONFIG:SPLIT`` or ``hub:OWNER/NAME:CONFIG:SPLIT``. Without a repository the
benchmark's own is used (TOFU ``locuslab/TOFU``, MUSE ``muse-bench/MUSE-News`` or ``-Books``, WMDP
``cais/wmdp``); without a split, TOFU's ``train`` or WMDP's ``test``.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Mapping, Sequence
from typing import Any

import lightning.pytorch as pl
import torch

from blur_lightning import formats

__all__ = [
    "BENCHMARKS",
    "STAGES",
    "UnlearningEvalCallback",
    "chat_prompt_template",
    "load_split",
    "plot_evaluations",
]

BENCHMARKS = ("tofu", "muse", "wmdp", "qa")
STAGES = ("fit_start", "validation", "test", "fit_end")
HUB_PREFIX = "hub:"
TOFU_SPLIT_NAMES = ("forget", "retain", "real_authors", "world_facts")
MUSE_SPLIT_NAMES = (
    "verbmem", "knowmem_forget", "knowmem_retain", "knowmem_forget_icl", "knowmem_retain_icl",
    "privleak_forget", "privleak_holdout",
)  # fmt: skip
_DEFAULT_SPLIT = {"tofu": "train", "wmdp": "test"}
_MAX_BARS = 6  # evaluations per plot: the first and the last five (a 10-epoch run stays readable)


# ============================================================================ loading the splits
def _hub_repo(benchmark: str, muse_corpus: str) -> str | None:
    if benchmark == "tofu":
        return formats.TOFU_HUB
    if benchmark == "wmdp":
        return formats.WMDP_HUB
    if benchmark == "muse":
        if muse_corpus not in formats.MUSE_HUB:
            raise ValueError(f"muse_corpus={muse_corpus!r}: expected one of {sorted(formats.MUSE_HUB)}")
        return formats.MUSE_HUB[muse_corpus]
    return None


def parse_hub_spec(spec: str, benchmark: str, muse_corpus: str = "news") -> tuple[str, str | None, str]:
    """``"hub:[REPO:]CONFIG[:SPLIT]"`` -> (repo, config, split), with the benchmark's defaults filled in.

    Raises:
        ValueError: a malformed spec, or a part the benchmark has no default for.
    """
    parts = spec[len(HUB_PREFIX) :].split(":")
    if len(parts) == 3:
        repo, config, split = parts
    elif len(parts) in (1, 2):
        repo = _hub_repo(benchmark, muse_corpus)
        config = parts[0]
        split = parts[1] if len(parts) == 2 else _DEFAULT_SPLIT.get(benchmark)
    else:
        raise ValueError(f"{spec!r}: expected hub:CONFIG, hub:CONFIG:SPLIT or hub:OWNER/NAME:CONFIG:SPLIT")
    if not repo:
        raise ValueError(
            f"{spec!r}: benchmark {benchmark!r} has no default hub dataset; use hub:OWNER/NAME:CONFIG:SPLIT"
        )
    if not split:
        raise ValueError(f"{spec!r}: benchmark {benchmark!r} needs a split: hub:CONFIG:SPLIT")
    return repo, (config or None), split


def load_split(spec: str, benchmark: str, muse_corpus: str = "news", limit: int | None = None) -> list[dict]:
    """Rows of one eval split: a local file (``embedded:NAME`` resolved) or a ``hub:`` spec.

    Raises:
        FileNotFoundError: a local file that does not exist.
        ValueError: an empty split or a malformed spec.
    """
    if spec.startswith(HUB_PREFIX):
        from datasets import load_dataset

        repo, config, split = parse_hub_spec(spec, benchmark, muse_corpus)
        rows = load_dataset(repo, config, split=split).to_list()
    else:
        from blur_lightning.assets import resolve

        path = resolve(spec)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"eval split file not found: {path}")
        rows = formats.read_rows(path)
    if not rows:
        raise ValueError(f"{spec}: no rows")
    return rows[:limit] if limit else rows


def chat_prompt_template(tokenizer: Any) -> str | None:
    """A ``{question}`` format string of the tokenizer's chat prompt (user turn + generation prompt).

    The formats' scorers tokenize prompts with the tokenizer's own special tokens, so a bos the
    template writes is dropped when the tokenizer adds one itself (Llama 3: one ``<|begin_of_text|>``,
    not two). None when the tokenizer has no chat template.
    """
    if not getattr(tokenizer, "chat_template", None):
        return None
    marker = "\x00QUESTION\x00"
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": marker}], add_generation_prompt=True, tokenize=False
    )
    bos = tokenizer.bos_token
    added = tokenizer("", add_special_tokens=True)["input_ids"]
    if bos and text.startswith(bos) and added[:1] == [tokenizer.bos_token_id]:
        text = text[len(bos) :]
    return text.replace("{", "{{").replace("}", "}}").replace(marker, "{question}")


# ============================================================================ the callback
class UnlearningEvalCallback(pl.Callback):
    """Run a benchmark's evaluation at the given stages; log it, keep a JSON summary and a bar plot.

    Args:
        benchmark: "tofu", "muse", "wmdp" or "qa".
        splits: split name -> spec (a file or ``hub:...``; see the module docstring). The names:
            tofu: forget, retain, real_authors, world_facts (the *_perturbed sets, all four);
            muse: any of verbmem, knowmem_forget, knowmem_retain, knowmem_forget_icl,
            knowmem_retain_icl, privleak_forget, privleak_holdout (privleak needs both);
            wmdp: any names, each a multiple-choice set (question, choices, answer index);
            qa: any names, each a question/answer set (greedy accuracy + answer probability).
        stages: when to evaluate, any of "fit_start", "validation", "test", "fit_end".
        max_rows: at most this many rows per split (None: all).
        max_new_tokens: generation length (TOFU's ROUGE, MUSE's verbmem and knowmem, QA's
            accuracy); None keeps each evaluation's default (TOFU 32, MUSE 128 / 32, QA 16).
        batch_size: sequences per forward / generate call.
        chat_template: prompt TOFU and QA questions through the tokenizer's chat template, as the
            data module trains them (MUSE and WMDP keep their benchmarks' plain prompts).
        muse_corpus: "news" or "books": MUSE's hub dataset for ``hub:`` specs.
        options: extra keyword arguments of the evaluation, e.g. tofu:
            {retain_model_truth_ratios: PATH}; muse: {auc_retrain: 0.4772, max_length: 2048};
            wmdp: {subjects: {bio: biology, cyber: computer security}}.
        prefix: logged names are "{prefix}/{metric}" (None: the benchmark's name).
        filename: base name of the JSON and PNG in the log dir (None: "{benchmark}_eval").
    """

    def __init__(
        self,
        benchmark: str,
        splits: dict[str, str],
        stages: list[str] | None = None,
        max_rows: int | None = None,
        max_new_tokens: int | None = None,
        batch_size: int = 8,
        chat_template: bool = True,
        muse_corpus: str = "news",
        options: dict[str, Any] | None = None,
        prefix: str | None = None,
        filename: str | None = None,
    ) -> None:
        if benchmark not in BENCHMARKS:
            raise ValueError(f"benchmark={benchmark!r}: expected one of {BENCHMARKS}")
        stages = list(stages) if stages is not None else ["validation", "test"]
        unknown = [s for s in stages if s not in STAGES]
        if unknown:
            raise ValueError(f"stages {unknown}: expected any of {STAGES}")
        if not splits:
            raise ValueError("splits is empty: name at least one eval split")
        _check_split_names(benchmark, splits)
        self.benchmark = benchmark
        self.splits = dict(splits)
        self.stages = stages
        self.max_rows = max_rows
        self.max_new_tokens = max_new_tokens
        self.batch_size = batch_size
        self.chat_template = chat_template
        self.muse_corpus = muse_corpus
        self.options = dict(options or {})
        self.prefix = prefix or benchmark
        self.filename = filename or f"{benchmark}_eval"
        self.evaluations: list[dict[str, Any]] = []
        self._rows: dict[str, list[dict]] | None = None

    # ----- data
    def rows(self) -> dict[str, list[dict]]:
        """The eval splits' rows, loaded on first use."""
        if self._rows is None:
            self._rows = {
                name: load_split(spec, self.benchmark, self.muse_corpus, self.max_rows)
                for name, spec in self.splits.items()
            }
        return self._rows

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self.rows()  # a bad path or spec fails now, not after an epoch of training

    # ----- evaluation
    def evaluate(self, model: torch.nn.Module, tokenizer: Any) -> dict[str, Any]:
        """The benchmark's results for a model: floats, plus lists (TOFU's per-example truth ratios)."""
        rows = self.rows()
        options = dict(self.options)
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                if self.benchmark == "tofu":
                    return self._tofu(model, tokenizer, rows, options)
                if self.benchmark == "muse":
                    return self._muse(model, tokenizer, rows, options)
                if self.benchmark == "wmdp":
                    return self._wmdp(model, tokenizer, rows, options)
                return self._qa(model, tokenizer, rows, options)
        finally:
            model.train(was_training)

    def _tofu(self, model, tokenizer, rows, options) -> dict[str, Any]:
        if self.chat_template and "prompt_template" not in options:
            template = chat_prompt_template(tokenizer)
            if template is not None:
                options["prompt_template"] = template
        if self.max_new_tokens is not None:
            options.setdefault("max_new_tokens", self.max_new_tokens)
        return formats.evaluate_tofu(
            model, tokenizer, rows["forget"], rows["retain"], rows["real_authors"], rows["world_facts"],
            batch_size=self.batch_size, **options,
        )  # fmt: skip

    def _muse(self, model, tokenizer, rows, options) -> dict[str, Any]:
        if self.max_new_tokens is not None:
            options.setdefault("verbmem_max_new_tokens", self.max_new_tokens)
            options.setdefault("knowmem_max_new_tokens", self.max_new_tokens)
        split_rows = {f"{name}_rows": split for name, split in rows.items()}
        return formats.evaluate_muse(model, tokenizer, batch_size=self.batch_size, **split_rows, **options)

    def _wmdp(self, model, tokenizer, rows, options) -> dict[str, Any]:
        subjects = options.pop("subjects", None) or {}
        results: dict[str, Any] = {}
        for name, split in rows.items():
            out = formats.evaluate_wmdp(
                model, tokenizer, split, subject=subjects.get(name), batch_size=self.batch_size, **options
            )
            results[f"{name}/accuracy"] = out["accuracy"]
        return results

    def _qa(self, model, tokenizer, rows, options) -> dict[str, Any]:
        from blur_lightning.evaluation import evaluate_qa

        if self.max_new_tokens is not None:
            options.setdefault("max_new_tokens", self.max_new_tokens)
        results: dict[str, Any] = {}
        for name, split in rows.items():
            out = evaluate_qa(
                model, tokenizer, split, batch_size=self.batch_size, use_chat_template=self.chat_template,
                **options,
            )  # fmt: skip
            results[f"{name}/accuracy"] = out["accuracy"]
            results[f"{name}/answer_prob"] = out["answer_prob"]
        return results

    def _run(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> dict[str, float]:
        model, tokenizer = getattr(pl_module, "model", None), getattr(pl_module, "tokenizer", None)
        if model is None or tokenizer is None:
            raise ValueError("UnlearningEvalCallback needs pl_module.model and pl_module.tokenizer")
        t0 = time.perf_counter()
        results = self.evaluate(model, tokenizer)
        metrics = {k: float(v) for k, v in results.items() if _is_scalar(v)}
        extras = {k: v for k, v in results.items() if not _is_scalar(v)}
        self.evaluations.append(
            {
                "stage": stage,
                "step": int(trainer.global_step),
                "epoch": int(trainer.current_epoch),
                "seconds": round(time.perf_counter() - t0, 3),
                "metrics": metrics,
                "extras": extras,
            }
        )
        if trainer.is_global_zero:
            self.write(_log_dir(trainer))
        return {f"{self.prefix}/{k}": v for k, v in metrics.items()}

    # ----- hooks
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if "fit_start" not in self.stages or any(e["stage"] == "fit_start" for e in self.evaluations):
            return  # a resumed run: the "before" numbers came back with the checkpoint
        _log_to_loggers(trainer, self._run(trainer, pl_module, "fit_start"))

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if "validation" not in self.stages or trainer.sanity_checking:
            return
        pl_module.log_dict(self._run(trainer, pl_module, "validation"), on_step=False, on_epoch=True, batch_size=1)

    def on_test_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if "test" not in self.stages:
            return
        pl_module.log_dict(self._run(trainer, pl_module, "test"), on_step=False, on_epoch=True, batch_size=1)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if "fit_end" not in self.stages:
            return
        _log_to_loggers(trainer, self._run(trainer, pl_module, "fit_end"))

    # ----- files
    def summary(self) -> dict[str, Any]:
        return {
            "benchmark": self.benchmark,
            "splits": self.splits,
            "sizes": {name: len(rows) for name, rows in (self._rows or {}).items()},
            "evaluations": self.evaluations,
        }

    def write(self, out_dir: str) -> tuple[str, str]:
        """Write ``{filename}.json`` (every evaluation) and ``{filename}.png`` (bar plot) in out_dir."""
        os.makedirs(out_dir, exist_ok=True)
        json_path = os.path.join(out_dir, f"{self.filename}.json")
        png_path = os.path.join(out_dir, f"{self.filename}.png")
        tmp = json_path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(self.summary(), f, indent=2)
        os.replace(tmp, json_path)
        plot_evaluations(self.evaluations, png_path, title=f"{self.benchmark.upper()} evaluation")
        return json_path, png_path

    def state_dict(self) -> dict[str, Any]:
        return {"evaluations": self.evaluations}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.evaluations = list(state_dict.get("evaluations", []))


# ============================================================================ helpers
def _check_split_names(benchmark: str, splits: Mapping[str, str]) -> None:
    names = set(splits)
    if benchmark == "tofu" and names != set(TOFU_SPLIT_NAMES):
        raise ValueError(f"tofu needs exactly the splits {TOFU_SPLIT_NAMES}, got {sorted(names)}")
    if benchmark == "muse":
        unknown = sorted(names - set(MUSE_SPLIT_NAMES))
        if unknown:
            raise ValueError(f"muse splits {unknown}: expected any of {MUSE_SPLIT_NAMES}")
        if len(names & {"privleak_forget", "privleak_holdout"}) == 1:
            raise ValueError("muse privleak needs both privleak_forget and privleak_holdout")


def _is_scalar(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _log_dir(trainer: pl.Trainer) -> str:
    return trainer.log_dir or trainer.default_root_dir


def _log_to_loggers(trainer: pl.Trainer, metrics: dict[str, float]) -> None:
    """Outside the hooks where `self.log` is allowed: straight to the loggers, at the current step."""
    if not trainer.is_global_zero:
        return
    for logger in trainer.loggers:
        logger.log_metrics(metrics, step=trainer.global_step)
        logger.save()


def plot_evaluations(evaluations: Sequence[Mapping[str, Any]], path: str, title: str = "evaluation") -> None:
    """Horizontal grouped bars, one group per metric, one bar per evaluation (first and last five).

    Fractions (every value in [-1, 1]) and other scales (MUSE's PrivLeak in percent) get separate
    panels, so a percentage does not flatten the rest.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not evaluations:
        return
    shown = list(evaluations) if len(evaluations) <= _MAX_BARS else [evaluations[0], *evaluations[-(_MAX_BARS - 1) :]]
    keys: list[str] = []
    for e in shown:
        keys += [k for k in e["metrics"] if k not in keys]

    def finite(k: str) -> list[float]:
        return [v for e in shown if (v := e["metrics"].get(k)) is not None and math.isfinite(v)]

    fractions = [k for k in keys if all(abs(v) <= 1.0 for v in finite(k))]
    others = [k for k in keys if k not in fractions]
    panels = [(p, unit) for p, unit in ((fractions, "value"), (others, "value (own scale)")) if p]
    if not panels:
        return
    height_in = max(2.5, 0.32 * len(shown) * max(len(p) for p, _ in panels) + 1.2)
    ratios = [max(len(p), 2) for p, _ in panels]  # a one-metric panel stays narrow
    fig, axes = plt.subplots(
        1, len(panels), figsize=(4 + 1.2 * sum(ratios), height_in), squeeze=False, width_ratios=ratios
    )
    bar = 0.8 / len(shown)
    for ax, (panel, unit) in zip(axes[0], panels):
        for j, e in enumerate(shown):
            values = [e["metrics"].get(k, float("nan")) for k in panel]
            ax.barh([i + j * bar for i in range(len(panel))], values, height=bar,
                    label=f"{e['stage']} (step {e['step']})")  # fmt: skip
        ax.set_yticks([i + bar * (len(shown) - 1) / 2 for i in range(len(panel))], panel, fontsize=8)
        ax.invert_yaxis()
        ax.set_xlabel(unit)
        ax.grid(axis="x", alpha=0.3)
    axes[0][0].legend(fontsize=7, loc="best")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
