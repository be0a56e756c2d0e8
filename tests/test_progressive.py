"""Progressive resizing: the per-epoch size schedule, the time budget that plans around it, and a real fit."""

from __future__ import annotations

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from conftest import compose_train
from fer.progressive import ProgressiveResize
from fer.time_budget import FitEpochsToMaxTime
from fer.train import train


def test_size_grows_in_steps_over_the_first_fraction_of_the_run():
    resize = ProgressiveResize(start_size=48, step=8, fraction=0.5)
    sizes = [resize.size_at(epoch, 32, 64) for epoch in range(32)]
    assert sizes == [48] * 8 + [56] * 8 + [64] * 16
    assert [resize.size_at(e, 10, 64) for e in range(10)] == [48, 48, 48, 56, 56, 64, 64, 64, 64, 64]
    assert ProgressiveResize(start_size=64).size_at(0, 10, 64) == 64  # nothing smaller to start from


def test_size_never_shrinks_when_the_plan_grows():
    resize = ProgressiveResize(start_size=48, step=8, fraction=0.5)
    resize.current_size = 64  # epoch 12 trained at full size in a 20-epoch plan ...
    assert resize.size_at(13, 40, 64) == 64  # ... and stays there when the plan doubles


def test_bad_settings_are_refused_with_the_key():
    with pytest.raises(ValueError, match="fraction"):
        ProgressiveResize(fraction=1.0)


def test_time_budget_adds_up_each_epochs_cost_at_its_size():
    budget = FitEpochsToMaxTime(safety=1.0)
    budget.upper = 40
    resize = ProgressiveResize(start_size=48, step=8, fraction=0.5)
    resize.current_size = 48
    budget.seconds_at_size = {48: [10.0], 64: [30.0, 20.0, 19.0]}  # medians: 10 s and 20 s
    # 56 px is unseen: scaled from 48 px by the side, 10 * 56 / 48 = 11.7 s
    planned = budget._epochs_that_fit(1, 400.0, resize, 64)
    cost = lambda n: sum(budget._predicted_seconds(resize.size_at(e, n, 64)) for e in range(1, n))  # noqa: E731
    assert cost(planned) <= 400.0 < cost(planned + 1)
    assert 20 < planned < 30  # more than 400 / 20 s full-size epochs, fewer than 400 / 10 s small ones
    assert budget._epochs_that_fit(1, 400.0, None, 48) == 40  # capped by the configured max_epochs
    assert budget._epochs_that_fit(1, 95.0, None, 64) == 1 + 4  # without resizing: remaining // epoch time


def test_fit_trains_small_then_full_size_and_validates_at_full_size(tmp_path):
    summary = train(compose_train(tmp_path, [
        "trainer.max_epochs=4", "+callbacks.progressive_resize._target_=fer.progressive.ProgressiveResize",
        "+callbacks.progressive_resize.start_size=32", "+callbacks.progressive_resize.step=8",
        "+callbacks.progressive_resize.fraction=0.5",
    ]))  # data.image_size=48 in the tiny runs
    events = EventAccumulator(str(next((tmp_path / "run" / "tensorboard").rglob("events.out.*")).parent))
    events.Reload()
    assert [int(e.value) for e in events.Scalars("train/image_size")] == [32, 40, 48, 48]
    assert len(events.Scalars("val/acc")) == 4 and summary["best_val_acc"] > 0.3  # learned, chance is 1/7
    # The size trained at last travels in the checkpoint, so a resumed run does not shrink its images.
    checkpoint = torch.load(next((tmp_path / "run").rglob("last.ckpt")), map_location="cpu", weights_only=False)
    [state] = [v for k, v in checkpoint["callbacks"].items() if k.startswith("ProgressiveResize")]
    resumed = ProgressiveResize(start_size=32, step=8, fraction=0.5)
    resumed.load_state_dict(state)
    assert state == {"current_size": 48} and resumed.size_at(1, 4, 48) == 48  # epoch 1 alone would train at 40


@pytest.mark.parametrize(("fraction", "max_epochs"), [(0.5, 1), (0.5, 2), (0.75, 3), (0.9, 5), (0.95, 10), (0.5, 10)])
def test_last_planned_epoch_trains_at_full_size(fraction, max_epochs):
    # A short plan (a time budget cutting the run to a few epochs) or a large fraction must not leave the
    # network ending on small images: it is validated, evaluated and exported at the full size.
    resize = ProgressiveResize(start_size=32, step=8, fraction=fraction)
    sizes = [resize.size_at(e, max_epochs, 64) for e in range(max_epochs)]
    assert sizes[-1] == 64 and sizes == sorted(sizes), sizes
