"""The fictitious benchmark: TOFU's metrics on generated facts, forget quality against an oracle's file,
accuracy by the bare value, the paraphrased questions, and its before/after table."""

from __future__ import annotations

import pytest

from blur_lightning.data import fictitious_people as FX
from blur_lightning.data.prompts import chat_prompt_template
from blur_lightning.evals import tofu
from blur_lightning.evals.base import EvalSettings
from blur_lightning.evals.callback import EvaluationCallback
from blur_lightning.evals.fictitious import BENCHMARK
from blur_lightning.evals.registry import BENCHMARKS, evaluate_benchmark
from blur_lightning.testing import tiny as testing

SETTINGS = EvalSettings(batch_size=8, max_new_tokens=4, show_progress=False)


@pytest.fixture(scope="module")
def rows():
    splits = FX.make_splits(20, seed=0, attributes=["birthplace", "birth_year"], n_perturbed=3)
    return {
        "forget": splits["forget10_perturbed"],
        "retain": splits["retain_perturbed"],
        "real_authors": splits["real_authors_perturbed"][:5],
        "world_facts": splits["world_facts_perturbed"][:5],
    }


@pytest.fixture(scope="module")
def model_and_tokenizer():
    tokenizer = testing.tiny_tokenizer()
    return testing.tiny_llama(vocab_size=len(tokenizer), seed=1).eval(), tokenizer


def test_registered_and_strict_about_its_splits_and_options():
    assert BENCHMARKS["fictitious"] is BENCHMARK
    with pytest.raises(ValueError, match="fictitious needs exactly the splits"):
        BENCHMARK.check_splits(["forget", "retain"], {})
    with pytest.raises(ValueError, match="options.oracle_truth_ratios"):
        BENCHMARK.check_splits(list(tofu.SPLIT_NAMES), {"retain_model_truth_ratios": "x.json"})


def test_a_model_against_its_own_ratios_has_forget_quality_one(rows, model_and_tokenizer, tmp_path):
    model, tokenizer = model_and_tokenizer
    template = chat_prompt_template(tokenizer)
    own = tofu.truth_ratios(model, tokenizer, rows["forget"], prompt_template=template, batch_size=3,
                            show_progress=False)  # fmt: skip
    tofu.save_truth_ratios(tmp_path / "oracle.json", own)
    results = evaluate_benchmark("fictitious", model, tokenizer, rows, SETTINGS,
                                 {"oracle_truth_ratios": str(tmp_path / "oracle.json")})  # fmt: skip
    assert results["forget_quality"] == 1.0
    assert results["forget/truth_ratios"] == pytest.approx(own.tolist(), rel=1e-6)
    for key in ("forget/accuracy", "forget/paraphrased_accuracy", "retain/accuracy", "world_facts/accuracy"):
        assert 0.0 <= results[key] <= 1.0, key
    other = [v * 3.0 for v in own.tolist()]  # another model's ratios: a different distribution
    shifted = evaluate_benchmark("fictitious", model, tokenizer, rows, SETTINGS, {"oracle_truth_ratios": other})
    assert shifted["forget_quality"] < 0.05
    without = evaluate_benchmark("fictitious", model, tokenizer, rows, SETTINGS, {"paraphrased": False})
    assert "forget_quality" not in without and "forget/paraphrased_accuracy" not in without


def test_accuracy_counts_generations_that_hold_the_value():
    rows = [{"value": "West Tammyfort"}, {"value": "1907"}, {"value": "Lake Ann"}]
    predictions = ["Ann Lee was born in West Tammyfort.", "She was born in 1970.", "lake ann!"]
    assert tofu._accuracy(rows, predictions) == pytest.approx(2 / 3)
    assert tofu._accuracy([{"answer": "a sentence"}], ["a sentence"]) is None  # TOFU's own rows: no value


def test_rows_without_values_are_refused(rows, model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    bare = {**rows, "forget": [{k: v for k, v in r.items() if k != "value"} for r in rows["forget"]]}
    with pytest.raises(ValueError, match="value"):
        evaluate_benchmark("fictitious", model, tokenizer, bare, SETTINGS, {})


def test_the_table_shows_before_and_after():
    table = BENCHMARK.report({"forget_quality": 0.001, "forget/accuracy": 0.95}, {"forget_quality": 0.4,
                             "forget/accuracy": 0.05}, {"forget": 20})  # fmt: skip
    assert "| forget quality (KS p vs oracle) | 0.001 | 0.4 |" in table
    assert "| forget: accuracy | 95.0% | 5.0% |" in table and "rows: forget 20" in table


def test_max_rows_per_split(tmp_path, rows):
    import json

    paths = {}
    for name, split_rows in rows.items():
        paths[name] = str(tmp_path / f"{name}.jsonl")
        with open(paths[name], "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in split_rows)
    callback = EvaluationCallback("fictitious", paths, stages=["fit_end"], max_rows={"world_facts": 2})
    loaded = callback.rows()
    assert len(loaded["world_facts"]) == 2 and len(loaded["forget"]) == len(rows["forget"])
    with pytest.raises(ValueError, match="max_rows names"):
        EvaluationCallback("fictitious", paths, max_rows={"holdout": 2})
