"""CausalLMModule: what every training module here shares, BLUR unlearning and fine-tuning alike.

A causal LM trained with manual optimization, one optimizer step per `accumulate_grad_batches`
micro-batches. The subclasses write `training_step` (BLURUnlearner: a forget and a retain pass
and the projection; FineTuner: one NLL pass); this class holds the rest, one copy of each:

* the model: built once in `configure_model` (by name, the embedded GGUF, or a ready module; LoRA
  adapters, the trainable-parameter filter, activation checkpointing; FSDP2 and FSDP1 through
  `blur_lightning.distributed`), and the frozen reference when a loss needs one (`set_reference`);
* the optimizer step in progress (`AccumulationWindow`), saved and reopened when a checkpoint falls
  inside it, and which of its backward passes reduce their gradients across ranks (`GradientSync`:
  under DDP and FSDP2 only the window's last micro-batch, by default);
* the end of every optimizer step (`_apply_update`): a non-finite step skipped the same way on every
  path (GradScaler, a fused optimizer's device flag, or one host read), counted as a step, then the
  scheduler;
* validation NLL, logging decisions, the optimizer and scheduler factories (a schedule in epochs or
  "auto" resolved at train start from the optimizer steps the fit takes, `training/step_count.py`), the
  export on fit end.
"""

from __future__ import annotations

import math
import re
import warnings
from collections.abc import Callable, Iterable

import lightning.pytorch as pl
import torch
from torch import nn

from blur_lightning.core import nonfinite
from blur_lightning.core.accumulation import AccumulationWindow
from blur_lightning.core.clipping import check_algorithm, check_clip_value
from blur_lightning.core.nonfinite import NONFINITE_SKIP, is_fused_blur_optimizer
from blur_lightning.core.step import apply_update
from blur_lightning.data.datamodule import VAL_LOADER_NAMES
from blur_lightning.distributed.grad_sync import GradientSync
from blur_lightning.distributed.hooks import StrategyHooks
from blur_lightning.losses import functional as losses
from blur_lightning.models import activation_checkpointing as checkpointing
from blur_lightning.models import adapters, attention
from blur_lightning.training.schedules import ResolvableSchedule
from blur_lightning.training.step_count import count_optimizer_steps

# The CLI's injectable optimizer and scheduler: callables taking the parameters / the optimizer.
OptimizerFactory = Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]
SchedulerFactory = Callable[[torch.optim.Optimizer], torch.optim.lr_scheduler.LRScheduler]


class CausalLMModule(pl.LightningModule):
    """The shared machinery of BLURUnlearner and FineTuner (see the module doc); not used on its own.

    Args: model, model_dtype, attn_implementation, accumulate_grad_batches, gradient_sync, gradient_clip_val,
        gradient_clip_algorithm, nonfinite_skip, trainable_params, lora_rank, lora_alpha,
        lora_dropout, lora_target_modules, activation_checkpointing, export_dir, optimizer,
        scheduler: as documented on :class:`~blur_lightning.training.unlearner.BLURUnlearner`.
        The subclass's own arguments become hparams too (Lightning saves the outermost __init__'s).
    """

    VAL_SET_NAMES = VAL_LOADER_NAMES  # the data module's val loaders, in order

    def __init__(
        self,
        model: str | nn.Module,
        *,
        model_dtype: str,
        attn_implementation: str,
        accumulate_grad_batches: int,
        gradient_sync: str,
        gradient_clip_val: float | None,
        gradient_clip_algorithm: str,
        nonfinite_skip: str,
        trainable_params: str | None,
        lora_rank: int | None,
        lora_alpha: float,
        lora_dropout: float,
        lora_target_modules: list[str] | str | None,
        activation_checkpointing: bool,
        export_dir: str | None,
        optimizer: OptimizerFactory,
        scheduler: SchedulerFactory | None,
    ) -> None:
        super().__init__()
        if accumulate_grad_batches < 1:
            raise ValueError(f"accumulate_grad_batches must be >= 1, got {accumulate_grad_batches}")
        check_algorithm(gradient_clip_algorithm)
        check_clip_value(gradient_clip_val)
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
        self._group_cache: tuple | None = None  # (strategy, hook, the projection's group(s))
        self._window = AccumulationWindow()  # the optimizer step in progress: stash, micro-step, loss sums
        self._grad_sync = GradientSync(gradient_sync, accumulate_grad_batches)  # which backwards reduce
        # a checkpoint's open window (entry, path), put back in on_train_start, once the model is in place
        self._pending_window: tuple[dict, str | None] | None = None
        self._warned_nonfinite = False
        self._skip_watch = nonfinite.SkipWatch()
        self.strategy_hooks = StrategyHooks()  # filled by distributed.install_hooks when sharded
        self.register_buffer("skipped_steps", torch.zeros((), dtype=torch.long), persistent=True)

    # ------------------------------------------------------------------ the frozen reference
    @property
    def needs_reference_copy(self) -> bool:
        """Whether a loss needs a frozen copy of the model (BLURUnlearner's may; fine-tuning's never)."""
        return False

    @property
    def reference_model(self) -> nn.Module | None:
        """The frozen copy, when there is one (with LoRA adapters there is none: the policy serves)."""
        return self._reference[0] if self._reference else None

    def set_reference(self, reference: nn.Module) -> None:
        """Hold `reference` as the frozen copy (the distributed set-up hands over its sharded one)."""
        self._reference[:] = [reference]

    def _make_reference(self, model: nn.Module) -> nn.Module:
        raise NotImplementedError(f"{type(self).__name__} needs no frozen reference")

    # ------------------------------------------------------------------ model
    def add_adapters(self, model: nn.Module | None) -> nn.Module | None:
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
                self.model_source, dtype=self.hparams.model_dtype, attn_implementation=self.hparams.attn_implementation,
                compute_dtype=self.compute_dtype(),
            )
            self.tokenizer = load_tokenizer(self.model_source)
        self.model = self.add_adapters(self.model)
        self.apply_trainable_filter()
        if self.needs_reference_copy and not self._reference:
            self.set_reference(self._make_reference(self.model))
        self.enable_activation_checkpointing()  # after the copy: the reference runs under no_grad
        if distributed.is_fsdp1(strategy):
            if adapters.has_adapters(self.model):  # FSDP1 flattens frozen base and adapters into one tensor
                raise ValueError("lora_rank under FSDP1 (strategy='fsdp'): use distributed.FSDP2Strategy instead")
            # The policy (and reference) become their own FSDP1 roots (why: distributed.wrap_fsdp1).
            distributed.wrap_fsdp1(self)
            distributed.install_hooks(self)

    def compute_dtype(self) -> torch.dtype | None:
        """The dtype the forward computes in: a half-precision run's (``bf16-mixed``, ``16-true``...),
        else None (the weights' dtype). Picks the attention kernel (flash-attn needs half inputs)."""
        precision = str(getattr(self._trainer, "precision", "")) if self._trainer is not None else ""
        return {"bf16": torch.bfloat16, "16": torch.float16}.get(precision.split("-")[0])

    def enable_activation_checkpointing(self) -> None:
        """Per decoder layer, when `activation_checkpointing` is set (before FSDP2 shards the layers)."""
        if self.hparams.activation_checkpointing:
            checkpointing.enable(self.model)

    def apply_trainable_filter(self) -> None:
        """requires_grad only where `trainable_params` matches (with LoRA: among the adapters)."""
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
        ref = self.reference_model
        if ref is not None:
            ref.to(self.device)
        self.model.train()
        self._grad_sync.detach()  # the strategy has wrapped the model anew: read the layout again

    def _window_size(self, batch_idx: int) -> int:
        """Micro-batches in the window ``batch_idx`` belongs to: k, or fewer in the epoch's short last one.

        Each micro-batch's loss is divided by it, so every optimizer step sees the mean over its own
        micro-batches: a short window is not k / m times weaker (the Hugging Face Trainer's rule,
        ``current_gradient_accumulation_steps``). Dividing by k instead would make a run's numbers
        depend on how its epoch splits into windows: forget10 on one GPU (100 micro-batches, k = 8)
        would take a half-sized last step every epoch that the same batch on 8 GPUs (k = 1) does not.
        Computed from the window's first index, so a resume mid-window gets the same size.
        """
        k = self.hparams.accumulate_grad_batches
        total = getattr(self._trainer, "num_training_batches", math.inf) if self._trainer is not None else math.inf
        if k == 1 or not isinstance(total, int):  # an iterable of unknown length: windows of k
            return k
        start = batch_idx - self._window.micro_step
        return max(1, min(k, total - start))

    def _closes_window(self) -> bool:
        """Whether the micro-batch about to run ends the optimizer step (k-th, or the epoch's last)."""
        return self._window.micro_step + 1 == self.hparams.accumulate_grad_batches or self._is_last_batch()

    def _reduces(self, closes_window: bool) -> bool:
        """Whether this micro-batch's backward passes reduce their gradients across ranks (GradientSync)."""
        if not self._grad_sync.attached:
            self._grad_sync.attach(getattr(self._trainer, "strategy", None), self.model)
        return self._grad_sync.reduces(closes_window)

    def _backward(self, loss: torch.Tensor, *, reduce: bool, stashed: bool = False) -> None:
        """manual_backward, reducing its gradients across ranks or accumulating them locally (GradientSync)."""
        with self._grad_sync.backward(reduce=reduce, stashed=stashed):
            self.manual_backward(loss)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits

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
        """The end of every optimizer step (BLUR and fine-tuning): `core.step.apply_update`, then the scheduler.

        A non-finite step (`finite` False, already agreed across ranks) leaves the parameters and the
        optimizer state untouched and counts as a step on every path (trainer.global_step and the
        scheduler advance once). The caller has counted the skip (`_count_skip`, before its logging) and it is warned of
        without a stall: on the device paths a step late (SkipWatch), on the host path at once.
        """
        inner = getattr(optimizer, "optimizer", optimizer)
        on_device = self._skips_on_device(inner)  # also refuses nonfinite_skip="device" where it cannot be
        decided_on_device = scale is not None or on_device
        if decided_on_device:
            self._warn_if_skipped(self._skip_watch.read())  # the previous steps' count: no stall
        took = apply_update(optimizer, finite, grads, scale=scale, on_device=on_device, fused=fused,
                            step_kwargs=step_kwargs)  # fmt: skip
        if decided_on_device:
            self._skip_watch.post(self.skipped_steps)
        elif took is False:
            self._warn_if_skipped(int(self.skipped_steps))
        scheduler = self.lr_schedulers()
        if scheduler is not None:
            scheduler.step()
        optimizer.zero_grad(set_to_none=True)

    def _count_skip(self, finite: torch.Tensor) -> None:
        """skipped_steps += 1 on a non-finite step, on the device (no read); before the step's logs."""
        self.skipped_steps += (~finite).long()

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
        self._grad_sync.release()
        self._warn_if_skipped(self._skip_watch.read(wait=True))

    def _should_log_step(self) -> bool:
        """Whether Lightning keeps this step's logged values (every log_every_n_steps-th step).

        Values logged on other steps are dropped by Lightning anyway; skipping the calls saves their
        host time. Falls back to logging every step if the trainer does not expose the decision.
        """
        connector = getattr(self._trainer, "_logger_connector", None) if self._trainer is not None else None
        return bool(getattr(connector, "should_update_logs", True))

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
        scheduler = self.scheduler_factory(optimizer)  # a ResolvableSchedule gets its lengths in on_train_start
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def _resolve_schedule(self) -> None:
        """Give a schedule in epochs or "auto" its lengths in steps, and check an explicit total.

        In on_train_start, before any step: the train loader's length is known only once Lightning
        has loaded it, and loading it earlier ourselves (configure_optimizers, on_fit_start) would run
        before the checkpoint's restore and drop the loader's resume position (Lightning issue 20550).
        The Trainer cannot count our steps either (manual optimization leaves its accumulation at 1).
        """
        scheduler = self.lr_schedulers()
        if isinstance(scheduler, ResolvableSchedule):
            steps = count_optimizer_steps(self.trainer, self.hparams.accumulate_grad_batches)
            scheduler.resolve(steps.per_epoch, steps.total, counted=steps.describe())

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

    def resolve_export_dir(self) -> str | None:
        export_dir = self.hparams.export_dir
        if export_dir != "auto":
            return export_dir
        import os

        root = self.trainer.log_dir or self.trainer.default_root_dir
        return os.path.join(root, "hf_model")

    test_step = validation_step

    # ------------------------------------------------------------------ checkpoints inside a window
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """Keep an open accumulation window: a checkpoint can fall between two micro-batches
        (time- or validation-based ModelCheckpoint, SLURM requeue, trainer.save_checkpoint)."""
        from blur_lightning.distributed import fsdp as distributed

        strategy = self._trainer.strategy if self._trainer else None
        if self._window.is_open:  # rank-local sums are reduced first (a collective; every rank saves)
            self._window.forget_stash = self._grad_sync.flush(self.trainable_parameters(), self._window.forget_stash)
        distributed.accumulation_state(self._window, self._named_trainable(), checkpoint, strategy)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        from blur_lightning.distributed import fsdp as distributed

        entry = checkpoint.get(distributed.ACCUMULATION_KEY)
        ckpt_path = self._trainer.ckpt_path if self._trainer is not None else None
        # Restored in on_train_start: only then are the parameters sharded / wrapped / on device.
        self._pending_window = (entry, ckpt_path) if entry is not None else None

    def on_train_start(self) -> None:
        self._resolve_schedule()  # first: a schedule that disagrees with the fit fails before any other work
        pending = self._pending_window
        if pending is not None:
            from blur_lightning.distributed import fsdp as distributed

            distributed.restore_accumulation(self._window, self._named_trainable(), *pending)
            self._pending_window = None
