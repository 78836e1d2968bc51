"""Memorization metrics and membership-inference attacks: each formula against a direct re-derivation in
float64, the model-side statistics against a per-example forward, GradNorm's hands-off contract, and every
aggregate of the field's logs (open-unlearning's mia_*, privleak, exact_memorization, extraction_strength)
recomputed from their per-example values."""

from __future__ import annotations

import json
import math
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import reference_logs_dir

from blur_lightning.evals import membership
from blur_lightning.evals import reference_logs as refs
from blur_lightning.evals.memorization import drop_last_scored, exact_memorization, extraction_strength
from blur_lightning.evals.metric_classes import ExactMemorization, ExtractionStrength, MembershipAUC
from blur_lightning.evals.mia import (
    attack_auc,
    gradnorm_score,
    log_prob_moments,
    loss_scores,
    min_k_attack_scores,
    min_k_plus_plus_scores,
    privleak_from_auc,
    reference_scores,
    zlib_scores,
)
from blur_lightning.testing import tiny as testing

pytestmark = pytest.mark.usefixtures("one_thread")

LOGS = reference_logs_dir()
needs_logs = pytest.mark.skipif(LOGS is None, reason="the field's reference logs: see conftest.reference_logs_dir")
# (log folder, its retain / retrained model's folder or None: open-unlearning's ref_value 0.5)
OU_LOGS = (
    ("tofu_Llama-2-7b-chat-hf_full/evals_forget10", "tofu_Llama-2-7b-chat-hf_retain90"),
    ("tofu_Llama-3.1-8B-Instruct_full/evals_forget10", "tofu_Llama-3.1-8B-Instruct_retain90"),
    ("tofu_Llama-2-7b-chat-hf_retain90", None),
    ("tofu_Llama-3.1-8B-Instruct_retain90", None),
    ("muse_Llama-2-7b-hf_News_target", "muse_Llama-2-7b-hf_News_retrain"),
    ("muse_Llama-2-7b-hf_News_retrain", None),
)
# AUCs are rank statistics of the same float64 scores: exact. Means of 400 per-example values may differ from
# numpy's pairwise summation in the last bits (measured: 2.8e-17 at most); PrivLeak: measured exact.
MEAN_ATOL = 1e-15
PRIVLEAK_REL = 1e-14


# ============================================================================ the field's logs
def _folder_and_summary(name: str) -> tuple[Path, dict[str, float]]:
    folder = LOGS / "open-unlearning" / name
    summary = next(folder.glob("*_SUMMARY.json"))
    return folder, json.loads(summary.read_text())


@needs_logs
@pytest.mark.parametrize(("name", "retain"), OU_LOGS, ids=[n.split("/")[0] for n, _ in OU_LOGS])
def test_open_unlearning_privacy_aggregates_from_the_per_example_values(name, retain):
    folder, summary = _folder_and_summary(name)
    log = refs.read_reference_log(folder)
    aucs = refs.attack_aucs(log)
    expected_attacks = {k for k in summary if k.startswith("mia_")}
    assert set(aucs) == expected_attacks and {"mia_loss", "mia_zlib", "mia_min_k", "mia_min_k_plus_plus",
                                              "mia_gradnorm"} <= expected_attacks  # fmt: skip
    for metric, auc in aucs.items():
        assert auc == summary[metric], metric  # exact
    means = refs.memorization_means(log)
    assert set(means) == {"exact_memorization", "extraction_strength"}
    for metric, value in means.items():
        assert value == pytest.approx(summary[metric], rel=0, abs=MEAN_ATOL), metric
    reference = refs.read_reference_log(LOGS / "open-unlearning" / retain) if retain else None
    assert refs.privleak(log, reference) == pytest.approx(summary["privleak"], rel=PRIVLEAK_REL)
    # and the retain model's log reading its own AUC: PrivLeak 0 (the eps moves it by 1e-8 of a percent)
    assert refs.privleak(log, log) == pytest.approx(0.0, abs=1e-7)


@needs_logs
def test_open_unlearning_min_k_is_minus_ours():
    folder, _ = _folder_and_summary("muse_Llama-2-7b-hf_News_target")
    log = refs.read_reference_log(folder)
    assert torch.equal(log.min_k_scores["forget"], -log.attack_scores["mia_min_k"]["forget"])
    assert refs.membership_auc(log) == pytest.approx(1 - refs.attack_aucs(log)["mia_min_k"], abs=1e-15)


# ============================================================================ formulas, float64
G = torch.Generator().manual_seed(0)
LOGPROBS = -torch.rand(3, 7, generator=G, dtype=torch.float64) * 5
MASK = torch.tensor([[0, 1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1, 1], [0, 0, 0, 1, 1, 0, 0]], dtype=torch.bool)


def _rows(values: torch.Tensor, mask: torch.Tensor) -> list[list[float]]:
    return [[v for v, m in zip(row.tolist(), keep.tolist()) if m] for row, keep in zip(values, mask)]


def _min_k_direct(values: list[float], k: float) -> float:
    kept = sorted(values)[: max(1, int(len(values) * k))]
    return -sum(kept) / len(kept)


def test_loss_zlib_reference_scores_against_a_direct_derivation():
    rows = _rows(LOGPROBS, MASK)
    loss = loss_scores(LOGPROBS, MASK)
    assert loss.dtype == torch.float64
    assert loss.tolist() == pytest.approx([-sum(r) / len(r) for r in rows], rel=1e-15)
    texts = ["Paris is the capital of France.", "", "é" * 40]
    sizes = [len(zlib.compress(t.encode("utf-8"))) for t in texts]
    assert zlib_scores(loss, texts).tolist() == pytest.approx([lo / s for lo, s in zip(loss.tolist(), sizes)])
    ref_loss = torch.tensor([0.5, 1.0, 2.0], dtype=torch.float64)
    assert reference_scores(loss, ref_loss).tolist() == [a - b for a, b in zip(loss.tolist(), ref_loss.tolist())]
    with pytest.raises(ValueError, match="3 losses but 2 texts"):
        zlib_scores(loss, texts[:2])


@pytest.mark.parametrize("k", [0.2, 0.4, 1.0])
def test_min_k_and_min_k_plus_plus_against_a_direct_derivation(k):
    rows = _rows(LOGPROBS, MASK)
    assert min_k_attack_scores(LOGPROBS, MASK, k).tolist() == pytest.approx(
        [_min_k_direct(r, k) for r in rows], rel=1e-15
    )
    vocab = torch.log_softmax(torch.randn(3, 7, 11, generator=G, dtype=torch.float64), dim=-1)
    mu, var = log_prob_moments(vocab)
    # the moments, term by term
    p = vocab[1, 2].exp().tolist()
    lp = vocab[1, 2].tolist()
    mean = sum(pi * li for pi, li in zip(p, lp))
    assert mu[1, 2].item() == pytest.approx(mean, rel=1e-14)
    assert var[1, 2].item() == pytest.approx(sum(pi * (li - mean) ** 2 for pi, li in zip(p, lp)), rel=1e-12)
    var[0, 3] = 1e-9  # clamped at 1e-6 (open-unlearning)
    z = (LOGPROBS - mu) / var.clamp_min(1e-6).sqrt()
    assert min_k_plus_plus_scores(LOGPROBS, mu, var, MASK, k).tolist() == pytest.approx(
        [_min_k_direct(r, k) for r in _rows(z, MASK)], rel=1e-14
    )


def test_gradnorm_score_is_the_mean_of_per_tensor_norms():
    grads = [torch.tensor([3.0, 4.0]), torch.tensor([[1.0, -2.0], [2.0, 0.0]])]
    assert gradnorm_score(grads, 2).item() == pytest.approx((5.0 + 3.0) / 2)
    assert gradnorm_score(grads, 1).item() == pytest.approx((7.0 + 5.0) / 2)
    assert gradnorm_score(grads, float("inf")).item() == pytest.approx((4.0 + 2.0) / 2)
    with pytest.raises(ValueError, match="p must be 1, 2 or inf"):
        gradnorm_score(grads, 3)


def test_attack_auc_and_privleak_conventions():
    forget = torch.tensor([0.1, 0.2, 0.3], dtype=torch.float64)  # low loss: members
    holdout = torch.tensor([0.25, 0.9, 1.0, 0.3], dtype=torch.float64)
    pairs = [(h > f) + 0.5 * (h == f) for f in forget.tolist() for h in holdout.tolist()]
    assert attack_auc(forget, holdout).item() == pytest.approx(sum(pairs) / len(pairs), rel=1e-15)
    auc = MembershipAUC()
    auc.update(forget_scores=forget[:2])
    auc.update(forget_scores=forget[2:], holdout_scores=holdout)
    assert auc.compute().item() == attack_auc(forget, holdout).item()
    # open-unlearning: ((1 - a) - (1 - r)) / ((1 - r) + 1e-10) * 100
    assert privleak_from_auc(0.9, 0.4).item() == pytest.approx((0.1 - 0.6) / (0.6 + 1e-10) * 100, rel=1e-15)
    assert privleak_from_auc(0.5).item() == 0.0


# ============================================================================ EM / ES by hand
def _hm(hits: list[list[int]], mask: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.tensor(hits, dtype=torch.bool), torch.tensor(mask, dtype=torch.bool)


def test_exact_memorization_and_extraction_strength_by_hand():
    # row 0: all 4 hit; row 1: miss at the 2nd of 4, then 2 hits; row 2: last missed (of 5);
    # row 3: padding and a prompt before 3 answer tokens, first missed; row 4: nothing scored
    hits, mask = _hm(
        [[1, 1, 1, 1, 0], [1, 0, 1, 1, 0], [1, 1, 1, 1, 0], [1, 1, 0, 1, 1], [1, 1, 1, 1, 1]],
        [[1, 1, 1, 1, 0], [1, 1, 1, 1, 0], [1, 1, 1, 1, 1], [0, 0, 1, 1, 1], [0, 0, 0, 0, 0]],
    )
    em = exact_memorization(hits, mask)
    assert em[:4].tolist() == [1.0, 0.75, 0.8, 2 / 3] and math.isnan(em[4])
    es = extraction_strength(hits, mask)
    # 1 - k/n: k = 0, 2 (suffix from the 3rd), open-unlearning's k = n - 1 when even the last misses, 1
    assert es[:4].tolist() == [1.0, 0.5, 1 / 5, 2 / 3] and math.isnan(es[4])
    assert extraction_strength(hits, mask, "zero")[:4].tolist() == [1.0, 0.5, 0.0, 2 / 3]
    with pytest.raises(ValueError, match="no_match"):
        extraction_strength(hits, mask, "none")


def _ou_extraction_strength(preds: list[int], labels: list[int]) -> float:
    """open-unlearning's loop, restated: the first k whose suffix matches, else the loop's last k."""
    n = len(labels)
    for k in range(n):
        if preds[k:] == labels[k:]:
            break
    return 1 - k / n


def test_extraction_strength_matches_open_unlearnings_loop_on_random_rows():
    g = torch.Generator().manual_seed(1)
    for _ in range(200):
        n = int(torch.randint(1, 9, (1,), generator=g))
        labels = torch.randint(0, 3, (n,), generator=g).tolist()
        preds = torch.randint(0, 3, (n,), generator=g).tolist()
        hits = torch.tensor([[p == lab for p, lab in zip(preds, labels)]])
        es = extraction_strength(hits, torch.ones_like(hits)).item()
        assert es == pytest.approx(_ou_extraction_strength(preds, labels), rel=1e-15), (preds, labels)


def test_drop_last_scored_and_the_metric_classes():
    mask = torch.tensor([[0, 1, 1, 1, 0], [1, 0, 0, 0, 0], [0, 0, 0, 0, 0]], dtype=torch.bool)
    assert drop_last_scored(mask).int().tolist() == [[0, 1, 1, 0, 0], [0, 0, 0, 0, 0], [0, 0, 0, 0, 0]]
    hits, mask = _hm([[1, 0, 1], [1, 1, 1]], [[1, 1, 1], [0, 1, 1]])
    em, es = ExactMemorization(), ExtractionStrength()
    em.update(hits, mask)
    es.update(hits, mask)
    em.add_values(torch.tensor([float("nan")]))  # a row with no token: left out of the mean
    assert em.compute().item() == pytest.approx((2 / 3 + 1) / 2)
    assert es.compute().item() == pytest.approx((1 / 3 + 1) / 2)
    assert len(em.per_example()) == 3


# ============================================================================ the model side
@pytest.fixture(scope="module")
def tiny():
    tokenizer = testing.tiny_tokenizer()
    return testing.tiny_llama(vocab_size=len(tokenizer), seed=0).eval(), tokenizer


def _encoded(tokenizer, n: int = 5, seed: int = 0) -> list[dict[str, list[int]]]:
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(n):
        prompt = torch.randint(3, len(tokenizer), (2 + i % 3,), generator=g).tolist()
        answer = torch.randint(3, len(tokenizer), (3 + (2 * i) % 5,), generator=g).tolist()
        rows.append({"input_ids": prompt + answer, "labels": [-100] * len(prompt) + answer})
    return rows


def _direct_statistics(model, row: dict, k: float) -> dict[str, float]:
    """One row alone, unpadded, in float64 from its logits; open-unlearning's token choice (last one dropped)."""
    ids = torch.tensor([row["input_ids"]])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, :-1].double()
    labels = torch.tensor(row["labels"][1:])
    scored = (labels != -100).nonzero().flatten()
    logp = torch.log_softmax(logits, dim=-1)
    token_lp = logp[scored, labels[scored]]
    short = scored[:-1]
    preds, targets = logp[short].argmax(-1).tolist(), labels[short].tolist()
    mu = (logp[short].exp() * logp[short]).sum(-1)
    var = (logp[short].exp() * logp[short] ** 2).sum(-1) - mu**2
    z = ((logp[short, labels[short]] - mu) / var.clamp_min(1e-6).sqrt()).tolist()
    return {
        "loss": -token_lp.mean().item(),
        "min_k": _min_k_direct(logp[short, labels[short]].tolist(), k),
        "min_k_plus_plus": _min_k_direct(z, k),
        "exact_memorization": sum(p == t for p, t in zip(preds, targets)) / len(targets),
        "extraction_strength": _ou_extraction_strength(preds, targets),
    }


def test_row_statistics_match_a_direct_per_example_forward(tiny):
    model, tokenizer = tiny
    rows = _encoded(tokenizer)
    # the tiny model's argmax is rarely the random label: plant hits by answering with its own argmax
    with torch.no_grad():
        for row in rows[:2]:
            logits = model(input_ids=torch.tensor([row["input_ids"]])).logits[0]
            start = row["labels"].index(next(t for t in row["labels"] if t != -100))
            for t in range(start, len(row["input_ids"])):  # greedy continuation of the prompt
                ids = torch.tensor([row["input_ids"][:t]])
                row["input_ids"][t] = row["labels"][t] = int(model(input_ids=ids).logits[0, -1].argmax())
            del logits
    stats = membership.row_statistics(model, tokenizer, rows, k=0.4, batch_size=3, show_progress=False)
    for i, row in enumerate(rows):
        direct = _direct_statistics(model, row, 0.4)
        for name, value in direct.items():
            # float32 logits: 1e-5 relative on losses and z-scores; argmax-based ones exact
            assert stats[name][i].item() == pytest.approx(value, rel=1e-5, abs=1e-6), (i, name)
    assert stats["exact_memorization"][:2].tolist() == [1.0, 1.0]  # the planted greedy answers
    assert stats["extraction_strength"][:2].tolist() == [1.0, 1.0]


def test_gradnorm_leaves_the_model_and_its_gradients_alone(tiny):
    model, tokenizer = tiny
    rows = _encoded(tokenizer, n=3, seed=1)
    model.train()  # restored afterwards
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.AdamW(model.parameters(), lr=1.0)
    planted = {n: torch.full_like(p, 0.5) for n, p in model.named_parameters()}
    for n, p in model.named_parameters():
        p.grad = planted[n].clone()  # a training step's accumulated gradient
    scores = membership.gradient_norms(model, tokenizer, rows, p=2, show_progress=False)
    assert model.training
    assert not optimizer.state  # no optimizer touched
    for n, p in model.named_parameters():
        assert torch.equal(p.detach(), before[n]), n
        assert torch.equal(p.grad, planted[n]), n
    # the same score by hand: one backward per example, mean of per-tensor 2-norms (last token left out)
    model.eval()
    for row, score in zip(rows, scores.tolist()):
        model.zero_grad(set_to_none=True)
        ids = torch.tensor([row["input_ids"]])
        logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), dim=-1)
        labels = torch.tensor(row["labels"][1:])
        scored = (labels != -100).nonzero().flatten()[:-1]
        (-logp[scored, labels[scored]].mean()).backward()
        norms = [p.grad.norm() for p in model.parameters() if p.grad is not None]
        assert score == pytest.approx(torch.stack(norms).mean().item(), rel=1e-5)
    model.zero_grad(set_to_none=True)
    frozen = testing.tiny_llama(vocab_size=len(tokenizer), seed=0).requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameter"):
        membership.gradient_norms(frozen, tokenizer, rows)


def test_privacy_options_defaults_and_errors():
    options = {"mia_k": 0.2, "other": 1}
    out = membership.privacy_options(options, has_holdout=True)
    assert options == {"other": 1}  # popped
    assert out["mia_attacks"] == list(membership.DEFAULT_ATTACKS) and out["memorization"]
    assert membership.privacy_options({}, has_holdout=False)["mia_attacks"] == []
    assert "reference" in membership.privacy_options({"reference_model_path": "x"}, has_holdout=True)["mia_attacks"]
    for bad, match in (
        ({"mia_attacks": ["lira"]}, "unknown attacks"),
        ({"mia_attacks": "loss"}, "must be a list"),
        ({"mia_attacks": ["reference"]}, "no options.reference_model_path"),
        ({"gradnorm_p": 3}, "gradnorm_p"),
        ({"mia_k": 0}, "mia_k"),
        ({"extraction_no_match": "x"}, "extraction_no_match"),
    ):
        with pytest.raises(ValueError, match=match):
            membership.privacy_options(bad, has_holdout=True)


def test_evaluate_mia_aucs_and_privleak_from_the_scores(tiny):
    model, tokenizer = tiny
    forget, holdout = _encoded(tokenizer, 4, seed=2), _encoded(tokenizer, 5, seed=3)
    options = membership.privacy_options(
        {"mia_attacks": ["loss", "zlib", "min_k", "min_k_plus_plus", "gradnorm", "reference"],
         "reference_model": testing.tiny_llama(vocab_size=len(tokenizer), seed=1), "privleak_ref_auc": 0.5},
        has_holdout=True,
    )  # fmt: skip
    results = membership.evaluate_privacy(model, tokenizer, forget, holdout, options, batch_size=2,
                                          show_progress=False)  # fmt: skip
    for attack in ("loss", "zlib", "min_k", "min_k_plus_plus", "gradnorm", "reference"):
        f = torch.tensor(results["mia_forget/per_example"][attack], dtype=torch.float64)
        h = torch.tensor(results["mia_holdout/per_example"][attack], dtype=torch.float64)
        assert len(f) == 4 and len(h) == 5
        assert results[f"mia_{attack}"] == attack_auc(f, h).item()
    assert results["privleak"] == privleak_from_auc(results["mia_min_k"], 0.5).item()
    assert np.isfinite(results["exact_memorization"]) and len(results["memorization/per_example"]
                                                              ["extraction_strength"]) == 4  # fmt: skip


# ======================================================================= the demo's QA benchmark, the run's reference
def test_qa_benchmark_reports_memorization_and_attacks_with_the_runs_reference(tiny):
    from blur_lightning.evals.callback import EvaluationCallback

    model, tokenizer = tiny
    qa = Path(__file__).resolve().parent.parent / "fixtures" / "qa"
    options = {"reference_model_path": "run", "mia_attacks": ["loss", "min_k", "reference"]}
    splits = {"forget": str(qa / "forget.jsonl"), "retain_holdout": str(qa / "retain.jsonl")}
    callback = EvaluationCallback("qa", splits, max_new_tokens=2, batch_size=8, options=options)
    results = callback.evaluate(model, tokenizer, show_progress=False, reference_model=model)
    # the model as its own reference: every score 0, one tie, AUC 1/2
    assert set(results["mia_forget/per_example"]["reference"]) == {0.0} and results["mia_reference"] == 0.5
    assert results["privleak"] == privleak_from_auc(results["mia_min_k"], 0.5).item()
    n_forget = len(results["forget/per_example"]["correct"])
    assert len(results["memorization/per_example"]["exact_memorization"]) == n_forget
    report = callback.spec.report(results, results, {"forget": n_forget})
    assert "| mia_reference | 0.5 | 0.5 |" in report
    with pytest.raises(ValueError, match="reference_model_path: run needs the module's frozen reference"):
        callback.evaluate(model, tokenizer, show_progress=False)
    with pytest.raises(ValueError, match="mia_holdout_set='nope': no such set"):
        EvaluationCallback("qa", {"forget": str(qa / "forget.jsonl")}, options={"mia_holdout_set": "nope"}).evaluate(
            model, tokenizer, show_progress=False)  # fmt: skip
