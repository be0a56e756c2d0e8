"""Every option of every config group composes, and everything it names instantiates."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra.utils import instantiate
from omegaconf import OmegaConf
from PIL import Image

from conftest import compose_train
from fer.utils import CONFIG_DIR

CONF = Path(CONFIG_DIR)
GROUPS = ["data", "model", "optim", "trainer", "logger", "callbacks", "paths", "hydra", "experiment"]
# Options that need what the test machine lacks: GPUs (composed and checked, not instantiated),
# hub weights (instantiated with weights=none).
NEEDS_GPU = {("trainer", "gpu"), ("trainer", "ddp")}
NEEDS_HUB = {("model", "b0"), ("model", "b2")}


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


ALL = [(g, o) for g in GROUPS for o in options(g)]


def test_every_group_has_options():
    for group in GROUPS:
        assert options(group), f"conf/{group}/ has no options"


@pytest.mark.parametrize(("group", "option"), ALL, ids=[f"{g}={o}" for g, o in ALL])
def test_option_composes_and_instantiates(tmp_path, group, option, monkeypatch):
    overrides = [f"{group}={option}"]
    if option in ("fer2013", "folder") and group in ("data", "experiment"):
        face = tmp_path / "data" / "train" / "happy"
        face.mkdir(parents=True)
        Image.new("L", (48, 48)).save(face / "0.png")
        overrides.append(f"data.root={face.parent.parent}")
    if (group, option) in NEEDS_HUB:
        overrides.append("model.backbone.weights=none")  # the architecture still builds offline
    cfg = compose_train(tmp_path, overrides, tiny=False)
    OmegaConf.resolve(cfg)  # every interpolation resolves
    assert cfg.seed is not None
    if group == "data":
        datamodule = instantiate(cfg.data, _convert_="all")
        assert datamodule.batch_size == cfg.data.batch_size
        assert datamodule.channels == cfg.model.backbone.in_chans
    elif group == "model":
        model = instantiate(cfg.model, optimizer=instantiate(cfg.optim.optimizer), _convert_="all")
        assert model.net.get_classifier().out_features == 7
    elif group == "optim":
        optimizer = instantiate(cfg.optim.optimizer)
        import torch

        assert isinstance(optimizer(params=[torch.nn.Parameter(torch.zeros(1))]), torch.optim.Optimizer)
    elif group == "trainer" and (group, option) not in NEEDS_GPU:
        trainer = instantiate(cfg.trainer, logger=False, enable_checkpointing=False)
        assert trainer.max_epochs == cfg.trainer.max_epochs
    elif group == "trainer":
        assert cfg.trainer.precision in ("16-mixed", "bf16-mixed")
    elif group == "logger":
        assert instantiate(cfg.logger).log_dir.startswith(str(tmp_path))
    elif group == "callbacks":
        callbacks = [instantiate(c) for c in cfg.callbacks.values() if c is not None]
        assert all(hasattr(c, "on_fit_start") for c in callbacks)


def test_gpu_configs_use_mixed_precision(tmp_path):
    for option in ("gpu", "ddp"):
        cfg = compose_train(tmp_path, [f"trainer={option}"], tiny=False)
        assert cfg.trainer.accelerator == "gpu"
        assert "mixed" in cfg.trainer.precision


def test_cpu_default_is_fp32(tmp_path):
    assert compose_train(tmp_path, tiny=False).trainer.precision == "32-true"


def test_experiment_fer2013_reads_data_root(tmp_path):
    cfg = compose_train(tmp_path, ["experiment=fer2013", "data.root=/some/where/fer2013"], tiny=False)
    assert cfg.data.source.root == "/some/where/fer2013"
    assert cfg.data.source._target_.endswith("fer2013_source")
    assert cfg.data.image_size == 64


def test_cpu_hour_recipe_trains_without_erasing_and_the_gpu_recipe_with_it(tmp_path):
    # An hour of CPU is short of fitting (docs/fer2013_recipe.md, "Why no random erasing"); long GPU runs keep
    # the default.
    def augment(experiment):
        cfg = compose_train(tmp_path, [f"experiment={experiment}", "data.root=/some/where"], tiny=False)
        return instantiate(cfg.data.augment)

    cpu, gpu = augment("fer2013_cpu60"), augment("fer2013_gpu")
    assert cpu.erase_p == 0 and gpu.erase_p > 0
    assert (cpu.hflip, cpu.rotate_degrees) == (gpu.hflip, gpu.rotate_degrees) == (0.5, 10.0)  # the rest unchanged
