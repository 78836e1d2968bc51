"""The page of current results at the top of benchmarks/RESULTS.md, rebuilt from benchmarks/results/*.csv.

Every benchmark script appends its rows (each with date, commit and machine) to a CSV under
``benchmarks/results/`` and then calls :func:`write_page`; the tables between
``<!-- current:start -->`` and ``<!-- current:end -->`` are never edited by hand. Past runs stay in
the CSVs; the prose below the page reads them.

    python benchmarks/results_page.py            # rewrite the page from the CSVs
    python benchmarks/results_page.py --check    # exit 1 when the committed page is stale
    python benchmarks/results_page.py --record-demo runs/demo --label fresh --wall-s 301
                                                 # append a finished `make demo` run, then rewrite
"""

from __future__ import annotations

import argparse
import csv
import statistics
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

RESULTS_DIR = Path(__file__).resolve().parent / "results"
RESULTS_MD = Path(__file__).resolve().parent / "RESULTS.md"
SECTION = "current"

METHOD_TITLES = {
    "before": "before unlearning",
    "blur": "BLUR (forget_lower, NPO + NLL)",
    "npo_sum": "NPO + NLL weighted sum",
    "graddiff": "GradDiff (GA + NLL)",
    "ga": "GA",
}


def read_csv(path: Path) -> list[dict[str, str]]:
    """Rows of a results CSV as strings ([] when the file does not exist yet)."""
    if not path.exists():
        return []
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def _num(value: str | None) -> float | None:
    return None if value in (None, "") else float(value)


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]], right_from: int = 1) -> list[str]:
    align = ["---" if i < right_from else "---:" for i in range(len(header))]
    return ["| " + " | ".join(header) + " |", "|" + "|".join(align) + "|"] + [
        "| " + " | ".join(row) + " |" for row in rows
    ]


def _provenance(rows: Sequence[dict[str, str]]) -> str:
    """'date, commit, machine' of a group of rows (ranges where they differ)."""

    def span(key: str) -> str:
        values = sorted({r.get(key) or "?" for r in rows})
        return values[0] if len(values) == 1 else f"{values[0]} to {values[-1]}"

    dates = sorted({(r.get("date") or "?")[:10] for r in rows})
    date = dates[0] if len(dates) == 1 else f"{dates[0]} to {dates[-1]}"
    commits = ", ".join(sorted({r.get("commit") or "?" for r in rows}))
    return f"{date}; commit {commits}; {span('device')}"


def unlearning_quality_section(rows: list[dict[str, str]]) -> list[str]:
    """Five-seed summary of the chosen settings (trained on the model's own sentences, 20 steps at 3e-5)."""
    chosen = [
        r for r in rows
        if r["answer_column"] == "response" and r["steps"] == "20" and r["chosen"] == "1"
        and r["method"] in ("blur", "npo_sum", "graddiff")
    ]  # fmt: skip
    if not chosen:
        return []
    seeds = sorted({int(r["seed"]) for r in chosen})
    lines = [
        "### Unlearning quality: capitals from SmolLM2-135M-Instruct (`unlearning_quality.py`)",
        "",
        f"{_provenance(chosen)}. The setting each method chose on the validation half, rerun on seeds "
        f"{', '.join(map(str, seeds))}: 20 steps, lr 3e-5, batch 8 + 8, trained on the model's own answer "
        "sentences. Held-out retain = all 90 held-out questions (validation and test halves); forget = the "
        "80 capitals trained on.",
        "",
    ]
    body = []
    for method in ("blur", "npo_sum", "graddiff"):
        mine = sorted((r for r in chosen if r["method"] == method), key=lambda r: int(r["seed"]))
        if not mine:
            continue
        # the two halves together (48 + 42 questions), as the five-seed table always reported
        held = [(48 * float(r["val_acc"]) + 42 * float(r["test_acc"])) / 90 for r in mine]
        forget = [float(r["forget_acc"]) for r in mine]
        sd = statistics.stdev(held) if len(held) > 1 else 0.0
        knob = "gamma" if method == "blur" else "retain weight"
        body.append([
            f"{METHOD_TITLES[method]}, {knob} {float(mine[0]['gamma']):g}",
            " / ".join(f"{100 * h:.1f}" for h in held),
            f"{100 * statistics.mean(held):.1f}% ({100 * sd:.1f})",
            f"{100 * max(forget):.1f}%",
            str(len(mine)),
        ])  # fmt: skip
    lines += _table(["method", "held-out retain per seed (%)", "mean (sd)", "worst forget acc", "seeds"], body)
    demo = [r for r in rows if r["steps"] == "40" and r["method"] != "before"]
    if demo:
        lines += ["", f"At the demo's settings (lr 1e-5, 40 steps, seed 0; {_provenance(demo)}):", ""]
        lines += _table(
            ["method", "forget acc", "held-out retain"],
            [[METHOD_TITLES.get(r["method"], r["method"]), _pct(_num(r["forget_acc"])),
              _pct((48 * float(r["val_acc"]) + 42 * float(r["test_acc"])) / 90)] for r in demo],
        )  # fmt: skip
    return lines


def relearning_section(rows: list[dict[str, str]]) -> list[str]:
    """The relearning probe: the latest run of each tag."""
    if not rows:
        return []
    lines = ["### Removed, or only suppressed? The relearning probe (`relearning.py`)", ""]
    for tag in dict.fromkeys(r["tag"] for r in rows):
        mine = [r for r in rows if r["tag"] == tag]
        latest = max(r["date"] for r in mine)
        mine = [r for r in mine if r["date"] == latest]
        first = mine[0]
        lines += [
            f"**{tag}**: {_provenance(mine)}; seed {first['seed']}, {first['steps']} unlearning steps at lr "
            f"{float(first['lr']):g}; probe {first['probe_steps']} steps at lr {float(first['probe_lr']):g} on 40 "
            "of the 80 capitals (attack) or on the retain facts (control).",
            "",
        ]
        body = []
        for r in mine:
            title = METHOD_TITLES.get(r["method"], r["method"])
            if r["method"] == "blur":
                title = f"BLUR (gamma {float(r['blur_gamma']):g})"
            body.append([title] + [_pct(_num(r.get(k))) for k in (
                "forget_acc", "paraphrased_acc", "holdout_acc", "attack_relearn_acc", "attack_held_back_acc",
                "attack_paraphrased_acc", "control_held_back_acc")])  # fmt: skip
        lines += _table(
            ["method", "forget", "paraphrased", "held-out retain", "attack: relearned 40", "attack: held-back 40",
             "attack: their paraphrases", "control: held-back 40"], body)  # fmt: skip
        lines.append("")
    return lines[:-1]


def projection_section(rows: list[dict[str, str]]) -> list[str]:
    """The projection kernels: the latest GPU run, its largest model."""
    gpu = [r for r in rows if not r["device"].startswith("CPU") and r["task"] == "projection"]
    if not gpu:
        return []
    latest = max(r["date"] for r in gpu)
    mine = [r for r in gpu if r["date"] == latest]
    largest = mine[-1]["model"]  # the script runs the sizes smallest first
    mine = [r for r in mine if r["model"] == largest and r["provider"] in ("reference", "torch", "triton")]
    lines = [
        "### Projection kernels (`bench_projection.py`)",
        "",
        f"{_provenance(mine)}; torch {mine[0]['torch']}, Triton {mine[0]['triton']}. Median ms of one "
        "projection (pass 1 + pass 2); % of the device's copy bandwidth in the same run.",
        "",
    ]
    body = []
    for r in mine:
        frac, ms = _num(r["frac_of_copy"]), _num(r["median_ms"])
        body.append([r["model"], r["dtype"], r["provider"], r["note"] if ms is None else f"{ms:.2f}",
                     "-" if frac is None else f"{100 * frac:.0f}%", r["host_syncs"] or "-"])  # fmt: skip
    lines += _table(["model", "dtype", "provider", "median ms", "% of copy", "host syncs"], body, right_from=3)
    return lines


def step_section(rows: list[dict[str, str]]) -> list[str]:
    """The full BLUR step against the weighted-sum step: the latest run on each device."""
    if not rows:
        return []
    lines = ["### Full step: BLUR against the weighted sum (`bench_step.py`; goal <= 1.05x on a GPU)", ""]
    body = []
    for device in dict.fromkeys(r["device"] for r in rows):
        mine = [r for r in rows if r["device"] == device]
        latest = max(r["date"][:10] for r in mine)  # every run of that day (two runs: two rows each)
        for r in mine:
            if r["date"][:10] != latest:
                continue
            body.append([device, r["date"][:10], r["commit"], f"{r['size']} {r['dtype']} ({r['adamw']})",
                         r.get("run") or "-", r["provider"], f"{float(r['ms_median']):.1f}",
                         f"{float(r['time_ratio']):.2f}x",
                         "-" if not r.get("peak_gib") else f"{float(r['peak_gib']):.2f}",
                         r.get("host_reads") or "-"])  # fmt: skip
    lines += _table(["device", "date", "commit", "model (AdamW)", "run", "provider", "ms/step", "/ weighted sum",
                     "peak GiB", "host reads"], body, right_from=6)  # fmt: skip
    return lines


def demo_row(run_dir: Path, label: str, wall_s: float | None, meta: dict[str, str]) -> dict[str, object]:
    """One `make demo` run as a CSV row: its before/after accuracies, the probe and its stage times."""
    import json

    evaluations = json.loads((run_dir / "qa_eval.json").read_text())["evaluations"]
    stages = {e["stage"]: e["metrics"] for e in evaluations}
    probe = json.loads((run_dir / "relearning.json").read_text())["results"]
    times = json.loads((run_dir / "stage_times.json").read_text())
    row: dict[str, object] = {**meta, "label": label, "wall_s": wall_s if wall_s is not None else ""}
    for stage, prefix in (("fit_start", "before"), ("fit_end", "after")):
        for key, value in stages[stage].items():
            row[f"{prefix}/{key}"] = round(value, 4)
    for name, result in probe.items():
        row[f"probe/{name}/accuracy_after"] = round(result["accuracy_after"], 4)
    for name, seconds in times.items():
        row[f"seconds/{name}"] = seconds
    return row


def demo_section(rows: list[dict[str, str]]) -> list[str]:
    """The main job's runs (`make demo`): the latest of each label."""
    if not rows:
        return []
    latest = {r["label"]: r for r in rows}  # appended in time order: the last row of a label wins
    lines = ["### The main job (`make demo`)", "", f"{_provenance(list(latest.values()))}.", ""]
    stage_keys = [k for k in rows[-1] if k.startswith("seconds/") and k != "seconds/total"]
    header = ["run", "wall"] + [k.removeprefix("seconds/") for k in stage_keys]
    body = [
        [label, f"{float(r['wall_s']):.0f} s" if r.get("wall_s") else "-"]
        + [f"{float(r[k]):.0f} s" if r.get(k) else "-" for k in stage_keys]
        for label, r in latest.items()
    ]
    lines += _table(header, body)
    last = rows[-1]
    sets = [k.removeprefix("after/").removesuffix("/accuracy") for k in last if k.startswith("after/")
            and k.endswith("/accuracy")]  # fmt: skip
    lines += ["", "Accuracy before and after unlearning (the latest run), then the relearning probe's:", ""]
    lines += _table(["set", "before", "after"], [[n, _pct(_num(last[f"before/{n}/accuracy"])),
                                                  _pct(_num(last[f"after/{n}/accuracy"]))] for n in sets])  # fmt: skip
    probes = [k for k in last if k.startswith("probe/")]
    lines += [""] + _table(["probe set", "after relearning"],
                           [[k.split("/")[1], _pct(_num(last[k]))] for k in probes])  # fmt: skip
    return lines


def _comparison(rows: list[dict[str, str]], csv_name: str, profile_name: str, default_splits: tuple[str, str]):
    """The newest recipe's rows of one oracle_comparison.py profile (from RESULTS_DIR/`csv_name`) as a Ledger, or
    None without any."""
    import oracle_comparison

    picked = [r for r in rows if r["profile"] == profile_name]
    if not picked:
        return None
    recipe = picked[-1]["recipe"]
    mine = [r for r in picked if r["recipe"] == recipe]
    splits = _splits(mine, default_splits)
    return oracle_comparison.Ledger(RESULTS_DIR / csv_name, recipe, oracle_comparison.PROFILES[profile_name], mine,
                                    splits=splits)  # fmt: skip


def oracle_section(rows: list[dict[str, str]]) -> list[str]:
    """The fictitious benchmark's comparison (oracle_comparison.py): the newest recipe's full profile."""
    import oracle_comparison

    ledger = _comparison(rows, "oracle_comparison.csv", "full", ("validation10", "forget10"))
    if ledger is None:
        return []
    return [
        f"### Fictitious {ledger.test_split}: BLUR and the baselines against the retain oracle",
        "",
        f"`benchmarks/oracle_comparison.py`, build `{ledger.recipe}` ({_provenance(ledger.rows)}); forget quality and "
        f"utility: mean [95% bootstrap CI over seeds], the rest: mean ± sd; hyperparameters chosen on "
        f"{ledger.validation_split}; the probe columns (relearning, 4 bits) over the probed seeds "
        "(the profile's probe_seeds: all of BLUR's, the baselines' first); "
        "plot `benchmarks/results/oracle_pareto.png`.",
        "",
        oracle_comparison.summary(ledger, 0.95, None),
    ]


def oracle_large_section(rows: list[dict[str, str]]) -> list[str]:
    """Issue 21's larger fictitious benchmark (oracle_comparison.py --recipe large): what its CSV holds so far."""
    import oracle_comparison

    ledger = _comparison(rows, "oracle_comparison_large.csv", "large", ("validation25", "forget25"))
    if ledger is None:
        return []
    validation = ledger.validation_split
    target = ledger.find(stage="reference", split=validation, method="target")
    target_mu = target["model_utility"] if target else ""
    body = [[r["method"], r["knob"], r["lr"], _fmt3(r["forget_quality"]), _fmt3(r["model_utility"]),
             _pct(_num(r["forget_acc"]))] for r in ledger.rows if r["stage"] == "validation"]  # fmt: skip
    return [
        f"### Fictitious {ledger.test_split}: the larger benchmark (issue 21; resumable, partial until every setting "
        "has run)",
        "",
        f"`benchmarks/oracle_comparison.py --recipe large`, build `{ledger.recipe}` ({_provenance(ledger.rows)}); "
        f"forget quality and utility: mean [95% bootstrap CI over seeds]; hyperparameters chosen on {validation}; "
        "plot `benchmarks/results/oracle_pareto_large.png`.",
        "",
        f"Validation runs ({validation}, seed 0; the target's utility there {_fmt3(target_mu)}, the selection floor "
        f"95 % of it):",
        "",
        *_table(["method", "gamma / w", "lr", "forget quality", "utility", "forget acc %"], body),
        "",
        oracle_comparison.summary(ledger, 0.95, None),
    ]


def _splits(rows: list[dict[str, str]], default: tuple[str, str]) -> tuple[str, str]:
    """(validation, test) split names of a comparison's rows (a build's held-out share names them); `default`
    for one the rows do not hold yet (the reference stage writes validation first)."""
    names = {r["split"] for r in rows}
    validation = next((s for s in sorted(names) if s.startswith("validation")), default[0])
    test = next((s for s in sorted(names) if s.startswith("forget")), default[1])
    return validation, test


def _fmt3(value: str) -> str:
    number = _num(value)
    return "-" if number is None else f"{number:.3g}"


SECTIONS: dict[str, Callable[[list[dict[str, str]]], list[str]]] = {
    "demo.csv": demo_section,
    "oracle_comparison.csv": oracle_section,
    "oracle_comparison_large.csv": oracle_large_section,
    "unlearning_quality.csv": unlearning_quality_section,
    "relearning.csv": relearning_section,
    "bench_step.csv": step_section,
    "projection.csv": projection_section,
}


def build_page(results_dir: Path = RESULTS_DIR) -> str:
    """The current-results page, from the CSVs alone (deterministic: no clock, no git)."""
    lines = [
        "## Current results",
        "",
        "Generated by `python benchmarks/results_page.py` from `benchmarks/results/*.csv` (each row keeps "
        "its date, commit and machine); do not edit between the markers. Older runs: the CSVs, and the notes "
        "below.",
    ]
    for name, section in SECTIONS.items():
        part = section(read_csv(results_dir / name))
        if part:
            lines += [""] + part
    return "\n".join(lines)


def _splice(old: str, text: str) -> str:
    start, end = f"<!-- {SECTION}:start -->", f"<!-- {SECTION}:end -->"
    block = f"{start}\n{text.rstrip()}\n{end}"
    if start in old and end in old:
        return old[: old.index(start)] + block + old[old.index(end) + len(end) :]
    head, _, rest = old.partition("\n")  # right under the title
    return f"{head}\n\n{block}\n{rest}"


def write_page(results_md: Path = RESULTS_MD, results_dir: Path = RESULTS_DIR) -> bool:
    """Rewrite the page in `results_md`; True when it changed."""
    old = results_md.read_text() if results_md.exists() else "# Benchmark results\n"
    new = _splice(old, build_page(results_dir))
    if new != old:
        results_md.write_text(new)
    return new != old


def rebuild_if_default(results_dir: Path) -> None:
    """After a benchmark run: rebuild the page when its rows went to benchmarks/results (not a smoke folder)."""
    if Path(results_dir).resolve() == RESULTS_DIR:
        write_page()
        print(f"{RESULTS_MD}: current-results page rebuilt")
    else:
        print(f"rows in {results_dir}; {RESULTS_MD} left as it is (not benchmarks/results)")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if RESULTS.md's page is not what the CSVs give")
    parser.add_argument("--results-md", type=Path, default=RESULTS_MD)
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    parser.add_argument("--record-demo", type=Path, default=None, help="a finished demo's run dir (runs/demo)")
    parser.add_argument("--label", default="fresh", help="with --record-demo: fresh | rerun | ...")
    parser.add_argument("--wall-s", type=float, default=None, help="with --record-demo: the make demo wall time")
    args = parser.parse_args(argv)
    if args.record_demo is not None:
        import common

        meta = {"date": common.today(), "commit": common.git_commit(), "device": "CPU (x86_64, 2 cores)"}
        common.append_csv(args.results_dir / "demo.csv", [demo_row(args.record_demo, args.label, args.wall_s, meta)])
    if args.check:
        old = args.results_md.read_text()
        stale = _splice(old, build_page(args.results_dir)) != old
        if stale:
            print(f"{args.results_md}: the current-results page is stale; run benchmarks/results_page.py")
        return int(stale)
    changed = write_page(args.results_md, args.results_dir)
    print(f"{args.results_md}: {'rewritten' if changed else 'unchanged'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
