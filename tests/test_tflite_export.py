"""fer.tflite_export: the ONNX -> TFLite converter against PyTorch, operator by operator family, and its refusals."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from torch import nn

pytest.importorskip("ai_edge_litert")
onnx = pytest.importorskip("onnx")

from fer.litert import LiteRTModel  # noqa: E402
from fer.ort_session import basic_optimise  # noqa: E402
from fer.tflite_export import TFLiteExportError, onnx_to_tflite, read_tflite_metadata, same_pads  # noqa: E402


def convert(module: nn.Module, shape, tmp_path) -> bytes:
    """As fer.export does it: a static-shape ONNX export, constants folded by ONNX Runtime, then converted."""
    static, folded = tmp_path / "static.onnx", tmp_path / "folded.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module.eval(), (torch.rand(shape),), str(static), dynamo=False, input_names=["x"],
                          output_names=["y"], opset_version=17)
    basic_optimise(static, folded)
    return onnx_to_tflite(onnx.load(str(folded)), {"fer.test": "yes"})


def nhwc(x: torch.Tensor) -> np.ndarray:
    return np.ascontiguousarray(x.numpy().transpose(0, 2, 3, 1))


def randomise_batch_norms(module: nn.Module) -> None:
    """Statistics far from the identity, so folding them into the convolutions is really exercised."""
    for m in module.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.3, 0.3)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.3, 0.3)


def test_same_pads_follow_tensorflow():
    # TensorFlow: out = ceil(in / stride); the odd pixel of padding goes after.
    assert same_pads(64, 3, 2) == (0, 1)
    assert same_pads(65, 3, 2) == (1, 1)
    assert same_pads(64, 5, 2) == (1, 2)
    assert same_pads(7, 3, 1) == (1, 1)
    assert same_pads(8, 1, 2) == (0, 0)


@pytest.mark.parametrize("name,channels,size", [
    ("tf_efficientnet_lite0", 1, 48),   # TF SAME padding, ReLU6, no squeeze-excitation
    ("efficientnet_b0", 3, 40),          # PyTorch padding (explicit PADs), SiLU, squeeze-excitation
])
def test_timm_efficientnets_match_pytorch_at_any_batch(tmp_path, name, channels, size):
    import timm

    from fer.export import ProbabilityModel

    torch.manual_seed(0)
    net = timm.create_model(name, pretrained=False, num_classes=7, in_chans=channels)
    randomise_batch_norms(net)
    model = ProbabilityModel(net, torch.full((channels,), 0.5), torch.full((channels,), 0.25), temperature=1.7)
    content = convert(model, (1, channels, size, size), tmp_path)
    run = LiteRTModel(content, threads=1)
    x = torch.rand(5, channels, size, size)
    with torch.no_grad():
        expected = model.eval()(x).numpy()
    for batch in (x, x[:1], x[:3]):  # the batch resizes at run time
        got = run(nhwc(batch))
        assert got.shape == (len(batch), 7)
        assert np.abs(got - expected[: len(batch)]).max() <= 1e-5
    assert read_tflite_metadata(content) == {"fer.test": "yes"}


def test_odd_padding_and_plain_relu(tmp_path):
    """A padding TensorFlow's SAME cannot express becomes an explicit PAD; ReLU fuses like ReLU6."""
    torch.manual_seed(1)
    model = nn.Sequential(nn.Conv2d(2, 4, 3, stride=2, padding=2), nn.ReLU(), nn.Conv2d(4, 4, 3, groups=4, padding=1),
                          nn.ReLU6(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3), nn.Softmax(dim=1))
    content = convert(model, (1, 2, 9, 9), tmp_path)
    x = torch.rand(2, 2, 9, 9)
    with torch.no_grad():
        expected = model(x).numpy()
    assert np.abs(LiteRTModel(content, threads=1)(nhwc(x)) - expected).max() <= 1e-6


@pytest.mark.parametrize("layer,message", [
    (nn.Conv2d(4, 4, 3, groups=2, padding=1), "grouped convolution"),
    (nn.Upsample(scale_factor=2.0), "Resize"),
    (nn.Hardtanh(-1.0, 1.0), "only ReLU and ReLU6"),
])
def test_what_it_cannot_translate_is_an_error_naming_the_operator(tmp_path, layer, message):
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), layer)
    with pytest.raises(TFLiteExportError, match=message):
        convert(model, (1, 1, 8, 8), tmp_path)
