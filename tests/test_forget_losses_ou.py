"""open-unlearning's further forget losses against their definitions, computed here element by element.

    loss     per answer token t (y_t the label, p_t = p(y_t), weights held constant)      reduction
    WGA      p_t^b log p_t                                                               mean per sequence,
    SatImp   p_t^b1 (1 - p_t)^b2 log p_t                                                 then over sequences
    CE-U     -sum_j q_j log p_j, q = softmax(logits) with y_t removed; first n skipped   (open-unlearning:
    UNDIAL   -sum_j q_j log p_j, q = softmax(ref_logits - b onehot(y_t))                 pooled tokens; UNDIAL
    DPO      -(2/b) log sigmoid(b ((lw - rw) - (ll - rl))) per sequence, l = sum log p   every position)

The references below loop over sequences and positions with an explicit log-softmax (z - logsumexp z)
in float64; the losses upcast bf16 to float32 and keep float64 as float64, so float64 inputs agree to
~1e-12 (a float32 downcast would miss that by ~1e-7), float32 to ~1e-6, bfloat16 to its logits' rounding.
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import make_side

from blur_lightning.losses import functional as losses

VOCAB = 7
# inputs' dtype -> (rtol, atol) against the float64 reference on the same (rounded) inputs
TOLERANCES = {torch.float64: (1e-11, 1e-12), torch.float32: (1e-5, 1e-6), torch.bfloat16: (1e-2, 1e-3)}


def fixed(seed=0, batch=4, length=9):
    g = torch.Generator().manual_seed(seed)
    side = make_side(batch, length, seed=seed, vocab_size=VOCAB)  # prompt 3, rows 1, 2 padded
    logits = torch.randn(batch, length, VOCAB, generator=g, dtype=torch.float64) * 2
    ref_logits = torch.randn(batch, length, VOCAB, generator=g, dtype=torch.float64) * 2
    return side, logits, ref_logits


def log_softmax(z):  # one row (V,), written out; the shift m is a constant (it cancels)
    m = max(z.tolist())
    return z - (m + torch.log(sum(torch.exp(z[j] - m) for j in range(z.shape[0]))))


def per_token_reference(logits, labels, term):
    """mean over sequences of the mean over answer positions of term(logp_row, y, b, t)."""
    seqs = []
    for b in range(labels.shape[0]):
        vals = [term(log_softmax(logits[b, t]), int(labels[b, t + 1]), b, t)
                for t in range(labels.shape[1] - 1) if labels[b, t + 1] != -100]
        seqs.append(sum(vals) / len(vals) if vals else torch.zeros((), dtype=torch.float64))
    return sum(seqs) / len(seqs)


def wga_term(beta):
    return lambda lp, y, b, t: math.exp(lp[y].item()) ** beta * lp[y]


def satimp_term(beta1, beta2):
    def term(lp, y, b, t):
        p = math.exp(lp[y].item())
        return p**beta1 * (1 - p) ** beta2 * lp[y]

    return term


def ceu_reference(logits, labels, n):
    keep = labels.clone()
    for b in range(labels.shape[0]):  # drop each answer's first n tokens
        answer = [t for t in range(labels.shape[1]) if labels[b, t] != -100]
        for t in answer[:n]:
            keep[b, t] = -100

    def term(lp, y, b, t):
        others = [j for j in range(VOCAB) if j != y]
        z = logits[b, t].detach()
        norm = sum(math.exp(z[j].item()) for j in others)
        return -sum(math.exp(z[j].item()) / norm * lp[j] for j in others)

    return per_token_reference(logits, keep, term)


def undial_reference(logits, ref_logits, labels, beta):
    def term(lp, y, b, t):
        z = ref_logits[b, t].clone()
        z[y] -= beta
        q = log_softmax(z).exp()
        return -sum(q[j].item() * lp[j] for j in range(VOCAB))

    return per_token_reference(logits, labels, term)


def seq_logprob_reference(logits, labels):
    return [sum((log_softmax(logits[b, t])[int(labels[b, t + 1])] for t in range(labels.shape[1] - 1)
                 if labels[b, t + 1] != -100), torch.zeros((), dtype=torch.float64)) for b in range(labels.shape[0])]


def dpo_reference(logits_w, labels_w, ref_w, logits_l, labels_l, ref_l, beta):
    lw, ll = seq_logprob_reference(logits_w, labels_w), seq_logprob_reference(logits_l, labels_l)
    terms = [-(2 / beta) * torch.nn.functional.logsigmoid(beta * ((lw[b] - ref_w[b]) - (ll[b] - ref_l[b])))
             for b in range(len(lw))]
    return sum(terms) / len(terms)


CASES = {
    "wga": (lambda lg, rf, lb: losses.wga_loss(lg, lb, beta=1.0),
            lambda lg, rf, lb: per_token_reference(lg, lb, wga_term(1.0))),
    "wga-beta2.5": (lambda lg, rf, lb: losses.wga_loss(lg, lb, beta=2.5),
                    lambda lg, rf, lb: per_token_reference(lg, lb, wga_term(2.5))),
    "satimp": (lambda lg, rf, lb: losses.satimp_loss(lg, lb, beta1=5.0, beta2=1.0),
               lambda lg, rf, lb: per_token_reference(lg, lb, satimp_term(5.0, 1.0))),
    "satimp-0.5-2": (lambda lg, rf, lb: losses.satimp_loss(lg, lb, beta1=0.5, beta2=2.0),
                     lambda lg, rf, lb: per_token_reference(lg, lb, satimp_term(0.5, 2.0))),
    "ceu": (lambda lg, rf, lb: losses.ceu_loss(lg, lb, ignore_first_n=1),
            lambda lg, rf, lb: ceu_reference(lg, lb, 1)),
    "ceu-n0": (lambda lg, rf, lb: losses.ceu_loss(lg, lb, ignore_first_n=0),
               lambda lg, rf, lb: ceu_reference(lg, lb, 0)),
    "ceu-n3": (lambda lg, rf, lb: losses.ceu_loss(lg, lb, ignore_first_n=3),
               lambda lg, rf, lb: ceu_reference(lg, lb, 3)),
    "undial": (lambda lg, rf, lb: losses.undial_loss(lg, rf, lb, beta=10.0),
               lambda lg, rf, lb: undial_reference(lg, rf, lb, 10.0)),
    "undial-beta1": (lambda lg, rf, lb: losses.undial_loss(lg, rf, lb, beta=1.0),
                     lambda lg, rf, lb: undial_reference(lg, rf, lb, 1.0)),
}


@pytest.mark.parametrize("dtype", list(TOLERANCES), ids=str)
@pytest.mark.parametrize("name", list(CASES))
def test_token_losses_equal_their_definitions(name, dtype):
    """Value and gradient (weights and targets held constant) against the element-by-element reference."""
    ours, reference = CASES[name]
    side, logits, ref_logits = fixed()
    logits, ref_logits = logits.to(dtype).double(), ref_logits.to(dtype).double()  # the same rounded inputs
    x = logits.to(dtype).detach().clone().requires_grad_(True)
    got = ours(x, ref_logits.to(dtype), side["labels"])
    got.backward()
    xr = logits.detach().clone().requires_grad_(True)
    want = reference(xr, ref_logits, side["labels"])
    want.backward()
    rtol, atol = TOLERANCES[dtype]
    torch.testing.assert_close(got.double(), want, rtol=rtol, atol=atol)
    torch.testing.assert_close(x.grad.double(), xr.grad, rtol=rtol, atol=atol * 10)


@pytest.mark.parametrize("dtype", list(TOLERANCES), ids=str)
def test_dpo_equals_its_definition(dtype):
    side, logits_l, logits_w = fixed(seed=1)
    refusal = make_side(4, 9, seed=5, vocab_size=VOCAB)
    g = torch.Generator().manual_seed(3)
    ref_w, ref_l = (-5 * torch.rand(4, generator=g, dtype=torch.float64) for _ in range(2))
    for beta in (0.1, 1.0):
        got = losses.dpo_loss_from_logprobs(logits_w.to(dtype), refusal["labels"], ref_w,
                                            logits_l.to(dtype), side["labels"], ref_l, beta=beta)
        want = dpo_reference(logits_w.to(dtype).double(), refusal["labels"], ref_w,
                             logits_l.to(dtype).double(), side["labels"], ref_l, beta)
        rtol, atol = TOLERANCES[dtype]
        torch.testing.assert_close(got.double(), want, rtol=rtol, atol=atol * 10)


def test_token_pooled_average_differs_only_with_uneven_answers():
    """open-unlearning pools WGA's answer tokens over the batch; ours averages each sequence first.
    With equal answer lengths they agree; with make_side's uneven padding they do not."""
    side, logits, _ = fixed()
    logp, mask = losses.token_logprobs(logits, side["labels"])
    pooled = lambda m: (logp.detach().exp() * logp * m).sum() / m.sum()  # noqa: E731
    assert not torch.isclose(losses.wga_loss(logits, side["labels"]).double(), pooled(mask).double(), rtol=1e-4)
    even = side["labels"][:, :6].clone()  # every row unpadded in its first 6 positions: 3 answer tokens each
    logp, mask = losses.token_logprobs(logits[:, :6], even)
    torch.testing.assert_close(losses.wga_loss(logits[:, :6], even).double(), pooled(mask).double(), rtol=1e-6, atol=0)


@pytest.mark.parametrize("name", ["wga", "satimp", "ceu", "undial"])
def test_k_micro_batches_over_k_equal_one_batch(name):
    """The file's convention: k equal micro-batches, each loss divided by k, give the full batch's gradient."""
    ours, _ = CASES[name]
    side, logits, ref_logits = fixed(batch=6)
    full = logits.clone().requires_grad_(True)
    ours(full, ref_logits, side["labels"]).backward()
    parts = logits.clone().requires_grad_(True)
    for rows in (slice(0, 2), slice(2, 4), slice(4, 6)):
        (ours(parts[rows], ref_logits[rows], side["labels"][rows]) / 3).backward()
    torch.testing.assert_close(parts.grad, full.grad, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("field,value,expected", [
    ("wga_beta", -1.0, "a finite number >= 0"), ("satimp_beta1", float("nan"), "a finite number >= 0"),
    ("satimp_beta2", -0.5, "a finite number >= 0"), ("wga_beta", float("inf"), "a finite number >= 0"),
    ("undial_beta", -10.0, "a finite number >= 0"), ("undial_beta", float("inf"), "a finite number >= 0"),
    ("dpo_beta", 0.0, "a finite number > 0"), ("dpo_beta", float("inf"), "a finite number > 0"),
    ("ceu_ignore_first_n", -1, "an int >= 0"),
    ("ceu_ignore_first_n", 1.5, "an int >= 0"), ("ceu_ignore_first_n", True, "an int >= 0"),
])  # fmt: skip
def test_bad_settings_name_the_field(field, value, expected):
    from conftest import build_tiny_llama

    from blur_lightning.training.unlearner import BLURUnlearner

    with pytest.raises(ValueError, match=rf"^{field}=.*: expected {expected}"):
        BLURUnlearner(build_tiny_llama(), export_dir=None, **{field: value})


def test_dpo_k_micro_batches_over_k_equal_one_batch():
    """DPO is a mean over sequences of log sigmoid(margin), so 3 micro-batches of 2, each /3, give the
    gradient of the batch of 6 on both the refusal (preferred) and the forget (dispreferred) logits."""
    side, logits_l, logits_w = fixed(seed=2, batch=6)
    refusal = make_side(6, 9, seed=7, vocab_size=VOCAB)
    g = torch.Generator().manual_seed(4)
    ref_w, ref_l = (-5 * torch.rand(6, generator=g, dtype=torch.float64) for _ in range(2))

    def grads(rows_list):
        win, lose = logits_w.clone().requires_grad_(True), logits_l.clone().requires_grad_(True)
        for rows in rows_list:
            loss = losses.dpo_loss_from_logprobs(win[rows], refusal["labels"][rows], ref_w[rows],
                                                 lose[rows], side["labels"][rows], ref_l[rows], beta=0.1)
            (loss / len(rows_list)).backward()
        return win.grad, lose.grad

    full = grads([slice(0, 6)])
    parts = grads([slice(0, 2), slice(2, 4), slice(4, 6)])
    assert full[0].abs().sum() > 0 and full[1].abs().sum() > 0  # both sides carry gradient
    for got, want in zip(parts, full):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("loss", ["wga", "satimp", "ceu", "pdu_entropic"])
def test_token_reduction_pools_the_batchs_answer_tokens(loss):
    """token_reduction "token": one mean over every answer token of the batch (open-unlearning's), written out."""
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(2, 7, 5, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 5, (2, 7), generator=g)
    labels[0, :2] = losses.IGNORE_INDEX
    labels[1, :5] = losses.IGNORE_INDEX  # 5 answer tokens against 2: the reductions differ
    fn = {"wga": losses.wga_loss, "satimp": losses.satimp_loss, "ceu": losses.ceu_loss,
          "pdu_entropic": losses.entropic_forget_loss}[loss]  # fmt: skip
    kwargs = {"ignore_first_n": 0} if loss == "ceu" else {}
    pooled = fn(logits, labels, reduction="token", **kwargs)
    per_seq = fn(logits, labels, reduction="sequence", **kwargs)
    # the pooled mean = the per-sequence means weighted by their token counts
    kept = labels if loss == "pdu_entropic" else labels[:, 1:]  # pdu's positions are unshifted
    counts = (kept != losses.IGNORE_INDEX).sum(1).double()
    singles = torch.stack([fn(logits[i : i + 1], labels[i : i + 1], reduction="sequence", **kwargs) for i in range(2)])
    torch.testing.assert_close(pooled, (singles * counts).sum() / counts.sum(), rtol=1e-12, atol=1e-12)
    assert not torch.allclose(pooled, per_seq)
    with pytest.raises(ValueError, match="token_reduction='mean'"):
        fn(logits, labels, reduction="mean", **kwargs)
