"""Callbacks of the main job: before/after QA evaluation, the relearning probe and per-step training curves."""

from __future__ import annotations

import json
import os
import time

import lightning.pytorch as pl
import torch

from blur_lightning import adapters
from blur_lightning.assets import resolve


def read_jsonl(path: str, limit: int | None = None) -> list[dict]:
    """Rows of a QA file: JSON Lines, JSON or Parquet ("embedded:NAME" resolves to the package's assets)."""
    from blur_lightning.formats import read_rows

    full = resolve(path)
    if not os.path.isfile(full):
        raise FileNotFoundError(f"QA evaluation file not found: {full}")
    rows = read_rows(full)
    if not rows:
        raise ValueError(f"QA evaluation file {full} has no rows")
    return rows[:limit] if limit else rows


def _log_dir(trainer: pl.Trainer) -> str:
    return trainer.log_dir or trainer.default_root_dir


class QAEvalCallback(pl.Callback):
    """Measure QA accuracy (greedy decoding) and answer probability before and after unlearning.

    Args:
        sets: eval set name -> JSONL path with question/answer rows, e.g.
            {"forget": "embedded:qa_forget.jsonl", "retain_holdout": "embedded:qa_holdout.jsonl"}.
        max_questions: at most this many rows per set (None: all).
        max_new_tokens: greedy decoding length for the accuracy check (16: what the embedded
            QA set was curated with).
        batch_size: evaluation batch size.
        prob_column: the text whose probability is reported ("response": the model's own
            full-sentence answer, which it gives with probability 0.2-0.7, where the bare
            answer right after the prompt gets 1e-4 to 1e-2); rows without it use "answer".
    """

    def __init__(
        self,
        sets: dict[str, str],
        max_questions: int | None = None,
        max_new_tokens: int = 16,
        batch_size: int = 32,
        prob_column: str | None = "response",
    ) -> None:
        self.sets = dict(sets)
        self.max_questions = max_questions
        self.max_new_tokens = max_new_tokens
        self.batch_size = batch_size
        self.prob_column = prob_column
        self.results: dict[str, dict[str, dict[str, float]]] = {}
        self._rows = {name: read_jsonl(path, max_questions) for name, path in self.sets.items()}

    def _evaluate(self, pl_module) -> dict[str, dict[str, float]]:
        from blur_lightning.evaluation import evaluate_qa

        model, tokenizer = pl_module.model, pl_module.tokenizer
        if tokenizer is None:
            raise ValueError("QAEvalCallback needs the module's tokenizer (load the model by name)")
        was_training = model.training
        model.eval()
        try:
            out = {}
            for name, rows in self._rows.items():
                has_column = self.prob_column is not None and all(self.prob_column in r for r in rows)
                prob_column = self.prob_column if has_column else None
                res = evaluate_qa(
                    model, tokenizer, rows, max_new_tokens=self.max_new_tokens, batch_size=self.batch_size,
                    prob_column=prob_column,
                )
                out[name] = {"accuracy": float(res["accuracy"]), "answer_prob": float(res["answer_prob"])}
            return out
        finally:
            model.train(was_training)

    def on_fit_start(self, trainer, pl_module) -> None:
        if "before" in self.results:  # resumed run: the "before" numbers came back with the checkpoint
            return
        t0 = time.perf_counter()
        self.results["before"] = self._evaluate(pl_module)
        self._print(f"QA evaluation before unlearning ({time.perf_counter() - t0:.0f} s)", self.results["before"])

    def on_fit_end(self, trainer, pl_module) -> None:
        t0 = time.perf_counter()
        self.results["after"] = self._evaluate(pl_module)
        table = self.table()
        if trainer.is_global_zero:
            print(f"\nQA evaluation after unlearning ({time.perf_counter() - t0:.0f} s)\n{table}", flush=True)
            out_dir = _log_dir(trainer)
            os.makedirs(out_dir, exist_ok=True)
            with open(os.path.join(out_dir, "qa_eval.json"), "w") as f:
                json.dump({**self.results, "sizes": {k: len(v) for k, v in self._rows.items()}}, f, indent=2)
            with open(os.path.join(out_dir, "qa_eval.md"), "w") as f:
                f.write(table + "\n")

    def table(self) -> str:
        before, after = self.results.get("before", {}), self.results.get("after", {})
        lines = [
            "| set | n | accuracy before | accuracy after | answer prob before | answer prob after |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        nan = {"accuracy": float("nan"), "answer_prob": float("nan")}
        for name, rows in self._rows.items():
            b, a = before.get(name, nan), after.get(name, nan)
            lines.append(
                f"| {name} | {len(rows)} | {b['accuracy']:.1%} | {a['accuracy']:.1%}"
                f" | {b['answer_prob']:.3f} | {a['answer_prob']:.3f} |"
            )
        return "\n".join(lines)

    @staticmethod
    def _print(title: str, results: dict) -> None:
        print(f"\n{title}", flush=True)
        for name, r in results.items():
            print(f"  {name}: accuracy {r['accuracy']:.1%}, answer prob {r['answer_prob']:.3f}", flush=True)

    def state_dict(self) -> dict:
        return {"results": self.results}

    def load_state_dict(self, state_dict: dict) -> None:
        self.results = dict(state_dict.get("results", {}))


class RelearningProbe(pl.Callback):
    """At fit end, test whether the forgotten facts were removed or only suppressed.

    A throwaway copy of the unlearned model is fine-tuned on half of the forget set (even rows)
    and the other half (odd rows, never seen by the probe) is measured before and after, with any
    extra probe sets (paraphrased questions); see :mod:`blur_lightning.relearning`. The trained
    model and its export are not touched. Writes ``relearning.json`` and ``relearning.md`` in the
    log directory. Single-process runs only (a sharded model cannot be copied and trained alone):
    skipped with a warning otherwise.

    Args:
        forget_path: the forget QA file (question, answer, `train_column`).
        probe_sets: more sets to measure, name -> QA file (rows whose answer the probe relearns
            are dropped from them).
        steps: optimizer steps of the probe.
        lr: its AdamW learning rate.
        batch_size: rows per probe step.
        train_column: the column the probe trains on.
        max_length: tokens per probe training row.
        max_new_tokens: greedy tokens per answer in the accuracy check.
        eval_batch_size: rows per evaluation forward / generate call.
        seed: the order of the probe's batches.
    """

    def __init__(
        self,
        forget_path: str,
        probe_sets: dict[str, str] | None = None,
        steps: int = 10,
        lr: float = 1e-5,
        batch_size: int = 8,
        train_column: str = "response",
        max_length: int = 96,
        max_new_tokens: int = 16,
        eval_batch_size: int = 32,
        seed: int = 0,
    ) -> None:
        if steps < 1:
            raise ValueError(f"RelearningProbe: steps must be >= 1, got {steps}")
        self._forget = read_jsonl(forget_path)
        missing = [c for c in ("question", "answer", train_column) if c not in self._forget[0]]
        if missing:
            raise ValueError(f"RelearningProbe: {forget_path} has no column(s) {missing}")
        self._probe_sets = {name: read_jsonl(path) for name, path in (probe_sets or {}).items()}
        for name, rows in self._probe_sets.items():
            missing = [c for c in ("question", "answer") if c not in rows[0]]
            if missing:
                raise ValueError(f"RelearningProbe: probe set {name!r} ({probe_sets[name]}) has no column(s) {missing}")
        self.steps, self.lr, self.batch_size, self.seed = steps, lr, batch_size, seed
        self.train_column, self.max_length = train_column, max_length
        self.max_new_tokens, self.eval_batch_size = max_new_tokens, eval_batch_size
        self.results: dict[str, dict[str, float]] = {}

    def on_fit_end(self, trainer, pl_module) -> None:
        from lightning.pytorch.utilities import rank_zero_warn

        from blur_lightning.relearning import relearning_probe

        if trainer.world_size > 1:
            rank_zero_warn("RelearningProbe runs in single-process jobs only: skipped")
            return
        if pl_module.tokenizer is None:
            raise ValueError("RelearningProbe needs the module's tokenizer (load the model by name)")
        t0 = time.perf_counter()
        model = pl_module.model
        if adapters.has_adapters(model):  # the attacker fine-tunes every weight, not only the adapters
            model = adapters.cpu_copy(model).merge_and_unload().to(pl_module.device)
        self.results = relearning_probe(
            model, pl_module.tokenizer, self._forget, probe_sets=self._probe_sets, steps=self.steps,
            lr=self.lr, batch_size=self.batch_size, train_column=self.train_column,
            prob_column=self.train_column, max_length=self.max_length, max_new_tokens=self.max_new_tokens,
            eval_batch_size=self.eval_batch_size, seed=self.seed,
        )
        table = self.table()
        print(f"\nRelearning probe ({time.perf_counter() - t0:.0f} s)\n{table}", flush=True)
        out_dir = _log_dir(trainer)
        os.makedirs(out_dir, exist_ok=True)
        settings = {"steps": self.steps, "lr": self.lr, "batch_size": self.batch_size, "seed": self.seed}
        with open(os.path.join(out_dir, "relearning.json"), "w") as f:
            json.dump({"settings": settings, "results": self.results}, f, indent=2)
        with open(os.path.join(out_dir, "relearning.md"), "w") as f:
            f.write(table + "\n")

    def table(self) -> str:
        after = f"after {self.steps} relearning steps"
        lines = [
            f"| set | n | accuracy | {after} | answer prob | {after} |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        for name, r in self.results.items():
            lines.append(
                f"| {name} | {r['n']:.0f} | {r['accuracy_before']:.1%} | {r['accuracy_after']:.1%}"
                f" | {r['answer_prob_before']:.3f} | {r['answer_prob_after']:.3f} |"
            )
        return "\n".join(lines)


class TrainingCurves(pl.Callback):
    """Per-optimizer-step losses, coefficient and the norms of d's two parts: a CSV and a PNG at fit end.

    Values are kept as device tensors during training and read to the host once at the end (and
    at each checkpoint), so the curves add no host sync to the step.
    """

    KEYS = ("forget_loss", "retain_loss", "coef", "cosine", "retain_part_norm", "forget_part_norm", "sq_forget")

    def __init__(self, filename: str = "training_curves") -> None:
        self.filename = filename
        self.history: list[dict[str, float | torch.Tensor]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if not outputs or "stats" not in outputs:
            return
        stats = outputs["stats"].as_dict()
        row = {"step": trainer.global_step}
        row.update({k: stats[k].detach() for k in self.KEYS if k in stats})
        row["forget_loss"] = outputs["step_forget_loss"]
        row["retain_loss"] = outputs["step_retain_loss"]
        self.history.append(row)

    def _host_history(self) -> list[dict[str, float]]:
        return [{k: float(v) for k, v in row.items()} for row in self.history]

    def on_fit_end(self, trainer, pl_module) -> None:
        if not trainer.is_global_zero or not self.history:
            return
        rows = self._host_history()
        out_dir = _log_dir(trainer)
        os.makedirs(out_dir, exist_ok=True)
        keys = list(rows[0])
        with open(os.path.join(out_dir, f"{self.filename}.csv"), "w") as f:
            f.write(",".join(keys) + "\n")
            for r in rows:
                f.write(",".join(f"{r[k]:.6g}" for k in keys) + "\n")
        plot_curves(rows, os.path.join(out_dir, f"{self.filename}.png"))

    def state_dict(self) -> dict:
        return {"history": self._host_history()}

    def load_state_dict(self, state_dict: dict) -> None:
        self.history = list(state_dict.get("history", []))


def plot_curves(rows: list[dict[str, float]], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(14, 3.8))
    axes[0].plot(steps, [r["forget_loss"] for r in rows], label="forget loss")
    axes[0].plot(steps, [r["retain_loss"] for r in rows], label="retain loss")
    axes[0].set_title("losses")
    axes[1].plot(steps, [r["coef"] for r in rows], color="tab:red")
    axes[1].set_title("BLUR coefficient (gamma - <g_r,g_f>/||g_f||^2)")
    axes[2].semilogy(steps, [max(r["retain_part_norm"], 1e-12) for r in rows], label="||retain part of d||")
    axes[2].semilogy(steps, [max(r["forget_part_norm"], 1e-12) for r in rows], label="||forget part of d||")
    axes[2].semilogy(steps, [max(r["sq_forget"], 1e-24) ** 0.5 for r in rows], "--", label="||g_f||")
    axes[2].set_title("norms")
    for ax in axes:
        ax.set_xlabel("optimizer step")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
