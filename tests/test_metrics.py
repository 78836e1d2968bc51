"""Unlearning metrics: hand-worked values, independent references (scipy, sklearn, rouge-score), rank sync."""

from __future__ import annotations

import json
import math
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from conftest import build_tiny_llama  # noqa: E402
from torchmetrics.utilities.data import dim_zero_cat  # noqa: E402

from blur_lightning import metrics as M  # noqa: E402

LN = math.log


def assert_close(actual, expected, *, rtol=1e-12, atol=1e-12, what=""):
    """Elementwise closeness; the message names the first bad index and both values."""
    a = torch.as_tensor(actual, dtype=torch.float64).flatten()
    e = torch.as_tensor(expected, dtype=torch.float64).flatten()
    assert a.shape == e.shape, f"{what}: shape {tuple(a.shape)} != {tuple(e.shape)}"
    bad = ~torch.isclose(a, e, rtol=rtol, atol=atol, equal_nan=True)
    if bad.any():
        i = int(bad.nonzero()[0])
        raise AssertionError(f"{what}: first mismatch at {i}: got {a[i].item()!r}, expected {e[i].item()!r}")


# ============================================================================ hand-worked values
def test_answer_probability_by_hand():
    # answer 1: sum log-prob -6 over 3 tokens -> exp(-2) = 0.135335...
    # answer 2: three tokens of p = 1/2 -> sum 3 ln(1/2) -> exp(ln(1/2)) = 0.5
    # mean = (0.1353352832 + 0.5) / 2 = 0.3176676416
    sums = torch.tensor([-6.0, 3 * LN(0.5)])
    counts = torch.tensor([3, 3])
    assert_close(M.answer_probability(sums, counts), [math.exp(-2), 0.5], rtol=1e-6)
    metric = M.AnswerProbability()
    metric.update(sums, counts)
    assert_close(metric.compute(), (math.exp(-2) + 0.5) / 2, rtol=1e-6)
    assert_close(metric.per_example(), [math.exp(-2), 0.5], rtol=1e-6)


def test_relative_answer_probability_by_hand():
    # p(true) = 0.6, perturbed 0.2, 0.1, 0.1 -> 0.6 / (0.6 + 0.4) = 0.6
    # p(true) = 0.5, perturbed 0.25, 0.25, 0.5 -> 0.5 / 1.5 = 1/3
    answer = torch.tensor([LN(0.6), LN(0.5)])
    perturbed = torch.tensor([[LN(0.2), LN(0.1), LN(0.1)], [LN(0.25), LN(0.25), LN(0.5)]])
    assert_close(M.relative_answer_probability(answer, perturbed), [0.6, 1 / 3], rtol=1e-6)


def test_truth_ratio_by_hand():
    # question 1: P_norm(para) = 0.5, perturbed 0.25 and 0.0625
    #   geometric: sqrt(0.25 * 0.0625) = 0.125 -> R = 0.125 / 0.5 = 0.25
    #   arithmetic: (0.25 + 0.0625) / 2 = 0.15625 -> R = 0.3125
    # question 2: P_norm(para) = 0.1, perturbed 0.2 and 0.2 -> R = 2 (both means)
    # true_better = mean(max(0, 1 - R)) = (0.75 + 0) / 2 = 0.375
    # closer_to_1 = mean(min(R, 1/R)) = (0.25 + 0.5) / 2 = 0.375; mean = 1.125
    para = torch.tensor([LN(0.5), LN(0.1)], dtype=torch.float64)
    pert = torch.tensor([[LN(0.25), LN(0.0625)], [LN(0.2), LN(0.2)]], dtype=torch.float64)
    assert_close(M.truth_ratio(para, pert), [0.25, 2.0])
    assert_close(M.truth_ratio(para, pert, "arithmetic"), [0.3125, 2.0])
    ratios = M.truth_ratio(para, pert)
    assert_close(M.truth_ratio_score(ratios, "true_better"), 0.375)
    assert_close(M.truth_ratio_score(ratios, "closer_to_1"), 0.375)
    assert_close(M.truth_ratio_score(ratios, "mean"), 1.125)
    metric = M.TruthRatio("true_better")
    metric.update(para, pert)
    assert_close(metric.compute(), 0.375, rtol=1e-6)


def test_truth_ratio_matches_tofu_code():
    # TOFU evaluate_util.py: truth_ratio = exp(gt_loss_per_token - perturb_loss_per_token.mean(-1))
    # with losses = -mean token log-prob, and aggregate_eval_stat.py's retain statistic
    # mean(max(0, 1 - 1/curr_stat_1)) with curr_stat_1 = exp(mean perturb loss - paraphrase loss).
    rng = np.random.default_rng(3)
    para_loss = rng.uniform(0.5, 3.0, size=17)
    pert_loss = rng.uniform(0.5, 3.0, size=(17, 5))
    tofu_ratio = np.exp(para_loss - pert_loss.mean(-1))
    curr_stat_1 = np.exp(pert_loss.mean(-1) - para_loss)
    ours = M.truth_ratio(torch.tensor(-para_loss), torch.tensor(-pert_loss))
    assert_close(ours, tofu_ratio, rtol=1e-12, what="truth ratio")
    assert_close(M.truth_ratio_score(ours, "true_better"), np.mean(np.maximum(0, 1 - 1 / curr_stat_1)))
    assert_close(M.truth_ratio_score(ours, "closer_to_1"), np.mean(np.minimum(curr_stat_1, 1 / curr_stat_1)))


def test_rouge_l_by_hand():
    # "the cat sat on the mat" vs reference "the cat is on the mat": 6 and 6 tokens,
    # LCS = "the cat on the mat" = 5 -> precision = recall = f1 = 5/6
    score = M.rouge_l("the cat sat on the mat", "the cat is on the mat")
    assert_close([score["precision"], score["recall"], score["f1"]], [5 / 6] * 3)
    # reference: lina morrow was born in a small harbor town (9 tokens);
    # prediction "Morrow, born in town!" -> morrow born in town (4), all in order: LCS = 4
    # recall 4/9, precision 1, f1 = 2 (4/9) / (13/9) = 8/13
    score = M.rouge_l("Morrow, born in town!", "Lina Morrow was born in a small harbor town.")
    assert_close([score["precision"], score["recall"], score["f1"]], [1.0, 4 / 9, 8 / 13])
    assert M.rouge_l("", "anything") == {"precision": 0.0, "recall": 0.0, "f1": 0.0}
    assert M.rouge_tokenize("Hello, WORLD!! It's 2024-05") == ["hello", "world", "it", "s", "2024", "05"]
    assert M.lcs_length("ABCBDAB", "BDCABA") == 4  # the textbook example (CLRS 15.4)


def test_ks_by_hand():
    # x = 1, 2, 3 and y = 4, 5, 6 are fully separated: D = 1. Of the C(6, 3) = 20 equally
    # likely pooled orderings only xxxyyy and yyyxxx reach D = 1 -> p = 2 / 20 = 0.1
    d, p = M.ks_2samp([1.0, 2.0, 3.0], [4.0, 5.0, 6.0], method="exact")
    assert_close(d, 1.0)
    assert_close(p, 0.1)
    # identical samples: D = 0, p = 1
    d, p = M.ks_2samp([0.3, 0.7], [0.7, 0.3])
    assert (d.item(), p.item()) == (0.0, 1.0)


def test_model_utility_by_hand():
    # seven statistics at 1, one at 0.5, one at 0.25: hmean = 9 / (7 + 2 + 4) = 9/13
    values = [1.0] * 7 + [0.5, 0.25]
    stats = dict(zip(M.TOFU_UTILITY_KEYS, values))
    assert_close(M.model_utility(stats), 9 / 13)
    assert M.model_utility({**stats, "retain/prob": 0.0}).item() == 0.0  # any zero -> 0, as scipy.stats.hmean
    with pytest.raises(ValueError, match="world_facts/truth_ratio"):
        M.model_utility({k: v for k, v in stats.items() if k != "world_facts/truth_ratio"})


def test_min_k_by_hand():
    # 5 tokens, k = 0.4: floor(2.0) = 2 lowest log-probs -4 and -3 -> score -3.5
    # with the -4 token masked out: 4 tokens, floor(1.6) = 1 lowest -> -3
    # a 1-token text keeps floor(0.4) -> at least 1 token: -0.2
    logp = torch.tensor(
        [[-1.0, -4.0, -2.0, -3.0, -0.5], [-1.0, -4.0, -2.0, -3.0, -0.5], [-0.2, 9.0, 9.0, 9.0, 9.0]],
        dtype=torch.float64,
    )
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 0, 1, 1, 1], [1, 0, 0, 0, 0]], dtype=torch.bool)
    assert_close(M.min_k_scores(logp, mask, k=0.4), [-3.5, -3.0, -0.2])
    assert M.min_k_scores(logp[:1], torch.zeros(1, 5, dtype=torch.bool)).isnan().all()


def test_auroc_and_privleak_by_hand():
    # positives 0.9, 0.4, 0.4 vs negatives 0.4, 0.1: 6 pairs
    #   0.9 beats both (2); each 0.4 ties 0.4 (1/2) and beats 0.1 (1) -> 2 * 1.5 = 3
    #   AUC = (2 + 3) / 6 = 5/6
    assert_close(M.auroc(torch.tensor([0.9, 0.4, 0.4]), torch.tensor([0.4, 0.1])), 5 / 6)
    # MUSE convention: a model that memorised the forget set gives its texts higher Min-K
    # scores than holdout texts -> AUC = P(holdout > forget) = 0, PrivLeak = (0 - 0.5)/0.5*100 = -100
    forget, holdout = torch.tensor([-0.5, -0.6]), torch.tensor([-2.0, -3.0])
    assert M.min_k_auc(forget, holdout).item() == 0.0
    assert_close(M.priv_leak(M.min_k_auc(forget, holdout), 0.5), -100.0)
    # (0.06 - 0.5) / 0.5 * 100 = -88
    assert_close(M.priv_leak(0.06, 0.5), -88.0)
    metric = M.PrivLeak(auc_retrain=0.5)
    metric.update(forget_scores=forget, holdout_scores=holdout)
    assert_close(metric.compute(), -100.0)


def test_multiple_choice_by_hand():
    # argmax per row: 0 (gold 0, hit), 1 (gold 2, miss), 2 (gold 2, hit) -> 2/3
    logp = torch.tensor([[-1.0, -2.0, -3.0, -4.0], [-3.0, -1.0, -2.0, -5.0], [-2.0, -2.0, -1.0, -9.0]])
    gold = torch.tensor([0, 2, 2])
    assert_close(M.multiple_choice_accuracy(logp, gold), 2 / 3)
    metric = M.MultipleChoiceAccuracy()
    metric.update(logp, gold)
    assert_close(metric.compute(), 2 / 3)


# ============================================================================ independent references
ROUGE_PAIRS = [
    ("the cat sat on the mat", "the cat is on the mat"),
    ("Running runners ran; the RUNNER runs!", "a runner was running and runs"),
    ("Émile Zola wrote Les Rougon-Macquart", "Les Rougon-Macquart was written by Émile Zola"),
    ("", "something"),
    ("something", "   "),
    ("1984 by George Orwell, published 1949", "George Orwell published 1984 in 1949."),
    ("a a a b b", "b a b a b a"),
    ("She won the Silver Lantern prize in 2019 and again in 2021", "the silver lantern prize"),
    ("x " * 60 + "y", "y " + "x " * 45),
]


@pytest.mark.parametrize("use_stemmer", [False, True])
def test_rouge_l_matches_rouge_score(use_stemmer):
    rouge_scorer = pytest.importorskip("rouge_score.rouge_scorer")
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=use_stemmer)
    stemmer = None
    if use_stemmer:
        from nltk.stem import porter

        stemmer = porter.PorterStemmer().stem  # the stemmer rouge-score itself uses
    for i, (prediction, reference) in enumerate(ROUGE_PAIRS):
        theirs = scorer.score(reference, prediction)["rougeL"]  # score(target, prediction)
        ours = M.rouge_l(prediction, reference, stemmer)
        assert_close(
            [ours["precision"], ours["recall"], ours["f1"]],
            [theirs.precision, theirs.recall, theirs.fmeasure],
            what=f"pair {i} stemmer={use_stemmer}",
        )


KS_CASES = [  # (n1, n2, shift, rounding): rounding makes ties
    (1, 1, 0.0, None),
    (3, 7, 1.0, None),
    (13, 29, 2.0, None),
    (40, 40, 0.3, None),
    (40, 37, 0.6, 1),
    (100, 250, 0.4, None),
    (200, 200, 0.0, 1),
    (400, 400, 1.5, None),  # p ~ 1e-55: the exact path keeps relative precision
    (65, 1, 0.0, None),
]


@pytest.mark.parametrize("n1,n2,shift,rounding", KS_CASES)
@pytest.mark.parametrize("method", ["auto", "exact", "asymp"])
def test_ks_2samp_matches_scipy(n1, n2, shift, rounding, method):
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(n1 * 1000 + n2)
    x, y = rng.normal(size=n1), rng.normal(shift, size=n2)
    if rounding is not None:
        x, y = np.round(x, rounding), np.round(y, rounding)
    with np.errstate(divide="ignore", invalid="ignore"):
        theirs = stats.ks_2samp(x, y, method=method)
    d, p = M.ks_2samp(torch.tensor(x), torch.tensor(y), method=method)
    assert_close(d, theirs.statistic, rtol=1e-12, what="statistic")
    if not np.isnan(theirs.pvalue):  # scipy's asymp gives NaN for n1 = n2 = 1 (n = round(0.5) = 0)
        assert_close(p, theirs.pvalue, rtol=1e-9, atol=0, what="p-value")


def test_kolmogorov_sf_matches_scipy_kstwo():
    # The asymptotic branch rests on the one-sample distribution; sweep every case of the split.
    stats = pytest.importorskip("scipy.stats")
    for n in (2, 5, 30, 140, 141, 1000, 50_000, 150_000):
        for x in (
            0.3 / n,
            0.7 / n,
            1.5 / n,
            0.5 / n**0.5,
            1.0 / n**0.5,
            1.8 / n**0.5,
            4 / n**0.5,
            0.05,
            0.3,
            0.6,
        ):
            if x >= 1:
                continue
            assert_close(
                M._kolmogorov_sf(n, x), stats.kstwo.sf(x, n), rtol=1e-9, atol=1e-15, what=f"n={n} x={x}"
            )


def test_auroc_matches_sklearn():
    roc_auc_score = pytest.importorskip("sklearn.metrics").roc_auc_score
    rng = np.random.default_rng(0)
    for n_pos, n_neg, decimals in [(1, 1, 3), (5, 9, 1), (100, 80, 1), (257, 3, 4)]:
        pos = np.round(rng.normal(0.3, 1, n_pos), decimals)  # rounding makes ties
        neg = np.round(rng.normal(0.0, 1, n_neg), decimals)
        labels = np.r_[np.ones(n_pos), np.zeros(n_neg)]
        expected = roc_auc_score(labels, np.r_[pos, neg])
        assert_close(M.auroc(torch.tensor(pos), torch.tensor(neg)), expected, what=f"{n_pos}x{n_neg}")


def test_min_k_auc_matches_muse_code():
    # muse_bench privleak: score = -mean(sorted(logp)[:int(len * 0.4)]), forget labelled 0,
    # holdout 1, roc_curve(y, -score) -> AUC; with sklearn standing in for their roc/auc.
    roc_auc_score = pytest.importorskip("sklearn.metrics").roc_auc_score
    rng = np.random.default_rng(1)
    texts = [rng.normal(-2, 1, size=rng.integers(3, 30)) for _ in range(24)]
    muse = np.array([-np.mean(np.sort(t)[: int(len(t) * 0.4)]) for t in texts])
    width = max(len(t) for t in texts)
    logp = torch.zeros(len(texts), width, dtype=torch.float64)
    mask = torch.zeros(len(texts), width, dtype=torch.bool)
    for i, t in enumerate(texts):
        logp[i, : len(t)], mask[i, : len(t)] = torch.tensor(t), True
    ours = M.min_k_scores(logp, mask, k=0.4)
    assert_close(ours, -muse, what="min-k")
    forget, holdout = ours[:12], ours[12:]
    expected = roc_auc_score(np.r_[np.zeros(12), np.ones(12)], -np.r_[muse[:12], muse[12:]])
    assert_close(M.min_k_auc(forget, holdout), expected)


def test_model_utility_matches_scipy_hmean():
    hmean = pytest.importorskip("scipy.stats").hmean
    values = np.random.default_rng(2).uniform(0.05, 1.0, size=9)
    assert_close(M.model_utility(dict(zip(M.TOFU_UTILITY_KEYS, values))), hmean(values))


# ============================================================ forget quality and its reference file
def _tofu_like_losses(seed: int, n: int = 40, k: int = 5) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.uniform(0.5, 3.0, size=n), rng.uniform(0.5, 3.0, size=(n, k))


def test_forget_quality_matches_tofu_aggregate(tmp_path):
    # aggregate_eval_stat.py get_forget_quality: ks_2samp of exp(mean perturb loss - paraphrase loss)
    # (= 1/R) for both models; our ForgetQuality uses R itself: the KS p-value is the same.
    stats = pytest.importorskip("scipy.stats")
    para_u, pert_u = _tofu_like_losses(0)
    para_r, pert_r = _tofu_like_losses(1)
    expected = stats.ks_2samp(np.exp(pert_u.mean(-1) - para_u), np.exp(pert_r.mean(-1) - para_r)).pvalue

    retain_log = {  # the retain model's eval_log_forget.json, as TOFU writes it
        "avg_paraphrased_loss": {str(i): v for i, v in enumerate(para_r)},
        "average_perturb_loss": {str(i): list(v) for i, v in enumerate(pert_r)},
    }
    (tmp_path / "eval_log_forget.json").write_text(json.dumps(retain_log))
    ratios_r = M.truth_ratio(torch.tensor(-para_r), torch.tensor(-pert_r))
    M.save_truth_ratios(tmp_path / "ratios.json", ratios_r)
    (tmp_path / "list.json").write_text(json.dumps(ratios_r.tolist()))

    for reference in ("eval_log_forget.json", "ratios.json", "list.json"):
        metric = M.ForgetQuality(tmp_path / reference)
        metric.update(torch.tensor(-para_u[:25]), torch.tensor(-pert_u[:25]))
        metric.update(torch.tensor(-para_u[25:]), torch.tensor(-pert_u[25:]))
        assert_close(metric.compute(), expected, rtol=1e-9, what=reference)
    assert_close(M.load_truth_ratios(tmp_path / "ratios.json"), ratios_r)


def test_load_truth_ratios_errors(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"truth_ratio": ["a", "b"]}))
    with pytest.raises(ValueError, match="bad.json"):
        M.load_truth_ratios(bad)
    bad.write_text(json.dumps(3.0))
    with pytest.raises(ValueError, match="bad.json"):
        M.load_truth_ratios(bad)


# ============================================================================ accumulation and rank sync
def _metric_batches():
    """(factory, list of update-kwargs batches, functional on the concatenation) per metric."""
    g = torch.Generator().manual_seed(0)
    sums = [-torch.rand(n, generator=g) * 5 for n in (3, 4)]
    counts = [torch.randint(1, 6, (n,), generator=g) for n in (3, 4)]
    para = [-torch.rand(n, generator=g) * 3 for n in (3, 4)]
    pert = [-torch.rand(n, 5, generator=g) * 3 for n in (3, 4)]
    logp = [-torch.rand(n, 7, generator=g) * 4 for n in (3, 4)]
    mask = [torch.rand(n, 7, generator=g) > 0.2 for n in (3, 4)]
    choices = [torch.randn(n, 4, generator=g) for n in (3, 4)]
    gold = [torch.randint(0, 4, (n,), generator=g) for n in (3, 4)]
    preds = [["the cat sat", "a dog ran far", "red"], ["blue sky", "", "the cat", "one two three"]]
    refs = [["the cat sat down", "the dog ran", "green"], ["the blue sky", "x", "cat", "three two one"]]
    cat = torch.cat
    return {
        "answer_probability": (
            M.AnswerProbability,
            [dict(sum_logprob=s, n_tokens=c) for s, c in zip(sums, counts)],
            M.answer_probability(cat(sums), cat(counts)).mean(),
        ),
        "truth_ratio": (
            lambda **kw: M.TruthRatio("closer_to_1", **kw),
            [dict(paraphrased_logprob=a, perturbed_logprobs=b) for a, b in zip(para, pert)],
            M.truth_ratio_score(M.truth_ratio(cat(para), cat(pert)), "closer_to_1"),
        ),
        "rouge_l": (
            lambda **kw: M.RougeL("f1", **kw),
            [dict(predictions=p, references=r) for p, r in zip(preds, refs)],
            M.rouge_l_scores(sum(preds, []), sum(refs, []), "f1").mean(),
        ),
        "min_k": (
            lambda **kw: M.MinKProbability(0.4, **kw),
            [dict(token_logprobs=a, mask=b) for a, b in zip(logp, mask)],
            M.min_k_scores(cat(logp), cat(mask), 0.4).mean(),
        ),
        "membership_auc": (
            M.MembershipAUC,
            [
                dict(forget_scores=sums[0], holdout_scores=para[0]),
                dict(forget_scores=sums[1], holdout_scores=para[1]),
            ],
            M.min_k_auc(cat(sums), cat(para)),
        ),
        "multiple_choice": (
            M.MultipleChoiceAccuracy,
            [dict(choice_logprobs=a, gold=b) for a, b in zip(choices, gold)],
            M.multiple_choice_accuracy(cat(choices), cat(gold)),
        ),
    }


@pytest.mark.parametrize("name", list(_metric_batches()))
def test_two_updates_equal_one_on_concatenation(name):
    factory, batches, expected = _metric_batches()[name]
    metric = factory()
    for batch in batches:
        metric.update(**batch)
    assert_close(metric.compute(), expected, rtol=1e-6, what=name)


def _fake_two_rank_gather(other):
    """A dist_sync_fn for 'rank 0' that returns [own state, rank 1's state], in state order."""
    other_states = []
    for attr, reduce_fn in other._reductions.items():
        value = getattr(other, attr)
        other_states.append(dim_zero_cat(value) if reduce_fn is dim_zero_cat else value)
    queue = iter(other_states)
    return lambda tensor, group=None: [tensor, next(queue)]


@pytest.mark.parametrize("name", list(_metric_batches()))
def test_sync_gathers_both_ranks(name):
    # Rank 0 saw batch 0, rank 1 saw batch 1; after the (faked) gather rank 0 must compute
    # the metric of the concatenation, then go back to its local state.
    factory, batches, expected = _metric_batches()[name]
    rank1 = factory()
    rank1.update(**batches[1])
    rank0 = factory(dist_sync_fn=_fake_two_rank_gather(rank1), distributed_available_fn=lambda: True)
    rank0.update(**batches[0])
    assert_close(rank0.compute(), expected, rtol=1e-6, what=f"{name} synced")
    local = factory()
    local.update(**batches[0])
    for attr in local._reductions:  # after compute, rank 0 is back to its own examples
        assert torch.equal(M._cat(getattr(rank0, attr)), M._cat(getattr(local, attr))), attr


def test_per_example_is_gathered_across_ranks():
    rank1 = M.AnswerProbability()
    rank1.update(torch.tensor([LN(0.25)]), torch.tensor([1]))
    rank0 = M.AnswerProbability(
        dist_sync_fn=_fake_two_rank_gather(rank1), distributed_available_fn=lambda: True
    )
    rank0.update(torch.tensor([LN(0.5), LN(0.125)]), torch.tensor([1, 1]))
    assert_close(rank0.per_example(), [0.5, 0.125, 0.25], rtol=1e-6)


def test_model_utility_metric_matches_functional():
    g = torch.Generator().manual_seed(5)
    utility = M.ModelUtility()
    stats = {}
    for split in M.TOFU_UTILITY_SPLITS:
        answer, para, pert = (
            -torch.rand(4, generator=g),
            -torch.rand(4, generator=g),
            -torch.rand(4, 3, generator=g),
        )
        if split != "retain":
            para = answer  # TOFU's base answer on real_authors / world_facts
        preds, refs = ["a b c", "b c", "c", "a"], ["a b", "c", "c d", "b"]
        for lo, hi in ((0, 1), (1, 4)):  # two batches
            utility.update(split, answer[lo:hi], para[lo:hi], pert[lo:hi], preds[lo:hi], refs[lo:hi])
        prob = answer.double().exp() if split == "retain" else M.relative_answer_probability(answer, pert)
        stats[f"{split}/prob"] = prob.mean()
        stats[f"{split}/rouge_l_recall"] = M.rouge_l_scores(preds, refs, "recall").mean()
        stats[f"{split}/truth_ratio"] = M.truth_ratio_score(M.truth_ratio(para, pert), "true_better")
    got = utility.compute_all()
    for key in M.TOFU_UTILITY_KEYS:
        assert_close(got[key], stats[key], rtol=1e-6, what=key)
    assert_close(utility.compute(), M.model_utility(stats), rtol=1e-6)
    utility.reset()
    assert all(len(m.values) == 0 for m in utility.children_metrics.values())


# ============================================================================ model-facing helpers
def test_sequence_logprobs_match_log_softmax():
    model = build_tiny_llama(vocab_size=37).eval()
    g = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, 37, (3, 9), generator=g)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 7:] = 0
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    labels[:, :4] = -100  # a 4-token prompt
    with torch.no_grad():
        total, count = M.sequence_logprobs(model, input_ids, attention_mask, labels)
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits.double()
    logsm = logits.log_softmax(-1)
    for b in range(3):
        positions = [t for t in range(1, 9) if labels[b, t] != -100]
        expected = sum(logsm[b, t - 1, input_ids[b, t]] for t in positions)
        assert count[b].item() == len(positions)
        assert_close(total[b], expected, rtol=1e-5, atol=1e-5, what=f"sequence {b}")
    with torch.no_grad():
        logp, mask = M.token_logprobs(model, input_ids, attention_mask)  # labels=None: every real token
    assert mask.sum(1).tolist() == [8, 6, 8]
    assert_close(logp[0, 0], logsm[0, 0, input_ids[0, 1]], rtol=1e-5, atol=1e-5)


class _CharTokenizer:
    """Just enough tokenizer for generate_greedy: one id per lowercase letter, 0 = pad/eos."""

    pad_token_id = eos_token_id = 0
    padding_side = "right"

    def __call__(self, texts, return_tensors=None, padding=False):
        ids = [[ord(c) - 96 for c in t] for t in texts]
        if return_tensors is None:  # as Hugging Face tokenizers: lists, unpadded
            return {"input_ids": ids, "attention_mask": [[1] * len(x) for x in ids]}
        width = max(map(len, ids))
        pad = lambda x: (
            [0] * (width - len(x)) + x if self.padding_side == "left" else x + [0] * (width - len(x))
        )
        input_ids = torch.tensor([pad(x) for x in ids])
        mask = torch.tensor([pad([1] * len(x)) for x in ids])
        return _Encoding(input_ids=input_ids, attention_mask=mask)

    def batch_decode(self, rows, skip_special_tokens=True):
        return ["".join(chr(96 + int(i)) for i in row if int(i) != 0) for row in rows]


class _Encoding(dict):
    def to(self, device):
        return _Encoding({k: v.to(device) for k, v in self.items()})


def test_generate_greedy_left_padding_is_batch_invariant():
    # With left padding, a short prompt's continuation must not depend on its batch mates.
    model = build_tiny_llama(vocab_size=27).eval()
    tokenizer = _CharTokenizer()
    prompts = ["abc", "hello", "z", "abcdefgh"]
    together = M.generate_greedy(model, tokenizer, prompts, max_new_tokens=5, batch_size=4)
    alone = [M.generate_greedy(model, tokenizer, [p], max_new_tokens=5)[0] for p in prompts]
    assert together == alone
    assert tokenizer.padding_side == "right"  # untouched
