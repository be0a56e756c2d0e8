"""Reproducibility: deterministic runs repeat exactly; every run records its config, versions and git commit."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import compose_train
from fer import provenance
from fer.train import train

FAST = ["data.source.num_train=280", "data.source.num_val=64", "data.image_size=32", "data.source.image_size=32", "trainer.max_epochs=1",
        "trainer.limit_train_batches=3", "trainer.deterministic=true", "seed=0",
        "callbacks.sample_grid=null", "callbacks.confusion_matrix=null"]


def test_same_seed_and_deterministic_give_identical_metrics_and_weights(tmp_path):
    first = train(compose_train(tmp_path / "a", FAST))
    second = train(compose_train(tmp_path / "b", FAST))
    assert first["metrics"]["val/acc"] == second["metrics"]["val/acc"]
    assert first["metrics"]["train/loss"] == second["metrics"]["train/loss"]
    a = torch.load(first["last_model_path"], weights_only=True)["state_dict"]
    b = torch.load(second["last_model_path"], weights_only=True)["state_dict"]
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)

    run = Path(first["run_dir"])
    record = json.loads((run / "provenance.json").read_text())
    for package in ("torch", "lightning", "timm", "torchmetrics", "hydra-core", "numpy", "fer-lightning"):
        assert record["versions"][package], package
    assert "commit" in record["git"] and "dirty" in record["git"]
    assert record["seed"] == 0
    config = (run / "config.yaml").read_text()
    assert "deterministic: true" in config and "seed: 0" in config


def test_provenance_without_git(tmp_path, monkeypatch):
    monkeypatch.setattr(provenance, "CODE_DIR", tmp_path)  # not a repository
    assert provenance.git_state()["commit"] is None
    monkeypatch.setenv("PATH", str(tmp_path))  # no git binary at all
    state = provenance.git_state()
    assert state["commit"] is None and state["dirty"] is None
    path = provenance.write_provenance(tmp_path)
    assert json.loads(path.read_text())["git"]["commit"] is None
