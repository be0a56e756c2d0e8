"""A time-boxed run (Trainer max_time + FitEpochsToMaxTime) ends on a validated epoch, fully annealed."""

from __future__ import annotations

import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from conftest import compose_train
from fer.train import train


def test_time_budget_ends_on_a_validated_annealed_epoch(tmp_path):
    cfg = compose_train(tmp_path, [
        # Epochs of two to three seconds: sub-second ones (128 faces) let one hiccup of the loaded machine (a
        # checkpoint write, a TensorBoard flush) outlast the safety margin and the Timer stop mid-epoch.
        "data.source.num_train=1024", "data.source.num_val=64",
        # 45 s: two epochs at least, with room, on a machine ~1.4x slower than usual (30 s fitted only two
        # there: the first epoch carries the start-up, and the plan keeps a 2x margin).
        "trainer.max_epochs=500", "trainer.max_time=00:00:00:45",
        "+callbacks.time_budget._target_=fer.time_budget.FitEpochsToMaxTime",
        "+callbacks.time_budget.safety=2.0",  # short epochs jitter more than real ones
        "optim.optimizer.lr=1e-3", "optim.scheduler.min_lr_ratio=0.01", "optim.scheduler.warmup_epochs=0",
    ])
    summary = train(cfg)
    epochs = summary["epochs_completed"]
    assert 2 <= epochs < 500  # re-planned after an epoch that was not the last, and far short of max_epochs
    steps_per_epoch = 1024 // 32
    assert summary["global_step"] == epochs * steps_per_epoch  # stopped on an epoch boundary, not mid-epoch

    events = EventAccumulator(str(next((tmp_path / "run" / "tensorboard").rglob("events.out.*")).parent))
    events.Reload()
    assert len(events.Scalars("val/acc")) == epochs  # the last epoch was validated too

    last = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=False)
    lr = last["optimizer_states"][0]["param_groups"][0]["lr"]
    assert lr <= 1e-3 * 0.02, lr  # the cosine reached its floor at the shortened end, not at epoch 500
    assert last["callbacks"]["FitEpochsToMaxTime"]["max_epochs"] == epochs


def test_rerun_of_a_finished_time_boxed_run_keeps_its_summary(tmp_path, monkeypatch):
    import json

    from fer.time_budget import FitEpochsToMaxTime

    # The budget fits one epoch of the configured four (a slow machine), without waiting for a real clock.
    monkeypatch.setattr(FitEpochsToMaxTime, "_epochs_that_fit", lambda self, done, *rest: 1)
    cfg = compose_train(tmp_path, [
        "data.source.num_train=64", "data.source.num_val=32", "data.image_size=32", "data.source.image_size=32",
        "trainer.max_epochs=4", "trainer.max_time=00:00:10:00", "resume=auto",
        "+callbacks.time_budget._target_=fer.time_budget.FitEpochsToMaxTime",
        "callbacks.sample_grid=null", "callbacks.confusion_matrix=null",
    ])
    first = train(cfg)
    assert first["epochs_completed"] == first["planned_epochs"] == 1 and first["max_epochs"] == 4
    path = tmp_path / "run" / "summary.json"
    saved = path.read_text()
    # resume=auto again (a requeue, a repeated command): finished, nothing to resume
    assert train(cfg) == first and path.read_text() == saved
    # A summary from before planned_epochs: the run resumes, trains nothing, and keeps its metrics.
    path.write_text(json.dumps({k: v for k, v in first.items() if k != "planned_epochs"}))
    again = train(cfg)
    assert again["resumed_from"] and again["epochs_completed"] == 1
    assert again["metrics"]["val/acc"] == first["metrics"]["val/acc"]
    assert json.loads(path.read_text())["metrics"]["val/f1_macro"] == first["metrics"]["val/f1_macro"]
