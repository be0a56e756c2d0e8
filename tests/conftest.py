"""Shared fixtures: the real Hydra configs, composed and shrunk to tiny CPU runs."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, open_dict

from fer.utils import CONFIG_DIR

FER2013_ROOT = Path(__file__).resolve().parents[2] / "shared" / "data" / "fer2013"

# Small enough for a few seconds per epoch on 2 CPU cores, big enough to learn the synthetic faces.
TINY_SYNTHETIC = [
    "data.source.num_train=490",
    "data.source.num_val=210",
    "data.source.num_test=70",
]
TINY = [
    "data.image_size=48",
    "data.batch_size=32",
    "trainer.max_epochs=2",
    "trainer.accelerator=cpu",
    "trainer.enable_progress_bar=false",
    "callbacks.progress_bar=null",
    "callbacks.model_summary=null",
]


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Every test decodes into its own cache unless it asks for a shared one."""
    monkeypatch.setenv("FER_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))


def compose_train(tmp_path: Path, overrides: list[str] = (), tiny: bool = True) -> DictConfig:
    """The real conf/train.yaml with `overrides`, writing everything under `tmp_path`."""
    other_data = any(o.startswith(("data=", "experiment=")) for o in overrides)
    shrink = [*TINY, *([] if other_data else TINY_SYNTHETIC)] if tiny else []
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(config_name="train", overrides=[*shrink, *overrides])
    with open_dict(cfg):
        cfg.paths.output_dir = str(tmp_path / "run")
        cfg.paths.log_dir = str(tmp_path / "logs")
        cfg.paths.cache_dir = os.environ.get("FER_CACHE_DIR", str(tmp_path / "cache"))
    return cfg


@pytest.fixture
def fer2013_root() -> Path:
    if not (FER2013_ROOT / "train").is_dir():
        pytest.skip(f"FER2013 not found at {FER2013_ROOT}")
    return FER2013_ROOT
