"""The benchmark scripts run end to end in --tiny mode (their numbers are not asserted, only their report)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def run_bench(script: str, *args: str, tmp_path: Path, timeout: int = 240) -> str:
    env = dict(os.environ, FER_CACHE_DIR=str(tmp_path / "cache"), CUDA_VISIBLE_DEVICES="", COLUMNS="160",
               PYTHONUNBUFFERED="1")
    proc = subprocess.run([sys.executable, str(REPO / "bench" / script), "--tiny", *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def test_train_throughput_tiny(tmp_path):
    out = run_bench("train_throughput.py", "--json", str(tmp_path / "t.json"), tmp_path=tmp_path)
    for row in ("(a) model step", "(a0) the same", "(b) fer end to end", "(c) seed-style", "(d) fer data path", "(e) seed-style PIL"):
        assert row in out, out
    for ratio in ("a/a0 = ", "b/a = ", "b/c = ", "d   = ", "d/e = "):
        assert ratio in out, out
    assert (tmp_path / "t.json").is_file()


@pytest.mark.slow
def test_train_throughput_compile_tiny(tmp_path):
    """--compile adds the compiled rows and the compile cost; minutes, as Lite0 compiles from a cold cache."""
    out = run_bench("train_throughput.py", "--compile", tmp_path=tmp_path, timeout=900)
    for line in ("(ac) the same as (a), torch.compile'd", "(bc) the same as (b) with model.compile=true",
                 "ac/a per repeat: ", "bc/b per repeat: ", "compiling costs a fer-train run"):
        assert line in out, out


def test_inference_tiny(tmp_path):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("skimage")
    out = run_bench("inference.py", tmp_path=tmp_path)
    for row in ("batch 1: eager PyTorch", "batch 1: ONNX Runtime", "throughput, batch 8: eager PyTorch",
                "throughput, batch 8: ONNX Runtime", "photo (detect + classify): fer", "HSEmotion-sized B0",
                "face detection alone"):
        assert row in out, out
    assert "ONNX Runtime / eager, batch 1" in out, out
    from fer.litert import litert_available

    default = "LiteRT" if litert_available() else "ONNX Runtime"  # what Predictor(backend="auto") picks on a CPU
    assert f"fer photo (default: {default})" in out and f"default backend here: {default}" in out, out
    if litert_available():
        assert "batch 1: LiteRT" in out and "LiteRT / eager, batch 1" in out, out
    assert "both ONNX Runtime" in out and "face detection alone (Haar cascade" in out, out


def test_memory_tiny(tmp_path):
    pytest.importorskip("psutil")
    out = run_bench("memory.py", tmp_path=tmp_path)
    for row in ("cache: one loader pass", "cache: 3 train steps", "training peak RSS =", "big cache:"):
        assert row in out, out
