"""What produced a run: package versions, the git commit of the code (and whether it had local changes), the host.

Written to `<run dir>/provenance.json` at the start of every run; a resumed run appends to `resumed`.
"""

from __future__ import annotations

import json
import os
import platform
import socket
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any

PACKAGES = ("fer-lightning", "torch", "torchvision", "lightning", "timm", "torchmetrics", "hydra-core", "omegaconf",
            "numpy")
CODE_DIR = Path(__file__).resolve().parent.parent


def versions(packages: tuple[str, ...] = PACKAGES) -> dict[str, str | None]:
    found: dict[str, str | None] = {}
    for name in packages:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = None
    return found


def _git(*args: str) -> str | None:
    try:
        result = subprocess.run(["git", "-C", str(CODE_DIR), *args], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):  # no git binary, hung filesystem
        return None
    return result.stdout.strip() if result.returncode == 0 else None


def git_state() -> dict[str, Any]:
    """{"commit": sha or None, "dirty": bool or None, "branch": ...}; None values where git or the repository is missing."""
    commit = _git("rev-parse", "HEAD")
    if commit is None:
        return {"commit": None, "dirty": None, "branch": None, "note": "git or the repository is not available"}
    status = _git("status", "--porcelain", "--untracked-files=no")
    return {"commit": commit, "dirty": None if status is None else bool(status), "branch": _git("rev-parse", "--abbrev-ref", "HEAD")}


def collect(extra: dict[str, Any] | None = None) -> dict[str, Any]:
    import torch

    return {
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": [sys.executable, *sys.argv],
        "cwd": os.getcwd(),
        "host": socket.gethostname(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cuda": torch.version.cuda if torch.cuda.is_available() else None,
        "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
        "versions": versions(),
        "git": git_state(),
        **(extra or {}),
    }


def write_provenance(run_dir: Path, extra: dict[str, Any] | None = None) -> Path:
    """provenance.json in `run_dir`; when one is there already (a resumed run) this start is appended to `resumed`."""
    path = Path(run_dir) / "provenance.json"
    now = collect(extra)
    record = now
    if path.is_file():
        try:
            record = json.loads(path.read_text())
            record.setdefault("resumed", []).append(now)
        except (OSError, ValueError):
            record = now
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(record, indent=2) + "\n")
    os.replace(tmp, path)
    return path
