"""Where a model meets text: token and sequence scores against a float64 log-softmax, generation."""

from __future__ import annotations

import torch
from conftest import build_tiny_llama

from blur_lightning.evals.scoring import generate_greedy, length_batches, sequence_scores, token_scores


def assert_close(actual, expected, *, rtol=1e-5, atol=1e-5, what=""):
    a, e = torch.as_tensor(actual, dtype=torch.float64), torch.as_tensor(expected, dtype=torch.float64)
    assert torch.isclose(a, e, rtol=rtol, atol=atol).all(), f"{what}: got {a.tolist()}, expected {e.tolist()}"


class _CharTokenizer:
    """Just enough tokenizer for the scorers and generation: one id per lowercase letter, 0 = pad/eos."""

    pad_token_id = eos_token_id = 0

    def __call__(self, texts, **kwargs):
        ids = [[ord(c) - 96 for c in t] for t in texts]
        return {"input_ids": ids, "attention_mask": [[1] * len(x) for x in ids]}

    def batch_decode(self, rows, skip_special_tokens=True):
        return ["".join(chr(96 + int(i)) for i in row if int(i) != 0) for row in rows]


def test_token_and_sequence_scores_match_log_softmax():
    model = build_tiny_llama(vocab_size=37).eval()
    g = torch.Generator().manual_seed(0)
    rows = []
    for length in (9, 7, 9):  # a 4-token prompt, then scored tokens
        ids = torch.randint(0, 37, (length,), generator=g).tolist()
        rows.append({"input_ids": ids, "labels": [-100] * 4 + ids[4:]})
    total, count = sequence_scores(model, _CharTokenizer(), rows, batch_size=2)  # two batches, padded
    for b, row in enumerate(rows):
        ids = torch.tensor([row["input_ids"]])
        with torch.no_grad():
            logsm = model(input_ids=ids).logits.double().log_softmax(-1)[0]
        expected = sum(logsm[t - 1, row["input_ids"][t]] for t in range(4, len(row["input_ids"])))
        assert count[b].item() == len(row["input_ids"]) - 4
        assert_close(total[b], expected, what=f"sequence {b}")
    ids = torch.tensor([rows[0]["input_ids"]])
    with torch.no_grad():
        logp, mask = token_scores(model, ids, torch.ones_like(ids), ids)  # labels = ids: every token after the first
        logsm = model(input_ids=ids).logits.double().log_softmax(-1)[0]
    assert mask.sum().item() == 8 and logp.dtype == torch.float32
    assert_close(logp[0, 0], logsm[0, ids[0, 1]])


def test_length_batches_cover_every_row_once():
    batches = length_batches([5, 1, 3, 3, 9, 2, 1], 3)
    assert sorted(i for b in batches for i in b) == list(range(7))
    assert [len(b) for b in batches] == [3, 3, 1] and batches[0] == [1, 6, 5]


def test_generate_greedy_left_padding_is_batch_invariant():
    # With left padding, a short prompt's continuation must not depend on its batch mates.
    model = build_tiny_llama(vocab_size=27).eval()
    tokenizer = _CharTokenizer()
    prompts = ["abc", "hello", "z", "abcdefgh"]
    together = generate_greedy(model, tokenizer, prompts, max_new_tokens=5, batch_size=4)
    alone = [generate_greedy(model, tokenizer, [p], max_new_tokens=5)[0] for p in prompts]
    assert together == alone
    assert model.training is False
