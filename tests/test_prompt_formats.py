"""Prompt formats against the field's own logs: every TOFU question open-unlearning logged, rendered by our
formats through the published chat templates (tests/fixtures/chat_templates/), character for character."""

from __future__ import annotations

import datetime
import json
from functools import cache
from pathlib import Path

import pytest
from conftest import reference_logs_dir

from blur_lightning.data.encoding import encode_prompts, encode_qa_rows
from blur_lightning.data.prompts import (
    DATE_STRING,
    PROMPT_FORMATS,
    format_qa,
    get_prompt_format,
)
from blur_lightning.losses.functional import IGNORE_INDEX

FIXTURES = Path(__file__).parent / "fixtures"
LOGS = reference_logs_dir()
OU = LOGS / "open-unlearning" if LOGS is not None else None
SPLITS = ("forget_Q_A_ROUGE", "retain_Q_A_ROUGE", "ra_Q_A_ROUGE", "wf_Q_A_ROUGE")
LLAMA3_HEAD = (
    "system\n\nCutting Knowledge Date: December 2023\nToday Date: 10 Apr 2025\n\nYou are a helpful assistant.user\n\n"
)
LLAMA3_TAIL = "assistant\n\n"

needs_logs = pytest.mark.skipif(OU is None, reason="the field's reference logs: see conftest.reference_logs_dir")


@cache
def logged_inputs(model: str, run: str) -> dict[tuple[str, str], str]:
    """(metric, index) -> the prompt open-unlearning logged (special tokens stripped)."""
    path = OU / f"tofu_{model}_{run}" / ("evals_forget10" if run == "full" else "") / "TOFU_EVAL.json"
    data = json.loads(path.read_text())
    return {(m, i): v["input"] for m in SPLITS for i, v in data[m]["value_by_index"].items()}


def _questions_from_llama2(inputs: dict) -> dict:
    out = {}
    for key, text in inputs.items():
        assert text.startswith("[INST] ") and text.endswith(" [/INST]"), text
        out[key] = text[len("[INST] ") : -len(" [/INST]")]
    return out


def _questions_from_llama3(inputs: dict) -> dict:
    out = {}
    for key, text in inputs.items():
        assert text.startswith(LLAMA3_HEAD) and text.endswith(LLAMA3_TAIL), text
        out[key] = text[len(LLAMA3_HEAD) : -len(LLAMA3_TAIL)]
    return out


@cache
def llama_like_tokenizer(family: str):
    """A byte-level BPE tokenizer with the special tokens, bos rule and chat template of a Llama family.

    ``"llama-3.1"`` / ``"llama-3.2"``: ``<|begin_of_text|>`` added as bos, eos ``<|eot_id|>`` (the
    Instruct configs'), the published chat template. ``"llama-2"``: ``<s>`` added as bos, eos ``</s>``.
    Byte-level, so decoding gives back the text exactly: what the logs' ``input`` fields are.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    if family == "llama-2":
        specials, bos, eos = ["<s>", "</s>", "<unk>"], "<s>", "</s>"
    else:
        specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
        bos, eos = "<|begin_of_text|>", "<|eot_id|>"
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    corpus = ["Who wrote the play Romeo and Juliet?", "The author's full name is Hsiao Yun-Hwa."]
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=specials, initial_alphabet=alphabet, show_progress=False
    )
    backend.train_from_iterator(corpus, trainer=trainer)
    backend.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, backend.token_to_id(bos))]
    )
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=bos, eos_token=eos, pad_token=eos)
    if family != "llama-2":
        tok.chat_template = (FIXTURES / "chat_templates" / f"{family}-instruct.jinja").read_text()
    return tok


def _decoded_prompts(tok, questions: dict, fmt: str) -> dict:
    keys = list(questions)
    ids = encode_prompts(tok, [questions[k] for k in keys], prompt_format=fmt)
    assert all(row[0] == tok.bos_token_id and tok.bos_token_id not in row[1:] for row in ids), "one bos, first"
    return dict(zip(keys, tok.batch_decode(ids, skip_special_tokens=True)))


# ----- the field's logs, character for character ---------------------------------------------------------------
@needs_logs
@pytest.mark.parametrize("run", ["full", "retain90"])
@pytest.mark.parametrize("family", ["llama-3.1", "llama-3.2"])
def test_llama3_prompts_are_the_ones_open_unlearning_logged(family, run):
    # the questions come from the Llama-2 log of the same run: the Llama-3 log is only the expected output
    questions = _questions_from_llama2(logged_inputs("Llama-2-7b-chat-hf", run))
    expected = logged_inputs("Llama-3.1-8B-Instruct", run)
    assert set(questions) == set(expected) and len(expected) == 1017  # 400 + 400 + 100 + 117 questions
    rendered = _decoded_prompts(llama_like_tokenizer(family), questions, "open-unlearning/llama3-instruct")
    mismatches = [k for k in expected if rendered[k] != expected[k]]
    assert not mismatches, f"{len(mismatches)} differ, first {mismatches[0]}: {rendered[mismatches[0]]!r}"


@needs_logs
@pytest.mark.parametrize("run", ["full", "retain90"])
def test_llama2_chat_prompts_are_the_ones_open_unlearning_logged(run):
    questions = _questions_from_llama3(logged_inputs("Llama-3.1-8B-Instruct", run))
    expected = logged_inputs("Llama-2-7b-chat-hf", run)
    for fmt in ("open-unlearning/llama2-chat", "tofu/llama2-chat"):  # the same prompt; they differ after the answer
        rendered = _decoded_prompts(llama_like_tokenizer("llama-2"), questions, fmt)
        mismatches = [k for k in expected if rendered[k] != expected[k]]
        assert not mismatches, f"{fmt}: {len(mismatches)} differ, first {mismatches[0]}: {rendered[mismatches[0]]!r}"


@needs_logs
def test_tofu_phi_prompt_is_tofus_own():
    """TOFU's phi log: its generation prompt is "Question: q\\n" and the model writes "Answer: " (logged as the
    start of the generation); TOFU masks only the question, so "Answer: " is scored with the answer."""
    folder = LOGS / "tofu" / "ft_epoch5_lr2e-05_phi_full_wd0.01" / "eval_results" / "ds_size300"
    tok = llama_like_tokenizer("llama-2")
    for name in ("eval_log_forget.json", "eval_real_world_wo_options.json"):
        for logged_input, generation, _ in json.loads((folder / name).read_text())["generated_text"].values():
            question = logged_input.removeprefix("Question: ").removesuffix("\n")
            prompt, answer = format_qa(tok, question, "x", prompt_format="tofu/phi")
            assert (prompt, answer) == (logged_input, "Answer: x") and generation.startswith("Answer: ")


# ----- never today's date ----------------------------------------------------------------------------------------
def test_llama_3_2_prompts_never_carry_todays_date():
    tok = llama_like_tokenizer("llama-3.2")
    today = datetime.datetime.now().strftime("%d %b %Y")
    raw = tok.apply_chat_template([{"role": "user", "content": "Q?"}], add_generation_prompt=True, tokenize=False)
    assert f"Today Date: {today}" in raw  # the template alone: the calendar leaks into the prompt
    for name in ("auto", "chat", "open-unlearning/llama3-instruct"):
        prompt, answer = format_qa(tok, "Q?", "A.", prompt_format=name)
        assert f"Today Date: {DATE_STRING}\n" in prompt and today not in prompt + answer, name
    # ours has no system prompt; open-unlearning's has its own
    assert "You are a helpful assistant." not in format_qa(tok, "Q?", prompt_format="auto")[0]
    assert "You are a helpful assistant." in format_qa(tok, "Q?", prompt_format="open-unlearning/llama3-instruct")[0]


# ----- tokenization as the field's code does it ---------------------------------------------------------------------
# (format, prompt, answer text before eos), written out from the field's code: open-unlearning's
# preprocess_chat_instance (user_start + q + user_end + asst_start, then the response; its asst_end_tag only
# closes in-context examples) and TOFU's convert_raw_data_to_model_format (question tags masked, answer tag
# + answer scored)
Q, A = "Who wrote the play Romeo and Juliet?", "William Shakespeare"
FIELD_TAG_ROWS = [
    ("open-unlearning/llama2-chat", f"[INST] {Q} [/INST]", A),
    ("open-unlearning/question-answer", f"Question: {Q}\nAnswer: ", A),
    ("tofu/llama2-chat", f"[INST] {Q} [/INST]", A),
    ("tofu/phi", f"Question: {Q}\n", f"Answer: {A}"),
]


@pytest.mark.parametrize("name,prompt,answer", FIELD_TAG_ROWS, ids=[r[0] for r in FIELD_TAG_ROWS])
def test_field_tag_formats_tokenize_whole_text_and_end_with_one_eos(name, prompt, answer):
    tok = llama_like_tokenizer("llama-2")
    (row,), _ = encode_qa_rows(tok, [Q], [A], prompt_format=name)
    # the field's rule: the whole text tokenized once (with bos), labels from the prompt's own token count on
    full = tok(prompt + answer)["input_ids"] + [tok.eos_token_id]
    n_prompt = len(tok(prompt)["input_ids"])
    assert row["input_ids"] == full
    assert row["labels"] == [IGNORE_INDEX] * n_prompt + full[n_prompt:]
    assert tok.decode(full[n_prompt:]) == answer + tok.eos_token


def test_llama3_answer_ends_with_the_templates_eot_and_no_second_eos():
    tok = llama_like_tokenizer("llama-3.1")
    (row,), _ = encode_qa_rows(tok, ["Who?"], ["Hsiao Yun-Hwa."], prompt_format="open-unlearning/llama3-instruct")
    answer = [t for t, label in zip(row["input_ids"], row["labels"]) if label != IGNORE_INDEX]
    assert tok.decode(answer) == "Hsiao Yun-Hwa.<|eot_id|>"  # <|eot_id|> is eos: not appended again
    assert row["input_ids"].count(tok.bos_token_id) == 1


def test_scoring_templates_of_a_field_format():
    from blur_lightning.evals.tofu import scoring_format

    tok = llama_like_tokenizer("llama-3.1")
    rendering = scoring_format(tok, "open-unlearning/llama3-instruct")
    assert rendering["whole_text"] and rendering["answer_template"] == "{answer}<|eot_id|>"
    # the template writes <|begin_of_text|>: scored as rendered, without the tokenizer's own (as trained)
    assert rendering["prompt_template"].startswith("<|begin_of_text|><|start_header_id|>system")
    assert rendering["prompt_template"].endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")
    assert rendering["specials"] is False
    assert scoring_format(llama_like_tokenizer("llama-2"), "tofu/phi") == {
        "prompt_template": "Question: {question}\n", "answer_template": "Answer: {answer}", "whole_text": True,
        "specials": True,
    }  # fmt: skip


def test_tofu_scores_exactly_the_trained_tokens():
    """The TOFU evaluation's scored row for an answer is the training row, for the field's formats."""
    from blur_lightning.data.encoding import encode_continuations
    from blur_lightning.evals.tofu import scoring_format

    for family, name in (("llama-3.1", "open-unlearning/llama3-instruct"), ("llama-2", "tofu/phi"),
                         ("llama-2", "open-unlearning/llama2-chat")):  # fmt: skip
        tok = llama_like_tokenizer(family)
        rendering = scoring_format(tok, name)
        (scored,) = encode_continuations(
            tok, [rendering["prompt_template"].format(question=Q)], [rendering["answer_template"].format(answer=A)],
            append_eos=True, whole_text=rendering["whole_text"], specials=rendering["specials"],
        )  # fmt: skip
        (trained,), _ = encode_qa_rows(tok, [Q], [A], prompt_format=name)
        assert scored == trained, name


# ----- names and errors --------------------------------------------------------------------------------------------
def test_every_format_renders_or_refuses_by_name():
    chat, plain = llama_like_tokenizer("llama-3.1"), llama_like_tokenizer("llama-2")
    for name, fmt in PROMPT_FORMATS.items():
        assert fmt.name == name and fmt.source
        prompt, answer = format_qa(chat, "Q?", "A.", prompt_format=name)
        assert "Q?" in prompt and answer.startswith(("A.", " A.", "Answer: A."))
        if fmt.chat_template:
            with pytest.raises(ValueError, match=f"prompt_format {name!r} renders the tokenizer's chat template"):
                format_qa(plain, "Q?", prompt_format=name)
    assert format_qa(plain, "Q?", prompt_format="auto")[0] == "Question: Q?\nAnswer:"  # no template: ours


def test_unknown_format_names_the_known_ones(tmp_path):
    from blur_lightning.data.datamodule import ForgetRetainDataModule
    from blur_lightning.evals.callback import EvaluationCallback

    with pytest.raises(ValueError, match=r"prompt_format: unknown format 'llama3'; expected one of \['auto'"):
        get_prompt_format("llama3")
    with pytest.raises(ValueError, match="prompt_format: unknown format 'llama3'"):
        ForgetRetainDataModule(prompt_format="llama3")
    with pytest.raises(ValueError, match="prompt_format: unknown format 'llama3'"):
        EvaluationCallback("qa", {"a": str(tmp_path / "a.jsonl")}, prompt_format="llama3")
    with pytest.raises(ValueError, match="use_chat_template=False and prompt_format='tofu/phi' both given"):
        ForgetRetainDataModule(prompt_format="tofu/phi", use_chat_template=False)
    legacy = ForgetRetainDataModule(use_chat_template=False)  # the deprecated switch
    assert legacy.prompt_format == "qa"
    assert ForgetRetainDataModule(**legacy.hparams).prompt_format == "qa"  # rebuilt from its saved hyperparameters
