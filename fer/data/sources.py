"""Readers for the dataset layouts fer understands: class-folder trees and the FER2013 CSV.

Listing (`samples`) validates labels and folder structure up front; decoding (`load`) is where a corrupt
or non-image file shows up, so the cache can either stop on it or skip it (data.on_bad).
"""

from __future__ import annotations

import csv
import hashlib
import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from fer.errors import DataError
from fer.labels import CLASSES, NUM_CLASSES, canonical, class_index
from fer.data.base import Sample, Source, SplitRoles, check_on_bad, printable, warn_skipped

TRAIN_NAMES = ("train", "training")
VAL_NAMES = ("val", "valid", "validation")
TEST_NAMES = ("test", "testing")

FER2013_SIDE = 48
FER2013_USAGES = {"training": "Training", "publictest": "PublicTest", "privatetest": "PrivateTest"}


def _visible(name: str) -> bool:
    # .DS_Store, ._foo (macOS resource forks), .ipynb_checkpoints, .git ...
    return not name.startswith(".")


def _safe_name(name: str) -> str:
    """A source name usable in a cache folder name."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "source"


def _require_dir(root: Path) -> None:
    if not root.exists():
        raise DataError(f"data.root={root}: no such directory")
    if not root.is_dir():
        raise DataError(f"data.root={root}: not a directory")


def _subdirs(path: Path) -> list[Path]:
    with os.scandir(path) as it:
        return sorted(Path(e.path) for e in it if _visible(e.name) and e.is_dir())


class FolderSource(Source):
    """`<root>/<split>/<class>/<image>`: RAF-DB, AffectNet exports, the FER2013 image layout, users' own trees."""

    def __init__(
        self,
        root: str | os.PathLike,
        ignore_classes: Iterable[str] = (),
        split_names: SplitRoles | Mapping[str, str | None] | None = None,
    ):
        self.root = Path(root)
        _require_dir(self.root)
        self.name = _safe_name(self.root.resolve().name)
        self.ignore_classes = frozenset(ignore_classes)
        # A split is any subfolder that itself holds (class) folders; loose files at the top are ignored.
        self.splits: dict[str, Path] = {d.name: d for d in _subdirs(self.root) if _subdirs(d)}
        self._roles = self._resolve_roles(split_names)
        self._samples: dict[str, list[Sample]] = {}

    def _resolve_roles(self, split_names) -> SplitRoles:
        if split_names is not None:
            roles = split_names if isinstance(split_names, SplitRoles) else SplitRoles(**dict(split_names))
            for split in (roles.train, roles.val, roles.test):
                if split is not None and split not in self.splits:
                    raise DataError(f"{self.root / split}: split folder with class folders not found")
            return roles

        def find(names: tuple[str, ...]) -> str | None:
            lower = {s.lower(): s for s in self.splits}
            return next((lower[n] for n in names if n in lower), None)

        train = find(TRAIN_NAMES)
        if train is None:
            hint = ""
            if any(canonical(c.name) is not None for c in _subdirs(self.root)):
                hint = " (it looks like class folders sit directly under root; move them into root/train/)"
            found = ", ".join(printable(s) for s in sorted(self.splits)) or "none"
            raise DataError(
                f"data.root={self.root}: expected a train/ folder of class folders "
                f"(<root>/train/<class>/*.jpg); split folders found: {found}{hint}"
            )
        return SplitRoles(train=train, val=find(VAL_NAMES), test=find(TEST_NAMES))

    def roles(self) -> SplitRoles:
        return self._roles

    def samples(self, split: str) -> list[Sample]:
        if split not in self._samples:
            self._samples[split] = self._list(split)
        return self._samples[split]

    def _list(self, split: str) -> list[Sample]:
        if split not in self.splits:
            raise DataError(f"{self.root}: no split folder {split!r}; found {', '.join(sorted(self.splits))}")
        out: list[Sample] = []
        for class_dir in _subdirs(self.splits[split]):
            label = class_index(class_dir.name, where=printable(class_dir), ignore=self.ignore_classes)
            if label is None:  # listed in data.source.ignore_classes (e.g. AffectNet's contempt)
                continue
            with os.scandir(class_dir) as it:
                # Every visible regular file is a sample: a stray notes.txt fails at decode time, via on_bad.
                files = sorted(e.name for e in it if _visible(e.name) and e.is_file())
            if not files:
                raise DataError(f"{printable(class_dir)}: empty class folder (no image files)")
            out.extend(Sample(where=printable(class_dir / f), label=label, ref=class_dir / f) for f in files)
        return out

    def load(self, sample: Sample) -> Image.Image:
        with Image.open(sample.ref) as im:
            im.load()  # decode now, inside the caller's error handling; truncated files raise here
            return ImageOps.exif_transpose(im)  # a copy, so closing the file is safe

    def fingerprint(self, split: str) -> str:
        samples = self.samples(split)  # validates the split first
        base = self.splits[split]
        h = hashlib.sha1(repr(CLASSES).encode())
        for s in samples:
            st = s.ref.stat()
            line = f"{s.ref.relative_to(base).as_posix()}\0{s.label}\0{st.st_size}\0{st.st_mtime_ns}\n"
            h.update(line.encode("utf-8", "surrogateescape"))  # names that are not UTF-8 keep their bytes
        return h.hexdigest()


class Fer2013CsvSource(Source):
    """The original FER2013 CSV (emotion, pixels, Usage), or a variant with the same columns in another order."""

    name = "fer2013"
    REQUIRED = ("emotion", "pixels", "usage")

    def __init__(self, csv_path: str | os.PathLike, on_bad: str = "error"):
        self.path = Path(csv_path)
        if not self.path.is_file():
            raise DataError(f"{self.path}: no such file")
        self.name = _safe_name(self.path.stem) if self.path.stem != "fer2013" else "fer2013"
        self.on_bad = check_on_bad(on_bad)  # "skip" leaves malformed rows out of the listing
        self._by_usage: dict[str, list[Sample]] | None = None  # parsed on first use

    def _parse(self) -> dict[str, list[Sample]]:
        if self._by_usage is None:
            try:
                self._by_usage = self._read()
            except UnicodeDecodeError:
                raise DataError(f"{printable(self.path)}: not UTF-8 text; save it as UTF-8") from None
        return self._by_usage

    def _read(self) -> dict[str, list[Sample]]:
        by_usage: dict[str, list[Sample]] = {u: [] for u in FER2013_USAGES.values()}
        bad: list[tuple[str, str]] = []  # (where, why) of the rows on_bad=skip leaves out
        fname = printable(self.path.name)
        with open(self.path, newline="", encoding="utf-8-sig") as f:
            reader = csv.reader(f)
            columns = self._columns(next(reader, None))
            for row in reader:
                if not any(cell.strip() for cell in row):
                    continue
                where = f"{fname} row {reader.line_num}"  # 1-based physical line, header = line 1
                try:
                    usage, sample = self._row(row, where, columns)
                except DataError as exc:
                    if self.on_bad == "error":
                        raise
                    bad.append((where, str(exc).removeprefix(f"{where}: ")))
                    continue
                by_usage[usage].append(sample)
        if bad:  # typically a last line cut short by a partial download
            warn_skipped(printable(self.path), "bad row(s)", [w for w, _ in bad], why=bad[0][1])
        return by_usage

    def _columns(self, header: list[str] | None) -> tuple[int, int, int]:
        """Positions of emotion, pixels and Usage."""
        if header is None:
            raise DataError(f"{self.path}: empty file (expected a header emotion,pixels,Usage)")
        # The ICML variant writes "emotion, Usage, pixels": match names, not positions.
        cols = {h.strip().lower(): i for i, h in enumerate(header)}
        for col in self.REQUIRED:
            if col not in cols:
                raise DataError(f"{self.path}: missing column {col!r} (header: {','.join(header)})")
        return tuple(cols[c] for c in self.REQUIRED)

    def _row(self, row: list[str], where: str, columns: tuple[int, int, int]) -> tuple[str, Sample]:
        """(Usage, sample) of one CSV row; DataError naming the row when it is malformed."""
        ie, ip, iu = columns
        width = max(columns) + 1
        if len(row) < width:
            raise DataError(f"{where}: expected at least {width} columns, got {len(row)}")
        raw = row[ie].strip()
        try:
            label = int(raw)
        except ValueError:
            raise DataError(f"{where}: emotion {raw!r} is not an integer 0..{NUM_CLASSES - 1}") from None
        if not 0 <= label < NUM_CLASSES:
            raise DataError(f"{where}: emotion {label} is outside 0..{NUM_CLASSES - 1}")
        usage = FER2013_USAGES.get(row[iu].strip().lower())
        if usage is None:
            raise DataError(f"{where}: unknown Usage {row[iu]!r}; expected Training, PublicTest or PrivateTest")
        # Pixels are checked in `load`, so data.on_bad=skip can drop a damaged row.
        return usage, Sample(where=where, label=label, ref=row[ip])

    def roles(self) -> SplitRoles:
        present = {u for u, rows in self._parse().items() if rows}
        if "Training" not in present:
            raise DataError(f"{self.path}: no rows with Usage=Training")
        return SplitRoles(
            train="Training",
            val="PublicTest" if "PublicTest" in present else None,
            test="PrivateTest" if "PrivateTest" in present else None,
        )

    def samples(self, split: str) -> list[Sample]:
        by_usage = self._parse()
        if split not in by_usage:
            raise DataError(f"{self.path}: no split {split!r}; expected Training, PublicTest or PrivateTest")
        return by_usage[split]

    def load(self, sample: Sample) -> np.ndarray:
        values = sample.ref.split()
        want = FER2013_SIDE * FER2013_SIDE
        if len(values) != want:
            raise DataError(f"{sample.where}: expected {want} pixel values (48x48), got {len(values)}")
        try:
            pixels = np.array([int(v) for v in values], dtype=np.int64)
        except ValueError:
            bad = next(v for v in values if not v.lstrip("-").isdigit())
            raise DataError(f"{sample.where}: pixel value {bad!r} is not an integer") from None
        if pixels.min() < 0 or pixels.max() > 255:
            raise DataError(f"{sample.where}: pixel values must lie in 0..255")
        return pixels.astype(np.uint8).reshape(FER2013_SIDE, FER2013_SIDE)

    def fingerprint(self, split: str) -> str:
        st = self.path.stat()
        key = f"{self.path.resolve()}\0{st.st_size}\0{st.st_mtime_ns}\0{split}\0{CLASSES}"
        # "skip" may list fewer rows than the file holds, where "error" would stop: its own cache entry, so an
        # "error" run never takes a listing with rows left out. ("error" keeps the key it always had.)
        key += "\0on_bad=skip" if self.on_bad == "skip" else ""
        return hashlib.sha1(key.encode("utf-8", "surrogateescape")).hexdigest()


def folder_source(root: str | os.PathLike, ignore_classes: Iterable[str] = ()) -> FolderSource:
    """A generic `<root>/<split>/<class>/*` tree."""
    return FolderSource(root, ignore_classes=ignore_classes)


def fer2013_source(root: str | os.PathLike, on_bad: str = "error") -> Source:
    """FER2013 from `data.root`: the CSV (file, or a folder holding it) or the train/test image layout.

    `on_bad` (data.on_bad) is the CSV's: "skip" leaves malformed rows out. Image folders list no rows, and
    their unreadable images are the cache's to skip.
    """
    root = Path(root)
    if root.is_file():
        if root.suffix.lower() == ".csv":
            return Fer2013CsvSource(root, on_bad)
        raise DataError(f"data.root={root}: expected fer2013.csv or a folder with train/<class>/ images")
    _require_dir(root)
    csvs = sorted(p for p in root.glob("*.csv") if _visible(p.name))
    if (root / "fer2013.csv").is_file():
        return Fer2013CsvSource(root / "fer2013.csv", on_bad)
    if len(csvs) == 1:
        return Fer2013CsvSource(csvs[0], on_bad)
    if (root / "train").is_dir():
        src = FolderSource(root)
        r = src.roles()
        if r.val is None and r.test is not None:
            # The image export has train/ and test/ only: test/ is PublicTest, the usual validation split.
            src = FolderSource(root, split_names=SplitRoles(train=r.train, val=r.test, test=r.test))
        return src
    found = f"; found several CSV files ({', '.join(p.name for p in csvs)}), name one in data.root" if csvs else ""
    raise DataError(
        f"data.root={root}: expected fer2013.csv (or a single *.csv) or train/<class>/ image folders{found}"
    )


class ClassFolderSource(FolderSource):
    """`<root>/<class>/<image>`: one labelled tree without split folders, served as its only split ("all").

    For evaluation on a folder of labelled faces; training needs train/ (and val/) folders instead.
    """

    def __init__(self, root: str | os.PathLike, ignore_classes: Iterable[str] = ()):
        self.root = Path(root)
        _require_dir(self.root)
        self.name = _safe_name(self.root.resolve().name)
        self.ignore_classes = frozenset(ignore_classes)
        self.splits = {"all": self.root}
        self._roles = SplitRoles(train="all", val="all", test="all")
        self._samples = {}


def split_folders(root: str | os.PathLike) -> dict[str, Path]:
    """The split folders under `root` (any subfolder that holds folders), by name."""
    root = Path(root)
    _require_dir(root)
    return {d.name: d for d in _subdirs(root) if _subdirs(d)}


def any_folder_source(root: str | os.PathLike, ignore_classes: Iterable[str] = ()) -> FolderSource:
    """A labelled image tree in any of the usual shapes, for evaluation:
    `<root>/train|val|test/<class>/` (FolderSource), `<root>/test/<class>/` without train/ (that split alone),
    or `<root>/<class>/` (ClassFolderSource)."""
    root = Path(root)
    splits = {name.lower(): path for name, path in split_folders(root).items()}
    if any(name in splits for name in TRAIN_NAMES):
        return FolderSource(root, ignore_classes=ignore_classes)
    for name in (*TEST_NAMES, *VAL_NAMES):
        if name in splits:
            return ClassFolderSource(splits[name], ignore_classes=ignore_classes)
    return ClassFolderSource(root, ignore_classes=ignore_classes)
