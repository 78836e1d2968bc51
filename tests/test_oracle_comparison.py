"""benchmarks/oracle_comparison.py without a model: the run config, the selection rule, dominance, the ledger."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))
import oracle_comparison as OC  # noqa: E402


def test_a_run_config_is_the_user_config_with_the_run_settings(tmp_path):
    folder = tmp_path / "build"
    config = OC.run_config(folder, tmp_path / "run", "graddiff", 1.0, 3e-5, 2, "validation10", OC.FULL)
    model, data = config["model"], config["data"]
    assert (model["forget_loss"], model["mode"], model["gamma"]) == ("ga", "penalty", 1.0)
    assert model["optimizer"]["init_args"]["lr"] == 3e-5 and model["model"] == str(folder / "target")
    assert data["forget_path"] == str(folder / "data" / "validation10.jsonl") and data["seed"] == 2
    assert config["seed_everything"] == 2 and config["trainer"]["max_steps"] == OC.FULL.steps
    classes = [c["class_path"].rsplit(".", 1)[-1] for c in config["trainer"]["callbacks"]]
    assert "RelearningProbe" not in classes and "EvaluationCallback" in classes
    (evaluation,) = [c for c in config["trainer"]["callbacks"] if c["class_path"].endswith("EvaluationCallback")]
    args = evaluation["init_args"]
    assert args["stages"] == ["fit_end"]
    assert args["splits"]["forget"].endswith("validation10_perturbed.jsonl")
    assert args["options"]["oracle_truth_ratios"].endswith("oracle_truth_ratios/validation10.json")


def _ledger(tmp_path, rows):
    ledger = OC.Ledger(tmp_path / "c.csv", "p50-x", OC.FULL)
    for key, values in rows:
        ledger.add(key, values)
    return OC.Ledger(tmp_path / "c.csv", "p50-x", OC.FULL)  # read back from the file


def _val(method, knob, lr, fq, mu):
    key = {"stage": "validation", "split": "validation10", "method": method, "knob": knob, "lr": lr, "seed": 0,
           "steps": 20}  # fmt: skip
    return key, {"forget_quality": fq, "model_utility": mu}


def test_selection_takes_the_best_forget_quality_above_the_utility_floor(tmp_path):
    target = ({"stage": "reference", "split": "validation10", "method": "target", "steps": 0}, {"model_utility": 0.5})
    ledger = _ledger(tmp_path, [
        target,
        _val("blur", 0.1, 1e-5, 0.9, 0.40),   # best forget quality, but under 95 % of 0.5
        _val("blur", 0.3, 1e-5, 0.3, 0.48),
        _val("blur", 1.0, 1e-5, 0.2, 0.49),
        _val("npo_sum", 1.0, 1e-5, 0.5, 0.30),
        _val("npo_sum", 1.0, 3e-5, 0.6, 0.20),  # none above the floor: the highest utility wins
    ])  # fmt: skip
    assert OC.choose(ledger, "blur", 0.95) == (0.3, 1e-5)
    assert OC.choose(ledger, "npo_sum", 0.95) == (1.0, 1e-5)
    assert OC.choose(ledger, "graddiff", 0.95) is None
    assert ledger.find(stage="validation", method="blur", knob=0.3, lr=1e-5) is not None


def test_dominance_needs_one_axis_separated_and_the_other_not_worse():
    def d(lo, hi, n=3):  # a paired difference a - b
        return OC.Interval((lo + hi) / 2, lo, hi, n)

    assert OC.dominates(d(0.1, 0.2), d(-0.1, 0.1))  # better in forget quality, utility not separated
    assert OC.dominates(d(-0.1, 0.1), d(0.01, 0.02))
    assert not OC.dominates(d(0.1, 0.2), d(-0.2, -0.1))  # better on one axis, worse on the other
    assert not OC.dominates(d(-0.1, 0.1), d(0.0, 0.1))  # nothing separated (a CI touching 0 does not)
    assert not OC.dominates(OC.Interval(0.5, None, None, 1), d(0.1, 0.2))  # one seed: no interval


def test_the_summary_reads_the_ledger(tmp_path):
    ref = {"stage": "reference", "split": "forget10", "steps": 0}
    rows = [
        (ref | {"method": "target"}, {"forget_quality": 1e-6, "model_utility": 0.5, "forget_acc": 0.95,
                                      "held_back_acc_after": 0.9}),
        (ref | {"method": "oracle"}, {"forget_quality": 1.0, "model_utility": 0.49, "forget_acc": 0.0,
                                      "held_back_acc_after": 0.1}),
        ({"stage": "reference", "split": "validation10", "method": "target", "steps": 0}, {"model_utility": 0.5}),
        _val("blur", 0.3, 1e-5, 0.3, 0.49),
        _val("graddiff", 1.0, 1e-5, 0.3, 0.49),
        _val("simnpo", 1.0, 3e-5, 0.2, 0.48),  # validated, never tested: named under the table, not dropped
    ]  # fmt: skip
    for seed, (fq_b, fq_g) in enumerate(((0.4, 0.1), (0.6, 0.2), (0.5, 0.15))):
        test = {"stage": "test", "split": "forget10", "knob": None, "lr": 1e-5, "seed": seed, "steps": 20}
        rows.append((test | {"method": "blur", "knob": 0.3}, {"forget_quality": fq_b, "model_utility": 0.49,
                                                              "held_back_acc_after": 0.2}))  # fmt: skip
        rows.append((test | {"method": "graddiff", "knob": 1.0}, {"forget_quality": fq_g, "model_utility": 0.47}))
    ledger = _ledger(tmp_path, rows)
    text = OC.summary(ledger, 0.95, tmp_path / "plot.png")
    # the bootstrap of (0.4, 0.6, 0.5): a resample of all 0.4 (or all 0.6) has chance 1/27 > 2.5 %, so the ends
    assert (
        "| BLUR (forget_lower, NPO + NLL) **(chosen)** | 0.3 | 1e-05 | 3 | 0.5 [0.4, 0.6] | 98.0 [98.0, 98.0] |" in text
    )
    assert "10.0 ± 0.0" in text  # the removal gap: 20 % held back after relearning, the oracle's 10 %
    assert "- GradDiff (GA + NLL): Dominated by BLUR at gamma 0.3: Δ forget quality +0.35 [0.3, 0.4]" in text
    assert "Validated, not yet on the test split: SimNPO + NLL weighted sum (chosen gamma / w 1, lr 3e-05)." in text
    assert (tmp_path / "plot.png").stat().st_size > 0


def test_profiles_keep_the_quick_run_small():
    assert OC.QUICK.steps < OC.FULL.steps and len(OC.QUICK.seeds) == 1 and len(OC.FULL.seeds) >= 3
    assert set(OC.LARGE.methods) == set(OC.METHODS) and set(OC.QUICK.methods) <= set(OC.FULL.methods)
    assert len(OC.LARGE.seeds) >= 5 and OC.LARGE.recipe == "large" and OC.QUICK_LARGE.recipe == "large"
    # every BLUR method has a weighted-sum twin with the same losses and optimizer
    for name in OC.blur_family():
        twin = OC.METHODS[OC.METHODS[name].twin]
        assert (twin.mode, twin.forget_loss, twin.optimizer) == ("penalty", OC.METHODS[name].forget_loss,
                                                                 OC.METHODS[name].optimizer)  # fmt: skip
    with pytest.raises(SystemExit):
        OC.main(["--stages", "nonsense"])


def test_the_twin_table_pairs_blur_and_npo_sum_by_seed(tmp_path):
    ref = {"stage": "reference", "split": "forget10", "steps": 0}
    rows = [
        (ref | {"method": "target"}, {"forget_quality": 1e-6, "model_utility": 0.5}),
        ({"stage": "reference", "split": "validation10", "method": "target", "steps": 0}, {"model_utility": 0.5}),
        _val("blur", 1.0, 1e-5, 0.3, 0.49),
        _val("npo_sum", 1.0, 1e-5, 0.3, 0.49),
    ]
    test = {"stage": "test", "split": "forget10", "lr": 1e-5, "steps": 20}
    # a per-seed offset shared by both (seed 2's data order is easy): BLUR is 0.1 higher on every seed
    for seed, base in enumerate((0.1, 0.2, 0.6)):
        rows.append(
            (
                test | {"method": "blur", "knob": 1.0, "seed": seed},
                {"forget_quality": base + 0.1, "model_utility": 0.45 + seed / 100},
            )
        )
        rows.append(
            (
                test | {"method": "npo_sum", "knob": 1.0, "seed": seed},
                {"forget_quality": base, "model_utility": 0.46 - seed / 100},
            )
        )
    rows.append((test | {"method": "blur", "knob": 0.3, "seed": 0}, {"forget_quality": 0.5, "model_utility": 0.4}))
    text = OC.summary(_ledger(tmp_path, rows), 0.95, None)
    twin = text.split("paired by seed:")[1]
    # forget quality: +0.1 on each seed, the interval the point; utility: -2, +2, +6 points of the target's (0.5)
    assert (
        "| 1 | 1e-05 | 1, 1e-05 (chosen, nearest FQ) | 0, 1, 2 | +0.1 [0.1, 0.1] | BLUR better than npo_sum "
        "| +2.0 [-2.0, 6.0] | not separated |" in twin
    )
    assert (
        "| 0.3 | 1e-05 | 1, 1e-05 (chosen, nearest FQ) | 0 | +0.4 [1 seed: no CI] "
        "| not separated (1 seed: no interval) |" in twin
    )
    assert "gamma 0.3 vs w 1: seeds 1, 2 have no partner run, left out." in twin
    # the goals: utility 90-94 % of the target's misses goal 1; the paired utility interval holds 0 (goal 2)
    assert "1. forget quality >= 0.1 with utility >= 95 % of the target's on every seed: not met" in text
    assert "at the nearest forget quality outside the 95 % CI: no pair separated (1 compared)." in text
    # unpaired, the two forget-quality intervals overlap; only the pairing separates them
    assert "| 3 | 0.4 [0.2, 0.7] |" in text and "| 3 | 0.3 [0.1, 0.6] |" in text


def test_sgd_and_adam_metric_runs_change_only_the_optimizer_and_the_metric(tmp_path):
    folder = tmp_path / "build"
    sgd = OC.run_config(folder, tmp_path / "r", "blur_sgd", 0.3, 1e-2, 1, "validation25", OC.LARGE)["model"]
    assert sgd["optimizer"] == {"class_path": "torch.optim.SGD", "init_args": {"lr": 1e-2}}  # no momentum
    assert (sgd["mode"], sgd["gamma"], sgd["projection_metric"]) == ("forget_lower", 0.3, "identity")
    assert (sgd["gradient_clip_val"], sgd["gradient_clip_algorithm"]) == (OC.SGD_CLIP, "norm")
    adam = OC.run_config(folder, tmp_path / "r", "blur_adam", 1.0, 1e-4, 1, "validation25", OC.LARGE)["model"]
    assert adam["projection_metric"] == "adam" and adam["optimizer"]["class_path"] == "torch.optim.AdamW"
    assert adam["optimizer"]["init_args"]["lr"] == 1e-4
    assert adam.get("gradient_clip_val") is None  # AdamW's rows keep the config's (no clipping)
    assert (
        OC.LARGE.lrs_of("blur_sgd") == OC.SGD_LRS
        and OC.LARGE.lrs_of("npo_sum_sgd") == OC.SGD_LRS
        and OC.LARGE.lrs_of("blur") == OC.LARGE.lrs
    )


def test_the_goals_are_read_from_every_seed(tmp_path):
    ref = {"stage": "reference", "split": "forget25", "steps": 0}
    rows = [
        (ref | {"method": "target"}, {"forget_quality": 1e-6, "model_utility": 0.5}),
        (ref | {"method": "oracle"}, {"forget_quality": 1.0, "model_utility": 0.5, "held_back_acc_after": 0.1}),
        ({"stage": "reference", "split": "validation25", "method": "target", "steps": 0}, {"model_utility": 0.5}),
    ]
    for method in ("blur", "npo_sum"):
        key, values = _val(method, 1.0, 1e-4, 0.3, 0.49)
        rows.append((key | {"split": "validation25"}, values))
    test = {"stage": "test", "split": "forget25", "lr": 1e-4, "steps": 20, "knob": 1.0}
    for seed, fq in enumerate((0.2, 0.3, 0.4, 0.25, 0.35)):
        # BLUR keeps 3 points more utility than its twin on every seed, at the same forget quality
        rows.append((test | {"method": "blur", "seed": seed},
                     {"forget_quality": fq, "model_utility": 0.49 - seed / 1000, "held_back_acc_after": 0.15}))
        rows.append((test | {"method": "npo_sum", "seed": seed},
                     {"forget_quality": fq, "model_utility": 0.475 - seed / 1000}))  # fmt: skip
    ledger = OC.Ledger(tmp_path / "c.csv", "p80-x", OC.LARGE, splits=("validation25", "forget25"))
    for key, values in rows:
        ledger.add(key, values)
    text = OC.summary(OC.Ledger(tmp_path / "c.csv", "p80-x", OC.LARGE, splits=("validation25", "forget25")), 0.95,
                      None)  # fmt: skip
    assert ("1. forget quality >= 0.1 with utility >= 95 % of the target's on every seed: met by blur gamma 1 lr "
            "0.0001 (chosen on validation; 5 of 5 seeds)") in text  # fmt: skip
    assert "yes: blur gamma 1 vs w 1: Δ utility +3.0 [3.0, 3.0] points (chosen on validation; 5 of 5 seeds)" in text
    assert "blur gamma 1: largest gap +5.0 points, within 10 (chosen on validation; 5 of 5 seeds)" in text
    # a seed under the utility floor loses goal 1
    ledger.add(test | {"method": "blur", "seed": 5}, {"forget_quality": 0.5, "model_utility": 0.3})
    again = OC.summary(OC.Ledger(tmp_path / "c.csv", "p80-x", OC.LARGE, splits=("validation25", "forget25")), 0.95,
                       None)  # fmt: skip
    assert "on every seed: not met by any BLUR setting." in again


def test_the_nearest_twin_is_nearest_on_a_log_scale_and_other_budgets_stay_out(tmp_path):
    def point(fq):
        return {"forget_quality_ci": OC.Interval(fq, None, None, 1)}

    twins = [point(1e-8), point(1e-15)]
    assert OC._nearest(point(1e-9), twins) is twins[0]  # a linear distance would pick 1e-15
    ledger = OC.Ledger(tmp_path / "c.csv", "p80-x", OC.LARGE, splits=("validation25", "forget25"))
    key = {"stage": "validation", "split": "validation25", "method": "blur", "knob": 1.0, "lr": 1e-4, "seed": 0}
    ledger.add(key | {"steps": 40}, {"forget_quality": 0.9, "model_utility": 0.5})  # another step budget
    ledger.add(key | {"steps": 20, "knob": 0.3}, {"forget_quality": float("nan"), "model_utility": 0.6})  # diverged
    ledger.add(key | {"steps": 20, "knob": 0.1}, {"forget_quality": 0.0, "model_utility": 0.1})  # 0 is a value
    ledger.add({"stage": "reference", "split": "validation25", "method": "target", "steps": 0}, {"model_utility": 0.5})
    again = OC.Ledger(tmp_path / "c.csv", "p80-x", OC.LARGE, splits=("validation25", "forget25"))
    assert len(again.rows) == 3  # the 40-step row is another setting
    assert OC.choose(again, "blur", 0.95) == (0.1, 1e-4)  # neither the 40-step row nor the NaN one


def test_the_plot_floor_sits_under_every_positive_forget_quality():
    # 80-question runs: the target at 2.45e-18, unlearned runs near 1e-15; a fixed 1e-12 floor drew both on one line
    def point(mean, lo):
        return {"forget_quality_ci": OC.Interval(mean, lo, None if lo is None else 2 * mean, 2)}

    target, oracle = {"forget_quality": "2.45e-18"}, {"forget_quality": "1"}
    assert OC.fq_floor([point(1.4e-15, 3e-16), point(0.2, 0.0)], target, oracle) == pytest.approx(2.45e-19)
    assert OC.fq_floor([point(1e-15, 3e-16)], None, None) == pytest.approx(3e-17)
    assert OC.fq_floor([point(0.0, None), {"forget_quality_ci": None}], {"forget_quality": ""}) == 1e-12


def test_goal_two_says_when_no_pair_has_an_interval_yet():
    def point(method, knob, mu):
        by_seed = {"forget_quality": {0: 1e-15}, "model_utility": {0: mu}, "held_back_acc_after": {}}
        fq = OC.Interval(1e-15, None, None, 1)
        return {"method": method, "knob": knob, "lr": 3e-5, "chosen": True, "forget_quality_ci": fq, "by_seed": by_seed}

    blur = point("blur", 0.3, 0.33)
    text = "\n".join(OC.goals([blur], [blur, point("npo_sum", 3.0, 0.34)], 0.36, 0.0))
    assert "95 % CI: no pair with 2 or more matched seeds yet." in text


def test_utility_differences_under_a_twentieth_of_a_point_keep_two_digits():
    # the large benchmark's twins differed by +3.2e-5 utility (0.009 points of the target's 0.360): ".1f" printed
    # "+0.0 [-0.0, 0.0]", which hides whether the two methods differ at all
    tiny = OC.Interval(3.2e-5, -2.7e-5, 8.7e-5, 5)
    assert OC._signed(tiny, 1 / 0.36, percent=True) == "+0.0089 [-0.0075, 0.024]"
    assert OC._signed(OC.Interval(0.01, 0.005, 0.02, 5), 1 / 0.36, percent=True) == "+2.8 [1.4, 5.6]"
    assert OC._ci(OC.Interval(0.0, 0.0, 0.0, 5), percent=True) == "0.0 [0.0, 0.0]"


def test_a_resumed_run_reruns_a_chosen_test_run_that_lacks_its_probes(tmp_path, monkeypatch):
    # The CSV holds seed 0 probed and seed 1 unprobed (an earlier profile probed one seed); the current profile
    # probes both: seed 1 is run again and its row replaced, seed 0 and the other profile's row stay as they were.
    folder = tmp_path / "build"
    folder.mkdir()
    (folder / "build.json").write_text('{"recipe": {"heldout_percent": 10}}')
    profile = dataclasses.replace(OC.QUICK, seeds=(0, 1), probe_seeds=None)
    runs_dir = tmp_path / "runs"
    OC._save_quant_ratios(OC._quant_path(runs_dir, folder, "oracle", "forget10"), {4: [0.5]})
    csv_path = tmp_path / "c.csv"
    OC.Ledger(csv_path, folder.name, OC.FULL).add(_val("blur", 0.3, 3e-5, 0.2, 0.4)[0], {"forget_quality": 0.2})
    ledger = OC.Ledger(csv_path, folder.name, profile, splits=("validation10", "forget10"))
    ledger.add({"stage": "reference", "split": "validation10", "method": "target", "steps": 0}, {"model_utility": 0.5})
    ledger.add(_val("blur", 0.3, 3e-5, 0.2, 0.49)[0] | {"steps": 4}, {"forget_quality": 0.2, "model_utility": 0.49})
    test = {"stage": "test", "split": "forget10", "method": "blur", "knob": 0.3, "lr": 3e-5, "steps": 4}
    ledger.add(test | {"seed": 0}, {"forget_quality": 0.1, "model_utility": 0.5, "held_back_acc_after": 0.25})
    ledger.add(test | {"seed": 1}, {"forget_quality": 0.1, "model_utility": 0.5})
    calls = []

    def fake_unlearn(folder, run_dir, method, knob, lr, seed, split, profile, probe, oracle_q):
        calls.append((method, seed, probe))
        return {"forget_quality": 0.3, "model_utility": 0.45, "forget_acc": 0.5, "held_back_acc_after": 0.5}

    monkeypatch.setattr(OC, "unlearn", fake_unlearn)
    OC.compare(profile, ["test"], csv_path, runs_dir, 0.95, folder, ["blur"])
    assert calls == [("blur", 1, True)]
    rows = OC._read(csv_path)
    assert [r["profile"] for r in rows].count("full") == 1  # another profile's row is kept
    tests = [(r["seed"], r["forget_quality"], r["held_back_acc_after"]) for r in rows if r["stage"] == "test"]
    assert tests == [("0", "0.1", "0.25"), ("1", "0.3", "0.5")]
    OC.compare(profile, ["test"], csv_path, runs_dir, 0.95, folder, ["blur"])  # now nothing is left to run
    assert calls == [("blur", 1, True)]
