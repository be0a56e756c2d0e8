"""Train: compose the config, build data, model and trainer, fit, and leave a summary.

    python -m fer.train                                  # synthetic faces, the built-in default
    python -m fer.train experiment=fer2013 data.root=../shared/data/fer2013
    python -m fer.train -m optim.optimizer.lr=1e-3,3e-4  # a sweep (a failing job is recorded, not fatal)
    python -m fer.train hparams_search=optuna            # an Optuna study kept in logs/optuna/fer.db
    python -m fer.train run_name=lite0-a resume=auto     # run again after a kill: continues where it was
    python -m fer.train init_from=logs/train/runs/X data=folder data.root=...   # weights only: fine-tune

A run directory holds: .hydra/ (or config.yaml outside Hydra), provenance.json, status.json, checkpoints/
(last.ckpt, last.ckpt.prev, the best), tensorboard/, summary.json.
"""

from __future__ import annotations

import logging
import math
import os
import time
import traceback
import warnings
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.utils import instantiate
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.strategies.launchers.multiprocessing import _MultiProcessingLauncher
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig, OmegaConf, open_dict

from fer.checkpointing import AtomicCheckpointIO, Preemption, load_initial_weights
from fer.provenance import write_provenance
from fer.resume import checkpoint_to_resume
from fer.summary import STATUS_FILE, flatten, print_summary, read_json, scalar, write_status, write_summary
from fer.utils import CONFIG_DIR, one_line, one_line_errors, resolve_seed

log = logging.getLogger("fer.train")
# Metrics are logged per epoch, so Lightning's hint about the step-logging interval does not apply.
warnings.filterwarnings("ignore", message=r"The number of training batches .* logging interval")
# Validation metrics are torchmetrics objects whose compute() already syncs across ranks (DDP): every rank logs
# the same value, so Lightning's advice to add sync_dist=True (another all-reduce, of identical numbers) is noise.
warnings.filterwarnings("ignore", message=r"It is recommended to use `self.log\(.*sync_dist=True")


class Preempted(SystemExit):
    """Training stopped on SIGTERM/SIGUSR1/SIGUSR2 after saving last.ckpt; exit code 143 (128 + SIGTERM)."""

    def __init__(self, callback: Preemption | None) -> None:
        super().__init__(143)
        self.callback = callback


def run_dir_of(cfg: DictConfig) -> Path:
    return Path(cfg.paths.output_dir)


def is_rank_zero() -> bool:
    """Rank 0 before the Trainer exists (srun/submitit, torchrun and Lightning's launcher set these)."""
    return all(int(os.environ.get(key) or 0) == 0 for key in ("RANK", "SLURM_PROCID", "LOCAL_RANK", "NODE_RANK"))


def is_multirun() -> bool:
    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def build_callbacks(cfg: DictConfig, logger: Any = None) -> list[L.Callback]:
    """The configured callbacks; without a logger, LearningRateMonitor (which refuses to run then) is left out."""
    callbacks = [instantiate(c) for c in (cfg.get("callbacks") or {}).values() if c is not None]
    if not logger and any(isinstance(c, LearningRateMonitor) for c in callbacks):
        log.info("no logger: no learning-rate curves (LearningRateMonitor needs a logger)")
        callbacks = [c for c in callbacks if not isinstance(c, LearningRateMonitor)]
    return callbacks


def build_trainer(cfg: DictConfig, callbacks: list[L.Callback], logger: Any) -> L.Trainer:
    """The configured Trainer, with atomic checkpoint writes and (under SLURM) Lightning's auto-requeue off:
    submitit requeues (conf/launcher/slurm.yaml), and two requeue mechanisms would fight."""
    trainer_cfg = OmegaConf.to_container(cfg.trainer, resolve=True)
    configured = trainer_cfg.pop("plugins", None) or []
    plugins = [instantiate(p) for p in configured] + [AtomicCheckpointIO()]
    if SLURMEnvironment.detect():
        plugins.append(SLURMEnvironment(auto_requeue=False))
    if not any(isinstance(c, ModelCheckpoint) for c in callbacks):
        # `callbacks=none` means no checkpoints: not Lightning's default ModelCheckpoint under tensorboard/.
        trainer_cfg.setdefault("enable_checkpointing", False)
    return instantiate(trainer_cfg, callbacks=callbacks, logger=logger, plugins=plugins)


def write_config(run_dir: Path, cfg: DictConfig) -> None:
    """config.yaml for train() called outside Hydra (Hydra runs have .hydra/config.yaml)."""
    if (run_dir / ".hydra" / "config.yaml").is_file() or HydraConfig.initialized():
        return
    try:
        text = OmegaConf.to_yaml(cfg, resolve=True)
    except Exception:  # noqa: BLE001 - ${hydra:...} interpolations outside Hydra
        text = OmegaConf.to_yaml(cfg, resolve=False)
    (run_dir / "config.yaml").write_text(text)


def finished_summary(cfg: DictConfig, run_dir: Path) -> dict[str, Any] | None:
    """The saved summary when `resume` finds the run already done (a requeue after the end, a re-run sweep).

    Done: it completed the epochs it planned (a time budget plans fewer than trainer.max_epochs), and this
    run asks for no more epochs than it was configured with (`trainer.max_epochs=30` trains a finished run on).
    """
    status = read_json(run_dir / STATUS_FILE) or {}
    summary = read_json(run_dir / "summary.json")
    if status.get("status") != "completed" or not summary:
        return None
    asked = cfg.trainer.max_epochs
    planned = summary.get("planned_epochs", asked)  # summaries before planned_epochs: the configured epochs
    if (summary.get("epochs_completed") or 0) >= planned and asked <= summary.get("max_epochs", asked):
        return summary
    return None


def kept_metrics(run_dir: Path, metrics: dict[str, Any]) -> dict[str, Any]:
    """A resumed fit that validated nothing (already at its end) keeps the metrics its summary.json holds."""
    if "val/acc" in metrics:
        return metrics
    previous = read_json(run_dir / "summary.json") or {}
    return {**(previous.get("metrics") or {}), **metrics}


def train(cfg: DictConfig) -> dict[str, Any]:
    """Fit one model as `cfg` says; returns the final metrics and where the checkpoints are."""
    started = time.perf_counter()
    seed = resolve_seed(cfg.get("seed"))
    with open_dict(cfg):
        cfg.seed = seed
    L.seed_everything(seed, workers=True, verbose=False)
    run_dir = run_dir_of(cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    rank_zero = is_rank_zero()

    resume_from = checkpoint_to_resume(cfg, run_dir)
    if resume_from is not None and cfg.get("resume") and not cfg.get("ckpt_path"):
        done = finished_summary(cfg, run_dir)
        if done is not None:
            log.info("%s already finished %s epochs: nothing to resume", run_dir, done.get("epochs_completed"))
            return done
    if rank_zero:
        write_status(run_dir, "running", resumed_from=str(resume_from) if resume_from else None)
        write_provenance(run_dir, {"seed": seed, "resumed_from": str(resume_from) if resume_from else None})
        write_config(run_dir, cfg)

    trainer: L.Trainer | None = None
    try:
        datamodule: L.LightningDataModule = instantiate(cfg.data, _convert_="all")
        # Decode and validate every image now, so bad data stops the run before training starts.
        datamodule.prepare_data()
        datamodule.setup("fit")

        model: L.LightningModule = instantiate(
            cfg.model,
            optimizer=instantiate(cfg.optim.optimizer),
            scheduler=OmegaConf.to_container(cfg.optim.scheduler, resolve=True),
            label_smoothing=cfg.optim.label_smoothing,
            loss=cfg.optim.get("loss", "ce"),
            gce_q=cfg.optim.get("gce_q", 0.5),
            class_weights=cfg.optim.class_weights,
            mixup_alpha=cfg.optim.get("mixup_alpha", 0.0),
            cutmix_alpha=cfg.optim.get("cutmix_alpha", 0.0),
            layer_decay=cfg.optim.get("layer_decay", 1.0),
            sam_rho=cfg.optim.get("sam_rho", 0.0),
            self_distill=cfg.optim.get("self_distill", 0.0),
            _convert_="all",
        )
        if cfg.get("init_from"):
            if resume_from is not None:
                log.info("init_from ignored: resuming from %s, which holds newer weights", resume_from)
            else:
                load_initial_weights(model, cfg.init_from)
        logger = instantiate(cfg.logger) if cfg.get("logger") else False
        callbacks = build_callbacks(cfg, logger)
        trainer = build_trainer(cfg, callbacks, logger)
        log.info("training starts (%s)", f"resuming from {resume_from}" if resume_from else "fresh")
        trainer.fit(model, datamodule=datamodule, ckpt_path=str(resume_from) if resume_from else None)
    except SIGTERMException as stop:
        preemption = next((c for c in (trainer.callbacks if trainer else []) if isinstance(c, Preemption)), None)
        if rank_zero:
            write_status(run_dir, "preempted", error=None, epoch=trainer.current_epoch if trainer else None,
                         global_step=trainer.global_step if trainer else None,
                         checkpoint=preemption.saved_path if preemption else None)
        raise Preempted(preemption) from stop
    except BaseException as error:
        if rank_zero:
            write_status(run_dir, "failed", error=one_line(error))
        raise

    metrics = {k: scalar(v) for k, v in trainer.callback_metrics.items()}
    if resume_from is not None:
        metrics = kept_metrics(run_dir, metrics)
    checkpoint = next((c for c in trainer.checkpoint_callbacks if isinstance(c, ModelCheckpoint)), None)
    epochs, global_step = spawned_progress(trainer, checkpoint) or (trainer.current_epoch, trainer.global_step)
    best_score = scalar(checkpoint.best_model_score) if checkpoint and checkpoint.best_model_score is not None else None
    summary = {
        "run_dir": str(run_dir),
        "log_dir": str(logger.log_dir) if logger else None,
        "best_model_path": checkpoint.best_model_path if checkpoint else None,
        "last_model_path": (checkpoint.last_model_path or None) if checkpoint else None,
        "best_val_acc": best_score if best_score is not None else metrics.get("val/acc_best"),
        "epochs_completed": epochs,
        "max_epochs": cfg.trainer.max_epochs,  # configured; planned: where the run settled (a time budget's fit)
        "planned_epochs": trainer.fit_loop.max_epochs,
        "global_step": global_step,
        "seed": seed,
        "resumed_from": str(resume_from) if resume_from else None,
        "wall_time_s": round(time.perf_counter() - started, 2),
        "metrics": metrics,
    }
    if trainer.is_global_zero and rank_zero:
        if logger:
            hparams = flatten(OmegaConf.to_container(cfg, resolve=True))
            final = {f"hparams/{k}": v for k, v in metrics.items() if v is not None and "/recall/" not in k}
            final["hparams/best_val_acc"] = summary["best_val_acc"] or 0.0
            logger.log_hyperparams(hparams, metrics=final)
            logger.save()
        write_summary(run_dir, summary)
        write_status(run_dir, "completed", error=None, epochs=summary["epochs_completed"],
                     global_step=summary["global_step"])
        print_summary(summary, model.class_names)
    return summary


def spawned_progress(trainer: L.Trainer, checkpoint: ModelCheckpoint | None) -> tuple[int, int] | None:
    """(epochs, global step) after ddp_spawn, whose workers hand back metrics and the best path but not the loops."""
    if not isinstance(trainer.strategy.launcher, _MultiProcessingLauncher) or checkpoint is None:
        return None
    last = Path(checkpoint.dirpath or "") / "last.ckpt"
    if not last.is_file():
        return None
    checkpoint.last_model_path = str(last)
    saved = torch.load(last, map_location="cpu", weights_only=True, mmap=True)
    # saved in on_train_epoch_end: the epoch is "processed" there, "completed" only right after
    return int(saved["loops"]["fit_loop"]["epoch_progress"]["current"]["processed"]), int(saved["global_step"])


def objective(summary: dict[str, Any], metric: str | None) -> float | None:
    if not metric:
        return None
    value = summary.get("metrics", {}).get(metric)
    if value is None and metric == "val/acc_best":
        value = summary.get("best_val_acc")
    return None if value is None else float(value)


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="train")
@one_line_errors
def main(cfg: DictConfig) -> float | None:
    torch.set_float32_matmul_precision("high")
    try:
        if not is_multirun():
            return objective(train(cfg), cfg.get("optimized_metric"))
        try:
            return objective(train(cfg), cfg.get("optimized_metric"))
        except Exception as error:  # noqa: BLE001 - one job's failure must not end the sweep
            # Hydra's basic launcher stops at the first exception: record it instead (status.json holds the
            # one-line error, traceback.txt the whole story) and let the sweep go on.
            log.error("job failed: %s", one_line(error))
            if is_rank_zero():
                (run_dir_of(cfg) / "traceback.txt").write_text("".join(traceback.format_exception(error)))
            return math.nan
    except Preempted as stop:
        if stop.callback is not None and stop.callback.hand_on():  # submitit's handler requeues, then exits
            return None
        raise


if __name__ == "__main__":
    main()
