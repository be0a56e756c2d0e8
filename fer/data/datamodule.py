"""The LightningDataModule: a source decoded once into the uint8 cache, split, batched, augmented.

Batches are gathered straight from the memory-mapped cache with one fancy-index per batch
(`__getitems__`), so the loader does no per-image Python work; augmentation runs on the batch after it
reaches the model's device (`on_after_batch_transfer`).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, RandomSampler, WeightedRandomSampler

from fer.data.augment import BatchAugment, to_float
from fer.data.base import Source, check_on_bad
from fer.data.cache import CachedSplit, default_cache_dir, load_split, usable_cpus
from fer.errors import DataError
from fer.labels import CLASSES, NUM_CLASSES

log = logging.getLogger(__name__)


class ArrayDataset(Dataset):
    """Indexes uint8 (N, C, H, W) images and int64 labels; whole batches in one gather.

    With `with_positions`, a batch also carries each face's position in the set (what the sampler drew), so
    the model can remember per-face predictions across epochs (fer.models.self_distillation).
    """

    def __init__(self, images: np.ndarray, labels: np.ndarray, indices: np.ndarray | None = None,
                 with_positions: bool = False) -> None:
        self.images = images
        self.labels = labels
        self.indices = np.arange(len(labels)) if indices is None else np.asarray(indices)
        self.with_positions = with_positions

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        j = self.indices[i]
        return torch.from_numpy(np.array(self.images[j])), int(self.labels[j])

    def __getitems__(self, batch: list[int]) -> tuple[Tensor, ...]:
        positions = np.asarray(batch, dtype=np.int64)
        rows = self.indices[positions]
        order = np.argsort(rows)  # sorted reads are sequential on the memory map
        images = np.empty((len(rows), *self.images.shape[1:]), dtype=np.uint8)
        images[order] = self.images[rows[order]]
        gathered = torch.from_numpy(images), torch.from_numpy(self.labels[rows].astype(np.int64))
        return (*gathered, torch.from_numpy(positions)) if self.with_positions else gathered

    def class_counts(self) -> np.ndarray:
        return np.bincount(self.labels[self.indices], minlength=NUM_CLASSES)


def keep_batch(batch: Any) -> Any:
    """collate_fn for `__getitems__` datasets: the batch is already stacked."""
    return batch


def stratified_split(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, val) indices with `fraction` of every class in val, reproducible from `seed`."""
    rng = np.random.default_rng(seed)
    train, val = [], []
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        n_val = int(round(len(idx) * fraction))
        if len(idx) > 1:
            n_val = min(max(n_val, 1), len(idx) - 1)
        val.append(idx[:n_val])
        train.append(idx[n_val:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(val))


def subsample(labels: np.ndarray, indices: np.ndarray, limit: int | None, seed: int) -> np.ndarray:
    """About `limit` of `indices`, stratified so a slice keeps the class balance.

    Each class gives its rounded share, and at least one sample when it has two or more: the slice can
    be a few off `limit` either way, and keeps every such class even when `limit` is smaller than their number.
    """
    if not limit or limit >= len(indices):
        return indices
    fraction = limit / len(indices)
    _, picked = stratified_split(labels[indices], fraction, seed)
    return indices[picked]


def rows_of(kept: np.ndarray, picks: np.ndarray | None) -> np.ndarray:
    """Rows of a decoded split holding the sample indices `picks` (None: all rows); unreadable ones drop out."""
    if picks is None:
        return np.arange(len(kept))
    pos = np.searchsorted(kept, picks)
    found = pos < len(kept)
    found[found] = kept[pos[found]] == picks[found]
    return pos[found]


class FERDataModule(L.LightningDataModule):
    """Serves train / val / test splits of any `Source` at `image_size`, `channels` channels."""

    def __init__(
        self,
        source: Source,
        image_size: int = 64,
        channels: int = 1,
        batch_size: int = 64,
        eval_batch_size: int | None = None,
        num_workers: int | str = "auto",
        pin_memory: bool | str = "auto",
        val_fraction: float = 0.1,
        split_seed: int = 0,
        sampler: str = "random",
        max_train_samples: int | None = None,
        max_val_samples: int | None = None,
        on_bad: str = "error",
        cache_dir: str | os.PathLike | None = None,
        augment: BatchAugment | None = None,
        root: str | None = None,
    ) -> None:
        super().__init__()
        check_on_bad(on_bad)
        if sampler not in ("random", "balanced"):
            raise DataError(f"data.sampler={sampler!r}: expected 'random' or 'balanced'")
        self.source = source
        self.root = root  # recorded for the run's config; the source holds the real path
        self.image_size = int(image_size)
        self.channels = int(channels)
        self.batch_size = int(batch_size)
        self.eval_batch_size = int(eval_batch_size or 2 * batch_size)
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.val_fraction = float(val_fraction)
        self.split_seed = int(split_seed)
        self.sampler = sampler
        self.max_train_samples = max_train_samples
        self.max_val_samples = max_val_samples
        self.on_bad = on_bad
        self.cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
        self.augment = augment if augment is not None else BatchAugment()
        self.class_names = CLASSES
        self.train_set: ArrayDataset | None = None
        self.val_set: ArrayDataset | None = None
        self.test_set: ArrayDataset | None = None
        self.decoded_from_cache: dict[str, bool] = {}
        self._decoded: dict[tuple[str, bytes | None], CachedSplit] = {}

    # -- building the splits -------------------------------------------------------------------
    def sample_labels(self, split: str) -> np.ndarray:
        """Labels of every sample of a source split, read from the listing (nothing decoded)."""
        return np.array([s.label for s in self.source.samples(split)], dtype=np.int64)

    def held_out_val(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        """(train, val) sample indices of a split that has to lend its val_fraction to validation."""
        return stratified_split(self.sample_labels(split), self.val_fraction, self.split_seed)

    def plan(self, limits: bool = True) -> dict[str, tuple[str, np.ndarray | None]]:
        """For "train", "val" and "test": the source split and which of its samples (None: all of them).

        With `limits`, max_train_samples / max_val_samples draw stratified slices here, from the
        listing's labels, so only the slices get decoded (a smoke run on a large dataset stays cheap).
        """
        roles = self.source.roles()

        def limit(split: str, picks: np.ndarray | None, most: int | None) -> np.ndarray | None:
            if not (limits and most):
                return picks
            labels = self.sample_labels(split)
            picks = np.arange(len(labels)) if picks is None else picks
            return subsample(labels, picks, most, self.split_seed)

        if roles.val is not None:
            train = (roles.train, limit(roles.train, None, self.max_train_samples))
            val = (roles.val, limit(roles.val, None, self.max_val_samples))
        else:
            tr_idx, val_idx = self.held_out_val(roles.train)
            train = (roles.train, limit(roles.train, tr_idx, self.max_train_samples))
            val = (roles.train, limit(roles.train, val_idx, self.max_val_samples))
        test = (roles.test, None) if roles.test is not None else val
        return {"train": train, "val": val, "test": test}

    def decode(self, split: str, picks: np.ndarray | None) -> CachedSplit:
        """The split through the cache: whole, or only `picks` (sample indices) when given.

        Kept once opened: prepare_data and setup both ask (train.py, then Lightning), and the cache is
        looked up, and its skipped images warned about, once per run.
        """
        key = (split, None if picks is None else np.asarray(picks, dtype=np.int64).tobytes())
        if key not in self._decoded:
            self._decoded[key] = load_split(self.source, split, self.image_size, self.channels, self.cache_dir,
                                            on_bad=self.on_bad, indices=picks)
            self.decoded_from_cache[split] = self._decoded[key].from_cache
        return self._decoded[key]

    def _decode_plan(self) -> dict[str, ArrayDataset]:
        plan = self.plan()
        decoded: dict[str, CachedSplit] = {}
        for split in dict.fromkeys(name for name, _ in plan.values()):  # each source split decoded once
            picks = [p for name, p in plan.values() if name == split]
            # A split that any role uses whole is decoded whole (and shared); otherwise only the union.
            union = None if any(p is None for p in picks) else np.unique(np.concatenate(picks))
            decoded[split] = self.decode(split, union)
        return {role: ArrayDataset(decoded[name].images, decoded[name].labels, rows_of(decoded[name].kept, picks),
                                   with_positions=role == "train")
                for role, (name, picks) in plan.items()}

    def prepare_data(self) -> None:
        # Decode on one process only (rank 0); the other ranks then find the cache filled.
        self._decode_plan()

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None and (stage != "test" or self.test_set is not None):
            return  # idempotent: train.py sets up early to fail fast, Lightning calls again
        sets = self._decode_plan()
        self.train_set, self.val_set, self.test_set = sets["train"], sets["val"], sets["test"]
        log.info(
            "data: %d train / %d val / %d test images at %dpx, %d channel(s), cache %s",
            len(self.train_set), len(self.val_set), len(self.test_set),
            self.image_size, self.channels, self.cache_dir,
        )

    def class_counts(self) -> np.ndarray:
        """Training images per class (for inverse-frequency loss weights and the balanced sampler)."""
        if self.train_set is None:
            self.setup("fit")
        return self.train_set.class_counts()

    def state_dict(self) -> dict[str, Any]:
        # Saved by Lightning into every checkpoint (key "FERDataModule"), so a checkpoint copied out of its
        # run directory still says at which size and channel count its model was trained.
        return {"image_size": self.image_size, "channels": self.channels}

    # -- loaders --------------------------------------------------------------------------------
    def _on_accelerator(self) -> bool:
        trainer = getattr(self, "trainer", None)
        return trainer is not None and trainer.accelerator.__class__.__name__ != "CPUAccelerator"

    def _workers(self) -> int:
        if self.num_workers != "auto":
            return int(self.num_workers)
        # On the CPU the gather is cheaper than handing batches between processes; on a GPU,
        # workers keep the next batches ready while the device computes.
        return min(4, usable_cpus()) if self._on_accelerator() else 0

    def _loader(self, dataset: ArrayDataset, batch_size: int, train: bool) -> DataLoader:
        workers = self._workers()
        pin = self._on_accelerator() if self.pin_memory == "auto" else bool(self.pin_memory)
        sampler = None
        if train:
            generator = torch.Generator().manual_seed(torch.initial_seed() % 2**63)
            if self.sampler == "balanced":
                counts = dataset.class_counts().astype(np.float64)
                weights = 1.0 / np.maximum(counts, 1)[dataset.labels[dataset.indices]]
                sampler = WeightedRandomSampler(torch.as_tensor(weights), len(dataset), generator=generator)
            else:
                sampler = RandomSampler(dataset, generator=generator)
        return DataLoader(
            dataset,
            batch_size=batch_size,
            sampler=sampler,
            shuffle=False,
            drop_last=train and len(dataset) > batch_size,
            num_workers=workers,
            pin_memory=pin,
            persistent_workers=workers > 0,
            collate_fn=keep_batch,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, self.batch_size, train=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, self.eval_batch_size, train=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, self.eval_batch_size, train=False)

    def on_after_batch_transfer(self, batch: tuple[Tensor, ...], dataloader_idx: int) -> tuple[Tensor, ...]:
        images, *rest = batch  # labels, and positions in training batches
        training = self.trainer is not None and self.trainer.training
        images = self.augment(images) if training else to_float(images)
        return images, *rest
