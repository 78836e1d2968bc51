"""Shared test set-up: offline hubs, few threads, tiny models and batches built in code."""

from __future__ import annotations

import os

# Tests never touch the network: anything named like a hub id must come from a local fixture.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(min(2, os.cpu_count() or 1))

TINY_VOCAB = 101  # odd on purpose: shards of an uneven vocabulary must still count once


def build_tiny_llama(
    vocab_size: int = TINY_VOCAB, seed: int = 0, layers: int = 2, attn: str = "eager"
) -> torch.nn.Module:
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


def make_side(batch: int, length: int, *, seed: int, vocab_size: int = TINY_VOCAB, prompt: int = 3) -> dict:
    """A right-padded QA-like batch: labels are -100 on the first `prompt` tokens and on padding."""
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, vocab_size, (batch, length), generator=g)
    attention_mask = torch.ones(batch, length, dtype=torch.long)
    for i in range(batch):  # uneven lengths: sequence i loses i % 3 tokens to padding
        pad = i % 3
        if pad:
            attention_mask[i, -pad:] = 0
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    labels[:, :prompt] = -100
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def make_batch(batch: int = 4, length: int = 12, seed: int = 0) -> dict:
    return {
        "forget": make_side(batch, length, seed=2 * seed + 1),
        "retain": make_side(batch, length, seed=2 * seed + 2),
    }


@pytest.fixture
def tiny_llama():
    return build_tiny_llama()
