"""FineTuner: plain fine-tuning (NLL on the answer tokens) through the same module, data, checkpoints and CLI.

Unlearning needs a model that knows something first: the fictitious benchmark (blur_lightning.fictitious.build)
plants facts in the embedded model with this module, and fine-tunes the retain oracle the same way on
the retain facts alone. It is the same step as BLURUnlearner's with no forget side: both are
CausalLMModules (training/base.py), which hold the model, dtype, LoRA adapters, activation
checkpointing, FSDP2/DDP set-up, the accumulation window, the end of each optimizer step, optimizer
and scheduler factories, validation, export and checkpoints; only the micro-batch differs.

    blur-lightning finetune --config CONFIG   (the fictitious build writes its two: fictitious/build.py)

The data module is ForgetRetainDataModule with ``forget_path: null``: the retain rows are the training
set and set the epoch (data/datamodule.py). One optimizer step = ``accumulate_grad_batches`` micro-batches,
ended by the shared ``_apply_update``: a step whose loss or gradient is not finite is skipped as
BLUR's is (GradScaler, the device flag of a fused optimizer, or one host read), and clipping acts on the
true gradient over every shard (``core.clipping.clip_``), under 16-mixed too.
"""

from __future__ import annotations

import torch
from torch import nn

from blur_lightning.core import nonfinite
from blur_lightning.core.backends import local_tensor
from blur_lightning.core.step import check_and_clip_
from blur_lightning.losses import registry as loss_registry
from blur_lightning.losses.context import LossContext
from blur_lightning.training.base import CausalLMModule, OptimizerFactory, SchedulerFactory
from blur_lightning.training.outputs import FineTuneOutput

__all__ = ["FineTuner"]


class FineTuner(CausalLMModule):
    """Fine-tune on the retain set with NLL on the answer tokens (``qa`` rows) or every token (``text``).

    Args:
        model, model_dtype, attn_implementation, accumulate_grad_batches, gradient_sync, gradient_clip_val,
        gradient_clip_algorithm, nonfinite_skip, trainable_params, lora_rank, lora_alpha, lora_dropout,
        lora_target_modules, activation_checkpointing, export_dir, optimizer, scheduler: as
        :class:`~blur_lightning.training.unlearner.BLURUnlearner`.
    """

    def __init__(
        self,
        model: str | nn.Module = "embedded:smollm2-135m-instruct",
        model_dtype: str = "float32",
        attn_implementation: str = "auto",
        accumulate_grad_batches: int = 1,
        gradient_sync: str = "per_step",
        gradient_clip_val: float | None = None,
        gradient_clip_algorithm: str = "norm",
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
            model=model, model_dtype=model_dtype, attn_implementation=attn_implementation,
            accumulate_grad_batches=accumulate_grad_batches, gradient_sync=gradient_sync,
            gradient_clip_val=gradient_clip_val, gradient_clip_algorithm=gradient_clip_algorithm,
            nonfinite_skip=nonfinite_skip, trainable_params=trainable_params, lora_rank=lora_rank,
            lora_alpha=lora_alpha, lora_dropout=lora_dropout, lora_target_modules=lora_target_modules,
            activation_checkpointing=activation_checkpointing, export_dir=export_dir,
            optimizer=optimizer, scheduler=scheduler,
        )  # fmt: skip

    def retain_loss(self, side: dict[str, torch.Tensor]) -> torch.Tensor:
        """NLL on the labelled tokens (the answers of ``qa`` rows)."""
        loss = loss_registry.get("retain", "nll")
        return loss(LossContext(self, loss, side))

    def training_step(self, batch: dict[str, dict[str, torch.Tensor]], batch_idx: int) -> FineTuneOutput:
        if "forget" in batch:
            raise ValueError(
                "FineTuner trains on one set: set data.forget_path: null and the training rows as data.retain_path "
                "(a forget set here would be ignored)"
            )
        m = self._window_size(batch_idx)  # k, or fewer in the epoch's short last window
        closes = self._closes_window()
        loss = self.retain_loss(batch["retain"])
        self._backward(loss / m, reduce=self._reduces(closes))  # per_step: reduced in the window's last only
        self._window.add_loss("loss", loss.detach() / m)
        self._window.micro_step += 1
        if closes:
            self._fine_tune_step()
        return {"loss": loss.detach()}

    def _fine_tune_step(self) -> None:
        optimizer = self.optimizers()
        hp = self.hparams
        loss = self._window.loss_sums["loss"]
        scale = nonfinite.current_scale(nonfinite.grad_scaler(self._trainer))  # 16-mixed: grads carry it
        grads = [local_tensor(p.grad) for p in self.trainable_parameters() if p.grad is not None]
        finite = check_and_clip_(loss, grads, max_value=hp.gradient_clip_val, algorithm=hp.gradient_clip_algorithm,
                                 scale=scale, group=self._projection_group())  # fmt: skip
        self._count_skip(finite)
        self._apply_update(optimizer, finite, grads, scale=scale)  # BLUR's too: skip, step, scheduler
        self._window.close()
        if self._should_log_step():
            lr = torch.full((), float(optimizer.param_groups[0]["lr"]), device=self.device)
            self.log_dict({"train/loss": loss, "train/lr": lr, "train/skipped_steps": self.skipped_steps.float()},
                          on_step=True, on_epoch=False, batch_size=1)  # fmt: skip
            self.log("train/loss_pbar", loss, on_step=True, prog_bar=True, logger=False, batch_size=1)
