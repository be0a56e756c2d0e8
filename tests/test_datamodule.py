from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from fer.data.datamodule import ArrayDataset, FERDataModule, stratified_split, subsample
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
    images, labels = next(iter(dm.train_dataloader()))
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


def test_bad_option_is_one_line_naming_the_key(tmp_path):
    with pytest.raises(DataError, match="data.on_bad"):
        FERDataModule(SyntheticSource(14, 7, 7), on_bad="ignore", cache_dir=tmp_path)
