"""The tap-sum depthwise weight gradient: exact against autograd's, used only where it pays, invisible elsewhere."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from timm.layers import Conv2dSame

from fer.models.backbone import create_backbone
from fer.models.classifier import FERClassifier
from fer.models.depthwise import (
    FastGradDepthwiseConv2d,
    _DepthwiseConv,
    depthwise_weight_grad,
    onednn_weight_grad_is_slow,
    use_fast_depthwise_grad,
)


@pytest.mark.parametrize(
    "size, kernel, stride, padding",
    [(2, 5, 1, 2), (2, 3, 1, 1), (4, 5, 1, 2), (5, 3, 1, 1), (7, 5, 2, 0), (9, 3, 2, 0), (6, 3, 2, 1), (3, 5, 1, 2)],
)
def test_gradients_match_autograd_in_double_precision(size, kernel, stride, padding):
    torch.manual_seed(size * 10 + kernel)
    x = torch.randn(3, 4, size, size, dtype=torch.double, requires_grad=True)
    w = torch.randn(4, 1, kernel, kernel, dtype=torch.double, requires_grad=True)
    b = torch.randn(4, dtype=torch.double, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda x, w, b: _DepthwiseConv.apply(x, w, b, (stride, stride), (padding, padding)), (x, w, b)
    )


def test_taps_that_only_see_padding_get_zero_gradient():
    x, g = torch.randn(2, 3, 2, 2), torch.randn(2, 3, 2, 2)  # 5x5 kernel, padding 2, on a 2x2 map
    grad = depthwise_weight_grad(x, g, (5, 5), (1, 1), (2, 2))
    reference = torch.nn.grad.conv2d_weight(x, (3, 1, 5, 5), g, padding=2, groups=3)
    torch.testing.assert_close(grad, reference)
    assert grad[:, :, 0].abs().sum() == 0 and grad[:, :, :, 4].abs().sum() == 0
    assert grad[:, :, 1:4, 1:4].abs().min() > 0


def test_the_tap_path_is_taken_only_where_onednn_is_slow(monkeypatch):
    # The measured shapes of the docstring (output size, kernel), on both sides of the boundary.
    assert all(onednn_weight_grad_is_slow(out, k) for out, k in [(2, 5), (3, 5), (4, 5), (2, 3)])
    assert not any(onednn_weight_grad_is_slow(out, k) for out, k in [(5, 5), (8, 5), (3, 3), (4, 3)])
    conv = FastGradDepthwiseConv2d.replacing(torch.nn.Conv2d(8, 8, 5, padding=2, groups=8)).train()
    calls = []
    original = _DepthwiseConv.apply
    monkeypatch.setattr(_DepthwiseConv, "apply", lambda *args: calls.append(args[0].shape) or original(*args))
    conv(torch.randn(2, 8, 4, 4)).sum().backward()  # 4x4 output, 5x5 kernel: taps
    conv(torch.randn(2, 8, 16, 16)).sum().backward()  # 16x16: oneDNN
    with torch.no_grad():
        conv(torch.randn(2, 8, 4, 4))  # no gradient wanted: oneDNN
    conv.eval()(torch.randn(2, 8, 4, 4))  # evaluation (and export tracing): oneDNN
    assert calls == [torch.Size([2, 8, 4, 4])]


def test_swap_keeps_parameters_state_dict_and_tf_same_padding():
    torch.manual_seed(0)
    net = create_backbone("tf_efficientnet_lite0", weights="none", in_chans=1, drop_rate=0.0)
    same = [n for n, m in net.named_modules() if isinstance(m, Conv2dSame) and m.groups > 1]
    assert same, "tf_efficientnet_lite0 pads its strided depthwise convolutions TensorFlow-style"
    params_before = {n: id(p) for n, p in net.named_parameters()}
    keys_before = list(net.state_dict())
    reference = copy.deepcopy(net)

    assert use_fast_depthwise_grad(net) == 16 and use_fast_depthwise_grad(net) == 0  # idempotent
    assert {n: id(p) for n, p in net.named_parameters()} == params_before
    assert list(net.state_dict()) == keys_before
    assert all(isinstance(net.get_submodule(n), FastGradDepthwiseConv2d) for n in same)

    x = torch.rand(4, 1, 64, 64)
    y = torch.tensor([0, 3, 5, 6])
    for model in (reference, net):
        model.train()
        F.cross_entropy(model(x), y).backward()
    for (name, a), b in zip(reference.named_parameters(), net.parameters()):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-4, atol=1e-6, msg=name)
    with torch.no_grad():
        torch.testing.assert_close(net.eval()(x), reference.eval()(x))


def test_classifier_swaps_in_configure_model_unless_switched_off():
    on = FERClassifier(backbone={"weights": "none"})
    off = FERClassifier(backbone={"weights": "none"}, fast_depthwise_grad=False)
    for model in (on, off):
        model.configure_model()
    count = lambda m: sum(isinstance(c, FastGradDepthwiseConv2d) for c in m.modules())  # noqa: E731
    assert count(on) == 16 and count(off) == 0
    off.load_state_dict(on.state_dict())  # checkpoints load into either
