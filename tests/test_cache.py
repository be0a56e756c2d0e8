"""The decoded uint8 cache: modes, resizing, channels, hits without decoding, bad samples, keys."""

from __future__ import annotations

import hashlib
import io
import json
import multiprocessing
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fer.data import cache
from fer.data.base import Sample, Source, SplitRoles
from fer.data.cache import CACHE_VERSION, CachedSplit, decode, default_cache_dir, load_split
from fer.data.sources import Fer2013CsvSource, FolderSource
from fer.errors import DataError


def save(path: Path, im: Image.Image, **kw) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    im.save(path, **kw)
    return path


def random_rgb(w=20, h=24, seed=0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB")


def mixed_tree(root: Path) -> Path:
    """Faces in many modes and sizes: L, RGB, RGBA, P with transparency, CMYK JPEG, 16-bit PNG, LA, 1."""
    happy, sad = root / "train" / "happiness", root / "train" / "sad"
    save(happy / "a_l.png", random_rgb(20, 24, 1).convert("L"))
    save(happy / "b_rgb.jpg", random_rgb(48, 48, 2))
    save(happy / "c_rgba.png", random_rgb(30, 20, 3).convert("RGBA"))
    p = random_rgb(16, 16, 4).convert("P")
    save(happy / "d_p.png", p, transparency=0)
    save(sad / "e_cmyk.jpg", random_rgb(24, 20, 5).convert("CMYK"))
    save(sad / "f_16bit.png", Image.fromarray(np.full((24, 20), 32896, dtype=np.uint16)))  # 128 * 257
    save(sad / "g_la.png", random_rgb(20, 20, 6).convert("LA"))
    save(sad / "h_1bit.png", random_rgb(20, 20, 7).convert("1"))
    return root


class ListSource(Source):
    """An in-memory source: one split of given images (PIL or arrays), for cache tests."""

    name = "list"

    def __init__(self, images, fp="v1"):
        self.images, self.fp = images, fp

    def roles(self):
        return SplitRoles(train="train")

    def samples(self, split):
        return [Sample(where=f"item{i}", label=i % 7, ref=i) for i in range(len(self.images))]

    def load(self, sample):
        img = self.images[sample.ref]
        if isinstance(img, Exception):
            raise img
        return img

    def fingerprint(self, split):
        return self.fp


def cache_folders(cache: Path) -> list[str]:
    """Entries and temporary folders; not the lock files builders leave (empty, one per entry)."""
    return sorted(p.name for p in cache.iterdir() if not p.name.endswith(".lock")) if cache.exists() else []


@pytest.mark.parametrize("channels", [1, 3])
def test_mixed_modes_shape_dtype_labels(tmp_path, channels):
    src = FolderSource(mixed_tree(tmp_path / "d"))
    out = load_split(src, "train", 32, channels, tmp_path / "cache", workers=2)
    assert isinstance(out, CachedSplit) and not out.from_cache and out.skipped == []
    assert isinstance(out.images, np.memmap)
    assert out.images.shape == (8, channels, 32, 32) and out.images.dtype == np.uint8
    assert out.labels.dtype == np.int64 and out.labels.tolist() == [3] * 4 + [4] * 4
    sixteen = out.images[5]  # f_16bit.png: rescaled to 8 bits (128), not clipped to 255
    assert sixteen.min() == sixteen.max() == 128
    [folder] = cache_folders(tmp_path / "cache")  # no temp folders left behind
    assert folder.startswith("d-train-")
    meta = json.loads((tmp_path / "cache" / folder / "meta.json").read_text())
    assert meta["count"] == 8 and meta["size"] == 32 and meta["channels"] == channels


def test_decode_colours_resize_and_arrays():
    solid = Image.new("RGB", (40, 30), (200, 100, 50))  # not square: stretched to a square
    assert decode(solid, 16, 3).shape == (3, 16, 16)
    assert decode(solid, 16, 3)[:, 5, 5].tolist() == [200, 100, 50]
    assert set(np.unique(decode(solid, 16, 1))) == {124}  # ITU-R 601 luma of (200, 100, 50)
    assert np.unique(decode(solid.convert("CMYK"), 8, 3)[0]).tolist() == [200]
    assert decode(Image.new("L", (8, 8), 77), 8, 3)[:, 0, 0].tolist() == [77, 77, 77]
    assert decode(Image.fromarray(np.full((8, 8), 65535, np.uint16)), 4, 1).max() == 255
    assert decode(Image.fromarray(np.full((8, 8), 1000, np.int32)), 4, 1).max() == 4  # "I": 16-bit range
    gray = np.arange(48 * 48, dtype=np.uint8).reshape(48, 48)
    assert np.array_equal(decode(gray, 48, 1)[0], gray)
    hwc = np.zeros((10, 12, 3), np.uint8)
    hwc[..., 2] = 9
    assert decode(hwc, 6, 3)[2].min() == 9 and decode(hwc[..., :1], 6, 1).shape == (1, 6, 6)
    with pytest.raises(DataError, match="uint8"):
        decode(gray.astype(np.float32), 8, 1)


def test_int32_image_holding_8bit_values_is_not_darkened(tmp_path):
    # numpy's int32 saved as TIFF opens as mode "I": values within 0..255 are 8-bit already.
    gray = np.arange(64, dtype=np.int32).reshape(8, 8) * 4
    path = save(tmp_path / "i32.tif", Image.fromarray(gray))
    with Image.open(path) as im:
        assert im.mode == "I"
        assert np.array_equal(decode(im, 8, 1)[0], gray)
    # "I;16" is 16-bit whatever it holds: 200 of 65535 is nearly black
    assert np.unique(decode(Image.fromarray(np.full((8, 8), 200, np.uint16)), 4, 1)).tolist() == [1]


def test_transparent_pixels_decode_as_white_as_fer_predict_reads_them():
    from fer.faces import load_pixels

    rgba = np.zeros((8, 8, 4), np.uint8)  # black under full transparency, except one opaque grey half
    rgba[:, :4] = (90, 90, 90, 255)
    for image in (Image.fromarray(rgba, "RGBA"), rgba, Image.fromarray(rgba, "RGBA").convert("LA")):
        trained = decode(image, 8, 1)[0]
        assert trained[:, 4:].min() == 255 and trained[:, :4].max() == 90
        assert np.array_equal(trained, np.asarray(Image.fromarray(load_pixels(image)).convert("L")))


def test_downscale_averages(tmp_path):
    # A fine checkerboard shrunk 8x must average to grey, not alias to black or white.
    board = (np.indices((64, 64)).sum(0) % 2 * 255).astype(np.uint8)
    small = decode(board, 8, 1)
    assert 100 < small.mean() < 155 and small.std() < 20


def test_hit_does_not_decode(tmp_path, monkeypatch):
    src = FolderSource(mixed_tree(tmp_path / "d"))
    first = load_split(src, "train", 24, 3, tmp_path / "cache")
    first_images = np.array(first.images)

    def boom(sample):
        raise AssertionError("decoded on a cache hit")

    monkeypatch.setattr(src, "load", boom)
    again = load_split(src, "train", 24, 3, tmp_path / "cache")
    assert again.from_cache and isinstance(again.images, np.memmap)
    assert not again.images.flags.writeable
    assert np.array_equal(again.images, first_images) and np.array_equal(again.labels, first.labels)
    # size and channels are part of the key
    monkeypatch.undo()
    assert not load_split(src, "train", 16, 3, tmp_path / "cache").from_cache
    assert not load_split(src, "train", 24, 1, tmp_path / "cache").from_cache
    assert len(cache_folders(tmp_path / "cache")) == 3


def test_changed_file_changes_key(tmp_path):
    root = mixed_tree(tmp_path / "d")
    load_split(FolderSource(root), "train", 16, 1, tmp_path / "cache")
    save(root / "train" / "sad" / "e_cmyk.jpg", Image.new("RGB", (10, 10), (255, 255, 255)))
    out = load_split(FolderSource(root), "train", 16, 1, tmp_path / "cache")
    assert not out.from_cache and out.images[4].min() == 255
    assert len(cache_folders(tmp_path / "cache")) == 2


def test_broken_cache_folder_is_rebuilt(tmp_path):
    src = ListSource([Image.new("L", (8, 8), 5)] * 3)
    load_split(src, "train", 8, 1, tmp_path / "cache")
    [folder] = cache_folders(tmp_path / "cache")
    (tmp_path / "cache" / folder / "images.npy").unlink()
    out = load_split(src, "train", 8, 1, tmp_path / "cache")
    assert not out.from_cache and out.images.shape == (3, 1, 8, 8)


def corrupt_tree(root: Path, kind: str) -> Path:
    happy = root / "train" / "happy"
    save(happy / "a.png", random_rgb())
    if kind == "corrupt":
        (happy / "b.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not really a jpeg")
    elif kind == "truncated":
        buf = io.BytesIO()
        random_rgb(64, 64).save(buf, "JPEG", quality=95)
        (happy / "b.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    else:
        (happy / "b.txt").write_text("notes about the dataset")
    save(happy / "c.png", random_rgb(seed=2))
    return root


@pytest.mark.parametrize("kind", ["corrupt", "truncated", "notes"])
def test_bad_image_errors_before_caching(tmp_path, kind):
    root = corrupt_tree(tmp_path / "d", kind)
    bad = next(p for p in (root / "train" / "happy").iterdir() if p.name.startswith("b"))
    with pytest.raises(DataError) as e:
        load_split(FolderSource(root), "train", 16, 1, tmp_path / "cache")
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"{bad}: cannot read image (")
    assert cache_folders(tmp_path / "cache") == []  # nothing cached, no temp folder left


@pytest.mark.parametrize("kind", ["corrupt", "truncated", "notes"])
def test_bad_image_skipped(tmp_path, kind):
    root = corrupt_tree(tmp_path / "d", kind)
    src = FolderSource(root)
    with pytest.warns(UserWarning, match="skipped 1 unreadable image") as rec:
        out = load_split(src, "train", 16, 3, tmp_path / "cache", on_bad="skip")
    assert len(rec) == 1
    assert out.images.shape == (2, 3, 16, 16) and out.labels.tolist() == [3, 3]
    assert [Path(w).name[0] for w in out.skipped] == ["b"]
    c = decode(src.load(src.samples("train")[2]), 16, 3)
    assert np.array_equal(out.images[1], c)  # c.png lands right after a.png
    with pytest.warns(UserWarning, match="skipped 1 unreadable image"):  # again, on the cache hit
        again = load_split(src, "train", 16, 3, tmp_path / "cache", on_bad="skip")
    assert again.from_cache and again.skipped == out.skipped


def test_entry_built_with_skip_still_errors_or_warns_on_a_hit(tmp_path):
    # The entry is shared, data.on_bad is each run's: an "error" run must not train on a skip run's holes.
    root = corrupt_tree(tmp_path / "d", "corrupt")
    with pytest.warns(UserWarning, match="skipped 1 unreadable image"):
        load_split(FolderSource(root), "train", 16, 1, tmp_path / "cache", on_bad="skip")
    with pytest.raises(DataError) as e:
        load_split(FolderSource(root), "train", 16, 1, tmp_path / "cache")
    bad = root / "train" / "happy" / "b.jpg"
    assert str(e.value).startswith(f"{bad}: cannot read image (left out by an earlier data.on_bad=skip run")
    assert "\n" not in str(e.value)
    with pytest.warns(UserWarning, match=r"d/train: skipped 1 unreadable image\(s\): .*b\.jpg") as rec:
        again = load_split(FolderSource(root), "train", 16, 1, tmp_path / "cache", on_bad="skip")
    assert again.from_cache and len(rec) == 1


def test_csv_bad_pixels_error_and_skip(tmp_path):
    px = " ".join(["7"] * 2304)
    path = tmp_path / "fer2013.csv"
    path.write_text(f"emotion,pixels,Usage\n1,{px},Training\n2,1 2 3,Training\n3,{px},Training\n")
    src = Fer2013CsvSource(path)
    with pytest.raises(DataError) as e:
        load_split(src, "Training", 48, 1, tmp_path / "cache")
    assert str(e.value) == "fer2013.csv row 3: cannot read image (expected 2304 pixel values (48x48), got 3)"
    with pytest.warns(UserWarning, match="skipped 1"):
        out = load_split(src, "Training", 24, 3, tmp_path / "cache", on_bad="skip")
    assert out.skipped == ["fer2013.csv row 3"] and out.labels.tolist() == [1, 3]
    assert out.images.shape == (2, 3, 24, 24) and out.images.min() == out.images.max() == 7


def test_order_kept_with_many_workers(tmp_path):
    images = [Image.new("L", (9, 11), i) for i in range(40)]
    images[7] = OSError("broken")
    with pytest.warns(UserWarning, match="skipped 1 unreadable image.*item7"):
        out = load_split(ListSource(images), "train", 4, 1, tmp_path / "cache", on_bad="skip", workers=4)
    assert out.images[:, 0, 0, 0].tolist() == [i for i in range(40) if i != 7]
    assert out.labels.tolist() == [i % 7 for i in range(40) if i != 7]
    assert out.kept.tolist() == [i for i in range(40) if i != 7]


class SlowLoggingSource(ListSource):
    """Appends one line per decoded sample to a file shared by processes, and decodes slowly."""

    def __init__(self, log: Path):
        super().__init__([Image.new("L", (8, 8), i) for i in range(4)])
        self.log = log

    def load(self, sample):
        with open(self.log, "a") as f:
            f.write(f"{sample.ref}\n")
        time.sleep(0.1)  # a build takes long enough for every process to miss the cache at first
        return super().load(sample)


def build_at_once(source: Source, cache_dir: Path, barrier, results) -> None:
    barrier.wait()
    try:
        out = load_split(source, "train", 8, 1, cache_dir, workers=1)
        results.put(("ok", out.images[:, 0, 0, 0].tolist()))
    except Exception as exc:  # noqa: BLE001 - reported to the test
        results.put((f"{type(exc).__name__}: {exc}", None))


def test_processes_building_one_entry_at_once_decode_it_once(tmp_path):
    # DDP ranks and SLURM tasks set up at once: the others wait for one builder and then hit its copy.
    ctx = multiprocessing.get_context("fork" if sys.platform == "linux" else "spawn")
    n = 4
    barrier, results = ctx.Barrier(n), ctx.Queue()
    source = SlowLoggingSource(tmp_path / "decoded.log")
    procs = [ctx.Process(target=build_at_once, args=(source, tmp_path / "cache", barrier, results))
             for _ in range(n)]
    for p in procs:
        p.start()
    outcomes = [results.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(timeout=60)
    assert outcomes == [("ok", [0, 1, 2, 3])] * n
    assert sorted((tmp_path / "decoded.log").read_text().split()) == ["0", "1", "2", "3"]  # one build
    assert len(cache_folders(tmp_path / "cache")) == 1  # no temporary folder left


@pytest.mark.parametrize("lock", ["no fcntl", "flock fails"])
def test_without_a_lock_a_broken_entry_is_still_replaced(tmp_path, monkeypatch, lock):
    # Windows has no fcntl; some network filesystems refuse flock: the build goes on unlocked.
    if lock == "no fcntl":
        monkeypatch.setattr(cache, "fcntl", None)
    elif cache.fcntl is None:
        pytest.skip("no fcntl here")
    else:
        def refuse(*args):
            raise OSError(38, "Function not implemented")

        monkeypatch.setattr(cache.fcntl, "flock", refuse)
    src = ListSource([Image.new("L", (8, 8), 5)] * 3)
    load_split(src, "train", 8, 1, tmp_path / "cache")
    [folder] = cache_folders(tmp_path / "cache")
    (tmp_path / "cache" / folder / "labels.npy").unlink()  # a broken leftover under the key
    out = load_split(src, "train", 8, 1, tmp_path / "cache")
    assert not out.from_cache and out.images.shape == (3, 1, 8, 8)
    assert cache_folders(tmp_path / "cache") == [folder]  # the broken copy, renamed aside, is gone too
    assert load_split(src, "train", 8, 1, tmp_path / "cache").from_cache


def test_decoding_threads_follow_the_usable_cpus(tmp_path, monkeypatch):
    seen = []

    class Pool(cache.ThreadPoolExecutor):
        def __init__(self, max_workers):
            seen.append(max_workers)
            super().__init__(max_workers)

    monkeypatch.setattr(cache, "ThreadPoolExecutor", Pool)
    monkeypatch.setattr(cache, "usable_cpus", lambda: 3)  # e.g. a SLURM task's share of a bigger node
    load_split(ListSource([Image.new("L", (8, 8))] * 2), "train", 8, 1, tmp_path)
    assert seen == [3]


class CountingSource(ListSource):
    def __init__(self, images, fp="v1"):
        super().__init__(images, fp)
        self.loaded: list[int] = []

    def load(self, sample):
        self.loaded.append(sample.ref)
        return super().load(sample)


def test_indices_decode_only_those_samples_in_their_own_entry(tmp_path):
    images = [Image.new("L", (6, 6), i) for i in range(30)]
    images[12] = OSError("broken")
    src = CountingSource(images)
    with pytest.warns(UserWarning, match="skipped 1 unreadable image.*item12"):
        sub = load_split(src, "train", 4, 1, tmp_path / "cache", on_bad="skip", indices=np.array([20, 3, 12, 3]))
    assert sorted(src.loaded) == [3, 12, 20]  # deduplicated, and nothing else decoded
    assert sub.images[:, 0, 0, 0].tolist() == [3, 20] and sub.kept.tolist() == [3, 20]
    assert sub.labels.tolist() == [3, 20 % 7]
    src.loaded.clear()
    with pytest.warns(UserWarning, match="skipped 1 unreadable image.*item12"):
        again = load_split(src, "train", 4, 1, tmp_path / "cache", on_bad="skip", indices=np.array([3, 12, 20]))
    assert again.from_cache and src.loaded == [] and again.skipped == ["item12"]
    other = load_split(src, "train", 4, 1, tmp_path / "cache", on_bad="skip", indices=np.array([3, 20]))
    assert not other.from_cache and sorted(src.loaded) == [3, 20]  # another subset, another entry
    with pytest.warns(UserWarning, match="skipped 1"):
        whole = load_split(src, "train", 4, 1, tmp_path / "cache", on_bad="skip")
    assert not whole.from_cache and len(whole.kept) == 29
    with pytest.warns(UserWarning, match="skipped 1"):
        every = load_split(src, "train", 4, 1, tmp_path / "cache", on_bad="skip", indices=np.arange(30))
    assert every.from_cache  # indices covering the split name the whole split's entry
    assert len([f for f in cache_folders(tmp_path / "cache") if f.startswith("list-train-sub")]) == 2


def test_indices_out_of_range_name_the_split(tmp_path):
    src = ListSource([Image.new("L", (6, 6))] * 5)
    with pytest.raises(DataError, match=r"list split 'train': sample indices must lie in 0\.\.4"):
        load_split(src, "train", 4, 1, tmp_path / "cache", indices=np.array([2, 5]))


def test_empty_and_all_bad_splits(tmp_path):
    with pytest.raises(DataError, match="split 'train': no samples"):
        load_split(ListSource([]), "train", 8, 1, tmp_path / "cache")
    with pytest.raises(DataError, match=r"none of the 2 images could be read \(item0: x\)"):
        load_split(ListSource([OSError("x"), OSError("y")]), "train", 8, 1, tmp_path / "cache", on_bad="skip")
    assert cache_folders(tmp_path / "cache") == []


def test_bad_arguments(tmp_path):
    src = ListSource([Image.new("L", (8, 8))])
    with pytest.raises(DataError, match="on_bad"):
        load_split(src, "train", 8, 1, tmp_path, on_bad="ignore")
    with pytest.raises(DataError, match="channels"):
        load_split(src, "train", 8, 2, tmp_path)


def test_key_covers_fingerprint_and_version(tmp_path):
    load_split(ListSource([Image.new("L", (8, 8))], fp="a"), "train", 8, 1, tmp_path)
    load_split(ListSource([Image.new("L", (8, 8))], fp="b"), "train", 8, 1, tmp_path)
    key = hashlib.sha1("\0".join(["a", "8", "1", str(CACHE_VERSION)]).encode()).hexdigest()
    assert f"list-train-{key[:16]}" in cache_folders(tmp_path)
    assert len(cache_folders(tmp_path)) == 2


def test_default_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("FER_CACHE_DIR", str(tmp_path / "x"))
    assert default_cache_dir() == tmp_path / "x"
    monkeypatch.delenv("FER_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "xdg" / "fer"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_cache_dir() == tmp_path / "home" / ".cache" / "fer"
