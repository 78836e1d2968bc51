"""`blur-lightning fit|validate|test --config X.yaml`: LightningCLI over BLURUnlearner and the data module.

`blur-lightning finetune --config X.yaml` is `fit` with blur_lightning.training.finetune.FineTuner as the model
(plain fine-tuning on the retain set, e.g. planting the fictitious facts: blur_lightning.fictitious.build).
"""

from __future__ import annotations

import os
import warnings

from lightning.pytorch.callbacks import RichProgressBar, TQDMProgressBar
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.strategies import DDPStrategy, SingleDeviceStrategy

from blur_lightning.training.checkpoint_io import AtomicCheckpointIO, verify_checkpoint
from blur_lightning.training.progress import StepProgressBar


class BLURCLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        # One model name serves both: the module loads the weights, the data module its tokenizer.
        parser.link_arguments("model.model", "data.tokenizer", apply_on="parse")

    def _parse_ckpt_path(self) -> None:
        # LightningCLI reads the checkpoint's hyperparameters before any trainer exists; a damaged
        # file would fail there as a `weights_only` refusal that suggests loading it unsafely.
        subcommand = self.config.get("subcommand")
        ckpt_path = self.config[subcommand].get("ckpt_path") if subcommand else None
        if ckpt_path and os.path.isfile(ckpt_path):
            verify_checkpoint(ckpt_path, what="ckpt_path")
        super()._parse_ckpt_path()

    def _attach_atomic_checkpoints(self) -> None:
        strategy = self.trainer.strategy
        # Single-file checkpoints (one device, DDP) go through an atomic temp-file-and-rename (and a
        # load that names a damaged file); sharded strategies write directories through
        # torch.distributed.checkpoint.
        if isinstance(strategy, (SingleDeviceStrategy, DDPStrategy)):
            strategy.checkpoint_io = AtomicCheckpointIO()

    def _count_steps_in_progress_bar(self) -> None:
        # Lightning's own bar reads "Epoch 3/-2" in a run bounded by max_steps with max_epochs=-1. Its
        # default is the rich bar when `rich` is installed (peft's dependencies bring it), else tqdm's.
        callbacks = self.trainer.callbacks
        for i, callback in enumerate(callbacks):
            if type(callback) is TQDMProgressBar:
                callbacks[i] = StepProgressBar(refresh_rate=callback.refresh_rate)
            elif type(callback) is RichProgressBar:
                callbacks[i] = StepProgressBar(refresh_rate=callback.refresh_rate)

    def before_instantiate_classes(self) -> None:
        # `fictitious:target`, `fictitious:data/forget10_perturbed.jsonl`...: the fictitious benchmark's
        # files, built on first use (blur_lightning.fictitious.build; about 15 minutes on a 2-core CPU).
        from blur_lightning.fictitious.build import resolve_names

        resolve_names(self.config)

    def before_fit(self) -> None:
        self._attach_atomic_checkpoints()
        self._count_steps_in_progress_bar()

    def before_validate(self) -> None:
        self._attach_atomic_checkpoints()

    def before_test(self) -> None:
        self._attach_atomic_checkpoints()


def main(args: list[str] | None = None, run: bool = True, model_class: type | None = None) -> BLURCLI:
    # Lightning warns that a checkpoint saved under manual optimization holds the state after
    # the step: exactly what resuming needs. And a deprecation inside Lightning itself.
    warnings.filterwarnings("ignore", message="Using ModelCheckpoint with manual optimization")
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)")
    from blur_lightning.data.datamodule import ForgetRetainDataModule
    from blur_lightning.training.unlearner import BLURUnlearner

    return BLURCLI(
        model_class or BLURUnlearner,
        ForgetRetainDataModule,
        save_config_kwargs={"overwrite": True},
        args=args,
        run=run,
        auto_configure_optimizers=False,
    )


def finetune_main(args: list[str] | None = None, run: bool = True) -> BLURCLI:
    """`blur-lightning finetune ...`: LightningCLI's `fit` over FineTuner (the same flags and config)."""
    from blur_lightning.training.finetune import FineTuner

    return main(["fit", *(args or [])], run=run, model_class=FineTuner)


def console_main() -> None:
    """The `blur-lightning` console script (returns nothing: a returned object would be printed)."""
    import sys

    if sys.argv[1:2] == ["finetune"]:
        finetune_main(sys.argv[2:])
        return
    main()


if __name__ == "__main__":
    console_main()
