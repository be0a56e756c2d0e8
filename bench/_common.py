"""Shared by the benchmark scripts: data to measure on, config composition, timing and the report table.

Every script measures the things it compares in one process, alternating between them, and reports the
best of the repeats (the least disturbed by other work on the machine) next to the median, so that
ratios stay meaningful on a busy machine.
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Sequence

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # `python bench/x.py` from anywhere imports the working tree's fer
    sys.path.insert(0, str(REPO))

FER2013_ROOT = REPO.parent / "shared" / "data" / "fer2013"


def fer2013_root(explicit: str | None = None) -> Path | None:
    """The FER2013 image-folder tree to measure on: `explicit`, else ../shared/data/fer2013, else None."""
    root = Path(explicit).expanduser() if explicit else FER2013_ROOT
    return root if (root / "train").is_dir() else None


def synthetic_folder(root: Path, per_class_train: int, per_class_test: int, size: int = 48) -> Path:
    """A FER2013-layout tree (train/<class>/*.png, test/<class>/*.png) of synthetic faces, written once.

    Used where FER2013 is absent (and by --tiny), so the framework and the seed-style ImageFolder
    baseline read the very same image files.
    """
    from PIL import Image

    from fer.data.synthetic import draw_face
    from fer.labels import CLASSES

    done = root / ".complete"
    if done.is_file():
        return root
    for split, count in (("train", per_class_train), ("test", per_class_test)):
        for label, name in enumerate(CLASSES):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                seed = (label * 1_000_003 + i * 7_919) * 2 + (split == "test")
                Image.fromarray(draw_face(label, seed, size)).save(folder / f"{split}_{i:05d}.png")
    done.write_text("ok\n")
    return root


def bench_data(explicit: str | None, tiny: bool, workdir: Path) -> tuple[Path, str]:
    """(image-folder root, description): FER2013 when present (not in --tiny), else synthetic faces."""
    if not tiny:
        root = fer2013_root(explicit)
        if root is not None:
            n = sum(1 for _ in (root / "train").rglob("*.jpg"))
            return root, f"FER2013 at {root} ({n:,} training images)"
        if explicit:
            raise SystemExit(f"--data {explicit}: no train/<class>/ folders there")
    per_train, per_test = (12, 4) if tiny else (400, 60)
    root = synthetic_folder(workdir / "synthetic_faces", per_train, per_test)
    return root, f"synthetic faces, FER2013 layout, {7 * per_train:,} training images ({root})"


def compose(overrides: Sequence[str], output_dir: Path, cache_dir: Path | None = None):
    """conf/train.yaml with `overrides`, writing under `output_dir` (as tests/conftest.py does)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from omegaconf import open_dict

    from fer.utils import CONFIG_DIR

    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = hydra_compose(config_name="train", overrides=list(overrides))
    with open_dict(cfg):
        cfg.paths.output_dir = str(output_dir)
        cfg.paths.log_dir = str(output_dir / "logs")
        if cache_dir is not None:
            cfg.paths.cache_dir = str(cache_dir)
    return cfg


def steady_rate(stamps: Sequence[float], warmup: int, batch_size: int) -> float:
    """Images/s between the end of batch `warmup` and the end of the last batch (time stamps at batch ends)."""
    if len(stamps) < warmup + 2:
        raise RuntimeError(f"{len(stamps)} batches timed; need more than warm-up ({warmup}) + 1")
    return (len(stamps) - 1 - warmup) * batch_size / (stamps[-1] - stamps[warmup])


class Repeats:
    """Results of alternating repeats: best (max rate) and median per name."""

    def __init__(self) -> None:
        self.values: dict[str, list[float]] = {}

    def add(self, name: str, value: float) -> None:
        self.values.setdefault(name, []).append(value)

    def best(self, name: str) -> float:
        return max(self.values[name])

    def median(self, name: str) -> float:
        return statistics.median(self.values[name])

    def low(self, name: str) -> float:
        """Best of a latency (the smallest)."""
        return min(self.values[name])


def verdict(value: float, target: float, higher: bool = True) -> str:
    ok = value >= target if higher else value <= target
    return "[green]met[/]" if ok else "[red]NOT met[/]"


def console():
    from rich.console import Console

    # Wide enough that the rows are never folded when the output is captured (tests, CI logs).
    return Console(width=max(120, int(os.environ.get("COLUMNS", "0") or 0)), highlight=False)


def machine_line() -> str:
    import platform

    import torch

    return (f"torch {torch.__version__}, {torch.get_num_threads()} intra-op threads, {os.cpu_count()} CPUs, "
            f"{platform.machine()}, Python {platform.python_version()}")


def workdir(keep: str | None = None) -> Path:
    if keep:
        path = Path(keep)
        path.mkdir(parents=True, exist_ok=True)
        return path
    return Path(tempfile.mkdtemp(prefix="fer-bench-"))


def prepare(args) -> None:
    """Threads and quiet logs, the same for every benchmark script."""
    import logging
    import warnings

    import torch

    if args.tiny and not args.threads:
        args.threads = 1  # tests run beside others: one thread is the robust choice there
    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    for name in ("lightning", "lightning.pytorch", "lightning.fabric", "fer"):
        logging.getLogger(name).setLevel(logging.ERROR)
