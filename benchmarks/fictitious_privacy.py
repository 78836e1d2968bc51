"""The field's memorization and membership metrics on the fictitious benchmark: target, oracle, BLUR-NPO.

One table (issue: every metric the field reports): forget quality and model utility beside exact
memorization, extraction strength, the six membership-inference attacks (AUC, forget against holdout)
and PrivLeak, for the build's target (trained on every person), its retain oracle (never saw the forget
people) and one BLUR run (NPO + NLL, forget_lower, the oracle comparison's chosen setting, one seed).

The attacks need people none of the three models saw: a build has none (the target is fine-tuned on all
of them), so this script invents a holdout of its own: `--holdout-people` more people drawn by the same
generator with another seed, their names checked against the build's, rendered and scored exactly as the
forget people are. PrivLeak's reference AUC is the oracle's Min-K% AUC (open-unlearning's convention: the
retain model's `mia_min_k`); the Reference attack subtracts the oracle's loss (open-unlearning's
reference model is its retain model), which makes the oracle's own Reference AUC 0.5 by construction.

    python benchmarks/fictitious_privacy.py                     # ~10 min on 2 CPU cores (measured: RESULTS.md)
    python benchmarks/fictitious_privacy.py --steps 2 --max-world 8 --out /tmp/fp   # a smoke run
"""

from __future__ import annotations

import argparse
import csv
import gc
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, device_name, git_commit, today  # noqa: E402
from oracle_comparison import RESULTS, Profile, run_config  # noqa: E402

ATTACKS = ("loss", "zlib", "min_k", "min_k_plus_plus", "gradnorm", "reference")
COLUMNS = ("forget_quality", "model_utility", "forget/accuracy", "exact_memorization", "extraction_strength",
           *(f"mia_{a}" for a in ATTACKS), "privleak")  # fmt: skip
TITLES = {"forget_quality": "forget quality", "model_utility": "utility", "forget/accuracy": "forget acc",
          "exact_memorization": "EM", "extraction_strength": "ES", "privleak": "PrivLeak",
          **{f"mia_{a}": f"{a} AUC" for a in ATTACKS}}  # fmt: skip


def holdout_rows(folder: Path, people: int, seed: int) -> list[dict[str, Any]]:
    """`people` invented people none of the build's models saw, as TOFU-style (question, answer) rows."""
    from blur_lightning.data.fictitious_people import fictitious_facts
    from blur_lightning.data.rows import load_rows

    seen = {row["person"] for row in load_rows(str(folder / "data" / "full.jsonl"))}
    manifest = json.loads((folder / "data" / "manifest.json").read_text())
    attributes = manifest.get("attributes")
    # another seed, many people: the first `people` whose names the build does not have (Faker repeats some)
    rows = [r for r in fictitious_facts(people + len(seen), seed, attributes) if r["person"] not in seen]
    kept = sorted({r["person"] for r in rows})[:people]
    out = [r for r in rows if r["person"] in kept]
    if len(kept) < people:
        raise RuntimeError(f"only {len(kept)} new people from seed {seed}; try another --holdout-seed")
    return out


def evaluate(model, tokenizer, folder: Path, holdout_path: Path, max_world: int, privleak_ref: float | None):
    from blur_lightning.evals.base import EvalSettings
    from blur_lightning.evals.registry import evaluate_benchmark
    from blur_lightning.fictitious import build as oracle_build

    rows = oracle_build.evaluation_rows(folder, "forget10", max_world)
    from blur_lightning.data.rows import load_rows

    rows["holdout"] = load_rows(str(holdout_path))
    options = {"oracle_truth_ratios": str(folder / "oracle_truth_ratios" / "forget10.json"),
               "mia_attacks": list(ATTACKS), "reference_model_path": str(folder / "oracle")}  # fmt: skip
    if privleak_ref is not None:
        options["privleak_ref_auc"] = privleak_ref
    model.eval()
    t0 = time.perf_counter()
    results = evaluate_benchmark("fictitious", model, tokenizer, rows, EvalSettings(batch_size=32, max_new_tokens=32,
                                 show_progress=False), options)  # fmt: skip
    row = {c: results.get(c) for c in COLUMNS}
    row["eval_s"] = round(time.perf_counter() - t0, 1)
    return row


def blur_run(folder: Path, run_dir: Path, steps: int, lr: float, gamma: float, seed: int, max_world: int):
    """One BLUR-NPO unlearning of forget10 through the CLI (the oracle comparison's config), no evaluation."""
    from blur_lightning.cli import main as cli_main

    profile = Profile("privacy", ("blur",), (lr,), (seed,), steps, max_world, 0, ())
    config = run_config(folder, run_dir, "blur", gamma, lr, seed, "forget10", profile)
    trainer = config["trainer"]
    trainer["callbacks"] = [c for c in trainer["callbacks"] if not c["class_path"].endswith("EvaluationCallback")]
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config))
    t0 = time.perf_counter()
    cli = cli_main(["fit", "--config", str(run_dir / "config.yaml")])
    return cli, round(time.perf_counter() - t0, 1)


def _fmt(value: Any) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1e-2 and value != 0 else f"{value:.3f}"
    return str(value)


def table(rows: Sequence[dict[str, Any]]) -> str:
    head = "| model | " + " | ".join(TITLES[c] for c in COLUMNS) + " | eval s |"
    lines = [head, "|" + "---|" * (len(COLUMNS) + 2)]
    for row in rows:
        lines.append(f"| {row['model']} | " + " | ".join(_fmt(row.get(c)) for c in COLUMNS) + f" | {row['eval_s']} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    from blur_lightning.fictitious import build as oracle_build
    from blur_lightning.models.loading import load_causal_lm, load_tokenizer

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--build", type=Path, default=None, help="a build folder (default: the default recipe's)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--gamma", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-world", type=int, default=40)
    parser.add_argument("--holdout-people", type=int, default=5, help="forget10's size: 5 people, 20 questions")
    parser.add_argument("--holdout-seed", type=int, default=1000)
    parser.add_argument("--out", type=Path, default=RESULTS, help="where the CSV and the table go")
    parser.add_argument("--runs-dir", type=Path, default=REPO / "runs" / "fictitious_privacy",
                        help="the holdout file and the BLUR run's logs (git-ignored)")
    args = parser.parse_args(argv)

    folder = args.build or oracle_build.build()
    args.out.mkdir(parents=True, exist_ok=True)
    runs = args.runs_dir
    runs.mkdir(parents=True, exist_ok=True)
    holdout_path = runs / "holdout.jsonl"
    holdout_path.write_text("".join(json.dumps(r) + "\n" for r in holdout_rows(folder, args.holdout_people,
                                                                              args.holdout_seed)))  # fmt: skip
    meta = {"date": today(), "commit": git_commit(), "device": device_name(torch.device("cpu")), "build": folder.name}
    rows = []
    oracle = load_causal_lm(str(folder / "oracle"))
    rows.append({"model": "oracle (retain)", **evaluate(oracle, load_tokenizer(str(folder / "oracle")), folder,
                                                         holdout_path, args.max_world, None)})  # fmt: skip
    ref_auc = rows[0]["mia_min_k"]
    rows[0]["privleak"] = 0.0 if ref_auc is not None else None  # against itself, by definition
    del oracle
    gc.collect()
    target = load_causal_lm(str(folder / "target"))
    rows.insert(0, {"model": "target", **evaluate(target, load_tokenizer(str(folder / "target")), folder,
                                                   holdout_path, args.max_world, ref_auc)})  # fmt: skip
    del target
    gc.collect()
    cli, train_s = blur_run(folder, runs / "blur", args.steps, args.lr, args.gamma, args.seed, args.max_world)
    row = evaluate(cli.model.model, cli.model.tokenizer, folder, holdout_path, args.max_world, ref_auc)
    rows.append({"model": f"BLUR-NPO (gamma {args.gamma:g}, lr {args.lr:g}, {args.steps} steps, seed {args.seed})",
                 **row, "train_s": train_s})  # fmt: skip
    with open(args.out / "fictitious_privacy.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=[*meta, "model", *COLUMNS, "eval_s", "train_s"])
        writer.writeheader()
        for r in rows:
            writer.writerow({**meta, **r})
    text = table(rows)
    (args.out / "fictitious_privacy.md").write_text(
        f"{meta['date']}, commit {meta['commit']}, {meta['device']}, build {meta['build']}; holdout: "
        f"{args.holdout_people} new people (seed {args.holdout_seed}); PrivLeak against the oracle's Min-K% AUC "
        f"{_fmt(ref_auc)}; Reference attack against the oracle.\n\n{text}\n"
    )
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
