from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from fer.data.datamodule import ArrayDataset, FERDataModule, rows_of, stratified_split, subsample
from fer.data.sources import folder_source
from fer.data.synthetic import SyntheticSource
from fer.errors import DataError


def test_stratified_split_keeps_every_class_in_both_parts():
    labels = np.repeat(np.arange(7), [100, 10, 50, 200, 80, 60, 90])
    train, val = stratified_split(labels, 0.1, seed=0)
    assert len(np.intersect1d(train, val)) == 0 and len(train) + len(val) == len(labels)
    assert np.array_equal(np.bincount(labels[val], minlength=7), [10, 1, 5, 20, 8, 6, 9])
    again, _ = stratified_split(labels, 0.1, seed=0)
    other, _ = stratified_split(labels, 0.1, seed=1)
    assert np.array_equal(train, again) and not np.array_equal(train, other)


def test_subsample_is_stratified():
    labels = np.repeat(np.arange(7), 100)
    picked = subsample(labels, np.arange(700), 70, seed=0)
    assert len(picked) == 70 and np.all(np.bincount(labels[picked]) == 10)


def test_subsample_keeps_every_class_so_a_small_limit_is_exceeded():
    # As its docstring says: about `limit`, never a class dropped (FER2013's train counts).
    labels = np.repeat(np.arange(7), [3995, 436, 4097, 7215, 4830, 3171, 4965])
    assert len(subsample(labels, np.arange(len(labels)), 5, seed=0)) == 7
    assert abs(len(subsample(labels, np.arange(len(labels)), 2000, seed=0)) - 2000) <= 3


def test_getitems_gathers_a_batch_in_sampler_order():
    images = np.arange(10, dtype=np.uint8).reshape(10, 1, 1, 1).repeat(4, 2).repeat(4, 3)
    labels = np.arange(10) % 7
    ds = ArrayDataset(images, labels, indices=np.array([9, 3, 5, 1]))
    batch, y = ds.__getitems__([2, 0, 3])
    assert batch.dtype == torch.uint8 and batch.shape == (3, 1, 4, 4)
    assert batch[:, 0, 0, 0].tolist() == [5, 9, 1] and y.tolist() == [5, 2, 1]


def test_loaders_serve_uint8_batches_and_augment_only_in_training(tmp_path):
    dm = FERDataModule(SyntheticSource(140, 70, 70), image_size=32, batch_size=16, cache_dir=tmp_path)
    dm.setup("fit")
    images, labels, _ = next(iter(dm.train_dataloader()))
    assert images.dtype == torch.uint8 and images.shape == (16, 1, 32, 32) and labels.dtype == torch.int64

    class FakeTrainer:
        training = False

    dm.trainer = FakeTrainer()
    val_out, _ = dm.on_after_batch_transfer((images, labels), 0)
    assert torch.equal(val_out, images.float() / 255)
    FakeTrainer.training = True
    train_out, _ = dm.on_after_batch_transfer((images, labels), 0)
    assert not torch.equal(train_out, val_out)


def test_val_split_made_when_source_has_none(tmp_path):
    root = tmp_path / "faces"
    for name in ("anger", "happiness", "neutral"):
        (root / "train" / name).mkdir(parents=True)
        for i in range(10):
            Image.fromarray(np.full((20, 20), i * 20, np.uint8)).save(root / "train" / name / f"{i}.png")
    dm = FERDataModule(folder_source(root), image_size=24, val_fraction=0.2, cache_dir=tmp_path / "cache")
    dm.setup("fit")
    assert len(dm.train_set) == 24 and len(dm.val_set) == 6
    assert np.array_equal(dm.class_counts()[[0, 3, 6]], [8, 8, 8])


def test_ignored_class_leaves_a_zero_count_among_seven(tmp_path):
    # data.source.ignore_classes=[disgust]: the model keeps seven outputs, disgust simply has no faces.
    root = tmp_path / "faces"
    for name in ("anger", "disgusted", "happiness", "neutral"):
        (root / "train" / name).mkdir(parents=True)
        for i in range(5):
            Image.fromarray(np.full((12, 12), i * 40, np.uint8)).save(root / "train" / name / f"{i}.png")
    dm = FERDataModule(folder_source(root, ignore_classes=["disgust"]), image_size=12, val_fraction=0.2,
                       sampler="balanced", cache_dir=tmp_path / "cache")
    dm.setup("fit")
    assert dm.class_counts().tolist() == [4, 0, 0, 4, 0, 0, 4]
    _, labels, _ = next(iter(dm.train_dataloader()))
    assert 1 not in labels.tolist()


def test_skipped_images_are_warned_about_once_per_run(tmp_path):
    # train.py calls prepare_data and setup, Lightning prepare_data again: one lookup, one warning.
    root = tmp_path / "faces"
    (root / "train" / "happy").mkdir(parents=True)
    for i in range(4):
        Image.fromarray(np.full((12, 12), i, np.uint8)).save(root / "train" / "happy" / f"{i}.png")
    (root / "train" / "happy" / "notes.txt").write_text("not an image")
    dm = FERDataModule(folder_source(root), image_size=12, on_bad="skip", cache_dir=tmp_path / "cache")
    with pytest.warns(UserWarning, match="skipped 1 unreadable image") as rec:
        dm.prepare_data()
        dm.setup("fit")
        dm.prepare_data()
    assert len(rec) == 1 and len(dm.train_set) + len(dm.val_set) == 4


def test_rows_of_maps_sample_indices_onto_decoded_rows():
    kept = np.array([0, 1, 3, 4, 7])  # samples 2, 5 and 6 were unreadable
    assert rows_of(kept, np.array([1, 2, 4, 7])).tolist() == [1, 3, 4]
    assert rows_of(kept, np.array([6, 8])).tolist() == [] and rows_of(kept, None).tolist() == [0, 1, 2, 3, 4]


class CountingSynthetic(SyntheticSource):
    def __init__(self, *args):
        super().__init__(*args)
        self.decoded: dict[str, int] = {}

    def load(self, sample):
        split = sample.where.split("/")[1]  # "synthetic/<split>/<i>"
        self.decoded[split] = self.decoded.get(split, 0) + 1
        return super().load(sample)


def test_sample_limits_decode_only_the_slices(tmp_path):
    src = CountingSynthetic(210, 70, 70)
    dm = FERDataModule(src, image_size=16, max_train_samples=35, max_val_samples=14, cache_dir=tmp_path)
    dm.prepare_data()
    dm.setup("fit")
    assert len(dm.train_set) == 35 and np.all(dm.train_set.class_counts() == 5)
    assert len(dm.val_set) == 14 and len(dm.test_set) == 70
    assert src.decoded == {"train": 35, "val": 14, "test": 70}  # setup found prepare_data's slices cached
    full = FERDataModule(src, image_size=16, cache_dir=tmp_path)
    full.setup("fit")
    assert src.decoded["train"] == 35 + 210  # the whole split is its own entry
    _, picks = dm.plan()["train"]
    # the slice holds exactly the faces an unlimited run has at those sample indices
    assert np.array_equal(dm.train_set.images[dm.train_set.indices], full.train_set.images[picks])


def test_held_out_val_is_the_same_whether_or_not_train_is_limited(tmp_path):
    root = tmp_path / "faces"
    for name in ("anger", "happiness", "neutral"):
        (root / "train" / name).mkdir(parents=True)
        for i in range(20):
            Image.fromarray(np.full((12, 12), i * 12 + len(name), np.uint8)).save(root / "train" / name / f"{i}.png")
    full = FERDataModule(folder_source(root), image_size=12, val_fraction=0.2, cache_dir=tmp_path / "cache")
    small = FERDataModule(folder_source(root), image_size=12, val_fraction=0.2, max_train_samples=15,
                          cache_dir=tmp_path / "cache")
    full.setup("fit")
    small.setup("fit")
    assert len(small.train_set) == 15 and np.all(small.train_set.class_counts()[[0, 3, 6]] == 5)
    val_full = full.val_set.images[full.val_set.indices]
    val_small = small.val_set.images[small.val_set.indices]
    assert len(val_full) == 12 and np.array_equal(val_full, val_small)
    train_faces = {full.train_set.images[i].tobytes() for i in full.train_set.indices}
    assert all(small.train_set.images[i].tobytes() in train_faces for i in small.train_set.indices)


def test_bad_option_is_one_line_naming_the_key(tmp_path):
    with pytest.raises(DataError, match="data.on_bad"):
        FERDataModule(SyntheticSource(14, 7, 7), on_bad="ignore", cache_dir=tmp_path)
