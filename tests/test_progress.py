"""Progress bars: silent off a terminal (CI logs), and the training bar counts steps of max_steps."""

from __future__ import annotations

import io

import lightning.pytorch as pl
import pytest
import torch
from tqdm import tqdm

from blur_lightning.training import progress as P


def test_progress_is_silent_off_a_terminal_and_when_off(monkeypatch):
    monkeypatch.setattr(P, "on_terminal", lambda: False)
    bar = P.progress(range(3), desc="x")
    assert not isinstance(bar, tqdm) and list(bar) == [0, 1, 2]
    monkeypatch.setattr(P, "on_terminal", lambda: True)
    assert not isinstance(P.progress(range(3), enabled=False), tqdm)
    monkeypatch.setattr("sys.stderr", io.StringIO())
    assert list(P.progress(range(3), desc="qa forget: generate")) == [0, 1, 2]


class _Steps(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(2, 1)

    def training_step(self, batch, batch_idx):
        return self.layer(batch[0]).sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def test_training_bar_counts_steps_of_max_steps(tmp_path):
    """Lightning's own bar read "Epoch 3/-2" with max_epochs=-1: per epoch, against no total."""
    bar = P.StepProgressBar()
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(4, 2)), batch_size=2)
    trainer = pl.Trainer(accelerator="cpu", max_steps=5, max_epochs=-1, logger=False, enable_checkpointing=False,
                         enable_model_summary=False, default_root_dir=tmp_path, callbacks=[bar])  # fmt: skip
    trainer.fit(_Steps(), data)  # 2 batches an epoch: 3 epochs
    assert (bar.train_progress_bar.n, bar.train_progress_bar.total) == (5, 5)
    assert bar.train_progress_bar.desc.startswith("Step")


def test_the_cli_swaps_lightnings_bar_for_the_step_bar():
    import types

    from lightning.pytorch.callbacks import TQDMProgressBar

    from blur_lightning.cli import BLURCLI

    other = object()
    cli = types.SimpleNamespace(trainer=types.SimpleNamespace(callbacks=[TQDMProgressBar(refresh_rate=3), other]))
    BLURCLI._count_steps_in_progress_bar(cli)
    bar, kept = cli.trainer.callbacks
    assert type(bar) is P.StepProgressBar and bar.refresh_rate == 3 and kept is other


def test_the_cli_swaps_the_rich_bar_too():
    # Lightning's default is RichProgressBar once `rich` is installed (peft's dependencies bring it):
    # the demo read "Epoch 3/-2" through it
    import types

    pytest.importorskip("rich")
    from lightning.pytorch.callbacks import RichProgressBar

    from blur_lightning.cli import BLURCLI

    cli = types.SimpleNamespace(trainer=types.SimpleNamespace(callbacks=[RichProgressBar(refresh_rate=2)]))
    BLURCLI._count_steps_in_progress_bar(cli)
    (bar,) = cli.trainer.callbacks
    assert type(bar) is P.StepProgressBar and bar.refresh_rate == 2
