"""EvaluationCallback: a benchmark's evaluation (QA, TOFU, MUSE, WMDP: see the registry) inside a run.

The callback loads the benchmark's splits once (through :mod:`blur_lightning.data.rows`), runs the
benchmark's evaluation at the stages it is given, logs every scalar through Lightning, and keeps a
JSON summary and a bar plot of all evaluations of the run in the log dir (rewritten after each):

* ``fit_start``: before the first step (the "before" numbers; kept across a resume);
* ``validation``: ``on_validation_epoch_end`` (fit's validation and ``blur-lightning validate``;
  not the sanity check), logged with ``pl_module.log`` at the current step;
* ``test``: ``on_test_epoch_end`` (``blur-lightning test``), logged with ``pl_module.log``;
* ``fit_end``: ``on_train_end``, while the model is still on its device (Lightning's
  ``on_fit_end`` runs after the strategy moved it to the CPU: hours for a 7B model).

``self.log`` is not allowed in ``fit_start`` and ``fit_end``, so their metrics go to
``trainer.loggers`` directly, at the same step numbers. With both, the benchmark's before/after
table (the QA benchmark has one) is printed at fit end and written to ``{filename}.md``.

Split specs: a local JSON / JSONL / CSV / Parquet file (``embedded:NAME`` for a packaged asset), or
``hub:CONFIG``, ``hub:CONFIG:SPLIT`` or ``hub:OWNER/NAME:CONFIG:SPLIT`` (the benchmark's own hub
dataset and split fill what is left out).

Every evaluation goes through :func:`blur_lightning.evals.registry.evaluate_benchmark` with the rows
passed explicitly: the one place where a cache of results or a sharded run can plug in.
"""

from __future__ import annotations

import math
import os
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

import lightning.pytorch as pl
import torch

from blur_lightning.data.prompts import get_prompt_format
from blur_lightning.data.rows import Row
from blur_lightning.evals.base import EvalSettings, Results, is_scalar
from blur_lightning.evals.cache import EvalCache, cache_key, content_fingerprint, model_fingerprint
from blur_lightning.evals.membership import RUN_REFERENCE
from blur_lightning.evals.qa import DEFAULT_MAX_NEW_TOKENS
from blur_lightning.evals.registry import evaluate_benchmark, get_benchmark
from blur_lightning.evals.scoring import autocast_for
from blur_lightning.training.runs import log_dir, write_json
from blur_lightning.training.stage_times import stage as timed_stage

__all__ = ["STAGES", "EvaluationCallback", "plot_evaluations"]

STAGES = ("fit_start", "validation", "test", "fit_end")
_MAX_BARS = 6  # evaluations per plot: the first and the last five (a 10-epoch run stays readable)


class EvaluationCallback(pl.Callback):
    """Run a benchmark's evaluation at the given stages; log it, keep a JSON summary and a bar plot.

    Args:
        benchmark: a registered benchmark: "qa", "tofu", "muse", "wmdp" or "fictitious".
        splits: split name -> spec (a file or ``hub:...``; see the module docstring). The names:
            qa: any names, each a question/answer set (greedy accuracy + answer probability);
            tofu and fictitious: forget, retain, real_authors, world_facts (the *_perturbed sets, all four);
            muse: any of verbmem, knowmem_forget, knowmem_retain, knowmem_forget_icl,
            knowmem_retain_icl, privleak_forget, privleak_holdout (privleak needs both);
            wmdp: any names, each a multiple-choice set (question, choices, answer index).
        stages: when to evaluate, any of "fit_start", "validation", "test", "fit_end".
        max_rows: at most this many rows per split (None: all), or split name -> at most this many
            (splits not named: all).
        max_new_tokens: generation length (QA's accuracy, TOFU's ROUGE, MUSE's verbmem and
            knowmem); None keeps each benchmark's default (QA 16, TOFU 32, MUSE 128 / 32).
        batch_size: sequences per forward / generate call.
        prompt_format: how QA, TOFU and fictitious questions become prompts (a name of
            :data:`blur_lightning.data.prompts.PROMPT_FORMATS`); None: the data module's
            ``prompt_format``, so the evaluated prompt is the trained one ("auto" without one).
            MUSE and WMDP keep their benchmarks' plain prompts.
        chat_template: deprecated; ``False`` is ``prompt_format="qa"``.
        options: the benchmark's own keywords, e.g. qa: {prob_column: response}; tofu:
            {retain_model_truth_ratios: PATH, rouge_stemmer: porter}; muse: {corpus: news,
            auc_retrain: 0.4772}; wmdp: {subjects: {bio: biology}, scorer: ours | lm_eval, lm_eval: {tasks: ...}}.
        prefix: logged names are "{prefix}/{metric}" (None: the benchmark's name).
        filename: base name of the JSON, PNG and MD files in the log dir (None: "{benchmark}_eval").
        cache_fit_start: reuse the fit_start ("before") results of an earlier run with the same
            weights, tokenizer, rows and settings (blur_lightning.evals.cache; one process only);
            False evaluates again.
        cache_dir: the cache's folder (None: ``<blur_lightning cache>/evals``).
    """

    def __init__(
        self,
        benchmark: str,
        splits: dict[str, str],
        stages: list[str] | None = None,
        max_rows: int | dict[str, int] | None = None,
        max_new_tokens: int | None = None,
        batch_size: int = 8,
        prompt_format: str | None = None,
        chat_template: bool | None = None,
        options: dict[str, Any] | None = None,
        prefix: str | None = None,
        filename: str | None = None,
        cache_fit_start: bool = True,
        cache_dir: str | None = None,
    ) -> None:
        self.spec = get_benchmark(benchmark)
        stages = list(stages) if stages is not None else ["validation", "test"]
        unknown = [s for s in stages if s not in STAGES]
        if unknown:
            raise ValueError(f"stages {unknown}: expected any of {STAGES}")
        if not splits:
            raise ValueError("splits is empty: name at least one eval split")
        self.options = dict(options or {})
        self.spec.check_splits(list(splits), self.options)
        self.benchmark = benchmark
        self.splits = dict(splits)
        self.stages = stages
        if isinstance(max_rows, dict) and set(max_rows) - set(splits):
            unknown = sorted(set(max_rows) - set(splits))
            raise ValueError(f"max_rows names {unknown}: not among the splits {sorted(splits)}")
        self.max_rows = max_rows
        if chat_template is not None:
            if prompt_format is not None:
                raise ValueError(
                    f"chat_template={chat_template} and prompt_format={prompt_format!r} both given: set "
                    "prompt_format only (chat_template is deprecated)"
                )
            prompt_format = "auto" if chat_template else "qa"
            chat_template = None
        if prompt_format is not None:
            get_prompt_format(prompt_format)  # an unknown name fails here, naming the known ones
        self._prompt_format = prompt_format  # None: the data module's, at setup
        self.settings = EvalSettings(batch_size=batch_size, max_new_tokens=max_new_tokens,
                                     prompt_format=prompt_format or "auto")  # fmt: skip
        self.prefix = prefix or benchmark
        self.filename = filename or f"{benchmark}_eval"
        self.evaluations: list[dict[str, Any]] = []
        self._rows: dict[str, list[Row]] | None = None
        self.cache = EvalCache(cache_dir) if cache_fit_start else None

    @property
    def state_key(self) -> str:
        # one per benchmark and prefix: a run may hold several (QA and TOFU), each with its own state
        return self._generate_state_key(benchmark=self.benchmark, prefix=self.prefix)

    def _limit(self, name: str) -> int | None:
        return self.max_rows.get(name) if isinstance(self.max_rows, dict) else self.max_rows

    # ----- data
    def rows(self) -> dict[str, list[Row]]:
        """The eval splits' rows, loaded on first use."""
        if self._rows is None:
            self._rows = {
                name: self.spec.load(name, spec, self.options, self._limit(name)) for name, spec in self.splits.items()
            }
        return self._rows

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self._prompt_format is None:  # evaluate with the prompts the data module trains on
            trained = getattr(trainer.datamodule, "prompt_format", None) if trainer.datamodule else None
            self.settings = replace(self.settings, prompt_format=trained or "auto")
        self.rows()  # a bad path or spec fails now, not after an epoch of training

    # ----- evaluation
    def evaluate(
        self, model: torch.nn.Module, tokenizer: Any, *, show_progress: bool = True,
        reference_model: torch.nn.Module | None = None,
    ) -> Results:  # fmt: skip
        """The benchmark's results for a model: floats, plus per-example lists. ``reference_model``: the
        run's frozen reference copy, for ``options.reference_model_path: run`` (the Reference attack)."""
        settings = EvalSettings(**{**self.settings.__dict__, "show_progress": show_progress})
        options = self.options
        if options.get("reference_model_path") == RUN_REFERENCE:
            if reference_model is None:
                raise ValueError(
                    "options.reference_model_path: run needs the module's frozen reference model (a loss that "
                    "keeps one, e.g. NPO without LoRA); name a model folder instead"
                )
            options = {**options, "reference_model_path": None, "reference_model": reference_model}
        return evaluate_benchmark(self.benchmark, model, tokenizer, self.rows(), settings, options)

    def _run(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> dict[str, float]:
        model, tokenizer = getattr(pl_module, "model", None), getattr(pl_module, "tokenizer", None)
        if model is None or tokenizer is None:
            raise ValueError("EvaluationCallback needs pl_module.model and pl_module.tokenizer")
        t0 = time.perf_counter()
        show = trainer.progress_bar_callback is not None
        with timed_stage(trainer, f"{self.benchmark} evaluation ({stage})"):
            key = (self._cache_key(model, tokenizer, str(trainer.precision))
                   if stage == "fit_start" and self._cacheable(trainer) else None)  # fmt: skip
            results = self.cache.get(key) if key is not None else None
            cached = results is not None
            if results is None:
                # the training precision's autocast (bf16-mixed: bf16 matmuls on fp32 weights), as the
                # model computes in training; outside it a mixed run would be evaluated in fp32
                with autocast_for(str(trainer.precision), trainer.strategy.root_device):
                    results = self.evaluate(model, tokenizer, show_progress=show,
                                            reference_model=getattr(pl_module, "reference_model", None))
                if key is not None:
                    self.cache.put(key, results)
        metrics = {k: float(v) for k, v in results.items() if is_scalar(v)}
        extras = {k: v for k, v in results.items() if not is_scalar(v)}
        self.evaluations.append(
            {
                "stage": stage,
                "step": int(trainer.global_step),
                "epoch": int(trainer.current_epoch),
                "seconds": round(time.perf_counter() - t0, 3),
                "cached": cached,
                "metrics": metrics,
                "extras": extras,
            }
        )
        out_dir = log_dir(trainer)  # on every rank: trainer.log_dir is a broadcast under DDP / FSDP
        if trainer.is_global_zero:
            self.write(out_dir)
        return {f"{self.prefix}/{k}": v for k, v in metrics.items()}

    def _print(self, trainer: pl.Trainer, title: str) -> None:
        if not trainer.is_global_zero:
            return
        last = self.evaluations[-1]
        table = self.table() if last["stage"] == "fit_end" else None
        lines = [table] if table is not None else self.spec.describe(last["metrics"])
        if last.get("cached"):
            how = "cached: same weights, rows and settings; cache_fit_start: false evaluates again"
        else:
            how = f"{last['seconds']:.0f} s"
        print(f"\n{self.benchmark.upper()} evaluation {title} ({how})", flush=True)
        print("\n".join(lines), flush=True)

    def qa_memo(self, stage: str = "fit_end") -> tuple[dict[str, Any], dict[tuple[str, str, str], tuple[bool, float]]]:
        """The QA benchmark's per-question results of the last `stage` evaluation, for reuse by a later
        measurement of the same model (the relearning probe's "before"): ``(settings, {(question,
        answer, scored text): (correct, answer prob)})``; empty for other benchmarks or stages."""
        found = self._stage(stage)
        if self.benchmark != "qa" or found is None:
            return {}, {}
        prob_column = self.options.get("prob_column", "response")
        question_column = self.options.get("question_column", "question")
        answer_column = self.options.get("answer_column", "answer")
        memo: dict[tuple[str, str, str], tuple[bool, float]] = {}
        for name, rows in self.rows().items():
            per_example = found["extras"].get(f"{name}/per_example")
            if per_example is None:
                continue
            scored = prob_column if prob_column is not None and all(prob_column in r for r in rows) else answer_column
            for row, correct, prob in zip(rows, per_example["correct"], per_example["answer_prob"]):
                memo[(str(row[question_column]), str(row[answer_column]), str(row[scored]))] = (correct, prob)
        settings = {"max_new_tokens": self.settings.max_new_tokens or DEFAULT_MAX_NEW_TOKENS,
                    "prompt_format": self.settings.prompt_format, "step": found["step"]}  # fmt: skip
        return settings, memo

    def _cacheable(self, trainer: pl.Trainer) -> bool:
        # one process: a sharded model's fingerprint would be a collective, and ranks hold shards
        return self.cache is not None and trainer.world_size == 1

    def _cache_key(self, model: torch.nn.Module, tokenizer: Any, precision: str = "32-true") -> str:
        tokenizer_id = content_fingerprint({
            "name": getattr(tokenizer, "name_or_path", None), "vocab": len(tokenizer),
            "chat_template": getattr(tokenizer, "chat_template", None), "special": tokenizer.all_special_tokens,
        })  # fmt: skip
        # the rendered prompt and answer of a marker question: a cached "before" is only valid for the
        # text the model saw (a template that printed another date would give other numbers)
        fmt = get_prompt_format(self.settings.prompt_format)
        rendered = [fmt.prompt_template(tokenizer), fmt.answer_template(tokenizer)]
        settings = {"settings": self.settings.__dict__, "options": self.options, "tokenizer": tokenizer_id,
                    "splits": self.splits, "rendered": rendered, "precision": precision}  # fmt: skip
        return cache_key(model_fingerprint(model), self.benchmark, self.rows(), settings)

    # ----- hooks
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if "fit_start" not in self.stages or self._stage("fit_start") is not None:
            return  # a resumed run: the "before" numbers came back with the checkpoint
        _log_to_loggers(trainer, self._run(trainer, pl_module, "fit_start"))
        self._print(trainer, "before unlearning")

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
        self._print(trainer, "after unlearning")

    # ----- files
    def _stage(self, stage: str) -> dict[str, Any] | None:
        """The last evaluation of `stage`, or None."""
        found = [e for e in self.evaluations if e["stage"] == stage]
        return found[-1] if found else None

    def table(self) -> str | None:
        """The benchmark's before/after table of the fit_start and the last fit_end evaluation (or None)."""
        before, after = self._stage("fit_start"), self._stage("fit_end")
        return self.spec.report(
            before and before["metrics"],
            after and after["metrics"],
            {n: len(r) for n, r in (self._rows or {}).items()},
            self.options,
        )

    def summary(self) -> dict[str, Any]:
        return {
            "benchmark": self.benchmark,
            "splits": self.splits,
            "sizes": {name: len(rows) for name, rows in (self._rows or {}).items()},
            "evaluations": self.evaluations,
        }

    def write(self, out_dir: str) -> tuple[str, str]:
        """Write ``{filename}.json`` (every evaluation), ``{filename}.png`` (bar plot), once there is
        a before/after table ``{filename}.md``, and the last validation, fit_end and test evaluations in
        the field's layout where the benchmark has one (``{filename}_{stage}/TOFU_EVAL.json``,
        ``TOFU_SUMMARY.json``; MUSE's likewise), in out_dir. The paper configs validate after their
        last epoch, so ``{filename}_validation`` holds the end of the run."""
        os.makedirs(out_dir, exist_ok=True)
        json_path = os.path.join(out_dir, f"{self.filename}.json")
        png_path = os.path.join(out_dir, f"{self.filename}.png")
        write_json(json_path, self.summary())
        plot_evaluations(self.evaluations, png_path, title=f"{self.benchmark.upper()} evaluation")
        for stage in ("validation", "fit_end", "test"):  # first: the results, whatever the table does
            found = self._stage(stage)
            if found is None:
                continue
            field_logs = self.spec.field_logs({**found["metrics"], **found.get("extras", {})}, self.options)
            for name, content in (field_logs or {}).items():
                write_json(os.path.join(out_dir, f"{self.filename}_{stage}", name), content)
        try:  # the table re-reads a reference log: one moved since the start must not cost the run's files
            table = self.table() if self._stage("fit_end") is not None else None
        except (OSError, ValueError) as err:
            warnings.warn(f"{self.benchmark}: no before/after table ({err})", RuntimeWarning, stacklevel=2)
            table = None
        if table is not None:
            with open(os.path.join(out_dir, f"{self.filename}.md"), "w") as f:
                f.write(table + "\n")
        return json_path, png_path

    def state_dict(self) -> dict[str, Any]:
        return {"evaluations": self.evaluations}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.evaluations = list(state_dict.get("evaluations", []))


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
