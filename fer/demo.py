"""Browser demo: a local Gradio app that finds the faces in a photo and shows their expressions.

    fer-demo --checkpoint logs/train/runs/<run>          # a run directory (its best checkpoint) or a .ckpt
    fer-demo --checkpoint best.ckpt --host 0.0.0.0 --port 8080

Tab "Predict": upload a photo (or take one with the webcam, or paste one), pick the face-detector settings,
and get the photo with a box and label on every face, the probabilities of the largest face, and a bar
chart of the seven probabilities per face. Tab "Model card": the run the checkpoint came from, its config,
its validation metrics and its confusion matrix.

Privacy and safety: the app listens on 127.0.0.1 unless told otherwise, never makes a share link, sends no
analytics (GRADIO_ANALYTICS_ENABLED=False), and keeps every upload in a fresh temporary folder
(GRADIO_TEMP_DIR) that is deleted when the app stops. Uploads are size-limited, checked for decompression
bombs before decoding, and a bad upload only puts a message on the page.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import logging
import math
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont, UnidentifiedImageError

from fer.errors import FERError

log = logging.getLogger("fer.demo")

MODE_ALL = "All faces"
MODE_LARGEST = "Largest face"
MODE_NONE = "No detection (the photo is one face)"
MODES = (MODE_ALL, MODE_LARGEST, MODE_NONE)
DEFAULT_MIN_FACE = 30  # pixels; fer.faces.FaceDetector's default

# Formats a browser upload may be in; everything else Pillow could open (EPS, PSD, ICNS, ...) is refused.
FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "GIF", "TIFF", "MPO")
DISPLAY_SIDE = 1280  # the annotated photo is scaled down to this longest side
CHART_FACES = 8  # faces shown in the bar chart (all are boxed on the photo)
# Tableau-like colours, distinct on photos; face i gets colour i on the photo and in the chart.
COLOURS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#17becf")

UPLOAD_HINT = "Upload a photo: JPEG, PNG, WebP, BMP, GIF or TIFF."


class UploadError(Exception):
    """A problem with what the user uploaded; its message (Markdown) is shown on the page."""


@dataclass(frozen=True)
class Limits:
    max_bytes: int = 20 * 1024 * 1024
    max_pixels: int = 40_000_000


# ------------------------------------------------------------------------------------------ uploads
def _name_of(payload: dict[str, Any]) -> str:
    name = payload.get("orig_name") or Path(str(payload.get("path") or "upload")).name
    return str(name).replace("`", "'")[:120]


def _file_of(payload: dict[str, Any], limits: Limits) -> Path:
    """The file Gradio stored the upload in (inside its temp folder; Gradio checks that), size-checked.

    Uploads, webcam shots and pasted images all reach the server as such a file.
    """
    if not payload.get("path"):
        raise UploadError(f"**Nothing to read**: the upload has no file. {UPLOAD_HINT}")
    path = Path(payload["path"])
    size = path.stat().st_size
    if size > limits.max_bytes:
        raise UploadError(f"**File too large**: {size / 2**20:.1f} MB; the limit is {limits.max_bytes / 2**20:.0f} MB.")
    if size == 0:
        raise UploadError(f"**Empty file**: nothing to read. {UPLOAD_HINT}")
    return path


def open_upload(payload: dict[str, Any], limits: Limits) -> Image.Image:
    """An uploaded file -> an upright 8-bit L/RGB image, or UploadError saying what is wrong with it.

    The header is read first: a format outside FORMATS, or more pixels than `limits.max_pixels`
    (a decompression bomb is a small file that claims a huge image), is refused before any decoding.
    """
    from fer.faces import ImageError, load_image

    name = _name_of(payload)
    path = _file_of(payload, limits)
    Image.init()
    formats = [f for f in FORMATS if f in Image.OPEN]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path, formats=formats) as header:
                width, height = header.size
                fmt = header.format
    except (UnidentifiedImageError, SyntaxError, ValueError, TypeError) as exc:
        raise UploadError(f"**Not an image**: `{name}` could not be read as a picture. {UPLOAD_HINT}") from exc
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as exc:
        raise UploadError(f"**Image too large**: `{name}` claims too many pixels for this demo "
                          f"(decompression-bomb guard).") from exc
    except OSError as exc:
        raise UploadError(f"**Unreadable file**: `{name}` is damaged or truncated.") from exc
    if width * height > limits.max_pixels:
        raise UploadError(
            f"**Image too large**: `{name}` is {width}×{height} = {width * height / 1e6:.0f} megapixels; "
            f"the limit is {limits.max_pixels / 1e6:.0f} megapixels (decompression-bomb guard)."
        )
    try:
        return load_image(path, name)  # EXIF orientation, every Pillow mode -> L or RGB
    except ImageError as exc:
        raise UploadError(f"**Unreadable {fmt} file**: `{name}` is damaged or truncated.") from exc


# ------------------------------------------------------------------------------------------ pictures
def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def annotate(image: Image.Image, faces: list[Any]) -> Image.Image:
    """The photo (scaled to DISPLAY_SIDE at most) with a numbered, labelled box on every face."""
    scale = min(1.0, DISPLAY_SIDE / max(image.size))
    canvas = image.convert("RGB")
    if scale < 1.0:
        canvas = canvas.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))),
                               Image.Resampling.LANCZOS)
    draw = ImageDraw.Draw(canvas)
    side = max(canvas.size)
    width = max(2, round(side / 320))
    font = _font(max(12, round(side / 32)))
    for i, face in enumerate(faces):
        colour = COLOURS[i % len(COLOURS)]
        x, y, w, h = (round(v * scale) for v in face.box)
        draw.rectangle((x, y, x + w - 1, y + h - 1), outline=colour, width=width)
        text = f"{i + 1} {face.label} {face.score:.0%}"
        left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
        tw, th = right - left, bottom - top
        pad = max(2, th // 4)
        ty = y - th - 2 * pad if y - th - 2 * pad >= 0 else y + width  # above the box, else inside it
        tx = min(max(0, x), max(0, canvas.width - tw - 2 * pad))
        draw.rectangle((tx, ty, tx + tw + 2 * pad, ty + th + 2 * pad), fill=colour)
        draw.text((tx + pad - left, ty + pad - top), text, fill="white", font=font)
    return canvas


def probability_figure(faces: list[Any]):
    """One horizontal bar chart of the seven probabilities per face (the first CHART_FACES faces)."""
    from matplotlib.figure import Figure  # not pyplot: figures made here are never registered or leaked

    shown = faces[:CHART_FACES]
    cols = 1 if len(shown) == 1 else 2
    rows = math.ceil(len(shown) / cols)
    classes = list(shown[0].probabilities)
    fig = Figure(figsize=(4.4 * cols, 0.32 * len(classes) * rows + 0.6 * rows + 0.2), dpi=100,
                 layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for i, (ax, face) in enumerate(zip(axes, shown)):
        colour = COLOURS[i % len(COLOURS)]
        values = [face.probabilities[c] for c in classes]
        bars = ax.barh(range(len(classes)), values, color=[colour if c == face.label else "#b8b8b8" for c in classes])
        ax.set_yticks(range(len(classes)), classes)
        ax.invert_yaxis()
        ax.set_xlim(0, 1.15)
        ax.set_xticks([0, 0.5, 1.0], ["0", "50%", "100%"])
        ax.bar_label(bars, [f"{v:.0%}" for v in values], padding=2, fontsize=8)
        ax.set_title(f"face {i + 1}: {face.label} ({face.score:.0%})", color=colour, fontsize=10, loc="left")
        for spine in ("top", "right"):
            ax.spines[spine].set_visible(False)
    for ax in axes[len(shown):]:
        ax.set_visible(False)
    return fig


# ------------------------------------------------------------------------------------------ the model
class DemoModel:
    """The Predictor with per-request face-detector settings (Predictor.detector is a fer.faces.FaceDetector)."""

    def __init__(self, predictor: Any) -> None:
        self.predictor = predictor
        self._detectors: dict[tuple[bool, bool, int], Any] = {}
        self._lock = threading.Lock()

    @property
    def class_names(self) -> list[str]:
        return list(self.predictor.class_names)

    def _with_detector(self, detect: bool, all_faces: bool, min_face_size: int) -> Any:
        key = (detect, all_faces, int(min_face_size))
        with self._lock:
            if key not in self._detectors:
                detector = dataclasses.replace(self.predictor.detector, detect=detect, all_faces=all_faces,
                                               min_face_size=int(min_face_size))
                predictor = copy.copy(self.predictor)  # shares the network; only the detector differs
                predictor.detector = detector
                self._detectors[key] = predictor
            return self._detectors[key]

    def faces(self, image: Image.Image, mode: str, min_face_size: int) -> list[Any]:
        """The faces of `image`, largest first, for a MODES setting."""
        detect, all_faces = mode != MODE_NONE, mode != MODE_LARGEST
        result = self._with_detector(detect, all_faces, min_face_size).predict(image)
        return sorted(result.faces, key=lambda f: f.box[2] * f.box[3], reverse=True)

    def labels(self, crops: list[np.ndarray]) -> list[str]:
        """Top labels of pre-cropped faces (the model card's recomputed confusion matrix)."""
        predictor = self._with_detector(False, True, DEFAULT_MIN_FACE)
        return [r.faces[0].label for r in predictor.predict(list(crops))]


# ------------------------------------------------------------------------------------------ handlers
def _bounded_min_face(value: Any) -> int:
    try:
        return int(min(1000, max(1, float(value))))
    except (TypeError, ValueError):
        return DEFAULT_MIN_FACE


def analyse(model: DemoModel, limits: Limits, payload: Any, mode: Any, min_face_size: Any):
    """(annotated photo, top-face label dict, bar chart, status Markdown) for one upload; never raises."""
    if not payload:
        return None, None, None, "Upload a photo, take one with the webcam, or pick an example below."
    if not isinstance(payload, dict):  # Gradio hands the raw file payload (preprocess=False)
        payload = payload.model_dump() if hasattr(payload, "model_dump") else {"path": str(payload)}
    mode = mode if mode in MODES else MODE_ALL
    name = _name_of(payload)
    started = time.perf_counter()
    try:
        image = open_upload(payload, limits)
        faces = model.faces(image, mode, _bounded_min_face(min_face_size))
    except UploadError as exc:
        return None, None, None, f"⚠ {exc}"
    except FERError as exc:
        return None, None, None, f"⚠ **Could not analyse** `{name}`: {exc}"
    except Exception as exc:  # noqa: BLE001 - the page gets one line, the server log the traceback
        log.exception("analysing %s failed", name)
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        return None, None, None, (f"⚠ **Something went wrong** analysing `{name}` ({type(exc).__name__}: "
                                  f"{first}). The app is still running: try another photo.")
    seconds = time.perf_counter() - started
    size = f"{image.width}×{image.height}"
    if not faces:
        hint = ("choose *Largest face* or a smaller minimum face size" if mode == MODE_ALL
                else "lower the minimum face size")
        return annotate(image, []), None, None, (
            f"⚠ **No face found** in `{name}` ({size}). Faces should be frontal and at least "
            f"{_bounded_min_face(min_face_size)} px wide: {hint}, or pick *{MODE_NONE}* if the photo is "
            f"already a cropped face.")
    top = faces[0]
    label = {cls: float(p) for cls, p in top.probabilities.items()}
    many = f"{len(faces)} faces" if len(faces) > 1 else "1 face"
    more = f" (the chart shows the first {CHART_FACES})" if len(faces) > CHART_FACES else ""
    status = (f"**{many}** in `{name}` ({size}, {seconds:.2f} s){more}. "
              f"{'Largest face' if len(faces) > 1 else 'Face'}: **{top.label}** ({top.score:.0%}).")
    return annotate(image, faces), label, probability_figure(faces), status


# ------------------------------------------------------------------------------------------ examples
def write_examples(folder: Path) -> list[tuple[list[Any], str]]:
    """Example photos made on the spot (nothing downloaded): ([path, mode, min size], caption) each."""
    from fer.data.synthetic import draw_face
    from fer.labels import CLASSES

    folder.mkdir(parents=True, exist_ok=True)
    examples: list[tuple[list[Any], str]] = []
    try:
        from skimage import data as skdata
    except ImportError:  # scikit-image is in the demo extra; without it only the synthetic faces remain
        skdata = None
    if skdata is not None:
        path = folder / "astronaut.png"
        Image.fromarray(skdata.astronaut()).save(path)
        examples.append(([str(path), MODE_ALL, DEFAULT_MIN_FACE], "astronaut (scikit-image)"))
    faces = [draw_face(CLASSES.index(name), seed=7 + i, image_size=160, noise=0.3)
             for i, name in enumerate(("happy", "surprise", "sad"))]
    path = folder / "synthetic-happy.png"
    Image.fromarray(faces[0]).save(path)
    examples.append(([str(path), MODE_NONE, DEFAULT_MIN_FACE], "synthetic face, no detection"))
    path = folder / "synthetic-three.png"
    Image.fromarray(np.concatenate(faces, axis=1)).save(path)
    examples.append(([str(path), MODE_ALL, DEFAULT_MIN_FACE], "three synthetic faces"))
    if skdata is not None:
        path = folder / "cat.png"
        Image.fromarray(skdata.chelsea()).save(path)
        examples.append(([str(path), MODE_ALL, DEFAULT_MIN_FACE], "a cat (no human face)"))
    return examples


# ------------------------------------------------------------------------------------------ the app
CSS = """
#status { min-height: 2.5em; }
"""


def build_app(model: DemoModel, card: Any, examples: list[tuple[list[Any], str]], limits: Limits, title: str):
    """The Gradio Blocks of the demo (imported here: Gradio reads its environment at import time)."""
    import gradio as gr
    import pandas as pd

    def run(payload, mode, min_face_size):
        return analyse(model, limits, payload, mode, min_face_size)

    with gr.Blocks(title="fer demo", analytics_enabled=False) as app:
        gr.Markdown(f"# fer: facial expression recognition\n{title}")
        with gr.Tabs():
            with gr.Tab("Predict", id="predict"):
                with gr.Row():
                    with gr.Column(scale=1):
                        photo = gr.Image(
                            label="Photo", sources=["upload", "webcam", "clipboard"], type="filepath",
                            image_mode=None, elem_id="photo", height=360,
                            placeholder=f"Drop a photo here (up to {limits.max_bytes / 2**20:.0f} MB)",
                        )
                        mode = gr.Radio(list(MODES), value=MODE_ALL, label="Faces", elem_id="mode")
                        min_face = gr.Slider(10, 400, value=DEFAULT_MIN_FACE, step=5, elem_id="min-face",
                                             label="Minimum face size (pixels)")
                        button = gr.Button("Analyse", variant="primary", elem_id="analyse")
                        gr.Examples(
                            examples=[e for e, _ in examples], example_labels=[c for _, c in examples],
                            inputs=[photo, mode, min_face], cache_examples=False, label="Examples",
                        )
                    with gr.Column(scale=1):
                        status = gr.Markdown("Upload a photo, take one with the webcam, or pick an example.",
                                             elem_id="status")
                        annotated = gr.Image(label="Faces", interactive=False, elem_id="annotated", format="png",
                                             height=360)
                        top = gr.Label(label="Largest face", num_top_classes=3, elem_id="top-label")
                        chart = gr.Plot(label="Probabilities per face", elem_id="probabilities", format="png")
            with gr.Tab("Model card", id="card"):
                gr.Markdown(card.overview, elem_id="card-overview")
                with gr.Row():
                    with gr.Column(scale=1):
                        gr.Markdown("### Validation metrics\n" + card.metrics_note)
                        gr.Dataframe(
                            value=pd.DataFrame(card.metrics, columns=["metric", "value"]),
                            headers=["metric", "value"], interactive=False, elem_id="metrics",
                            max_height=600,
                        )
                    with gr.Column(scale=1):
                        gr.Markdown("### Confusion matrix\n" + card.confusion_note)
                        if card.confusion is not None:
                            gr.Image(card.confusion, label="Confusion matrix (rows: true class)",
                                     interactive=False, elem_id="confusion", format="png")
                gr.Markdown("### Config\nThe run's `.hydra/config.yaml`, as composed for training.")
                gr.Code(card.config, language="yaml", interactive=False, elem_id="config", label="config.yaml",
                        max_lines=40)

        outputs = [annotated, top, chart, status]
        common = dict(fn=run, inputs=[photo, mode, min_face], outputs=outputs, preprocess=False,
                      concurrency_id="predict", concurrency_limit=1, show_progress="minimal")
        photo.change(trigger_mode="always_last", **common)  # upload, webcam, paste, example, clear
        button.click(**common)
        mode.change(trigger_mode="always_last", **common)
        min_face.release(trigger_mode="always_last", **common)
    return app


# ------------------------------------------------------------------------------------------ startup
def configure_environment(temp: Path) -> None:
    """Gradio settings that must be in place before it is imported: no analytics, every file under `temp`."""
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
    os.environ["GRADIO_TEMP_DIR"] = str(temp / "gradio")
    os.environ["GRADIO_EXAMPLES_CACHE"] = str(temp / "examples-cache")
    os.environ["GRADIO_CACHE_EXAMPLES"] = "false"
    os.environ["GRADIO_SHARE"] = "False"
    os.environ["GRADIO_RUN_HISTORY"] = "False"
    for var in ("NO_PROXY", "no_proxy"):  # Gradio calls its own server at start-up: never through a proxy
        os.environ[var] = ",".join(filter(None, [os.environ.get(var), "127.0.0.1", "localhost"]))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    (temp / "gradio").mkdir(parents=True, exist_ok=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from fer.faces import DETECTOR_HELP, DETECTORS, FaceDetector
    from fer.tta import MODES as TTA_MODES

    parser = argparse.ArgumentParser(
        prog="fer-demo", description="Serve a local browser demo of a fer checkpoint (Gradio).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--checkpoint", "-c", required=True,
                        help="a .ckpt file, or a training run directory (its best checkpoint)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: the whole network)")
    parser.add_argument("--port", type=int, default=7860, help="port to listen on")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    parser.add_argument("--max-upload-mb", type=float, default=20.0, help="largest upload accepted, in MB")
    parser.add_argument("--max-megapixels", type=float, default=40.0,
                        help="largest image accepted, in megapixels (decompression-bomb guard)")
    parser.add_argument("--no-recompute", action="store_true",
                        help="do not recompute the confusion matrix when the run logged none")
    parser.add_argument("--detector", choices=DETECTORS, default=FaceDetector.method, help=DETECTOR_HELP)
    parser.add_argument("--tta", choices=TTA_MODES, default="none",
                        help="average each face's probabilities over test-time views, as fer-eval tta=... "
                             "(shift_rotate: the FER2013 recipe's; costs 14 forward views per face)")
    return parser.parse_args(argv)


def build_predictor(checkpoint: str | Path, args: argparse.Namespace) -> Any:
    """The demo's Predictor: `checkpoint` as the caller resolved it (the file its model card describes)."""
    from fer.faces import FaceDetector
    from fer.inference import Predictor, resolve_device

    # The page's detector settings vary per request around this one (DemoModel); the method stays.
    # Faces are cropped with the Predictor's default margin (fer.faces.DEFAULT_MARGIN, FER2013's framing).
    return Predictor.from_checkpoint(checkpoint, device=resolve_device(args.device, "--device"), tta=args.tta,
                                     detector=FaceDetector(method=args.detector))


def _raise_interrupt(signum, frame) -> None:  # noqa: ARG001 - signal handler signature
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second TERM must not cut the clean-up short
    raise KeyboardInterrupt


def serve(args: argparse.Namespace, temp: Path) -> None:
    from fer.checkpoint import resolve_checkpoint, run_dir_of
    from fer.demo_card import build_card

    limits = Limits(max_bytes=int(args.max_upload_mb * 2**20), max_pixels=int(args.max_megapixels * 1e6))
    checkpoint = resolve_checkpoint(args.checkpoint)
    run_dir = run_dir_of(checkpoint)
    predictor = build_predictor(checkpoint, args)
    model = DemoModel(predictor)
    card = build_card(checkpoint, run_dir, model.class_names, predictor.image_size,
                      None if args.no_recompute else model.labels)
    examples = write_examples(temp / "examples")
    best = card.facts.get("best_val_acc")
    title = (f"Model `{card.facts.get('backbone') or 'fer'}` from `{run_dir or checkpoint}`"
             + ("" if best is None else f", validation accuracy {100 * best:.1f} %")
             + ("" if predictor.tta == "none" else f", test-time augmentation `{predictor.tta}`")
             + ". Everything runs on this machine; uploads stay in a temporary folder deleted when the app stops.")
    app = build_app(model, card, examples, limits, title)
    app.queue(default_concurrency_limit=1, max_size=32)
    app.launch(
        server_name=args.host, server_port=args.port, share=False, inbrowser=False, quiet=True,
        show_error=False, max_file_size=limits.max_bytes, allowed_paths=[str(temp / "examples")],
        footer_links=[], run_history=False, enable_monitoring=False, mcp_server=False, ssr_mode=False,
        pwa=False, css=CSS, prevent_thread_lock=True,
    )
    print(f"fer demo: {app.local_url} (Ctrl-C to stop)", flush=True)
    app.block_thread()


def main(argv: list[str] | None = None) -> None:
    from fer.utils import err_console

    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("httpx", "httpcore", "uvicorn.access", "tensorboard"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    temp = Path(tempfile.mkdtemp(prefix="fer-demo-"))
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)  # `kill` cleans up like Ctrl-C
    try:
        configure_environment(temp)
        Image.MAX_IMAGE_PIXELS = max(int(args.max_megapixels * 1e6), 1)
        serve(args, temp)
    except FERError as error:
        err_console.print(f"[bold red]error:[/] {error}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except OSError as error:  # Gradio's "Cannot find empty port" and address errors
        if "port" not in str(error).lower() and "address" not in str(error).lower():
            raise
        reason = error.strerror or "in use, or not an address of this machine"
        err_console.print(f"[bold red]error:[/] cannot listen on {args.host}:{args.port} ({reason}); "
                          f"pass another --port or --host", highlight=False, soft_wrap=True)
        sys.exit(2)
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGTERM, previous)
        shutil.rmtree(temp, ignore_errors=True)


if __name__ == "__main__":
    main()
