"""The synthetic-faces source: deterministic, balanced, expressive and learnable (numpy only, no torch)."""

from __future__ import annotations

import re

import numpy as np
import pytest

from fer.data.base import SplitRoles
from fer.data.synthetic import SyntheticSource, draw_face
from fer.errors import DataError
from fer.labels import CLASSES, NUM_CLASSES


def _arrays(source: SyntheticSource, split: str) -> tuple[np.ndarray, np.ndarray]:
    samples = source.samples(split)
    return np.stack([source.load(s) for s in samples]), np.array([s.label for s in samples])


@pytest.fixture(scope="module")
def data() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    source = SyntheticSource(num_train=700, num_val=0, num_test=350, seed=0)
    return {split: _arrays(source, split) for split in ("train", "test")}


# ------------------------------------------------------------------------------------------------ contract
def test_roles_and_sample_fields():
    source = SyntheticSource(num_train=14, num_val=7, num_test=21)
    assert source.name == "synthetic"
    assert source.roles() == SplitRoles(train="train", val="val", test="test")
    for split, n in (("train", 14), ("val", 7), ("test", 21)):
        samples = source.samples(split)
        assert len(samples) == n
        assert [s.where for s in samples] == [f"synthetic/{split}/{i}" for i in range(n)]
        assert all(isinstance(s.ref, int) and isinstance(s.label, int) for s in samples)
    refs = [s.ref for split in ("train", "val", "test") for s in source.samples(split)]
    assert len(set(refs)) == len(refs), "every image has its own seed, across splits too"


@pytest.mark.parametrize("size", [48, 64])
def test_shape_and_dtype(size):
    source = SyntheticSource(num_train=7, image_size=size)
    for s in source.samples("train"):
        img = source.load(s)
        assert isinstance(img, np.ndarray) and img.dtype == np.uint8 and img.shape == (size, size)
        assert img.std() > 5, "not a blank image"


@pytest.mark.parametrize("split,n", [("train", 1400), ("val", 350), ("test", 351)])
def test_balanced_labels(split, n):
    labels = [s.label for s in SyntheticSource(num_test=351).samples(split)]
    counts = np.bincount(labels, minlength=NUM_CLASSES)
    assert len(counts) == NUM_CLASSES and counts.sum() == n
    assert counts.max() - counts.min() <= 1
    assert labels[:7] != list(range(7)) or labels[7:14] != list(range(7)), "labels are shuffled, not cyclic"


def test_unknown_split_and_bad_parameters():
    source = SyntheticSource()
    with pytest.raises(DataError, match="unknown split"):
        source.samples("validation")
    with pytest.raises(DataError, match="unknown split"):
        source.fingerprint("dev")
    with pytest.raises(DataError):
        SyntheticSource(num_train=-1)
    with pytest.raises(DataError):
        SyntheticSource(image_size=4)


# ------------------------------------------------------------------------------------------------ determinism
def test_same_seed_same_images_in_any_order():
    a, b = SyntheticSource(seed=3), SyntheticSource(seed=3)
    sa, sb = a.samples("train")[:20], b.samples("train")[:20]
    assert sa == sb and [s.ref for s in sa] == [s.ref for s in sb]
    first = [a.load(s) for s in sa]
    backwards = [b.load(s) for s in reversed(sb)][::-1]
    for x, y in zip(first, backwards):
        np.testing.assert_array_equal(x, y)


def test_different_seed_different_images():
    a, b = SyntheticSource(seed=0), SyntheticSource(seed=1)
    sa, sb = a.samples("train")[:10], b.samples("train")[:10]
    assert all(x.ref != y.ref for x, y in zip(sa, sb))
    assert all(not np.array_equal(a.load(x), b.load(y)) for x, y in zip(sa, sb))
    # and within one source, splits differ
    assert not np.array_equal(a.load(a.samples("val")[0]), a.load(sa[0]))


def test_fingerprint():
    fp = SyntheticSource(seed=0).fingerprint("train")
    assert re.fullmatch(r"[0-9a-f]{40}", fp)
    assert fp == SyntheticSource(seed=0).fingerprint("train")
    others = {
        SyntheticSource(seed=0).fingerprint("val"),
        SyntheticSource(seed=1).fingerprint("train"),
        SyntheticSource(num_train=700).fingerprint("train"),
        SyntheticSource(image_size=64).fingerprint("train"),
        SyntheticSource(noise=0.5).fingerprint("train"),
    }
    assert fp not in others and len(others) == 5
    assert SyntheticSource(num_val=1).fingerprint("train") == fp, "a split's digest ignores the other splits"


# ------------------------------------------------------------------------------------------------ expressions
def _mouth_curvature(img: np.ndarray) -> float:
    """Rows by which the mouth centre sits below its corners: positive for a smile, negative for a frown.

    Clean faces (noise=0) are centred: the mouth lies in rows 29-38, between the nose and the chin, and
    spans at least columns 19-28. Each column's darkest row there traces the lips.
    """
    lips = img[29:39].argmin(0).astype(np.float64)
    return float(lips[[23, 24]].mean() - lips[[19, 28]].mean())


def _clean_face(name: str) -> np.ndarray:
    return draw_face(CLASSES.index(name), seed=123, image_size=48, noise=0.0)


def test_happy_smiles_and_sad_frowns():
    assert _mouth_curvature(_clean_face("happy")) > 1.5
    assert _mouth_curvature(_clean_face("sad")) < -1.0
    assert abs(_mouth_curvature(_clean_face("neutral"))) < 1.0


def test_clean_classes_are_pairwise_distinct():
    faces = {name: _clean_face(name).astype(np.float64) for name in CLASSES}
    for i, a in enumerate(CLASSES):
        for b in CLASSES[i + 1:]:
            assert np.abs(faces[a] - faces[b]).mean() > 1.0, (a, b)
    # the mouth region alone tells happy from sad
    mouth = (slice(28, 44), slice(12, 36))
    assert np.abs(faces["happy"][mouth] - faces["sad"][mouth]).mean() > 10


def test_nuisance_varies_within_a_class(data):
    x, y = data["train"]
    happy = x[y == CLASSES.index("happy")].astype(np.float64)
    assert happy.mean((1, 2)).std() > 15, "brightness varies"
    assert np.abs(happy[0] - happy[1]).mean() > 10, "two happy faces are not the same picture"


# ------------------------------------------------------------------------------------------------ learnability
def _gradient_features(x: np.ndarray, cell: int = 4) -> np.ndarray:
    """Per-image standardised pixels and |gradients|, average-pooled over cell x cell blocks."""
    x = x.astype(np.float32)
    x = (x - x.mean((1, 2), keepdims=True)) / (x.std((1, 2), keepdims=True) + 1e-6)
    gy, gx = np.gradient(x, axis=(1, 2))
    n, h, w = x.shape
    pool = lambda g: g.reshape(n, h // cell, cell, w // cell, cell).mean((2, 4)).reshape(n, -1)  # noqa: E731
    return np.concatenate([pool(np.abs(gx)), pool(np.abs(gy)), pool(x)], 1)


def _ridge_classifier(xtr: np.ndarray, ytr: np.ndarray, xte: np.ndarray, alpha: float = 100.0) -> np.ndarray:
    """Least squares onto one-hot labels with an L2 penalty: closed form, deterministic, instant."""
    mu, sd = xtr.mean(0), xtr.std(0) + 1e-3
    with_bias = lambda x: np.c_[(x - mu) / sd, np.ones(len(x))]  # noqa: E731
    a, b = with_bias(xtr), with_bias(xte)
    w = np.linalg.solve(a.T @ a + alpha * np.eye(a.shape[1]), a.T @ np.eye(NUM_CLASSES)[ytr])
    return (b @ w).argmax(1)


def test_learnable_from_features(data):
    (xtr, ytr), (xte, yte) = data["train"], data["test"]
    accuracy = (_ridge_classifier(_gradient_features(xtr), ytr, _gradient_features(xte)) == yte).mean()
    assert accuracy > 0.5, f"held-out accuracy {accuracy:.2f} (chance {1 / NUM_CLASSES:.2f})"


def test_not_trivial_for_raw_pixel_centroids(data):
    """Pose, lighting and intensity vary enough that class-mean templates on raw pixels do poorly."""
    (xtr, ytr), (xte, yte) = data["train"], data["test"]
    flat = lambda x: x.reshape(len(x), -1).astype(np.float32) / 255  # noqa: E731
    xtr, xte = flat(xtr), flat(xte)
    centroids = np.stack([xtr[ytr == c].mean(0) for c in range(NUM_CLASSES)])
    predicted = ((xte[:, None, :] - centroids[None]) ** 2).sum(-1).argmin(1)
    assert (predicted == yte).mean() < 0.5
