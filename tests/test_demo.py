"""The browser demo (fer-demo): upload guard, handler, model card, and the real app driven in headless Chromium."""

from __future__ import annotations

import os
import signal
import socket
import struct
import subprocess
import sys
import time
import urllib.request
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fer.demo import (MODE_ALL, MODE_NONE, DemoModel, Limits, UploadError, analyse, build_predictor, open_upload,
                      parse_args)
from fer.demo_card import build_card
from fer.labels import CLASSES

ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = ROOT / "test-artifacts"  # gitignored; screenshots of the demo land here
CHROMIUM = Path(os.environ.get("FER_CHROMIUM", "/usr/bin/chromium"))  # Debian's `chromium` package
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _png_bomb(width: int, height: int) -> bytes:
    """A valid-looking PNG of a few hundred bytes that claims width x height pixels: a decompression bomb."""
    header = _chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
    return b"\x89PNG\r\n\x1a\n" + header + _chunk(b"IDAT", zlib.compress(b"\0" * 4096)) + _chunk(b"IEND", b"")


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("bad_uploads")
    files = {
        "text": folder / "notes.png",  # an image's name, a text's content: reaches the server
        "bomb": folder / "bomb.png",
        "empty": folder / "empty.jpg",
        "truncated": folder / "truncated.jpg",
    }
    files["text"].write_text("these are not pixels\n")
    files["bomb"].write_bytes(_png_bomb(30_000, 30_000))
    files["empty"].write_bytes(b"")
    buffer = folder / "whole.jpg"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (256, 256, 3), dtype=np.uint8)).save(buffer)
    files["truncated"].write_bytes(buffer.read_bytes()[:2000])
    return files


# ------------------------------------------------------------------------------------------ upload guard
@pytest.mark.parametrize("kind,message", [
    ("text", "Not an image"),
    ("bomb", "Image too large"),
    ("empty", "Empty file"),
    ("truncated", "Unreadable"),
])
def test_open_upload_refuses_bad_files_with_a_message(bad_files, kind, message):
    with pytest.raises(UploadError, match=message):
        open_upload({"path": str(bad_files[kind]), "orig_name": bad_files[kind].name}, Limits())


def test_open_upload_size_limit_and_good_image(astronaut_jpeg):
    with pytest.raises(UploadError, match="File too large"):
        open_upload({"path": str(astronaut_jpeg)}, Limits(max_bytes=1000))
    with pytest.raises(UploadError, match="megapixels"):
        open_upload({"path": str(astronaut_jpeg)}, Limits(max_pixels=100_000))
    image = open_upload({"path": str(astronaut_jpeg)}, Limits())
    assert image.size == (512, 512) and image.mode == "RGB"


# ------------------------------------------------------------------------------------------ handler
@pytest.fixture(scope="module")
def demo_model(trained_run) -> DemoModel:
    from fer.inference import Predictor

    return DemoModel(Predictor.from_checkpoint(trained_run))


def test_analyse_finds_the_astronaut_and_reports_bad_uploads(demo_model, astronaut_jpeg, bad_files, tmp_path):
    annotated, label, chart, status = analyse(demo_model, Limits(), {"path": str(astronaut_jpeg)}, MODE_ALL, 30)
    assert "1 face" in status and annotated.size == (512, 512)
    assert set(label) == set(CLASSES) and sum(label.values()) == pytest.approx(1, abs=1e-4)
    assert len(chart.axes) >= 1

    for kind in ("text", "bomb"):
        outputs = analyse(demo_model, Limits(), {"path": str(bad_files[kind])}, MODE_ALL, 30)
        assert outputs[:3] == (None, None, None) and outputs[3].startswith("⚠")

    blank = tmp_path / "blank.png"
    Image.new("L", (200, 150), 128).save(blank)
    annotated, label, chart, status = analyse(demo_model, Limits(), {"path": str(blank)}, MODE_ALL, 30)
    assert "No face found" in status and label is None and chart is None and annotated is not None
    _, label, _, status = analyse(demo_model, Limits(), {"path": str(blank)}, MODE_NONE, 30)
    assert "1 face" in status and max(label, key=label.get) in CLASSES


# ------------------------------------------------------------------------------------------ model card
def test_model_card_reads_the_run(trained_run):
    from fer.checkpoint import resolve_checkpoint

    card = build_card(resolve_checkpoint(trained_run), trained_run, list(CLASSES), 48)
    assert any(name == "val/acc" for name, _ in card.metrics)
    assert [n for n, _ in card.metrics if n.startswith("val/recall/")] == [f"val/recall/{c}" for c in CLASSES]
    assert card.confusion is not None and "TensorBoard" in card.confusion_note
    assert "backbone" in card.config and "tf_efficientnet_lite0" in card.overview


def test_model_card_recomputes_a_missing_confusion_matrix(demo_model, copy_run):
    from fer.checkpoint import resolve_checkpoint

    run = copy_run()
    for events in run.rglob("events.out.tfevents.*"):
        events.unlink()
    card = build_card(resolve_checkpoint(run), run, demo_model.class_names, 48, demo_model.labels)
    assert card.confusion is not None and card.confusion_note.startswith("Recomputed"), card.confusion_note
    card = build_card(resolve_checkpoint(run), run, demo_model.class_names, 48, None)
    assert card.confusion is None and "No confusion matrix" in card.confusion_note


def test_recomputing_the_confusion_needs_a_validation_split_and_says_which_source_lacks_one(tmp_path):
    from omegaconf import OmegaConf

    from fer.demo_card import recompute_confusion
    from fer.errors import DataError

    (tmp_path / "train" / "happy").mkdir(parents=True)
    Image.new("L", (48, 48)).save(tmp_path / "train" / "happy" / "a.png")
    run_config = OmegaConf.create({"data": {"source": {"_target_": "fer.data.sources.FolderSource", "root": str(tmp_path)}}})
    with pytest.raises(DataError, match=r"data.source \(fer.data.sources.FolderSource\): .*no validation split"):
        recompute_confusion(lambda crops: ["happy"] * len(crops), run_config, list(CLASSES))


def test_tta_option_reaches_the_demo(trained_run, astronaut_jpeg, demo_model, capsys):
    from fer.inference import Predictor

    photo = {"path": str(astronaut_jpeg)}
    args = parse_args(["--checkpoint", str(trained_run), "--tta", "flip"])
    flip_model = DemoModel(build_predictor(args.checkpoint, args))
    assert flip_model.predictor.tta == "flip"
    _, flip_label, _, _ = analyse(flip_model, Limits(), photo, MODE_ALL, 30)
    _, single_label, _, _ = analyse(demo_model, Limits(), photo, MODE_ALL, 30)
    _, expected, _, _ = analyse(DemoModel(Predictor.from_checkpoint(trained_run, tta="flip")), Limits(), photo,
                                MODE_ALL, 30)
    assert flip_label == pytest.approx(expected, abs=1e-6)
    assert flip_label != pytest.approx(single_label, abs=1e-6)  # the mirror view changed the average

    with pytest.raises(SystemExit):
        parse_args(["--checkpoint", str(trained_run), "--tta", "sideways"])
    assert "invalid choice: 'sideways'" in capsys.readouterr().err


def test_detector_option_reaches_the_demo(trained_run, astronaut_jpeg, demo_model, capsys):
    from fer.faces import FaceDetector, load_image

    image = load_image(str(astronaut_jpeg))
    args = parse_args(["--checkpoint", str(trained_run), "--detector", "haar"])
    haar_model = DemoModel(build_predictor(args.checkpoint, args))
    # The page's per-request settings (mode, minimum face size) are applied around the chosen method.
    (haar_face,) = haar_model.faces(image, MODE_ALL, 30)
    (blaze_face,) = demo_model.faces(image, MODE_ALL, 30)
    assert haar_face.box == tuple(FaceDetector(method="haar")(image)[0])
    assert blaze_face.box == tuple(FaceDetector(method="blazeface")(image)[0])
    assert haar_face.box != blaze_face.box

    with pytest.raises(SystemExit):
        parse_args(["--checkpoint", str(trained_run), "--detector", "mtcnn"])
    assert "invalid choice: 'mtcnn'" in capsys.readouterr().err


def test_cli_bad_checkpoint_is_one_line(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "fer.demo", "--checkpoint", str(tmp_path / "missing.ckpt")],
                          capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert proc.returncode == 2
    assert "error:" in proc.stderr and "missing.ckpt" in proc.stderr and "Traceback" not in proc.stderr


# ------------------------------------------------------------------------------------------ in a browser
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def demo_server(trained_run, tmp_path):
    """`python -m fer.demo` on a free port, in an empty working directory, with a private TMPDIR."""
    workdir, tmp = tmp_path / "cwd", tmp_path / "tmp"
    workdir.mkdir()
    tmp.mkdir()
    port = _free_port()
    env = {**os.environ, "TMPDIR": str(tmp), "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
    log = (tmp_path / "server.log").open("w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "fer.demo", "--checkpoint", str(trained_run), "--port", str(port),
         "--max-upload-mb", "5"],
        cwd=workdir, env=env, stdout=log, stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}/"
    direct = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never via a proxy
    deadline = time.monotonic() + 120
    while True:
        if proc.poll() is not None:
            pytest.fail(f"fer-demo exited with {proc.returncode}:\n{(tmp_path / 'server.log').read_text()}")
        try:
            with direct.open(url, timeout=2) as response:
                if response.status == 200:
                    break
        except OSError:
            pass
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"fer-demo did not answer within 120 s:\n{(tmp_path / 'server.log').read_text()}")
        time.sleep(0.3)
    yield {"url": url, "port": port, "proc": proc, "workdir": workdir, "tmp": tmp,
           "log": tmp_path / "server.log"}
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    log.close()


@pytest.fixture
def sync_api():
    """Playwright's sync API, driving the system Chromium (never a downloaded browser build)."""
    if not CHROMIUM.is_file():
        pytest.skip(f"no Chromium at {CHROMIUM} (apt-get install chromium; or set FER_CHROMIUM)")
    return pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install playwright)")


def _launch_chromium(playwright):
    return playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)


# sync_api first: a missing browser skips before the server starts.
def test_demo_in_headless_chromium(sync_api, demo_server, astronaut_jpeg, bad_files):
    ARTIFACTS.mkdir(exist_ok=True)
    host = f"127.0.0.1:{demo_server['port']}"
    requests: list[str] = []

    with sync_api.sync_playwright() as p:
        browser = _launch_chromium(p)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.on("request", lambda r: requests.append(r.url))
            page.goto(demo_server["url"])
            status = page.locator("#status")
            upload = page.locator("#photo input[type=file]")

            def upload_and_wait(path: Path, expected: str) -> str:
                upload.set_input_files(str(path))
                sync_api.expect(status).to_contain_text(expected, timeout=30_000)
                return status.inner_text()

            # A photo: boxes on the photo, the top label, the chart.
            text = upload_and_wait(astronaut_jpeg, "astronaut.jpg")
            assert "1 face" in text, text
            top = page.locator("#top-label [data-testid=label-output-value]").inner_text().strip()
            assert top in CLASSES, top
            chart = page.locator("#probabilities [data-testid=matplotlib] img")
            sync_api.expect(chart).to_be_visible()
            assert chart.get_attribute("src").startswith("data:image/png")
            sync_api.expect(page.locator("#annotated img")).to_be_visible()
            page.screenshot(path=str(ARTIFACTS / "demo-predict.png"), full_page=True)
            # Uploads land in the demo's own temporary folder, nowhere else.
            temps = list(demo_server["tmp"].glob("fer-demo-*"))
            assert len(temps) == 1 and any(temps[0].joinpath("gradio").rglob("astronaut.jpg"))

            # The model card.
            page.get_by_role("tab", name="Model card").click()
            sync_api.expect(page.locator("#metrics")).to_contain_text("val/acc")
            sync_api.expect(page.locator("#confusion img")).to_be_visible()
            sync_api.expect(page.locator("#config")).to_contain_text("backbone")
            page.screenshot(path=str(ARTIFACTS / "demo-model-card.png"), full_page=True)
            page.get_by_role("tab", name="Predict").click()

            # Bad uploads: a message on the page, and the server keeps answering.
            text = upload_and_wait(bad_files["text"], "Not an image")
            assert "notes.png" in text
            page.screenshot(path=str(ARTIFACTS / "demo-not-an-image.png"), full_page=True)
            upload_and_wait(bad_files["bomb"], "Image too large")
            # Over --max-upload-mb: refused before uploading, with a message naming the file.
            big = bad_files["text"].with_name("huge.jpg")
            big.write_bytes(b"\xff" * (6 * 2**20))
            upload.set_input_files(str(big))
            sync_api.expect(page.get_by_text("huge.jpg", exact=False).last).to_be_visible(timeout=10_000)
            upload_and_wait(astronaut_jpeg, "1 face")
        finally:
            browser.close()

    assert demo_server["proc"].poll() is None, demo_server["log"].read_text()
    outside = [u for u in requests if u.split("/")[2] != host and not u.startswith(("data:", "blob:"))]
    assert not outside, f"the page fetched from outside the app: {outside[:5]}"
    assert "Traceback" not in demo_server["log"].read_text()

    # Stopping the app removes its temporary folder; nothing was written in its working directory.
    demo_server["proc"].send_signal(signal.SIGTERM)
    demo_server["proc"].wait(timeout=20)
    assert not list(demo_server["tmp"].glob("fer-demo-*"))
    assert not list(demo_server["workdir"].iterdir())
