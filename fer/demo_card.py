"""The demo's model card: which run a checkpoint came from, its config, validation metrics, confusion matrix.

Everything is read from what training left behind (`summary.json`, `.hydra/config.yaml`, TensorBoard
events, the checkpoint's own fields); the confusion matrix is recomputed on the run's validation split only
when neither a PNG nor a TensorBoard figure exists. Nothing here imports Gradio.
"""

from __future__ import annotations

import io
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
from PIL import Image

from fer.checkpoint import read_checkpoint
from fer.errors import DataError
from fer.summary import read_json

log = logging.getLogger("fer.demo")

# Recomputing the confusion matrix classifies at most this many validation images (a few seconds on a CPU).
RECOMPUTE_LIMIT = 1000


@dataclass
class ModelCard:
    overview: str  # Markdown
    metrics: list[list[str]]  # rows of [metric, value]
    metrics_note: str  # Markdown: which epoch the metrics are from
    config: str  # the run's config, YAML
    confusion: Image.Image | None
    confusion_note: str  # Markdown: where the matrix comes from, or why there is none
    facts: dict[str, Any] = field(default_factory=dict)  # what the overview shows, for the header and tests


def _percent(value: float) -> str:
    return f"{100 * value:.1f} %"


def _format_metric(name: str, value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, (int, float)) and ("acc" in name or "recall" in name):
        return _percent(float(value))
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


def _metric_order(name: str) -> tuple[int, str]:
    order = ["val/acc", "val/acc_best", "val/f1_macro", "val/loss"]
    if name in order:
        return (order.index(name), "")
    if name.startswith("val/recall/"):
        return (10, "")  # keeps the class order of the summary (the model's class order)
    if name.startswith("val/"):
        return (20, name)
    return (30, name)


def metric_rows(summary: dict[str, Any]) -> list[list[str]]:
    """summary.json's metrics as [name, formatted value] rows: validation first, learning rates left out."""
    metrics = {k: v for k, v in (summary.get("metrics") or {}).items() if not k.startswith("lr-")}
    names = sorted(metrics, key=_metric_order)
    return [[name, _format_metric(name, metrics[name])] for name in names]


def _checkpoint_facts(path: Path) -> dict[str, Any]:
    """Epoch, step, backbone and calibration from the checkpoint itself (loaded safely)."""
    try:
        ckpt = read_checkpoint(path)
    except Exception as exc:  # noqa: BLE001 - the Predictor already loaded it; the card only loses details
        log.warning("model card: %s", exc)
        return {}
    hp = ckpt.get("hyper_parameters") or {}
    backbone = hp.get("backbone") or {}
    best_score = None
    for state in (ckpt.get("callbacks") or {}).values():
        if isinstance(state, dict) and state.get("best_model_score") is not None:
            best_score = float(state["best_model_score"])
    calibration = ckpt.get("fer_calibration") if isinstance(ckpt.get("fer_calibration"), dict) else None
    return {
        "epoch": ckpt.get("epoch"),
        "global_step": ckpt.get("global_step"),
        "backbone": backbone.get("name"),
        "in_chans": backbone.get("in_chans"),
        "class_names": list(hp.get("class_names") or []),
        "checkpoint_best_score": best_score,
        "temperature": calibration.get("temperature") if calibration else None,
    }


# ------------------------------------------------------------------------------------ confusion matrix
def _png_in_run(run_dir: Path) -> Path | None:
    found = [p for pattern in ("*confusion*.png", "*/*confusion*.png") for p in run_dir.glob(pattern)]
    return max(found, key=lambda p: p.stat().st_mtime) if found else None


def _from_tensorboard(run_dir: Path, epoch: int | None) -> tuple[Image.Image, int] | None:
    """The `val/confusion_matrix` figure the training callback logged: the checkpoint's epoch, else the last."""
    event_dirs = sorted({p.parent for p in run_dir.rglob("events.out.tfevents.*")})
    if not event_dirs:
        return None
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = []
    for folder in event_dirs:
        acc = EventAccumulator(str(folder), size_guidance={"images": 0, "scalars": 1, "tensors": 1,
                                                            "histograms": 1, "compressedHistograms": 1})
        acc.Reload()
        if "val/confusion_matrix" in acc.Tags().get("images", []):
            events.extend(acc.Images("val/confusion_matrix"))
    if not events:
        return None
    matching = [e for e in events if epoch is not None and e.step == epoch]
    event = (matching or sorted(events, key=lambda e: (e.step, e.wall_time)))[-1]
    return Image.open(io.BytesIO(event.encoded_image_string)).convert("RGB"), event.step


def recompute_confusion(
    predict_crops: Callable[[list[np.ndarray]], list[str]],
    run_config: Any,
    class_names: list[str],
    limit: int = RECOMPUTE_LIMIT,
) -> tuple[np.ndarray, int]:
    """Confusion counts of the checkpoint on (at most `limit` images of) its run's validation split."""
    from hydra.utils import instantiate

    source = instantiate(run_config.data.source, _convert_="all")
    split = source.roles().val
    if split is None:
        raise DataError(f"data.source ({run_config.data.source.get('_target_', '?')}): "
                        "the run's data source has no validation split of its own")
    samples = source.samples(split)[:limit]
    index = {name: i for i, name in enumerate(class_names)}
    confusion = np.zeros((len(class_names), len(class_names)), dtype=np.int64)
    for start in range(0, len(samples), 64):
        chunk = samples[start:start + 64]
        predicted = predict_crops([np.asarray(source.load(s)) for s in chunk])
        for sample, label in zip(chunk, predicted):
            confusion[sample.label, index[label]] += 1
    return confusion, len(samples)


def _figure_image(confusion: np.ndarray, class_names: list[str], title: str) -> Image.Image:
    from fer.plots import confusion_matrix_figure

    figure = confusion_matrix_figure(confusion, class_names, title=title)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    import matplotlib.pyplot as plt

    plt.close(figure)
    return Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")


def confusion_image(
    run_dir: Path | None,
    epoch: int | None,
    class_names: list[str],
    run_config: Any = None,
    predict_crops: Callable[[list[np.ndarray]], list[str]] | None = None,
) -> tuple[Image.Image | None, str]:
    """(image, note): a PNG of the run, else the TensorBoard figure, else recomputed on the validation split."""
    if run_dir is not None:
        png = _png_in_run(run_dir)
        if png is not None:
            try:
                return Image.open(png).convert("RGB"), f"From `{png}`."
            except OSError as exc:
                log.warning("model card: cannot read %s (%s)", png, exc)
        try:
            found = _from_tensorboard(run_dir, epoch)
        except Exception as exc:  # noqa: BLE001 - damaged event files only cost the figure
            log.warning("model card: cannot read the TensorBoard events of %s (%s)", run_dir, exc)
            found = None
        if found is not None:
            image, step = found
            which = "the checkpoint's epoch" if step == epoch else "the last logged epoch"
            return image, f"Validation split, epoch {step} ({which}), as logged to TensorBoard during training."
    if predict_crops is None or run_config is None:
        return None, "No confusion matrix: the checkpoint has no run directory with TensorBoard events or a PNG."
    started = time.perf_counter()
    try:
        confusion, n = recompute_confusion(predict_crops, run_config, class_names)
    except Exception as exc:  # noqa: BLE001 - e.g. the dataset is not on this machine
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        return None, f"No confusion matrix: the run logged none, and recomputing it failed ({first})."
    if n == 0:
        return None, "No confusion matrix: the run's validation split is empty."
    seconds = time.perf_counter() - started
    image = _figure_image(confusion, class_names, f"Validation confusion matrix ({n} images)")
    return image, f"Recomputed now on {n} validation images of the run's data source ({seconds:.1f} s)."


# ------------------------------------------------------------------------------------------ the card
def build_card(
    checkpoint: Path,
    run_dir: Path | None,
    class_names: list[str],
    image_size: int | None = None,
    predict_crops: Callable[[list[np.ndarray]], list[str]] | None = None,
) -> ModelCard:
    """The card for `checkpoint` (and its run directory, when it has one)."""
    from omegaconf import OmegaConf

    facts = _checkpoint_facts(checkpoint)
    summary = (read_json(run_dir / "summary.json") or {}) if run_dir else {}
    hydra_dir = run_dir / ".hydra" if run_dir else None
    config, run_config, overrides = "# no run config found beside the checkpoint\n", None, []
    if hydra_dir is not None and (hydra_dir / "config.yaml").is_file():
        config = (hydra_dir / "config.yaml").read_text()
        try:
            run_config = OmegaConf.load(hydra_dir / "config.yaml")
        except Exception:  # noqa: BLE001 - shown as text anyway; only the recomputation needs it parsed
            run_config = None
    if hydra_dir is not None and (hydra_dir / "overrides.yaml").is_file():
        try:
            overrides = [str(o) for o in (OmegaConf.load(hydra_dir / "overrides.yaml") or [])]
        except Exception:  # noqa: BLE001 - the overrides are a detail of the card
            overrides = []

    best = summary.get("best_val_acc", facts.get("checkpoint_best_score"))
    rows = [
        ("checkpoint", f"`{checkpoint}`"),
        ("run directory", f"`{run_dir}`" if run_dir else "- (a checkpoint on its own)"),
        ("overrides", " ".join(f"`{o}`" for o in overrides) if overrides else "-"),
        ("backbone", f"{facts.get('backbone') or '-'}, {facts.get('in_chans') or '?'}-channel input, "
                     f"{image_size or '?'} px"),
        ("checkpoint epoch", "-" if facts.get("epoch") is None else
            f"{facts['epoch']} (step {facts.get('global_step')})"),
        ("best validation accuracy", "-" if best is None else _percent(float(best))),
        ("epochs completed", str(summary.get("epochs_completed", "-"))),
        ("seed", str(summary.get("seed", "-"))),
        ("training wall time", "-" if summary.get("wall_time_s") is None else f"{summary['wall_time_s']:.0f} s"),
        ("calibration", "-" if facts.get("temperature") is None else f"temperature {facts['temperature']:.3f}"),
        ("classes", ", ".join(class_names)),
    ]
    table = "\n".join(f"| {k} | {v.replace('|', '/')} |" for k, v in rows)
    overview = f"### Run\n| what | value |\n|---|---|\n{table}"

    metrics = metric_rows(summary)
    if metrics:
        metrics_note = (f"From `summary.json`: the run's last validation epoch (the checkpoint is from epoch "
                        f"{facts.get('epoch', '?')}).")
    else:
        metrics_note = "No `summary.json` beside the checkpoint: no validation metrics to show."
    image, note = confusion_image(run_dir, facts.get("epoch"), class_names, run_config, predict_crops)
    facts = {**facts, "best_val_acc": best, "run_dir": str(run_dir) if run_dir else None,
             "checkpoint": str(checkpoint)}
    return ModelCard(overview, metrics, metrics_note, config, image, note, facts)
