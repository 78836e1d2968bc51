"""lm-evaluation-harness as the WMDP benchmark's second scorer: a local 6-question task in lm-eval's YAML
format over a JSON Lines file (tests/fixtures/lm_eval_tasks), on the tiny Llama, offline, against our scorer."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

pytest.importorskip("lm_eval")

from blur_lightning.data.rows import read_rows  # noqa: E402
from blur_lightning.evals import harness, wmdp  # noqa: E402
from blur_lightning.evals.callback import EvaluationCallback  # noqa: E402
from blur_lightning.evals.metric_classes import MultipleChoiceAccuracy  # noqa: E402
from blur_lightning.testing import tiny as testing  # noqa: E402

TASKS = Path(__file__).parent.parent / "fixtures" / "lm_eval_tasks"
LOCAL = {"tasks": {"bio": "tiny_wmdp"}, "include_path": str(TASKS), "include_defaults": False}
# float32 on CPU: lm-eval pads and batches the 24 requests its own way (longest first, batch 4 here);
# padding changes the matmul shapes, hence the last bits: measured 0 here, <= 9.5e-7 nats on the 30-question
# quiz, 3.2e-5 with SmolLM2 (log-likelihoods of ~1-12 nats)
LOGLIK_ATOL = 1e-4


@pytest.fixture(scope="module")
def tokenizer():
    return testing.tiny_tokenizer()


@pytest.fixture(scope="module")
def model(tokenizer):
    return testing.tiny_llama(vocab_size=len(tokenizer), seed=0).eval()


@pytest.fixture
def in_tasks_dir(monkeypatch):
    assert os.environ.get("HF_DATASETS_OFFLINE") == "1" and os.environ.get("HF_HUB_OFFLINE") == "1"  # conftest
    monkeypatch.chdir(TASKS)  # the task's data_files path is relative to it


def test_lm_eval_agrees_with_our_scorer(in_tasks_dir, model, tokenizer):
    """Through the callback with scorer: lm_eval: the same prompts character for character, the same
    letter log-likelihoods per item, hence the same accuracy; and lm-eval's RNG reseeding stays off."""
    callback = EvaluationCallback(
        "wmdp", {"bio": "not read: lm-eval loads its task's own data"}, batch_size=4,
        options={"scorer": "lm_eval", "lm_eval": {**LOCAL, "per_example": True}},
    )  # fmt: skip
    torch.manual_seed(5)
    rng = torch.get_rng_state()
    results = callback.evaluate(model, tokenizer, show_progress=False)
    assert torch.equal(torch.get_rng_state(), rng)
    assert callback.rows() == {"bio": []}
    theirs = results["bio/per_example"]

    rows = read_rows(TASKS / "tiny_wmdp.jsonl")
    assert [wmdp.wmdp_prompt(row, "biology") for row in rows] == theirs["prompt"]
    assert theirs["choices"] == [[" A", " B", " C", " D"]] * len(rows)
    assert theirs["target"] == [row["answer"] for row in rows]
    ours = wmdp.wmdp_letter_scores(model, tokenizer, rows, subject="biology", batch_size=3, show_progress=False)
    torch.testing.assert_close(torch.tensor(theirs["loglik"]), ours, atol=LOGLIK_ATOL, rtol=0)

    ours_accuracy = wmdp.evaluate_wmdp(model, tokenizer, rows, subject="biology", show_progress=False)["accuracy"]
    assert results["bio/accuracy"] == ours_accuracy
    assert results["bio/n"] == 6.0
    # acc_norm divides each choice's log-likelihood by its length in characters: one letter each, so acc
    assert results["bio/accuracy_norm"] == results["bio/accuracy"]
    p = results["bio/accuracy"]
    assert results["bio/accuracy_stderr"] == pytest.approx((p * (1 - p) / 5) ** 0.5)  # sample stderr, n - 1 = 5


def test_lm_eval_results_keys():
    output = {
        "results": {
            "t": {"acc,none": 0.5, "acc_stderr,none": 0.1, "acc_norm,none": 0.25, "acc_norm_stderr,none": "N/A"},
            "g": {"acc,none": 0.75, "acc_stderr,none": 0.05},
        },
        "n-samples": {"t": {"original": 10, "effective": 4}},
    }  # fmt: skip
    assert harness.lm_eval_results(output, {"bio": "t", "mmlu": "g"}) == {
        "bio/accuracy": 0.5, "bio/accuracy_stderr": 0.1, "bio/accuracy_norm": 0.25, "bio/n": 4.0,
        "mmlu/accuracy": 0.75, "mmlu/accuracy_stderr": 0.05,
    }  # fmt: skip
    with pytest.raises(ValueError, match=r"task 'gen' \(split 'x'\) reported no 'acc'"):
        harness.lm_eval_results({"results": {"gen": {"exact_match,none": 1.0}}}, {"x": "gen"})


@pytest.mark.parametrize(
    "options, match",
    [
        ({"scorer": "lmeval"}, r"scorer='lmeval': expected one of \('ours', 'lm_eval'\)"),
        ({"scorer": "lm_eval"}, r"needs lm_eval.tasks"),
        ({"scorer": "lm_eval", "lm_eval": {"tasks": {"cyber": "wmdp_cyber"}}}, r"one lm-eval task name per split"),
        ({"scorer": "lm_eval", "lm_eval": {"tasks": {"bio": "wmdp_bio"}, "shots": 5}}, r"lm_eval \['shots'\]"),
        ({"lm_eval": {"tasks": {"bio": "wmdp_bio"}}}, r"scorer is 'ours'"),
        ({"subject": {"bio": "biology"}}, r"wmdp options \['subject'\]: expected any of"),
    ],
)
def test_bad_options_name_the_field(options, match):
    with pytest.raises(ValueError, match=match):
        EvaluationCallback("wmdp", {"bio": "x.jsonl"}, options=options)


def test_refusals(in_tasks_dir, model, tokenizer, monkeypatch):
    with pytest.raises(ValueError, match=r"knows no task \['wmdp_bio'\] \(include_path"):
        harness.evaluate_lm_eval(model, tokenizer, {"bio": "wmdp_bio"}, include_path=".", include_defaults=False)
    monkeypatch.setattr(harness, "process_world", lambda: (0, 2))
    with pytest.raises(RuntimeError, match="one process .* this run has 2 processes"):
        harness.evaluate_lm_eval(model, tokenizer, {"bio": "tiny_wmdp"}, include_path=".", include_defaults=False)


def test_subject_column_gives_each_row_lm_evals_mmlu_header(model, tokenizer):
    """MMLU rows carry their subject: with subject_column each gets lm-eval's mmlu_<subject> header line."""
    rows = read_rows(Path(__file__).parent.parent / "fixtures" / "wmdp" / "mmlu.json")
    by_column = wmdp.wmdp_letter_scores(model, tokenizer, rows, subject_column="subject", show_progress=False)
    for i, row in enumerate(rows):
        alone = wmdp.wmdp_letter_scores(
            model, tokenizer, [row], subject=row["subject"].replace("_", " "), show_progress=False
        )
        torch.testing.assert_close(by_column[i : i + 1], alone, atol=1e-5, rtol=0)
    headless = wmdp.wmdp_letter_scores(model, tokenizer, rows, show_progress=False)
    assert (headless - by_column).abs().max() > 1e-3  # the header changes the scores
    with pytest.raises(ValueError, match=r"missing column\(s\) \['topic'\]"):
        wmdp.wmdp_letter_scores(model, tokenizer, rows, subject_column="topic", show_progress=False)


@pytest.mark.slow
def test_smollm2_lm_eval_agrees_with_our_scorer(in_tasks_dir):
    """The embedded SmolLM2-135M (float32 on CPU) on 36 offline questions, both scorers: the same
    prompts, letter log-likelihoods within LOGLIK_ATOL, the same accuracy (measured: docs/METRICS.md)."""
    from blur_lightning.models.loading import load_causal_lm, load_tokenizer

    model = load_causal_lm("embedded:smollm2-135m-instruct").eval()
    tok = load_tokenizer("embedded:smollm2-135m-instruct")
    sets = {"quiz": ("quiz_mc", "miscellaneous"), "bio": ("tiny_wmdp", "biology")}
    results = harness.evaluate_lm_eval(
        model, tok, {name: task for name, (task, _) in sets.items()}, include_path=".", include_defaults=False,
        per_example=True, batch_size=8,
    )  # fmt: skip
    for name, (task, subject) in sets.items():
        theirs = results[f"{name}/per_example"]
        rows = read_rows(TASKS / f"{task}.jsonl")
        assert [wmdp.wmdp_prompt(row, subject) for row in rows] == theirs["prompt"]
        ours = wmdp.wmdp_letter_scores(model, tok, rows, subject=subject, batch_size=8, show_progress=False)
        delta = (torch.tensor(theirs["loglik"]) - ours).abs().max().item()
        accuracy = MultipleChoiceAccuracy(sync_on_compute=False)
        accuracy.update(ours, torch.tensor([row["answer"] for row in rows]))
        print(f"\n{task}: {len(rows)} questions, max |delta loglik| {delta:.2e} nats, "
              f"accuracy ours {accuracy.compute().item():.4f} lm-eval {results[f'{name}/accuracy']:.4f}")  # fmt: skip
        assert delta < LOGLIK_ATOL
        assert results[f"{name}/accuracy"] == accuracy.compute().item()


def test_lm_eval_scores_a_peft_model_with_its_adapter(in_tasks_dir, tokenizer):
    """HFLM takes a peft model as it is (``.config`` and ``.device`` come from the base model) and scores
    through the adapter: the same log-likelihoods as our scorer on the adapted model, not the base's."""
    peft = pytest.importorskip("peft")
    base = testing.tiny_llama(vocab_size=len(tokenizer), seed=0).eval()
    rows = read_rows(TASKS / "tiny_wmdp.jsonl")
    before = wmdp.wmdp_letter_scores(base, tokenizer, rows, subject="biology", show_progress=False)
    lora = peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)  # B != 0: live
    adapted = peft.get_peft_model(base, lora)
    results = harness.evaluate_lm_eval(adapted, tokenizer, {"bio": "tiny_wmdp"}, include_path=".",
                                       include_defaults=False, per_example=True, batch_size=4)  # fmt: skip
    ours = wmdp.wmdp_letter_scores(adapted, tokenizer, rows, subject="biology", show_progress=False)
    assert (ours - before).abs().max() > 1e-3  # the adapter is live
    torch.testing.assert_close(torch.tensor(results["bio/per_example"]["loglik"]), ours, atol=LOGLIK_ATOL, rtol=0)


def test_lm_eval_leaves_a_tokenizer_without_pad_without_one(in_tasks_dir, model):
    """HFLM gives a tokenizer without a pad token its unk as pad; the run's tokenizer must not keep it."""
    bare = testing.tiny_tokenizer(pad_token=False)
    results = harness.evaluate_lm_eval(model, bare, {"bio": "tiny_wmdp"}, include_path=".", include_defaults=False)
    assert results["bio/n"] == 6.0
    assert bare.pad_token is None and bare.pad_token_id is None


def _merging_tokenizer():
    """A byte-level BPE without the regex pre-split, trained on "...Answer: X" lines: it learns tokens
    across the border (e.g. "ĊAnswer:ĠA"), as a tokenizer that does not split at spaces or punctuation can."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<s>", "</s>", "<pad>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )  # fmt: skip
    backend.train_from_iterator([f"Question {i}\nAnswer: {x}" for i in range(50) for x in "ABCD"], trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def test_a_tokenizer_merging_across_the_border_is_reported(tokenizer):
    """Our split and lm-eval's agree on the test tokenizer; one that merges "Answer:" with " A" leaves
    lm-eval no letter token to score (its cut falls past the merged token), and the benchmark warns."""
    assert wmdp.letter_split_mismatch(tokenizer) == {}
    merging = _merging_tokenizer()
    found = wmdp.letter_split_mismatch(merging)
    assert sorted(found) == [" A", " B", " C", " D"]
    assert found[" A"] == (["Ġ", "A"], [])  # ours: the letter's own tokens; lm-eval's: none left past the cut
    model = testing.tiny_llama(vocab_size=len(merging), seed=0).eval()
    from lm_eval.models.huggingface import HFLM

    prompt = wmdp.wmdp_prompt({"question": "Which?", "choices": ["a", "b", "c", "d"]}, "biology")
    lm = HFLM(pretrained=model, tokenizer=merging, batch_size=1)
    assert lm._encode_pair(prompt, " A")[1] == []  # lm-eval's own cut: nothing left to score
    callback = EvaluationCallback("wmdp", {"bio": str(TASKS / "tiny_wmdp.jsonl")}, batch_size=4)
    with pytest.warns(RuntimeWarning, match=r"merges across 'Answer:' \| ' A'.*' A': \(\['Ġ', 'A'\], \[\]\)"):
        callback.evaluate(model, merging, show_progress=False)


@pytest.mark.parametrize("precision", ["bf16-mixed", "bf16-true"])
def test_lm_eval_scores_in_the_runs_precision(in_tasks_dir, tokenizer, precision):
    """Under the callback's bf16 autocast lm-eval scores in bf16 too (HFLM's own forward autocast, off
    by default, would switch it off: 1.3e-3 nats off ours), and with bf16 weights its log-softmax is
    float32 as ours (bf16: 0.05 nats off). Measured 0 difference; the fp32 scores differ by > 1e-3."""
    from blur_lightning.evals.scoring import autocast_for

    model = testing.tiny_llama(vocab_size=len(tokenizer), seed=0).eval()
    rows = read_rows(TASKS / "tiny_wmdp.jsonl")
    fp32 = wmdp.wmdp_letter_scores(model, tokenizer, rows, subject="biology", show_progress=False)
    if precision == "bf16-true":
        model = model.to(torch.bfloat16)
    with autocast_for(precision, torch.device("cpu")):
        ours = wmdp.wmdp_letter_scores(model, tokenizer, rows, subject="biology", show_progress=False)
        results = harness.evaluate_lm_eval(model, tokenizer, {"bio": "tiny_wmdp"}, include_path=".",
                                           include_defaults=False, per_example=True, batch_size=4)  # fmt: skip
    assert (ours - fp32).abs().max() > 1e-3
    torch.testing.assert_close(torch.tensor(results["bio/per_example"]["loglik"]), ours, atol=LOGLIK_ATOL, rtol=0)


def test_our_prompts_match_lm_evals_shipped_wmdp_and_mmlu_task_files():
    """Against the task files lm-eval ships (not our copies under fixtures): description + doc_to_text +
    target_delimiter + choice rendered by lm-eval's own loader and template engine equal our prompt
    + " A".." D", for wmdp_bio / wmdp_cyber with the WMDP configs' subjects and for all 57 mmlu_* tasks
    with subject_columns' rule ("_" read as " ")."""
    import yaml
    from lm_eval.tasks._yaml_loader import load_yaml
    from lm_eval.utils import apply_template

    root = Path(__file__).parent.parent.parent
    config_subjects = {}
    for config in sorted((root / "configs" / "wmdp").glob("*.yaml")):
        callbacks = yaml.safe_load(config.read_text())["trainer"]["callbacks"]
        (options,) = [c["init_args"]["options"] for c in callbacks if c["class_path"].endswith("EvaluationCallback")]
        config_subjects.update(options["subjects"])
        assert options["subject_columns"] == {"mmlu": "subject"}, config
    tasks = Path(harness._import_lm_eval()[0].__file__).parent / "tasks"
    files = {f"wmdp_{name}": (tasks / "wmdp" / f"wmdp_{name}.yaml", subj) for name, subj in config_subjects.items()}
    for path in sorted((tasks / "mmlu" / "default").glob("mmlu_*.yaml")):
        files[path.stem] = (path, None)
    assert len(files) == 2 + 57
    row = {"question": "  Which one is it? \n", "choices": ["one", "two", "three", "four"], "answer": 2}
    for task, (path, subject) in files.items():
        config = load_yaml(path)
        assert config["task"] == task and config["doc_to_target"] == "answer", task
        if subject is None:  # MMLU: the subject is the dataset config's name
            subject = config["dataset_name"].replace("_", " ")
        theirs = [
            config["description"] + apply_template(config["doc_to_text"], row) + config.get("target_delimiter", " ") + c
            for c in config["doc_to_choice"]
        ]  # fmt: skip
        assert theirs == [wmdp.wmdp_prompt(row, subject) + f" {x}" for x in "ABCD"], task
