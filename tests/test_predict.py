"""fer-predict end to end: outputs, options, and every kind of bad input without a traceback."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fer.labels import CLASSES
from fer.predict import main

REPO = Path(__file__).resolve().parents[1]


def _no_face(path: Path) -> Path:
    rng = np.random.default_rng(0)
    ramp = np.linspace(0, 255, 256, dtype=np.float32)[None, :].repeat(200, 0)
    Image.fromarray(np.clip(ramp + rng.normal(0, 3, ramp.shape), 0, 255).astype(np.uint8)).save(path)
    return path


def test_cli_subprocess_outputs_and_a_corrupt_file(trained_run, astronaut_jpeg, tmp_path):
    photos = tmp_path / "photos"
    photos.mkdir()
    (photos / "astronaut.jpg").write_bytes(astronaut_jpeg.read_bytes())
    (photos / "broken.jpg").write_bytes(astronaut_jpeg.read_bytes()[:1500])  # truncated JPEG
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "fer.predict", str(photos), "--checkpoint", str(trained_run),
           "--json", str(out / "r.json"), "--csv", str(out / "r.csv"), "--output-dir", str(out / "pics")]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "COLUMNS": "240"})
    assert proc.returncode == 1, proc.stderr  # one file failed: non-zero at the end
    assert "Traceback" not in proc.stderr + proc.stdout
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and str(photos / "broken.jpg") in errors[0], proc.stderr
    assert "astronaut.jpg" in proc.stdout  # the good photo is still in the table

    report = json.loads((out / "r.json").read_text())
    by_name = {Path(r["source"]).name: r for r in report["images"]}
    assert by_name["broken.jpg"]["error"] and not by_name["broken.jpg"]["faces"]
    faces = by_name["astronaut.jpg"]["faces"]
    assert len(faces) == 1
    assert list(faces[0]["probabilities"]) == list(CLASSES)
    assert sum(faces[0]["probabilities"].values()) == pytest.approx(1.0, abs=1e-5)
    rows = list(csv.DictReader(open(out / "r.csv")))
    assert [r["image"].endswith("astronaut.jpg") for r in rows].count(True) == 1
    row = next(r for r in rows if r["image"].endswith("astronaut.jpg"))
    assert row["label"] == faces[0]["label"] and float(row["score"]) == pytest.approx(faces[0]["score"], abs=1e-5)
    annotated = Image.open(out / "pics" / "astronaut_annotated.jpg")
    assert annotated.size == (512, 512)
    assert Image.open(out / "pics" / "astronaut_face0.png").size[0] > 100  # the bar chart


def _run(argv, capsys):
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err + captured.out
    return code, captured


def test_no_face_reported_then_fallback(trained_run, tmp_path, capsys):
    blank = _no_face(tmp_path / "wall.png")
    code, out = _run([blank, "--checkpoint", trained_run, "--json", tmp_path / "a.json"], capsys)
    assert code == 0 and "no face found" in out.out
    assert json.loads((tmp_path / "a.json").read_text())["images"][0]["faces"] == []
    code, out = _run([blank, "--checkpoint", trained_run, "--fallback", "full-image", "--json", tmp_path / "b.json"], capsys)
    faces = json.loads((tmp_path / "b.json").read_text())["images"][0]["faces"]
    assert code == 0 and len(faces) == 1 and faces[0]["box"] == [0, 0, 256, 200] and not faces[0]["detected"]


def test_tta_option_reaches_the_predictor(trained_run, astronaut_jpeg, tmp_path, capsys):
    from fer.inference import Predictor

    code, _ = _run([astronaut_jpeg, "--checkpoint", trained_run, "--tta", "flip", "--json", tmp_path / "r.json"], capsys)
    report = json.loads((tmp_path / "r.json").read_text())
    expected = Predictor.from_checkpoint(trained_run, tta="flip").predict(astronaut_jpeg).faces[0].probabilities
    assert code == 0 and report["tta"] == "flip"
    assert report["images"][0]["faces"][0]["probabilities"] == pytest.approx(expected, abs=1e-5)


def test_options_globs_and_bad_inputs(trained_run, astronaut_jpeg, tmp_path, capsys, monkeypatch):
    (tmp_path / "a.jpg").write_bytes(astronaut_jpeg.read_bytes())
    (tmp_path / "b.jpg").write_bytes(astronaut_jpeg.read_bytes())
    (tmp_path / "readme.jpg").write_text("hello")  # not an image, despite its name
    code, out = _run([tmp_path / "*.jpg", tmp_path / "missing.png", "--checkpoint", trained_run, "--no-detect",
                      "--csv", tmp_path / "r.csv", "--batch-size", "1"], capsys)
    assert code == 1
    errors = [line for line in out.err.splitlines() if line.startswith("error:")]
    assert len(errors) == 2 and any("readme.jpg" in e for e in errors) and any("missing.png" in e for e in errors)
    rows = [r for r in csv.DictReader(open(tmp_path / "r.csv")) if r["label"]]
    assert len(rows) == 2 and all(r["x"] == "0" and r["w"] == "512" for r in rows)  # --no-detect: whole image
    # Pillow's decompression-bomb guard stays in force: a per-file error, not a crash.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 512 * 512 // 4)
    code, out = _run([tmp_path / "a.jpg", "--checkpoint", trained_run], capsys)
    assert code == 1 and "decompression bomb" in out.err and "a.jpg" in out.err


def test_not_a_checkpoint_is_one_line(tmp_path, astronaut_jpeg, capsys):
    (tmp_path / "model.ckpt").write_bytes(b"\x00" * 100)
    code, out = _run([astronaut_jpeg, "--checkpoint", tmp_path / "model.ckpt"], capsys)
    assert code == 2
    lines = out.err.strip().splitlines()
    assert len(lines) == 1 and "model.ckpt" in lines[0]


@pytest.mark.parametrize("option, message", [
    (["--margin", "-2"], "error: --margin=-2.0: expected a number above -0.5"),
    (["--margin", "-0.6"], "error: --margin=-0.6: expected a number above -0.5"),  # was an all-black crop
    (["--device", "cuda"], "error: --device=cuda: CUDA is not available on this machine"),
])
def test_bad_margin_and_device_are_one_line(trained_run, astronaut_jpeg, capsys, monkeypatch, option, message):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # as on a machine without a GPU
    code, out = _run([astronaut_jpeg, "--checkpoint", trained_run, *option], capsys)
    assert code == 2
    lines = out.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(message), out.err


def test_default_margin_frames_faces_as_fer2013(trained_run, astronaut_jpeg, capsys):
    from fer.export import face_crop_text
    from fer.faces import DEFAULT_MARGIN
    from fer.inference import Predictor
    from fer.predict import parse_args

    assert DEFAULT_MARGIN == 0.1  # FER2013's 48x48 frames are a median 1.2x BlazeFace's box (fer.faces)
    assert parse_args([str(astronaut_jpeg), "-c", "x"]).margin == DEFAULT_MARGIN
    assert Predictor(None, CLASSES, 48, 1, backend="torch").margin == DEFAULT_MARGIN
    assert "a square of side 1.2x the longer side of the detected face box" in face_crop_text()
