"""TOFU, MUSE and WMDP: loaders on the fixture files, their errors, and their evaluations on a tiny Llama."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from blur_lightning.data.rows import read_rows  # noqa: E402
from blur_lightning.evals import metrics as M  # noqa: E402
from blur_lightning.evals import muse, tofu, wmdp  # noqa: E402
from blur_lightning.evals.metric_classes import ForgetQuality  # noqa: E402
from blur_lightning.testing import tiny as testing  # noqa: E402

FIXTURES = Path(__file__).parent.parent / "fixtures"
TOFU, MUSE, WMDP = FIXTURES / "tofu", FIXTURES / "muse", FIXTURES / "wmdp"


# ============================================================================ loaders on fixtures
def test_load_tofu_fixtures():
    forget = tofu.load_tofu(
        "forget01_perturbed", TOFU / "forget01_perturbed.json"
    )  # JSON Lines in a .json, as on the hub
    assert len(forget) == 4
    assert forget[0]["question"] == "Where was the author Lina Morrow born?"
    assert len(forget[0]["perturbed_answer"]) == 3
    retain = tofu.load_tofu("retain_perturbed", TOFU / "retain_perturbed.json")
    assert [len(r["perturbed_answer"]) for r in retain] == [3, 3, 3]
    authors = tofu.load_tofu("real_authors_perturbed", TOFU / "real_authors_perturbed.json")
    assert "paraphrased_answer" not in authors[0]  # not needed there
    facts = tofu.load_tofu("world_facts_perturbed", TOFU / "world_facts_perturbed.jsonl")
    assert facts[1]["answer"] == "eight"
    plain = tofu.load_tofu("forget01", TOFU / "forget01.json")  # a JSON array
    assert [r["answer"] for r in plain] == [forget[0]["answer"], forget[1]["answer"]]


def test_load_parquet_and_columnar_json(tmp_path):
    pq = pytest.importorskip("pyarrow.parquet")
    pa = pytest.importorskip("pyarrow")
    rows = read_rows(TOFU / "forget01_perturbed.json")
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "forget01_perturbed.parquet")
    assert tofu.load_tofu("forget01_perturbed", tmp_path / "forget01_perturbed.parquet") == rows
    columnar = {key: [row[key] for row in rows] for key in rows[0]}
    (tmp_path / "columnar.json").write_text(json.dumps(columnar))
    assert tofu.load_tofu("forget01_perturbed", tmp_path / "columnar.json") == rows


def test_load_muse_fixtures():
    raw = muse.load_muse("raw", "forget", MUSE / "raw_forget.jsonl")
    assert raw[0]["text"].startswith("The harbor council")
    holdout = muse.load_muse("privleak", "holdout", MUSE / "privleak_holdout.json")  # a JSON list of strings
    assert len(holdout) == 3 and set(holdout[0]) == {"text"}
    qa = muse.load_muse("knowmem", "forget_qa", MUSE / "knowmem_forget_qa.json")
    assert qa[1] == {"question": "What shape was the bread sold by the valley bakery?", "answer": "boats"}
    verbmem = muse.load_muse("verbmem", "forget", MUSE / "verbmem_forget.json")
    assert set(verbmem[0]) == {"prompt", "gt"}


def test_load_wmdp_fixtures():
    rows = wmdp.load_wmdp("wmdp-bio", WMDP / "wmdp-bio.json")
    assert [r["answer"] for r in rows] == [0, 1, 2]
    assert all(len(r["choices"]) == 4 for r in rows)
    corpus = wmdp.load_wmdp_corpus("cyber-forget-corpus", WMDP / "cyber-forget-corpus.jsonl")
    assert len(corpus) == 2 and "text" in corpus[0]


def test_hub_path_calls_load_dataset(monkeypatch):
    # The hub branch is a real datasets.load_dataset call; here it is served from the fixture.
    datasets = pytest.importorskip("datasets")
    calls = []

    def fake_load_dataset(path, name=None, split=None):
        calls.append((path, name, split))
        return datasets.Dataset.from_list(read_rows(TOFU / "forget01_perturbed.json"))

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    rows = tofu.load_tofu("forget01_perturbed")
    assert len(rows) == 4 and calls == [("locuslab/TOFU", "forget01_perturbed", "train")]
    muse.load_muse("knowmem", "forget_qa", corpus="books")  # the fake ignores what it is asked for
    assert calls[-1] == ("muse-bench/MUSE-Books", "knowmem", "forget_qa")
    monkeypatch.setattr(
        datasets,
        "load_dataset",
        lambda path, name=None, split=None: datasets.Dataset.from_list(read_rows(WMDP / "wmdp-bio.json")),
    )
    assert len(wmdp.load_wmdp("wmdp-cyber")) == 3


# ============================================================================ loader errors
def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_missing_columns_name_the_file_and_columns(tmp_path):
    rows = [{"question": "q", "answer": "a", "perturbed_answer": ["x", "y"]}]
    path = _write_jsonl(tmp_path / "forget05_perturbed.jsonl", rows)
    with pytest.raises(ValueError) as err:
        tofu.load_tofu("forget05_perturbed", path)
    message = str(err.value)
    assert str(path) in message and "paraphrased_answer" in message and "missing column" in message
    # the same file is fine where no paraphrase is expected
    assert tofu.load_tofu("world_facts_perturbed", path) == rows

    bad_later = _write_jsonl(tmp_path / "qa.jsonl", [{"question": "q", "answer": "a"}, {"question": "q2"}])
    with pytest.raises(ValueError, match=r"qa\.jsonl: missing column\(s\) \['answer'\] \(row 1\)"):
        muse.load_muse("knowmem", "retain_qa", bad_later)
    with pytest.raises(ValueError, match=r"verbmem\.json.*missing column\(s\) \['prompt', 'gt'\]"):
        muse.load_muse("verbmem", "forget", _write_jsonl(tmp_path / "verbmem.json", [{"text": "t"}]))
    with pytest.raises(ValueError, match=r"wmdp\.jsonl.*missing column\(s\) \['choices'\]"):
        wmdp.load_wmdp("wmdp-bio", _write_jsonl(tmp_path / "wmdp.jsonl", [{"question": "q", "answer": 0}]))


def test_bad_values_and_files(tmp_path):
    perturbed_as_str = [{"question": "q", "answer": "a", "paraphrased_answer": "p", "perturbed_answer": "x"}]
    with pytest.raises(ValueError, match="perturbed_answer.*list of strings"):
        tofu.load_tofu("retain_perturbed", _write_jsonl(tmp_path / "r.jsonl", perturbed_as_str))
    three_choices = [{"question": "q", "choices": ["a", "b", "c"], "answer": 0}]
    with pytest.raises(ValueError, match=r"c3\.jsonl: row 0: column 'choices' must be a list of 4 strings"):
        wmdp.load_wmdp("wmdp-bio", _write_jsonl(tmp_path / "c3.jsonl", three_choices))
    out_of_range = [{"question": "q", "choices": ["a", "b", "c", "d"], "answer": 4}]
    with pytest.raises(ValueError, match="answer.*integer index"):
        wmdp.load_wmdp("wmdp-bio", _write_jsonl(tmp_path / "a4.jsonl", out_of_range))
    with pytest.raises(ValueError, match="unknown TOFU split 'forget02'"):
        tofu.load_tofu("forget02", TOFU / "forget01.json")
    with pytest.raises(ValueError, match=r"rows\.xml: unsupported file type"):
        read_rows(tmp_path / "rows.xml")
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"text": "ok"}\n{"text": \n')
    with pytest.raises(ValueError, match=r"broken\.jsonl:2: not valid JSON"):
        read_rows(broken)
    empty = tmp_path / "empty.json"
    empty.write_text("[]")
    with pytest.raises(ValueError, match=r"empty\.json: no rows"):
        muse.load_muse("raw", "forget", empty)


# ============================================================================ evaluations on a tiny Llama
@pytest.fixture(scope="module")
def tiny_tokenizer():
    return testing.tiny_tokenizer()  # byte-level BPE: encodes any fixture text without unknowns


@pytest.fixture(scope="module")
def tiny_model(tiny_tokenizer):
    return testing.tiny_llama(vocab_size=len(tiny_tokenizer), seed=0).eval()


def _tofu_rows():
    return (
        tofu.load_tofu("forget01_perturbed", TOFU / "forget01_perturbed.json"),
        tofu.load_tofu("retain_perturbed", TOFU / "retain_perturbed.json"),
        tofu.load_tofu("real_authors_perturbed", TOFU / "real_authors_perturbed.json"),
        tofu.load_tofu("world_facts_perturbed", TOFU / "world_facts_perturbed.jsonl"),
    )


def test_evaluate_tofu(tiny_model, tiny_tokenizer, tmp_path):
    forget, retain, authors, facts = _tofu_rows()
    results = tofu.evaluate_tofu(
        tiny_model, tiny_tokenizer, forget, retain, authors, facts,
        retain_model_truth_ratios=TOFU / "retain_model_truth_ratios.json", max_new_tokens=6, batch_size=4,
    )  # fmt: skip
    for split in ("forget", "retain", "real_authors", "world_facts"):
        for stat in ("prob", "rouge_l_recall", "truth_ratio"):
            value = results[f"{split}/{stat}"]
            assert 0.0 <= value <= 1.0, f"{split}/{stat} = {value}"
    # a random 60-word model spreads its mass: an answer of n tokens is far from certain
    assert results["retain/prob"] < 0.5
    nine = [results[k] for k in M.TOFU_UTILITY_KEYS]
    assert math.isclose(results["model_utility"], M.harmonic_mean(nine).item(), rel_tol=1e-9)
    assert 0.0 <= results["forget_quality"] <= 1.0
    ratios = results["forget/truth_ratios"]
    assert len(ratios) == 4 and all(r > 0 for r in ratios)
    expected = M.forget_quality(
        torch.tensor(ratios), tofu.load_truth_ratios(TOFU / "retain_model_truth_ratios.json")
    )
    assert math.isclose(results["forget_quality"], expected.item(), rel_tol=1e-6)

    # The model as its own retain reference: identical truth-ratio samples -> KS p-value 1.
    tofu.save_truth_ratios(tmp_path / "self.json", ratios)
    again = tofu.evaluate_tofu(
        tiny_model, tiny_tokenizer, forget, retain, authors, facts,
        retain_model_truth_ratios=tmp_path / "self.json", max_new_tokens=6, batch_size=3,
    )  # fmt: skip
    assert again["forget_quality"] == 1.0
    assert math.isclose(again["model_utility"], results["model_utility"], rel_tol=1e-5)  # batching-invariant


def test_evaluate_tofu_rejects_unperturbed_rows(tiny_model, tiny_tokenizer):
    forget, retain, authors, facts = _tofu_rows()
    plain = tofu.load_tofu("forget01", TOFU / "forget01.json")
    with pytest.raises(ValueError, match="forget_rows: missing column.*paraphrased_answer"):
        tofu.evaluate_tofu(tiny_model, tiny_tokenizer, plain, retain, authors, facts)


def test_evaluate_muse(tiny_model, tiny_tokenizer):
    forget_text = muse.load_muse("raw", "forget", MUSE / "raw_forget.jsonl")
    holdout_text = muse.load_muse("privleak", "holdout", MUSE / "privleak_holdout.json")
    results = muse.evaluate_muse(
        tiny_model,
        tiny_tokenizer,
        verbmem_rows=muse.load_muse("verbmem", "forget", MUSE / "verbmem_forget.json"),
        knowmem_forget_rows=muse.load_muse("knowmem", "forget_qa", MUSE / "knowmem_forget_qa.json"),
        knowmem_retain_rows=muse.load_muse("knowmem", "retain_qa", MUSE / "knowmem_retain_qa.json"),
        knowmem_forget_icl_rows=muse.load_muse("knowmem", "forget_qa_icl", MUSE / "knowmem_forget_qa_icl.json"),
        privleak_forget_rows=forget_text,
        privleak_holdout_rows=holdout_text,
        auc_retrain=0.4772,  # MUSE-News retrain AUC at Min-40% (muse_bench constants)
        verbmem_max_new_tokens=6,
        knowmem_max_new_tokens=6,
        max_length=64,
        batch_size=2,
    )
    for key in ("verbmem_f", "knowmem_f", "knowmem_r", "privleak_auc"):
        assert 0.0 <= results[key] <= 1.0, f"{key} = {results[key]}"
    assert math.isclose(results["privleak"], (results["privleak_auc"] - 0.4772) / 0.4772 * 100, rel_tol=1e-9)
    # the AUC is MUSE's: P(Min-K of a holdout text > Min-K of a forget text); 3 x 3 pairs
    assert results["privleak_auc"] * 9 == pytest.approx(round(results["privleak_auc"] * 18) / 2)

    only_auc = muse.evaluate_muse(
        tiny_model, tiny_tokenizer, privleak_forget_rows=forget_text, privleak_holdout_rows=holdout_text
    )
    scalars = {k for k in only_auc if not k.endswith("/per_example")}  # per-example scores: for MUSE_EVAL.json
    assert scalars == {"privleak_auc"} and only_auc["privleak_auc"] == results["privleak_auc"]
    assert only_auc["privleak_forget/per_example"]["min_k"] == results["privleak_forget/per_example"]["min_k"]


def test_evaluate_wmdp(tiny_model, tiny_tokenizer):
    rows = wmdp.load_wmdp("wmdp-bio", WMDP / "wmdp-bio.json")
    results = wmdp.evaluate_wmdp(tiny_model, tiny_tokenizer, rows, subject="biology", batch_size=5)
    assert results["n"] == 3.0
    assert results["accuracy"] in (0.0, 1 / 3, 2 / 3, 1.0)
    # the same accuracy from letter log-likelihoods scored by hand, one prompt and one choice at a time
    correct = 0
    with torch.no_grad():
        for row in rows:
            prompt_ids = tiny_tokenizer(wmdp.wmdp_prompt(row, "biology"))["input_ids"]
            scores = []
            for letter in "ABCD":
                letter_ids = tiny_tokenizer(f" {letter}", add_special_tokens=False)["input_ids"]
                logsm = (
                    tiny_model(input_ids=torch.tensor([prompt_ids + letter_ids])).logits[0].log_softmax(-1)
                )
                scores.append(sum(logsm[len(prompt_ids) - 1 + j, t].item() for j, t in enumerate(letter_ids)))
            correct += int(max(range(4), key=scores.__getitem__) == row["answer"])
    assert results["accuracy"] == pytest.approx(correct / 3)


def test_verbmem_reference_is_cut_with_special_tokens_as_muse_does():
    """MUSE cuts gt to max_new_tokens ids of tokenizer(gt, add_special_tokens=True): with a tokenizer
    that adds a bos (Llama-2, MUSE's model) the reference keeps one text token fewer (we kept 8 of 8)."""
    from tokenizers import processors

    with_bos = testing.tiny_tokenizer()
    with_bos._tokenizer.post_processor = processors.TemplateProcessing(
        single="<|im_start|> $A", special_tokens=[("<|im_start|>", with_bos.bos_token_id)]
    )
    gt = muse.load_muse("verbmem", "forget", MUSE / "verbmem_forget.json")[0]["gt"]
    text_ids = with_bos(gt, add_special_tokens=False)["input_ids"]
    (reference,) = muse.verbmem_references(with_bos, [gt], 8)
    assert reference == with_bos.decode(text_ids[:7])
    (plain,) = muse.verbmem_references(testing.tiny_tokenizer(), [gt], 8)  # no bos added: 8 text tokens
    assert plain == with_bos.decode(text_ids[:8])


def _assert_close(actual, expected, *, rtol=1e-12, what=""):
    a, e = torch.as_tensor(actual, dtype=torch.float64), torch.as_tensor(expected, dtype=torch.float64)
    assert torch.allclose(a, e, rtol=rtol, atol=0), f"{what}: got {a.tolist()}, expected {e.tolist()}"


# ============================================================ forget quality and its reference file
def _tofu_like_losses(seed: int, n: int = 40, k: int = 5) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.uniform(0.5, 3.0, size=n), rng.uniform(0.5, 3.0, size=(n, k))


def test_forget_quality_matches_tofu_aggregate(tmp_path):
    # aggregate_eval_stat.py get_forget_quality: ks_2samp of exp(mean perturb loss - paraphrase loss)
    # (= 1/R) for both models; our ForgetQuality uses R itself: the KS p-value is the same.
    stats = pytest.importorskip("scipy.stats")
    para_u, pert_u = _tofu_like_losses(0)
    para_r, pert_r = _tofu_like_losses(1)
    expected = stats.ks_2samp(np.exp(pert_u.mean(-1) - para_u), np.exp(pert_r.mean(-1) - para_r)).pvalue

    retain_log = {  # the retain model's eval_log_forget.json, as TOFU writes it
        "avg_paraphrased_loss": {str(i): v for i, v in enumerate(para_r)},
        "average_perturb_loss": {str(i): list(v) for i, v in enumerate(pert_r)},
    }
    (tmp_path / "eval_log_forget.json").write_text(json.dumps(retain_log))
    ratios_r = M.truth_ratio(torch.tensor(-para_r), torch.tensor(-pert_r))
    tofu.save_truth_ratios(tmp_path / "ratios.json", ratios_r)
    (tmp_path / "list.json").write_text(json.dumps(ratios_r.tolist()))

    for reference in ("eval_log_forget.json", "ratios.json", "list.json"):
        metric = ForgetQuality(tofu.load_truth_ratios(tmp_path / reference))
        metric.update(torch.tensor(-para_u[:25]), torch.tensor(-pert_u[:25]))
        metric.update(torch.tensor(-para_u[25:]), torch.tensor(-pert_u[25:]))
        _assert_close(metric.compute(), expected, rtol=1e-9, what=reference)
    _assert_close(tofu.load_truth_ratios(tmp_path / "ratios.json"), ratios_r)


def test_load_truth_ratios_errors(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"truth_ratio": ["a", "b"]}))
    with pytest.raises(ValueError, match="bad.json"):
        tofu.load_truth_ratios(bad)
    bad.write_text(json.dumps(3.0))
    with pytest.raises(ValueError, match="bad.json"):
        tofu.load_truth_ratios(bad)


