"""Where a run lives, and which checkpoint it continues from.

Run directories (`hydra.run.dir`, resolved by `${fer.run_dir:...}` below):

    run_name=null                    logs/train/runs/<timestamp>          (a new directory every time)
    run_name=NAME                    logs/train/runs/NAME                 (stable: the same command, the same folder)
    resume=auto                      runs/NAME, or without run_name the latest run that has a checkpoint
    resume=NAME | resume=DIR         that run's directory

Inside a sweep (`-m`) every job keeps Hydra's `<multirun>/<job num>` directory; `resume=auto` then continues
the job's own checkpoint, which is what a requeued SLURM job needs.

The checkpoint: `ckpt_path=FILE` (by hand, must be readable), else with `resume` set the newest readable of
`checkpoints/last.ckpt`, `checkpoints/last.ckpt.prev` (the one before, kept by AtomicCheckpointIO) and the
other `checkpoints/*.ckpt`. Every candidate is opened with `torch.load(weights_only=True)` first; an
unreadable one is renamed `*.corrupt` with a one-line warning and the next one is used.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from fer.errors import ConfigError

log = logging.getLogger("fer.resume")

LAST = "last.ckpt"
PREVIOUS = "last.ckpt.prev"  # not *.ckpt on purpose: tools that glob checkpoints never mistake it for a model
RESOLVER = "fer.run_dir"


def _is_set(value: Any) -> bool:
    return value is not None and value is not False and str(value).strip().lower() not in ("", "null", "none", "false")


def is_auto(value: Any) -> bool:
    return value is True or str(value).strip().lower() in ("auto", "true")


def checkpoint_files(run_dir: Path) -> list[Path]:
    folder = Path(run_dir) / "checkpoints"
    return sorted(folder.glob("*.ckpt")) if folder.is_dir() else []


def latest_run_dir(runs_root: Path) -> Path | None:
    """The run under `runs_root` whose newest checkpoint is the newest of all, or None."""
    best: tuple[float, Path] | None = None
    if not runs_root.is_dir():
        return None
    for run in runs_root.iterdir():
        files = [p for p in (*checkpoint_files(run), run / "checkpoints" / PREVIOUS) if p.is_file()]
        if files:
            newest = max(p.stat().st_mtime for p in files)
            if best is None or newest > best[0]:
                best = (newest, run)
    return best[1] if best else None


def named_run_dir(runs_root: Path, resume: str) -> Path:
    """`resume=DIR` or `resume=NAME` (a folder under runs_root)."""
    as_path = Path(resume).expanduser()
    if as_path.is_file():
        raise ConfigError(f"resume={resume}: a file; use ckpt_path={resume} to resume from a checkpoint file")
    for candidate in (as_path, runs_root / resume):
        if candidate.is_dir():
            return candidate.resolve()
    raise ConfigError(f"resume={resume}: neither a run directory nor a run name under {runs_root}")


def run_dir(runs_root: str, stamp: str, run_name: Any = None, resume: Any = None) -> str:
    """The run directory for `hydra.run.dir` (see the module docstring)."""
    root = Path(str(runs_root))
    if _is_set(resume) and not is_auto(resume):
        return str(named_run_dir(root, str(resume)))
    if _is_set(run_name):
        return str(root / str(run_name))
    if _is_set(resume):  # auto, no run name: the latest run that has something to resume
        latest = latest_run_dir(root)
        if latest is not None:
            return str(latest.resolve())
    return str(root / str(stamp))


def run_dir_or_exit(*args: Any) -> str:
    """`run_dir` behind the entry points' one-line errors. Hydra resolves `hydra.run.dir` while it sets the run
    up, before the entry point's own handling runs, and would print a bad `resume=` as a traceback; the
    SystemExit that `one_line_errors` raises passes through OmegaConf and Hydra untouched."""
    from fer.utils import one_line_errors  # at call time: fer.utils imports this module

    return one_line_errors(run_dir)(*args)


def register_resolvers() -> None:
    if not OmegaConf.has_resolver(RESOLVER):
        # Cached: Hydra resolves hydra.run.dir more than once, and the answer must not change in between.
        OmegaConf.register_new_resolver(RESOLVER, run_dir_or_exit, use_cache=True)


# -- choosing the checkpoint ------------------------------------------------------------------------
def readable(path: Path) -> dict[str, Any]:
    """The checkpoint dict (weights_only load); CheckpointError if it is unreadable, truncated or not a training checkpoint."""
    from fer.checkpoint import read_checkpoint
    from fer.errors import CheckpointError

    ckpt = read_checkpoint(path)
    if "state_dict" not in ckpt or "loops" not in ckpt:
        raise CheckpointError(f"{path}: not a training checkpoint (no state_dict/loops to resume from)")
    return ckpt


def _describe(ckpt: dict[str, Any]) -> str:
    return f"epoch {ckpt.get('epoch')}, step {ckpt.get('global_step')}"


def find_resume_checkpoint(run_dir: Path) -> Path | None:
    """The newest readable checkpoint of `run_dir` to continue from; None when it has none."""
    from fer.errors import CheckpointError

    folder = Path(run_dir) / "checkpoints"
    others = sorted(
        (p for p in checkpoint_files(run_dir) if p.name != LAST), key=lambda p: p.stat().st_mtime, reverse=True
    )
    candidates = [p for p in (folder / LAST, folder / PREVIOUS, *others) if p.is_file()]
    bad: list[str] = []
    for path in candidates:
        try:
            ckpt = readable(path)
        except CheckpointError as error:
            # Keep the evidence, but out of the way: the next save must not rotate it into last.ckpt.prev.
            corrupt = path.with_name(path.name + ".corrupt")
            os.replace(path, corrupt)
            bad.append(f"{path.name} ({str(error).split(': ', 1)[-1]})")
            continue
        if bad:
            log.warning("unreadable checkpoint %s, renamed *.corrupt; resuming from %s (%s) instead",
                        "; ".join(bad), path.name, _describe(ckpt))
        else:
            log.info("resuming from %s (%s)", path, _describe(ckpt))
        return path
    if bad:
        log.warning("unreadable checkpoint %s, renamed *.corrupt; no readable checkpoint left: starting afresh",
                    "; ".join(bad))
    return None


def checkpoint_to_resume(cfg: Any, run_dir: Path) -> Path | None:
    """What `trainer.fit(ckpt_path=...)` gets: `ckpt_path` (checked), or with `resume` set the run's newest good one."""
    explicit = cfg.get("ckpt_path")
    if _is_set(explicit):
        from fer.checkpoint import resolve_checkpoint

        path = resolve_checkpoint(explicit)
        readable(path)  # a bad file by hand is an error, not something to silently skip
        return path
    if not _is_set(cfg.get("resume")):
        return None
    path = find_resume_checkpoint(run_dir)
    if path is None:
        log.info("resume=%s: no checkpoint in %s yet, starting afresh", cfg.get("resume"), run_dir)
    return path
