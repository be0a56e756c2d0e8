"""The contract every data source meets: list labelled samples per split, load one, fingerprint a split.

Sources know file formats and nothing about Lightning; the cache turns their samples into uint8 arrays.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image


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
