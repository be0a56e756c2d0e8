"""Resuming: kill -9 and rerun, SIGTERM saves and exits 143, a truncated last.ckpt, atomic writes, init_from."""

from __future__ import annotations

import copy
import json
import logging
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from conftest import REPO, cli_env, compose_train, fer_train_cmd
from fer.checkpointing import AtomicCheckpointIO, load_initial_weights
from fer.errors import CheckpointError
from fer.resume import LAST, PREVIOUS, run_dir
from fer.train import train

pytestmark = pytest.mark.timeout(600)
STEPS_PER_EPOCH = 280 // 32  # TINY_CLI: 280 training faces, batches of 32, last partial batch dropped
FIXTURE_STEPS = 3  # the in-process runs below stop each epoch after 3 batches


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 400) -> None:
    deadline = time.monotonic() + timeout
    while not path.is_file():
        if proc.poll() is not None:
            raise AssertionError(f"finished before {path} appeared:\n{proc.stdout.read()[-3000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"{path} did not appear in {timeout} s")
        time.sleep(0.05)


def _summary(run: Path) -> dict:
    return json.loads((run / "summary.json").read_text())


def test_kill_9_then_resume_auto_finishes_all_epochs(tmp_path):
    cmd = fer_train_cmd("run_name=k9", "resume=auto", "trainer.max_epochs=2")
    run = tmp_path / "logs" / "train" / "runs" / "k9"
    env = cli_env(tmp_path)
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    _wait_for(run / "checkpoints" / LAST, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert not (run / "summary.json").exists()
    assert torch.load(run / "checkpoints" / LAST, weights_only=True)["global_step"] >= STEPS_PER_EPOCH

    again = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=500)
    assert again.returncode == 0, again.stderr[-3000:]
    summary = _summary(run)
    assert summary["resumed_from"].endswith(LAST)
    assert summary["epochs_completed"] == 2
    assert summary["global_step"] == 2 * STEPS_PER_EPOCH  # continued from the checkpoint's step
    assert json.loads((run / "status.json").read_text())["status"] == "completed"
    assert len(json.loads((run / "provenance.json").read_text())["resumed"]) == 1


def test_sigterm_saves_a_checkpoint_exits_143_and_resume_finishes(tmp_path):
    cmd = fer_train_cmd("run_name=term", "resume=auto", "trainer.max_epochs=2")
    run = tmp_path / "logs" / "train" / "runs" / "term"
    env = cli_env(tmp_path)
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    # wait until the training loop runs (signals before that end the process like any program)
    log_file = run / "train.log"
    deadline = time.monotonic() + 400
    while "training loop running" not in (log_file.read_text() if log_file.is_file() else ""):
        assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read()[-3000:]
        time.sleep(0.05)
    time.sleep(1.0)  # mid-epoch
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 143, out[-3000:]
    assert "Traceback" not in out
    status = json.loads((run / "status.json").read_text())
    assert status["status"] == "preempted" and status["checkpoint"].endswith(LAST)
    saved = torch.load(run / "checkpoints" / LAST, weights_only=True)
    assert saved["global_step"] == status["global_step"]

    again = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=500)
    assert again.returncode == 0, again.stderr[-3000:]
    summary = _summary(run)
    assert summary["epochs_completed"] == 2
    assert summary["global_step"] == 2 * STEPS_PER_EPOCH


@pytest.fixture(scope="module")
def two_epochs(tmp_path_factory):
    """A 2-epoch run (in-process) whose directory the tests below resume from, each in a copy."""
    tmp = tmp_path_factory.mktemp("two")
    cfg = compose_train(tmp, ["data.source.num_train=280", "data.source.num_val=64", "data.image_size=32",
                              "data.source.image_size=32", f"trainer.limit_train_batches={FIXTURE_STEPS}",
                              "callbacks.sample_grid=null", "callbacks.confusion_matrix=null", "seed=1"])
    return cfg, train(cfg)


def test_checkpoints_load_with_weights_only_and_keep_the_previous_last(two_epochs):
    cfg, summary = two_epochs
    folder = Path(cfg.paths.output_dir) / "checkpoints"
    last = torch.load(folder / LAST, weights_only=True)
    prev = torch.load(folder / PREVIOUS, weights_only=True)
    assert last["epoch"] == 1 and prev["epoch"] == 0
    assert torch.load(summary["best_model_path"], weights_only=True)["state_dict"]
    assert not list(folder.glob(".*.tmp"))
    assert (Path(cfg.paths.output_dir) / "config.yaml").is_file()  # train() outside Hydra records its config


def _resumed_copy(cfg, run: Path, max_epochs: int):
    """A copy of the fixture's run in `run`, and its config to resume it with `max_epochs` in all."""
    import shutil

    shutil.copytree(cfg.paths.output_dir, run)
    again = copy.deepcopy(cfg)
    again.paths.output_dir = str(run)
    again.trainer.default_root_dir = str(run)
    again.callbacks.model_checkpoint.dirpath = str(run / "checkpoints")
    again.logger.save_dir = str(run)
    again.resume = "auto"
    again.trainer.max_epochs = max_epochs
    return again


def test_truncated_last_ckpt_resumes_from_the_previous_good_one(two_epochs, tmp_path, caplog):
    cfg, _ = two_epochs
    run = tmp_path / "run"
    again = _resumed_copy(cfg, run, max_epochs=3)
    last = run / "checkpoints" / LAST
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 3])  # a half-copied / cut-off file
    with caplog.at_level(logging.WARNING, logger="fer.resume"):
        summary = train(again)
    warnings = [r.getMessage() for r in caplog.records if r.name == "fer.resume"]
    assert len(warnings) == 1 and "unreadable checkpoint last.ckpt" in warnings[0] and PREVIOUS in warnings[0]
    assert "\n" not in warnings[0]
    assert summary["resumed_from"].endswith(PREVIOUS)
    assert summary["epochs_completed"] == 3 and summary["global_step"] == 3 * FIXTURE_STEPS
    assert (run / "checkpoints" / (LAST + ".corrupt")).is_file()
    torch.load(run / "checkpoints" / LAST, weights_only=True)  # rewritten, whole


def test_resumed_run_reports_the_best_accuracy_of_the_whole_run(two_epochs, tmp_path, monkeypatch):
    from fer.models.classifier import FERClassifier
    from fer.train import objective

    cfg, first = two_epochs
    best = first["metrics"]["val/acc_best"]
    assert best > 0
    validate = FERClassifier.validation_step

    def always_wrong(self, batch, batch_idx):  # the resumed epoch validates at 0% accuracy
        images, _ = batch
        with torch.no_grad():
            return validate(self, (images, (self(images).argmax(dim=1) + 1) % 7), batch_idx)

    monkeypatch.setattr(FERClassifier, "validation_step", always_wrong)
    summary = train(_resumed_copy(cfg, tmp_path / "run", max_epochs=3))
    assert summary["epochs_completed"] == 3 and summary["metrics"]["val/acc"] == 0.0
    # What a sweep (Optuna) is handed for a requeued trial: the best of all its epochs, not of the resumed ones.
    assert objective(summary, "val/acc_best") == pytest.approx(best)


def test_a_finished_run_is_one_that_did_what_it_planned_and_is_asked_no_more(tmp_path):
    from omegaconf import OmegaConf

    from fer.summary import write_status, write_summary
    from fer.train import finished_summary

    def finished(asked: int, **summary) -> bool:
        write_summary(tmp_path, summary)
        return finished_summary(OmegaConf.create({"trainer": {"max_epochs": asked}}), tmp_path) is not None

    write_status(tmp_path, "completed")
    assert finished(30, epochs_completed=7, planned_epochs=7, max_epochs=30)  # a time budget fitted 7 of 30
    assert not finished(40, epochs_completed=7, planned_epochs=7, max_epochs=30)  # asked to train on
    assert not finished(30, epochs_completed=5, planned_epochs=7, max_epochs=30)  # stopped short (the Timer)
    assert finished(5, epochs_completed=5) and not finished(6, epochs_completed=5)  # older summaries
    write_status(tmp_path, "preempted")
    assert not finished(30, epochs_completed=7, planned_epochs=7, max_epochs=30)


def test_explicit_bad_ckpt_path_is_a_one_line_error(two_epochs, tmp_path):
    cfg, _ = two_epochs
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(b"PK\x03\x04 not really")
    again = copy.deepcopy(cfg)
    again.ckpt_path = str(bad)
    with pytest.raises(CheckpointError, match="bad.ckpt"):
        train(again)


def test_atomic_write_never_leaves_half_a_checkpoint(tmp_path, monkeypatch):
    io = AtomicCheckpointIO()
    path = tmp_path / "checkpoints" / LAST
    io.save_checkpoint({"a": torch.ones(3)}, path)
    io.save_checkpoint({"a": torch.full((3,), 2.0)}, path)
    assert torch.load(path, weights_only=True)["a"][0] == 2 and torch.load(path.with_name(PREVIOUS))["a"][0] == 1

    def dies_halfway(obj, file):
        file.write(b"PK\x03\x04 partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", dies_halfway)
    with pytest.raises(OSError):
        io.save_checkpoint({"a": torch.zeros(3)}, path)
    assert torch.load(path, weights_only=True)["a"][0] == 2  # untouched
    assert sorted(p.name for p in path.parent.iterdir()) == [LAST, PREVIOUS]  # no temp file left


def test_init_from_loads_weights_only_and_strictly(two_epochs, tmp_path):
    from hydra.utils import instantiate

    cfg, summary = two_epochs
    model = instantiate(cfg.model, _convert_="all")
    load_initial_weights(model, cfg.paths.output_dir)  # a run directory: its best checkpoint
    saved = torch.load(summary["best_model_path"], weights_only=True)["state_dict"]
    for name, value in model.net.state_dict().items():
        assert torch.equal(value, saved[f"net.{name}"]), name
    other = instantiate(compose_train(tmp_path, ["model=lite1", "model.backbone.weights=none"]).model, _convert_="all")
    with pytest.raises(CheckpointError, match="do not fit"):
        load_initial_weights(other, summary["best_model_path"])


def test_run_directory_rules(tmp_path):
    root = tmp_path / "runs"
    assert run_dir(str(root), "2026-01-01_00-00-00_000001") == str(root / "2026-01-01_00-00-00_000001")
    assert run_dir(str(root), "stamp", "mine") == str(root / "mine")
    assert run_dir(str(root), "stamp", "mine", "auto") == str(root / "mine")
    assert run_dir(str(root), "stamp", None, "auto") == str(root / "stamp")  # nothing to resume yet
    for name, age in (("old", 100), ("new", 10)):
        ckpt = root / name / "checkpoints" / LAST
        ckpt.parent.mkdir(parents=True)
        ckpt.write_bytes(b"x")
        os.utime(ckpt, (time.time() - age, time.time() - age))
    assert run_dir(str(root), "stamp", None, "auto") == str((root / "new").resolve())
    assert run_dir(str(root), "stamp", None, "old") == str((root / "old").resolve())
    assert run_dir(str(root), "stamp", None, str(root / "old")) == str((root / "old").resolve())
    with pytest.raises(ValueError, match="neither a run directory nor a run name"):
        run_dir(str(root), "stamp", None, "missing")
