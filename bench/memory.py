"""Peak memory of training, and what the memory-mapped cache costs for a dataset far larger than FER2013.

    python bench/memory.py                      # FER2013 1-epoch training run + a 300,000-image cache
    python bench/memory.py --train-batches 100  # a shorter FER2013 run
    python bench/memory.py --tiny               # seconds: a smoke test of the script itself

1. `python -m fer.train experiment=fer2013` in a child process: its peak resident set (VmHWM, the kernel's
   own high-water mark), and the largest anonymous and file-backed parts seen while it ran.
2. A 300,000 x 1 x 64 x 64 uint8 cache written straight in the cache's format (1.14 GiB on disk, faces tiled
   from fer's synthetic ones) and evicted from the page cache; then, in fresh processes, (a) one full pass of
   the training loader over it (gather + augmentation, every image read once) and (b) a few steps of
   `fer.train.train` on it.

Linux's RSS counts the pages of a memory-mapped file that the process has touched ("RssFile"): clean page
cache, shared with every other process mapping the file and dropped by the kernel whenever memory is
needed, never swapped. "RssAnon" is the memory the process itself allocated. Both are reported.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import _common as C  # noqa: E402  (sets sys.path to the repository)

import numpy as np  # noqa: E402

from fer.data.base import Sample, Source, SplitRoles  # noqa: E402

GiB = 1024**3


class BigSource(Source):
    """A source whose only data is its cache (written by `write_cache`): never decoded."""

    name = "bench-big"

    def __init__(self, count: int = 300_000, val_count: int = 3_000) -> None:
        self.count, self.val_count = int(count), int(val_count)

    def roles(self) -> SplitRoles:
        return SplitRoles(train="train", val="val")

    def samples(self, split: str) -> list[Sample]:
        raise RuntimeError("bench-big exists only as a cache: run bench/memory.py to write it")

    def fingerprint(self, split: str) -> str:
        return f"bench-big-{split}-{self.count if split == 'train' else self.val_count}"


def write_cache(cache_dir: Path, source: BigSource, size: int) -> dict[str, Path]:
    """Write both splits in fer.data.cache's layout (images.npy memmap written here, the rest by its write_index), quickly."""
    from fer.data.cache import _cache_key, write_index
    from fer.data.synthetic import draw_face

    tiles = np.stack([draw_face(i % 7, 1000 + i, size) for i in range(700)])[:, None]  # (700, 1, S, S)
    folders = {}
    for split, n in (("train", source.count), ("val", source.val_count)):
        folder = cache_dir / f"{source.name}-{split}-{_cache_key(source, split, size, 1)[:16]}"
        folders[split] = folder
        if (folder / "meta.json").is_file():
            continue
        folder.mkdir(parents=True, exist_ok=True)
        images = np.lib.format.open_memmap(folder / "images.npy", mode="w+", dtype=np.uint8, shape=(n, 1, size, size))
        rng = np.random.default_rng(0)
        chunk = 20_000
        for start in range(0, n, chunk):
            stop = min(n, start + chunk)
            picks = rng.integers(0, len(tiles), stop - start)
            block = tiles[picks]
            flip = rng.random(stop - start) < 0.5
            block[flip] = block[flip, :, :, ::-1]
            images[start:stop] = block
        images.flush()
        del images
        write_index(folder, source.name, split, size, 1, labels=np.arange(n) % 7, kept=np.arange(n), skipped=[])
    return folders


def evict(path: Path) -> None:
    """Drop a file's pages from the page cache, so the next reader starts cold (clean pages only)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


# -- measuring a child process --------------------------------------------------------------------------
def _status(pid: int) -> dict[str, int]:
    out = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key in ("VmHWM", "VmRSS", "RssAnon", "RssFile", "RssShmem"):
                    out[key] = int(value.split()[0]) * 1024
    except OSError:
        pass
    return out


def _cache_pages(pid: int, name: str = "images.npy") -> int:
    """Resident bytes of the process's mappings of cache files (`.../images.npy`), from /proc/<pid>/smaps."""
    total, inside = 0, False
    try:
        with open(f"/proc/{pid}/smaps") as f:
            for line in f:
                head = line.split(None, 1)[0]
                if "-" in head and not head.endswith(":"):  # a mapping's header line: address range ... path
                    inside = line.rstrip().endswith(name)
                elif inside and head == "Rss:":
                    total += int(line.split()[1]) * 1024
    except OSError:
        pass
    return total


def run_measured(cmd: list[str], env: dict[str, str] | None = None, log: Path | None = None) -> dict[str, float]:
    """Run `cmd`, polling its memory (and its children's) every 50 ms; peaks in bytes and the wall time."""
    try:
        import psutil  # only for the children's share; the kernel's own figures come from /proc
    except ImportError:
        psutil = None
    started = time.perf_counter()
    out = open(log, "w") if log else subprocess.DEVNULL
    proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=C.REPO)
    peaks = {"VmHWM": 0, "RssAnon": 0, "RssFile": 0, "tree_rss": 0, "cache": 0}
    polls = 0
    root = psutil.Process(proc.pid) if psutil else None
    while proc.poll() is None:
        status = _status(proc.pid)
        for key in ("VmHWM", "RssAnon", "RssFile"):
            peaks[key] = max(peaks[key], status.get(key, 0))
        if polls % 10 == 0:  # smaps is longer to read: twice a second
            peaks["cache"] = max(peaks["cache"], _cache_pages(proc.pid))
        polls += 1
        if root is not None:
            try:
                tree = [root, *root.children(recursive=True)]
                peaks["tree_rss"] = max(peaks["tree_rss"], sum(p.memory_info().rss for p in tree))
            except psutil.Error:
                pass
        time.sleep(0.05)
    if log:
        out.close()
    if proc.returncode != 0:
        tail = Path(log).read_text()[-3000:] if log else ""
        raise SystemExit(f"{' '.join(cmd[:6])} ... failed with exit code {proc.returncode}\n{tail}")
    peaks["wall_s"] = time.perf_counter() - started
    return peaks


def child_env(cache_dir: Path | None = None, threads: int | None = None) -> dict[str, str]:
    env = dict(os.environ, PYTHONUNBUFFERED="1", HYDRA_FULL_ERROR="1")
    if cache_dir is not None:
        env["FER_CACHE_DIR"] = str(cache_dir)
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    return env


# -- the child roles ----------------------------------------------------------------------------------
def child_loader(cache_dir: Path, count: int, val_count: int, size: int, batch: int) -> None:
    """One full pass of the training loader over the big cache, augmenting every batch (no model)."""
    from fer.data.datamodule import FERDataModule

    dm = FERDataModule(BigSource(count, val_count), image_size=size, batch_size=batch, cache_dir=cache_dir)
    dm.setup("fit")
    loader = dm.train_dataloader()

    class Training:
        training = True

    dm.trainer = Training()
    seen = 0
    started = time.perf_counter()
    for batch_ in loader:
        images, *_ = dm.on_after_batch_transfer(batch_, 0)
        seen += len(images)
    print(json.dumps({"images": seen, "seconds": time.perf_counter() - started, "cache": _cache_pages(os.getpid()),
                      **_status(os.getpid())}))


def child_train(cache_dir: Path, out: Path, count: int, val_count: int, size: int, batch: int, steps: int) -> None:
    """A few steps of fer.train.train on the big cache, with the default callbacks and logger."""
    from fer.train import train

    overrides = [f"data.image_size={size}", f"data.batch_size={batch}", "trainer.max_epochs=1",
                 f"trainer.limit_train_batches={steps}", "trainer.limit_val_batches=5", "trainer.accelerator=cpu",
                 "callbacks.progress_bar=null", "trainer.enable_progress_bar=false", "model.backbone.in_chans=1"]
    cfg = C.compose(overrides, out, cache_dir)
    from omegaconf import open_dict

    with open_dict(cfg):
        cfg.data.source = {"_target_": "__main__.BigSource", "count": count, "val_count": val_count}
    train(cfg)


# -- the run ------------------------------------------------------------------------------------------
def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", help="FER2013 image-folder root (default ../shared/data/fer2013; synthetic if absent)")
    p.add_argument("--train-batches", type=int, default=None, help="FER2013 run: batches (default: a full epoch)")
    p.add_argument("--count", type=int, default=300_000, help="images in the big cache")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--steps", type=int, default=20, help="training steps on the big cache")
    p.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS of the measured processes")
    p.add_argument("--workdir", help="where the big cache and runs go (default: a temp folder, removed after)")
    p.add_argument("--tiny", action="store_true", help="small everything (tests)")
    p.add_argument("--json", type=Path, help="also write the figures to this file")
    p.add_argument("--child", choices=("loader", "train"), help=argparse.SUPPRESS)
    p.add_argument("--cache-dir", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--val-count", type=int, default=3_000, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.tiny:
        args.count, args.val_count, args.image_size, args.batch_size, args.steps = 2_000, 200, 32, 16, 3
        args.threads = args.threads or 1
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.child == "loader":
        return child_loader(args.cache_dir, args.count, args.val_count, args.image_size, args.batch_size)
    if args.child == "train":
        return child_train(args.cache_dir, args.out, args.count, args.val_count, args.image_size,
                           args.batch_size, args.steps)

    import shutil

    console = C.console()
    keep = args.workdir is not None
    work = C.workdir(args.workdir)
    me = [sys.executable, str(Path(__file__).resolve())]
    rows: list[tuple[str, dict[str, float]]] = []
    try:
        # 1. a FER2013 training run, as a user starts it (--tiny: the training run on the big cache stands in)
        root = None if args.tiny else C.fer2013_root(args.data)
        run = work / "fer2013-run"
        if not args.tiny:
            if root is not None:
                what = f"FER2013 training, {f'{args.train_batches} steps' if args.train_batches else '1 epoch'}"
                cmd = [sys.executable, "-m", "fer.train", "experiment=fer2013", f"data.root={root}",
                       "trainer.max_epochs=1", "trainer.accelerator=cpu", f"hydra.run.dir={run}",
                       "callbacks.progress_bar=null"]
                cache = None  # the user's cache: FER2013 is decoded once, not in every measurement
            else:
                what = f"synthetic-faces training (no FER2013), {args.train_batches or 'all'} steps"
                cmd = [sys.executable, "-m", "fer.train", f"hydra.run.dir={run}", "trainer.accelerator=cpu",
                       "callbacks.progress_bar=null", "trainer.max_epochs=1"]
                cache = work / "cache"
            if args.train_batches:
                cmd += [f"trainer.limit_train_batches={args.train_batches}", "trainer.limit_val_batches=2"]
            console.print(f"[bold]memory[/]: {what} ...")
            rows.append((what, run_measured(cmd, child_env(cache, args.threads), log=work / "train.log")))

        # 2. a large cache, memory-mapped
        big = BigSource(args.count, args.val_count)
        cache_dir = work / "big-cache"
        started = time.perf_counter()
        folders = write_cache(cache_dir, big, args.image_size)
        images = folders["train"] / "images.npy"
        on_disk = images.stat().st_size
        console.print(f"wrote a {args.count:,} x 1 x {args.image_size} x {args.image_size} uint8 cache: "
                      f"{on_disk / GiB:.2f} GiB on disk in {time.perf_counter() - started:.1f} s")
        common = ["--cache-dir", str(cache_dir), "--count", str(args.count), "--val-count", str(args.val_count),
                  "--image-size", str(args.image_size), "--batch-size", str(args.batch_size)]
        evict(images)
        loader = run_measured([*me, "--child", "loader", *common], child_env(None, args.threads),
                              log=work / "loader.log")
        reported = json.loads((work / "loader.log").read_text().strip().splitlines()[-1])
        loader["cache"] = max(loader["cache"], reported["cache"])  # at the very end of the pass
        rows.append((f"{args.count:,}-image cache: one loader pass", loader))
        evict(images)
        train_cmd = [*me, "--child", "train", *common, "--steps", str(args.steps), "--out", str(work / "big-run")]
        steps = run_measured(train_cmd, child_env(None, args.threads), log=work / "big-train.log")
        rows.append((f"{args.count:,}-image cache: {args.steps} train steps", steps))
    finally:
        if not keep:
            shutil.rmtree(work, ignore_errors=True)

    from rich.table import Table

    table = Table(title="peak memory, GiB (RSS = anonymous + file-backed: shared libraries and mapped cache pages)")
    for col in ("run", "peak RSS", "anonymous", "file-backed", "of which cache pages", "wall s"):
        table.add_column(col, justify="left" if col == "run" else "right")
    for name, m in rows:
        table.add_row(name, f"{m['VmHWM'] / GiB:.2f}", f"{m['RssAnon'] / GiB:.2f}", f"{m['RssFile'] / GiB:.2f}",
                      f"{m['cache'] / GiB:.3f}", f"{m['wall_s']:.0f}")
    console.print(table)
    fer_name, fer_run = rows[0] if not args.tiny else rows[-1]
    fer_peak = fer_run["VmHWM"]
    console.print(f"training peak RSS = {fer_peak / GiB:.2f} GiB = {fer_peak / 1e9:.2f} GB ({fer_name}; "
                  f"target <= 3 GB: "
                  f"{C.verdict(fer_peak, 3e9, higher=False)})", soft_wrap=True)
    console.print(f"big cache: {on_disk / GiB:.2f} GiB on disk; one full pass: peak RSS "
                  f"{loader['VmHWM'] / GiB:.2f} GiB "
                  f"(anonymous {loader['RssAnon'] / GiB:.2f} GiB, cache pages {loader['cache'] / GiB:.2f} GiB); "
                  f"{args.steps} training steps: peak RSS {steps['VmHWM'] / GiB:.2f} GiB (anonymous "
                  f"{steps['RssAnon'] / GiB:.2f} GiB, cache pages {steps['cache'] / GiB:.3f} GiB)", soft_wrap=True)
    figures = {"cache_bytes": on_disk, "runs": {name: m for name, m in rows}}
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")
    return figures


if __name__ == "__main__":
    main()
