"""Finding, safely loading and annotating fer checkpoints.

A checkpoint is opened with `torch.load(weights_only=True)`: a file from someone else can hold tensors
and plain containers only, never code. The model is rebuilt from its `hyper_parameters` with
`weights="none"` (the trained weights come from the file, nothing is downloaded) and loaded strictly.
"""

from __future__ import annotations

import json
import os
import pickle
import uuid
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from fer.errors import CheckpointError, FERError
from fer.labels import CLASSES
from fer.utils import one_line

CALIBRATION_KEY = "fer_calibration"  # written into the checkpoint by `fer-eval calibrate=true`
DATAMODULE_KEY = "FERDataModule"  # Lightning saves FERDataModule.state_dict() under its class name


@dataclass(frozen=True)
class LoadedCheckpoint:
    """A rebuilt model and what the checkpoint (or its run directory) says about how to feed it."""

    model: Any  # fer.models.classifier.FERClassifier, in eval mode
    path: Path
    image_size: int | None  # None when neither the checkpoint nor its run config records it
    channels: int
    temperature: float  # 1.0 unless calibrated
    calibration: dict[str, Any] | None
    run_dir: Path | None
    run_config: DictConfig | None

    @property
    def class_names(self) -> list[str]:
        return list(self.model.class_names)


def run_dir_of(path: Path) -> Path | None:
    """The training run directory a checkpoint belongs to (`<run>/checkpoints/x.ckpt`), or the run itself."""
    for candidate in (path, path.parent, path.parent.parent):
        if (candidate / ".hydra" / "config.yaml").is_file():
            return candidate
    return None


def best_checkpoint(run_dir: Path) -> Path:
    """The best checkpoint of a run directory: summary.json's, else the newest non-last, else last.ckpt."""
    folder = run_dir / "checkpoints"
    summary = run_dir / "summary.json"
    if summary.is_file():
        try:
            best = json.loads(summary.read_text()).get("best_model_path")
        except (OSError, ValueError):
            best = None
        if best:
            # By name inside this run's own folder: summary.json holds an absolute path, which in a moved or
            # copied run points elsewhere (for a copy, at the original's file).
            candidate = folder / Path(best).name
            if candidate.is_file():
                return candidate
    ckpts = sorted(folder.glob("*.ckpt"), key=lambda p: p.stat().st_mtime) if folder.is_dir() else []
    others = [p for p in ckpts if p.name != "last.ckpt"]
    if others or ckpts:
        return (others or ckpts)[-1]
    raise CheckpointError(f"{run_dir}: a run directory without checkpoints (expected {folder}/*.ckpt)")


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """A checkpoint file, or the best checkpoint of a run directory."""
    path = Path(path).expanduser()
    if path.is_dir():
        if (path / "checkpoints").is_dir() or run_dir_of(path) == path:
            return best_checkpoint(path)
        raise CheckpointError(f"{path}: a directory, but not a fer run directory (no checkpoints/ inside)")
    if not path.exists():
        raise CheckpointError(f"{path}: no such checkpoint file or run directory")
    return path


def plain_network_keys(state: dict[str, Any]) -> dict[str, Any]:
    """The state dict with `net._orig_mod.*` keys renamed `net.*`.

    Runs compiled before fer compiled networks in place (fer.models.compiling) wrapped them in torch.compile's
    OptimizedModule, which saved the weights under `net._orig_mod.*`; checkpoints written since keep `net.*`.
    """
    return {k.replace("net._orig_mod.", "net."): v for k, v in state.items()}


def read_checkpoint(path: Path, map_location: Any = "cpu") -> dict[str, Any]:
    """The checkpoint dict, loaded without executing anything from the file; CheckpointError naming it otherwise."""
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        text = str(exc)
        if "Weights only load failed" in text or "weights_only" in text:
            raise CheckpointError(
                f"{path}: holds Python objects that a safe (weights_only) load refuses; not a fer checkpoint"
            ) from exc
        raise CheckpointError(f"{path}: not a PyTorch checkpoint ({one_line(exc, limit=200)})") from exc
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile) as exc:
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint, or truncated ({one_line(exc, limit=200)})") from exc
    except Exception as exc:  # noqa: BLE001 - torch raises many types for foreign files
        raise CheckpointError(f"{path}: cannot be read as a checkpoint ({one_line(exc, limit=200)})") from exc
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: not a fer checkpoint (holds a {type(obj).__name__}, not a dict)")
    return obj


def _hparams(ckpt: dict[str, Any], path: Path) -> dict[str, Any]:
    hp = ckpt.get("hyper_parameters")
    if not isinstance(hp, dict) or not isinstance(hp.get("backbone"), dict) or "name" not in hp["backbone"]:
        what = "a plain state dict" if ckpt and all(isinstance(v, torch.Tensor) for v in ckpt.values()) else "a checkpoint"
        raise CheckpointError(
            f"{path}: not a fer checkpoint ({what} without hyper_parameters.backbone); "
            f"expected a file written by fer-train (<run>/checkpoints/*.ckpt)"
        )
    if not isinstance(ckpt.get("state_dict"), dict):
        raise CheckpointError(f"{path}: not a fer checkpoint (no state_dict)")
    return hp


def _image_size(ckpt: dict[str, Any], run_config: DictConfig | None) -> int | None:
    saved = ckpt.get(DATAMODULE_KEY)
    if isinstance(saved, dict) and saved.get("image_size"):
        return int(saved["image_size"])
    if run_config is not None:
        size = OmegaConf.select(run_config, "data.image_size", default=None)
        if size:
            return int(size)
    return None


def load_run_config(run_dir: Path | None) -> DictConfig | None:
    if run_dir is None:
        return None
    try:
        return OmegaConf.load(run_dir / ".hydra" / "config.yaml")
    except Exception:  # noqa: BLE001 - a damaged run config only loses defaults, the weights still load
        return None


def load_checkpoint(path: str | os.PathLike, map_location: Any = "cpu") -> LoadedCheckpoint:
    """Safely rebuild the FERClassifier of a checkpoint file or run directory, with its input size and calibration."""
    from fer.models.classifier import FERClassifier  # heavy import (timm), only when a model is built

    path = resolve_checkpoint(path)
    ckpt = read_checkpoint(path, map_location)
    hp = _hparams(ckpt, path)
    class_names = list(hp.get("class_names") or CLASSES)
    if len(class_names) != len(CLASSES) or {str(c) for c in class_names} != set(CLASSES):
        raise CheckpointError(
            f"{path}: a checkpoint for {len(class_names)} classes ({', '.join(map(str, class_names))}); "
            f"fer uses the {len(CLASSES)} classes {', '.join(CLASSES)}"
        )
    backbone = {**hp["backbone"], "weights": "none"}  # the weights come from the file: never download
    try:
        model = FERClassifier(
            backbone=backbone,
            channels_last=bool(hp.get("channels_last", True)),
            class_names=tuple(class_names),
        )
    except FERError as exc:
        raise CheckpointError(f"{path}: cannot rebuild its model ({exc})") from exc
    state = plain_network_keys(ckpt["state_dict"])
    head = state.get("net.classifier.weight")
    if head is not None and head.shape[0] != len(CLASSES):
        raise CheckpointError(f"{path}: its classifier has {head.shape[0]} outputs; fer uses {len(CLASSES)} classes")
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"{path}: weights do not fit {backbone['name']} ({one_line(exc, limit=200)})") from exc
    # weights="none" picks timm's normalisation; the model was trained with the one its hparams record.
    if hp.get("mean") and hp.get("std"):
        model.mean.copy_(torch.tensor(hp["mean"], dtype=torch.float32).view(1, -1, 1, 1))
        model.std.copy_(torch.tensor(hp["std"], dtype=torch.float32).view(1, -1, 1, 1))
        model.hparams["mean"], model.hparams["std"] = list(hp["mean"]), list(hp["std"])
    model.hparams["backbone"] = dict(hp["backbone"])  # keep the record of the original weights
    model.eval()
    model.to(map_location if isinstance(map_location, (str, torch.device)) else "cpu")
    if model.channels_last:  # the layout it trained in: eager inference 1.2-1.5x faster on CPU
        model.net.to(memory_format=torch.channels_last)

    run_dir = run_dir_of(path)
    run_config = load_run_config(run_dir)
    calibration = ckpt.get(CALIBRATION_KEY) if isinstance(ckpt.get(CALIBRATION_KEY), dict) else None
    temperature = float(calibration["temperature"]) if calibration and calibration.get("temperature") else 1.0
    return LoadedCheckpoint(
        model=model,
        path=path,
        image_size=_image_size(ckpt, run_config),
        channels=int(backbone.get("in_chans", 1)),
        temperature=temperature,
        calibration=calibration,
        run_dir=run_dir,
        run_config=run_config,
    )


def load_classifier(path: str | os.PathLike, map_location: Any = "cpu"):
    """The FERClassifier of a checkpoint (or a run directory's best), loaded safely and strictly, in eval mode."""
    return load_checkpoint(path, map_location).model


def write_calibration(path: str | os.PathLike, calibration: dict[str, Any]) -> None:
    """Store `calibration` (temperature and how it was fitted) inside the checkpoint, atomically.

    Stored in the file itself rather than a sidecar so that it travels with every copy of the checkpoint.
    Written to a temporary file in the same folder and renamed over the original: a crash never leaves a
    half-written checkpoint, and Lightning ignores the extra key when resuming.
    """
    path = Path(path)
    ckpt = read_checkpoint(path)
    ckpt[CALIBRATION_KEY] = {k: (float(v) if isinstance(v, float) else v) for k, v in calibration.items()}
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        torch.save(ckpt, tmp)
        os.replace(tmp, path)
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot store the calibration in it ({one_line(exc, limit=200)})") from exc
    finally:
        tmp.unlink(missing_ok=True)
