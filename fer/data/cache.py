"""Decoded uint8 cache: each split is decoded once into a memory-mapped (N, C, H, W) .npy on disk.

Later runs (and every dataloader worker) map the same file instead of decoding JPEGs again. A cache
folder is written under a temporary name and renamed into place, so a crash never leaves half a cache.
Processes building the same split at once (DDP ranks, SLURM tasks) take turns on a lock file: one
decodes, the others then find its copy.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from fer.errors import DataError
from fer.data.base import Sample, Source, check_on_bad, warn_skipped

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; concurrent builders then cope without one (_publish)
    fcntl = None

log = logging.getLogger(__name__)

CACHE_VERSION = 3  # bump when the decoding/resizing or the folder's files change, so old caches are not reused
CHUNK = 512  # samples decoded per batch of thread-pool work: bounds peak RAM, not the cache size


@dataclass
class CachedSplit:
    images: np.ndarray  # uint8 (N, C, H, W), memory-mapped
    labels: np.ndarray  # int64 (N,)
    kept: np.ndarray  # int64 (N,): which of the split's samples (source order, ascending) each row holds
    from_cache: bool
    skipped: list[str] = field(default_factory=list)  # `where` of the samples dropped by on_bad="skip"


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity mask: SLURM, taskset, containers), not all of the host's."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # macOS, Windows
        return os.cpu_count() or 1


def user_cache_root() -> Path:
    """$XDG_CACHE_HOME/fer, else ~/.cache/fer: where fer keeps what it makes per machine."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "fer"


def default_cache_dir() -> Path:
    """$FER_CACHE_DIR, else the user cache root (never inside a dataset folder)."""
    if os.environ.get("FER_CACHE_DIR"):
        return Path(os.environ["FER_CACHE_DIR"]).expanduser()
    return user_cache_root()


def _to_8bit(a: np.ndarray, mode: str) -> np.ndarray:
    """Scale 16/32-bit integer or float pixels to uint8 (rescale, never clip: 16-bit faces are not white)."""
    a = a.astype(np.float64)
    # "I" (32-bit) holding 0..255 is 8-bit data in a wide type (numpy int32 saved as TIFF): left as it is.
    if mode.startswith("I;16") or (mode == "I" and a.min() >= 0 and 255 < a.max() <= 65535):
        a = a / 257.0  # 0..65535 -> 0..255
    elif mode == "F" and a.min() >= 0 and a.max() <= 1.0:
        a = a * 255.0
    elif a.max() > a.min() and (a.min() < 0 or a.max() > 255):
        a = (a - a.min()) * (255.0 / (a.max() - a.min()))
    return np.clip(np.rint(a), 0, 255).astype(np.uint8)


def _as_pil(img: Image.Image | np.ndarray) -> Image.Image:
    """An 8-bit PIL image without alpha: 16/32-bit and float pixels rescaled to L, palettes resolved, and
    transparency composited onto white, so a cut-out face reads the same in training, fer-eval and fer-predict."""
    if isinstance(img, np.ndarray):
        if img.dtype != np.uint8:
            raise DataError(f"expected a uint8 array, got {img.dtype}")
        if img.ndim == 3 and img.shape[2] == 1:
            img = img[:, :, 0]
        if img.ndim == 2:
            return Image.fromarray(img, "L")
        if not (img.ndim == 3 and img.shape[2] in (3, 4)):
            raise DataError(f"expected an (H, W), (H, W, 3) or (H, W, 4) array, got shape {img.shape}")
        img = Image.fromarray(img, "RGB" if img.shape[2] == 3 else "RGBA")
    elif img.mode in ("I", "F") or img.mode.startswith("I;16"):
        return Image.fromarray(_to_8bit(np.asarray(img), img.mode), "L")
    if img.mode in ("P", "PA"):
        img = img.convert("RGBA")  # resolves the palette (and palette transparency) before the final mode
    if img.mode in ("RGBA", "LA", "RGBa", "La"):
        background = Image.new("RGBA", img.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, img.convert("RGBA")).convert("RGB")
    return img


def decode(img: Image.Image | np.ndarray, size: int, channels: int) -> np.ndarray:
    """Any PIL mode or uint8 array -> uint8 (channels, size, size)."""
    im = _as_pil(img)
    target = "L" if channels == 1 else "RGB"
    if im.mode != target:
        if target == "L" and im.mode not in ("1", "L", "RGB"):
            im = im.convert("RGB")  # CMYK, YCbCr, LAB...: through RGB, for the usual luma weights
        im = im.convert(target)
    if im.size != (size, size):
        # Faces come pre-cropped, so non-square images are stretched rather than cropped. Pillow's
        # bilinear resize widens its kernel when shrinking, so downscaling averages (no aliasing).
        im = im.resize((size, size), Image.Resampling.BILINEAR)
    a = np.asarray(im, dtype=np.uint8)
    return a[None] if a.ndim == 2 else a.transpose(2, 0, 1)


def _reason(exc: BaseException, where: str) -> str:
    """One short line saying why a sample could not be read."""
    if isinstance(exc, UnidentifiedImageError):
        return "not a recognised image file"
    text = (str(exc).strip().splitlines() or [""])[0]
    if text.startswith(where + ": "):  # sources may already name the sample
        text = text[len(where) + 2:]
    text = text or type(exc).__name__
    return text if len(text) <= 200 else text[:197] + "..."


def _cache_key(source: Source, split: str, size: int, channels: int, indices: np.ndarray | None = None) -> str:
    parts = [source.fingerprint(split), str(size), str(channels), str(CACHE_VERSION)]
    if indices is not None:  # a subset is its own cache entry, named by the samples it holds
        parts.append(hashlib.sha1(indices.astype("<i8").tobytes()).hexdigest())
    return hashlib.sha1("\0".join(parts).encode()).hexdigest()


def _open_cached(folder: Path) -> CachedSplit | None:
    try:
        meta = json.loads((folder / "meta.json").read_text())
        images = np.load(folder / "images.npy", mmap_mode="r")
        labels = np.load(folder / "labels.npy")
        kept = np.load(folder / "kept.npy")
    except (OSError, ValueError):
        return None
    n = images.shape[0]
    if n != meta.get("count") or labels.shape != (n,) or kept.shape != (n,):
        return None
    return CachedSplit(images=images, labels=labels, kept=kept, from_cache=True,
                       skipped=list(meta.get("skipped", [])))


def write_index(folder: Path, source_name: str, split: str, size: int, channels: int,
                labels, kept, skipped: list[str]) -> None:
    """Everything of a cache entry beside images.npy: labels.npy, kept.npy and meta.json."""
    np.save(folder / "labels.npy", np.asarray(labels, dtype=np.int64))
    np.save(folder / "kept.npy", np.asarray(kept, dtype=np.int64))
    meta = {"source": source_name, "split": split, "count": len(kept), "size": size,
            "channels": channels, "version": CACHE_VERSION, "skipped": skipped}
    (folder / "meta.json").write_text(json.dumps(meta, indent=1))


def load_split(
    source: Source,
    split: str,
    size: int,
    channels: int,
    cache_dir: str | os.PathLike,
    on_bad: str = "error",
    workers: int | None = None,
    indices: np.ndarray | None = None,
) -> CachedSplit:
    """The decoded split, from the cache when its key (source fingerprint, size, channels) matches.

    `indices` (positions in `source.samples(split)`) decodes only those samples, e.g. a
    `data.max_train_samples` slice of a large dataset; None decodes the whole split.
    """
    check_on_bad(on_bad)
    if channels not in (1, 3):
        raise DataError(f"data.channels={channels}: expected 1 or 3")
    if size < 1:
        raise DataError(f"data.image_size={size}: expected a positive integer")

    if indices is not None:  # (a whole split is not listed on a cache hit: a CSV source would parse it)
        indices = np.unique(np.asarray(indices, dtype=np.int64))  # sorted: rows follow the source's order
        count = len(source.samples(split))
        if len(indices) == 0 or indices[0] < 0 or indices[-1] >= count:
            raise DataError(f"{source.name} split {split!r}: sample indices must lie in 0..{count - 1}")
        if len(indices) == count:
            indices = None  # every sample (e.g. train + held-out val): the whole split's shared entry

    cache_dir = Path(cache_dir)
    key = _cache_key(source, split, size, channels, indices)
    subset = "" if indices is None else f"sub{len(indices)}-"
    final = cache_dir / f"{source.name}-{split}-{subset}{key[:16]}"
    result = _open_cached(final) if final.is_dir() else None
    if result is None:
        cache_dir.mkdir(parents=True, exist_ok=True)
        with _exclusive(cache_dir / f".{final.name}.lock"):
            result = _open_cached(final) if final.is_dir() else None  # built while we waited for the lock?
            if result is None:
                result = _build_entry(source, split, size, channels, final, on_bad, workers, indices)
    _report_skipped(result, f"{source.name}/{split}", on_bad)
    return result


def _report_skipped(cached: CachedSplit, what: str, on_bad: str) -> None:
    """Samples an on_bad=skip build left out. The entry is shared but on_bad is each run's own: a later
    "skip" run is warned as the first was, and an "error" run stops as it would on a fresh decode."""
    if not cached.skipped:
        return
    if on_bad == "error":
        more = f", with {len(cached.skipped) - 1} more" if len(cached.skipped) > 1 else ""
        raise DataError(f"{cached.skipped[0]}: cannot read image (left out by an earlier data.on_bad=skip run"
                        f"{more}; fix or remove it, or set data.on_bad=skip)")
    warn_skipped(what, "unreadable image(s)", cached.skipped)


@contextmanager
def _exclusive(lock_path: Path) -> Iterator[None]:
    """Holds an exclusive advisory lock on `lock_path` while the body runs (released if the process dies).

    Where there is none to have (Windows; network filesystems where flock fails), the body runs unlocked.
    """
    handle = None
    if fcntl is not None:
        try:
            handle = open(lock_path, "ab")
            fcntl.flock(handle, fcntl.LOCK_EX)
        except OSError:
            if handle is not None:
                handle.close()
            handle = None
    try:
        yield
    finally:
        if handle is not None:
            handle.close()  # releases the lock; the empty file stays, for the next builder to lock


def _build_entry(source: Source, split: str, size: int, channels: int, final: Path, on_bad: str,
                 workers: int | None, indices: np.ndarray | None) -> CachedSplit:
    """Decodes the split into a temporary folder beside `final`, then moves it into place."""
    samples = source.samples(split)
    if not samples:
        raise DataError(f"{source.name} split {split!r}: no samples")
    chosen = np.arange(len(samples)) if indices is None else indices
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    tmp.mkdir()
    try:
        good, skipped = _build(source, samples, chosen, split, size, channels, tmp, on_bad, workers)
        write_index(tmp, source.name, split, size, channels,
                    labels=[samples[i].label for i in good], kept=good, skipped=skipped)
        _publish(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # ours, unless it was renamed into place

    result = _open_cached(final)
    if result is None:
        raise DataError(f"{final}: cache folder could not be read back after writing it")
    result.from_cache = False
    log.info("decoded %d images of %s/%s into %s", len(result.labels), source.name, split, final)
    return result


def _publish(tmp: Path, final: Path) -> None:
    """Renames the built folder `tmp` to `final`, keeping a readable `final` that is already there.

    Without the lock another process may rename its identical copy into place at any moment, so `final`
    is never deleted where it stands: only one still unreadable after our rename failed (a broken
    leftover) is renamed aside, under a name of our own, and removed from there.
    """
    if _open_cached(final) is not None:
        return  # another process's identical copy: ours is dropped
    try:
        os.rename(tmp, final)
        return
    except OSError:
        if not final.exists():
            raise
    if _open_cached(final) is not None:
        return  # it arrived between our check and our rename
    aside = final.with_name(f".{final.name}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        os.rename(final, aside)
    except OSError:
        pass  # someone else moved it first
    try:
        os.rename(tmp, final)
    except OSError:
        if _open_cached(final) is None:
            raise
    shutil.rmtree(aside, ignore_errors=True)


def _build(source, samples: list[Sample], chosen: np.ndarray, split, size, channels, tmp: Path, on_bad, workers):
    """Decode samples[chosen] into tmp/images.npy; returns (sample indices of the good rows, skipped `where`s)."""
    n = len(chosen)
    images = np.lib.format.open_memmap(tmp / "images.npy", mode="w+", dtype=np.uint8,
                                       shape=(n, channels, size, size))

    def work(row: int) -> str | None:
        # Threads: PIL decodes and resizes without the GIL. Each writes its own row of the memmap.
        sample = samples[chosen[row]]
        try:
            images[row] = decode(source.load(sample), size, channels)
            return None
        except Exception as exc:  # noqa: BLE001 - any failure to read is the sample's fault
            return _reason(exc, sample.where)

    bad: list[int] = []
    skipped: list[str] = []
    first_reason = ""
    with ThreadPoolExecutor(max_workers=workers or usable_cpus()) as pool:
        for start in range(0, n, CHUNK):
            idx = range(start, min(start + CHUNK, n))
            for row, reason in zip(idx, pool.map(work, idx)):
                if reason is None:
                    continue
                where = samples[chosen[row]].where
                if on_bad == "error":
                    raise DataError(f"{where}: cannot read image ({reason})")
                bad.append(row)
                skipped.append(where)
                first_reason = first_reason or f"{where}: {reason}"
    bad_set = set(bad)
    good = [row for row in range(n) if row not in bad_set]
    if not good:
        raise DataError(f"{source.name} split {split!r}: none of the {n} images could be read ({first_reason})")
    images.flush()
    if bad:
        # Rewrite without the holes, chunk by chunk, so RAM stays small.
        compact = np.lib.format.open_memmap(tmp / "images.tmp.npy", mode="w+", dtype=np.uint8,
                                            shape=(len(good), channels, size, size))
        for start in range(0, len(good), CHUNK):
            compact[start:start + CHUNK] = images[good[start:start + CHUNK]]
        compact.flush()
        del compact, images
        os.replace(tmp / "images.tmp.npy", tmp / "images.npy")
    else:
        del images
    return [int(chosen[row]) for row in good], skipped
