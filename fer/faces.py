"""Loading photos and finding faces in them (BlazeFace by default, OpenCV's Haar cascade on request).

`load_image` is the one place a photo becomes pixels: EXIF orientation applied, every Pillow mode
(grayscale, RGB, RGBA, palette, CMYK, 16-bit) brought to 8-bit L or RGB, and Pillow's
decompression-bomb guard left in force. `FaceDetector` returns boxes in the original image's pixels;
`crop_face` cuts the square around one that the classifier sees.
"""

from __future__ import annotations

import math
import os
import threading
import warnings
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import NamedTuple, Union

import cv2
import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from fer.data.cache import _as_pil
from fer.errors import ConfigError, DataError

ImageInput = Union[str, os.PathLike, Image.Image, np.ndarray]
Box = tuple[int, int, int, int]  # x, y, w, h in pixels of the original (EXIF-rotated) image

HAAR_FRONTAL = "haarcascade_frontalface_default.xml"
DETECTORS = ("blazeface", "haar")
# Face crops are squares of side max(w, h) * (1 + 2 * margin) (crop_box). FER2013's training frames are a
# median 1.15-1.23x the side of BlazeFace's box around their face (IQR about 1.05-1.35; the face a half to a
# quarter of the photo), so 0.1 (1.2x) frames a photo's face as the training faces were framed.
DEFAULT_MARGIN = 0.1
MIN_MARGIN = -0.5  # the crop's side reaches 0
DETECTOR_HELP = ("blazeface (default, ~3.5 ms a photo) or haar (OpenCV's cascade: slower, finds smaller faces "
                 "in large group photos)")  # fer-predict's and fer-demo's --detector


class Detection(NamedTuple):
    """One face found: the box reported and drawn, and the geometry its crop is made from."""

    box: Box  # clipped to the image
    face: Box | None  # as detected, possibly past the image's edge; None: the whole image is the face


class ImageError(DataError):
    """A photo that cannot be read: missing, not an image, truncated, a decompression bomb."""


def _reason(exc: BaseException) -> str:
    if isinstance(exc, UnidentifiedImageError):
        return "not a recognised image file"
    if isinstance(exc, Image.DecompressionBombError):
        return (f"too many pixels, refused as a possible decompression bomb "
                f"(Pillow's limit is {2 * (Image.MAX_IMAGE_PIXELS or 0)} pixels)")
    if isinstance(exc, FileNotFoundError):
        return "no such file"
    if isinstance(exc, IsADirectoryError):
        return "a directory, not an image"
    text = (str(exc).strip().splitlines() or [""])[0]
    return text[:200] or type(exc).__name__


def _standard_mode(im: Image.Image) -> Image.Image:
    """Any Pillow mode -> 8-bit "L" or "RGB", as training decodes it (transparent pixels white)."""
    im = _as_pil(im)  # 16/32-bit and float -> L (rescaled, not clipped); palette resolved; alpha flattened
    if im.mode == "1":
        im = im.convert("L")
    elif im.mode not in ("L", "RGB"):
        im = im.convert("RGB")  # CMYK, YCbCr, LAB, HSV
    return im


def _from_array(a: np.ndarray) -> Image.Image:
    # Arrays are RGB(A) or grayscale, as skimage, PIL and matplotlib give them (OpenCV users: convert BGR first).
    if a.dtype != np.uint8:
        if np.issubdtype(a.dtype, np.floating) and a.size and np.nanmin(a) >= 0 and np.nanmax(a) <= 1:
            a = np.rint(np.nan_to_num(a) * 255).astype(np.uint8)
        elif a.dtype == np.uint16:
            a = (a.astype(np.float64) / 257.0).round().astype(np.uint8)
        else:
            raise DataError(f"expected a uint8 array (or float in [0, 1]), got {a.dtype}")
    return _as_pil(np.ascontiguousarray(a))


def load_image(image: ImageInput, name: str | None = None) -> Image.Image:
    """A path, PIL image or array -> an upright 8-bit "L" or "RGB" PIL image; ImageError naming it otherwise."""
    where = name or (str(image) if isinstance(image, (str, os.PathLike)) else "image")
    try:
        if isinstance(image, np.ndarray):
            im = _from_array(image)
        elif isinstance(image, Image.Image):
            im = ImageOps.exif_transpose(image)
        else:
            with warnings.catch_warnings():
                # Between 1x and 2x Pillow's pixel limit it only warns; above 2x it raises (kept in force).
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                with Image.open(Path(image)) as opened:
                    opened.load()  # decode now: truncated and corrupt files fail here, inside this try
                    im = ImageOps.exif_transpose(opened)
        return _standard_mode(im)
    except Exception as exc:  # noqa: BLE001 - Pillow raises many types for bad files; each is the file's fault
        raise ImageError(f"{where}: cannot read image ({_reason(exc)})") from exc


def load_pixels(image: ImageInput, name: str | None = None) -> np.ndarray:
    """Like `load_image`, as a uint8 (H, W) gray or (H, W, 3) RGB array; ImageError naming the input otherwise.

    A uint8 gray or RGB array is returned as it is (not copied): the photo pipeline then never goes
    through Pillow, whose image -> array conversion alone copies the whole photo.
    """
    if isinstance(image, np.ndarray) and image.dtype == np.uint8 and image.size and (
        image.ndim == 2 or (image.ndim == 3 and image.shape[2] == 3)
    ):
        return np.ascontiguousarray(image)
    return np.asarray(load_image(image, name))


@lru_cache(maxsize=4)
def _cascade_file(name: str) -> str:
    path = Path(cv2.data.haarcascades) / name
    if not path.is_file():
        raise DataError(f"Haar cascade {path} not found (opencv-python-headless<5 ships it)")
    return str(path)


@dataclass
class FaceDetector:
    """Face detection with the options `fer-predict` exposes.

    method="blazeface" (default): MediaPipe's full-range BlazeFace network, ~2-3 ms a photo on 2 CPU cores,
    robust to pose and lighting, finds faces down to ~1/10 of the photo's shorter side (wide photos tiled).
    method="haar": OpenCV's frontal Haar cascade, ~20x slower (56 ms), scans at full resolution, so it also
    finds the small faces of large group photos (images larger than `max_side` are downscaled first).
    detect=False treats the whole image as one pre-cropped face.
    """

    detect: bool = True
    all_faces: bool = True
    min_face_size: int = 30
    method: str = "blazeface"
    min_score: float = 0.5          # BlazeFace confidence threshold
    engine: str = "auto"            # BlazeFace only: auto (LiteRT if installed, else ONNX Runtime) | litert | onnx
    max_side: int = 1280            # Haar only
    scale_factor: float = 1.1       # Haar only
    min_neighbors: int = 5          # Haar only
    cascade: str = HAAR_FRONTAL     # Haar only

    def __post_init__(self) -> None:
        if self.method not in DETECTORS:
            raise ConfigError(f"unknown face detector {self.method!r}; choose one of {', '.join(DETECTORS)}")
        self._local = threading.local()  # a CascadeClassifier must not be shared between threads
        self._blazeface = None

    def _classifier(self) -> cv2.CascadeClassifier:
        clf = getattr(self._local, "clf", None)
        if clf is None:
            clf = cv2.CascadeClassifier(_cascade_file(self.cascade))
            if clf.empty():
                raise DataError(f"Haar cascade {self.cascade} could not be loaded")
            self._local.clf = clf
        return clf

    def __call__(self, image: Image.Image | np.ndarray) -> list[Box]:
        """Face boxes of an 8-bit L/RGB image (PIL, or a `load_pixels` array), clipped to it, largest first
        (only the largest unless all_faces)."""
        return [found.box for found in self.find(image)]

    def find(self, image: Image.Image | np.ndarray) -> list[Detection]:
        """Like calling the detector, each box with its unclipped geometry (what `crop_face` crops)."""
        height, width = image.shape[:2] if isinstance(image, np.ndarray) else image.size[::-1]
        if not self.detect:
            return [Detection((0, 0, width, height), None)]
        pixels = image if isinstance(image, np.ndarray) else np.asarray(image)  # PIL: one copy, only to detect
        found = self._blazeface_boxes(pixels) if self.method == "blazeface" else self._haar_boxes(pixels)
        detections = []
        for x0, y0, x1, y1 in found:
            x0, y0, x1, y1 = round(x0), round(y0), round(x1), round(y1)
            left, top, right, bottom = max(0, x0), max(0, y0), min(width, x1), min(height, y1)
            if right - left >= self.min_face_size and bottom - top >= self.min_face_size:
                detections.append(Detection((left, top, right - left, bottom - top), (x0, y0, x1 - x0, y1 - y0)))
        detections.sort(key=lambda d: d.box[2] * d.box[3], reverse=True)
        return detections if self.all_faces else detections[:1]

    def _blazeface_boxes(self, pixels: np.ndarray) -> list[tuple[float, float, float, float]]:
        if self._blazeface is None:
            from fer.detectors.blazeface import BlazeFace  # loads onnxruntime only when first used

            self._blazeface = BlazeFace(score_threshold=self.min_score, engine=self.engine)
        rgb = pixels if pixels.ndim == 3 else cv2.cvtColor(pixels, cv2.COLOR_GRAY2RGB)
        return [tuple(box) for box, _ in self._blazeface(rgb)]

    def _haar_boxes(self, pixels: np.ndarray) -> list[tuple[float, float, float, float]]:
        height, width = pixels.shape[:2]
        # Pillow's luma (not OpenCV's, which rounds differently): the boxes stay those of a PIL input.
        gray = pixels if pixels.ndim == 2 else np.asarray(Image.fromarray(pixels).convert("L"))
        scale = min(1.0, self.max_side / max(width, height))
        if scale < 1.0:
            gray = cv2.resize(gray, (max(1, round(width * scale)), max(1, round(height * scale))),
                              interpolation=cv2.INTER_AREA)
        min_size = max(1, round(self.min_face_size * scale))
        found = self._classifier().detectMultiScale(
            cv2.equalizeHist(gray), scaleFactor=self.scale_factor, minNeighbors=self.min_neighbors,
            minSize=(min_size, min_size),
        )
        return [(x / scale, y / scale, (x + w) / scale, (y + h) / scale)
                for x, y, w, h in (found if len(found) else [])]


def check_margin(margin: float, key: str = "margin") -> float:
    """`margin` as a float; a ConfigError naming `key` when the crop it makes would be empty."""
    if not (math.isfinite(margin) and margin > MIN_MARGIN):
        raise ConfigError(f"{key}={margin}: expected a number above {MIN_MARGIN} (a face crop is a square "
                          f"1 + 2 * margin times the box's longer side: empty at {MIN_MARGIN})")
    return float(margin)


def crop_box(face: Box, margin: float) -> tuple[int, int, int, int]:
    """The (left, top, right, bottom) square crop around a face box: side max(w, h) * (1 + 2 * margin) about
    its centre, possibly past the image's edge. Square, so resizing never stretches the face; detector boxes
    are tight (brows to chin), and training faces (FER2013) show a little more."""
    x, y, w, h = face
    side = max(1, round(max(w, h) * (1 + 2 * check_margin(margin))))
    left, top = round(x + (w - side) / 2), round(y + (h - side) / 2)
    return left, top, left + side, top + side


def crop_face(image: np.ndarray, face: Box, margin: float) -> np.ndarray:
    """The `crop_box` square of a (H, W[, C]) array; what falls outside the image repeats its edge pixels
    (as np.pad mode="edge"), so a face at or cut by the photo's edge keeps its shape."""
    left, top, right, bottom = crop_box(face, margin)
    height, width = image.shape[:2]
    if left >= 0 and top >= 0 and right <= width and bottom <= height:
        return image[top:bottom, left:right]  # a view: the common case copies nothing
    rows = np.clip(np.arange(top, bottom), 0, height - 1)
    cols = np.clip(np.arange(left, right), 0, width - 1)
    return image[rows[:, None], cols]
