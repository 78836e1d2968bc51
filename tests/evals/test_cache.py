"""The evaluation cache: a hit only for the same weights, rows and settings."""

from __future__ import annotations

import torch

from blur_lightning.evals import cache as eval_cache
from blur_lightning.evals.cache import EvalCache, cache_key, model_fingerprint
from blur_lightning.testing.tiny import tiny_llama

ROWS = [{"question": "q1", "answer": "a1"}, {"question": "q2", "answer": "a2"}]


def test_fingerprint_sees_one_ulp_in_one_weight():
    model, same = tiny_llama(seed=0), tiny_llama(seed=0)
    assert model_fingerprint(model) == model_fingerprint(same)
    with torch.no_grad():
        weight = same.model.layers[1].mlp.down_proj.weight
        weight[3, 5] = torch.nextafter(weight[3, 5], torch.tensor(float("inf")))
    assert model_fingerprint(model) != model_fingerprint(same)


def test_fingerprint_of_bfloat16_and_dtype_matters():
    model = tiny_llama(seed=0)
    bf16 = tiny_llama(seed=0).to(torch.bfloat16)
    assert model_fingerprint(bf16) == model_fingerprint(tiny_llama(seed=0).to(torch.bfloat16))
    assert model_fingerprint(bf16) != model_fingerprint(model)


def test_key_changes_with_rows_settings_and_version(monkeypatch):
    key = cache_key("m", "forget", ROWS, {"max_new_tokens": 16})
    assert key == cache_key("m", "forget", [dict(r) for r in ROWS], {"max_new_tokens": 16})
    assert key != cache_key("m2", "forget", ROWS, {"max_new_tokens": 16})
    assert key != cache_key("m", "retain", ROWS, {"max_new_tokens": 16})
    assert key != cache_key("m", "forget", ROWS[:1], {"max_new_tokens": 16})
    assert key != cache_key("m", "forget", ROWS, {"max_new_tokens": 8})
    monkeypatch.setattr(eval_cache, "VERSION", eval_cache.VERSION + 1)
    assert key != cache_key("m", "forget", ROWS, {"max_new_tokens": 16})


def test_round_trip_and_a_damaged_entry_is_a_miss(tmp_path):
    cache = EvalCache(tmp_path)
    assert cache.get("k") is None
    cache.put("k", {"accuracy": 1.0, "n": 80})
    assert cache.get("k") == {"accuracy": 1.0, "n": 80}
    cache.path("k").write_text('{"version": 1, "val')  # cut short
    assert cache.get("k") is None
    assert not list(tmp_path.glob("*.tmp"))
