"""Sweeps: a 2x2 grid with failing jobs, its summary table and files, fer-sweep-summary, Optuna with SQLite."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from conftest import REPO, cli_env, fer_train_cmd
from fer.summary import write_status
from fer.sweep import cli, collect
from fer.utils import CONFIG_DIR

pytestmark = pytest.mark.timeout(600)


def test_grid_sweep_keeps_going_past_failed_jobs_and_summarises(tmp_path, capsys):
    sweep = tmp_path / "multirun"
    # 2 x 2: the two data.on_bad=bogus jobs fail in FERDataModule(); the sweep must still run the other two.
    result = subprocess.run(
        fer_train_cmd("-m", f"hydra.sweep.dir={sweep}", "trainer.max_epochs=1", "trainer.limit_train_batches=2",
                      "optim.optimizer.lr=1e-3,3e-4", "data.on_bad=error,bogus"),
        capture_output=True, text=True, cwd=REPO, env=cli_env(tmp_path), timeout=500,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    jobs = sorted(p.name for p in sweep.iterdir() if p.is_dir())
    assert jobs == ["0", "1", "2", "3"]  # one directory per job, no collisions
    summary = json.loads((sweep / "sweep_summary.json").read_text())
    rows = {tuple(sorted(o for o in r["varied"])): r for r in summary["jobs"]}
    assert len(rows) == 4
    for lr in ("0.001", "0.0003"):  # Hydra records sweep values as parsed
        ok = rows[("data.on_bad=error", f"optim.optimizer.lr={lr}")]
        assert ok["status"] == "completed" and 0.0 <= ok["best_val_acc"] <= 1.0 and ok["epochs"] == 1
        assert ok["f1_macro"] is not None
        bad = rows[("data.on_bad=bogus", f"optim.optimizer.lr={lr}")]
        assert bad["status"] == "failed" and bad["best_val_acc"] is None
        assert "DataError" in bad["error"] and "bogus" in bad["error"] and "\n" not in bad["error"]
        assert (Path(bad["run_dir"]) / "traceback.txt").is_file()
    csv_lines = (sweep / "sweep_summary.csv").read_text().strip().splitlines()
    assert len(csv_lines) == 5 and csv_lines[0].startswith("job,status,overrides")
    assert "fer sweep" in result.stdout and "failed" in result.stdout  # the table, printed at the end
    # the CLI prints the same table for the finished sweep
    assert cli([str(sweep)]) == 0
    out = capsys.readouterr().out
    assert "2 completed" in out and "2 failed" in out and "data.on_bad=bogus" in out


def test_summary_of_a_sweep_still_running(tmp_path, capsys):
    sweep = tmp_path / "sweep"
    done, running, dead, fresh = (sweep / n for n in ("0", "1", "2", "3"))
    for d in (done, running, dead, fresh):
        (d / ".hydra").mkdir(parents=True)
        (d / ".hydra" / "overrides.yaml").write_text(f"- optim.optimizer.lr={d.name}\n")
    write_status(done, "completed")
    (done / "summary.json").write_text(json.dumps({"best_val_acc": 0.5, "epochs_completed": 2,
                                                   "metrics": {"val/f1_macro": 0.4}}))
    write_status(running, "running")  # this very process: alive
    write_status(dead, "running", pid=2**22 + 12345)  # no such process on this host: it died
    summary = collect(sweep)
    assert [r["status"] for r in summary["jobs"]] == ["completed", "running", "died", "unknown"]
    assert summary["best_job"] == "0"
    assert cli([str(sweep), "--write"]) == 0
    assert (sweep / "sweep_summary.json").is_file()
    assert "running" in capsys.readouterr().out


def test_optuna_study_of_three_trials_is_kept_in_sqlite(tmp_path):
    optuna = pytest.importorskip("optuna")
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    db = tmp_path / "logs" / "optuna" / "fer.db"  # the default location under paths.log_dir (FER_ROOT/logs)
    result = subprocess.run(
        fer_train_cmd("hparams_search=optuna", "hydra.sweeper.n_trials=3", f"hydra.sweep.dir={tmp_path / 'opt'}",
                      "trainer.max_epochs=1", "trainer.limit_train_batches=2", "seed=0",
                      drop=("data.batch_size",)),  # fixed on the command line, Optuna would not search it
        capture_output=True, text=True, cwd=REPO, env=cli_env(tmp_path), timeout=500,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert db.is_file()
    study = optuna.load_study(study_name="fer_train", storage=f"sqlite:///{db}")
    assert len(study.trials) == 3
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials)
    assert {"optim.optimizer.lr", "optim.optimizer.weight_decay", "optim.label_smoothing", "data.batch_size",
            "model.backbone.drop_rate"} <= set(study.trials[0].params)
    assert 0.0 <= study.best_value <= 1.0
    assert (tmp_path / "opt" / "sweep_summary.json").is_file()


def _compose_with_hydra(overrides: list[str]):
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose(config_name="train", overrides=overrides, return_hydra_config=True)


def test_slurm_launcher_config(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    cfg = _compose_with_hydra(["launcher=slurm", "hydra.launcher.gpus_per_node=4", "hydra.launcher.nodes=2",
                               "hydra.launcher.partition=gpu"])
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher")
    assert launcher.tasks_per_node == 4 and launcher.nodes == 2 and launcher.partition == "gpu"
    assert launcher.timeout_min > 0 and launcher.cpus_per_task and launcher.mem_gb
    assert cfg.resume == "auto"  # a requeued job continues from its own checkpoint


def test_optuna_config_and_run_dir_defaults(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    cfg = _compose_with_hydra(["hparams_search=optuna"])
    assert cfg.hydra.sweeper._target_.endswith("OptunaSweeper")
    assert cfg.hydra.sweeper.direction == "maximize" and cfg.optimized_metric == "val/acc_best"
    assert str(cfg.hydra.sweeper.storage).startswith("sqlite:///")
    assert cfg.hydra.callbacks.sweep_summary._target_ == "fer.sweep.SweepSummary"
