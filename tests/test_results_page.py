"""The current-results page of benchmarks/RESULTS.md is what the CSVs under benchmarks/results/ give."""

from __future__ import annotations

import csv
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))
import common  # noqa: E402
import results_page  # noqa: E402


def test_committed_page_matches_the_csvs():
    # A table edited by hand, or rows appended without rebuilding the page, fail here.
    assert results_page.main(["--check"]) == 0, "run: python benchmarks/results_page.py"


def _write(path: Path, rows: list[dict]) -> None:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def _quality_row(method: str, seed: int, val_acc: float, test_acc: float, **extra) -> dict:
    return {
        "date": f"2026-12-0{seed + 1}T00:00:00Z", "commit": f"c{seed}", "device": "CPU (test)", "tag": "t",
        "seed": seed, "answer_column": "response", "method": method, "gamma": 0.1, "steps": 20,
        "forget_acc": 0.025 * seed, "val_acc": val_acc, "test_acc": test_acc, "chosen": 1, **extra,
    }  # fmt: skip


def test_unlearning_summary_is_computed_from_the_rows(tmp_path):
    # 48 validation + 42 test questions: seed 0 keeps 90% of both, seed 1 keeps 80% of both.
    _write(tmp_path / "unlearning_quality.csv",
           [_quality_row("blur", 0, 0.9, 0.9), _quality_row("blur", 1, 0.8, 0.8),
            _quality_row("blur", 2, 0.1, 0.1, chosen=0)])  # fmt: skip
    page = results_page.build_page(tmp_path)
    line = next(line for line in page.splitlines() if line.startswith("| BLUR"))
    # mean 85.0, sample sd of (90, 80) = 7.07; the unchosen seed-2 run is not counted
    assert "| 90.0 / 80.0 | 85.0% (7.1) | 2.5% | 2 |" in line
    assert "2026-12-01 to 2026-12-02; commit c0, c1; CPU (test)" in page


def test_latest_run_of_each_tag_is_shown(tmp_path):
    base = {"device": "CPU (test)", "seed": 0, "steps": 40, "lr": 1e-5, "blur_gamma": 0.1, "probe_steps": 10,
            "probe_lr": 1e-5, "forget_acc": 0.0, "paraphrased_acc": 0.1, "holdout_acc": 0.9}  # fmt: skip
    _write(tmp_path / "relearning.csv", [
        {**base, "date": "2026-12-01", "commit": "old", "tag": "a", "method": "blur", "attack_held_back_acc": 0.5},
        {**base, "date": "2026-12-02", "commit": "new", "tag": "a", "method": "blur", "attack_held_back_acc": 0.25},
    ])  # fmt: skip
    page = results_page.build_page(tmp_path)
    assert "commit new" in page and "commit old" not in page
    assert "| 25.0% |" in page and "| 50.0% |" not in page


def test_page_goes_under_the_title_once_and_is_replaced_in_place(tmp_path):
    md = tmp_path / "RESULTS.md"
    md.write_text("# Benchmark results\n\nnotes that stay\n")
    _write(tmp_path / "relearning.csv", [{"date": "2026-12-01", "commit": "x", "device": "d", "tag": "a",
                                          "method": "before", "seed": 0, "steps": 1, "lr": 1, "blur_gamma": 1,
                                          "probe_steps": 1, "probe_lr": 1}])  # fmt: skip
    assert results_page.write_page(md, tmp_path)
    first = md.read_text()
    assert first.startswith("# Benchmark results\n\n<!-- current:start -->") and first.endswith("notes that stay\n")
    assert not results_page.write_page(md, tmp_path)  # unchanged CSVs: unchanged file
    assert md.read_text().count("<!-- current:start -->") == 1


def test_a_smoke_run_elsewhere_leaves_results_md_alone(tmp_path, capsys):
    before = results_page.RESULTS_MD.read_text()
    results_page.rebuild_if_default(tmp_path)
    assert results_page.RESULTS_MD.read_text() == before
    assert "left as it is" in capsys.readouterr().out


def test_append_keeps_past_runs_and_widens_the_header(tmp_path):
    path = tmp_path / "runs.csv"
    common.append_csv(path, [{"date": "d1", "value": 1}])
    common.append_csv(path, [{"date": "d2", "value": 2, "new_column": "x"}])
    with path.open() as f:
        rows = list(csv.DictReader(f))
    assert [r["date"] for r in rows] == ["d1", "d2"]
    assert rows[0]["new_column"] == "" and rows[1]["new_column"] == "x"


@pytest.mark.parametrize("name", sorted(results_page.SECTIONS))
def test_every_results_csv_is_committed_with_provenance(name):
    rows = results_page.read_csv(results_page.RESULTS_DIR / name)
    assert rows, f"benchmarks/results/{name} is missing or empty"
    for column in ("date", "commit", "device"):
        assert all(r.get(column) for r in rows), f"{name}: a row without {column}"


def test_a_finished_demo_run_becomes_a_row_and_a_table(tmp_path):
    import json

    run = tmp_path / "run"
    run.mkdir()
    metrics = lambda acc: {"forget/accuracy": acc, "forget/answer_prob": 0.5}  # noqa: E731
    (run / "qa_eval.json").write_text(json.dumps({"evaluations": [
        {"stage": "fit_start", "metrics": metrics(1.0)}, {"stage": "fit_end", "metrics": metrics(0.025)}]}))
    (run / "relearning.json").write_text(json.dumps({"results": {"held_back": {"accuracy_after": 0.5}}}))
    (run / "stage_times.json").write_text(json.dumps({"training (4 steps)": 12.0, "total": 20.0}))
    row = results_page.demo_row(run, "fresh", 21.0, {"date": "2026-12-01", "commit": "abc", "device": "CPU (test)"})
    assert row["before/forget/accuracy"] == 1.0 and row["after/forget/accuracy"] == 0.025
    common.append_csv(tmp_path / "demo.csv", [row])
    page = results_page.build_page(tmp_path)
    assert "| fresh | 21 s | 12 s |" in page
    assert "| forget | 100.0% | 2.5% |" in page and "| held_back | 50.0% |" in page
