"""Source readers: class-folder trees, the FER2013 CSV and fer2013_source's layout detection."""

from __future__ import annotations

import collections
import os
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from hydra.utils import instantiate

from conftest import compose_train
from fer.data.base import SplitRoles
from fer.data.cache import load_split
from fer.data.sources import Fer2013CsvSource, FolderSource, fer2013_source, folder_source
from fer.errors import DataError
from fer.labels import CLASS_TO_INDEX

REAL_FER2013 = Path(__file__).resolve().parents[2] / "shared/data/fer2013"


def face(path: Path, size=(20, 24), mode="L", seed=0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    a = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(a, "RGB").convert(mode).save(path)
    return path


def tree(root: Path, layout: dict[str, dict[str, int]]) -> Path:
    """layout = {split: {class_folder: number_of_images}}"""
    for split, classes in layout.items():
        for cls, n in classes.items():
            (root / split / cls).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                face(root / split / cls / f"img{i}.png", seed=i)
    return root


def one_line(exc: pytest.ExceptionInfo) -> str:
    msg = str(exc.value)
    assert "\n" not in msg
    return msg


# --- FolderSource ---------------------------------------------------------------------------------


def test_folder_aliases_roles_and_sorting(tmp_path):
    root = tree(tmp_path / "raf", {
        "train": {"anger": 2, "happiness": 1, "sadness": 1, "Surprised": 1},
        "validation": {"happy": 1},
        "test": {"neutral": 1},
    })
    (root / "train" / "anger" / ".DS_Store").write_bytes(b"junk")
    (root / "train" / "anger" / "notes.txt").write_text("not an image")
    (root / "README.txt").write_text("loose files at the top are not splits")
    src = FolderSource(root)
    assert src.roles() == SplitRoles(train="train", val="validation", test="test")
    assert src.name == "raf"
    samples = src.samples("train")
    names = [Path(s.where).relative_to(root / "train").as_posix() for s in samples]
    # dotfiles skipped; notes.txt kept (it fails at decode time, through on_bad); sorted by path
    assert names == ["Surprised/img0.png", "anger/img0.png", "anger/img1.png", "anger/notes.txt",
                     "happiness/img0.png", "sadness/img0.png"]
    assert [s.label for s in samples] == [CLASS_TO_INDEX[c] for c in
                                          ("surprise", "angry", "angry", "angry", "happy", "sad")]
    assert samples == src.samples("train")  # deterministic
    img = src.load(samples[1])
    assert isinstance(img, Image.Image) and img.size == (20, 24)


def test_folder_roles_variants(tmp_path):
    a = FolderSource(tree(tmp_path / "a", {"training": {"sad": 1}, "valid": {"sad": 1}, "testing": {"sad": 1}}))
    assert a.roles() == SplitRoles(train="training", val="valid", test="testing")
    b = folder_source(tree(tmp_path / "b", {"train": {"sad": 1}}))
    assert b.roles() == SplitRoles(train="train", val=None, test=None)
    c = FolderSource(tmp_path / "a", split_names={"train": "training", "val": "testing", "test": "testing"})
    assert c.roles().val == "testing"


def test_folder_without_train_split(tmp_path):
    root = tree(tmp_path / "flat", {"angry": {"x": 1}})  # class folders one level too high... as splits
    with pytest.raises(DataError, match="train/") as e:
        FolderSource(root)
    assert str(root) in one_line(e)
    with pytest.raises(DataError, match="no such directory") as e:
        FolderSource(tmp_path / "missing")
    assert one_line(e).startswith(f"data.root={tmp_path / 'missing'}")


def test_folder_unknown_class_and_ignore(tmp_path):
    root = tree(tmp_path / "affectnet", {"train": {"happy": 1, "contempt": 2}})
    with pytest.raises(DataError, match="unknown expression class 'contempt'") as e:
        FolderSource(root).samples("train")
    assert str(root / "train" / "contempt") in one_line(e)
    src = FolderSource(root, ignore_classes=["contempt"])
    assert [s.label for s in src.samples("train")] == [CLASS_TO_INDEX["happy"]]


def test_unknown_class_error_names_the_real_config_key(tmp_path):
    root = tree(tmp_path / "affectnet", {"train": {"happy": 1, "contempt": 1}})
    with pytest.raises(DataError) as e:
        FolderSource(root).samples("train")
    assert one_line(e).endswith("or list it in data.source.ignore_classes")


@pytest.mark.parametrize("ignore", [["disgust"], ["Disgusted"], ["disgusting"]])
def test_ignoring_a_known_class_drops_its_folder_under_any_alias(tmp_path, ignore):
    # data.source.ignore_classes=[disgust], a common FER2013 choice, must not be overruled by the aliases.
    root = tree(tmp_path / "d", {"train": {"happy": 1, "disgusted": 1, "contempt": 1}})
    src = FolderSource(root, ignore_classes=[*ignore, "contempt"])
    assert [Path(s.where).parent.name for s in src.samples("train")] == ["happy"]
    plain = tree(tmp_path / "e", {"train": {"happy": 1, "disgust": 1, "sad": 1}})
    assert [s.label for s in FolderSource(plain, ignore_classes=ignore).samples("train")] == [
        CLASS_TO_INDEX["happy"], CLASS_TO_INDEX["sad"]]


def test_folder_empty_class_folder(tmp_path):
    root = tree(tmp_path / "d", {"train": {"happy": 1, "sad": 0}})
    (root / "train" / "sad" / ".DS_Store").write_bytes(b"")  # hidden files do not count
    with pytest.raises(DataError, match="empty class folder") as e:
        FolderSource(root).samples("train")
    assert str(root / "train" / "sad") in one_line(e)


def test_flat_tree_of_alias_class_folders_gets_the_hint(tmp_path):
    root = tree(tmp_path / "flat", {"anger": {"x": 1}, "happiness": {"y": 1}})  # no train/ level
    with pytest.raises(DataError) as e:
        FolderSource(root)
    assert "class folders sit directly under root" in one_line(e)


@pytest.mark.skipif(sys.platform in ("darwin", "win32"), reason="file names there are always Unicode")
def test_file_names_that_are_not_utf8(tmp_path):
    # A Latin-1 'café.png' unzipped from a Windows archive: listed, fingerprinted, cached and named printably.
    happy = tmp_path / "d" / "train" / "happy"
    face(happy / "ok.png")
    with open(os.path.join(os.fsencode(happy), b"caf\xe9.png"), "wb") as f:
        Image.new("L", (8, 8), 9).save(f, "PNG")
    with open(os.path.join(os.fsencode(happy), b"d\xe9j\xe0.png"), "wb") as f:
        f.write(b"not a png")
    src = FolderSource(tmp_path / "d")
    assert [Path(s.where).name for s in src.samples("train")] == ["caf\\xe9.png", "d\\xe9j\\xe0.png", "ok.png"]
    assert src.fingerprint("train") == FolderSource(tmp_path / "d").fingerprint("train")
    with pytest.raises(DataError) as e:
        load_split(src, "train", 8, 1, tmp_path / "cache")
    assert one_line(e).startswith(f"{happy}/d\\xe9j\\xe0.png: cannot read image (")
    str(e.value).encode("utf-8")  # prints and logs without a UnicodeEncodeError
    with pytest.warns(UserWarning, match=r"d\\xe9j\\xe0\.png"):
        out = load_split(src, "train", 8, 1, tmp_path / "cache", on_bad="skip")
    assert out.images[0].max() == 9


def test_folder_unknown_split(tmp_path):
    src = FolderSource(tree(tmp_path / "d", {"train": {"happy": 1}}))
    with pytest.raises(DataError, match="no split folder 'val'"):
        src.samples("val")


def test_folder_fingerprint_tracks_files(tmp_path):
    root = tree(tmp_path / "d", {"train": {"happy": 2}, "test": {"sad": 1}})
    src = FolderSource(root)
    fp = src.fingerprint("train")
    assert fp == FolderSource(root).fingerprint("train")
    assert fp != src.fingerprint("test")
    p = root / "train" / "happy" / "img0.png"
    st = p.stat()
    os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    assert FolderSource(root).fingerprint("train") != fp
    face(root / "train" / "happy" / "img9.png")
    assert FolderSource(root).fingerprint("train") != fp


def test_folder_load_applies_exif_orientation(tmp_path):
    p = tmp_path / "d" / "train" / "happy" / "rot.jpg"
    p.parent.mkdir(parents=True)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    Image.new("RGB", (20, 24)).save(p, exif=exif)
    src = FolderSource(tmp_path / "d")
    assert src.load(src.samples("train")[0]).size == (24, 20)


# --- FER2013 CSV ---------------------------------------------------------------------------------


def pixels(seed=0, n=48 * 48) -> str:
    return " ".join(map(str, np.random.default_rng(seed).integers(0, 256, n)))


def write_csv(path: Path, rows: list[tuple], header="emotion,pixels,Usage") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [header] + [",".join(str(c) for c in r) for r in rows]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_csv_roles_labels_and_load(tmp_path):
    rows = [(0, pixels(0), "Training"), (3, pixels(1), "Training"), (6, pixels(2), "PublicTest"),
            (5, pixels(3), "PrivateTest")]
    src = Fer2013CsvSource(write_csv(tmp_path / "fer2013.csv", rows))
    assert src.roles() == SplitRoles(train="Training", val="PublicTest", test="PrivateTest")
    train = src.samples("Training")
    assert [s.label for s in train] == [0, 3]
    assert [s.where for s in train] == ["fer2013.csv row 2", "fer2013.csv row 3"]
    assert src.samples("PrivateTest")[0].where == "fer2013.csv row 5"
    a = src.load(train[1])
    assert a.dtype == np.uint8 and a.shape == (48, 48)
    assert a.ravel().tolist() == [int(v) for v in pixels(1).split()]
    assert src.fingerprint("Training") != src.fingerprint("PublicTest")


def test_csv_other_column_order_and_missing_usages(tmp_path):
    path = tmp_path / "icml_face_data.csv"
    path.write_text(f"emotion, Usage, pixels\n2, Training,{pixels(0)}\n")
    src = Fer2013CsvSource(path)
    assert src.roles() == SplitRoles(train="Training", val=None, test=None)
    assert src.load(src.samples("Training")[0]).shape == (48, 48)


@pytest.mark.parametrize("row, match", [
    ((9, "1 2 3", "Training"), "fer2013.csv row 3: emotion 9 is outside 0..6"),
    (("x", "1 2 3", "Training"), "fer2013.csv row 3: emotion 'x' is not an integer"),
    ((1, "1 2 3", "Validation"), "fer2013.csv row 3: unknown Usage 'Validation'"),
])
def test_csv_bad_rows(tmp_path, row, match):
    src = Fer2013CsvSource(write_csv(tmp_path / "fer2013.csv", [(0, pixels(), "Training"), row]))
    with pytest.raises(DataError) as e:
        src.roles()
    assert one_line(e).startswith(match)


BAD_ROWS = {
    "label 7": "7,1 2 3,Training",
    "not an integer": "x,1 2 3,Training",
    "unknown Usage": "1,1 2 3,Validation",
    "cut short": "4,1 2 3 4",  # the last line of a partial download
}


@pytest.mark.parametrize("bad", list(BAD_ROWS))
def test_csv_bad_rows_skipped_with_on_bad_skip(tmp_path, bad):
    path = tmp_path / "fer2013.csv"
    path.write_text(f"emotion,pixels,Usage\n0,{pixels(0)},Training\n{BAD_ROWS[bad]}\n3,{pixels(1)},Training\n")
    with pytest.raises(DataError, match="fer2013.csv row 3: "):
        Fer2013CsvSource(path).roles()
    src = fer2013_source(path, on_bad="skip")
    with pytest.warns(UserWarning, match=r"fer2013.csv: skipped 1 bad row\(s\): fer2013.csv row 3 \(first: ") as rec:
        assert src.roles() == SplitRoles(train="Training")
        assert [s.where for s in src.samples("Training")] == ["fer2013.csv row 2", "fer2013.csv row 4"]
    assert len(rec) == 1  # once per source, however often it is listed
    out = load_split(src, "Training", 48, 1, tmp_path / "cache", on_bad="skip")
    assert out.labels.tolist() == [0, 3]


def test_csv_skip_has_its_own_cache_entry(tmp_path):
    # A skip listing may have rows left out; an "error" run must parse (and stop), not reuse it.
    path = write_csv(tmp_path / "fer2013.csv", [(0, pixels(), "Training"), (9, pixels(), "Training")])
    skip, error = Fer2013CsvSource(path, on_bad="skip"), Fer2013CsvSource(path)
    assert skip.fingerprint("Training") != error.fingerprint("Training")
    with pytest.warns(UserWarning, match="skipped 1 bad row"):
        load_split(skip, "Training", 48, 1, tmp_path / "cache", on_bad="skip")
    with pytest.raises(DataError, match="row 3: emotion 9 is outside"):
        load_split(error, "Training", 48, 1, tmp_path / "cache")
    with pytest.raises(DataError, match="data.on_bad='ignore'"):
        Fer2013CsvSource(path, on_bad="ignore")


def test_data_on_bad_reaches_the_csv_source(tmp_path):
    path = write_csv(tmp_path / "fer2013.csv", [(0, pixels(), "Training")])
    cfg = compose_train(tmp_path, ["data=fer2013", f"data.root={path}", "data.on_bad=skip"], tiny=False)
    src = instantiate(cfg.data.source)
    assert isinstance(src, Fer2013CsvSource) and src.on_bad == "skip"
    cfg = compose_train(tmp_path, ["data=fer2013", f"data.root={path}"], tiny=False)
    assert instantiate(cfg.data.source).on_bad == "error"


def test_csv_that_is_not_utf8_is_one_line(tmp_path):
    path = tmp_path / "fer2013.csv"
    path.write_bytes(f"emotion,pixels,Usage\n0,{pixels()},Training\n".encode("utf-16"))  # Excel's "Unicode Text"
    with pytest.raises(DataError) as e:
        Fer2013CsvSource(path).roles()
    assert one_line(e) == f"{path}: not UTF-8 text; save it as UTF-8"


def test_csv_bad_pixels_detected_at_load(tmp_path):
    rows = [(0, pixels(n=100), "Training"), (0, pixels(n=2303) + " 300", "Training"),
            (0, pixels(n=2303) + " z", "Training")]
    src = Fer2013CsvSource(write_csv(tmp_path / "fer2013.csv", rows))
    bad = src.samples("Training")  # listing succeeds: pixels are checked when decoding
    for sample, match in zip(bad, ["expected 2304 pixel values", "0..255", "'z' is not an integer"]):
        with pytest.raises(DataError, match=match) as e:
            src.load(sample)
        assert one_line(e).startswith(sample.where)


def test_csv_missing_column(tmp_path):
    path = write_csv(tmp_path / "fer2013.csv", [(0, "Training")], header="emotion,Usage")
    with pytest.raises(DataError, match="missing column 'pixels'") as e:
        Fer2013CsvSource(path).roles()
    assert str(path) in one_line(e)


# --- fer2013_source layout detection --------------------------------------------------------------


def test_fer2013_source_detection(tmp_path):
    csv_path = write_csv(tmp_path / "csvdir" / "fer2013.csv", [(0, pixels(), "Training")])
    (tmp_path / "csvdir" / "other.csv").write_text("a,b\n")
    assert isinstance(fer2013_source(csv_path), Fer2013CsvSource)
    assert isinstance(fer2013_source(tmp_path / "csvdir"), Fer2013CsvSource)  # fer2013.csv wins
    write_csv(tmp_path / "single" / "fer.csv", [(0, pixels(), "Training")])
    assert isinstance(fer2013_source(tmp_path / "single"), Fer2013CsvSource)

    images = tree(tmp_path / "images", {"train": {"angry": 1}, "test": {"angry": 1}})
    src = fer2013_source(images)
    assert isinstance(src, FolderSource)
    assert src.roles() == SplitRoles(train="train", val="test", test="test")  # test/ is PublicTest

    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="expected fer2013.csv") as e:
        fer2013_source(tmp_path / "empty")
    assert str(tmp_path / "empty") in one_line(e)
    with pytest.raises(DataError, match="no such directory") as e:
        fer2013_source(tmp_path / "nope")
    assert one_line(e) == f"data.root={tmp_path / 'nope'}: no such directory"


@pytest.mark.skipif(not REAL_FER2013.is_dir(), reason="shared FER2013 images not present")
def test_real_fer2013_layout():
    src = fer2013_source(REAL_FER2013)
    roles = src.roles()
    assert (roles.train, roles.val, roles.test) == ("train", "test", "test")
    counts = collections.Counter(s.label for s in src.samples(roles.test))
    expected = {"angry": 467, "disgust": 56, "fear": 496, "happy": 895, "sad": 653, "surprise": 415,
                "neutral": 607}
    assert counts == {CLASS_TO_INDEX[c]: n for c, n in expected.items()}
