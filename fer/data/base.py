"""The contract every data source meets: list labelled samples per split, load one, fingerprint a split.

Sources know file formats and nothing about Lightning; the cache turns their samples into uint8 arrays.
The helpers at the end (data.on_bad, the skip warning, printable paths) are shared by both.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image

from fer.errors import DataError

ON_BAD = ("error", "skip")  # data.on_bad: what a corrupt image or bad CSV row does


@dataclass(frozen=True)
class Sample:
    """One labelled image before decoding."""

    where: str  # names the sample in error messages: a file path, or "file.csv row 1234"
    label: int  # index into fer.labels.CLASSES
    ref: Any = field(default=None, compare=False)  # what `Source.load` needs: a path, a pixel string, a seed


@dataclass(frozen=True)
class SplitRoles:
    """Which of a source's splits trains, validates and tests; None where the source has no such split."""

    train: str
    val: str | None = None
    test: str | None = None


class Source:
    """Base class of the data sources (FER2013 layouts, class-folder trees, synthetic faces)."""

    name: str = "source"

    def roles(self) -> SplitRoles:
        raise NotImplementedError

    def samples(self, split: str) -> list[Sample]:
        """Labelled samples of `split`, labels validated; raises DataError on unknown classes, empty folders."""
        raise NotImplementedError

    def load(self, sample: Sample) -> Image.Image | np.ndarray:
        """Decode one sample; raises (any exception) when the sample is corrupt. The cache names it."""
        raise NotImplementedError

    def fingerprint(self, split: str) -> str:
        """Cheap, stable digest of what `split` is made of (paths, sizes, mtimes, parameters)."""
        raise NotImplementedError


def check_on_bad(on_bad: str) -> str:
    """`on_bad` itself, once known to be "error" or "skip"."""
    if on_bad not in ON_BAD:
        raise DataError(f"data.on_bad={on_bad!r}: expected 'error' or 'skip'")
    return on_bad


def warn_skipped(what: str, noun: str, wheres: list[str], why: str = "") -> None:
    """The one warning for samples data.on_bad=skip left out: how many, the first few, why the first went."""
    shown = ", ".join(wheres[:3]) + (", ..." if len(wheres) > 3 else "")
    why = f" (first: {why})" if why else ""
    warnings.warn(f"{what}: skipped {len(wheres)} {noun}: {shown}{why}", stacklevel=3)


def printable(path: str | os.PathLike) -> str:
    """A path as text that prints and logs anywhere: bytes of a name that are not UTF-8 (a Latin-1 'café.png'
    unzipped on Linux) show as \\xe9 escapes, not as the lone surrogates that crash UTF-8 encoders."""
    return os.fspath(path).encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
