"""How much BLUR's projection changed each step: the correction's share of d, read from finished runs' logs.

For the paper's mode (forget_lower) d = g_r + coef * g_f with coef = gamma - <g_r, g_f>_M / <g_f, g_f>_M, M the
projection's metric (identity or AdamW's P). Whatever M, the part of d the projection adds to the weighted sum
g_r + gamma * g_f is (coef - gamma) * g_f, so its share of the step is

    |coef - gamma| * ||g_f|| / ||d||

and every term is in a run's Lightning ``metrics.csv`` (``train/coef``, ``train/sq_forget``,
``train/direction_norm``; the norms are Euclidean in both metrics). When that share is small the projection
leaves the weighted sum's step, and an AdamW run of BLUR at gamma is the weighted sum at weight 1 / gamma (AdamW
ignores a constant scale of its gradient). The oracle comparison's explanation of its result rests on these
figures, so they come from the runs, not from a calculation beside them::

    python benchmarks/projection_share.py runs/oracle_comparison_large/test_blur_*
    python benchmarks/projection_share.py RUN_FOLDER [RUN_FOLDER ...] --csv shares.csv

A run folder holds ``metrics.csv`` and ``hparams.yaml`` (gamma, mode), as ``blur-lightning fit`` writes them.
Runs of the penalty mode (the weighted sum itself) are listed with share 0 by construction.
"""

from __future__ import annotations

import argparse
import csv
import math
import statistics
import sys
from pathlib import Path
from typing import Any

import yaml

COLUMNS = ("run", "mode", "gamma", "steps", "coef_min", "coef_max", "gf_over_gr_median", "share_median",
           "share_max", "cosine_median")  # fmt: skip


def step_shares(rows: list[dict[str, str]], gamma: float) -> list[dict[str, float]]:
    """Per optimizer step: coef, ||g_f|| / ||g_r||, the correction's share of ||d|| and cos(g_r, g_f).

    Rows without ``train/coef`` (validation and evaluation rows of the same CSV) are skipped."""
    out = []
    for r in rows:
        if not r.get("train/coef"):
            continue
        coef, sq_f, sq_r = float(r["train/coef"]), float(r["train/sq_forget"]), float(r["train/sq_retain"])
        norm_d = float(r["train/direction_norm"])
        out.append({
            "coef": coef,
            "gf_over_gr": math.sqrt(sq_f / sq_r) if sq_r > 0 else math.inf,
            "share": abs(coef - gamma) * math.sqrt(sq_f) / norm_d if norm_d > 0 else 0.0,
            "cosine": float(r["train/cosine"]),
        })  # fmt: skip
    return out


def summarize(folder: Path) -> dict[str, Any]:
    """One run folder's row of COLUMNS; a clear error names the missing file or column."""
    metrics, hparams = folder / "metrics.csv", folder / "hparams.yaml"
    for path in (metrics, hparams):
        if not path.is_file():
            raise FileNotFoundError(f"{path}: not found; a run folder holds metrics.csv and hparams.yaml")
    hp = yaml.safe_load(hparams.read_text()) or {}
    if "gamma" not in hp:
        raise ValueError(f"{hparams}: no 'gamma' (expected a BLURUnlearner's hyperparameters)")
    with metrics.open() as f:
        rows = list(csv.DictReader(f))
    needed = {"train/coef", "train/sq_forget", "train/sq_retain", "train/direction_norm", "train/cosine"}
    if rows and not needed <= set(rows[0]):
        raise ValueError(f"{metrics}: missing column(s) {sorted(needed - set(rows[0]))}")
    gamma, mode = float(hp["gamma"]), str(hp.get("mode", "forget_lower"))
    steps = step_shares(rows, gamma)
    if not steps:
        raise ValueError(f"{metrics}: no training step logged (no train/coef value)")
    med = statistics.median
    shares = [0.0] * len(steps) if mode == "penalty" else [s["share"] for s in steps]
    return {
        "run": folder.name, "mode": mode, "gamma": gamma, "steps": len(steps),
        "coef_min": min(s["coef"] for s in steps), "coef_max": max(s["coef"] for s in steps),
        "gf_over_gr_median": med(s["gf_over_gr"] for s in steps),
        "share_median": med(shares), "share_max": max(shares), "cosine_median": med(s["cosine"] for s in steps),
    }  # fmt: skip


def table(rows: list[dict[str, Any]]) -> str:
    lines = ["| run | mode | gamma | steps | coef | median ‖g_f‖/‖g_r‖ | correction / ‖d‖, median (max) | median cos |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    for r in rows:
        cells = [r["run"], r["mode"], f"{r['gamma']:g}", str(r["steps"]), f"{r['coef_min']:.3g}..{r['coef_max']:.3g}",
                 f"{r['gf_over_gr_median']:.3g}", f"{100 * r['share_median']:.2g} % ({100 * r['share_max']:.2g} %)",
                 f"{r['cosine_median']:+.2g}"]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, help="run folders (metrics.csv + hparams.yaml)")
    parser.add_argument("--csv", type=Path, default=None, help="also write the rows here")
    args = parser.parse_args(argv)
    rows = [summarize(folder) for folder in sorted(args.runs)]
    print(table(rows))
    if args.csv is not None:
        with args.csv.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=COLUMNS)
            writer.writeheader()
            writer.writerows(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
