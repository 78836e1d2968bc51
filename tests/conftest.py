"""Shared test set-up: offline hubs, few threads, batches built in code (tiny models: blur_lightning.testing.tiny)."""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

# Tests never touch the network: anything named like a hub id must come from a local fixture.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# evaluation results cached by a test never reach the user's cache, nor a later test session
os.environ.setdefault("BLUR_EVAL_CACHE", tempfile.mkdtemp(prefix="blur-eval-cache-"))

# benchmarks/ holds tools that no runtime path imports (the authors' projection, the memory model):
# the tests that check them import them from there, as the benchmark scripts do
BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
if str(BENCHMARKS) not in sys.path:
    sys.path.append(str(BENCHMARKS))

import functools  # noqa: E402
import tarfile  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(min(2, os.cpu_count() or 1))

from blur_lightning.testing.tiny import STEP_TEST_VOCAB as TINY_VOCAB  # noqa: E402
from blur_lightning.testing.tiny import tiny_llama_for_steps as build_tiny_llama  # noqa: E402

# The field's published evaluation logs (open-unlearning's TOFU/MUSE logs, TOFU's own; README inside):
# the workplace keeps them in ../shared/fixtures/reference_logs beside the checkout, and a copy ships
# in tests/fixtures/reference_logs.tar.xz (1.2 MB of 12.6), so a clean clone tests against them too.
REFERENCE_LOGS_ARCHIVE = Path(__file__).resolve().parent / "fixtures" / "reference_logs.tar.xz"


@functools.cache
def reference_logs_dir() -> Path | None:
    """The field's reference logs: ``BLUR_REFERENCE_LOGS``, the shared folder beside the checkout, or
    the vendored archive unpacked once per session; None when none is there."""
    root = Path(__file__).resolve().parents[1]
    for candidate in (os.environ.get("BLUR_REFERENCE_LOGS"), root.parent / "shared" / "fixtures" / "reference_logs"):
        if candidate and Path(candidate, "README.md").is_file():
            return Path(candidate)
    if not REFERENCE_LOGS_ARCHIVE.is_file():
        return None
    target = Path(tempfile.mkdtemp(prefix="blur-reference-logs-"))
    with tarfile.open(REFERENCE_LOGS_ARCHIVE) as archive:
        archive.extractall(target, filter="data")
    return target


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
def one_thread():
    """One intra-op thread for a test: a tiny model gains nothing from two, and on a shared 2-core machine
    each 2-thread op waits for both cores (a TOFU config's run: 3 s with one thread, 35 s with two).
    A module opts in with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def tiny_llama():
    return build_tiny_llama()


def save_tiny_model(folder: Path, layers: int | None = None) -> str:
    """A tiny Llama and its tokenizer saved as an HF folder (what a config's model.model names); its path."""
    from blur_lightning.testing.tiny import tiny_llama as make_tiny_llama
    from blur_lightning.testing.tiny import tiny_tokenizer

    tokenizer = tiny_tokenizer()
    kwargs = {} if layers is None else {"layers": layers}
    make_tiny_llama(vocab_size=len(tokenizer), **kwargs).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)
