"""blur_direction_ against a float64 oracle written from the paper's formulas, every mode."""

from __future__ import annotations

import pytest
import torch

from blur_lightning.core.projection import MODES, blur_direction_, compute_stats

# Odd shapes on purpose: 1 element, a prime, a 2-D matrix, a 3-D block, an empty tensor.
SHAPES = [(1,), (127,), (33, 17), (3, 5, 7), (0,), (65,)]

# (dtype, atol, rtol) of d against the float64 oracle. bf16 holds 8 bits of mantissa: the result
# of a fused a*r + b*f rounded once is within 2^-8 relative of the true value, plus the error of
# the coefficient, which is formed from float32 products summed in float64.
TOLERANCES = [
    (torch.float32, 1e-5, 1e-5),
    (torch.bfloat16, 2e-2, 1.6e-2),
    (torch.float16, 2e-3, 2e-3),
]


def oracle(forget, retain, mode, gamma, alpha, eps=1e-12):
    """The direction d in float64, computed from the definitions, tensor list by tensor list."""
    f = torch.cat([t.double().reshape(-1) for t in forget])
    r = torch.cat([t.double().reshape(-1) for t in retain])
    s_rf, s_ff, s_rr = (r @ f).item(), (f @ f).item(), (r @ r).item()
    if mode == "forget_lower":
        d = r + (gamma - s_rf / s_ff) * f if s_ff > eps else r
    elif mode == "forget_upper":
        d = f + (gamma - s_rf / s_rr) * r if s_rr > eps else f
    elif mode == "penalty":
        d = f + gamma * r
    elif mode == "pdu":  # lambda (alpha without a retain_weight) on g_r, gamma on g_f
        d = alpha * r + gamma * f
    else:
        d = f + alpha * (r - (s_rf / s_ff) * f) if s_ff > eps else f + alpha * r
    return d, (s_rf, s_ff, s_rr)


def random_lists(dtype, seed=0, shapes=SHAPES, correlated=0.3):
    g = torch.Generator().manual_seed(seed)
    forget = [torch.randn(s, generator=g).to(dtype) for s in shapes]
    # Correlate g_r with g_f so that the projection coefficient is far from gamma.
    retain = [(correlated * f.float() + torch.randn(s, generator=g)).to(dtype) for f, s in zip(forget, shapes)]
    return forget, retain


def assert_close_first_index(actual, expected, atol, rtol):
    diff = (actual - expected).abs()
    bad = diff > atol + rtol * expected.abs()
    if bad.any():
        i = int(bad.nonzero()[0])
        raise AssertionError(f"first mismatch at flat index {i}: got {actual[i].item()}, expected {expected[i].item()}")


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype,atol,rtol", TOLERANCES)
def test_matches_float64_oracle(mode, dtype, atol, rtol):
    forget, retain = random_lists(dtype)
    forget_before = [t.clone() for t in forget]
    expected, (s_rf, s_ff, s_rr) = oracle(forget, retain, mode, gamma=0.7, alpha=3.0)
    stats = blur_direction_(forget, retain, gamma=0.7, mode=mode, alpha=3.0, backend="torch")
    actual = torch.cat([t.double().reshape(-1) for t in retain])
    assert_close_first_index(actual, expected, atol, rtol)
    for before, after in zip(forget_before, forget):  # forget gradients are read, never written
        assert torch.equal(before, after)
    # The sums are formed in float32 products and a float64 total, whatever the input dtype.
    assert stats.dot_rf.dtype == torch.float32
    torch.testing.assert_close(stats.dot_rf.double(), torch.tensor(s_rf, dtype=torch.float64), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(stats.sq_forget.double(), torch.tensor(s_ff, dtype=torch.float64), rtol=1e-5, atol=0)
    torch.testing.assert_close(stats.sq_retain.double(), torch.tensor(s_rr, dtype=torch.float64), rtol=1e-5, atol=0)


@pytest.mark.parametrize("gamma", [0.0, 0.5, 2.0, -1.0])
def test_forget_lower_inner_product_property(gamma):
    forget, retain = random_lists(torch.float64, seed=3)
    f = torch.cat([t.reshape(-1) for t in forget])
    stats = blur_direction_(forget, retain, gamma=gamma, backend="torch")
    d = torch.cat([t.reshape(-1) for t in retain])
    # <d, g_f> = gamma * ||g_f||^2: the forget objective decreases at the rate gamma asks for.
    torch.testing.assert_close(d @ f, gamma * (f @ f), rtol=1e-10, atol=1e-10)
    # d's part orthogonal to g_f is g_r's orthogonal part, untouched.
    assert stats.forget_coef.shape == ()


def test_bf16_products_are_summed_in_float32():
    # 4096 products of 1 + 2^-8: in bf16 each product rounds to 1 + 2^-7 or 1, and a bf16
    # running sum stops growing at 256; the float32/float64 path gets 4096 * (1 + 2^-8)^2.
    x = torch.full((4096,), 1 + 2**-8, dtype=torch.bfloat16)
    stats = compute_stats([x], [x.clone()], gamma=1.0, backend="torch")
    expected = 4096 * float(x[0].double()) ** 2
    assert abs(stats.sq_forget.item() - expected) / expected < 1e-6


@pytest.mark.parametrize("mode", MODES)
def test_eps_guard_zero_forget_gradient(mode):
    retain = [torch.randn(5, 3), torch.randn(4)]
    original = [t.clone() for t in retain]
    forget = [torch.zeros(5, 3), torch.zeros(4)]
    stats = blur_direction_(forget, retain, gamma=0.5, mode=mode, alpha=2.0, backend="torch")
    assert torch.isfinite(stats.coef)
    scale = {"forget_lower": 1.0, "forget_upper": 0.5 - 0.0, "penalty": 0.5, "rmu": 2.0, "pdu": 2.0}[mode]
    for before, after in zip(original, retain):
        torch.testing.assert_close(after, scale * before)


def test_eps_guard_zero_retain_gradient_forget_upper():
    forget = [torch.randn(6)]
    retain = [torch.zeros(6)]
    blur_direction_(forget, retain, gamma=0.5, mode="forget_upper", backend="torch")
    torch.testing.assert_close(retain[0], forget[0])


def test_empty_lists_give_zero_sums():
    stats = blur_direction_([], [], gamma=1.0, backend="torch")
    assert stats.sq_forget.item() == 0.0 and stats.coef.item() == 0.0


def test_mixed_dtypes_in_one_list():
    g = torch.Generator().manual_seed(7)
    forget = [torch.randn(50, generator=g), torch.randn(31, generator=g).bfloat16()]
    retain = [torch.randn(50, generator=g), torch.randn(31, generator=g).bfloat16()]
    expected, _ = oracle(forget, retain, "forget_lower", gamma=1.0, alpha=1.0)
    blur_direction_(forget, retain, gamma=1.0, backend="torch")
    actual = torch.cat([t.double().reshape(-1) for t in retain])
    assert_close_first_index(actual, expected, atol=2e-2, rtol=1.6e-2)


def test_no_host_sync_in_projection(monkeypatch):
    """.item(), float() and bool() on a tensor are the host reads; none may run in the step."""
    forget, retain = random_lists(torch.float32)
    calls = []
    for name in ("item", "__float__", "__bool__", "tolist"):
        original = getattr(torch.Tensor, name)

        def spy(self, *a, _name=name, _original=original, **k):
            calls.append(_name)
            return _original(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, name, spy)
    blur_direction_(forget, retain, gamma=1.0, backend="torch")
    monkeypatch.undo()
    assert calls == []


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"mode": "sideways"}, "unknown mode 'sideways'"),
        ({"gamma": float("nan")}, "gamma must be a finite"),
        ({"gamma": float("inf")}, "gamma must be a finite"),
        ({"alpha": float("nan"), "mode": "rmu"}, "alpha must be a finite"),
        ({"backend": "cuda-magic"}, "unknown backend"),
    ],
)
def test_bad_arguments(kwargs, match):
    forget, retain = random_lists(torch.float32)
    kwargs = {"gamma": 1.0, **kwargs}
    with pytest.raises(ValueError, match=match):
        blur_direction_(forget, retain, **kwargs)


def test_length_and_shape_mismatch():
    with pytest.raises(ValueError, match="length mismatch: forget_grads has 2 tensors, retain_grads has 1"):
        blur_direction_([torch.ones(2), torch.ones(2)], [torch.ones(2)], gamma=1.0)
    with pytest.raises(ValueError, match=r"shape mismatch at index 1: forget_grads\[1\] is \(3,\)"):
        blur_direction_([torch.ones(2), torch.ones(3)], [torch.ones(2), torch.ones(4)], gamma=1.0)


def test_backend_env_override(monkeypatch):
    from blur_lightning.core.projection import resolve_backend

    monkeypatch.setenv("BLUR_BACKEND", "torch")
    assert resolve_backend("auto", [torch.ones(1)]) == "torch"
    monkeypatch.setenv("BLUR_BACKEND", "bogus")
    with pytest.raises(ValueError, match="BLUR_BACKEND='bogus'"):
        resolve_backend("auto", [torch.ones(1)])
    assert resolve_backend("torch", [torch.ones(1)]) == "torch"  # explicit beats the variable


def test_stats_derived_norms():
    forget, retain = random_lists(torch.float64, seed=11)
    stats = blur_direction_(forget, retain, gamma=0.3, backend="torch")
    d = torch.cat([t.reshape(-1) for t in retain])
    torch.testing.assert_close(stats.direction_norm.double(), d.norm(), rtol=1e-4, atol=1e-6)


def test_kernels_import_nothing_from_the_projection():
    """kernels/ sits below projection.py: an import back (even inside a function) is a cycle
    projection -> kernels -> kernels.adamw -> projection. Both take what they share from backends.py."""
    import ast
    import pathlib

    root = pathlib.Path(__file__).resolve().parents[1] / "kernels"
    offenders = []
    for path in sorted(root.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [node.module or ""] if isinstance(node, ast.ImportFrom) else (
                [a.name for a in node.names] if isinstance(node, ast.Import) else [])
            offenders += [f"{path.name}:{node.lineno} imports {n}" for n in names
                          if n.startswith("blur_lightning.core.projection")]
    assert not offenders, offenders
