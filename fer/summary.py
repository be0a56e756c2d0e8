"""What a finished run leaves behind: summary.json, the TensorBoard hparams tab, a rich table."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Mapping

from rich.console import Console
from rich.table import Table


def scalar(value: Any) -> Any:
    """Tensors and numpy scalars -> plain Python numbers, for JSON."""
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def flatten(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested config -> {"a/b": value} with values TensorBoard's hparams plugin accepts."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{name}/"))
        elif isinstance(value, (bool, int, float, str)) or value is None:
            flat[name] = "null" if value is None else value
        else:
            flat[name] = str(value)
    return flat


def write_summary(run_dir: Path, summary: dict[str, Any]) -> Path:
    path = Path(run_dir) / "summary.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(summary, indent=2, sort_keys=False) + "\n")
    tmp.replace(path)
    return path


def summary_table(summary: Mapping[str, Any], class_names: list[str]) -> Table:
    table = Table(title="fer: training finished", show_header=True, header_style="bold")
    table.add_column("what")
    table.add_column("value", justify="right")
    best = summary.get("best_val_acc")
    table.add_row("best val accuracy", "-" if best is None else f"{100 * best:.2f}%")
    metrics = summary.get("metrics", {})
    if metrics.get("val/f1_macro") is not None:
        table.add_row("val macro-F1 (last epoch)", f"{metrics['val/f1_macro']:.4f}")
    for name in class_names:
        value = metrics.get(f"val/recall/{name}")
        if value is not None:
            table.add_row(f"  recall {name}", f"{100 * value:.1f}%")
    table.add_row("epochs completed", str(summary.get("epochs_completed")))
    table.add_row("wall time", f"{summary.get('wall_time_s', 0):.1f} s")
    table.add_row("best checkpoint", str(summary.get("best_model_path") or "-"))
    table.add_row("last checkpoint", str(summary.get("last_model_path") or "-"))
    table.add_row("run directory", str(summary.get("run_dir")))
    table.add_row("TensorBoard", f"tensorboard --logdir {summary.get('log_dir')}")
    return table


def print_summary(summary: Mapping[str, Any], class_names: list[str], console: Console | None = None) -> None:
    (console or Console()).print(summary_table(summary, class_names))


# -- status.json: what a run is doing, for sweeps and for anyone watching a run directory ----------------
STATUS_FILE = "status.json"


def write_status(run_dir: Path, status: str, **fields: Any) -> Path:
    """status.json: running | completed | failed | preempted, with pid, host and (when failed) the one-line error."""
    import os
    import socket
    import time

    path = Path(run_dir) / STATUS_FILE
    record: dict[str, Any] = {}
    if path.is_file():
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError):
            record = {}
    now = time.strftime("%Y-%m-%dT%H:%M:%S")
    record.update({"status": status, "pid": os.getpid(), "host": socket.gethostname(), "updated": now})
    if status == "running":
        record.update({"started": now, "error": None, "ended": None})
    else:
        record["ended"] = now
    record.update(fields)
    tmp = path.with_name(f".{STATUS_FILE}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(record, indent=2) + "\n")
    tmp.replace(path)
    return path


def read_json(path: Path) -> dict[str, Any] | None:
    try:
        value = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None
