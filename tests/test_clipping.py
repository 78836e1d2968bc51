"""Clipping on the true gradients (blur_lightning.core.clipping) against float64 references.

The references materialize what the fast paths never write: d = a g_r + b g_f in float64, clipped by
torch's clip_grad_norm_ (norm) or a clamp (value). The fast paths: the factor folded into the
projection's coefficients (`combine_clipped_`) and the in-memory clip (`clip_`), each also with the
gradients multiplied by a GradScaler-like scale S, where they must clip the true gradient.
"""

from __future__ import annotations

import pytest
import torch

from blur_lightning.core.clipping import clip_, combine_clipped_
from blur_lightning.core.projection import MODES, compute_stats

SHAPES = [(1,), (127,), (33, 17), (3, 5, 7), (0,), (65,)]
SCALES = [None, 1024.0]


def grads(seed: int, dtype=torch.float64, factor: float = 1.0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(s, generator=g, dtype=torch.float64) * factor).to(dtype) for s in SHAPES]


def torch_clipped(tensors: list[torch.Tensor], max_value: float, algorithm: str) -> list[torch.Tensor]:
    params = [torch.nn.Parameter(torch.zeros_like(t)) for t in tensors]
    for p, t in zip(params, tensors):
        p.grad = t.clone()
    if algorithm == "norm":
        torch.nn.utils.clip_grad_norm_(params, max_value)
    else:
        torch.nn.utils.clip_grad_value_(params, max_value)
    return [p.grad for p in params]


@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize("algorithm", ["norm", "value"])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("max_value", [0.05, 1e6])  # active, and inactive (d is left as it is)
def test_combine_clipped_equals_clipping_the_materialized_direction(mode, algorithm, scale, max_value):
    forget, retain = grads(1), grads(2, factor=3.0)
    stats_true = compute_stats(forget, retain, gamma=0.7, mode=mode, alpha=2.0)
    d = [stats_true.retain_coef * r + stats_true.forget_coef * f for r, f in zip(retain, forget)]
    expected = torch_clipped(d, max_value, algorithm)
    s = 1.0 if scale is None else scale
    scale_t = None if scale is None else torch.tensor(scale, dtype=torch.float32)
    forget_s, retain_s = [f * s for f in forget], [r * s for r in retain]  # what 16-mixed hands over
    stats = compute_stats(forget_s, retain_s, gamma=0.7, mode=mode, alpha=2.0, grad_scale=scale_t)
    combine_clipped_(forget_s, retain_s, stats, max_value=max_value, algorithm=algorithm, mode=mode,
                     scale=scale_t, backend="torch")  # fmt: skip
    for i, (got, want) in enumerate(zip(retain_s, expected)):
        # 1e-6: the coefficients and the clip factor are float32 device scalars (BLURStats), whatever the grads
        torch.testing.assert_close(got / s, want, rtol=1e-6, atol=1e-9, msg=f"tensor {i} ({SHAPES[i]})")
    if algorithm == "norm" and max_value < 1:  # the clip was active: the true ||d|| is the clip value
        norm = torch.cat([g.reshape(-1) / s for g in retain_s]).norm().item()
        assert norm == pytest.approx(max_value, rel=1e-6)


@pytest.mark.parametrize(
    "dtype,rtol,atol", [(torch.float64, 1e-12, 1e-15), (torch.float32, 1e-6, 1e-7), (torch.bfloat16, 1e-2, 1e-3)]
)
@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize("algorithm", ["norm", "value"])
def test_clip_in_memory_equals_torch_on_the_true_gradient(dtype, rtol, atol, scale, algorithm):
    true = grads(3)
    expected = torch_clipped(true, 0.1, algorithm)
    s = 1.0 if scale is None else scale
    ours = [(t * s).to(dtype) for t in true]
    norm = clip_(ours, 0.1, algorithm, scale=None if scale is None else torch.tensor(scale))
    for i, (got, want) in enumerate(zip(ours, expected)):
        torch.testing.assert_close(got.double() / s, want, rtol=rtol, atol=atol * 10, msg=f"tensor {i}")
    if algorithm == "norm":  # the returned norm is the true one, before clipping
        true_norm = torch.cat([t.reshape(-1) for t in true]).norm()
        torch.testing.assert_close(norm, true_norm, rtol=max(rtol, 1e-6) * 10, atol=0)
    else:
        assert norm is None


def test_a_bad_algorithm_is_named():
    with pytest.raises(ValueError, match="gradient_clip_algorithm='max'"):
        clip_([torch.ones(3)], 1.0, "max")


def test_check_and_clip_flags_a_non_finite_step_and_clips_the_true_gradient():
    from blur_lightning.core.step import check_and_clip_

    true = grads(4)
    scale = torch.tensor(1024.0)
    scaled = [t * 1024.0 for t in true]
    finite = check_and_clip_(torch.tensor(2.0), scaled, max_value=0.1, scale=scale)
    assert finite.dtype == torch.bool and bool(finite)
    for got, want in zip(scaled, torch_clipped(true, 0.1, "norm")):
        torch.testing.assert_close(got / 1024.0, want, rtol=1e-9, atol=1e-12)
    assert not bool(check_and_clip_(torch.tensor(float("nan")), grads(4)))  # a NaN loss
    poisoned = grads(4)
    poisoned[2][0, 0] = float("inf")
    assert not bool(check_and_clip_(torch.tensor(1.0), poisoned))  # an infinite gradient entry


def test_a_zero_limit_is_no_clip_on_every_path():
    """Lightning's convention (0: clipping off), for the folded clip, the in-memory one and the step's."""
    from blur_lightning.core.clipping import clipped_coefs
    from blur_lightning.core.step import check_and_clip_

    forget, retain = grads(5), grads(6)
    stats = compute_stats(forget, retain, gamma=1.0)
    assert clipped_coefs(stats, 0.0) == (stats.retain_coef, stats.forget_coef)
    d = [stats.retain_coef * r + stats.forget_coef * f for r, f in zip(retain, forget)]
    for algorithm in ("norm", "value"):
        combined = [r.clone() for r in retain]
        combine_clipped_(forget, combined, stats, max_value=0.0, algorithm=algorithm, mode="forget_lower",
                         backend="torch")  # fmt: skip
        for got, want in zip(combined, d):
            torch.testing.assert_close(got, want, rtol=1e-12, atol=0)
        kept = grads(7)
        check_and_clip_(torch.tensor(1.0), kept, max_value=0.0, algorithm=algorithm)
        for got, want in zip(kept, grads(7)):
            assert torch.equal(got, want)
