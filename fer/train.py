"""Train: compose the config, build data, model and trainer, fit, and leave a summary.

    python -m fer.train                                  # synthetic faces, the built-in default
    python -m fer.train experiment=fer2013 data.root=../shared/data/fer2013
    python -m fer.train -m optim.optimizer.lr=1e-3,3e-4  # a sweep
"""

from __future__ import annotations

import logging
import time
import warnings
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from lightning.pytorch.callbacks import ModelCheckpoint
from omegaconf import DictConfig, OmegaConf, open_dict

from fer.summary import flatten, print_summary, scalar, write_summary
from fer.utils import CONFIG_DIR, one_line_errors, resolve_seed

log = logging.getLogger("fer.train")
# Metrics are logged per epoch, so Lightning's hint about the step-logging interval does not apply.
warnings.filterwarnings("ignore", message=r"The number of training batches .* logging interval")


def run_dir_of(cfg: DictConfig) -> Path:
    return Path(cfg.paths.output_dir)


def build_callbacks(cfg: DictConfig) -> list[L.Callback]:
    return [instantiate(c) for c in (cfg.get("callbacks") or {}).values() if c is not None]


def train(cfg: DictConfig) -> dict[str, Any]:
    """Fit one model as `cfg` says; returns the final metrics and where the checkpoints are."""
    started = time.perf_counter()
    seed = resolve_seed(cfg.get("seed"))
    with open_dict(cfg):
        cfg.seed = seed
    L.seed_everything(seed, workers=True, verbose=False)
    run_dir = run_dir_of(cfg)
    run_dir.mkdir(parents=True, exist_ok=True)

    datamodule: L.LightningDataModule = instantiate(cfg.data, _convert_="all")
    # Decode and validate every image now, so bad data stops the run before training starts.
    datamodule.prepare_data()
    datamodule.setup("fit")

    model: L.LightningModule = instantiate(
        cfg.model,
        optimizer=instantiate(cfg.optim.optimizer),
        scheduler=OmegaConf.to_container(cfg.optim.scheduler, resolve=True),
        label_smoothing=cfg.optim.label_smoothing,
        class_weights=cfg.optim.class_weights,
        _convert_="all",
    )
    callbacks = build_callbacks(cfg)
    logger = instantiate(cfg.logger) if cfg.get("logger") else False
    trainer: L.Trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=logger)

    trainer.fit(model, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))

    metrics = {k: scalar(v) for k, v in trainer.callback_metrics.items()}
    checkpoint = next((c for c in trainer.checkpoint_callbacks if isinstance(c, ModelCheckpoint)), None)
    best_score = scalar(checkpoint.best_model_score) if checkpoint and checkpoint.best_model_score is not None else None
    summary = {
        "run_dir": str(run_dir),
        "log_dir": str(logger.log_dir) if logger else None,
        "best_model_path": checkpoint.best_model_path if checkpoint else None,
        "last_model_path": (checkpoint.last_model_path or None) if checkpoint else None,
        "best_val_acc": best_score if best_score is not None else metrics.get("val/acc_best"),
        "epochs_completed": trainer.current_epoch,
        "global_step": trainer.global_step,
        "seed": seed,
        "wall_time_s": round(time.perf_counter() - started, 2),
        "metrics": metrics,
    }
    if trainer.is_global_zero:
        if logger:
            hparams = flatten(OmegaConf.to_container(cfg, resolve=True))
            final = {f"hparams/{k}": v for k, v in metrics.items() if v is not None and "/recall/" not in k}
            final["hparams/best_val_acc"] = summary["best_val_acc"] or 0.0
            logger.log_hyperparams(hparams, metrics=final)
            logger.save()
        write_summary(run_dir, summary)
        print_summary(summary, model.class_names)
    return summary


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="train")
@one_line_errors
def main(cfg: DictConfig) -> float | None:
    torch.set_float32_matmul_precision("high")
    summary = train(cfg)
    metric = cfg.get("optimized_metric")
    if not metric:
        return None
    value = summary["metrics"].get(metric)
    return None if value is None else float(value)


if __name__ == "__main__":
    main()
