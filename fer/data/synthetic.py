"""Synthetic faces: the built-in default dataset, procedurally drawn, no files and no internet needed.

Every sample is a grayscale cartoon face whose brows, eyes and mouth take the shape of one of the seven
expressions in `fer.labels.CLASSES`. Each image is drawn from its own integer seed (derived from the source
seed, the split and the index), so any sample can be regenerated alone, in any order, in any process.

Nuisance variation (pose, scale, lighting, contrast, pixel noise, hair, occlusion, expression intensity)
keeps the task learnable but not trivial; `noise` scales all of it (0 gives clean, centred, full faces).

Faces are drawn at 4x the target size in face coordinates (face centre at the origin, half-width 1,
y pointing down), mapped to pixels by a per-sample similarity transform, and downsampled with LANCZOS.
"""

from __future__ import annotations

import hashlib
import json
import math

import numpy as np
from PIL import Image, ImageDraw

from fer.data.base import Sample, Source, SplitRoles
from fer.errors import DataError
from fer.labels import CLASSES, NUM_CLASSES

# Bump when the drawing changes, so cached arrays of older synthetic faces are not reused.
GENERATOR_VERSION = 1

SUPERSAMPLE = 4

# Per-class geometry in face units, at full intensity. Neutral is the rest pose; a sample of intensity t
# takes neutral + t * (class - neutral) before per-sample jitter.
#   brow_in_y / brow_out_y: height of the inner / outer brow end (negative = higher on the face)
#   brow_in_x: distance of the inner brow end from the midline (smaller = drawn together)
#   brow_arch: extra lift of the brow middle; brow_w: brow thickness
#   eye_open: eye height relative to a relaxed eye (>1 wide open, <1 narrowed)
#   mouth_w: half-width of the mouth; mouth_y: its height on the face
#   corner: lift of the mouth corners (positive = up, a smile; negative = down)
#   upper / lower: opening above / below the corner line (0, 0 = closed lips)
#   round: 0 = lens-shaped opening, 1 = round (the surprise "O")
#   teeth: draw a band of upper teeth in an open mouth; sneer: one-sided raised upper lip (disgust)
#   wrinkle: nose wrinkle lines (disgust); frown: vertical lines between the brows (anger)
NEUTRAL = dict(
    brow_in_y=-0.58, brow_out_y=-0.60, brow_in_x=0.14, brow_arch=0.04, brow_w=0.07,
    eye_open=1.0, mouth_w=0.36, mouth_y=0.62, corner=0.0, upper=0.0, lower=0.0, round=0.0,
    teeth=0.0, sneer=0.0, wrinkle=0.0, frown=0.0,
)
EXPRESSIONS: dict[str, dict[str, float]] = {
    "angry": dict(brow_in_y=-0.36, brow_out_y=-0.64, brow_in_x=0.07, brow_arch=0.0, brow_w=0.10,
                  eye_open=0.75, mouth_w=0.28, corner=-0.05, frown=1.0),
    "disgust": dict(brow_in_y=-0.42, brow_out_y=-0.52, brow_in_x=0.10, brow_arch=0.0, brow_w=0.09,
                    eye_open=0.55, mouth_w=0.32, corner=-0.08, sneer=0.16, wrinkle=1.0),
    "fear": dict(brow_in_y=-0.82, brow_out_y=-0.66, brow_in_x=0.08, brow_arch=0.0,
                 eye_open=1.75, mouth_w=0.44, corner=-0.08, upper=0.05, lower=0.16, round=0.2, teeth=1.0),
    "happy": dict(brow_in_y=-0.62, brow_out_y=-0.62, brow_arch=0.06,
                  eye_open=0.65, mouth_w=0.46, corner=0.2, upper=0.0, lower=0.2, round=0.3, teeth=1.0),
    "sad": dict(brow_in_y=-0.76, brow_out_y=-0.50, brow_arch=-0.02,
                eye_open=0.75, mouth_w=0.32, corner=-0.17),
    "surprise": dict(brow_in_y=-0.86, brow_out_y=-0.84, brow_arch=0.12,
                     eye_open=1.7, mouth_w=0.17, upper=0.14, lower=0.26, round=1.0),
    "neutral": dict(),
}
CLASS_PARAMS = [{**NEUTRAL, **EXPRESSIONS[name]} for name in CLASSES]
_HAPPY = CLASSES.index("happy")

EYE_X, EYE_Y, EYE_RX, EYE_RY = 0.38, -0.28, 0.17, 0.085
FACE_RY = 1.32  # face half-height over half-width

# fixed sampling grids, computed once
_TOP = np.linspace(math.pi, 2 * math.pi, 20)
_HAIR_TOP = np.stack([1.06 * np.cos(_TOP), -0.1 + 1.3 * np.sin(_TOP)], axis=1)
_HAIR_EDGE_X = np.linspace(1.0, -1.0, 9)
_HAIR_EDGE_SAG = 0.08 * np.sin(np.linspace(0, math.pi, 9))
_LID = np.linspace(math.pi, 2 * math.pi, 9)
_LID_COS, _LID_SIN = np.cos(_LID), np.sin(_LID)
_MOUTH_U = np.linspace(-1.0, 1.0, 17)


# ----------------------------------------------------------------------------------------------- geometry
_CIRCLES: dict[int, np.ndarray] = {}


def _ellipse(cx: float, cy: float, rx: float, ry: float, n: int = 24) -> np.ndarray:
    if n not in _CIRCLES:
        t = np.linspace(0.0, 2.0 * math.pi, n, endpoint=False)
        _CIRCLES[n] = np.stack([np.cos(t), np.sin(t)], axis=1)
    return _CIRCLES[n] * (rx, ry) + (cx, cy)


class _Pen:
    """Draws polygons and lines given in face units onto a supersampled canvas."""

    def __init__(self, draw: ImageDraw.ImageDraw, cx: float, cy: float, scale: float, angle: float):
        self.draw = draw
        c, s = math.cos(angle) * scale, math.sin(angle) * scale
        self.m = np.array([[c, -s], [s, c]])
        self.offset = np.array([cx, cy])
        self.scale = scale

    def _px(self, pts: np.ndarray) -> list[float]:
        return (np.asarray(pts, dtype=float) @ self.m.T + self.offset).ravel().tolist()  # flat x0, y0, x1, ...

    def polygon(self, pts: np.ndarray, fill: int) -> None:
        self.draw.polygon(self._px(pts), fill=fill)

    def line(self, pts: np.ndarray, fill: int, width: float) -> None:
        self.draw.line(self._px(pts), fill=fill, width=max(1, round(width * self.scale)), joint="curve")


# ----------------------------------------------------------------------------------------------- face parts
def draw_head(pen: _Pen, skin: int, hair: int | None, hair_depth: float, ear: bool) -> None:
    if ear:
        for side in (-1, 1):
            pen.polygon(_ellipse(side * 0.98, -0.1, 0.13, 0.26, 12), skin)
    pen.polygon(_ellipse(0.0, 0.0, 1.0, FACE_RY, 40), skin)
    if hair is not None:  # a cap of hair over the top of the head, down to y = -hair_depth
        edge = np.stack([_HAIR_EDGE_X, -hair_depth - _HAIR_EDGE_SAG], axis=1)
        pen.polygon(np.concatenate([_HAIR_TOP, edge]), hair)


def draw_brows(pen: _Pen, p: dict, ink: int) -> None:
    for side in (-1, 1):
        x_in, x_out = side * p["brow_in_x"], side * (p["brow_in_x"] + 0.42)
        y_in, y_out = p["brow_in_y"], p["brow_out_y"]
        mid = ((x_in + x_out) / 2, (y_in + y_out) / 2 - p["brow_arch"])
        pen.line(np.array([(x_in, y_in), mid, (x_out, y_out)]), ink, p["brow_w"])


def draw_eyes(pen: _Pen, p: dict, ink: int, white: int, gaze: float) -> None:
    ry = EYE_RY * p["eye_open"]
    for side in (-1, 1):
        cx = side * EYE_X
        pen.polygon(_ellipse(cx, EYE_Y, EYE_RX + 0.015, ry + 0.015, 20), ink)  # lid outline
        pen.polygon(_ellipse(cx, EYE_Y, EYE_RX, ry, 20), white)
        iris = min(0.075, ry)
        pen.polygon(_ellipse(cx + gaze, EYE_Y, 0.075, iris, 16), ink)
        # heavier upper lid: the lid line sits lower on narrowed eyes
        pen.line(np.stack([cx + EYE_RX * _LID_COS, EYE_Y + ry * _LID_SIN], axis=1), ink, 0.035)


def draw_nose(pen: _Pen, p: dict, ink: int, side: int) -> None:
    pen.line(np.array([(0.02, -0.1), (0.07, 0.2), (0.0, 0.26), (-0.08, 0.22)]), ink, 0.03)
    if p["wrinkle"] > 0.3:  # short creases across the bridge and beside the nostrils
        for dy in (-0.1, -0.02):
            pen.line(np.array([(-0.12, dy), (0.0, dy - 0.03), (0.12, dy)]), ink, 0.025)
        for s in (-1, 1):
            pen.line(np.array([(s * 0.16, 0.16), (s * 0.24, 0.42)]), ink, 0.03 if s == side else 0.02)


def draw_frown(pen: _Pen, p: dict, ink: int) -> None:
    if p["frown"] > 0.3:
        for s in (-1, 1):
            pen.line(np.array([(s * 0.04, -0.52), (s * 0.03, -0.38)]), ink, 0.025)


def draw_cheeks(pen: _Pen, p: dict, ink: int) -> None:
    if p["corner"] > 0.1:  # nasolabial folds of a smile
        for s in (-1, 1):
            x = s * (p["mouth_w"] + 0.08)
            pen.line(np.array([(s * 0.26, 0.28), (x, 0.45), (x - s * 0.02, 0.62)]), ink, 0.025)


def draw_mouth(pen: _Pen, p: dict, ink: int, teeth: int, side: int) -> None:
    """Lips as two curves between the corners; the gap between them is filled dark when open."""
    w, y0, c = p["mouth_w"], p["mouth_y"], p["corner"]
    u = _MOUTH_U
    x = w * u
    base = y0 - c * u * u  # corners lifted by `corner`, centre at mouth_y
    shape = np.clip(1 - u * u, 0, 1) ** (1.0 - 0.5 * p["round"])
    # a sneer lifts the upper lip on one side only
    sneer = p["sneer"] * np.clip(side * u + 0.2, 0, 1) ** 1.5
    upper = base - p["upper"] * shape - sneer * np.sqrt(np.clip(1 - u * u, 0, 1))
    lower = base + p["lower"] * shape
    upper_pts = np.stack([x, upper], 1)
    if (p["upper"] + p["lower"] > 0.03 or p["sneer"] > 0.04):
        outline = np.concatenate([upper_pts, np.stack([x, lower], 1)[::-1]])
        pen.polygon(outline, ink)
        if p["teeth"] > 0.5:
            band = np.minimum(upper + 0.06, lower)
            inner = np.abs(u) < 0.85
            pen.polygon(np.concatenate([upper_pts[inner], np.stack([x, band], 1)[inner][::-1]]), teeth)
        pen.line(outline, ink, 0.03)
    else:
        pen.line(upper_pts, ink, 0.05)


# ----------------------------------------------------------------------------------------------- one face
def draw_face(label: int, seed: int, image_size: int = 48, noise: float = 1.0) -> np.ndarray:
    """The face of class `label` drawn from `seed`: a uint8 (image_size, image_size) array."""
    rng = np.random.default_rng(seed)
    r = rng.random(32)  # all nuisance draws come from this one vector, so each draw has a fixed slot
    j = lambda i, a: (2 * r[i] - 1) * a * noise  # noqa: E731 - symmetric jitter of amplitude a

    # expression: intensity between neutral and the full class geometry, plus per-part jitter
    t = 1.0 - 0.45 * noise * r[0]
    full = CLASS_PARAMS[label]
    p = {k: NEUTRAL[k] + t * (full[k] - NEUTRAL[k]) for k in NEUTRAL}
    p["teeth"], p["frown"], p["wrinkle"] = full["teeth"], full["frown"], full["wrinkle"]
    p["brow_in_y"] += j(1, 0.05)
    p["brow_out_y"] += j(2, 0.05)
    p["brow_in_x"] += j(3, 0.03)
    p["eye_open"] *= 1 + j(4, 0.15)
    p["mouth_w"] *= 1 + j(5, 0.12)
    p["mouth_y"] += j(6, 0.05)
    p["corner"] += j(7, 0.04)
    p["brow_w"] *= 1 + j(8, 0.25)
    side = 1 if r[9] < 0.5 else -1
    if label == _HAPPY and r[10] < 0.4 * noise:  # closed-mouth smile
        p["upper"] = p["lower"] = 0.0
        p["corner"] += 0.04

    # tones: background, skin, ink (features), eye whites; contrast between skin and background kept
    spread = min(noise, 1.0)
    skin = 175 + 110 * (r[11] - 0.5) * spread
    bg = 60 + (255 * r[12] - 60) * spread
    if abs(bg - skin) < 35:
        bg = (skin - 60) if skin > 140 else (skin + 60)
    ink = skin * (0.12 + 0.3 * r[13] * noise)
    white = min(255.0, skin + 20 + 25 * r[14])
    hair = 20 + 120 * r[15] if r[16] < 0.6 * noise else None

    s = image_size * SUPERSAMPLE
    img = Image.new("L", (s, s), int(bg))
    scale = s * (0.37 + j(17, 0.04))
    pen = _Pen(ImageDraw.Draw(img), s / 2 + j(18, 0.07) * s, s / 2 + 0.02 * s + j(19, 0.05) * s,
               scale / FACE_RY, j(20, math.radians(12)))

    draw_head(pen, int(skin), None if hair is None else int(hair), 0.72 + j(21, 0.12), r[22] < 0.7)
    draw_brows(pen, p, int(ink))
    draw_eyes(pen, p, int(ink), int(white), j(23, 0.04))
    draw_frown(pen, p, int(ink))
    draw_nose(pen, p, int(ink), side)
    draw_cheeks(pen, p, int(ink))
    draw_mouth(pen, p, int(ink), int(white), side)

    if r[24] < 0.15 * noise:  # an occluding block (hand, sticker) over part of the image
        w, h = s * (0.15 + 0.2 * r[25]), s * (0.15 + 0.2 * r[26])
        x0, y0 = (s - w) * r[27], (s - h) * r[28]
        ImageDraw.Draw(img).rectangle([x0, y0, x0 + w, y0 + h], fill=int(255 * r[29]))

    out = np.asarray(img.resize((image_size, image_size), Image.LANCZOS, reducing_gap=2.0), dtype=np.float32)
    if noise:
        contrast = 1 + j(30, 0.3)
        out = (out - 128) * contrast + 128 + rng.normal(0.0, 8.0 * noise * r[31], out.shape)
    return np.clip(out, 0, 255).astype(np.uint8)


# ----------------------------------------------------------------------------------------------- the source
def _seed_of(*parts: object) -> int:
    """A stable 63-bit seed from parts (Python's hash() is salted per process, so not that)."""
    digest = hashlib.sha1(":".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


class SyntheticSource(Source):
    """Procedurally drawn faces, balanced across the seven classes; deterministic from `seed`."""

    name = "synthetic"

    def __init__(self, num_train: int = 1400, num_val: int = 350, num_test: int = 350,
                 image_size: int = 48, seed: int = 0, noise: float = 1.0):
        self.sizes = {"train": int(num_train), "val": int(num_val), "test": int(num_test)}
        for split, n in self.sizes.items():
            if n < 0:
                raise DataError(f"synthetic: num_{split} must be >= 0, got {n}")
        if int(image_size) < 8:
            raise DataError(f"synthetic: image_size must be >= 8, got {image_size}")
        if not 0.0 <= float(noise) <= 2.0:
            raise DataError(f"synthetic: noise must be in [0, 2], got {noise}")
        self.image_size = int(image_size)
        self.seed = int(seed)
        self.noise = float(noise)

    def roles(self) -> SplitRoles:
        return SplitRoles(train="train", val="val", test="test")

    def _check(self, split: str) -> int:
        if split not in self.sizes:
            raise DataError(f"synthetic: unknown split {split!r}; expected one of train, val, test")
        return self.sizes[split]

    def samples(self, split: str) -> list[Sample]:
        n = self._check(split)
        labels = np.arange(n) % NUM_CLASSES
        np.random.default_rng(_seed_of("labels", self.seed, split)).shuffle(labels)
        return [Sample(f"synthetic/{split}/{i}", int(labels[i]), _seed_of(self.seed, split, i)) for i in range(n)]

    def load(self, sample: Sample) -> np.ndarray:
        return draw_face(sample.label, int(sample.ref), self.image_size, self.noise)

    def fingerprint(self, split: str) -> str:
        n = self._check(split)
        spec = dict(source=self.name, version=GENERATOR_VERSION, split=split, n=n, image_size=self.image_size,
                    seed=self.seed, noise=self.noise)
        return hashlib.sha1(json.dumps(spec, sort_keys=True).encode()).hexdigest()
