"""Unlearning quality on SmolLM2-135M-Instruct: BLUR against weighted-sum baselines, each at its best setting.

Methods (all through BLURUnlearner and a Lightning Trainer, so the measured thing is the product):

* ``blur``      mode forget_lower, NPO forget + NLL retain; sweep gamma (the forget target): 0.5, 1
* ``graddiff``  mode penalty, GA forget + NLL retain (d = g_f + w g_r); sweep the retain weight w: 1, 3
* ``npo_sum``   mode penalty, NPO forget + NLL retain; sweep w: 1, 3
* ``ga``        mode penalty with w = 0 (plain gradient ascent); nothing to weigh, so sweep the lr: lr/3, lr

Every run: the same initial weights (one model load, a CPU copy of the state_dict restored before each
run), the same data order, ``--steps`` optimizer steps of ``--batch-size`` forget + retain pairs, AdamW.

Data (``blur_lightning/assets``): train on ``qa_forget`` (world capitals) and ``qa_retain`` (other facts);
``qa_holdout`` (facts never trained on) is dealt per topic into a validation half, used only to choose
each method's setting, and a test half, reported. Forget accuracy is measured on the forget questions
themselves, as in TOFU. Accuracy: greedy answer (``--max-new-tokens``) contains the gold answer;
answer prob: exp(mean log p) of the gold answer (``blur_lightning.evals.qa.evaluate_qa``).

Selection rule, per method: among the settings whose forget accuracy is at most ``--forget-target``
(20%) of its value before unlearning, the one with the highest validation-half accuracy (ties: lower
forget accuracy); when no setting gets there, the one with the lowest forget accuracy (ties: higher
validation accuracy). The test half is evaluated only for a run that is its method's best so far
(the final choice always is), which saves a third of the evaluation time.

Appends every run to ``benchmarks/results/unlearning_quality.csv`` (with date, commit, machine and
``--tag``; ``unlearning_quality.partial.csv`` holds a sweep still running), writes
``benchmarks/results/unlearning_quality[_TAG].png`` (forget vs retain accuracy, all runs, the chosen
ones ringed), prints this sweep's table and rebuilds the current-results page of
``benchmarks/RESULTS.md`` (``results_page.py``). About 20 minutes on 2 idle CPU cores::

    python benchmarks/unlearning_quality.py                               # the full sweep
    python benchmarks/unlearning_quality.py --steps 2 --max-questions 8 --out /tmp/uq --no-results   # smoke
"""

from __future__ import annotations

import argparse
import csv
import gc
import logging
import os
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
import results_page  # noqa: E402

MODEL = "embedded:smollm2-135m-instruct"
FORGET, RETAIN, HOLDOUT = "embedded:qa_forget.jsonl", "embedded:qa_retain.jsonl", "embedded:qa_holdout.jsonl"


@dataclass(frozen=True)
class Setting:
    method: str
    forget_loss: str
    mode: str
    gamma: float
    lr: float

    @property
    def label(self) -> str:
        knob = f"lr={self.lr:g}" if self.method == "ga" else f"gamma={self.gamma:g}"
        return f"{self.method} {knob}"


METHOD_TITLES = {
    "blur": "BLUR (forget_lower, NPO + NLL)",
    "graddiff": "GradDiff (penalty, GA + w NLL)",
    "npo_sum": "NPO + NLL weighted sum (penalty)",
    "ga": "GA (penalty, w = 0)",
}


def sweep(
    lr: float, methods: list[str], gammas: tuple[float, ...] = (0.5, 1.0), weights: tuple[float, ...] = (1.0, 3.0)
) -> list[Setting]:
    """2 settings per method by default: 8 runs of 20 steps, ~20 minutes on 2 idle cores (~35 with other jobs).

    gamma is BLUR's forget target (its forget coefficient); with mode penalty d = g_f + w g_r, so w is the
    retain weight. Plain GA has no weight to tune: its lr is swept instead.
    """
    grid = {
        "blur": [Setting("blur", "npo", "forget_lower", g, lr) for g in gammas],
        "graddiff": [Setting("graddiff", "ga", "penalty", w, lr) for w in weights],
        "npo_sum": [Setting("npo_sum", "npo", "penalty", w, lr) for w in weights],
        "ga": [Setting("ga", "ga", "penalty", 0.0, x) for x in (lr / 3, lr)],
    }
    return [s for m in methods for s in grid[m]]


@dataclass
class Run:
    setting: Setting
    forget: dict = field(default_factory=dict)
    val: dict = field(default_factory=dict)
    test: dict = field(default_factory=dict)
    train_s: float = 0.0
    eval_s: float = 0.0
    steps: int = 0
    chosen: bool = False


# ============================================================================ data
def split_holdout(rows: list[dict]) -> tuple[list[dict], list[dict]]:
    """Deal each topic's rows alternately into (validation, test): both halves keep the topic mix."""
    by_topic: dict[str, list[dict]] = {}
    for row in rows:
        by_topic.setdefault(str(row.get("topic", "")), []).append(row)
    val, test = [], []
    for topic in sorted(by_topic):
        for i, row in enumerate(by_topic[topic]):
            (val if i % 2 == 0 else test).append(row)
    return val, test


def evaluate(model, tokenizer, rows, args) -> dict:
    from blur_lightning.evals.qa import evaluate_qa

    out = evaluate_qa(model, tokenizer, rows, max_new_tokens=args.max_new_tokens, batch_size=args.eval_batch_size)
    return {"acc": out["accuracy"], "prob": out["answer_prob"]}


# ============================================================================ one run
def unlearn(model, tokenizer, setting: Setting, args) -> int:
    """args.steps optimizer steps of BLURUnlearner under a Lightning Trainer; returns the steps taken."""
    import lightning.pytorch as pl

    from blur_lightning.data.datamodule import ForgetRetainDataModule
    from blur_lightning.training.unlearner import BLURUnlearner

    pl.seed_everything(args.seed, verbose=False)
    module = BLURUnlearner(
        model,
        forget_loss=setting.forget_loss,
        retain_loss="nll",
        mode=setting.mode,
        gamma=setting.gamma,
        export_dir=None,
        optimizer=lambda params: torch.optim.AdamW(params, lr=setting.lr, weight_decay=0.0),
    )
    module.tokenizer = tokenizer
    data = ForgetRetainDataModule(
        forget_path=args.forget,
        retain_path=args.retain,
        tokenizer=args.model,
        answer_column=args.answer_column,
        max_length=args.max_length,
        batch_size=args.batch_size,
        seed=args.seed,
    )
    data.set_tokenizer(tokenizer)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=args.steps,
        max_epochs=-1,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, datamodule=data)
    steps = trainer.global_step
    del trainer, module, data
    gc.collect()  # the NPO reference copy (0.5 GB) goes before the next run builds its own
    return steps


def select(runs: list[Run], start_forget_acc: float, target: float) -> dict[str, Run]:
    """Each method's chosen run under the rule in the module docstring."""
    chosen = {}
    for method in dict.fromkeys(r.setting.method for r in runs):
        mine = [r for r in runs if r.setting.method == method]
        ok = [r for r in mine if r.forget["acc"] <= target * start_forget_acc + 1e-9]
        if ok:
            chosen[method] = max(ok, key=lambda r: (r.val["acc"], -r.forget["acc"]))
        else:
            chosen[method] = min(mine, key=lambda r: (r.forget["acc"], -r.val["acc"]))
    return chosen


# ============================================================================ outputs
def csv_rows(runs: list[Run], before: Run, meta: dict, args) -> list[dict]:
    rows = []
    for r in [before, *runs]:
        s = r.setting
        rows.append(
            {
                **meta,
                "tag": args.tag or args.answer_column,
                "seed": args.seed,
                "answer_column": args.answer_column,
                "method": s.method,
                "forget_loss": s.forget_loss,
                "mode": s.mode,
                "gamma": s.gamma,
                "lr": s.lr,
                "steps": r.steps,
                "forget_acc": r.forget.get("acc"),
                "forget_prob": r.forget.get("prob"),
                "val_acc": r.val.get("acc"),
                "val_prob": r.val.get("prob"),
                "test_acc": r.test.get("acc", ""),
                "test_prob": r.test.get("prob", ""),
                "train_s": round(r.train_s, 1),
                "eval_s": round(r.eval_s, 1),
                "chosen": int(r.chosen),
            }
        )
    return rows


def write_csv(path: Path, rows: list[dict]) -> None:
    """(Re)write a whole file: the partial results of a sweep still running."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def plot(runs: list[Run], before: Run, path: Path, target: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"blur": "tab:red", "graddiff": "tab:blue", "npo_sum": "tab:green", "ga": "tab:gray"}
    fig, ax = plt.subplots(figsize=(7.5, 5.5))
    for method in dict.fromkeys(r.setting.method for r in runs):
        mine = [r for r in runs if r.setting.method == method]
        ax.scatter([100 * r.forget["acc"] for r in mine], [100 * r.val["acc"] for r in mine], s=40,
                   color=colors.get(method), alpha=0.75, label=METHOD_TITLES[method])  # fmt: skip
        for r in mine:
            knob = f"lr {r.setting.lr:g}" if method == "ga" else f"{r.setting.gamma:g}"
            ax.annotate(knob, (100 * r.forget["acc"], 100 * r.val["acc"]), fontsize=7,
                        xytext=(4, 3), textcoords="offset points")  # fmt: skip
        for r in mine:
            if r.chosen:
                ax.scatter([100 * r.forget["acc"]], [100 * r.val["acc"]], s=220, facecolors="none",
                           edgecolors=colors.get(method), linewidths=2)  # fmt: skip
    ax.scatter([100 * before.forget["acc"]], [100 * before.val["acc"]], marker="*", s=220, color="black",
               label="before unlearning")  # fmt: skip
    ax.axvline(100 * target * before.forget["acc"], color="black", linestyle=":", linewidth=1,
               label=f"forget target ({target:.0%} of start)")  # fmt: skip
    ax.set_xlabel("forget accuracy after (%)  (lower is better)")
    ax.set_ylabel("held-out retain accuracy, validation half (%)  (higher is better)")
    ax.set_title("SmolLM2-135M-Instruct: forget vs retain, every sweep run (chosen ringed)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def pct(x) -> str:
    return "" if x is None or x == "" else f"{100 * x:.1f}%"


def markdown(runs, before, chosen, args, meta, wall_s, n) -> str:
    stem = "unlearning_quality" + (f"_{args.tag}" if args.tag else "")
    lines = [
        "## Unlearning quality on SmolLM2-135M-Instruct" + (f" ({args.tag})" if args.tag else ""),
        "",
        f"{meta['date']}, commit {meta['commit']}, machine: 2-core CPU, {meta['device']}; "
        f"wall time {wall_s / 60:.1f} min for {len(runs)} runs (model load, the before-evaluation, training "
        f"and evaluation){args.contention_note}. Script: `benchmarks/unlearning_quality.py "
        f"{' '.join(sys.argv[1:])}`; every run in `benchmarks/results/unlearning_quality.csv` (tag "
        f"`{args.tag or args.answer_column}`), plot `benchmarks/results/{stem}.png`.",
        "",
        f"Set-up: {args.steps} optimizer steps, batch {args.batch_size} forget + {args.batch_size} retain "
        f"pairs, AdamW (no weight decay), lr {args.lr:g} unless swept, trained on the `{args.answer_column}` "
        f"column (max length {args.max_length} tokens), seed {args.seed}; "
        f"forget = the {n['forget']} capitals of `qa_forget.jsonl` (the questions trained on, as in TOFU); "
        f"retain = `qa_holdout.jsonl` (never trained on), dealt per topic into a validation half "
        f"({n['val']} questions, used only for choosing) and a test half ({n['test']}, reported below); "
        f"greedy decoding of {args.max_new_tokens} tokens.",
        "",
        f"Selection rule, per method: among the settings whose forget accuracy is at most "
        f"{args.forget_target:.0%} of its start, the one with the highest validation-half retain accuracy; "
        "when none gets there, the lowest forget accuracy.",
        "",
        "| method | chosen setting | forget acc | forget answer prob | retain acc (test half) "
        "| retain answer prob (test half) | retain acc (val half) | train s |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
        f"| before unlearning | | {pct(before.forget['acc'])} | {before.forget['prob']:.3f} | "
        f"{pct(before.test['acc'])} | {before.test['prob']:.3f} | {pct(before.val['acc'])} | |",
    ]
    for method, r in chosen.items():
        knob = f"lr {r.setting.lr:g}" if method == "ga" else f"gamma {r.setting.gamma:g}"
        if method in ("graddiff", "npo_sum"):
            knob = f"retain weight {r.setting.gamma:g}"
        lines.append(
            f"| {METHOD_TITLES[method]} | {knob} | {pct(r.forget['acc'])} | {r.forget['prob']:.3f} | "
            f"{pct(r.test.get('acc'))} | {r.test.get('prob', float('nan')):.3f} | {pct(r.val['acc'])} | "
            f"{r.train_s:.0f} |"
        )
    lines += ["", "All runs (forget acc / retain val acc):", ""]
    lines.append("| run | forget acc | forget prob | retain val acc | retain val prob | train s |")
    lines.append("|---|---:|---:|---:|---:|---:|")
    for r in runs:
        mark = " (chosen)" if r.chosen else ""
        lines.append(
            f"| {r.setting.label}{mark} | {pct(r.forget['acc'])} | {r.forget['prob']:.3f} | "
            f"{pct(r.val['acc'])} | {r.val['prob']:.3f} | {r.train_s:.0f} |"
        )
    return "\n".join(lines) + "\n"


# ============================================================================ main
def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=MODEL, help="model name or path (a tiny one for a smoke test)")
    p.add_argument("--forget", default=FORGET, help="forget QA set (trained on, and the forget eval)")
    p.add_argument("--retain", default=RETAIN, help="retain QA set (trained on)")
    p.add_argument("--holdout", default=HOLDOUT, help="held-out QA set, split into val / test halves")
    p.add_argument("--steps", type=int, default=20, help="optimizer steps per run")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=3e-5)
    p.add_argument("--methods", nargs="+", default=list(METHOD_TITLES), choices=list(METHOD_TITLES))
    p.add_argument("--answer-column", default="answer", help="training target: answer (short) or response")
    p.add_argument("--max-length", type=int, default=64,
                   help="training sequence length (96 fits the response sentences, as configs/demo.yaml)")
    p.add_argument("--seed", type=int, default=0, help="data order and initialization seed of every run")
    p.add_argument("--gammas", type=float, nargs="+", default=[0.5, 1.0], help="BLUR's gamma sweep")
    p.add_argument("--weights", type=float, nargs="+", default=[1.0, 3.0],
                   help="the retain-weight sweep of graddiff and npo_sum")
    p.add_argument("--tag", default="", help="the runs' tag in the CSV and the PNG's suffix (default: answer column)")
    p.add_argument("--max-new-tokens", type=int, default=16, help="16: the length the QA set was curated at")
    p.add_argument("--eval-batch-size", type=int, default=32)
    p.add_argument("--max-questions", type=int, default=None, help="per eval set (a quick check)")
    p.add_argument("--forget-target", type=float, default=0.2, help="forget accuracy <= this x its start")
    p.add_argument("--threads", type=int, default=0, help="torch threads; 0: 2 on an idle machine, else 1")
    p.add_argument("--out", type=Path, default=results_page.RESULTS_DIR, help="CSV and PNG folder")
    p.add_argument("--no-results", action="store_true", help="do not rebuild benchmarks/RESULTS.md's page")
    p.add_argument("--contention-note", default="", help="appended to the wall-time sentence")
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    t_start = time.perf_counter()
    if args.threads <= 0:
        # Two intra-op threads on two shared, busy cores spin-wait on each other: a SmolLM2 forward +
        # backward took 30 s with two threads and 3 s with one while other jobs ran (1.7x faster idle).
        args.threads = 2 if os.getloadavg()[0] < 1.0 else 1
    torch.set_num_threads(args.threads)
    load_start = os.getloadavg()[0]
    print(f"load average {load_start:.1f}: {args.threads} torch thread(s)", flush=True)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    for name in ("lightning.pytorch", "lightning.pytorch.utilities.rank_zero", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)  # no "GPU available: False" per run
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*tensorboardX.*")

    from blur_lightning.data.rows import load_rows
    from blur_lightning.models.loading import load_causal_lm, load_tokenizer

    model = load_causal_lm(args.model)
    tokenizer = load_tokenizer(args.model)
    initial = {k: v.detach().clone() for k, v in model.state_dict().items()}  # CPU copy, restored per run
    forget_rows = load_rows(args.forget, limit=args.max_questions)
    val_rows, test_rows = split_holdout(load_rows(args.holdout))
    if args.max_questions:
        val_rows, test_rows = val_rows[: args.max_questions], test_rows[: args.max_questions]
    n = {"forget": len(forget_rows), "val": len(val_rows), "test": len(test_rows)}
    meta = {
        "date": common.today(),
        "commit": common.git_commit(),
        "device": common.device_name(torch.device("cpu")),
    }
    print(f"model loaded in {time.perf_counter() - t_start:.0f} s; eval sets {n}", flush=True)

    t0 = time.perf_counter()
    before = Run(Setting("before", "", "", 0.0, 0.0))
    before.forget = evaluate(model, tokenizer, forget_rows, args)
    before.val = evaluate(model, tokenizer, val_rows, args)
    before.test = evaluate(model, tokenizer, test_rows, args)
    before.eval_s = time.perf_counter() - t0
    print(
        f"before: forget {before.forget} val {before.val} test {before.test} ({before.eval_s:.0f} s)",
        flush=True,
    )

    stem = "unlearning_quality" + (f"_{args.tag}" if args.tag else "")
    runs: list[Run] = []
    for setting in sweep(args.lr, args.methods, tuple(args.gammas), tuple(args.weights)):
        model.load_state_dict(initial)
        run = Run(setting)
        t0 = time.perf_counter()
        run.steps = unlearn(model, tokenizer, setting, args)
        run.train_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        run.forget = evaluate(model, tokenizer, forget_rows, args)
        run.val = evaluate(model, tokenizer, val_rows, args)
        runs.append(run)
        if select(runs, before.forget["acc"], args.forget_target)[setting.method] is run:
            run.test = evaluate(model, tokenizer, test_rows, args)  # its method's best so far
        run.eval_s = time.perf_counter() - t0
        print(
            f"{setting.label}: {run.steps} steps in {run.train_s:.0f} s "
            f"({run.train_s / max(run.steps, 1):.1f} s/step); "
            f"forget {run.forget} val {run.val} test {run.test or '-'} (eval {run.eval_s:.0f} s); "
            f"elapsed {(time.perf_counter() - t_start) / 60:.1f} min",
            flush=True,
        )
        write_csv(args.out / "unlearning_quality.partial.csv", csv_rows(runs, before, meta, args))  # survives a crash

    chosen = select(runs, before.forget["acc"], args.forget_target)
    for r in chosen.values():
        r.chosen = True
    wall_s = time.perf_counter() - t_start
    if not args.contention_note:
        args.contention_note = (
            f"; load average {load_start:.1f} at the start and {os.getloadavg()[0]:.1f} at the end "
            f"(other jobs on the 2 cores), {args.threads} torch thread(s)"
        )
    final_rows = csv_rows(runs, before, {**meta, "wall_s": round(wall_s)}, args)
    common.append_csv(args.out / "unlearning_quality.csv", final_rows)
    (args.out / "unlearning_quality.partial.csv").unlink(missing_ok=True)
    plot(runs, before, args.out / f"{stem}.png", args.forget_target)
    text = markdown(runs, before, chosen, args, meta, wall_s, n)
    print("\n" + text, flush=True)
    if not args.no_results:
        results_page.rebuild_if_default(args.out)


if __name__ == "__main__":
    main()
