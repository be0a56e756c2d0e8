"""The Python API: photos in, faces with expression probabilities out.

    from fer.inference import Predictor
    predictor = Predictor.from_checkpoint("logs/train/runs/<run>")      # a run directory or a .ckpt
    result = predictor.predict("photo.jpg")                                # or PIL images / arrays, or a list
    for face in result.faces:
        print(face.box, face.label, face.score, face.probabilities)

Face crops are made in one place (`Predictor.preprocess`), and the network is called in one method
(`Predictor._forward`: float32 NCHW in [0, 1] -> probabilities), so another backend (ONNX Runtime, LiteRT)
only has to replace `_forward`. On a CPU the network runs exported by default (LiteRT where ai-edge-litert
is installed, else ONNX Runtime; exported and checked against PyTorch when the Predictor is made); on a
GPU in PyTorch.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable, Sequence

import numpy as np
import torch

from fer.checkpoint import LoadedCheckpoint, load_checkpoint, load_classifier
from fer.data.cache import decode
from fer.errors import CheckpointError, ConfigError, DataError
from fer.faces import (
    DEFAULT_MARGIN,
    Box,
    Detection,
    FaceDetector,
    ImageError,
    ImageInput,
    check_margin,
    crop_face,
    load_pixels,
)
from fer.tta import check_mode, images_per_pass, per_view
from fer.utils import one_line

__all__ = ["Face", "ImageResult", "Predictor", "load_classifier", "load_checkpoint", "softmax"]


@dataclass
class Face:
    box: Box  # x, y, w, h in pixels of the (EXIF-rotated) original image
    probabilities: dict[str, float]  # every class -> probability; they sum to 1
    label: str  # the most probable class
    score: float  # its probability
    detected: bool = True  # False: no face was found and the whole image was classified (fallback)


@dataclass
class ImageResult:
    source: str  # the path, or "image[3]" for in-memory inputs
    width: int = 0
    height: int = 0
    faces: list[Face] = field(default_factory=list)
    error: str | None = None  # one line, when the image could not be read (errors="record")

    @property
    def ok(self) -> bool:
        return self.error is None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Row-wise softmax of logits / temperature (shared by every backend, so calibration applies to all)."""
    z = logits.astype(np.float64) / temperature
    z -= z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return (e / e.sum(axis=1, keepdims=True)).astype(np.float32)


log = logging.getLogger(__name__)
BACKENDS = ("auto", "torch", "onnx", "litert")
EXPORT_FORMATS = {"onnx": "onnx", "litert": "tflite"}  # backend -> the fer-export format it runs
RUNTIME_NAMES = {"onnx": "ONNX Runtime", "litert": "LiteRT"}


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_device(device: str | None, key: str = "device") -> str:
    """`device`, or the default for None / "auto"; a ConfigError naming `key` for one this machine lacks."""
    if device in (None, "auto"):
        return default_device()
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError):
        raise ConfigError(f"{key}={device}: not a device; expected cpu, cuda, cuda:1 ... or auto") from None
    if parsed.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"{key}={device}: CUDA is not available on this machine; use cpu (or auto)")
    if parsed.type == "cuda" and (parsed.index or 0) >= torch.cuda.device_count():
        raise ConfigError(f"{key}={device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return str(device)


def default_batch_size(device: str) -> int:
    # Face crops are small (48-64 px): a GPU takes hundreds at once; on a CPU larger batches gain nothing.
    return 256 if str(device).startswith("cuda") else 32


class Predictor:
    """Detects faces, crops them as the model was trained, and classifies all crops in batches."""

    def __init__(
        self,
        model: torch.nn.Module | None,
        class_names: Sequence[str],
        image_size: int,
        channels: int,
        detector: FaceDetector | None = None,
        device: str | None = None,
        batch_size: int | None = None,
        margin: float = DEFAULT_MARGIN,
        fallback: str = "none",
        temperature: float = 1.0,
        backend: str = "auto",
        exported_model: str | os.PathLike | None = None,
        onnx_model: str | os.PathLike | None = None,
        tta: str = "none",
    ) -> None:
        check_mode(tta)
        if fallback not in ("none", "full-image"):
            raise ConfigError(f"fallback={fallback!r}: expected 'none' or 'full-image'")
        if backend not in BACKENDS:
            raise ConfigError(f"backend={backend!r}: expected one of {', '.join(BACKENDS)}")
        self.device = resolve_device(device)
        self.model = model.to(self.device).eval() if model is not None else None
        self.class_names = list(class_names)
        self.image_size = int(image_size)
        self.channels = int(channels)
        self.detector = detector or FaceDetector()
        self.batch_size = int(batch_size or default_batch_size(self.device))
        self.margin = check_margin(margin)
        self.fallback = fallback
        self.temperature = float(temperature)
        self.tta = tta  # fer.tta views of every crop, their probabilities averaged (as fer-eval tta=...)
        self.backend, self._runtime = self._choose_backend(backend, exported_model or onnx_model)

    @classmethod
    def from_checkpoint(
        cls,
        path: str | os.PathLike,
        device: str | None = None,
        batch_size: int | None = None,
        detector: FaceDetector | None = None,
        image_size: int | None = None,
        calibrated: bool = True,
        **kwargs: Any,
    ) -> "Predictor":
        """A Predictor for a checkpoint file or a run directory (its best checkpoint).

        The input size comes from the checkpoint (or its run's config) unless given; `calibrated` applies
        the temperature that `fer-eval calibrate=true` stored in the checkpoint, if any.
        """
        loaded: LoadedCheckpoint = load_checkpoint(path, map_location="cpu")
        size = image_size or loaded.image_size
        if not size:
            raise CheckpointError(
                f"{loaded.path}: the training image size is not recorded (no run config beside it); pass image_size"
            )
        return cls(
            loaded.model, loaded.class_names, size, loaded.channels, detector=detector, device=device,
            batch_size=batch_size, temperature=loaded.temperature if calibrated else 1.0, **kwargs,
        )

    # -- the backend ------------------------------------------------------------------------------
    def _forward(self, batch: np.ndarray) -> np.ndarray:
        """float32 (N, C, H, W) in [0, 1] -> probabilities (N, classes). The only place the network runs."""
        if self._runtime is not None:  # exported: normalisation, temperature and softmax are inside
            return self._runtime(np.ascontiguousarray(batch, dtype=np.float32))
        with torch.inference_mode():
            logits = self.model(torch.from_numpy(batch).to(self.device)).float().cpu().numpy()
        return softmax(logits, self.temperature)

    def _choose_backend(self, backend: str, exported: str | os.PathLike | None):
        """auto: on a CPU LiteRT where ai-edge-litert is installed, else ONNX Runtime (both several times
        faster per face than eager PyTorch at batch 1: bench/inference.py); PyTorch on a GPU. An exported
        file picks its own runtime from its suffix. If the model cannot be exported for one runtime, auto
        warns and tries the next, then eager PyTorch."""
        if exported is not None and backend == "auto":
            backend = "litert" if str(exported).lower().endswith(".tflite") else "onnx"
        if backend == "torch" or (backend == "auto" and not str(self.device).startswith("cpu")):
            return "torch", None
        if backend == "auto":
            from fer.litert import litert_available

            candidates = ["litert", "onnx"] if litert_available() else ["onnx"]
        else:
            candidates = [backend]
        for candidate in candidates:
            try:
                return candidate, self._open_exported(candidate, exported)
            except Exception as error:  # noqa: BLE001 - any export failure: the next runtime, then PyTorch
                if backend != "auto" or self.model is None:
                    raise
                log.warning("%s unavailable for this model: %s", RUNTIME_NAMES[candidate], one_line(error))
        log.warning("running the model in eager PyTorch")
        return "torch", None

    def _open_exported(self, backend: str, path: str | os.PathLike | None):
        """A function NCHW batch -> probabilities on `backend`: for `path` (a fer-export file), else for this
        Predictor's model, exported to a temporary file and checked against PyTorch (fer.export)."""
        from fer.export import export_model, exported_runner, read_metadata

        fmt = EXPORT_FORMATS[backend]
        if path is None:
            if self.model is None:
                raise ConfigError(f"backend={backend!r} needs a model or exported_model=<file.{fmt}>")
            import tempfile

            with tempfile.TemporaryDirectory(prefix="fer-export-") as tmp:
                exported = export_model(self.model, os.path.join(tmp, f"model.{fmt}"), fmt, self.image_size,
                                        self.channels, self.class_names, temperature=self.temperature)
                return exported_runner(fmt, exported["output"])
        if not str(path).lower().endswith(f".{fmt}"):
            raise CheckpointError(f"{path}: backend {backend!r} runs .{fmt} files (fer-export --format {fmt})")
        meta = read_metadata(path)
        expected = {"fer.input_size": str(self.image_size), "fer.channels": str(self.channels),
                    "fer.class_names": json.dumps(self.class_names)}
        wrong = [f"{k.split('.', 1)[1]} {meta.get(k)} (expected {v})" for k, v in expected.items() if meta.get(k) != v]
        if abs(float(meta.get("fer.temperature", "nan")) - self.temperature) > 1e-6:
            wrong.append(f"temperature {meta.get('fer.temperature')} (expected {self.temperature})")
        if wrong:
            raise CheckpointError(f"{path}: not an export of this model: {', '.join(wrong)}; re-run fer-export")
        return exported_runner(fmt, path)

    # -- preprocessing ----------------------------------------------------------------------------
    def preprocess(self, image: np.ndarray, face: Box | None) -> np.ndarray:
        """The model's input for one face of a `load_pixels` array: the square crop around its unclipped box
        (fer.faces.crop_face; None: the whole image, a pre-cropped face), gray or RGB, resized as the
        training data was (fer.data.cache.decode); uint8 (C, S, S)."""
        pixels = image if face is None else crop_face(image, face, self.margin)
        return decode(pixels, self.image_size, self.channels)

    def probabilities(self, crops: np.ndarray) -> np.ndarray:
        """uint8 (N, C, S, S) crops -> probabilities (N, classes), `batch_size` images per forward pass
        (with TTA, each crop's views count: the forward pass stays the size the backend was tuned for)."""
        if len(crops) == 0:
            return np.zeros((0, len(self.class_names)), dtype=np.float32)
        step = images_per_pass(self.batch_size, self.tta)
        return np.concatenate([self._with_tta(crops[i:i + step].astype(np.float32) / 255.0)
                               for i in range(0, len(crops), step)])

    def _with_tta(self, batch: np.ndarray) -> np.ndarray:
        """(n, C, S, S) in [0, 1] -> probabilities (n, classes): the mean over this Predictor's TTA views."""
        if self.tta == "none":
            return self._forward(batch)
        probs = per_view(lambda x: torch.from_numpy(self._forward(x.numpy())), torch.from_numpy(batch), self.tta)
        return probs.mean(dim=1).numpy()

    # -- the public call --------------------------------------------------------------------------
    def predict(self, images: ImageInput | Iterable[ImageInput], errors: str = "raise"):
        """One ImageResult per image (a single input gives a single result, a list a list).

        errors="raise": an unreadable image raises ImageError naming it; "record": its result carries
        `error` (one line) and the other images are still processed.
        """
        if errors not in ("raise", "record"):
            raise ConfigError(f"errors={errors!r}: expected 'raise' or 'record'")
        single = isinstance(images, (str, os.PathLike, np.ndarray)) or hasattr(images, "getpixel")
        items = [images] if single else list(images)
        results: list[ImageResult] = []
        crops: list[np.ndarray] = []
        owners: list[tuple[ImageResult, Box, bool]] = []
        for i, item in enumerate(items):
            name = str(item) if isinstance(item, (str, os.PathLike)) else f"image[{i}]"
            result = ImageResult(source=name)
            results.append(result)
            try:
                image = load_pixels(item, name)
                result.height, result.width = image.shape[:2]
                found = self.detector.find(image)
                detected = True
                if not found and self.fallback == "full-image":
                    found, detected = [Detection((0, 0, result.width, result.height), None)], False
                for box, face in found:
                    crops.append(self.preprocess(image, face))
                    owners.append((result, tuple(int(v) for v in box), detected))
            except (ImageError, DataError) as exc:
                if errors == "raise":
                    raise
                result.error = str(exc)
        # All faces of all images go through the network together, in as few passes as the batch size allows.
        probs = self.probabilities(np.stack(crops) if crops else np.zeros((0,)))
        for (result, box, detected), p in zip(owners, probs):
            k = int(p.argmax())
            result.faces.append(Face(
                box=box,
                probabilities={name: float(v) for name, v in zip(self.class_names, p)},
                label=self.class_names[k],
                score=float(p[k]),
                detected=detected,
            ))
        return results[0] if single else results
