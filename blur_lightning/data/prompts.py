"""How a question becomes a prompt: prompt formats by name, and the one place a chat template is rendered.

A :class:`PromptFormat` says how a model family saw its questions and answers when it was trained
and evaluated. Users name one in YAML (``data.prompt_format``, the evaluation callback's
``prompt_format``); training and every evaluation that asks questions render through it, so the
evaluated prompt is exactly the trained one.

Our own formats:

* ``"auto"`` (the default): the tokenizer's chat template when it has one (no system prompt), else
  ``"qa"``. Chat templates that print a date (Llama 3.x) get the fixed :data:`DATE_STRING`, never
  today's: a prompt that changed at midnight would make the start and the end of one run disagree.
* ``"qa"``: :data:`QA_PROMPT` ``"Question: {question}\\nAnswer:"``; the answer follows as
  ``" {answer}"`` plus eos, so a BPE tokenizer splits it as running text (``"Answer:", " Paris"``).

The field's formats (:data:`PROMPT_FORMATS`), as the reference models were trained and evaluated:

* ``open-unlearning/*``: the ``template_args`` of locuslab/open-unlearning's model configs
  (``configs/model/*.yaml``): for chat models the tokenizer's template with a system prompt and the
  fixed date ``"10 Apr 2025"``; for the others literal tags (their ``asst_end_tag`` only closes
  in-context examples: the scored answer ends with eos). Tokenized as open-unlearning does: the
  whole text at once, the labels starting at the prompt's token count, eos appended when the text
  does not already end with it (its ``preprocess_chat_instance``).
* ``tofu/*``: locuslab/tofu's ``config/model_config.yaml`` tags (Llama-2-chat ``[INST] ... [/INST]``,
  phi ``Question: ...\\n`` then ``Answer: ...``). TOFU's answer tag belongs to the answer: TOFU masks
  only the question's tokens, so ``Answer: `` is trained and scored, and its generation prompt stops
  before it (``convert_raw_data_to_model_format``, ``run_generation``).

:data:`TOFU_PROMPT` ``"Question: {question}\\nAnswer: "`` (trailing space) is TOFU's plain prompt, which
the TOFU evaluation uses under ``"auto"`` for tokenizers without a chat template; MUSE's knowmem
prompt has the same text (:data:`MUSE_QA_PROMPT`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = [
    "DATE_STRING",
    "MUSE_QA_PROMPT",
    "PROMPT_FORMATS",
    "QA_PROMPT",
    "TOFU_PROMPT",
    "PromptFormat",
    "chat_prompt_template",
    "format_qa",
    "get_prompt_format",
    "render_chat_prompt",
]

QA_PROMPT = "Question: {question}\nAnswer:"
TOFU_PROMPT = "Question: {question}\nAnswer: "
MUSE_QA_PROMPT = "Question: {question}\nAnswer: "

# open-unlearning passes this date_string to every chat template that reads one (its Llama 3.x and
# zephyr configs); its published TOFU logs show "Today Date: 10 Apr 2025" in every Llama 3.x prompt.
# Without it, Llama 3.2's template prints strftime_now (today) and 3.1's its own "26 Jul 2024".
DATE_STRING = "10 Apr 2025"
_HELPFUL = "You are a helpful assistant."
_MARKER = "\x00QUESTION\x00"
_ANSWER_MARKER = "\x00ANSWER\x00"


@dataclass(frozen=True)
class PromptFormat:
    """How one model family saw a question and its answer in training and evaluation.

    Attributes:
        name: the registry key.
        chat_template: render through the tokenizer's chat template (True), or with the literal
            tags below (False); None (``"auto"`` only): the template when the tokenizer has one.
        system_prompt: a system turn before the question (chat formats).
        date_string: passed to the chat template (Llama 3.x print it as "Today Date").
        system_prefix: literal text before the first user tag (tag formats).
        user_start: literal text before the question (tag formats).
        user_end: literal text after the question.
        assistant_start: literal text after ``user_end``, the end of the prompt.
        answer_start: literal text before the answer, on the answer's side (TOFU's answer tag).
        answer_space: ``" {answer}"`` with eos as text (our ``"qa"``: BPE splits it as running text).
        whole_text: tokenize prompt + answer as one text and start the labels at the prompt's token
            count (open-unlearning, TOFU); False: tokenize the two apart (an exact label boundary).
        strip_answer_end: drop trailing whitespace after a chat template's answer (ours); the field's
            formats keep what the template writes (Qwen's ``"<|im_end|>\\n"``).
        source: where the format comes from.
    """

    name: str
    chat_template: bool | None
    system_prompt: str | None = None
    date_string: str | None = DATE_STRING
    system_prefix: str = ""
    user_start: str = ""
    user_end: str = ""
    assistant_start: str = ""
    answer_start: str = ""
    answer_space: bool = False
    whole_text: bool = False
    strip_answer_end: bool = False
    source: str = ""

    def resolve(self, tokenizer: Any) -> PromptFormat:
        """This format for ``tokenizer``: ``"auto"`` becomes ``"chat"`` or ``"qa"``; others stay.

        Raises:
            ValueError: a chat format for a tokenizer without a chat template.
        """
        if self.chat_template is None:
            return PROMPT_FORMATS["chat" if has_chat_template(tokenizer) else "qa"]
        if self.chat_template and not has_chat_template(tokenizer):
            raise ValueError(
                f"prompt_format {self.name!r} renders the tokenizer's chat template, but the tokenizer "
                f"{getattr(tokenizer, 'name_or_path', '')!r} has none: pick a tag format ('qa', "
                "'open-unlearning/question-answer', ...) or a tokenizer with a chat template"
            )
        return self

    @property
    def is_field_format(self) -> bool:
        """A format of the field's code (its tokenization and eos rule), not one of ours."""
        return self.whole_text

    def adds_special_tokens(self, tokenizer: Any) -> bool:
        """Whether the prompt is tokenized with the tokenizer's own special tokens (its bos).

        A chat template writes its own (Llama 3: ``<|begin_of_text|>``); tag prompts get the tokenizer's.
        """
        return not self.resolve(tokenizer).chat_template

    def render(self, tokenizer: Any, question: str, answer: str | None = None) -> tuple[str, str]:
        """``(prompt, answer_text)`` of one row: the text before the answer and the answer's own text.

        ``answer_text`` is ``""`` without an answer. Under a chat template it is what the template
        writes after the prompt (the reply and its end-of-turn token); under tags, ``answer_start``
        and the answer (eos follows at the token level); under ``"qa"``, ``" {answer}"`` and eos.
        """
        fmt = self.resolve(tokenizer)
        if fmt.chat_template:
            prompt, reply = render_chat_prompt(
                tokenizer, question, answer, system_prompt=fmt.system_prompt, date_string=fmt.date_string,
                strip=fmt.strip_answer_end,
            )  # fmt: skip
            return prompt, reply
        prompt = fmt.system_prefix + fmt.user_start + question + fmt.user_end + fmt.assistant_start
        if answer is None:
            return prompt, ""
        if fmt.answer_space:
            return prompt, f" {answer}{tokenizer.eos_token or ''}"
        return prompt, fmt.answer_start + answer

    def prompt_template(self, tokenizer: Any, *, strip_bos: bool = False) -> str:
        """A ``{question}`` format string of the prompt, as rendered (to tokenize with
        :meth:`adds_special_tokens`). ``strip_bos``: for scorers that always add the tokenizer's
        special tokens, a bos the chat template writes is dropped when the tokenizer adds one itself
        (Llama 3: one ``<|begin_of_text|>``, not two)."""
        fmt = self.resolve(tokenizer)
        text, _ = fmt.render(tokenizer, _MARKER)
        if fmt.chat_template and strip_bos:
            bos = tokenizer.bos_token
            added = tokenizer("", add_special_tokens=True)["input_ids"]
            if bos and text.startswith(bos) and added[:1] == [tokenizer.bos_token_id]:
                text = text[len(bos) :]
        return _as_format_string(text, _MARKER, "question")

    def answer_template(self, tokenizer: Any) -> str:
        """A ``{answer}`` format string of the answer text after the prompt (see :meth:`render`)."""
        _, text = self.resolve(tokenizer).render(tokenizer, _MARKER, _ANSWER_MARKER)
        return _as_format_string(text, _ANSWER_MARKER, "answer")


def _as_format_string(text: str, marker: str, field: str) -> str:
    return text.replace("{", "{{").replace("}", "}}").replace(marker, "{" + field + "}")


def _tags(name: str, source: str, user_start: str, user_end: str, assistant_start: str,
          answer_start: str = "") -> PromptFormat:  # fmt: skip
    return PromptFormat(
        name=name, chat_template=False, date_string=None, user_start=user_start, user_end=user_end,
        assistant_start=assistant_start, answer_start=answer_start, whole_text=True, source=source,
    )  # fmt: skip


def _chat(name: str, source: str, system_prompt: str | None, date_string: str | None) -> PromptFormat:
    return PromptFormat(
        name=name, chat_template=True, system_prompt=system_prompt, date_string=date_string, whole_text=True,
        source=source,
    )  # fmt: skip


_OU = "locuslab/open-unlearning configs/model/"
_TOFU = "locuslab/tofu config/model_config.yaml: "

PROMPT_FORMATS: dict[str, PromptFormat] = {
    f.name: f
    for f in (
        PromptFormat("auto", chat_template=None, source="ours: 'chat' when the tokenizer has a template, else 'qa'"),
        PromptFormat("chat", chat_template=True, strip_answer_end=True, source="ours: the tokenizer's template"),
        PromptFormat("qa", chat_template=False, date_string=None, user_start="Question: ", user_end="\nAnswer:",
                     answer_space=True, source="ours: QA_PROMPT"),  # fmt: skip
        # Llama-3.1-8B, 3.2-1B and 3.2-3B Instruct: the TOFU and MUSE reference models.
        _chat("open-unlearning/llama3-instruct", _OU + "Llama-3.*-Instruct.yaml", _HELPFUL, DATE_STRING),
        _chat("open-unlearning/qwen2.5-instruct", _OU + "Qwen2.5-*-Instruct.yaml", _HELPFUL, None),
        _chat("open-unlearning/phi-3.5-instruct", _OU + "Phi-3.5-mini-instruct.yaml", _HELPFUL, None),
        _chat("open-unlearning/zephyr", _OU + "zephyr-7b-beta.yaml", _HELPFUL, DATE_STRING),
        _chat("open-unlearning/gemma-it", _OU + "gemma-7b-it.yaml", None, None),
        # Llama-2-7b-chat: no system block; nothing between [/INST] and the answer (open-unlearning
        # found that a space there tokenizes badly at the border).
        _tags("open-unlearning/llama2-chat", _OU + "Llama-2-7b-chat-hf.yaml", "[INST] ", " [/INST]", ""),
        # phi-1.5, Llama-2-7b-hf, Llama-2-13b-hf (MUSE's base models).
        _tags("open-unlearning/question-answer", _OU + "phi-1_5.yaml, Llama-2-*-hf.yaml", "Question: ", "\n",
              "Answer: "),  # fmt: skip
        _tags("tofu/llama2-chat", _TOFU + "llama2-7b", "[INST] ", " [/INST]", ""),
        _tags("tofu/phi", _TOFU + "phi", "Question: ", "\n", "", answer_start="Answer: "),
    )
}


def get_prompt_format(spec: str | PromptFormat) -> PromptFormat:
    """The format named ``spec`` (a :class:`PromptFormat` passes through).

    Raises:
        ValueError: an unknown name (the message lists the known ones).
    """
    if isinstance(spec, PromptFormat):
        return spec
    if spec not in PROMPT_FORMATS:
        raise ValueError(f"prompt_format: unknown format {spec!r}; expected one of {sorted(PROMPT_FORMATS)}")
    return PROMPT_FORMATS[spec]


def has_chat_template(tokenizer: Any) -> bool:
    """Whether the tokenizer carries a chat template."""
    return bool(getattr(tokenizer, "chat_template", None))


def render_chat_prompt(
    tokenizer: Any,
    question: str,
    answer: str | None = None,
    *,
    system_prompt: str | None = None,
    date_string: str | None = DATE_STRING,
    strip: bool = True,
) -> tuple[str, str]:
    """The chat template's rendering of an optional system turn, one user turn and the generation prompt.

    Args:
        system_prompt: a system turn first (None: none; the template may still print its default).
        date_string: the template's ``date_string`` (None: not passed).
        strip: drop the whitespace the template writes after the answer.

    Returns:
        ``(prompt, answer_text)``: the prompt text and the rest of the conversation after it (the
        assistant reply and its end-of-turn token); ``""`` without answer.

    Raises:
        ValueError: the template renders the prompt differently with and without the answer.
    """
    messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
    messages.append({"role": "user", "content": question})
    extra = {} if date_string is None else {"date_string": date_string}
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False, **extra)
    if answer is None:
        return prompt, ""
    full = tokenizer.apply_chat_template(
        messages + [{"role": "assistant", "content": answer}], tokenize=False, **extra
    )
    if not full.startswith(prompt):
        raise ValueError(
            "the chat template renders the prompt differently with and without the answer; "
            "use a tag prompt_format such as 'qa'"
        )
    reply = full[len(prompt) :]
    return prompt, reply.rstrip() if strip else reply


def format_qa(
    tokenizer: Any, question: str, answer: str | None = None, *, prompt_format: str | PromptFormat = "auto"
) -> tuple[str, str]:
    """The prompt text and the answer text of one QA row, as training and evaluation both see them.

    See :meth:`PromptFormat.render`; ``answer_text`` is ``""`` when ``answer`` is ``None``.
    """
    return get_prompt_format(prompt_format).render(tokenizer, question, answer)


def chat_prompt_template(tokenizer: Any) -> str | None:
    """A ``{question}`` format string of the tokenizer's chat prompt (``"chat"`` format); None when the
    tokenizer has no chat template."""
    if not has_chat_template(tokenizer):
        return None
    return PROMPT_FORMATS["chat"].prompt_template(tokenizer, strip_bos=True)
