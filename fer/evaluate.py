"""Evaluate a checkpoint on a held-out split: accuracy, macro-F1, per-class metrics, confusion matrix,
calibration (ECE, optional temperature scaling), with optional test-time augmentation.

    python -m fer.evaluate ckpt_path=logs/train/runs/<run> tta=flip calibrate=true
    python -m fer.evaluate ckpt_path=best.ckpt data_dir=~/faces
    python -m fer.evaluate 'ckpt_path=[runs/a,runs/b]' tta=shift_rotate   # an ensemble: probabilities averaged
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import hydra
import matplotlib.pyplot as plt
import numpy as np
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from rich.console import Console
from rich.table import Table
from torchmetrics.classification import (
    MulticlassAccuracy,
    MulticlassConfusionMatrix,
    MulticlassF1Score,
    MulticlassPrecision,
    MulticlassRecall,
)

from fer.calibration import (
    ECE_BINS,
    TEMPERATURE_RANGE,
    at_range_bound,
    expected_calibration_error,
    fit_temperature,
    nll,
)
from fer.checkpoint import LoadedCheckpoint, load_checkpoint, write_calibration
from fer.data.datamodule import rows_of
from fer.data.sources import FolderSource, _subdirs
from fer.errors import CheckpointError, ConfigError, DataError
from fer.inference import resolve_device
from fer.labels import canonical
from fer.plots import confusion_matrix_figure
from fer.summary import scalar
from fer.tta import average_probabilities, check_mode, images_per_pass, tta_logits
from fer.utils import CONFIG_DIR, one_line_errors

log = logging.getLogger("fer.evaluate")

FOLDER_TARGETS = ("fer.data.sources.folder_source", "fer.data.sources.FolderSource")
DATAMODULE = "fer.data.datamodule.FERDataModule"
RUN_SPLIT_KEYS = ("val_fraction", "split_seed")  # which images a source without a val split holds out


# -- which data -------------------------------------------------------------------------------------
def data_config(cfg: DictConfig, loaded: LoadedCheckpoint, image_size: int) -> tuple[dict[str, Any], str]:
    """The FERDataModule config to evaluate on, resolved, and where it came from.

    Priority: a whole `data=` config on the command line (with the run's held-out split settings, unless
    given too), else the checkpoint run's own data config, with any single `data.*` keys given over it;
    `data_dir` swaps in a folder tree. Size and channels always follow the checkpoint, the cache
    directory this machine.
    """
    given = _container(cfg.get("data"))
    run_data = _container(loaded.run_config.get("data")) if loaded.run_config is not None else None
    if given is not None and "_target_" in given:  # data=fer2013 ...: a data config of its own
        data, origin = _with_run_split(given, run_data, cfg), "data (command line)"
    else:  # keys only (+data.on_bad=skip): over the run's data config, or over the bare data module
        data, origin = run_data, f"{loaded.run_dir}/.hydra/config.yaml"
        if data is None and (given or cfg.get("data_dir")):
            data, origin = {"_target_": DATAMODULE}, "data (command line)"
        if given and data is not None:
            data = _container(OmegaConf.merge(data, given))
    if cfg.get("data_dir"):
        root = str(Path(str(cfg.data_dir)).expanduser())
        data["source"] = {"_target_": "fer.data.sources.any_folder_source", "root": root, "ignore_classes": []}
        data["root"] = root
        origin = f"data_dir={root}"
    if data is None or not data.get("source"):
        raise DataError(
            f"{loaded.path}: no data to evaluate on: it is not inside its run directory, so give "
            f"data=synthetic|fer2013|folder (data.root=...) or data_dir=PATH"
        )
    source = data["source"]
    if source.get("_target_") in FOLDER_TARGETS:
        # Evaluation also takes trees without a train/ folder (<root>/<class>/, <root>/test/<class>/).
        source["_target_"] = "fer.data.sources.any_folder_source"
    data.update(image_size=image_size, channels=loaded.channels, cache_dir="${paths.cache_dir}")
    # Resolve against this machine's paths (the run's config may name ${paths.data_dir}, ${paths.cache_dir}).
    root_cfg = OmegaConf.create({"data": data, "paths": OmegaConf.to_container(cfg.paths, resolve=False)})
    if loaded.run_config is not None and loaded.run_config.get("model") is not None:
        root_cfg.model = loaded.run_config.model
    return OmegaConf.to_container(root_cfg.data, resolve=True), origin


def _container(node: Any) -> dict[str, Any] | None:
    return OmegaConf.to_container(node, resolve=False) if node is not None else None


def _with_run_split(data: dict[str, Any], run_data: dict[str, Any] | None, cfg: DictConfig) -> dict[str, Any]:
    """`data` with the run's val_fraction and split_seed where the command line did not set them: the
    held-out "val" (calibrate=true, split=val) is then the slice the run held out, not its training images."""
    given = command_line_keys(cfg)
    for key in RUN_SPLIT_KEYS:
        if run_data is not None and key in run_data and f"data.{key}" not in given:
            data[key] = run_data[key]
    return data


def command_line_keys(cfg: DictConfig) -> set[str]:
    """The keys the command line set (`data.split_seed=1` -> "data.split_seed"), as Hydra recorded them."""
    from hydra.core.hydra_config import HydraConfig

    task = OmegaConf.select(cfg, "hydra.overrides.task", default=None)  # a config composed with Hydra's own
    if task is None and HydraConfig.initialized():
        task = HydraConfig.get().overrides.task
    return {override.split("=", 1)[0].lstrip("+~") for override in task or []}


def leave_out_unknown_classes(source: Any) -> list[str]:
    """Class folders fer has no class for (e.g. AffectNet's contempt) are ignored, not an error; their names."""
    if not isinstance(source, FolderSource):
        return []
    unknown = sorted({d.name for split in source.splits.values() for d in _subdirs(split) if canonical(d.name) is None})
    # The listing is lazy (nothing read yet), so widening the ignore set here takes effect for every split.
    source.ignore_classes = frozenset(source.ignore_classes | set(unknown))
    return unknown


def shares_images_with_val(dm: Any, which: str) -> bool:
    """Whether the `which` split and the val split (what calibrate=true fits on) hold any image in common:
    one folder for every role (<dir>/<class>/), or split=val."""
    plan = dm.plan(limits=False)
    (split, picks), (val_split, val_picks) = plan[which], plan["val"]
    if split != val_split:
        return False
    return picks is None or val_picks is None or bool(np.intersect1d(picks, val_picks).size)


def split_arrays(dm: Any, which: str) -> tuple[np.ndarray, np.ndarray, str]:
    """uint8 images and labels of the `which` ("test" or "val") split, decoded through the cache, and its name.

    Only the split needed is decoded. A source without a val split validates on the stratified slice of
    its train split that training held out (same val_fraction and split_seed).
    """
    split, picks = dm.plan(limits=False)[which]
    cached = dm.decode(split, None)  # whole, so fer-eval shares training's cache
    rows = rows_of(cached.kept, picks)
    name = split if picks is None else f"{split} (held-out val_fraction={dm.val_fraction})"
    return cached.images[rows], cached.labels[rows], name


# -- which checkpoints ------------------------------------------------------------------------------
def load_members(ckpt_path: Any) -> list[LoadedCheckpoint]:
    """The checkpoint, or the ensemble's checkpoints (`ckpt_path=[a,b,...]`), loaded and checked to agree.

    Members must share class names and input channels, since they are scored on one decoded copy of
    the data; they may differ in anything else (backbone, seed, recipe).
    """
    paths = [ckpt_path] if isinstance(ckpt_path, (str, os.PathLike)) else list(ckpt_path)
    if not paths:
        raise CheckpointError("ckpt_path=[]: give a checkpoint, a run directory, or a list of them")
    members = [load_checkpoint(path) for path in paths]
    first = members[0]
    for other in members[1:]:
        if other.class_names != first.class_names:
            raise CheckpointError(f"{other.path}: classes {other.class_names} differ from {first.path}'s "
                                  f"{first.class_names}: an ensemble averages one set of class probabilities")
        if other.channels != first.channels:
            raise CheckpointError(f"{other.path}: {other.channels}-channel input, {first.path} "
                                  f"{first.channels}-channel: an ensemble sees one copy of the images")
    return members


def ensemble_image_size(cfg: DictConfig, members: list[LoadedCheckpoint]) -> int:
    """`image_size` if given, else the members' common training size."""
    if cfg.get("image_size"):
        return int(cfg.image_size)
    sizes = {m.image_size for m in members}
    if None in sizes:
        path = next(m.path for m in members if m.image_size is None)
        raise CheckpointError(f"{path}: its training image size is not recorded; pass image_size=N")
    if len(sizes) > 1:
        raise CheckpointError("ckpt_path: the ensemble's members trained at "
                              + ", ".join(f"{m.image_size} px ({m.path})" for m in members)
                              + "; pass image_size=N to score them all at one size")
    return int(sizes.pop())


def one_or_all(values: list[Any]) -> Any:
    """A report field: the value for one checkpoint, as before ensembles; the list for an ensemble."""
    return values[0] if len(values) == 1 else values


# -- running the model -----------------------------------------------------------------------------
def all_logits(model: torch.nn.Module, images: np.ndarray, tta: str, batch_size: int, device: torch.device) -> torch.Tensor:
    """(N, views, classes) logits of uint8 (N, C, H, W) images; `batch_size` counts views, not images."""
    model = model.to(device).eval()
    step = images_per_pass(batch_size, tta)
    out = []
    for start in range(0, len(images), step):
        batch = torch.from_numpy(np.array(images[start:start + step])).to(device)  # a copy: the memmap is read-only
        out.append(tta_logits(model, batch.float().div_(255.0), tta).cpu())
    return torch.cat(out)


# -- metrics ---------------------------------------------------------------------------------------
def classification_metrics(probs: torch.Tensor, labels: torch.Tensor, class_names: list[str]) -> dict[str, Any]:
    """Accuracy, macro-F1, and per-class precision / recall / F1 / support, with torchmetrics.

    Macro-F1 averages over the classes present in the labels or the predictions (torchmetrics leaves out
    a class that is neither), so a test set without `disgust` is not penalised for it.
    """
    k = len(class_names)
    preds = probs.argmax(1)
    per_class = {
        "precision": MulticlassPrecision(k, average=None)(preds, labels),
        "recall": MulticlassRecall(k, average=None)(preds, labels),
        "f1": MulticlassF1Score(k, average=None)(preds, labels),
    }
    support = torch.bincount(labels, minlength=k)
    return {
        "accuracy": float(MulticlassAccuracy(k, average="micro")(preds, labels)),
        "f1_macro": float(MulticlassF1Score(k, average="macro")(preds, labels)),
        "per_class": {
            name: {**{m: float(v[i]) for m, v in per_class.items()}, "support": int(support[i])}
            for i, name in enumerate(class_names)
        },
        "confusion_matrix": MulticlassConfusionMatrix(k)(preds, labels).tolist(),
    }


def report_table(report: dict[str, Any]) -> Table:
    members = report["checkpoint"] if isinstance(report["checkpoint"], list) else [report["checkpoint"]]
    ensemble = f", ensemble of {len(members)}" if len(members) > 1 else ""
    table = Table(title=f"fer-eval: {report['split']} split, {report['num_samples']} images, tta={report['tta']}{ensemble}",
                  header_style="bold")
    for column in ("class", "precision", "recall", "F1", "support"):
        table.add_column(column, justify="left" if column == "class" else "right")
    for name, m in report["metrics"]["per_class"].items():
        table.add_row(name, f"{m['precision']:.3f}", f"{m['recall']:.3f}", f"{m['f1']:.3f}", str(m["support"]))
    metrics = report["metrics"]
    table.add_section()
    table.add_row("[bold]accuracy[/]", "", "", f"[bold]{100 * metrics['accuracy']:.2f}%[/]", str(report["num_samples"]))
    table.add_row("[bold]macro-F1[/]", "", "", f"[bold]{metrics['f1_macro']:.4f}[/]", "")
    cal = report["calibration"]
    table.add_row(f"ECE ({ECE_BINS} bins)", "", "", f"{cal['ece']:.4f}", "")
    if not isinstance(cal["temperature"], list) and cal["temperature"] != 1.0:
        in_sample = " [yellow](in-sample)[/]" if (cal["fitted"] or {}).get("same_images_as_evaluation") else ""
        table.add_row(f"ECE, T={cal['temperature']:.3f}{in_sample}", "", "", f"{cal['ece_calibrated']:.4f}", "")
    return table


# -- the evaluation ---------------------------------------------------------------------------------
def evaluate(cfg: DictConfig) -> dict[str, Any]:
    """Evaluate `cfg.ckpt_path` as `cfg` says; writes report.json and confusion_matrix.png, returns the report."""
    started = time.perf_counter()
    if OmegaConf.is_missing(cfg, "ckpt_path"):
        raise ConfigError("ckpt_path: give a .ckpt, a run directory or a list of them "
                          "(fer-eval ckpt_path=logs/train/runs/<run>)")
    check_mode(cfg.tta)
    if cfg.split not in ("test", "val"):
        raise ConfigError(f"split={cfg.split!r}: expected test or val")
    out_dir = Path(cfg.paths.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    device = torch.device(resolve_device(cfg.get("device", "auto")))

    members = load_members(cfg.ckpt_path)
    if cfg.get("calibrate") and len(members) > 1:
        raise CheckpointError("calibrate=true fits one checkpoint's temperature: calibrate the ensemble's "
                              "members one at a time, then evaluate them together")
    loaded = members[0]  # the ensemble's data (when not given) and class names come from its first member
    image_size = ensemble_image_size(cfg, members)
    data, origin = data_config(cfg, loaded, image_size)
    dm = instantiate(data, _convert_="all")
    left_out = leave_out_unknown_classes(dm.source)
    images, labels_np, split_name = split_arrays(dm, cfg.split)
    labels = torch.from_numpy(np.asarray(labels_np, dtype=np.int64))
    class_names = loaded.class_names
    batch_size = int(cfg.get("batch_size") or 128)

    logits = all_logits(loaded.model, images, cfg.tta, batch_size, device)
    temperatures = [m.temperature if cfg.get("use_calibration", True) else 1.0 for m in members]
    temperature = temperatures[0]
    fitted = None
    if cfg.get("calibrate"):
        val_images, val_labels_np, val_name = split_arrays(dm, "val")
        val_labels = torch.from_numpy(np.asarray(val_labels_np, dtype=np.int64))
        # T is fitted on plain logits (no TTA): one scalar for the network, applied per view afterwards.
        val_logits = all_logits(loaded.model, val_images, "none", batch_size, device)[:, 0]
        temperature = fit_temperature(val_logits, val_labels)
        val_raw = torch.softmax(val_logits, 1)
        val_cal = torch.softmax(val_logits / temperature, 1)
        in_sample = shares_images_with_val(dm, cfg.split)
        fitted = {
            "temperature": temperature,
            "fitted_on": f"{origin}: split {val_name}",
            "same_images_as_evaluation": in_sample,
            "at_range_bound": at_range_bound(temperature),
            "num_samples": int(len(val_labels)),
            "nll_before": nll(val_logits, val_labels),
            "nll_after": nll(val_logits, val_labels, temperature),
            "ece_before": expected_calibration_error(val_raw, val_labels),
            "ece_after": expected_calibration_error(val_cal, val_labels),
            "date": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }
        if not in_sample:  # a temperature fitted on the test images would flatter every later evaluation
            write_calibration(loaded.path, fitted)
        temperatures = [temperature]  # calibrate=true takes a single checkpoint

    # Each member's views averaged at its own temperature, then the members averaged (one member: itself).
    member_logits = [logits, *(all_logits(m.model, images, cfg.tta, batch_size, device) for m in members[1:])]
    probs_raw = torch.stack([average_probabilities(x, 1.0) for x in member_logits]).mean(0)
    probs = torch.stack([average_probabilities(x, t) for x, t in zip(member_logits, temperatures)]).mean(0)
    metrics = classification_metrics(probs, labels, class_names)
    left_out_counts = {}
    if left_out and isinstance(dm.source, FolderSource):
        folder = dm.source.splits.get(split_name)
        for name in left_out:
            d = folder / name if folder is not None else None
            left_out_counts[name] = sum(1 for p in d.iterdir() if p.is_file()) if d is not None and d.is_dir() else 0

    report = {
        "checkpoint": one_or_all([str(m.path) for m in members]),
        "data": origin,
        "source": getattr(dm.source, "name", type(dm.source).__name__),
        "split": split_name,
        "num_samples": int(len(labels)),
        "image_size": int(image_size),
        "channels": loaded.channels,
        "tta": cfg.tta,
        "class_names": class_names,
        "left_out_classes": left_out,
        "left_out_images": left_out_counts,
        "metrics": metrics,
        "calibration": {
            "ece_bins": ECE_BINS,
            "ece": expected_calibration_error(probs_raw, labels),  # before temperature scaling
            "temperature": one_or_all(temperatures),
            "ece_calibrated": expected_calibration_error(probs, labels),  # after (equal when T = 1)
            # at `temperature`, as the probabilities scored above (a single view of a single model only)
            "nll": nll(logits[:, 0], labels, temperature) if cfg.tta == "none" and len(members) == 1 else None,
            "fitted": fitted,
            "stored_in_checkpoint": one_or_all([m.calibration for m in members]),
        },
        "output_dir": str(out_dir),
        "wall_time_s": round(time.perf_counter() - started, 2),
    }

    fig = confusion_matrix_figure(np.array(metrics["confusion_matrix"]), class_names, show_counts=True,
                                  title=f"{report['source']} {split_name} (tta={cfg.tta}): "
                                        f"acc {100 * metrics['accuracy']:.1f}%")
    fig.savefig(out_dir / "confusion_matrix.png")
    plt.close(fig)
    tmp = out_dir / "report.json.tmp"
    tmp.write_text(json.dumps(report, indent=2, default=scalar) + "\n")
    os.replace(tmp, out_dir / "report.json")

    console = Console()
    console.print(report_table(report))
    if left_out:
        console.print(f"left out (no fer class): {', '.join(left_out)}")
    if fitted:
        print_calibration(console, fitted, loaded.path)
    console.print(f"report: {out_dir / 'report.json'}")
    return report


def print_calibration(console: Console, fitted: dict[str, Any], path: Path) -> None:
    """The fitted temperature, where it was stored, and what to distrust about it."""
    temperature = fitted["temperature"]
    stored = "not stored in the checkpoint" if fitted["same_images_as_evaluation"] else f"stored in {path}"
    console.print(f"calibration: T={temperature:.3f} fitted on {fitted['fitted_on']}; "
                  f"val ECE {fitted['ece_before']:.4f} -> {fitted['ece_after']:.4f}; {stored}")
    if fitted["same_images_as_evaluation"]:
        console.print("[yellow]warning: T was fitted on the evaluated images (a <dir>/<class>/ tree, or split=val): "
                      "the calibrated ECE is in-sample, and T is not stored in the checkpoint. Calibrate on "
                      "data with a val/ split or a train/ split to hold one out from[/yellow]")
    if fitted["at_range_bound"]:
        why = ("the model is barely better than chance there" if temperature == TEMPERATURE_RANGE[1]
               else "the model's logits are far too small there")
        console.print(f"[yellow]warning: T stopped at the bound of {TEMPERATURE_RANGE} on {fitted['fitted_on']}: "
                      f"{why}, so the fit is not trustworthy[/yellow]")


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="eval")
@one_line_errors
def main(cfg: DictConfig) -> float:
    return evaluate(cfg)["metrics"]["accuracy"]


if __name__ == "__main__":
    main()
