"""Training callbacks: per-step training curves (evaluation callbacks live in :mod:`blur_lightning.evals`)."""

from __future__ import annotations

import os

import lightning.pytorch as pl
import torch

from blur_lightning.training.outputs import StepOutput
from blur_lightning.training.runs import log_dir


class TrainingCurves(pl.Callback):
    """Per-optimizer-step losses, coefficient and the norms of d's two parts: a CSV and a PNG at fit end.

    Values are kept as device tensors during training and read to the host once at the end (and
    at each checkpoint), so the curves add no host sync to the step.
    """

    KEYS = ("forget_loss", "retain_loss", "coef", "cosine", "retain_part_norm", "forget_part_norm", "sq_forget")

    def __init__(self, filename: str = "training_curves") -> None:
        self.filename = filename
        self.history: list[dict[str, float | torch.Tensor]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs: StepOutput | None, batch, batch_idx) -> None:
        if not outputs or "stats" not in outputs:  # a micro-batch inside an optimizer step
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
        out_dir = log_dir(trainer)  # a broadcast under DDP: every rank calls it, before the rank check
        if not trainer.is_global_zero or not self.history:
            return
        rows = self._host_history()
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
