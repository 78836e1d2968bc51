"""EvaluationCallback on a tiny model with the fixture files: stages, logging, files, resume,
the registry's dispatch (the same numbers as the benchmarks' own evaluations), specs and errors."""

from __future__ import annotations

import copy
import csv
import json
import math
import os

import lightning.pytorch as pl
import pytest
import torch

from blur_lightning.data.prompts import chat_prompt_template
from blur_lightning.data.rows import parse_hub_spec
from blur_lightning.evals import membership, tofu, wmdp
from blur_lightning.evals import muse as muse_benchmark
from blur_lightning.evals.callback import EvaluationCallback, plot_evaluations
from blur_lightning.evals.registry import BENCHMARKS, get_benchmark

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: one intra-op thread

FIXTURES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "fixtures")
TOFU_FILES = {
    "forget": "tofu/forget01_perturbed.json",
    "retain": "tofu/retain_perturbed.json",
    "real_authors": "tofu/real_authors_perturbed.json",
    "world_facts": "tofu/world_facts_perturbed.jsonl",
}
MUSE_FILES = {
    "verbmem": "muse/verbmem_forget.json",
    "knowmem_forget": "muse/knowmem_forget_qa.json",
    "knowmem_retain": "muse/knowmem_retain_qa.json",
    "privleak_forget": "muse/raw_forget.jsonl",
    "privleak_holdout": "muse/privleak_holdout.json",
}


def fixture_paths(files: dict[str, str]) -> dict[str, str]:
    return {name: os.path.join(FIXTURES, path) for name, path in files.items()}


@pytest.fixture(scope="module")
def tokenizer():
    from blur_lightning.testing.tiny import tiny_tokenizer

    return tiny_tokenizer()


@pytest.fixture
def tiny_model(tokenizer):
    from blur_lightning.testing.tiny import tiny_llama

    return tiny_llama(vocab_size=len(tokenizer))


def tiny_fit(tmp_path, tokenizer, model, callback, max_steps=2, ckpt_path=None, precision="32-true", **data_kwargs):
    from lightning.pytorch.loggers import CSVLogger

    from blur_lightning.data.datamodule import ForgetRetainDataModule
    from blur_lightning.training.unlearner import BLURUnlearner

    module = BLURUnlearner(model, forget_loss="ga", export_dir=None,
                           optimizer=lambda p: torch.optim.SGD(p, lr=0.05))  # fmt: skip
    module.tokenizer = tokenizer
    data = ForgetRetainDataModule(
        forget_path=os.path.join(FIXTURES, "qa", "forget.jsonl"),
        retain_path=os.path.join(FIXTURES, "qa", "retain.jsonl"),
        tokenizer="unused", batch_size=8, max_length=48, **data_kwargs,
    )  # fmt: skip
    data.set_tokenizer(tokenizer)
    trainer = pl.Trainer(
        accelerator="cpu", max_steps=max_steps, val_check_interval=1, check_val_every_n_epoch=None,
        num_sanity_val_steps=2, logger=CSVLogger(tmp_path, name="", version=""), default_root_dir=tmp_path,
        enable_progress_bar=False, enable_model_summary=False, callbacks=[callback],
        enable_checkpointing=ckpt_path is None, precision=precision,
    )  # fmt: skip
    trainer.fit(module, datamodule=data, ckpt_path=ckpt_path)
    return trainer, module, data


# ============================================================================ in a run
def test_qa_eval_at_every_stage_logs_and_writes_files(tmp_path, tokenizer, tiny_model):
    splits = {
        "forget": os.path.join(FIXTURES, "qa", "forget.jsonl"),
        "retain": os.path.join(FIXTURES, "qa", "retain.jsonl"),
    }
    callback = EvaluationCallback("qa", splits, stages=["fit_start", "validation", "test", "fit_end"],
                                      max_rows=4, max_new_tokens=3)  # fmt: skip
    trainer, module, data = tiny_fit(tmp_path, tokenizer, tiny_model, callback)
    (test_metrics,) = trainer.test(module, datamodule=data, verbose=False)

    summary = json.loads((tmp_path / "qa_eval.json").read_text())
    assert summary["sizes"] == {"forget": 4, "retain": 4}
    stages = [(e["stage"], e["step"]) for e in summary["evaluations"]]
    # validation after each step (the sanity check is skipped), fit_end before teardown, then test
    assert stages == [("fit_start", 0), ("validation", 1), ("validation", 2), ("fit_end", 2), ("test", 2)]
    for evaluation in summary["evaluations"]:
        assert set(evaluation["metrics"]) == {"forget/accuracy", "forget/answer_prob", "retain/accuracy",
                                              "retain/answer_prob", "exact_memorization",
                                              "extraction_strength"}  # fmt: skip  (no holdout set: no attack)
        for key, value in evaluation["metrics"].items():
            assert 0.0 <= value <= 1.0, f"{evaluation['stage']} {key} = {value}"
            if key.endswith("accuracy"):
                assert value * 4 == round(value * 4), f"{key} = {value}: not a share of 4 questions"
    # gradient ascent on the forget answers lowers their probability
    first, last = summary["evaluations"][0]["metrics"], summary["evaluations"][3]["metrics"]
    assert last["forget/answer_prob"] < first["forget/answer_prob"]
    # fit_end runs on the trained model, before teardown: the same numbers as the last validation
    assert summary["evaluations"][3]["metrics"] == pytest.approx(summary["evaluations"][2]["metrics"], abs=1e-6)
    assert test_metrics["qa/forget/answer_prob"] == pytest.approx(last["forget/answer_prob"], abs=1e-6)

    with open(tmp_path / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    logged = [(r["step"], r["qa/forget/answer_prob"]) for r in rows if r.get("qa/forget/answer_prob")]
    assert len(logged) == 5, logged  # fit_start, 2 validations, fit_end, test: all reach the logger
    assert float(logged[0][1]) == pytest.approx(first["forget/answer_prob"], rel=1e-6)
    assert (tmp_path / "qa_eval.png").stat().st_size > 5000


def test_resumed_run_keeps_the_fit_start_numbers(tmp_path, tokenizer, tiny_model):
    splits = {"forget": os.path.join(FIXTURES, "qa", "forget.jsonl")}
    first = EvaluationCallback("qa", splits, stages=["fit_start"], max_rows=2, max_new_tokens=2)
    tiny_fit(tmp_path / "a", tokenizer, tiny_model, first, max_steps=1)
    (ckpt,) = list((tmp_path / "a").rglob("*.ckpt"))
    resumed = EvaluationCallback("qa", splits, stages=["fit_start"], max_rows=2, max_new_tokens=2)
    tiny_fit(tmp_path / "b", tokenizer, tiny_model, resumed, max_steps=2, ckpt_path=str(ckpt))
    assert resumed.evaluations == first.evaluations  # restored from the checkpoint, not re-run at step 1


def test_evaluation_runs_in_the_training_precision_with_the_trained_prompts(tmp_path, tokenizer, tiny_model):
    splits = {"forget": os.path.join(FIXTURES, "qa", "forget.jsonl")}
    callback = EvaluationCallback("qa", splits, stages=["fit_start", "fit_end"], max_rows=2, max_new_tokens=2,
                                  cache_fit_start=False)  # fmt: skip
    seen = []  # (autocast dtype or None, lm_head output dtype) of each evaluation
    evaluate = callback.evaluate

    def spy(model, tok, **kwargs):
        outputs = []
        hook = model.lm_head.register_forward_hook(lambda m, i, out: outputs.append(out.dtype))
        try:
            return evaluate(model, tok, **kwargs)
        finally:
            hook.remove()
            autocast = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None
            seen.append((autocast, set(outputs)))

    callback.evaluate = spy
    tiny_fit(tmp_path, tokenizer, tiny_model, callback, max_steps=1, precision="bf16-mixed", prompt_format="qa")
    assert seen == [(torch.bfloat16, {torch.bfloat16})] * 2  # fit start and fit end, both in bf16 autocast
    assert next(tiny_model.parameters()).dtype == torch.float32  # on fp32 weights
    assert callback.settings.prompt_format == "qa"  # the data module's, when the callback names none
    explicit = EvaluationCallback("qa", splits, prompt_format="auto")
    tiny_fit(tmp_path / "b", tokenizer, tiny_model, explicit, max_steps=1, prompt_format="qa")
    assert explicit.settings.prompt_format == "auto"


def test_fit_start_cache_keys_on_the_rendered_prompts_and_precision(tokenizer, tiny_model):
    splits = {"forget": os.path.join(FIXTURES, "qa", "forget.jsonl")}
    auto, qa = (EvaluationCallback("qa", splits, prompt_format=name) for name in ("auto", "qa"))
    key = auto._cache_key(tiny_model, tokenizer)
    assert key == EvaluationCallback("qa", splits, prompt_format="auto")._cache_key(tiny_model, tokenizer)
    assert key != qa._cache_key(tiny_model, tokenizer)
    assert key != auto._cache_key(tiny_model, tokenizer, "bf16-mixed")
    changed = copy.deepcopy(tokenizer)  # same settings, another template text: another prompt, another key
    changed.chat_template = "Prompt: " + tokenizer.chat_template
    assert key != auto._cache_key(tiny_model, changed)


# ============================================================================ benchmark dispatch
def test_tofu_matches_evaluate_tofu_with_the_training_prompt(tokenizer, tiny_model):
    from blur_lightning.data.prompts import format_qa

    callback = EvaluationCallback("tofu", fixture_paths(TOFU_FILES), max_new_tokens=4, batch_size=3)
    results = callback.evaluate(tiny_model, tokenizer)
    template = chat_prompt_template(tokenizer)
    question = "Where was the author Lina Morrow born?"
    assert template.format(question=question) == format_qa(tokenizer, question)[0]  # as the data module trains
    rows = callback.rows()
    expected = tofu.evaluate_tofu(
        tiny_model, tokenizer, rows["forget"], rows["retain"], rows["real_authors"], rows["world_facts"],
        prompt_template=template, max_new_tokens=4, batch_size=3,
        privacy=membership.privacy_options({}, has_holdout=False),  # the benchmark's defaults: EM / ES on forget
    )  # fmt: skip
    assert results == expected and "exact_memorization" in results
    plain = EvaluationCallback("tofu", fixture_paths(TOFU_FILES), max_new_tokens=4, prompt_format="qa")
    assert plain.evaluate(tiny_model, tokenizer)["forget/prob"] != results["forget/prob"]  # TOFU's plain prompt


def test_muse_and_wmdp_match_their_evaluations(tmp_path, tokenizer, tiny_model):
    muse = EvaluationCallback("muse", fixture_paths(MUSE_FILES), max_new_tokens=5, batch_size=2,
                                  options={"auc_retrain": 0.4772, "max_length": 64})  # fmt: skip
    results = muse.evaluate(tiny_model, tokenizer)
    rows = muse.rows()
    expected = muse_benchmark.evaluate_muse(
        tiny_model, tokenizer, verbmem_rows=rows["verbmem"], knowmem_forget_rows=rows["knowmem_forget"],
        knowmem_retain_rows=rows["knowmem_retain"], privleak_forget_rows=rows["privleak_forget"],
        privleak_holdout_rows=rows["privleak_holdout"], auc_retrain=0.4772, max_length=64,
        verbmem_max_new_tokens=5, knowmem_max_new_tokens=5, batch_size=2,
        privacy=muse_benchmark.muse_privacy_options({}, has_holdout=True),
    )  # fmt: skip
    assert results == expected and {k for k in results if not k.endswith("/per_example")} == {
        "verbmem_f",
        "knowmem_f",
        "knowmem_r",
        "privleak_auc",
        "privleak",
        "exact_memorization",
        "extraction_strength",
        "mia_loss",
        "mia_zlib",
        "mia_min_k_plus_plus",
    }

    wmdp_file = os.path.join(FIXTURES, "wmdp", "wmdp-bio.json")
    wmdp_cb = EvaluationCallback("wmdp", {"bio": wmdp_file, "again": wmdp_file},
                                  options={"subjects": {"bio": "biology"}})  # fmt: skip
    out = wmdp_cb.evaluate(tiny_model, tokenizer)
    bio = wmdp.evaluate_wmdp(tiny_model, tokenizer, wmdp.load_wmdp(path=wmdp_file), subject="biology")
    plain = wmdp.evaluate_wmdp(tiny_model, tokenizer, wmdp.load_wmdp(path=wmdp_file))
    assert out == {"bio/accuracy": bio["accuracy"], "again/accuracy": plain["accuracy"]}
    assert wmdp_cb.options == {"subjects": {"bio": "biology"}}  # each evaluation gets its own copy

    # PrivLeak (a percentage) gets its own panel in the plot; the summary holds every evaluation
    scalars = {k: v for k, v in results.items() if not k.endswith("/per_example")}
    muse.evaluations = [{"stage": s, "step": i, "metrics": {**scalars, "privleak": -40.0 + i}} for i, s in
                        enumerate(["fit_start", "validation", "test"])]  # fmt: skip
    json_path, png_path = muse.write(str(tmp_path))
    assert json.loads(open(json_path).read())["sizes"]["verbmem"] == 2
    assert os.path.getsize(png_path) > 5000


def test_model_train_mode_is_restored(tokenizer, tiny_model):
    callback = EvaluationCallback("wmdp", {"bio": os.path.join(FIXTURES, "wmdp", "wmdp-bio.json")})
    tiny_model.train()
    callback.evaluate(tiny_model, tokenizer)
    assert tiny_model.training
    assert all(p.grad is None for p in tiny_model.parameters())


# ============================================================================ specs, prompts, errors
def test_hub_specs(monkeypatch):
    def spec(text, name, options=None):
        benchmark = get_benchmark(name)
        return parse_hub_spec(text, benchmark.repo(options or {}), benchmark.default_split, owner=name)

    assert spec("hub:forget10_perturbed", "tofu") == ("locuslab/TOFU", "forget10_perturbed", "train")
    assert spec("hub:knowmem:forget_qa", "muse", {"corpus": "books"}) == (
        "muse-bench/MUSE-Books", "knowmem", "forget_qa",
    )  # fmt: skip
    assert spec("hub:wmdp-cyber", "wmdp") == ("cais/wmdp", "wmdp-cyber", "test")
    assert spec("hub:cais/mmlu:all:test", "wmdp") == ("cais/mmlu", "all", "test")
    with pytest.raises(ValueError, match="muse needs a split"):
        spec("hub:verbmem", "muse")
    with pytest.raises(ValueError, match="benchmark 'qa' has no default hub dataset"):
        get_benchmark("qa").load("x", "hub:some_config", {})
    with pytest.raises(ValueError, match="expected hub:CONFIG"):
        spec("hub:a:b:c:d", "tofu")
    with pytest.raises(ValueError, match="corpus='poems'"):
        spec("hub:raw:forget", "muse", {"corpus": "poems"})

    import datasets

    calls = []

    def load_dataset(path, name=None, split=None):
        calls.append((path, name, split))
        return datasets.Dataset.from_list([{"question": "q", "answer": "a"}] * 5)

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    assert len(get_benchmark("muse").load("k", "hub:knowmem:retain_qa", {}, limit=3)) == 3
    assert calls == [("muse-bench/MUSE-News", "knowmem", "retain_qa")]


def test_registry_lists_each_benchmark_once():
    assert list(BENCHMARKS) == ["qa", "tofu", "muse", "wmdp", "fictitious"]
    assert all(b.name == name for name, b in BENCHMARKS.items())


def test_chat_prompt_template_drops_a_bos_the_tokenizer_adds(tokenizer):
    class AddsBos:  # a Llama-3-like tokenizer: the template writes <bos>, and so does tokenization
        chat_template = "x"
        bos_token, bos_token_id = "<bos>", 7

        def apply_chat_template(self, messages, add_generation_prompt, tokenize, **template_kwargs):
            return "<bos><user>{" + messages[0]["content"] + "}<assistant>"

        def __call__(self, text, add_special_tokens):
            return {"input_ids": [7] if add_special_tokens else []}

    assert chat_prompt_template(AddsBos()) == "<user>{{{question}}}<assistant>"
    assert chat_prompt_template(AddsBos()).format(question="Q?") == "<user>{Q?}<assistant>"
    # the tiny tokenizer adds nothing itself: its template's own first token stays
    assert chat_prompt_template(tokenizer).startswith("<|im_start|>user")


def test_configuration_errors(tmp_path):
    with pytest.raises(ValueError, match="benchmark='trivia'"):
        EvaluationCallback("trivia", {"a": "b"})
    with pytest.raises(ValueError, match=r"stages \['epoch_end'\]"):
        EvaluationCallback("qa", {"a": "b"}, stages=["epoch_end"])
    with pytest.raises(ValueError, match="tofu needs exactly the splits"):
        EvaluationCallback("tofu", {"forget": "f"})
    with pytest.raises(ValueError, match="privleak needs both"):
        EvaluationCallback("muse", {"privleak_forget": "f"})
    with pytest.raises(ValueError, match=r"muse splits \['knowmem'\]"):
        EvaluationCallback("muse", {"knowmem": "f"})
    with pytest.raises(ValueError, match="splits is empty"):
        EvaluationCallback("qa", {})
    missing = EvaluationCallback("qa", {"forget": str(tmp_path / "nope.jsonl")})
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        missing.rows()


def test_plot_handles_missing_and_nan_values(tmp_path):
    evaluations = [
        {"stage": "fit_start", "step": 0, "metrics": {"a": 0.5, "b": float("nan")}},
        *({"stage": "validation", "step": i, "metrics": {"a": 0.1 * i, "c": 3.0}} for i in range(1, 9)),
    ]
    plot_evaluations(evaluations, str(tmp_path / "p.png"))
    assert (tmp_path / "p.png").stat().st_size > 5000
    plot_evaluations([], str(tmp_path / "empty.png"))
    assert not (tmp_path / "empty.png").exists()
    assert math.isnan(evaluations[0]["metrics"]["b"])  # inputs untouched


def test_fit_start_results_come_from_the_cache_for_the_same_weights(tmp_path, tokenizer, tiny_model, monkeypatch):
    from blur_lightning.evals import callback as callback_module

    splits = {"forget": os.path.join(FIXTURES, "qa", "forget.jsonl")}
    calls = []
    original = callback_module.evaluate_benchmark
    monkeypatch.setattr(callback_module, "evaluate_benchmark", lambda *a, **k: calls.append(1) or original(*a, **k))

    def run(name, **kwargs):
        callback = EvaluationCallback("qa", splits, stages=["fit_start"], max_rows=2, max_new_tokens=2,
                                      cache_dir=str(tmp_path / "cache"), **kwargs)  # fmt: skip
        # the fixture's model, untouched: the same weights every run (training starts after fit_start)
        tiny_fit(tmp_path / name, tokenizer, copy.deepcopy(tiny_model), callback, max_steps=1)
        return callback.evaluations[0]

    first = run("a")
    second = run("b")
    assert len(calls) == 1 and not first["cached"] and second["cached"]
    assert second["metrics"] == first["metrics"] and second["extras"] == first["extras"]
    forced = run("c", cache_fit_start=False)
    assert len(calls) == 2 and not forced["cached"] and forced["metrics"] == first["metrics"]
    other_rows = EvaluationCallback("qa", splits, stages=["fit_start"], max_rows=1, max_new_tokens=2,
                                    cache_dir=str(tmp_path / "cache"))  # fmt: skip
    tiny_fit(tmp_path / "d", tokenizer, copy.deepcopy(tiny_model), other_rows, max_steps=1)
    assert len(calls) == 3 and not other_rows.evaluations[0]["cached"]  # other rows: a miss


def test_tofu_with_a_reference_log_reports_forget_quality_and_writes_the_fields_layout(tmp_path, tokenizer, tiny_model):
    from blur_lightning.evals.metrics import forget_quality
    from blur_lightning.evals.reference_logs import read_reference_log

    # the reference: this model's own evaluation before training, in open-unlearning's layout
    before = EvaluationCallback("tofu", fixture_paths(TOFU_FILES), max_new_tokens=2, cache_fit_start=False)
    reference = tmp_path / "reference"
    reference.mkdir()
    for name, content in before.spec.field_logs(before.evaluate(tiny_model, tokenizer)).items():
        (reference / name).write_text(json.dumps(content))

    callback = EvaluationCallback("tofu", fixture_paths(TOFU_FILES), stages=["fit_start", "validation", "fit_end"],
                                  max_new_tokens=2, options={"retain_logs_path": str(reference)},
                                  cache_fit_start=False)  # fmt: skip
    tiny_fit(tmp_path / "run", tokenizer, tiny_model, callback)
    summary = json.loads((tmp_path / "run" / "tofu_eval.json").read_text())
    start, end = summary["evaluations"][0], summary["evaluations"][-1]
    assert start["metrics"]["forget_quality"] == 1.0  # the reference model itself
    ratios = read_reference_log(reference).forget_truth_ratios()
    expected = forget_quality(torch.tensor(end["extras"]["forget/truth_ratios"]), ratios).item()
    assert end["stage"] == "fit_end" and end["metrics"]["forget_quality"] == expected
    table = (tmp_path / "run" / "tofu_eval.md").read_text()
    assert "| metric | before | after | retain (ref) |" in table and "| forget quality (KS p vs retain) | 1 |" in table

    written = read_reference_log(tmp_path / "run" / "tofu_eval_fit_end")  # TOFU_EVAL.json of the fit_end evaluation
    assert written.forget_truth_ratios(4).tolist() == end["extras"]["forget/truth_ratios"]
    assert written.summary["forget_quality"] == expected
    assert not (tmp_path / "run" / "tofu_eval_fit_start").exists()  # validation, fit_end and test only
    last_validation = [e for e in summary["evaluations"] if e["stage"] == "validation"][-1]
    validated = read_reference_log(tmp_path / "run" / "tofu_eval_validation")  # the paper configs' end of run
    assert validated.summary["forget_quality"] == last_validation["metrics"]["forget_quality"]
