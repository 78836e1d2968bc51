"""The Triton kernels against float64 references.

CPU tensors run the kernels under the Triton interpreter: TRITON_INTERPRET=1 is set below when no
GPU is present, before blur_lightning.kernels is imported (the kernels use only triton builtins,
so it also works when another test module imported triton first). The `cuda` cases are the same
checks on a GPU, marked `gpu` and skipped without one. Interpreter calls stay at or under ~1M
elements: it runs ~400x slower than torch.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from authors_projection import authors_projection  # noqa: E402  (benchmarks/, on the path from conftest)

from blur_lightning.core.projection import MODES, blur_direction_, compute_stats  # noqa: E402
from blur_lightning.kernels import (  # noqa: E402
    BLURFusedAdamW,
    _launch,
    blur_adamw_step_,
    multi_tensor_combine_,
    multi_tensor_dots,
)
from blur_lightning.kernels.reference import (  # noqa: E402
    blur_adamw_step_ref_,
    combine_ref,
    multi_tensor_dots_ref,
)

CUDA = pytest.param(
    "cuda",
    marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")],
)
DEVICES = ["cpu", CUDA]

# Odd sizes: a single element, less than a block, a block's worth plus one chunk tail.
ODD_SIZES = [1, 127, 65537]


@pytest.fixture(autouse=True)
def _kernel_env(monkeypatch, request):
    """Poison every kernel-filled buffer; make CPU cases need the interpreter, CUDA cases the compiler."""
    device = request.node.callspec.params.get("device", "cpu") if hasattr(request.node, "callspec") else "cpu"
    if device == "cpu" and not _launch.interpreting():
        pytest.skip("CPU kernel tests need TRITON_INTERPRET=1 set before blur_lightning.kernels is imported")
    if device == "cuda" and _launch.interpreting():
        pytest.skip("CUDA kernel tests need a process without TRITON_INTERPRET")
    monkeypatch.setattr(_launch, "POISON", True)
    _launch.clear_tables()
    yield
    _launch.clear_tables()


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def randn(shape, dtype, device, seed: int) -> torch.Tensor:
    """Random normal values drawn on the CPU (same values on every device), never zeros."""
    return torch.randn(shape, generator=_generator(seed), dtype=torch.float32).to(dtype=dtype, device=device)


def random_list(sizes, dtypes, device, seed: int) -> list[torch.Tensor]:
    return [randn(n, dtypes[i % len(dtypes)], device, seed * 100_003 + i) for i, n in enumerate(sizes)]


def mixed_sizes(count: int, total_max: int, seed: int) -> list[int]:
    """`count` sizes from 1 to a few thousand, with odd ones, summing to at most total_max."""
    sizes = torch.randint(1, 2 * total_max // count, (count,), generator=_generator(seed)).tolist()
    sizes[0], sizes[1], sizes[2] = 1, 127, 4097  # the awkward ones are always there
    return sizes


def assert_close(actual: torch.Tensor, expected: torch.Tensor, atol: float, rtol: float, name: str) -> None:
    """Elementwise |a - e| <= atol + rtol |e|, NaN fails; the message names the first bad index and values."""
    a, e = actual.detach().double().cpu().reshape(-1), expected.detach().double().cpu().reshape(-1)
    assert a.shape == e.shape, f"{name}: shape {tuple(a.shape)} != {tuple(e.shape)}"
    bad = ~((a - e).abs() <= atol + rtol * e.abs())  # NaN compares False: counted as bad
    if bad.any():
        i = int(bad.nonzero()[0])
        raise AssertionError(
            f"{name}: {int(bad.sum())} of {a.numel()} elements off; first at index {i}: "
            f"got {a[i].item()!r}, expected {e[i].item()!r} (atol {atol}, rtol {rtol})"
        )


def assert_sums_close(actual: torch.Tensor, forget, retain, rtol: float, name: str) -> None:
    """The three sums against float64, relative to the sum of |terms| (a dot can cancel to ~0)."""
    expected = multi_tensor_dots_ref(forget, retain)
    scale = multi_tensor_dots_ref([f.abs() for f in forget], [r.abs() for r in retain])
    assert actual.dtype == torch.float64 and actual.shape == (3,)
    err = (actual.cpu() - expected.cpu()).abs()
    for k, label in enumerate(("s_rf", "s_ff", "s_rr")):
        assert err[k] <= rtol * scale[k].cpu() + 1e-30, (
            f"{name} {label}: got {actual[k].item()!r}, expected {expected[k].item()!r}, "
            f"error {err[k].item():.3g} > {rtol} x {scale[k].item():.3g}"
        )


# --------------------------------------------------------------------------------------------
# pass 1: multi_tensor_dots
# --------------------------------------------------------------------------------------------
# float32 products and sums: ~1e-7 per add over a block tree of depth 11 plus <= 32 adds per lane.
DOT_TOLERANCES = [(torch.float32, 1e-5), (torch.bfloat16, 1e-5), (torch.float16, 1e-5)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype, rtol", DOT_TOLERANCES)
@pytest.mark.parametrize("size", ODD_SIZES)
def test_dots_odd_sizes(device, dtype, rtol, size):
    forget, retain = [randn(size, dtype, device, 1)], [randn(size, dtype, device, 2)]
    assert_sums_close(multi_tensor_dots(forget, retain), forget, retain, rtol, f"{dtype} n={size}")


@pytest.mark.parametrize("device", DEVICES)
def test_dots_300_mixed_tensors_and_dtypes(device):
    total = 1_000_000 if device == "cpu" else 20_000_000
    sizes = mixed_sizes(300, total // 2, seed=3)
    # forget dtypes cycle over 3, retain over 2: six (forget, retain) dtype groups, one launch each.
    forget = random_list(sizes, [torch.float32, torch.bfloat16, torch.float16], device, 4)
    retain = random_list(sizes, [torch.bfloat16, torch.float32], device, 5)
    assert_sums_close(multi_tensor_dots(forget, retain), forget, retain, 1e-5, "300 tensors")
    tables = next(iter(_launch._TABLES.values()))
    assert len(tables.groups) == 6 and sum(g.n_tensors for g in tables.groups) == 300


@pytest.mark.parametrize("device", DEVICES)
def test_dots_one_big_tensor_among_many_small(device):
    big = 600_000 if device == "cpu" else 50_000_000
    sizes = [big] + [576] * 60 + [3]
    forget = random_list(sizes, [torch.bfloat16], device, 6)
    retain = random_list(sizes, [torch.bfloat16], device, 7)
    assert_sums_close(multi_tensor_dots(forget, retain), forget, retain, 1e-5, "big + small")


@pytest.mark.parametrize("device", DEVICES)
def test_dots_empty_list_and_empty_tensors(device):
    assert torch.equal(multi_tensor_dots([], []), torch.zeros(3, dtype=torch.float64))
    empty = [torch.empty(0, device=device)]
    assert torch.equal(multi_tensor_dots(empty, empty).cpu(), torch.zeros(3, dtype=torch.float64))
    forget = [torch.empty(0, device=device), randn(5, torch.float32, device, 8)]
    retain = [torch.empty(0, device=device), randn(5, torch.float32, device, 9)]
    assert_sums_close(multi_tensor_dots(forget, retain), forget, retain, 1e-6, "with an empty tensor")


@pytest.mark.parametrize("device", DEVICES)
def test_dots_zero_forget_gradient(device):
    sizes = [127, 4096]
    forget = [torch.zeros(n, device=device) for n in sizes]
    retain = random_list(sizes, [torch.float32], device, 10)
    sums = multi_tensor_dots(forget, retain)
    assert sums[0].item() == 0.0 and sums[1].item() == 0.0
    assert_sums_close(sums, forget, retain, 1e-6, "zero forget")


@pytest.mark.parametrize("device", DEVICES)
def test_dots_bitwise_deterministic(device):
    sizes = mixed_sizes(50, 300_000, seed=11)
    forget = random_list(sizes, [torch.bfloat16, torch.float32], device, 12)
    retain = random_list(sizes, [torch.bfloat16, torch.float32], device, 13)
    runs = []
    for _ in range(3):
        _launch.clear_tables()  # rebuilt tables must give the same sums too
        runs.append(multi_tensor_dots(forget, retain))
    assert torch.equal(runs[0], runs[1]) and torch.equal(runs[0], runs[2]), runs


# --------------------------------------------------------------------------------------------
# pass 2: multi_tensor_combine_
# --------------------------------------------------------------------------------------------
# d computed in float32, rounded once to the dtype: half an ulp, one ulp under the interpreter
# (its fp32 -> bf16 cast truncates); atol covers cancellation of the two float32 products.
COMBINE_TOLERANCES = [
    (torch.float32, 1e-6, 1e-6),
    (torch.bfloat16, 1e-5, 2**-7),
    (torch.float16, 1e-5, 2**-10),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype, atol, rtol", COMBINE_TOLERANCES)
@pytest.mark.parametrize("size", ODD_SIZES)
def test_combine_odd_sizes(device, dtype, atol, rtol, size):
    forget, retain = [randn(size, dtype, device, 20)], [randn(size, dtype, device, 21)]
    retain_coef = torch.tensor(0.75, device=device)
    forget_coef = torch.tensor(-1.3, device=device)
    expected = combine_ref(retain, forget, 0.75, -1.3)
    multi_tensor_combine_(retain, forget, retain_coef, forget_coef)
    assert_close(retain[0], expected[0], atol, rtol, f"combine {dtype} n={size}")


@pytest.mark.parametrize("device", DEVICES)
def test_combine_300_mixed_tensors_and_dtypes(device):
    total = 1_000_000 if device == "cpu" else 20_000_000
    sizes = mixed_sizes(300, total // 2, seed=22)
    dtypes = [torch.float32, torch.bfloat16, torch.float16]
    forget = random_list(sizes, dtypes, device, 23)
    retain = random_list(sizes, dtypes[::-1], device, 24)
    expected = combine_ref(retain, forget, 1.0, 0.37)
    multi_tensor_combine_(retain, forget, torch.tensor(1.0, device=device), torch.tensor(0.37, device=device))
    tol = {dtype: (atol, rtol) for dtype, atol, rtol in COMBINE_TOLERANCES}
    for i, (r, e) in enumerate(zip(retain, expected)):
        assert_close(r, e, *tol[r.dtype], f"combine tensor {i} ({r.dtype}, {r.numel()} elements)")


@pytest.mark.parametrize("device", DEVICES)
def test_combine_unaligned_tensors(device):
    """Views at odd offsets of a flat buffer (FSDP-style) take the scalar-load path and stay right."""
    flat_forget = randn(20_001, torch.bfloat16, device, 25)
    flat_retain = randn(20_001, torch.bfloat16, device, 26)
    forget = [flat_forget[1:9_001], flat_forget[9_001:]]  # 2-byte aligned, then 18002-byte offset
    retain = [flat_retain[1:9_001], flat_retain[9_001:]]
    expected = combine_ref(retain, forget, 1.0, 2.0)
    multi_tensor_combine_(retain, forget, torch.tensor(1.0, device=device), torch.tensor(2.0, device=device))
    assert not next(iter(_launch._TABLES.values())).groups[0].aligned
    for r, e in zip(retain, expected):
        assert_close(r, e, 1e-5, 2**-7, "unaligned combine")
    assert_close(
        flat_retain[:1], randn(20_001, torch.bfloat16, "cpu", 26)[:1], 0, 0, "element before the views"
    )


@pytest.mark.parametrize("device", DEVICES)
def test_combine_empty_list_is_a_no_op(device):
    multi_tensor_combine_([], [], torch.tensor(1.0), torch.tensor(1.0))


# --------------------------------------------------------------------------------------------
# the projection end to end: backend="triton" against backend="torch"
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype, atol, rtol", [(torch.float32, 1e-5, 1e-5), (torch.bfloat16, 1e-2, 2**-7)])
def test_blur_direction_triton_matches_torch(device, mode, dtype, atol, rtol):
    sizes = [1, 127, 4096, 30_001]
    forget = random_list(sizes, [dtype], device, 30)
    retain_torch = random_list(sizes, [dtype], device, 31)
    retain_triton = [r.clone() for r in retain_torch]
    kwargs = dict(gamma=0.3, mode=mode, alpha=0.7)
    if mode == "pdu":  # its runtime multiplier (not alpha), a float64 device tensor as the module holds it;
        # under 1 like the other modes' factors: the bf16 tolerance allows one ulp of |d| <= ~|g|
        kwargs["retain_weight"] = torch.tensor(0.6, dtype=torch.float64, device=device)
    stats_torch = blur_direction_(forget, retain_torch, backend="torch", **kwargs)
    stats_triton = blur_direction_(forget, retain_triton, backend="triton", **kwargs)
    for name in ("dot_rf", "sq_forget", "sq_retain", "retain_coef", "forget_coef"):
        assert_close(getattr(stats_triton, name), getattr(stats_torch, name), 1e-6, 1e-5, f"{mode} {name}")
    for i, (a, b) in enumerate(zip(retain_triton, retain_torch)):
        assert_close(a, b, atol, rtol, f"{mode} d[{i}]")


@pytest.mark.parametrize("device", DEVICES)
def test_blur_direction_zero_forget_gradient_leaves_retain(device):
    sizes = [127, 65537]
    forget = [torch.zeros(n, device=device) for n in sizes]
    retain = random_list(sizes, [torch.float32], device, 32)
    before = [r.clone() for r in retain]
    stats = blur_direction_(forget, retain, gamma=0.5, backend="triton")
    assert stats.forget_coef.item() == 0.0
    for r, b in zip(retain, before):
        assert torch.equal(r, b)


@pytest.mark.parametrize("device", DEVICES)
def test_backend_env_variable_selects_triton(device, monkeypatch):
    monkeypatch.setenv("BLUR_BACKEND", "triton")
    forget, retain = [randn(300, torch.float32, device, 33)], [randn(300, torch.float32, device, 34)]
    expected = [r.clone() for r in retain]
    blur_direction_(forget, expected, gamma=0.2, backend="torch")
    blur_direction_(forget, retain, gamma=0.2)  # "auto" + BLUR_BACKEND=triton
    assert len(_launch._TABLES) == 1  # the kernels ran
    assert_close(retain[0], expected[0], 1e-6, 1e-5, "env triton")


def test_authors_projection_matches_ours():
    forget = random_list([127, 300], [torch.float32], "cpu", 35)
    retain = random_list([127, 300], [torch.float32], "cpu", 36)
    directions = authors_projection(forget, retain, gamma=0.4)
    blur_direction_(forget, retain, gamma=0.4, backend="torch")
    for d, r in zip(directions, retain):
        assert_close(d, r, 1e-5, 1e-5, "authors vs ours")


# --------------------------------------------------------------------------------------------
# the launcher's checks
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
def test_launcher_errors_are_clear(device):
    good = randn(8, torch.float32, device, 40)
    coef = torch.tensor(1.0, device=device)
    with pytest.raises(ValueError, match=r"retain_grads\[0\] is not contiguous"):
        multi_tensor_dots(
            [randn((4, 4), torch.float32, device, 0)], [randn((4, 4), torch.float32, device, 0).t()]
        )
    with pytest.raises(ValueError, match=r"forget_grads\[0\] has dtype torch.float64"):
        multi_tensor_dots([good.double()], [good])
    with pytest.raises(ValueError, match="size mismatch at index 0"):
        multi_tensor_dots([good], [good[:4].contiguous()])
    with pytest.raises(ValueError, match="length mismatch"):
        multi_tensor_combine_([good], [], coef, coef)
    with pytest.raises(ValueError, match="must have one element"):
        multi_tensor_combine_([good.clone()], [good], torch.ones(2, device=device), coef)
    if device == "cuda":
        with pytest.raises(ValueError, match="device mismatch"):
            multi_tensor_dots([good], [good.cpu()])
        with pytest.raises(ValueError, match="forget_coef is on cpu"):
            multi_tensor_combine_([good.clone()], [good], coef, torch.tensor(1.0))


# --------------------------------------------------------------------------------------------
# the fused AdamW step
# --------------------------------------------------------------------------------------------
def round_like_kernel(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """float32 -> dtype as the kernel rounds: to nearest on a GPU, truncated under the interpreter."""
    if x.device.type == "cpu" and dtype == torch.bfloat16:
        return (x.contiguous().view(torch.int32) & -65536).view(torch.float32).to(dtype)  # exact: low bits 0
    return x.to(dtype)


def _adam_state(sizes, dtype, state_dtype, device, seed):
    params = random_list(sizes, [dtype], device, seed)
    exp_avgs = [torch.zeros(n, dtype=state_dtype, device=device) for n in sizes]
    exp_avg_sqs = [torch.zeros(n, dtype=state_dtype, device=device) for n in sizes]
    return params, exp_avgs, exp_avg_sqs


ADAMW = dict(beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1)
ADAMW_FP32 = {k: float(torch.tensor(v, dtype=torch.float32)) for k, v in ADAMW.items()}
# (param dtype, grad dtype, state dtype, atol, rtol) on parameters and moments after 3 steps.
ADAMW_TOLERANCES = [
    (torch.float32, torch.float32, torch.float32, 1e-6, 1e-5),
    (torch.bfloat16, torch.bfloat16, torch.bfloat16, 1e-2, 2**-5),  # 4 ulp: the interpreter truncates
    (torch.float32, torch.bfloat16, torch.float32, 1e-5, 1e-4),
    (torch.float16, torch.float16, torch.float32, 1e-3, 2**-9),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("p_dtype, g_dtype, s_dtype, atol, rtol", ADAMW_TOLERANCES)
def test_blur_adamw_matches_reference(device, p_dtype, g_dtype, s_dtype, atol, rtol):
    """The kernel against the plain-PyTorch step on the same inputs, 3 steps.

    float32 tensors of the reference are held in float64; bf16/fp16 ones keep their dtype (the
    state is rounded to it after every step, and that rounding, not the arithmetic, dominates).
    """
    sizes = [1, 127, 4097, 65537]
    params, exp_avgs, exp_avg_sqs = _adam_state(sizes, p_dtype, s_dtype, device, 50)
    ref = [
        [t.double() if t.dtype == torch.float32 else t.clone() for t in ts]
        for ts in (params, exp_avgs, exp_avg_sqs)
    ]
    lr = torch.tensor(1e-2, device=device)
    for step in range(1, 4):
        forget = random_list(sizes, [g_dtype], device, 51 + step)
        retain = random_list(sizes, [g_dtype], device, 61 + step)
        retain_before = [r.clone() for r in retain]
        # Coefficients 1 and -0.5 make a*r and b*f exact, so d = a*r + b*f has one rounding with or
        # without an FMA; near d = 0 Adam's first step (d / (|d| + eps)) would amplify any other.
        coefs = dict(
            retain_coef=torch.tensor(1.0, device=device), forget_coef=torch.tensor(-0.5, device=device)
        )
        step_t = torch.tensor(float(step), device=device)
        blur_adamw_step_(
            params,
            forget,
            retain,
            exp_avgs,
            exp_avg_sqs,
            **coefs,
            lr=lr,
            step=step_t,
            backend="triton",
            **ADAMW,
        )
        # The oracle rounds d to the gradient dtype as the kernel does, then runs in float64.
        d = [round_like_kernel(r.float() - 0.5 * f.float(), g_dtype).double() for r, f in zip(retain, forget)]
        # The kernel gets beta1, beta2 as float32 (torch's fused AdamW too): 1 - float32(0.999)
        # is 1.3e-5 off 0.001, so the oracle takes the same rounded betas.
        blur_adamw_step_ref_(
            ref[0],
            None,
            d,
            ref[1],
            ref[2],
            retain_coef=1.0,
            forget_coef=0.0,
            lr=float(torch.tensor(1e-2, dtype=torch.float32)),
            step=float(step),
            **ADAMW_FP32,
        )
        for r, b in zip(retain, retain_before):
            assert torch.equal(r, b), "the fused step must not write the retain gradients"
    for name, actual, expected in zip(
        ("param", "exp_avg", "exp_avg_sq"), (params, exp_avgs, exp_avg_sqs), ref
    ):
        for i, (a, e) in enumerate(zip(actual, expected)):
            # exp_avg_sq ~ 1e-3 * d^2: scale atol with it.
            assert_close(a, e, atol * (1e-2 if name == "exp_avg_sq" else 1), rtol, f"{name}[{i}]")


@pytest.mark.parametrize("device", DEVICES)
def test_blur_adamw_matches_torch_adamw_on_blur_direction(device):
    """Fused step == blur_direction_ then torch.optim.AdamW (tensor lr and step), over 3 steps."""
    sizes = [1, 127, 4097, 65537]
    params_fused, exp_avgs, exp_avg_sqs = _adam_state(sizes, torch.float32, torch.float32, device, 70)
    params_torch = [torch.nn.Parameter(p.clone()) for p in params_fused]
    lr = torch.tensor(3e-3, device=device)
    extra = dict(fused=True) if device == "cuda" else dict(foreach=False)
    optimizer = torch.optim.AdamW(
        params_torch, lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.1, **extra
    )
    steps = [torch.zeros((), device=device) for _ in sizes]
    for step in range(1, 4):
        forget = random_list(sizes, [torch.float32], device, 71 + step)
        retain = random_list(sizes, [torch.float32], device, 81 + step)
        stats = compute_stats(forget, retain, gamma=0.3, backend="triton")
        torch._foreach_add_(steps, 1.0)
        blur_adamw_step_(
            params_fused,
            forget,
            retain,
            exp_avgs,
            exp_avg_sqs,
            retain_coef=stats.retain_coef,
            forget_coef=stats.forget_coef,
            lr=lr,
            step=steps,
            backend="triton",
            **ADAMW,
        )
        grads = [r.clone() for r in retain]
        blur_direction_(forget, grads, gamma=0.3, backend="torch")
        for p, g in zip(params_torch, grads):
            p.grad = g
        optimizer.step()
    for i, (a, e) in enumerate(zip(params_fused, params_torch)):
        assert_close(a, e, 1e-6, 1e-5, f"param[{i}]")
    for i, p in enumerate(params_torch):
        assert_close(exp_avgs[i], optimizer.state[p]["exp_avg"], 1e-7, 1e-5, f"exp_avg[{i}]")
        # 3e-5: torch's CPU AdamW scales d^2 by float32(1 - 0.999), its fused CUDA AdamW and the
        # kernel by 1 - float32(0.999), 1.3e-5 apart.
        assert_close(exp_avg_sqs[i], optimizer.state[p]["exp_avg_sq"], 1e-10, 3e-5, f"exp_avg_sq[{i}]")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("with_forget", [True, False])
def test_fused_optimizer_matches_torch_adamw(device, with_forget):
    sizes = [(3, 5), (127,), (64, 65)]
    torch.manual_seed(90)
    params = [torch.nn.Parameter(randn(s, torch.float32, device, 91 + i)) for i, s in enumerate(sizes)]
    twins = [torch.nn.Parameter(p.detach().clone()) for p in params]
    groups = [{"params": params[:1], "lr": 1e-2}, {"params": params[1:]}]  # two groups, two lrs
    twin_groups = [{"params": twins[:1], "lr": 1e-2}, {"params": twins[1:]}]
    fused = BLURFusedAdamW(groups, lr=3e-3, weight_decay=0.05, backend="triton")
    extra = dict(fused=True) if device == "cuda" else dict(foreach=False)
    reference = torch.optim.AdamW(twin_groups, lr=3e-3, weight_decay=0.05, **extra)
    for step in range(3):
        forget = [randn(p.shape, torch.float32, device, 100 + 10 * step + i) for i, p in enumerate(params)]
        retain = [randn(p.shape, torch.float32, device, 200 + 10 * step + i) for i, p in enumerate(params)]
        for p, t, r in zip(params, twins, retain):
            p.grad, t.grad = r.clone(), r.clone()
        if with_forget:
            stats = compute_stats(forget, [p.grad for p in params], gamma=0.5, backend="triton")
            fused.step(forget_grads=forget, stats=stats)
            blur_direction_(forget, [t.grad for t in twins], gamma=0.5, backend="torch")
        else:
            fused.step()
        reference.step()
    for i, (a, e) in enumerate(zip(params, twins)):
        assert_close(a, e, 1e-6, 1e-5, f"param[{i}]")
        assert fused.state[a]["step"].item() == 3.0


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_fused_optimizer_found_inf_skips_on_device(device, backend):
    """found_inf = 1 (a non-finite step): p, m, v and the step count stay bit-identical, and the
    next step with found_inf = 0 is the step an un-skipped optimizer would have taken."""
    sizes = [(3, 5), (127,), (64, 65)]
    params = [torch.nn.Parameter(randn(s, torch.float32, device, 500 + i)) for i, s in enumerate(sizes)]
    twins = [torch.nn.Parameter(p.detach().clone()) for p in params]
    skipping = BLURFusedAdamW(params, lr=3e-3, weight_decay=0.05, backend=backend)
    plain = BLURFusedAdamW(twins, lr=3e-3, weight_decay=0.05, backend=backend)
    forget = [randn(p.shape, torch.float32, device, 510 + i) for i, p in enumerate(params)]
    for p, t in zip(params, twins):
        p.grad = randn(p.shape, torch.float32, device, 520)
        t.grad = p.grad.clone()
    coefs = dict(retain_coef=1.0, forget_coef=-0.5)
    skipping.step(forget_grads=forget, **coefs)  # one real step, so the moments are not zero
    plain.step(forget_grads=forget, **coefs)
    before = [(p.detach().clone(), skipping.state[p]["exp_avg"].clone(), skipping.state[p]["exp_avg_sq"].clone())
              for p in params]
    bad = [f.clone() for f in forget]
    bad[1][3] = float("nan")
    bad[2][0, 0] = float("inf")
    skipping.step(forget_grads=bad, found_inf=torch.ones((), device=device), **coefs)
    for p, (p0, m0, v0) in zip(params, before):
        state = skipping.state[p]
        assert torch.equal(p.detach(), p0) and torch.equal(state["exp_avg"], m0)
        assert torch.equal(state["exp_avg_sq"], v0) and state["step"].item() == 1.0
    skipping.found_inf = torch.zeros((), device=device)  # the attribute form, as torch's fused optimizers
    skipping.step(forget_grads=forget, **coefs)
    plain.step(forget_grads=forget, **coefs)
    for i, (a, e) in enumerate(zip(params, twins)):
        assert torch.equal(a.detach(), e.detach()), f"param[{i}] after skip + step differs from two steps"
        assert skipping.state[a]["step"].item() == 2.0


def test_fused_optimizer_torch_backend_on_cpu():
    """backend='torch' (the CPU default) runs the reference step: same numbers as the kernel."""
    params = [torch.nn.Parameter(randn(100, torch.float32, "cpu", 300))]
    twins = [torch.nn.Parameter(params[0].detach().clone())]
    forget = [randn(100, torch.float32, "cpu", 301)]
    for p in (params[0], twins[0]):
        p.grad = randn(100, torch.float32, "cpu", 302)
    BLURFusedAdamW(params, backend="torch").step(forget_grads=forget, retain_coef=1.0, forget_coef=-0.5)
    BLURFusedAdamW(twins, backend="triton").step(forget_grads=forget, retain_coef=1.0, forget_coef=-0.5)
    assert_close(params[0], twins[0], 1e-7, 1e-6, "torch vs triton backend")


# --------------------------------------------------------------------------------------------
# GPU only: no host synchronisation, no allocation of gradient size
# --------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("device", ["cuda"])
def test_gpu_projection_and_fused_step_do_not_sync(device):
    sizes = [4097, 1_000_000, 576]
    forget = random_list(sizes, [torch.bfloat16], device, 400)
    retain = random_list(sizes, [torch.bfloat16], device, 401)
    params, exp_avgs, exp_avg_sqs = _adam_state(sizes, torch.bfloat16, torch.bfloat16, device, 402)
    step = torch.ones((), device=device)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(2):  # the first call builds and uploads the tables
            stats = compute_stats(forget, retain, gamma=0.5, backend="triton")
            blur_adamw_step_(
                params,
                forget,
                retain,
                exp_avgs,
                exp_avg_sqs,
                retain_coef=stats.retain_coef,
                forget_coef=stats.forget_coef,
                lr=1e-3,
                step=step,
                **ADAMW,
            )
            blur_direction_(forget, retain, gamma=0.5, backend="triton")
    finally:
        torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    blur_direction_(forget, retain, gamma=0.5, backend="triton")
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - before
    assert extra < 64 * 1024, f"the projection allocated {extra} bytes (scalars only expected)"


# --------------------------------------------------------------------------------------------
# pass 1 in Adam's metric: multi_tensor_metric_dots (projection_metric "adam")
# --------------------------------------------------------------------------------------------
def _second_moments(sizes, device, seed: int) -> list[torch.Tensor]:
    """float32 v over four decades (Adam's spread across coordinates), never zero."""
    return [(10 ** (torch.rand(n, generator=_generator(seed + i)) * 4 - 8)).to(device) for i, n in enumerate(sizes)]


def _check_metric_sums(forget, retain, v, steps, beta2, eps, rtol, name):
    from blur_lightning.kernels import multi_tensor_metric_dots
    from blur_lightning.kernels.reference import multi_tensor_metric_dots_ref

    actual = multi_tensor_metric_dots(forget, retain, v, steps, beta2=beta2, eps=eps)
    expected = multi_tensor_metric_dots_ref(forget, retain, v, steps, beta2, eps)
    scale = multi_tensor_metric_dots_ref([f.abs() for f in forget], [r.abs() for r in retain], v, steps, beta2, eps)
    assert actual.dtype == torch.float64 and actual.shape == (6,)
    err = (actual.cpu() - expected.cpu()).abs()
    assert (err <= rtol * scale.cpu()).all(), f"{name}: got {actual.tolist()}, expected {expected.tolist()}"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype, rtol", DOT_TOLERANCES)
@pytest.mark.parametrize("size", [1, 127, 4099])
def test_metric_dots_odd_sizes(device, dtype, rtol, size):
    forget, retain = [randn(size, dtype, device, 1)], [randn(size, dtype, device, 2)]
    steps = [torch.full((), 3.0, device=device)]
    v = _second_moments([size], device, 3)
    _check_metric_sums(forget, retain, v, steps, 0.999, 1e-8, rtol, f"{dtype} n={size}")


@pytest.mark.parametrize("device", DEVICES)
def test_metric_dots_mixed_tensors_dtypes_and_steps(device):
    sizes = mixed_sizes(40, 60_000, 7)
    forget = random_list(sizes, [torch.float32, torch.bfloat16], device, 8)
    retain = random_list(sizes, [torch.float32, torch.bfloat16], device, 9)
    v = _second_moments(sizes, device, 10)
    v[1] = v[1].to(torch.bfloat16)  # a bf16 second moment (BLURFusedAdamW keeps v in the parameter's dtype)
    steps = [torch.full((), float(1 + i % 5), device=device) for i in range(len(sizes))]
    _check_metric_sums(forget, retain, v, steps, 0.95, 1e-6, 1e-5, "mixed")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", MODES)
def test_metric_projection_triton_matches_torch(device, mode):
    from blur_lightning.core.metric import AdamMetric

    sizes = [5, 1000, 3001]
    forget, retain = random_list(sizes, [torch.float32], device, 11), random_list(sizes, [torch.float32], device, 12)
    metric = AdamMetric(_second_moments(sizes, device, 13), [torch.tensor(4.0)] * 3, beta2=0.999, eps=1e-8)
    kw = dict(gamma=0.4, mode=mode, metric=metric)
    fast = compute_stats(forget, retain, backend="triton", **kw)
    slow = compute_stats([f.cpu() for f in forget], [r.cpu() for r in retain], backend="torch", **kw)
    for name in ("retain_coef", "forget_coef", "sq_forget", "dot_rf"):
        assert_close(getattr(fast, name), getattr(slow, name), atol=1e-7, rtol=1e-5, name=f"{mode} {name}")
