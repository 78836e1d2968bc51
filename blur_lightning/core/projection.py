"""The BLUR update: combine the forget and retain gradients into one descent direction.

BLUR (Reisizadeh et al., arXiv 2506.08164) treats unlearning as a bi-level problem. With
g_f and g_r the forget and retain gradients of ALL trainable parameters, and the global sums

    s_rf = <g_r, g_f>,   s_ff = ||g_f||^2,   s_rr = ||g_r||^2,

every mode writes a direction of the form d = retain_coef * g_r + forget_coef * g_f:

    mode            retain_coef                 forget_coef                  guard (denominator <= eps)
    forget_lower    1                           gamma - s_rf / s_ff          forget_coef = 0
    forget_upper    gamma - s_rf / s_rr         1                            retain_coef = 0
    penalty         gamma                       1                            (none)
    rmu             alpha                       1 - alpha * s_rf / s_ff      forget_coef = 1
    pdu             lambda (retain_weight)      gamma                        (none)

`forget_lower` is the paper's default: <d, g_f> = gamma * s_ff, i.e. the retain gradient
with its component along g_f replaced by gamma * g_f. With a `metric` (core/metric.py,
projection_metric "adam") the coefficients come from the same sums in an Adam-type optimizer's
inner product <x, P y>, so the guarantee holds for the step that optimizer takes. `rmu` is the authors' WMDP form
d = g_f + alpha * (g_r - s_rf / s_ff * g_f); `penalty` is the weighted-sum baseline. `pdu` is
open-unlearning's primal-dual method (Entesari et al. 2025): a weighted sum whose retain weight
lambda is a Lagrange multiplier the caller updates by dual ascent on the retain loss
(training/pdu.py). Both are constrained formulations, of different things: PDU keeps the retain
*loss* below a level (lambda grows while it is above), BLUR fixes the *direction's* component
along g_f whatever the losses are.

The work is two memory-bound passes over the gradients: one reads g_f and g_r to form the
three sums, one reads them again and writes d into the retain buffer in place. Nothing here
moves a value to the host: the coefficients stay 0-dim device tensors and the eps guard is a
`torch.where`, so a step costs no synchronisation. On CUDA the two passes run as Triton
kernels (`blur_lightning.kernels`); the PyTorch path below is the CPU path and the reference.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

# re-exported: callers name them from here
from blur_lightning.core.backends import BACKEND_ENV, BACKENDS, local_tensor, resolve_backend  # noqa: F401
from blur_lightning.core.metric import AdamMetric

MODES = ("forget_lower", "forget_upper", "penalty", "rmu", "pdu")


@dataclass(frozen=True)
class BLURStats:
    """What one projection computed: 0-dim tensors on the gradients' device.

    The sums and `coef` are float32; `retain_coef` and `forget_coef` (the factors the combine
    pass reads) are float32, or float64 when a gradient is float64.

    Attributes:
        dot_rf: <g_r, g_f> over all tensors (and all ranks of the group).
        sq_forget: ||g_f||^2.
        sq_retain: ||g_r||^2.
        coef: the mode's varying coefficient (forget_coef for forget_lower and rmu,
            retain_coef for forget_upper, gamma for penalty).
        retain_coef: the factor on g_r in d.
        forget_coef: the factor on g_f in d.
    """

    dot_rf: torch.Tensor
    sq_forget: torch.Tensor
    sq_retain: torch.Tensor
    coef: torch.Tensor
    retain_coef: torch.Tensor
    forget_coef: torch.Tensor

    @property
    def cosine(self) -> torch.Tensor:
        """cos(g_r, g_f); 0 when either gradient is zero."""
        denom = torch.sqrt(self.sq_forget * self.sq_retain)
        return torch.where(denom > 0, self.dot_rf / denom.clamp_min(1e-30), torch.zeros_like(denom))

    @property
    def retain_part_norm(self) -> torch.Tensor:
        """||retain_coef * g_r||: the size of d's retain part."""
        return self.retain_coef.abs() * self.sq_retain.sqrt()

    @property
    def forget_part_norm(self) -> torch.Tensor:
        """||forget_coef * g_f||: the size of d's forget part (the coefficient alone swings widely)."""
        return self.forget_coef.abs() * self.sq_forget.sqrt()

    @property
    def direction_norm(self) -> torch.Tensor:
        """||d||, from the three sums: a^2 s_rr + 2ab s_rf + b^2 s_ff, no extra pass."""
        a, b = self.retain_coef, self.forget_coef
        sq = a * a * self.sq_retain + 2 * a * b * self.dot_rf + b * b * self.sq_forget
        return sq.clamp_min(0).sqrt()

    def as_dict(self) -> dict[str, torch.Tensor]:
        return {
            "dot_rf": self.dot_rf,
            "sq_forget": self.sq_forget,
            "sq_retain": self.sq_retain,
            "coef": self.coef,
            "cosine": self.cosine,
            "retain_part_norm": self.retain_part_norm,
            "forget_part_norm": self.forget_part_norm,
            "direction_norm": self.direction_norm,
        }


def check_inputs(forget_grads: Sequence[torch.Tensor], retain_grads: Sequence[torch.Tensor]) -> None:
    """Raise ValueError when the two lists cannot be paired element by element."""
    if len(forget_grads) != len(retain_grads):
        raise ValueError(
            f"length mismatch: forget_grads has {len(forget_grads)} tensors, retain_grads has {len(retain_grads)}"
        )
    for i, (f, r) in enumerate(zip(forget_grads, retain_grads)):
        if f.shape != r.shape:
            raise ValueError(
                f"shape mismatch at index {i}: forget_grads[{i}] is {tuple(f.shape)}, "
                f"retain_grads[{i}] is {tuple(r.shape)}"
            )
        if f.device != r.device:
            raise ValueError(f"device mismatch at index {i}: forget on {f.device}, retain on {r.device}")


# --------------------------------------------------------------------------------------------
# pass 1: the three sums
# --------------------------------------------------------------------------------------------
def partial_sums_torch(
    forget_grads: Sequence[torch.Tensor],
    retain_grads: Sequence[torch.Tensor],
    device: torch.device,
    metric: AdamMetric | None = None,
) -> torch.Tensor:
    """[s_rf, s_ff, s_rr] over the local tensors as a float64 tensor of shape (3,); with `metric`,
    (6,): the plain three, then the same in the metric's inner product <x, P y>.

    Each tensor's products are formed in float32 (a bf16 product rounded to bf16 before the sum
    loses ~3 significant digits) and summed by torch's pairwise reduction; the per-tensor
    partials are then added in float64, so hundreds of tensors do not lose bits either. P is a
    temporary of one tensor's size at a time (core/metric.py), never the model's.
    """
    width = 3 if metric is None else 6
    if not forget_grads:
        return torch.zeros(width, dtype=torch.float64, device=device)
    partials = []
    for i, (f, r) in enumerate(zip(forget_grads, retain_grads)):
        wide = torch.promote_types(f.dtype, torch.float32)  # float64 gradients stay float64
        f32 = f.reshape(-1).to(wide)
        r32 = r.reshape(-1).to(wide)
        sums = [torch.dot(r32, f32), torch.dot(f32, f32), torch.dot(r32, r32)]
        if metric is not None:
            w = metric.weight(i, f32)  # one temporary of this tensor's size, used for all three
            pf = f32 * w
            sums += [torch.dot(r32, pf), torch.dot(f32, pf), torch.dot(r32, r32 * w)]
        partials.append(torch.stack(sums))
    return torch.stack(partials).to(torch.float64).sum(dim=0)


def partial_sums(
    forget_grads: Sequence[torch.Tensor],
    retain_grads: Sequence[torch.Tensor],
    *,
    backend: str = "auto",
    device: torch.device | None = None,
    metric: AdamMetric | None = None,
) -> torch.Tensor:
    """[s_rf, s_ff, s_rr] over the given (local) tensors, float64, shape (3,); (6,) with a metric.

    With a metric the Triton pass (kernels/metric_dots.py) also reads v: one more read per element.
    A parameter without optimizer state (the rare mid-run newcomer) sends the step to the PyTorch path.
    """
    check_inputs(forget_grads, retain_grads)
    device = device or (retain_grads[0].device if retain_grads else torch.device("cpu"))
    if resolve_backend(backend, retain_grads) == "triton" and retain_grads:
        if metric is None:
            from blur_lightning.kernels import multi_tensor_dots

            return multi_tensor_dots(forget_grads, retain_grads)
        if all(v is not None for v in metric.exp_avg_sqs) and all(t is not None for t in metric.steps):
            from blur_lightning.kernels import multi_tensor_metric_dots

            steps = [torch.as_tensor(t, dtype=torch.float32).to(device, non_blocking=True) for t in metric.steps]
            return multi_tensor_metric_dots(
                forget_grads, retain_grads, [local_tensor(v) for v in metric.exp_avg_sqs], steps,
                beta2=metric.beta2, eps=metric.eps,
            )  # fmt: skip
    return partial_sums_torch(forget_grads, retain_grads, device, metric)


def all_reduce_sums(sums: torch.Tensor, group=None) -> torch.Tensor:
    """Sum the (3,) or (6,) partials over `group` in place; a no-op without one (or without a process group)."""
    if group is None:
        return sums
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError("group was given but torch.distributed is not initialized")
    groups = group if isinstance(group, (list, tuple)) else [group]
    for g in groups:
        # One all-reduce of 3 float64 values per group: 24 bytes, whatever the model size.
        dist.all_reduce(sums, op=dist.ReduceOp.SUM, group=g)
    return sums


# --------------------------------------------------------------------------------------------
# the coefficients (a few 0-dim ops on the device)
# --------------------------------------------------------------------------------------------
def direction_coefs(
    sums: torch.Tensor,
    *,
    mode: str,
    gamma: float,
    alpha: float = 1.0,
    eps: float = 1e-12,
    retain_weight: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(retain_coef, forget_coef, coef) as 0-dim float64 tensors, from sums = [s_rf, s_ff, s_rr].

    retain_weight: pdu's multiplier lambda (a 0-dim device tensor, so no host read); None: alpha.
    """
    check_mode_args(mode, gamma, alpha, eps)
    s_rf, s_ff, s_rr = sums[0], sums[1], sums[2]
    one = torch.ones((), dtype=sums.dtype, device=sums.device)
    zero = torch.zeros((), dtype=sums.dtype, device=sums.device)
    if mode == "forget_lower":
        ratio = s_rf / torch.where(s_ff > eps, s_ff, one)
        forget_coef = torch.where(s_ff > eps, gamma - ratio, zero)
        retain_coef, coef = one, forget_coef
    elif mode == "forget_upper":
        ratio = s_rf / torch.where(s_rr > eps, s_rr, one)
        retain_coef = torch.where(s_rr > eps, gamma - ratio, zero)
        forget_coef, coef = one, retain_coef
    elif mode == "penalty":
        retain_coef = one * gamma
        forget_coef, coef = one, retain_coef
    elif mode == "pdu":
        retain_coef = one * alpha if retain_weight is None else retain_weight.to(sums.device, sums.dtype)
        forget_coef, coef = one * gamma, retain_coef
    else:  # rmu
        ratio = s_rf / torch.where(s_ff > eps, s_ff, one)
        forget_coef = torch.where(s_ff > eps, 1.0 - alpha * ratio, one)
        retain_coef, coef = one * alpha, forget_coef
    return retain_coef, forget_coef, coef


def check_mode_args(mode: str, gamma: float, alpha: float, eps: float) -> None:
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}: expected one of {MODES}")
    for name, value in (("gamma", gamma), ("alpha", alpha), ("eps", eps)):
        if isinstance(value, torch.Tensor) or not math.isfinite(float(value)):
            raise ValueError(f"{name} must be a finite Python number, got {value!r}")
    if eps < 0:
        raise ValueError(f"eps must be >= 0, got {eps}")


# --------------------------------------------------------------------------------------------
# pass 2: d = retain_coef * g_r + forget_coef * g_f, written into g_r
# --------------------------------------------------------------------------------------------
def combine_torch_(
    retain_grads: Sequence[torch.Tensor],
    forget_grads: Sequence[torch.Tensor],
    retain_coef: torch.Tensor | None,
    forget_coef: torch.Tensor,
) -> None:
    """In place, no allocation of gradient size: mul_ then addcmul_ with 0-dim device factors.

    retain_coef None means 1 (forget_lower): the mul_ pass is skipped, a third of the bytes.
    """
    if not retain_grads:
        return
    if retain_coef is not None:
        torch._foreach_mul_(list(retain_grads), retain_coef)
    for r, f in zip(retain_grads, forget_grads):
        # addcmul_ with a 0-dim tensor factor: r += f * forget_coef, computed in r's dtype's
        # opmath (float32 for bf16), no temporary, no host read of the coefficient.
        r.addcmul_(f, forget_coef)


def combine_(
    retain_grads: Sequence[torch.Tensor],
    forget_grads: Sequence[torch.Tensor],
    retain_coef: torch.Tensor,
    forget_coef: torch.Tensor,
    *,
    mode: str = "",
    backend: str = "auto",
) -> None:
    """d = retain_coef * g_r + forget_coef * g_f into retain_grads (coefficients: 0-dim device tensors)."""
    if resolve_backend(backend, retain_grads) == "triton" and retain_grads:
        from blur_lightning.kernels import multi_tensor_combine_

        multi_tensor_combine_(retain_grads, forget_grads, retain_coef, forget_coef)
        return
    combine_torch_(retain_grads, forget_grads, None if mode == "forget_lower" else retain_coef, forget_coef)


# --------------------------------------------------------------------------------------------
# the public function
# --------------------------------------------------------------------------------------------
def compute_stats(
    forget_grads: Sequence[torch.Tensor],
    retain_grads: Sequence[torch.Tensor],
    *,
    gamma: float,
    mode: str = "forget_lower",
    alpha: float = 1.0,
    eps: float = 1e-12,
    group=None,
    backend: str = "auto",
    device: torch.device | None = None,
    grad_scale: torch.Tensor | None = None,
    metric: AdamMetric | None = None,
    retain_weight: torch.Tensor | None = None,
) -> BLURStats:
    """Pass 1 plus the coefficients, without touching the gradients (the fused optimizer uses this).

    retain_weight: the pdu mode's multiplier lambda (see direction_coefs).

    metric: project in an Adam-type optimizer's inner product <x, P y> (core/metric.py,
    projection_metric "adam"): the coefficients come from the P-weighted sums; the stats' sums
    (and so the logged norms, the clip and the finiteness check) stay the plain Euclidean ones,
    one all-reduce of 6 values instead of 3. None: the identity (the paper).

    grad_scale: the factor both gradients carry (a GradScaler's scale, a 0-dim device tensor), or
    None. The sums are divided by its square, so they, the eps guards and the logged norms are
    the true gradients' (exactly, for GradScaler's powers of two); the coefficients are ratios of
    sums and do not change. The gradients themselves stay scaled.
    """
    check_mode_args(mode, gamma, alpha, eps)
    forget_grads, retain_grads = _local(forget_grads), _local(retain_grads)
    sums = partial_sums(forget_grads, retain_grads, backend=backend, device=device, metric=metric)
    sums = all_reduce_sums(sums, group)
    if grad_scale is not None:
        sums = sums / grad_scale.to(sums.dtype).square()
    retain_coef, forget_coef, coef = direction_coefs(
        sums[-3:], mode=mode, gamma=gamma, alpha=alpha, eps=eps, retain_weight=retain_weight
    )
    # float32 coefficients for float32/bf16/fp16 gradients (what the kernels read); float64 ones
    # only when a gradient is float64, so a float64 oracle test sees float64 arithmetic.
    coef_dtype = torch.float64 if any(t.dtype == torch.float64 for t in retain_grads) else torch.float32
    s = sums.float()
    return BLURStats(
        s[0], s[1], s[2], coef.float(), retain_coef.to(coef_dtype), forget_coef.to(coef_dtype)
    )


def blur_direction_(
    forget_grads: Sequence[torch.Tensor],
    retain_grads: Sequence[torch.Tensor],
    *,
    gamma: float,
    mode: str = "forget_lower",
    alpha: float = 1.0,
    eps: float = 1e-12,
    group=None,
    backend: str = "auto",
    grad_scale: torch.Tensor | None = None,
    metric: AdamMetric | None = None,
    retain_weight: torch.Tensor | None = None,
) -> BLURStats:
    """Write the BLUR direction into `retain_grads`, in place.

    Args:
        forget_grads: per-parameter forget gradients g_f (any shapes; fp32, bf16 or fp16). Not modified.
        retain_grads: per-parameter retain gradients g_r, same shapes in the same order, usually
            the `.grad` tensors after the retain backward. Overwritten with d.
        gamma: the forget-lower target <d, g_f> = gamma * ||g_f||^2 (penalty: the retain weight).
        mode: one of "forget_lower" (default), "forget_upper", "penalty", "rmu", "pdu" (see module doc).
        alpha: the retain weight of the "rmu" mode.
        eps: a squared norm at or below eps counts as zero (the guard of each mode).
        group: a process group (or a list of groups, summed in turn) over which the three partial
            sums are all-reduced, so the inner products cover every shard on every rank. None:
            the lists hold the whole model. DTensors are reduced over their local shards.
        backend: "auto" (Triton on CUDA, else PyTorch; env BLUR_BACKEND overrides), "torch", "triton".
        grad_scale: the loss scale both gradients carry (see compute_stats): the sums come out
            true; d is written with the same scale.
        metric: the inner product of the projection (see compute_stats); None: the identity.
        retain_weight: the pdu mode's multiplier lambda, a 0-dim tensor (None: alpha).

    Returns:
        BLURStats of 0-dim float32 tensors on the gradients' device. No host synchronisation.

    Raises:
        ValueError: unknown mode or backend, length/shape/device mismatch, non-finite gamma/alpha.
    """
    # Local shards and the backend once per step, shared by both passes.
    forget_grads, retain_grads = _local(forget_grads), _local(retain_grads)
    backend = resolve_backend(backend, retain_grads)
    stats = compute_stats(
        forget_grads, retain_grads, gamma=gamma, mode=mode, alpha=alpha, eps=eps, group=group, backend=backend,
        grad_scale=grad_scale, metric=metric, retain_weight=retain_weight,
    )
    combine_(retain_grads, forget_grads, stats.retain_coef, stats.forget_coef, mode=mode, backend=backend)
    return stats


def _local(tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    return [local_tensor(t) for t in tensors]
