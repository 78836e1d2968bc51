"""The accumulation window: the optimizer step in progress as one object that saves and loads itself."""

from __future__ import annotations

import pytest
import torch

from blur_lightning.core.accumulation import AccumulationWindow


def test_a_window_round_trips_through_its_state_dict():
    names = ["a", "b", "c"]
    window = AccumulationWindow()
    assert not window.is_open and window.stash_for(3) == [None, None, None]
    window.forget_stash = [torch.ones(2), None, torch.full((3,), 2.0)]
    window.add_loss("forget_loss", torch.tensor(0.5))
    window.add_loss("forget_loss", torch.tensor(0.25))
    window.micro_step = 2
    retain = [None, torch.zeros(4), torch.full((3,), -1.0)]
    state = window.state_dict(names, retain)
    assert state["micro_step"] == 2 and state["loss_sums"]["forget_loss"].item() == 0.75
    assert sorted(state["forget"]) == ["a", "c"] and sorted(state["retain"]) == ["b", "c"]

    reopened = AccumulationWindow()
    got_retain = reopened.load_state_dict(state, names, torch.device("cpu"))
    assert reopened.is_open and reopened.micro_step == 2
    assert reopened.forget_stash[1] is None and torch.equal(reopened.forget_stash[2], torch.full((3,), 2.0))
    assert got_retain[0] is None and torch.equal(got_retain[1], torch.zeros(4))
    reopened.close()
    assert not reopened.is_open and reopened.forget_stash is None and reopened.loss_sums == {}


def test_a_window_reopens_only_over_the_same_parameters():
    state = AccumulationWindow(micro_step=1).state_dict(["a", "b"], [None, None])
    with pytest.raises(ValueError, match="different trainable parameters \\(2 saved, 1 now\\)"):
        AccumulationWindow().load_state_dict(state, ["a"], torch.device("cpu"))
