"""notebooks/explore_run.ipynb runs top to bottom against a finished (tiny) run, in the venv's Python."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import nbformat
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import KernelManager
from nbclient import NotebookClient

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "explore_run.ipynb"


def test_explore_run_notebook(trained_run, tmp_path, monkeypatch):
    # A kernelspec for exactly this interpreter, so the kernel is the venv's python whatever is installed.
    spec = tmp_path / "kernels" / "fer-test"
    spec.mkdir(parents=True)
    argv = [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
    (spec / "kernel.json").write_text(json.dumps({"argv": argv, "display_name": "fer test", "language": "python"}))
    monkeypatch.setenv("FER_RUN_DIR", str(trained_run))  # the kernel inherits this environment
    monkeypatch.setenv("MPLBACKEND", "Agg")
    km = KernelManager(kernel_name="fer-test", kernel_spec_manager=KernelSpecManager(kernel_dirs=[str(spec.parent)]))

    nb = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(nb, km=km, timeout=300, resources={"metadata": {"path": str(NOTEBOOK.parent)}}).execute()

    outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.outputs]
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    assert str(trained_run) in text and "val accuracy" in text and "1 face(s)" in text
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(images) >= 5  # curves, logged and recomputed confusion matrices, mistakes grid, photo, bars
    assert not [o for o in outputs if o.output_type == "error"]


def test_first_cell_finds_the_run_from_the_notebooks_folder(tmp_path, monkeypatch):
    """Jupyter starts the kernel in notebooks/. The README's relative FER_RUN_DIR=logs/train/runs/<run> must open
    that run, and left alone the cell must open the run with the newest checkpoint, not the last name in sort
    order (a run_name sorts after every timestamp) nor a run that saved nothing."""
    import os
    import time

    repo = tmp_path / "repo"
    (repo / "fer").mkdir(parents=True)
    (repo / "notebooks").mkdir()
    runs = repo / "logs" / "train" / "runs"
    for name, age in (("a_older", 100), ("b_newest", 0), ("zz_failed", None)):
        (runs / name / ".hydra").mkdir(parents=True)
        (runs / name / ".hydra" / "config.yaml").write_text("seed: 0\n")
        if age is not None:
            ckpt = runs / name / "checkpoints" / "last.ckpt"
            ckpt.parent.mkdir()
            ckpt.write_bytes(b"")
            os.utime(ckpt, (time.time() - age, time.time() - age))
    cell = next(c for c in nbformat.read(NOTEBOOK, as_version=4).cells if c.cell_type == "code").source

    def first_cell(run_dir: str | None) -> Path:
        monkeypatch.chdir(repo / "notebooks")
        if run_dir is None:
            monkeypatch.delenv("FER_RUN_DIR", raising=False)
        else:
            monkeypatch.setenv("FER_RUN_DIR", run_dir)
        namespace: dict = {}
        exec(compile(cell, "cell", "exec"), namespace)
        assert Path.cwd() == repo  # the run config's relative paths (data.root, paths.*) resolve as in training
        return Path(namespace["RUN_DIR"]).resolve()

    assert first_cell(None) == runs / "b_newest"
    assert first_cell("logs/train/runs/a_older") == runs / "a_older"
