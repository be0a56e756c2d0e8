"""One table for a whole sweep: every job's overrides, best val accuracy, macro-F1, epochs and status.

- `SweepSummary` is a Hydra callback (conf/hydra/default.yaml): at the end of every `-m` run it writes
  `sweep_summary.json` and `sweep_summary.csv` into the multirun directory and prints the table.
- `fer-sweep-summary [DIR]` prints the same for any multirun directory (the latest one by default), also while
  the sweep is still running: jobs without a result yet show as running (or died/unknown).

Each job directory is read, never written: `.hydra/overrides.yaml`, `status.json` and `summary.json`.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import socket
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from fer.summary import STATUS_FILE, read_json

SUMMARY_JSON = "sweep_summary.json"
SUMMARY_CSV = "sweep_summary.csv"
COLUMNS = ("job", "status", "overrides", "best_val_acc", "f1_macro", "epochs", "global_step", "wall_time_s",
           "run_dir", "error")


def _overrides(job_dir: Path) -> list[str]:
    path = job_dir / ".hydra" / "overrides.yaml"
    if not path.is_file():
        return []
    try:
        from omegaconf import OmegaConf

        return [str(o) for o in OmegaConf.load(path)]
    except Exception:  # noqa: BLE001 - a half-written file while the job starts
        return []


def _alive(pid: Any) -> bool:
    try:
        os.kill(int(pid), 0)
    except (OSError, TypeError, ValueError):
        return False
    return True


def job_dirs(sweep_dir: Path) -> list[Path]:
    dirs = [p for p in Path(sweep_dir).iterdir()
            if p.is_dir() and ((p / ".hydra").is_dir() or (p / STATUS_FILE).is_file() or (p / "summary.json").is_file())]
    return sorted(dirs, key=lambda p: (0, int(p.name), "") if p.name.isdigit() else (1, 0, p.name))


def job_row(job_dir: Path) -> dict[str, Any]:
    status = read_json(job_dir / STATUS_FILE) or {}
    summary = read_json(job_dir / "summary.json") or {}
    state = status.get("status")
    if state is None:
        state = "completed" if summary else "unknown"
    if state == "running" and status.get("host") == socket.gethostname() and not _alive(status.get("pid")):
        state = "died"  # killed without a chance to say so (SIGKILL, OOM): resume=auto continues it
    metrics = summary.get("metrics") or {}
    return {
        "job": job_dir.name,
        "status": state,
        "overrides": _overrides(job_dir),
        "best_val_acc": summary.get("best_val_acc"),
        "f1_macro": metrics.get("val/f1_macro"),
        "epochs": summary.get("epochs_completed"),
        "global_step": summary.get("global_step"),
        "wall_time_s": summary.get("wall_time_s"),
        "run_dir": str(job_dir),
        "error": status.get("error"),
    }


def collect(sweep_dir: Path) -> dict[str, Any]:
    sweep_dir = Path(sweep_dir)
    rows = [job_row(d) for d in job_dirs(sweep_dir)]
    sets = [set(r["overrides"]) for r in rows if r["overrides"]]
    common = sorted(set.intersection(*sets)) if len(sets) > 1 else []
    for row in rows:
        row["varied"] = [o for o in row["overrides"] if o not in common]
    scored = [r for r in rows if isinstance(r["best_val_acc"], (int, float)) and math.isfinite(r["best_val_acc"])]
    best = max(scored, key=lambda r: r["best_val_acc"]) if scored else None
    counts: dict[str, int] = {}
    for row in rows:
        counts[row["status"]] = counts.get(row["status"], 0) + 1
    optuna = sweep_dir / "optimization_results.yaml"
    return {
        "sweep_dir": str(sweep_dir),
        "jobs": rows,
        "common_overrides": common,
        "counts": counts,
        "best_job": best["job"] if best else None,
        "optuna_results": str(optuna) if optuna.is_file() else None,
    }


def write(summary: dict[str, Any], sweep_dir: Path) -> tuple[Path, Path]:
    sweep_dir = Path(sweep_dir)
    json_path, csv_path = sweep_dir / SUMMARY_JSON, sweep_dir / SUMMARY_CSV
    tmp = json_path.with_name(f".{SUMMARY_JSON}.tmp")
    tmp.write_text(json.dumps(summary, indent=2) + "\n")
    tmp.replace(json_path)
    with open(csv_path, "w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(COLUMNS)
        for row in summary["jobs"]:
            writer.writerow([" ".join(row[c]) if c == "overrides" else ("" if row[c] is None else row[c])
                             for c in COLUMNS])
    return json_path, csv_path


STYLE = {"completed": "green", "failed": "bold red", "preempted": "yellow", "running": "cyan", "died": "red",
         "unknown": "dim"}


def table(summary: dict[str, Any]) -> Table:
    counts = ", ".join(f"{n} {s}" for s, n in sorted(summary["counts"].items()))
    title = f"fer sweep: {summary['sweep_dir']} ({counts or 'no jobs yet'})"
    caption = f"all jobs: {' '.join(summary['common_overrides'])}" if summary["common_overrides"] else None
    out = Table(title=title, caption=caption, header_style="bold")
    for name, justify in (("job", "right"), ("overrides", "left"), ("best val acc", "right"),
                          ("macro-F1 (last)", "right"), ("epochs", "right"), ("time", "right"),
                          ("status", "left")):
        out.add_column(name, justify=justify, overflow="fold", no_wrap=name != "overrides")
    for row in summary["jobs"]:
        acc, f1 = row["best_val_acc"], row["f1_macro"]
        status = f"[{STYLE.get(row['status'], '')}]{row['status']}[/]"
        mark = " *" if row["job"] == summary["best_job"] else ""
        out.add_row(
            row["job"] + mark,
            " ".join(row["varied"]) or "-",
            "-" if acc is None else f"{100 * acc:.2f}%",
            "-" if f1 is None else f"{f1:.4f}",
            "-" if row["epochs"] is None else str(row["epochs"]),
            "-" if row["wall_time_s"] is None else f"{row['wall_time_s']:.0f} s",
            status,
        )
    return out


def print_sweep(summary: dict[str, Any], console: Console | None = None) -> None:
    console = console or Console(width=max(120, Console().width))
    console.print(table(summary))
    for row in summary["jobs"]:
        if row["error"]:
            console.print(f"job {row['job']} {row['status']}: {row['error']}  ({row['run_dir']}/traceback.txt)",
                          style=STYLE.get(row["status"]), highlight=False, soft_wrap=True)
    if summary["best_job"] is not None:
        console.print(f"* best: job {summary['best_job']}   "
                      f"tensorboard --logdir {summary['sweep_dir']}", highlight=False, soft_wrap=True)


# -- the Hydra callback -------------------------------------------------------------------------------------
try:
    from hydra.experimental.callback import Callback as _HydraCallback
except ImportError:  # pragma: no cover - hydra-core is a dependency
    _HydraCallback = object


class SweepSummary(_HydraCallback):
    """Hydra callback: prepares a sweep (Optuna's SQLite folder) and summarises it when it ends."""

    def on_multirun_start(self, config, **kwargs: Any) -> None:
        from omegaconf import OmegaConf

        storage = OmegaConf.select(config, "hydra.sweeper.storage", default=None)
        if isinstance(storage, str) and storage.startswith("sqlite:///"):
            Path(storage[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)  # SQLite won't create it

    def on_multirun_end(self, config, **kwargs: Any) -> None:
        sweep_dir = Path(str(config.hydra.sweep.dir))
        if not sweep_dir.is_dir():
            return
        summary = collect(sweep_dir)
        json_path, _ = write(summary, sweep_dir)
        print_sweep(summary)
        Console().print(f"sweep summary: {json_path} (+ .csv)", highlight=False, soft_wrap=True)


# -- fer-sweep-summary ----------------------------------------------------------------------------------------
def latest_sweep(root: Path) -> Path | None:
    dirs = [p for p in root.iterdir() if p.is_dir()] if root.is_dir() else []
    return max(dirs, key=lambda p: p.stat().st_mtime) if dirs else None


def cli(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fer-sweep-summary", description=__doc__.split("\n\n")[0])
    parser.add_argument("sweep_dir", nargs="?", help="a multirun directory (default: the latest in logs/train/multiruns)")
    parser.add_argument("--write", action="store_true", help=f"also (re)write {SUMMARY_JSON} and {SUMMARY_CSV}")
    parser.add_argument("--json", action="store_true", help="print JSON instead of the table")
    args = parser.parse_args(argv)
    root = Path(os.environ.get("FER_ROOT", ".")) / "logs" / "train" / "multiruns"
    sweep_dir = Path(args.sweep_dir) if args.sweep_dir else latest_sweep(root)
    if sweep_dir is None or not sweep_dir.is_dir():
        Console(stderr=True).print(f"[bold red]error:[/] {args.sweep_dir or root}: no such multirun directory",
                                   highlight=False, soft_wrap=True)
        return 2
    summary = collect(sweep_dir)
    if args.write:
        write(summary, sweep_dir)
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print_sweep(summary)
    return 0


def main() -> None:
    raise SystemExit(cli())


if __name__ == "__main__":
    main()
