"""The relearning probe: trains a throwaway copy on half the forget set and measures the other half."""

from __future__ import annotations

import json
import os

import lightning.pytorch as pl
import pytest
import torch

from blur_lightning.data.rows import load_rows
from blur_lightning.evals.relearning import RelearningProbe, relearning_probe, split_halves
from blur_lightning.testing.tiny import tiny_llama, tiny_tokenizer

FIXTURES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "fixtures", "qa")
FORGET = os.path.join(FIXTURES, "forget.jsonl")


def tiny():
    tokenizer = tiny_tokenizer()
    return tiny_llama(vocab_size=len(tokenizer)), tokenizer


def test_split_halves_alternate():
    relearn, held_back = split_halves(list(range(7)))
    assert relearn == [0, 2, 4, 6] and held_back == [1, 3, 5]


def test_probe_trains_a_copy_and_leaves_the_model():
    """The relearned half's answers become likelier (the probe trained), the model passed in is
    bit-identical afterwards, and a probe set keeps only facts the probe never trained on."""
    torch.manual_seed(0)
    model, tokenizer = tiny()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    mode = model.training
    rows = load_rows(FORGET)  # 17 capitals: relearn 9, held back 8
    paraphrased = [{**row, "question": row["question"].replace("What is", "Tell me")} for row in rows]
    results = relearning_probe(
        model, tokenizer, rows, probe_sets={"paraphrased": paraphrased}, steps=8, lr=1e-2, batch_size=4,
        train_column="answer", prob_column=None, max_length=48, max_new_tokens=3,
    )
    assert set(results) == {"relearn", "held_back", "paraphrased"}
    assert (results["relearn"]["n"], results["held_back"]["n"], results["paraphrased"]["n"]) == (9, 8, 8)
    relearn = results["relearn"]
    assert relearn["answer_prob_after"] > 3 * relearn["answer_prob_before"], relearn  # measured: 0.002 -> 0.041
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name]), f"{name} changed: the probe must train a copy"
    assert model.training == mode


def test_probe_bad_arguments():
    model, tokenizer = tiny()
    rows = load_rows(FORGET)
    with pytest.raises(ValueError, match="steps must be >= 1, got 0"):
        relearning_probe(model, tokenizer, rows, steps=0)
    with pytest.raises(ValueError, match="at least 2 forget rows, got 1"):
        relearning_probe(model, tokenizer, rows[:1])
    with pytest.raises(ValueError, match="probe set 'same': no row left"):
        relearning_probe(model, tokenizer, rows, probe_sets={"same": rows[0::2]}, train_column="answer")
    with pytest.raises(ValueError, match=r"missing column\(s\) \['response'\]"):
        RelearningProbe(FORGET)
    retain = os.path.join(FIXTURES, "retain.jsonl")
    RelearningProbe(FORGET, probe_sets={"retain": retain}, train_column="answer")  # question + answer: fine


def test_callback_writes_its_table(tmp_path):
    from test_module import sgd

    from blur_lightning.data.datamodule import ForgetRetainDataModule
    from blur_lightning.training.unlearner import BLURUnlearner

    model, tokenizer = tiny()
    module = BLURUnlearner(model, forget_loss="ga", optimizer=sgd(0.01), export_dir=None)
    module.tokenizer = tokenizer
    data = ForgetRetainDataModule(
        forget_path=FORGET, retain_path=os.path.join(FIXTURES, "retain.jsonl"), tokenizer="unused",
        batch_size=4, max_length=48,
    )
    data.set_tokenizer(tokenizer)
    probe = RelearningProbe(FORGET, probe_sets={"again": FORGET}, steps=2, train_column="answer", max_new_tokens=2)
    trainer = pl.Trainer(accelerator="cpu", max_steps=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
                         callbacks=[probe])
    trainer.fit(module, datamodule=data)
    saved = json.loads((tmp_path / "relearning.json").read_text())
    assert saved["settings"]["steps"] == 2
    assert set(saved["results"]) == {"relearn", "held_back", "again"}
    assert saved["results"]["again"]["n"] == 8  # the relearned answers dropped
    table = (tmp_path / "relearning.md").read_text()
    assert "| held_back | 8 |" in table and "after 2 relearning steps" in table


def test_callback_names_a_probe_set_without_answers(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "q", "reply": "a"}\n')
    with pytest.raises(ValueError, match=r"probe set 'odd' \(.*bad.jsonl\): missing column\(s\) \['answer'\]"):
        RelearningProbe(FORGET, probe_sets={"odd": str(bad)}, train_column="answer")


def test_callback_attacks_the_merged_model_of_a_lora_run(tmp_path, monkeypatch):
    """With LoRA adapters the probe fine-tunes the merged model (every weight), not the adapters alone:
    an attack held to the adapters' subspace would under-report relearning."""
    pytest.importorskip("peft")
    from test_module import sgd

    import blur_lightning.evals.relearning as relearning
    from blur_lightning.data.datamodule import ForgetRetainDataModule
    from blur_lightning.training.unlearner import BLURUnlearner

    attacked = []
    monkeypatch.setattr(relearning, "relearning_probe", lambda model, *a, **k: attacked.append(model) or {})
    model, tokenizer = tiny()
    module = BLURUnlearner(model, forget_loss="ga", optimizer=sgd(0.5), export_dir=None, lora_rank=4)
    module.tokenizer = tokenizer
    data = ForgetRetainDataModule(
        forget_path=FORGET, retain_path=os.path.join(FIXTURES, "retain.jsonl"), tokenizer="unused",
        batch_size=4, max_length=48,
    )
    data.set_tokenizer(tokenizer)
    probe = RelearningProbe(FORGET, steps=2, train_column="answer", max_new_tokens=2)
    probe.table = lambda: ""
    trainer = pl.Trainer(accelerator="cpu", max_steps=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
                         callbacks=[probe])
    trainer.fit(module, datamodule=data)
    (attacker,) = attacked
    assert type(attacker).__name__ == "LlamaForCausalLM"
    assert not any("lora" in n for n, _ in attacker.named_parameters())
    ids = torch.randint(0, 100, (2, 8), generator=torch.Generator().manual_seed(0))
    module.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(attacker(input_ids=ids).logits, module.model(input_ids=ids).logits,
                                   rtol=1e-5, atol=1e-5)


def test_known_before_results_are_reused_not_measured_again(monkeypatch):
    """Given the fit-end evaluation's per-question results, the probe's "before" equals a measured one
    and measures only the sets it was not given."""
    from blur_lightning.evals import qa, relearning

    model, tokenizer = tiny()
    rows = load_rows(FORGET)
    kwargs = dict(steps=2, lr=1e-2, batch_size=4, train_column="answer", prob_column=None, max_new_tokens=4,
                  show_progress=False)
    measured = relearning_probe(model, tokenizer, rows, **kwargs)
    per_example = qa.qa_examples(model, tokenizer, rows, prob_column=None, max_new_tokens=4,
                                 batch_size=32, show_progress=False)  # fmt: skip
    memo = {(r["question"], r["answer"], r["answer"]): (c, p)
            for r, c, p in zip(rows, per_example["correct"], per_example["answer_prob"])}  # fmt: skip
    evaluated = []
    original = relearning.evaluate_qa
    def counting(m, t, r, **k):
        evaluated.append(k["name"])
        return original(m, t, r, **k)

    monkeypatch.setattr(relearning, "evaluate_qa", counting)
    reused = relearning_probe(model, tokenizer, rows, known_before=memo, **kwargs)
    assert not any(name.endswith("before") for name in evaluated), evaluated
    for name in measured:
        for key in ("accuracy_before", "n"):
            assert reused[name][key] == measured[name][key]
        assert reused[name]["answer_prob_before"] == pytest.approx(measured[name]["answer_prob_before"], abs=1e-6)
        assert reused[name]["accuracy_after"] == measured[name]["accuracy_after"]
    evaluated.clear()
    relearning_probe(model, tokenizer, rows, known_before=dict(list(memo.items())[:3]), **kwargs)
    assert "probe relearn before" in evaluated and "probe held_back before" in evaluated  # incomplete: measured


def _probe_rows():
    return load_rows(FORGET)[0::2]


@pytest.mark.parametrize("precision", [None, "bf16-mixed", "16-mixed"])
def test_probe_steps_run_in_the_training_precision(precision):
    """The probe's forwards run under the training run's autocast (bf16 or fp16 linear outputs), and
    "16-mixed" trains through a GradScaler of the probe's own: the weights move, no step is skipped."""
    from blur_lightning.evals.relearning import _fine_tune

    torch.manual_seed(0)
    model, tokenizer = tiny()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    seen = set()
    handle = model.lm_head.register_forward_hook(lambda m, args, out: seen.add(out.dtype))
    skipped = _fine_tune(model, tokenizer, _probe_rows(), steps=2, lr=1e-2, batch_size=4, column="answer",
                         max_length=48, seed=0, prompt_format="auto", show_progress=False,
                         precision=precision)  # fmt: skip
    handle.remove()
    expected = {None: torch.float32, "bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}[precision]
    assert seen == {expected}
    assert skipped == 0
    assert any(not torch.equal(v, before[k]) for k, v in model.state_dict().items()), "the probe must train"


@pytest.mark.parametrize("precision", [None, "bf16-mixed"])
def test_probe_measures_in_the_training_precision(precision):
    """Its before/after evaluations run under the training autocast too, not only its steps."""
    model, tokenizer = tiny()
    seen = []
    handle = model.lm_head.register_forward_hook(lambda m, args, out: seen.append((m.training, out.dtype)))
    relearning_probe(model, tokenizer, load_rows(FORGET)[:4], steps=1, lr=1e-3, batch_size=2, train_column="answer",
                     prob_column=None, max_length=48, max_new_tokens=2, show_progress=False,
                     precision=precision)  # fmt: skip
    handle.remove()
    measured = {dtype for training, dtype in seen if not training}  # the copy trains in train mode
    assert measured == {torch.bfloat16 if precision else torch.float32}


def test_a_non_finite_probe_step_is_skipped_and_touches_nothing():
    """As in training: a NaN loss skips the step (parameters and AdamW state untouched) and is counted;
    before, the probe's loop stepped AdamW on NaN gradients and poisoned every weight."""
    from blur_lightning.evals.relearning import _fine_tune

    model, tokenizer = tiny()
    with torch.no_grad():
        model.lm_head.weight[0, 0] = float("nan")  # every logit row of token 0's column: the loss is NaN
    before = {k: v.clone() for k, v in model.state_dict().items()}
    skipped = _fine_tune(model, tokenizer, _probe_rows(), steps=3, lr=1e-2, batch_size=4, column="answer",
                         max_length=48, seed=0, prompt_format="auto", show_progress=False)  # fmt: skip
    assert skipped == 3
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, before[k], equal_nan=True, rtol=0, atol=0, msg=k)
    with pytest.warns(RuntimeWarning, match="3 of 3 steps skipped"):
        relearning_probe(model, tokenizer, load_rows(FORGET), steps=3, lr=1e-2, batch_size=4,
                         train_column="answer", prob_column=None, max_length=48, max_new_tokens=2)  # fmt: skip
