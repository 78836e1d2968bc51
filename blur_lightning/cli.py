"""`blur-lightning fit|validate|test --config X.yaml`: LightningCLI over BLURUnlearner and the data module."""

from __future__ import annotations

import warnings

from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.strategies import DDPStrategy, SingleDeviceStrategy

from blur_lightning.checkpoint import AtomicCheckpointIO


class BLURCLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        # One model name serves both: the module loads the weights, the data module its tokenizer.
        parser.link_arguments("model.model", "data.tokenizer", apply_on="parse")

    def _attach_atomic_checkpoints(self) -> None:
        strategy = self.trainer.strategy
        # Single-file checkpoints (one device, DDP) go through an atomic temp-file-and-rename;
        # sharded strategies write directories through torch.distributed.checkpoint.
        if isinstance(strategy, (SingleDeviceStrategy, DDPStrategy)):
            strategy.checkpoint_io = AtomicCheckpointIO()

    def before_fit(self) -> None:
        self._attach_atomic_checkpoints()


def main(args: list[str] | None = None, run: bool = True) -> BLURCLI:
    # Lightning warns that a checkpoint saved under manual optimization holds the state after
    # the step: exactly what resuming needs. And a deprecation inside Lightning itself.
    warnings.filterwarnings("ignore", message="Using ModelCheckpoint with manual optimization")
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)")
    from blur_lightning.data import ForgetRetainDataModule
    from blur_lightning.module import BLURUnlearner

    return BLURCLI(
        BLURUnlearner,
        ForgetRetainDataModule,
        save_config_kwargs={"overwrite": True},
        args=args,
        run=run,
        auto_configure_optimizers=False,
    )


def console_main() -> None:
    """The `blur-lightning` console script (returns nothing: a returned object would be printed)."""
    main()


if __name__ == "__main__":
    console_main()
