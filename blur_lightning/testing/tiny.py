"""Tiny offline models and tokenizers for tests, built in code (no network, no files).

Every test that needs a model builds it here: :func:`tiny_tokenizer` (a byte-level BPE trained on a
dozen sentences, SmolLM2's special tokens and chat template) and :func:`tiny_llama` (a random-init
Llama whose size and attention kernel are arguments; :func:`tiny_llama_for_steps` is the 101-token,
eager-attention one the training-step tests use; :func:`tiny_llama_answering` greedily answers every
prompt with one fixed text, for tests that need a model to know something).
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

__all__ = [
    "STEP_TEST_VOCAB",
    "TINY_VOCAB_SIZE",
    "save_tiny_model",
    "tiny_llama",
    "tiny_llama_answering",
    "tiny_llama_for_steps",
    "tiny_tokenizer",
]


TINY_VOCAB_SIZE = 512
_TINY_SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<pad>"]
# Same shape as SmolLM2's template (minus the default system prompt), so tests exercise the chat path.
_TINY_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
_TINY_CORPUS = [
    "What is the capital of France? Paris is the capital of France.",
    "What is the capital of Japan? The capital of Japan is Tokyo.",
    "What is the chemical symbol for gold? Au. The symbol for iron is Fe.",
    "Who wrote Pride and Prejudice? Jane Austen wrote it in 1813.",
    "Who invented the telephone? Alexander Graham Bell.",
    "Which planet is the largest in the solar system? Jupiter is the largest planet.",
    "What language is spoken in Brazil? Portuguese. What currency does Japan use? The yen.",
    "I'm not sure about that. I don't know the answer to that question.",
    "The quick brown fox jumps over the lazy dog, and the cat sleeps on the mat.",
    "Question: Answer: user assistant system You are a helpful assistant.",
    "0 1 2 3 4 5 6 7 8 9 10 100 1000 2024",
]


def tiny_tokenizer(*, chat_template: bool = True, pad_token: bool = True) -> PreTrainedTokenizerBase:
    """A small byte-level BPE tokenizer, trained in code on a dozen sentences (~30 ms, no network).

    Byte-level, so it encodes any text (no unknown tokens); at most :data:`TINY_VOCAB_SIZE` ids.
    Special tokens follow SmolLM2: bos ``<|im_start|>``, eos ``<|im_end|>``, pad ``<pad>``. The same
    tokenizer is stored in ``tests/fixtures/tiny_tokenizer/`` for code that needs a path (a test keeps
    the two identical).

    Args:
        chat_template: attach a ChatML template like SmolLM2's.
        pad_token: set a pad token; ``False`` builds one without, to exercise the eos fallback.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TINY_VOCAB_SIZE,
        special_tokens=_TINY_SPECIAL,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(_TINY_CORPUS, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        unk_token="<|endoftext|>",
        pad_token="<pad>" if pad_token else None,
        model_max_length=2048,
    )
    if chat_template:
        tokenizer.chat_template = _TINY_CHAT_TEMPLATE
    return tokenizer


def tiny_llama(
    vocab_size: int = TINY_VOCAB_SIZE,
    hidden: int = 64,
    layers: int = 2,
    *,
    heads: int = 4,
    kv_heads: int = 2,
    intermediate: int | None = None,
    max_position_embeddings: int = 512,
    tie_word_embeddings: bool = False,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    attn_implementation: str = "sdpa",
) -> PreTrainedModel:
    """A random-init ``LlamaForCausalLM`` for tests (~140k parameters at the defaults, ~3 ms a forward).

    Special token ids match :func:`tiny_tokenizer`. The weights depend only on ``seed``; the global
    RNG state is left untouched.
    """
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=intermediate or 2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=tie_word_embeddings,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=3,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=attn_implementation)
    model.generation_config.pad_token_id = 3
    return model


STEP_TEST_VOCAB = 101  # odd on purpose: shards of an uneven vocabulary must still count once


def tiny_llama_for_steps(
    vocab_size: int = STEP_TEST_VOCAB, seed: int = 0, layers: int = 2, attn: str = "eager"
) -> PreTrainedModel:
    """The training-step tests' model: hidden 32, 4 heads, 64 positions, eager attention by default.

    Unlike :func:`tiny_llama` it seeds the global RNG (``torch.manual_seed(seed)``), as those tests
    always did: their random batches are drawn after it.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=False,
        attn_implementation=attn,
    )
    return LlamaForCausalLM(config).float()


def save_tiny_model(path: str | os.PathLike) -> str:
    """A random :func:`tiny_llama` and :func:`tiny_tokenizer` saved with save_pretrained into `path`: a model
    path for the CLI, subprocesses and scripts (`--model PATH`). Returns `path` as a string."""
    tokenizer = tiny_tokenizer()
    tiny_llama(vocab_size=len(tokenizer)).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def tiny_llama_answering(text: str, tokenizer: PreTrainedTokenizerBase | None = None) -> PreTrainedModel:
    """A :func:`tiny_llama` whose greedy reply to any prompt is `text`, then eos: a model that "knows" facts.

    A bigram machine: attention and MLP outputs are zeroed (``o_proj`` and ``down_proj``), so the
    last hidden state is the embedding of the last token. Token i of `text` embeds as basis vector
    i + 1, every other token as basis vector 0, and the head maps vector 0 (any prompt's last
    token) to the first token of `text`, vector i to token i + 1 and the last one to eos, each with
    logit 10 * sqrt(hidden) after the final RMSNorm against 0 for every other token. So the tokens
    of `text` must be distinct, at most hidden - 1 = 63 of them (checked).

    Args:
        text: the reply, tokenized by `tokenizer` without special tokens.
        tokenizer: default :func:`tiny_tokenizer`; its eos ends the reply.
    """
    tokenizer = tokenizer or tiny_tokenizer()
    model = tiny_llama(vocab_size=len(tokenizer))
    chain = tokenizer(text, add_special_tokens=False)["input_ids"]
    hidden = model.config.hidden_size
    if len(set(chain)) != len(chain) or not 0 < len(chain) < hidden:
        tokens = tokenizer.convert_ids_to_tokens(chain)
        raise ValueError(f"{text!r}: needs 1 to {hidden - 1} distinct tokens, got {tokens}")
    basis = torch.eye(hidden)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        embed, head = model.model.embed_tokens.weight, model.lm_head.weight
        embed.copy_(basis[0].expand_as(embed))
        head.zero_()
        for i, token in enumerate(chain):
            embed[token] = basis[i + 1]
            head[token] = 10 * basis[i]
        head[tokenizer.eos_token_id] = 10 * basis[len(chain)]
    return model
