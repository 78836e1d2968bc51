"""The fictitious benchmark end to end on a tiny model: build the target and the oracle (2 fine-tuning steps
each, through `blur-lightning finetune`), save the oracle's truth ratios, unlearn with the user's config
(2 steps), and check what forget quality must be: exactly 1.0 for the oracle against its own file, lower
for the target, which saw the forget people."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from blur_lightning.evals.base import EvalSettings
from blur_lightning.evals.registry import evaluate_benchmark
from blur_lightning.fictitious import build as oracle
from blur_lightning.models.loading import load_causal_lm, load_tokenizer

ROOT = Path(__file__).resolve().parent.parent
# 20 people x 4 facts = 80 rows at batch 40: 2 steps an epoch, one epoch; forget10 = 2 people, 8 facts.
# lr 3e-2 moves a random tiny model far enough in 2 steps that the target's forget truth ratios differ
# from the oracle's (a KS test on 8 values has coarse p-values: 1.0, 0.99, 0.87, 0.52, 0.2...).
TINY = {"people": 20, "epochs": 1, "batch_size": 40, "lr": 3e-2, "max_length": 64}


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    from blur_lightning.testing.tiny import save_tiny_model

    return save_tiny_model(tmp_path_factory.mktemp("tiny_base"))


@pytest.fixture(scope="module")
def recipe(base_dir):
    return oracle.Recipe(base_model=str(base_dir), **TINY)


@pytest.fixture(scope="module")
def built(recipe, tmp_path_factory):
    root = tmp_path_factory.mktemp("builds")
    return oracle.build(recipe, root, quiet=True)


def test_a_build_holds_data_models_ratios_and_its_record(built, recipe):
    for name in ("target", "oracle"):
        assert (built / name / "config.json").is_file() and (built / f"{name}.yaml").is_file()
        assert not (built / f"{name}_run" / "checkpoints").exists()  # deleted once exported
    summary = json.loads((built / "build.json").read_text())
    assert summary["recipe"]["people"] == 20 and summary["version"] == oracle.VERSION
    assert {"target_s", "oracle_s", "oracle_truth_ratios_s"} <= set(summary["times"])
    for split in oracle.ORACLE_SPLITS:
        ratios = json.loads((built / "oracle_truth_ratios" / f"{split}.json").read_text())["truth_ratio"]
        rows = (built / "data" / f"{split}_perturbed.jsonl").read_text().splitlines()
        assert len(ratios) == len(rows) > 0
    # 2 steps each: one epoch of the 80 facts (target) and of the oracle's 64 (16 people) at batch 40
    assert summary["steps"] == {"target": 2, "oracle": 2}
    assert oracle.build(recipe, built.parent) == built  # found, not built again


def test_forget_quality_is_one_for_the_oracle_and_lower_for_the_target(built):
    calibration = json.loads((built / "build.json").read_text())["calibration"]
    assert calibration["oracle"]["forget_quality"] == 1.0
    assert calibration["target"]["forget_quality"] < 1.0
    # the target saw the forget people: their answers are likelier under it than under the oracle
    assert calibration["target"]["forget/prob"] > calibration["oracle"]["forget/prob"]


def test_the_oracle_evaluated_again_matches_its_saved_ratios_exactly(built):
    model, tokenizer = load_causal_lm(str(built / "oracle")), load_tokenizer(str(built / "oracle"))
    rows = oracle.evaluation_rows(built, "validation10", max_world=4)
    options = {"oracle_truth_ratios": str(built / "oracle_truth_ratios" / "validation10.json")}
    results = evaluate_benchmark("fictitious", model.eval(), tokenizer, rows, EvalSettings(batch_size=7,
                                 max_new_tokens=4, show_progress=False), options)  # fmt: skip
    assert results["forget_quality"] == 1.0  # another batch size, same ratios
    assert 0.0 <= results["forget/accuracy"] <= 1.0 and "forget/paraphrased_accuracy" in results


def test_the_user_config_unlearns_the_built_target(built, recipe, tmp_path, monkeypatch):
    from blur_lightning.cli import main
    from blur_lightning.evals.callback import EvaluationCallback
    from blur_lightning.evals.relearning import RelearningProbe

    resolved = []

    def resolve(name, *_):
        resolved.append(name)
        return str(built / name.removeprefix(oracle.PREFIX))

    monkeypatch.setattr(oracle, "resolve", resolve)
    cli = main([
        "fit", "--config", str(ROOT / "configs" / "fictitious" / "forget10.yaml"),
        "--trainer.max_steps", "2", "--trainer.default_root_dir", str(tmp_path),
        "--trainer.logger.init_args.save_dir", str(tmp_path), "--trainer.enable_progress_bar", "false",
        "--data.max_length", "64",
    ])  # fmt: skip
    assert cli.trainer.global_step == 2
    assert "fictitious:target" in resolved and "fictitious:oracle_truth_ratios/forget10.json" in resolved
    callback = next(c for c in cli.trainer.callbacks if isinstance(c, EvaluationCallback))
    before, after = (e["metrics"] for e in callback.evaluations)
    assert before["forget_quality"] < 1.0  # the target, as calibrated
    assert 0.0 <= after["forget_quality"] <= 1.0 and after["forget/prob"] != before["forget/prob"]
    assert (tmp_path / "fictitious_eval.md").read_text().startswith("| metric | before | after |")
    probe = next(c for c in cli.trainer.callbacks if isinstance(c, RelearningProbe))
    assert set(probe.results) == {"relearn", "held_back", "paraphrased"}
    assert probe.results["held_back"]["n"] == 4  # 2 of each forget person's 4 facts


def test_removal_probes_run_on_the_oracle_and_measure_it_against_itself(built):
    pytest.importorskip("torchao")
    from blur_lightning.data.rows import load_rows
    from blur_lightning.evals.removal import fictitious_relearning, quantization_probe

    model, tokenizer = load_causal_lm(str(built / "oracle")), load_tokenizer(str(built / "oracle"))
    rows = load_rows(str(built / "data" / "forget10_perturbed.jsonl"))
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    first = quantization_probe(model, tokenizer, rows, bits=(4,))
    again = quantization_probe(model, tokenizer, rows, bits=(4,), reference_ratios={4: first[4]["truth_ratios"]})
    assert again[4]["forget_quality"] == 1.0 and again[4]["truth_ratios"] == first[4]["truth_ratios"]
    relearning = fictitious_relearning(model, tokenizer, rows, steps=2, lr=1e-2)
    assert set(relearning) == {"relearn", "held_back", "paraphrased"}
    assert relearning["paraphrased"]["n"] == relearning["held_back"]["n"] == 4  # relearned facts' paraphrases dropped
    assert all(torch.equal(weights[k], v) for k, v in model.state_dict().items())  # probes work on copies


def test_fictitious_names_resolve_inside_any_config(tmp_path, monkeypatch):
    monkeypatch.setattr(oracle, "resolve", lambda name, *_: "/built/" + name.removeprefix(oracle.PREFIX))
    config = {"model": {"model": "fictitious:target"}, "callbacks": [{"splits": {"f": "fictitious:data/x.jsonl"}}],
              "other": "embedded:qa_forget.jsonl", "n": 3}  # fmt: skip
    assert oracle.resolve_names(config) == {
        "model": {"model": "/built/target"}, "callbacks": [{"splits": {"f": "/built/data/x.jsonl"}}],
        "other": "embedded:qa_forget.jsonl", "n": 3,
    }  # fmt: skip


@pytest.mark.parametrize(
    "name, match",
    [("fictitious:weights", "NAME under one of"), ("fictitious:data/../../etc", "NAME under one of"),
     ("embedded:x", "not a fictitious:NAME")],
)  # fmt: skip
def test_a_bad_name_says_what_is_expected(name, match):
    with pytest.raises(ValueError, match=match):
        oracle.resolve(name)


@pytest.mark.parametrize(
    "kwargs, match",
    [({"people": 2}, "people: need at least 3"), ({"epochs": 0}, "epochs"), ({"lr": 0.0}, "lr"),
     ({"heldout_percent": 60}, "heldout_percent: expected 10..49")],
)  # fmt: skip
def test_a_bad_recipe_names_the_field(kwargs, match):
    with pytest.raises(ValueError, match=match):
        oracle.Recipe(**kwargs)


def test_a_failed_fine_tune_names_its_config_and_keeps_the_data(tmp_path):
    recipe = oracle.Recipe(base_model=str(tmp_path / "no_such_model"), **TINY)
    with pytest.raises(RuntimeError, match=r"fine-tuning the target failed .*target\.yaml"):
        oracle.build(recipe, tmp_path, quiet=True)
    folder = oracle.build_dir(recipe, tmp_path)
    assert (folder / "data" / "manifest.json").is_file() and not (folder / "build.json").exists()
    assert os.path.isfile(folder / "target.yaml")


def test_the_default_key_is_unchanged_by_the_heldout_field_and_large_names_its_splits():
    # builds made before heldout_percent existed keep their folder (a new key would rebuild 20 minutes)
    assert oracle.Recipe().key() == "p50-s0-4fe66bf93e"
    assert oracle.LARGE.key() != oracle.Recipe(people=80).key()
    assert (oracle.LARGE.forget_split, oracle.LARGE.validation_split) == ("forget25", "validation25")
    assert oracle.LARGE.oracle_splits()[-2:] == ("forget25", "validation25")
    assert oracle.Recipe().oracle_splits() == oracle.ORACLE_SPLITS
