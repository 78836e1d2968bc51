"""How a question becomes a prompt: the one place where the chat template is rendered.

Two prompt conventions, on purpose:

* :data:`QA_PROMPT` ``"Question: {question}\\nAnswer:"`` is our own, used by training and the QA
  evaluation when a tokenizer has no chat template; the answer follows as ``" {answer}"`` plus eos,
  so a BPE tokenizer splits it as it splits running text (``"Answer:", " Paris"``).
* :data:`TOFU_PROMPT` ``"Question: {question}\\nAnswer: "`` (trailing space) is TOFU's own prompt for
  models without a chat template (locuslab/tofu, its phi config), kept so that TOFU numbers match
  TOFU's code. MUSE's knowmem prompt has the same text (:data:`MUSE_QA_PROMPT`).

With a chat template (SmolLM2, Llama 3), every evaluation that asks questions uses
:func:`format_qa` / :func:`chat_prompt_template`, both built on :func:`render_chat_prompt`, so the
evaluated prompt is exactly the trained one.
"""

from __future__ import annotations

from typing import Any

__all__ = ["MUSE_QA_PROMPT", "QA_PROMPT", "TOFU_PROMPT", "chat_prompt_template", "format_qa", "render_chat_prompt"]

QA_PROMPT = "Question: {question}\nAnswer:"
TOFU_PROMPT = "Question: {question}\nAnswer: "
MUSE_QA_PROMPT = "Question: {question}\nAnswer: "


def has_chat_template(tokenizer: Any) -> bool:
    """Whether the tokenizer carries a chat template."""
    return bool(getattr(tokenizer, "chat_template", None))


def render_chat_prompt(tokenizer: Any, question: str, answer: str | None = None) -> tuple[str, str]:
    """The chat template's rendering of one user turn plus the generation prompt, and of the answer.

    Returns:
        ``(prompt, answer_text)``: the prompt text and the rest of the conversation after it (the
        assistant reply and its end-of-turn token, trailing whitespace dropped); ``""`` without answer.

    Raises:
        ValueError: the template renders the prompt differently with and without the answer.
    """
    user = [{"role": "user", "content": question}]
    prompt = tokenizer.apply_chat_template(user, add_generation_prompt=True, tokenize=False)
    if answer is None:
        return prompt, ""
    full = tokenizer.apply_chat_template(user + [{"role": "assistant", "content": answer}], tokenize=False)
    if not full.startswith(prompt):
        raise ValueError(
            "the chat template renders the prompt differently with and without the answer; "
            "pass use_chat_template=False"
        )
    return prompt, full[len(prompt) :].rstrip()


def format_qa(
    tokenizer: Any, question: str, answer: str | None = None, *, use_chat_template: bool = True
) -> tuple[str, str]:
    """The prompt text and the answer text of one QA row, as training and evaluation both see them.

    With a chat template see :func:`render_chat_prompt`. Without one (or ``use_chat_template=False``)
    the prompt is :data:`QA_PROMPT` and the answer is ``" {answer}"`` followed by the eos token.

    Returns:
        ``(prompt, answer_text)``; ``answer_text`` is ``""`` when ``answer`` is ``None``.
    """
    if use_chat_template and has_chat_template(tokenizer):
        return render_chat_prompt(tokenizer, question, answer)
    prompt = QA_PROMPT.format(question=question)
    if answer is None:
        return prompt, ""
    return prompt, f" {answer}{tokenizer.eos_token or ''}"


def chat_prompt_template(tokenizer: Any) -> str | None:
    """A ``{question}`` format string of the tokenizer's chat prompt (user turn + generation prompt).

    The benchmarks' scorers tokenize prompts with the tokenizer's own special tokens, so a bos the
    template writes is dropped when the tokenizer adds one itself (Llama 3: one ``<|begin_of_text|>``,
    not two). None when the tokenizer has no chat template.
    """
    if not has_chat_template(tokenizer):
        return None
    marker = "\x00QUESTION\x00"
    text, _ = render_chat_prompt(tokenizer, marker)
    bos = tokenizer.bos_token
    added = tokenizer("", add_special_tokens=True)["input_ids"]
    if bos and text.startswith(bos) and added[:1] == [tokenizer.bos_token_id]:
        text = text[len(bos) :]
    return text.replace("{", "{{").replace("}", "}}").replace(marker, "{question}")
