"""Two-process DDP on the CPU (gloo, ddp_spawn): metrics synced across ranks, files written once."""

from __future__ import annotations

import json
import subprocess

import pytest
import torch

from conftest import REPO, TINY_CLI, cli_env, compose_train, fer_train_cmd

pytestmark = pytest.mark.timeout(600)


def test_two_process_val_accuracy_equals_a_single_process_validation(tmp_path):
    import lightning as L
    from hydra.utils import instantiate

    run = tmp_path / "run"
    result = subprocess.run(
        # Self-distillation on too: its memory of training predictions must gather every rank's faces.
        fer_train_cmd("trainer=ddp_cpu", "trainer.max_epochs=1", "trainer.limit_train_batches=2", "seed=0",
                      "optim.self_distill=0.5", f"hydra.run.dir={run}"),
        capture_output=True, text=True, cwd=REPO, env=cli_env(tmp_path), timeout=500,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["epochs_completed"] == 1 and summary["global_step"] == 2
    assert summary["last_model_path"].endswith("last.ckpt")
    assert json.loads((run / "status.json").read_text())["status"] == "completed"
    ddp_acc = summary["metrics"]["val/acc"]
    saved = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    remembered = saved["prediction_memory"]["probs"].sum(dim=1)
    # 2 processes x 2 batches x 32 distinct faces (DistributedSampler splits the 280 without overlap); rank 0,
    # which saved it, trained on only half of them
    assert int((remembered > 0).sum()) == 2 * 2 * 32
    assert torch.allclose(remembered[remembered > 0], torch.ones(128))

    # the same weights and the same 128 validation faces in one process
    overrides = [o for o in TINY_CLI if not o.startswith(("callbacks.", "trainer."))]
    cfg = compose_train(tmp_path / "single", overrides)
    datamodule = instantiate(cfg.data, _convert_="all")
    model = instantiate(cfg.model, _convert_="all")
    model.load_state_dict(saved["state_dict"])
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    single = trainer.validate(model, datamodule=datamodule, verbose=False)[0]
    assert len(datamodule.val_set) == 128
    assert single["val/acc"] == pytest.approx(ddp_acc, abs=1e-6)
    assert single["val/f1_macro"] == pytest.approx(summary["metrics"]["val/f1_macro"], abs=1e-6)
