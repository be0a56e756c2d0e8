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


# -- one tiny trained run, shared by the evaluation, inference, prediction and notebook tests -------------
RUN_OVERRIDES = [
    "trainer.max_epochs=1",
    "data.source.num_train=140",
    "data.source.num_val=70",
    "data.source.num_test=35",
]


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory) -> Path:
    """A finished synthetic run directory (checkpoints, TensorBoard events, .hydra/config.yaml, summary.json).

    Read-only for tests: copy it (`copy_run`) before changing anything in it.
    """
    from omegaconf import OmegaConf

    from fer.train import train

    base = tmp_path_factory.mktemp("trained")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FER_CACHE_DIR", str(base / "cache"))
        cfg = compose_train(base, RUN_OVERRIDES)
        run_dir = Path(cfg.paths.output_dir)
        # What Hydra's app writes and a test-composed run lacks: the config the run was trained with.
        (run_dir / ".hydra").mkdir(parents=True, exist_ok=True)
        OmegaConf.save(cfg, run_dir / ".hydra" / "config.yaml")
        train(cfg)
    return run_dir


@pytest.fixture
def copy_run(trained_run, tmp_path):
    """A private copy of the trained run (for tests that write into its checkpoints)."""
    import shutil

    def make() -> Path:
        target = tmp_path / "run_copy"
        shutil.copytree(trained_run, target)
        return target

    return make


def compose_eval(tmp_path: Path, overrides: list[str] = ()) -> DictConfig:
    """The real conf/eval.yaml with `overrides`, writing under `tmp_path`."""
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(config_name="eval", overrides=list(overrides))
    with open_dict(cfg):
        cfg.paths.output_dir = str(tmp_path / "eval")
        cfg.paths.log_dir = str(tmp_path / "logs")
        cfg.paths.cache_dir = os.environ["FER_CACHE_DIR"]
    return cfg


@pytest.fixture(scope="session")
def astronaut_jpeg(tmp_path_factory) -> Path:
    """scikit-image's astronaut photo (one frontal face) saved as a JPEG."""
    from PIL import Image
    from skimage import data

    path = tmp_path_factory.mktemp("photos") / "astronaut.jpg"
    Image.fromarray(data.astronaut()).save(path, quality=92)
    return path


# -- command-line runs (sweeps, kills, DDP): tiny synthetic faces at 32 px, 8 training steps per epoch ---------
REPO = Path(__file__).resolve().parents[1]
TINY_CLI = [
    "data.source.num_train=280",
    "data.source.num_val=128",   # even, and a multiple of 2 processes x 64-image eval batches: no DDP padding
    "data.source.num_test=64",
    "data.source.image_size=32",
    "data.image_size=32",
    "data.batch_size=32",
    "trainer.enable_progress_bar=false",
    "callbacks.progress_bar=null",
    "callbacks.model_summary=null",
    "callbacks.sample_grid=null",
    "callbacks.confusion_matrix=null",
]


def fer_train_cmd(*overrides: str, drop: tuple[str, ...] = ()) -> list[str]:
    """`python -m fer.train` with the tiny CLI config (less the keys in `drop`) and `overrides` (`-m` goes first)."""
    import sys

    flags = [o for o in overrides if o.startswith("-")]
    tiny = [o for o in TINY_CLI if o.split("=", 1)[0] not in drop]
    return [sys.executable, "-m", "fer.train", *flags, *tiny, *(o for o in overrides if not o.startswith("-"))]


def cli_env(tmp_path: Path) -> dict[str, str]:
    """Environment for a subprocess run: logs under tmp_path, a shared cache, no GPU, few threads."""
    env = dict(os.environ)
    env.update({"FER_ROOT": str(tmp_path), "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "2",
                "HYDRA_FULL_ERROR": "1", "PYTHONUNBUFFERED": "1"})
    return env
