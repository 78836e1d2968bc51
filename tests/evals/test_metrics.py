"""Unlearning metrics: hand-worked values, the conventions where codebases differ, rank sync."""

from __future__ import annotations

import math
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from torchmetrics.utilities.data import dim_zero_cat  # noqa: E402

from blur_lightning.evals import metric_classes as C  # noqa: E402
from blur_lightning.evals import metrics as M  # noqa: E402

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
def test_normalized_probability_by_hand():
    # answer 1: sum log-prob -6 over 3 tokens -> exp(-2) = 0.135335...
    # answer 2: three tokens of p = 1/2 -> sum 3 ln(1/2) -> exp(ln(1/2)) = 0.5
    # mean = (0.1353352832 + 0.5) / 2 = 0.3176676416
    sums = torch.tensor([-6.0, 3 * LN(0.5)])
    counts = torch.tensor([3, 3])
    assert_close(M.normalized_probability(sums, counts), [math.exp(-2), 0.5], rtol=1e-6)
    metric = C.AnswerProbability()
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
    metric = C.TruthRatio("true_better")
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
    # The Porter stemmer (TOFU's convention) matches "running"/"runs" to "run": 2 of 4 reference
    # tokens (a, runner, was, running) are in the prediction without it, 3 with it.
    assert M.rouge_l("the runner runs", "a runner was running")["recall"] == 0.25
    assert M.rouge_l("the runner runs", "a runner was running", "porter")["recall"] == 0.5
    with pytest.raises(ValueError, match="stemmer must be one of"):
        M.rouge_l("a", "a", "snowball")


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
    metric = C.PrivLeak(auc_retrain=0.5)
    metric.update(forget_scores=forget, holdout_scores=holdout)
    assert_close(metric.compute(), -100.0)


def test_multiple_choice_by_hand():
    # argmax per row: 0 (gold 0, hit), 1 (gold 2, miss), 2 (gold 2, hit) -> 2/3
    logp = torch.tensor([[-1.0, -2.0, -3.0, -4.0], [-3.0, -1.0, -2.0, -5.0], [-2.0, -2.0, -1.0, -9.0]])
    gold = torch.tensor([0, 2, 2])
    assert_close(M.multiple_choice_accuracy(logp, gold), 2 / 3)
    metric = C.MultipleChoiceAccuracy()
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
def test_rouge_l_stemmer_option_is_rouge_scores(use_stemmer):
    """The option's wiring: "porter" is rouge-score's use_stemmer=True, None its False (and they differ)."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=use_stemmer)
    stemmer = "porter" if use_stemmer else None
    for i, (prediction, reference) in enumerate(ROUGE_PAIRS):
        theirs = scorer.score(reference, prediction)["rougeL"]  # score(target, prediction)
        ours = M.rouge_l(prediction, reference, stemmer)
        assert_close(
            [ours["precision"], ours["recall"], ours["f1"]],
            [theirs.precision, theirs.recall, theirs.fmeasure],
            what=f"pair {i} stemmer={use_stemmer}",
        )
    other = "porter" if stemmer is None else None
    assert M.rouge_l("the runner runs", "a runner was running", stemmer) != M.rouge_l(
        "the runner runs", "a runner was running", other
    )


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
            C.AnswerProbability,
            [dict(sum_logprob=s, n_tokens=c) for s, c in zip(sums, counts)],
            M.normalized_probability(cat(sums), cat(counts)).mean(),
        ),
        "truth_ratio": (
            lambda **kw: C.TruthRatio("closer_to_1", **kw),
            [dict(paraphrased_logprob=a, perturbed_logprobs=b) for a, b in zip(para, pert)],
            M.truth_ratio_score(M.truth_ratio(cat(para), cat(pert)), "closer_to_1"),
        ),
        "rouge_l": (
            lambda **kw: C.RougeL("f1", **kw),
            [dict(predictions=p, references=r) for p, r in zip(preds, refs)],
            M.rouge_l_scores(sum(preds, []), sum(refs, []), "f1").mean(),
        ),
        "min_k": (
            lambda **kw: C.MinKProbability(0.4, **kw),
            [dict(token_logprobs=a, mask=b) for a, b in zip(logp, mask)],
            M.min_k_scores(cat(logp), cat(mask), 0.4).mean(),
        ),
        "membership_auc": (
            C.MembershipAUC,
            [
                dict(forget_scores=sums[0], holdout_scores=para[0]),
                dict(forget_scores=sums[1], holdout_scores=para[1]),
            ],
            M.min_k_auc(cat(sums), cat(para)),
        ),
        "multiple_choice": (
            C.MultipleChoiceAccuracy,
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
        assert torch.equal(C._cat(getattr(rank0, attr)), C._cat(getattr(local, attr))), attr


def test_per_example_is_gathered_across_ranks():
    rank1 = C.AnswerProbability()
    rank1.update(torch.tensor([LN(0.25)]), torch.tensor([1]))
    rank0 = C.AnswerProbability(
        dist_sync_fn=_fake_two_rank_gather(rank1), distributed_available_fn=lambda: True
    )
    rank0.update(torch.tensor([LN(0.5), LN(0.125)]), torch.tensor([1, 1]))
    assert_close(rank0.per_example(), [0.5, 0.125, 0.25], rtol=1e-6)


def test_model_utility_metric_matches_functional():
    g = torch.Generator().manual_seed(5)
    utility = C.ModelUtility()
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


# ============================================================================ conventions
def test_forget_quality_of_a_model_against_itself_is_one_with_ties():
    """Per-example truth ratios are stored in float64: in float32 a model compared with its own
    float64 reference had tie groups split by rounding and got a KS p-value below 1."""
    g = torch.Generator().manual_seed(3)
    para = (-torch.rand(4, generator=g, dtype=torch.float64) * 3).repeat(10)  # 4 questions, 10 times each
    pert = (-torch.rand(4, 5, generator=g, dtype=torch.float64) * 3).repeat(10, 1)  # (40, 5): tie groups of 10
    reference = M.truth_ratio(para, pert)
    metric = C.ForgetQuality(reference)
    metric.update(para, pert)
    assert metric.per_example().dtype == torch.float64
    assert_close(metric.compute(), 1.0, rtol=0, atol=1e-12, what="p-value against itself")  # float32: 0.165


def test_tofu_utility_stems_rouge_by_default():
    """TOFU ran rouge-score with use_stemmer=True; ModelUtility and RougeL used to default to none."""
    utility = C.ModelUtility()
    assert {m.stemmer for k, m in utility.children_metrics.items() if "rouge" in k} == {"porter"}
    utility_none = C.ModelUtility(rouge_stemmer=None)
    assert {m.stemmer for k, m in utility_none.children_metrics.items() if "rouge" in k} == {None}


def test_truth_ratio_eps_is_open_unlearnings_convention():
    """open-unlearning divides by P_norm(paraphrase) + 1e-10 and takes min(R, 1 / (R + 1e-10));
    TOFU (eps 0) does neither. They differ only when the paraphrase's probability is near 1e-10."""
    para = torch.tensor([LN(0.5), -25.0], dtype=torch.float64)  # exp(-25) = 1.4e-11
    pert = torch.tensor([[LN(0.25)], [-25.0]], dtype=torch.float64)
    tofu = M.truth_ratio(para, pert)
    ou = M.truth_ratio(para, pert, eps=1e-10)
    assert_close(tofu, [0.5, 1.0])
    p = math.exp(-25.0)
    assert_close(ou, [0.25 / (0.5 + 1e-10), p / (p + 1e-10)], rtol=1e-12)
    assert ou[1] < 0.13  # 1.0 in TOFU's convention
    assert_close(M.truth_ratio_score(ou, "closer_to_1", eps=1e-10), (ou[0] + ou[1]) / 2, rtol=1e-9)
