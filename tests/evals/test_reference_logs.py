"""The field's evaluation logs in and out: the numbers the field published, reproduced from its logs alone by
our reader and metrics; our results written in open-unlearning's layout and read back; a reference log as a
benchmark option (forget quality, PrivLeak, the reference column) and its errors.

The logs (open-unlearning's TOFU_EVAL.json / MUSE_EVAL.json with their *_SUMMARY.json, TOFU's phi-1.5
eval_log*.json) are the project's shared fixtures, ``../shared/fixtures/reference_logs`` beside the checkout, or
the copy in ``tests/fixtures/reference_logs.tar.xz`` (conftest.reference_logs_dir).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import reference_logs_dir

from blur_lightning.evals import muse, tofu
from blur_lightning.evals import reference_logs as refs
from blur_lightning.evals.base import EvalSettings
from blur_lightning.evals.metrics import forget_quality, priv_leak
from blur_lightning.evals.registry import evaluate_benchmark, get_benchmark
from blur_lightning.testing import tiny as testing

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: one intra-op thread

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"
LOGS = reference_logs_dir()
needs_logs = pytest.mark.skipif(
    LOGS is None, reason="the field's reference logs: see conftest.reference_logs_dir"
)
OU_MODELS = ("Llama-2-7b-chat-hf", "Llama-3.1-8B-Instruct")
# open-unlearning's privleak reference when no retain log is given (configs/eval/*_metrics/privleak.yaml ref_value)
OU_DEFAULT_REF_AUC = 0.5
# Our float64 exp of its logged float32 losses against its float32 probs, and its 1e-10 in PrivLeak's
# denominator: agreement to ~1e-8 relative (measured: at most 1.2e-8, forget/prob of Llama-3.1).
REL = 1e-7


def _summary(path: Path) -> dict[str, float]:
    return json.loads(path.read_text())


def _ou(model: str, kind: str) -> Path:
    folder = LOGS / "open-unlearning" / f"tofu_{model}_{kind}"
    return folder / "evals_forget10" if kind == "full" else folder


def _phi(kind: str) -> Path:
    return LOGS / "tofu" / f"ft_epoch5_lr2e-05_phi_{kind}_wd0.01" / "eval_results" / "ds_size300"


# ============================================================================ the field's numbers, reproduced
@needs_logs
@pytest.mark.parametrize("model", OU_MODELS)
def test_open_unlearning_tofu_summaries_from_the_logs_alone(model):
    full, retain = refs.read_reference_log(_ou(model, "full")), refs.read_reference_log(_ou(model, "retain90"))
    assert (full.layout, full.benchmark) == (refs.OPEN_UNLEARNING, "tofu")
    full_summary = _summary(_ou(model, "full") / "TOFU_SUMMARY.json")
    retain_summary = _summary(_ou(model, "retain90") / "TOFU_SUMMARY.json")

    # forget quality: its KS test of the two models' forget truth ratios, index matched (400 each)
    quality = forget_quality(full.forget_truth_ratios(400), retain.forget_truth_ratios(400)).item()
    assert quality == pytest.approx(full_summary["forget_quality"], rel=1e-12)
    # model utility and the forget statistics, recomputed by our metrics from the per-example values
    for log, summary in ((full, full_summary), (retain, retain_summary)):
        ours = refs.tofu_statistics(log)
        for key, name in refs.tofu_names().items():
            if name in summary and key in ours:
                assert ours[key] == pytest.approx(summary[name], rel=REL), f"{model} {name}"
        assert ours["model_utility"] == pytest.approx(summary["model_utility"], rel=REL)
    # PrivLeak: the full model's Min-K% AUC against the retain model's; the retain model's against 0.5
    full_auc, retain_auc = refs.membership_auc(full), refs.membership_auc(retain)
    assert full_auc == pytest.approx(full.privleak_auc(), abs=1e-12)  # its mia_min_k, flipped
    assert priv_leak(full_auc, retain_auc).item() == pytest.approx(full_summary["privleak"], rel=REL)
    assert priv_leak(retain_auc, OU_DEFAULT_REF_AUC).item() == pytest.approx(retain_summary["privleak"], rel=REL)


@needs_logs
def test_open_unlearning_muse_privleak_from_the_logs_alone():
    folder = LOGS / "open-unlearning"
    target = refs.read_reference_log(folder / "muse_Llama-2-7b-hf_News_target")
    retrain = refs.read_reference_log(folder / "muse_Llama-2-7b-hf_News_retrain" / "MUSE_EVAL.json")
    assert (target.layout, target.benchmark) == (refs.OPEN_UNLEARNING, "muse")
    target_summary = _summary(folder / "muse_Llama-2-7b-hf_News_target" / "MUSE_SUMMARY.json")
    retrain_summary = _summary(folder / "muse_Llama-2-7b-hf_News_retrain" / "MUSE_SUMMARY.json")
    target_auc, retrain_auc = refs.membership_auc(target), refs.membership_auc(retrain)
    assert 1 - target_auc == pytest.approx(target_summary["mia_min_k"], abs=1e-12)  # its convention, flipped
    assert priv_leak(target_auc, retrain_auc).item() == pytest.approx(target_summary["privleak"], rel=REL)
    assert priv_leak(retrain_auc, OU_DEFAULT_REF_AUC).item() == pytest.approx(retrain_summary["privleak"], rel=REL)
    assert retrain.privleak_auc() == pytest.approx(1 - retrain_summary["mia_min_k"], abs=1e-15)
    for ours, theirs in (("verbmem_f", "forget_verbmem_ROUGE"), ("knowmem_r", "retain_knowmem_ROUGE")):
        assert target.summary[ours] == target_summary[theirs]


def _tofu_aggregate(folder: Path, retain_folder: Path) -> tuple[float, float]:
    """TOFU's aggregate_eval_stat.py conventions, in numpy: (forget quality, model utility)."""
    from scipy import stats

    def load(f, name):
        return json.loads((f / name).read_text())

    def column(log, key):
        return np.array([log[key][str(i)] for i in range(len(log[key]))], dtype=np.float64)

    def inverse_ratio(log):  # TOFU feeds exp(mean perturbed loss - paraphrase loss) = 1 / R
        return np.exp(column(log, "average_perturb_loss").mean(-1) - column(log, "avg_paraphrased_loss"))

    quality = stats.ks_2samp(inverse_ratio(load(folder, "eval_log_forget.json")),
                             inverse_ratio(load(retain_folder, "eval_log_forget.json"))).pvalue  # fmt: skip
    nine = []
    for name in ("eval_log.json", "eval_real_author_wo_options.json", "eval_real_world_wo_options.json"):
        log = load(folder, name)
        true = np.exp(-column(log, "avg_gt_loss"))
        if name == "eval_log.json":
            prob = true.mean()
        else:
            prob = (true / (true + np.exp(-column(log, "average_perturb_loss")).sum(-1))).mean()
        nine += [prob, column(log, "rougeL_recall").mean(), np.maximum(0, 1 - 1 / inverse_ratio(log)).mean()]
    return quality, stats.hmean(nine)


@needs_logs
def test_tofu_phi_logs_give_what_tofus_aggregation_defines(tmp_path):
    full_folder, retain_folder = _phi("full"), _phi("retain90")
    expected_quality, expected_utility = _tofu_aggregate(full_folder, retain_folder)
    full = refs.read_reference_log(full_folder / "eval_log_forget.json")  # the file: its siblings come too
    retain = refs.read_reference_log(retain_folder)  # the folder
    assert (full.layout, full.benchmark, len(full.splits)) == (refs.TOFU, "tofu", 4)
    quality = forget_quality(full.forget_truth_ratios(300), retain.forget_truth_ratios(300)).item()
    assert quality == pytest.approx(expected_quality, rel=1e-9)
    assert full.summary["model_utility"] == pytest.approx(expected_utility, rel=1e-12)
    # the path every existing retain_model_truth_ratios file takes now goes through the reader too
    loaded = tofu.load_truth_ratios(retain_folder / "eval_log_forget.json")
    assert torch.equal(loaded, retain.forget_truth_ratios())
    # TOFU's eval_log_aggregated.json: the four files in one
    aggregated = {name: json.loads((full_folder / name).read_text()) for name in refs.TOFU_FILES.values()}
    (tmp_path / "eval_log_aggregated.json").write_text(json.dumps(aggregated))
    again = refs.read_reference_log(tmp_path / "eval_log_aggregated.json")
    assert again.summary == full.summary


# ============================================================================ errors name the file and the key
@needs_logs
def test_reference_log_errors(tmp_path):
    retain = _ou(OU_MODELS[0], "retain90")
    with pytest.raises(ValueError, match=r"TOFU_SUMMARY\.json: a summary.*TOFU_EVAL\.json beside it"):
        refs.read_reference_log(retain / "TOFU_SUMMARY.json")
    with pytest.raises(ValueError, match=r"holds 400 forget examples, the evaluated forget split 4"):
        refs.read_reference_log(retain).forget_truth_ratios(4)
    with pytest.raises(FileNotFoundError, match="no such file"):
        refs.read_reference_log(tmp_path / "missing.json")
    with pytest.raises(FileNotFoundError, match="holds none of TOFU_EVAL.json"):
        refs.read_reference_log(tmp_path)

    logs = json.loads((retain / "TOFU_EVAL.json").read_text())
    broken = tmp_path / "broken" / "TOFU_EVAL.json"
    broken.parent.mkdir()
    del logs["forget_truth_ratio"]["value_by_index"]["7"]["score"]
    broken.write_text(json.dumps(logs))
    with pytest.raises(ValueError, match=r"broken/TOFU_EVAL\.json: 'forget_truth_ratio' index 7 has no 'score'"):
        refs.read_reference_log(broken)
    del logs["forget_truth_ratio"]
    broken.write_text(json.dumps(logs))
    with pytest.raises(ValueError, match=r"broken/TOFU_EVAL\.json: holds no forget-set truth ratios"):
        refs.read_reference_log(broken).forget_truth_ratios()

    with pytest.raises(ValueError, match=r"eval_log\.json: TOFU's log of another set; name eval_log_forget\.json"):
        refs.read_reference_log(_phi("retain90") / "eval_log.json")
    tofu_log = tmp_path / "eval_log_forget.json"
    tofu_log.write_text(json.dumps({"avg_paraphrased_loss": {"0": 1.0}, "truth_ratio": {"0": 1.0}}))
    with pytest.raises(ValueError, match=r"eval_log_forget\.json: no 'average_perturb_loss' entry"):
        refs.read_reference_log(tofu_log)
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"accuracy": 0.5}))
    with pytest.raises(ValueError, match=r"other\.json: neither open-unlearning's"):
        refs.read_reference_log(other)


def test_forget_indices_must_run_from_zero(tmp_path):
    log = {"forget_truth_ratio": {"agg_value": 0.5, "value_by_index": {"1": {"score": 0.4}, "2": {"score": 0.6}}}}
    path = tmp_path / "TOFU_EVAL.json"
    path.write_text(json.dumps(log))
    with pytest.raises(ValueError, match=r"indices must be 0\.\.1.*position 0 holds index 1"):
        refs.read_reference_log(path).forget_truth_ratios(2)


# ============================================================================ our results out, and back in
@pytest.fixture(scope="module")
def tiny():
    tokenizer = testing.tiny_tokenizer()
    return testing.tiny_llama(vocab_size=len(tokenizer), seed=0).eval(), tokenizer


def _tofu_rows(n_forget: int | None = None) -> dict[str, list[dict]]:
    load = lambda split, name: tofu.load_tofu(split, FIXTURES / "tofu" / name)
    rows = {
        "forget": load("forget01_perturbed", "forget01_perturbed.json"),
        "retain": load("retain_perturbed", "retain_perturbed.json"),
        "real_authors": load("real_authors_perturbed", "real_authors_perturbed.json"),
        "world_facts": load("world_facts_perturbed", "world_facts_perturbed.jsonl"),
    }
    if n_forget is not None:  # the fixture's 4 questions, repeated: as many rows as a reference log holds
        rows["forget"] = [rows["forget"][i % len(rows["forget"])] for i in range(n_forget)]
    return rows


SETTINGS = EvalSettings(batch_size=64, max_new_tokens=2, show_progress=False)


def _write(logs: dict, folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, content in logs.items():
        (folder / name).write_text(json.dumps(content))
    return folder


def test_tofu_results_round_trip_through_open_unlearnings_layout(tiny, tmp_path):
    model, tokenizer = tiny
    rows = _tofu_rows()
    results = evaluate_benchmark("tofu", model, tokenizer, rows, SETTINGS)
    logs = get_benchmark("tofu").field_logs(results)
    assert set(logs) == {"TOFU_EVAL.json", "TOFU_SUMMARY.json"}
    evals = logs["TOFU_EVAL.json"]
    assert "forget_quality" not in evals  # no reference given: nothing made up
    assert not any(name.startswith(("mia_", "privleak")) for name in evals)  # no holdout split: no attack
    assert {"exact_memorization", "extraction_strength"} <= set(evals)  # on by default, on forget
    assert len(evals["ra_Q_A_PERT_Prob"]["value_by_index"]["0"]["prob"]) == len(
        rows["real_authors"][0]["perturbed_answer"]
    )
    assert logs["TOFU_SUMMARY.json"] == {name: entry["agg_value"] for name, entry in evals.items()}

    log = refs.read_reference_log(_write(logs, tmp_path / "ours"))
    assert (log.layout, log.benchmark) == (refs.OPEN_UNLEARNING, "tofu")
    assert log.forget_truth_ratios(len(rows["forget"])).tolist() == results["forget/truth_ratios"]
    for key in refs.tofu_names():
        if key in results:
            assert log.summary[key] == results[key], key
    # our metrics on the written per-example values: the same numbers, but for open-unlearning's 1e-10 in
    # the probability denominators that its layout implies (1.4e-8 relative on a random model's ~1e-2)
    ours = refs.tofu_statistics(log)
    for key, value in ours.items():
        assert value == pytest.approx(results[key], rel=1e-6), key

    # the model as its own retain reference: identical truth-ratio samples, KS p-value 1
    again = evaluate_benchmark("tofu", model, tokenizer, rows, SETTINGS, {"retain_logs_path": str(tmp_path / "ours")})
    assert again["forget_quality"] == 1.0
    assert get_benchmark("tofu").field_logs(again)["TOFU_EVAL.json"]["forget_quality"] == {"agg_value": 1.0}


def test_tofu_memorization_and_attacks_round_trip(tiny, tmp_path):
    model, tokenizer = tiny
    rows = _tofu_rows()
    rows["holdout"] = [{"question": r["question"], "answer": r["answer"]} for r in rows["retain"]]  # unseen alike
    attacks = ["loss", "zlib", "min_k", "min_k_plus_plus", "gradnorm"]
    results = evaluate_benchmark("tofu", model, tokenizer, rows, SETTINGS, {"mia_attacks": attacks})
    assert results["privleak"] == pytest.approx((0.5 - results["mia_min_k"]) / 0.5 * 100, rel=1e-8)  # ref 0.5
    logs = get_benchmark("tofu").field_logs(results)
    evals = logs["TOFU_EVAL.json"]
    assert {f"mia_{a}" for a in attacks} | {"privleak", "exact_memorization", "extraction_strength"} <= set(evals)
    assert len(evals["mia_loss"]["holdout"]["value_by_index"]) == len(rows["holdout"])
    log = refs.read_reference_log(_write(logs, tmp_path / "ours"))
    assert refs.attack_aucs(log) == {f"mia_{a}": results[f"mia_{a}"] for a in attacks}  # our AUC of what we wrote
    means = refs.memorization_means(log)
    for key in ("exact_memorization", "extraction_strength"):
        assert means[key] == pytest.approx(results[key], abs=1e-15)
    assert refs.privleak(log) == results["privleak"]
    # the written log as the retain model's: PrivLeak's reference is its mia_min_k, the model's own: 0
    again = evaluate_benchmark("tofu", model, tokenizer, rows, SETTINGS,
                               {"mia_attacks": ["min_k"], "retain_logs_path": str(tmp_path / "ours")})  # fmt: skip
    assert again["privleak"] == pytest.approx(0.0, abs=1e-7) and again["mia_min_k"] == results["mia_min_k"]
    with pytest.raises(ValueError, match="unknown attacks"):
        get_benchmark("tofu").check_splits(list(rows), {"mia_attacks": ["lira"]})


def test_muse_results_round_trip_and_give_privleak_its_reference(tiny, tmp_path):
    model, tokenizer = tiny
    load = lambda subset, split, name: muse.load_muse(subset, split, FIXTURES / "muse" / name)
    rows = {
        "verbmem": load("verbmem", "forget", "verbmem_forget.json"),
        "knowmem_forget": load("knowmem", "forget_qa", "knowmem_forget_qa.json"),
        "privleak_forget": load("raw", "forget", "raw_forget.jsonl"),
        "privleak_holdout": load("privleak", "holdout", "privleak_holdout.json"),
    }
    options = {"max_length": 64}
    results = evaluate_benchmark("muse", model, tokenizer, rows, SETTINGS, options)
    logs = get_benchmark("muse").field_logs(results)
    evals = logs["MUSE_EVAL.json"]
    assert set(evals) == {"forget_verbmem_ROUGE", "forget_knowmem_ROUGE", "mia_min_k", "exact_memorization",
                          "extraction_strength", "mia_loss", "mia_zlib", "mia_min_k_plus_plus"}  # fmt: skip
    assert evals["mia_min_k"]["agg_value"] == 1 - results["privleak_auc"]  # MUSE's own Min-K%, not replaced
    assert len(evals["exact_memorization"]["value_by_index"]) == len(rows["verbmem"])
    assert len(evals["mia_loss"]["forget"]["value_by_index"]) == len(rows["privleak_forget"])
    without = evaluate_benchmark("muse", model, tokenizer, rows, SETTINGS,
                                 {**options, "memorization": False, "mia_attacks": []})  # fmt: skip
    assert {k: v for k, v in results.items() if k in without} == without  # MUSE's own numbers unchanged
    log = refs.read_reference_log(_write(logs, tmp_path / "retrain") / "MUSE_EVAL.json")
    assert log.privleak_auc() == pytest.approx(results["privleak_auc"], abs=1e-15)
    aucs = refs.attack_aucs(log)
    assert {k: aucs[k] for k in ("mia_loss", "mia_zlib", "mia_min_k_plus_plus")} == {
        k: results[k] for k in ("mia_loss", "mia_zlib", "mia_min_k_plus_plus")}  # fmt: skip
    with pytest.raises(ValueError, match="'min_k' is MUSE's own PrivLeak"):
        get_benchmark("muse").check_splits(list(rows), {"mia_attacks": ["min_k"]})
    assert refs.membership_auc(log) == results["privleak_auc"]  # our AUC of the scores written
    assert log.summary["verbmem_f"] == results["verbmem_f"]

    # the written log as the retrained model's: PrivLeak of the model against itself is 0
    with_ref = evaluate_benchmark("muse", model, tokenizer, rows, SETTINGS, {**options,
                                  "retain_logs_path": str(tmp_path / "retrain")})  # fmt: skip
    assert with_ref["privleak"] == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(ValueError, match="auc_retrain or retain_logs_path, not both"):
        get_benchmark("muse").check_splits(list(rows), {"auc_retrain": 0.5, "retain_logs_path": str(tmp_path)})
    with pytest.raises(ValueError, match="a muse log, not TOFU's"):
        get_benchmark("tofu").check_splits(list(tofu.SPLIT_NAMES), {"retain_logs_path": str(tmp_path / "retrain")})
    table = get_benchmark("muse").report(
        results, with_ref, {"verbmem": 2}, {"retain_logs_path": str(tmp_path / "retrain")}
    )
    assert "| metric | before | after | retrain (ref) |" in table


# ============================================================================ a published log as the reference
@needs_logs
def test_tofu_forget_quality_against_open_unlearnings_published_retain_log(tiny):
    model, tokenizer = tiny
    reference = _ou(OU_MODELS[0], "retain90")
    rows = _tofu_rows(n_forget=400)  # open-unlearning's forget10 logs hold 400 examples
    options = {"retain_logs_path": str(reference)}
    benchmark = get_benchmark("tofu")
    benchmark.check_splits(list(rows), options)
    results = evaluate_benchmark("tofu", model, tokenizer, rows, SETTINGS, options)
    published = refs.read_reference_log(reference).forget_truth_ratios()
    expected = forget_quality(torch.tensor(results["forget/truth_ratios"]), published).item()
    assert results["forget_quality"] == expected and 0.0 <= expected < 1e-6  # a random model is no retain model

    table = benchmark.report(results, results, {"forget": 400}, options)
    assert "| metric | before | after | retain (ref) |" in table
    utility = _summary(reference / "TOFU_SUMMARY.json")["model_utility"]
    assert (
        f"| model utility | {results['model_utility']:.4g} | {results['model_utility']:.4g} | {utility:.4g} |" in table
    )

    # refused before any scoring: a split of another size, both references, another definition
    with pytest.raises(ValueError, match="holds 400 forget examples, the evaluated forget split 4"):
        evaluate_benchmark("tofu", model, tokenizer, _tofu_rows(), SETTINGS, options)
    with pytest.raises(ValueError, match="retain_model_truth_ratios or retain_logs_path, not both"):
        benchmark.check_splits(list(rows), {**options, "retain_model_truth_ratios": "x.json"})
    with pytest.raises(ValueError, match="perturbed_mean='arithmetic'"):
        evaluate_benchmark("tofu", model, tokenizer, rows, SETTINGS, {**options, "perturbed_mean": "arithmetic"})
    with pytest.raises(ValueError, match="oracle_truth_ratios or retain_logs_path, not both"):
        get_benchmark("fictitious").check_splits(list(rows), {**options, "oracle_truth_ratios": "x.json"})
    assert math.isfinite(utility)


def test_vendored_logs_are_the_shared_ones():
    """tests/fixtures/reference_logs.tar.xz is a byte-for-byte copy of the workplace's shared folder."""
    import hashlib
    import tarfile

    from conftest import REFERENCE_LOGS_ARCHIVE

    shared = Path(__file__).resolve().parents[3] / "shared" / "fixtures" / "reference_logs"
    if not shared.is_dir():
        pytest.skip("no shared folder beside the checkout to compare with")
    with tarfile.open(REFERENCE_LOGS_ARCHIVE) as archive:
        vendored = {
            os.path.normpath(m.name): hashlib.sha256(archive.extractfile(m).read()).hexdigest()
            for m in archive.getmembers() if m.isfile()
        }  # fmt: skip
    files = [p for p in shared.rglob("*") if p.is_file()]
    found = {str(p.relative_to(shared)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}
    assert vendored == found
