"""Removed, or only suppressed? The relearning probe after BLUR and after the weighted-sum baselines.

Each method unlearns the 80 capitals of the embedded QA set from SmolLM2-135M-Instruct at the demo's
settings (``--steps`` 40, lr 1e-5, batch 8, trained on the model's own answer sentences), from the same
initial weights and data order. Then, on the unlearned model:

* accuracy on the forget questions, on the same capitals asked four other ways (``paraphrased``,
  never trained on) and on the held-out retain facts;
* the relearning probe (``blur_lightning.evals.relearning``): a copy fine-tuned on 40 of the capitals for
  ``--probe-steps`` steps; accuracy on the other 40 (``held_back``) and on their paraphrases;
* its control: a copy fine-tuned for as many steps on the retain facts instead; what comes back
  there comes back from any fine-tuning, not from the capitals.

Methods (each at the setting chosen in ``unlearning_quality.py``'s five-seed runs):
``blur`` (forget_lower, NPO + NLL, gamma 0.1), ``npo_sum`` (penalty, NPO + 3 NLL), ``graddiff``
(penalty, GA + 3 NLL). About 8 minutes per method on 2 idle CPU cores::

    python benchmarks/relearning.py    # appends to benchmarks/results/relearning.csv, rebuilds RESULTS.md's page
    python benchmarks/relearning.py --model PATH --steps 2 --probe-steps 2 --max-questions 8 --no-results
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
import results_page  # noqa: E402
from unlearning_quality import FORGET, HOLDOUT, MODEL, RETAIN, Setting, evaluate, unlearn  # noqa: E402

PARAPHRASED = "embedded:qa_forget_paraphrased.jsonl"
SETTINGS = {
    "blur": Setting("blur", "npo", "forget_lower", 0.1, 1e-5),
    "npo_sum": Setting("npo_sum", "npo", "penalty", 3.0, 1e-5),
    "graddiff": Setting("graddiff", "ga", "penalty", 3.0, 1e-5),
}
TITLES = {
    "before": "before unlearning",
    "blur": "BLUR (gamma 0.1)",
    "npo_sum": "NPO + 3 NLL weighted sum",
    "graddiff": "GradDiff (GA + 3 NLL)",
}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=MODEL)
    p.add_argument("--methods", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    p.add_argument("--steps", type=int, default=40, help="unlearning optimizer steps")
    p.add_argument("--lr", type=float, default=1e-5, help="unlearning lr (every method)")
    p.add_argument("--probe-steps", type=int, default=10, help="relearning steps of the probe and its control")
    p.add_argument("--probe-lr", type=float, default=1e-5)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-length", type=int, default=96)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-questions", type=int, default=None, help="per eval set (a quick check)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--blur-gamma", type=float, default=0.1, help="BLUR's gamma (0.1: the demo's)")
    p.add_argument("--tag", default="demo_settings", help="the rows' tag in benchmarks/results/relearning.csv")
    p.add_argument("--out", type=Path, default=results_page.RESULTS_DIR, help="CSV folder")
    p.add_argument("--no-results", action="store_true", help="do not rebuild benchmarks/RESULTS.md's page")
    args = p.parse_args(argv)
    # what unlearning_quality.unlearn / evaluate read
    args.forget, args.retain, args.answer_column = FORGET, RETAIN, "response"
    args.max_new_tokens, args.eval_batch_size = 16, 32
    return args


def probe(model, tokenizer, forget_rows, paraphrased, retain_rows, args) -> dict[str, dict]:
    from blur_lightning.evals.relearning import relearning_probe

    kwargs = dict(
        probe_sets={"paraphrased": paraphrased}, steps=args.probe_steps, lr=args.probe_lr,
        batch_size=args.batch_size, max_length=args.max_length, seed=args.seed,
    )
    attack = relearning_probe(model, tokenizer, forget_rows, **kwargs)
    control = relearning_probe(model, tokenizer, forget_rows, train_rows=retain_rows, **kwargs)
    return {"attack": attack, "control": control}


def row_of(name: str, evals: dict, probed: dict | None) -> dict:
    row = {"method": name}
    for key, value in evals.items():
        row[f"{key}_acc"] = round(value["acc"], 4)
    if probed:
        for kind in ("attack", "control"):
            for set_name in ("relearn", "held_back", "paraphrased"):
                result = probed[kind][set_name]
                row[f"{kind}_{set_name}_acc"] = round(result["accuracy_after"], 4)
        row["held_back_n"] = int(probed["attack"]["held_back"]["n"])
        row["paraphrased_held_back_n"] = int(probed["attack"]["paraphrased"]["n"])
    return row


def write_csv(path: Path, rows: list[dict]) -> None:
    """The partial results of a run still going; every row's keys as columns ("before" has no probe columns)."""
    import csv

    fields = list(dict.fromkeys(key for row in rows for key in row))
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)


def markdown(rows: list[dict], args, meta: dict, wall_s: float, n_forget: int) -> str:
    titles = {**TITLES, "blur": f"BLUR (gamma {args.blur_gamma:g})"}
    pct = lambda x: "-" if x is None else f"{100 * x:.1f}%"  # noqa: E731
    held = next((row["held_back_n"] for row in rows if "held_back_n" in row), n_forget // 2)
    para = next((row["paraphrased_held_back_n"] for row in rows if "paraphrased_held_back_n" in row), 0)
    lines = [
        f"Set-up: {args.steps} unlearning steps at lr {args.lr:g} (batch {args.batch_size}, trained on the "
        f"model's own answer sentences), seed {args.seed}; probe: {args.probe_steps} AdamW steps at lr "
        f"{args.probe_lr:g} on {n_forget - held} of the {n_forget} capitals (attack) or on the retain facts "
        f"(control), accuracy on the other {held} (held back) and their {para} paraphrases; greedy decoding "
        f"of 16 tokens. "
        f"{meta['device']}, {meta['date']}, commit {meta['commit']}, {wall_s / 60:.0f} min.",
        "",
        f"| method | forget | paraphrased | held-out retain | attack: relearned {n_forget - held} "
        f"| attack: held-back {held} | attack: their paraphrases | control: held-back {held} "
        "| control: their paraphrases |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        lines.append(
            f"| {titles[row['method']]} | {pct(row['forget_acc'])} | {pct(row['paraphrased_acc'])} "
            f"| {pct(row['holdout_acc'])} | {pct(row.get('attack_relearn_acc'))} "
            f"| {pct(row.get('attack_held_back_acc'))} | {pct(row.get('attack_paraphrased_acc'))} "
            f"| {pct(row.get('control_held_back_acc'))} | {pct(row.get('control_paraphrased_acc'))} |"
        )
    return "\n".join(lines)


def main(argv=None) -> None:
    args = parse_args(argv)
    start = time.perf_counter()
    torch.set_num_threads(args.threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    for name in ("lightning.pytorch", "lightning.pytorch.utilities.rank_zero", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")

    from blur_lightning.data.rows import load_rows
    from blur_lightning.models.loading import load_causal_lm, load_tokenizer

    model, tokenizer = load_causal_lm(args.model), load_tokenizer(args.model)
    initial = {k: v.detach().clone() for k, v in model.state_dict().items()}
    limit = args.max_questions
    sets = {
        "forget": load_rows(FORGET, limit=limit),
        "paraphrased": load_rows(PARAPHRASED, limit=4 * limit if limit else None),
        "holdout": load_rows(HOLDOUT, limit=limit),
    }
    retain_rows = load_rows(RETAIN)
    meta = {"date": common.today(), "commit": common.git_commit(), "device": common.device_name(torch.device("cpu"))}

    run_meta = {**meta, "tag": args.tag, "seed": args.seed, "steps": args.steps, "lr": args.lr,
                "blur_gamma": args.blur_gamma, "probe_steps": args.probe_steps, "probe_lr": args.probe_lr}
    partial = args.out / "relearning.partial.csv"
    rows = [row_of("before", {k: evaluate(model, tokenizer, v, args) for k, v in sets.items()}, None)]
    print(rows[-1], flush=True)
    for method in args.methods:
        model.load_state_dict(initial)
        setting = SETTINGS[method]
        gamma = args.blur_gamma if method == "blur" else setting.gamma
        setting = Setting(setting.method, setting.forget_loss, setting.mode, gamma, args.lr)
        t0 = time.perf_counter()
        unlearn(model, tokenizer, setting, args)
        evals = {k: evaluate(model, tokenizer, v, args) for k, v in sets.items()}
        probed = probe(model, tokenizer, sets["forget"], sets["paraphrased"], retain_rows, args)
        rows.append(row_of(method, evals, probed))
        print(f"{method} ({time.perf_counter() - t0:.0f} s): {rows[-1]}", flush=True)
        write_csv(partial, [{**run_meta, **row} for row in rows])  # survives a crash

    wall_s = time.perf_counter() - start
    text = markdown(rows, args, meta, wall_s, len(sets["forget"]))
    print("\n" + text, flush=True)
    run_meta["wall_min"] = round(wall_s / 60)
    common.append_csv(args.out / "relearning.csv", [{**run_meta, **row} for row in rows])
    partial.unlink(missing_ok=True)
    if not args.no_results:
        results_page.rebuild_if_default(args.out)


if __name__ == "__main__":
    main()
