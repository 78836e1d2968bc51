"""BLUR projected in an Adam-type optimizer's inner product (projection_metric "adam", core/metric.py)."""

from __future__ import annotations

import functools

import lightning.pytorch as pl
import pytest
import torch
from conftest import build_tiny_llama, make_batch
from test_module import fit

from blur_lightning.core.metric import AdamMetric, adam_metric
from blur_lightning.core.projection import blur_direction_, compute_stats, partial_sums
from blur_lightning.training.unlearner import BLURUnlearner

SHAPES = [(7, 3), (13,), (2, 5, 3), (1,)]  # odd sizes: no tensor is a multiple of a block


def _grads(seed: int, dtype=torch.float64) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    forget = [torch.randn(s, generator=g, dtype=torch.float64).to(dtype) for s in SHAPES]
    retain = [torch.randn(s, generator=g, dtype=torch.float64).to(dtype) for s in SHAPES]
    # second moments spread over four decades, as Adam's are across a model's coordinates
    v = [10 ** torch.empty(s, dtype=torch.float64).uniform_(-8, -4, generator=g) for s in SHAPES]
    return forget, retain, v


def _p(v: list[torch.Tensor], step: int, beta2: float, eps: float) -> torch.Tensor:
    """P as a float64 vector, written out: 1 / (sqrt(v / (1 - beta2^t)) + eps)."""
    flat = torch.cat([x.reshape(-1) for x in v]).double()
    return 1.0 / ((flat / (1.0 - beta2**step)).sqrt() + eps)


def _flat(tensors: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in tensors]).double()


@pytest.mark.parametrize("step", [1, 7, 1000])
@pytest.mark.parametrize("gamma", [0.0, 0.3, 1.0])
def test_forget_lower_guarantee_holds_for_the_preconditioned_step(step, gamma):
    forget, retain, v = _grads(step)
    metric = AdamMetric(v, [torch.tensor(float(step))] * len(v), beta2=0.999, eps=1e-8)
    g_f, g_r, p = _flat(forget), _flat(retain), _p(v, step, 0.999, 1e-8)
    blur_direction_(forget, retain, gamma=gamma, metric=metric, backend="torch")
    d = _flat(retain)
    # <P d, g_f> = gamma <g_f, P g_f>, relative to the size of the terms
    lhs, rhs = (p * d) @ g_f, gamma * (p * g_f) @ g_f
    assert abs(lhs - rhs) <= 1e-10 * ((p * g_r).abs() @ g_f.abs() + (p * g_f) @ g_f)
    # and d is the formula's, coordinate for coordinate
    expected = g_r + (gamma - (p * g_r) @ g_f / ((p * g_f) @ g_f)) * g_f
    torch.testing.assert_close(d, expected, rtol=1e-12, atol=1e-12)


def test_forget_upper_projects_the_retain_gradient_in_the_metric():
    forget, retain, v = _grads(3)
    metric = AdamMetric(v, [5] * len(v), beta2=0.99, eps=1e-8)
    g_f, g_r, p = _flat(forget), _flat(retain), _p(v, 5, 0.99, 1e-8)
    blur_direction_(forget, retain, gamma=0.5, mode="forget_upper", metric=metric, backend="torch")
    expected = g_f + (0.5 - (p * g_r) @ g_f / ((p * g_r) @ g_r)) * g_r
    torch.testing.assert_close(_flat(retain), expected, rtol=1e-12, atol=1e-12)


def test_stats_keep_the_euclidean_sums():
    """The logged norms, the clip and the finiteness check read the plain sums; only the coefficients change."""
    forget, retain, v = _grads(4)
    metric = AdamMetric(v, [3] * len(v), beta2=0.999, eps=1e-8)
    plain = compute_stats(forget, retain, gamma=1.0, backend="torch")
    weighted = compute_stats(forget, retain, gamma=1.0, backend="torch", metric=metric)
    for name in ("dot_rf", "sq_forget", "sq_retain"):
        assert torch.equal(getattr(plain, name), getattr(weighted, name))
    assert not torch.allclose(plain.forget_coef, weighted.forget_coef)


@pytest.mark.parametrize(("dtype", "tol"), [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_low_precision_gradients_match_the_float64_oracle(dtype, tol):
    forget, retain, v = _grads(5, dtype)
    metric = AdamMetric([x.float() for x in v], [9] * len(v), beta2=0.999, eps=1e-8)
    stats = compute_stats(forget, retain, gamma=0.3, backend="torch", metric=metric)
    g_f, g_r, p = _flat(forget), _flat(retain), _p(v, 9, 0.999, 1e-8)
    expected = 0.3 - (p * g_r) @ g_f / ((p * g_f) @ g_f)
    assert abs(float(stats.forget_coef) - float(expected)) <= tol * max(1.0, abs(float(expected)))


def test_a_uniform_second_moment_is_the_identity():
    """P = c I changes no coefficient: the metric only matters through v's spread."""
    forget, retain, _ = _grads(6)
    v = [torch.full(s, 3e-6, dtype=torch.float64) for s in SHAPES]
    metric = AdamMetric(v, [4] * len(v), beta2=0.999, eps=1e-8)
    plain = compute_stats(forget, retain, gamma=0.7, backend="torch")
    weighted = compute_stats(forget, retain, gamma=0.7, backend="torch", metric=metric)
    torch.testing.assert_close(weighted.forget_coef, plain.forget_coef, rtol=1e-12, atol=0)


def test_adam_metric_reads_the_optimizer_and_refuses_what_has_no_second_moment():
    model = torch.nn.Linear(3, 2)
    params = list(model.parameters())
    adamw = torch.optim.AdamW(params, lr=1e-3, betas=(0.9, 0.95), eps=1e-6)
    assert adam_metric(adamw, params) is None  # before the first step: the identity
    model(torch.randn(4, 3)).sum().backward()
    adamw.step()
    metric = adam_metric(adamw, params)
    assert (metric.beta2, metric.eps) == (0.95, 1e-6)
    assert metric.exp_avg_sqs[0] is adamw.state[params[0]]["exp_avg_sq"]
    with pytest.raises(ValueError, match="projection_metric='adam' needs an Adam-type optimizer.*SGD"):
        adam_metric(torch.optim.SGD(params, lr=0.1), params)
    with pytest.raises(ValueError, match="amsgrad"):
        adam_metric(torch.optim.Adam(params, amsgrad=True), params)


def test_unknown_metric_is_refused_by_name():
    with pytest.raises(ValueError, match="projection_metric='fisher'"):
        BLURUnlearner(model=build_tiny_llama(), projection_metric="fisher")


class _CheckGuarantee(pl.Callback):
    """At each optimizer step, before AdamW moves: <P d, g_f> against gamma <g_f, P g_f>, in float64."""

    def __init__(self):
        self.checked = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        params = [p for p in pl_module.trainable_parameters() if p.grad is not None]
        state = [optimizer.state.get(p, {}) for p in params]
        if not all("exp_avg_sq" in s for s in state):
            return  # the first step projects in the identity
        beta2, eps = optimizer.param_groups[0]["betas"][1], optimizer.param_groups[0]["eps"]
        p = _p([s["exp_avg_sq"] for s in state], int(state[0]["step"]), beta2, eps)
        d = _flat([q.grad for q in params])
        stash = dict(zip(pl_module.trainable_parameters(), pl_module._window.forget_stash))
        g_f = _flat([stash[q] for q in params])
        lhs, rhs = (p * d) @ g_f, pl_module.hparams.gamma * (p * g_f) @ g_f
        self.checked.append(float(abs(lhs - rhs) / rhs.abs()))


def test_a_real_step_keeps_the_guarantee_in_adams_geometry(one_thread):
    module = BLURUnlearner(model=build_tiny_llama(), forget_loss="ga", gamma=0.5, projection_metric="adam",
                           optimizer=functools.partial(torch.optim.AdamW, lr=1e-3), export_dir=None)  # fmt: skip
    check = _CheckGuarantee()
    fit(module, [make_batch(seed=s) for s in range(3)], callbacks=[check])
    assert len(check.checked) == 2  # steps 2 and 3; step 1 had no second moment
    assert max(check.checked) < 1e-4  # float32 sums and gradients


def test_shard_partials_sum_to_the_whole_model():
    """FSDP2's dim-0 shards (and DDP's ranks' identical copies) reduce the 6 partials exactly as the plain 3."""
    forget, retain, v = _grads(8)
    steps = [6] * len(v)
    whole = partial_sums(forget, retain, backend="torch", metric=AdamMetric(v, steps, 0.999, 1e-8))
    shards = torch.zeros(6, dtype=torch.float64)
    for rank in range(2):  # torch.chunk on dim 0, as FSDP2's Shard(0): rank 1 of a size-1 tensor is empty
        def local(ts, rank=rank):
            return [t.chunk(2)[rank] if len(t.chunk(2)) > rank else t[:0] for t in ts]
        shards += partial_sums(local(forget), local(retain), backend="torch",
                               metric=AdamMetric(local(v), steps, 0.999, 1e-8))  # fmt: skip
    assert whole.shape == (6,)
    torch.testing.assert_close(shards, whole, rtol=1e-13, atol=1e-15)
