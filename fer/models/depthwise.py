"""Depthwise convolutions whose weight gradient is fast on a CPU when the feature map is tiny.

oneDNN (PyTorch's CPU convolution library) computes the forward pass and the input gradient of a
depthwise convolution quickly, but its *weight* gradient takes 20-50 ms a call when the kernel window
hangs mostly over padding: EfficientNet-Lite0's 5x5 kernels on the 4x4 and 2x2 maps of a 64 px face,
and its 3x3 kernel on 2x2. Those few layers took about half of a whole training step on a 2-core CPU.
The weight gradient is a sum over taps (one element-wise product and reduction per kernel position,
taps that only see padding skipped), which is ~10x faster there; everything else stays on oneDNN.

`use_fast_depthwise_grad(net)` swaps the depthwise convolutions of a timm network for
`FastGradDepthwiseConv2d`, which keeps the same parameters (the state dict does not change) and takes
the tap path only while training on a CPU and only where oneDNN is slow; evaluation, export and GPUs
run the plain convolution.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.layers import Conv2dSame
from timm.layers.padding import pad_same
from torch import Tensor, nn


def _out_size(size: int, kernel: int, stride: int, padding: int) -> int:
    return (size + 2 * padding - kernel) // stride + 1


def onednn_weight_grad_is_slow(out_size: int, kernel: int) -> bool:
    """True where oneDNN's depthwise weight gradient is slow: the output no larger than the kernel's reach.

    Measured on a 2-core AMD EPYC (AVX2), batch 64: 5x5 on 4x4, 3x3 and 2x2 maps and 3x3 on 2x2 take
    15-50 ms a call, 20-100x their forward pass (the tap sums: 1-4 ms); 3x3 on 3x3 and 4x4 and 5x5 on
    5x5 and 8x8 are as fast on oneDNN as by taps or faster, so they stay there.
    """
    return out_size <= kernel - 1


def depthwise_weight_grad(x: Tensor, grad_out: Tensor, kernel: tuple[int, int], stride: tuple[int, int],
                          padding: tuple[int, int]) -> Tensor:
    """d(loss)/d(weight) of a depthwise convolution, shape (C, 1, kh, kw): one product and sum per tap."""
    (kh, kw), (sh, sw), (ph, pw) = kernel, stride, padding
    oh, ow = grad_out.shape[-2:]
    h, w = x.shape[-2:]
    padded = F.pad(x, (pw, pw, ph, ph)) if ph or pw else x
    grad_w = x.new_zeros(x.shape[1], kh, kw)
    for ky in range(kh):
        rows = range(ky - ph, ky - ph + (oh - 1) * sh + 1, sh)
        if not any(0 <= r < h for r in rows):
            continue  # this row of taps only ever sees padding: its gradient is zero
        for kx in range(kw):
            cols = range(kx - pw, kx - pw + (ow - 1) * sw + 1, sw)
            if not any(0 <= c < w for c in cols):
                continue
            window = padded[:, :, ky:ky + (oh - 1) * sh + 1:sh, kx:kx + (ow - 1) * sw + 1:sw]
            grad_w[:, ky, kx] = (window * grad_out).sum(dim=(0, 2, 3))
    return grad_w.unsqueeze(1)


class _DepthwiseConv(torch.autograd.Function):
    """conv2d(groups=C) with oneDNN's forward and input gradient and the tap-sum weight gradient."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None, stride: tuple[int, int],
                padding: tuple[int, int]) -> Tensor:
        ctx.save_for_backward(x, weight)
        ctx.stride, ctx.padding, ctx.has_bias = stride, padding, bias is not None
        return F.conv2d(x, weight, bias, stride, padding, 1, weight.shape[0])

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        x, weight = ctx.saved_tensors
        stride, padding = ctx.stride, ctx.padding
        kernel = tuple(weight.shape[-2:])
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            # The transposed convolution is the input gradient; output_padding restores sizes a stride rounded off.
            output_padding = tuple(
                x.shape[-2 + i] - ((grad_out.shape[-2 + i] - 1) * stride[i] - 2 * padding[i] + kernel[i]) for i in range(2)
            )
            grad_x = F.conv_transpose2d(grad_out, weight, None, stride, padding, output_padding, weight.shape[0])
        if ctx.needs_input_grad[1]:
            grad_w = depthwise_weight_grad(x, grad_out, kernel, stride, padding).to(memory_format=torch.contiguous_format)
            if weight.is_contiguous(memory_format=torch.channels_last):
                grad_w = grad_w.contiguous(memory_format=torch.channels_last)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = grad_out.sum(dim=(0, 2, 3))
        return grad_x, grad_w, grad_b, None, None


class FastGradDepthwiseConv2d(nn.Conv2d):
    """A depthwise nn.Conv2d (or timm Conv2dSame) whose weight gradient takes the tap path where oneDNN is slow."""

    same_padding: bool = False  # timm's Conv2dSame: TensorFlow "SAME" padding computed from the input size

    @classmethod
    def replacing(cls, conv: nn.Conv2d) -> "FastGradDepthwiseConv2d":
        new = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                  conv.dilation, conv.groups, conv.bias is not None, device="meta")
        new.weight, new.bias = conv.weight, conv.bias  # the same Parameters: optimiser and state dict unchanged
        new.same_padding = isinstance(conv, Conv2dSame)
        new.train(conv.training)
        return new

    def forward(self, x: Tensor) -> Tensor:
        if self.same_padding:
            x = pad_same(x, self.kernel_size, self.stride, self.dilation)
        padding = (0, 0) if self.same_padding else self.padding
        if self._tap_path(x, padding):
            return _DepthwiseConv.apply(x, self.weight, self.bias, self.stride, padding)
        return F.conv2d(x, self.weight, self.bias, self.stride, padding, self.dilation, self.groups)

    def _tap_path(self, x: Tensor, padding: tuple[int, int]) -> bool:
        if not (self.training and x.device.type == "cpu" and torch.is_grad_enabled() and self.weight.requires_grad):
            return False
        out = [_out_size(x.shape[-2 + i], self.kernel_size[i], self.stride[i], padding[i]) for i in range(2)]
        return all(onednn_weight_grad_is_slow(o, k) for o, k in zip(out, self.kernel_size))


def is_depthwise(module: nn.Module) -> bool:
    return (
        isinstance(module, nn.Conv2d)
        and module.groups > 1
        and module.groups == module.in_channels == module.out_channels
        and module.dilation == (1, 1)
        and isinstance(module.padding, tuple)  # not padding="same"/"valid" strings
        and module.padding_mode == "zeros"
    )


def use_fast_depthwise_grad(net: nn.Module) -> int:
    """Swaps every depthwise convolution of `net` for FastGradDepthwiseConv2d, in place; returns how many."""
    swaps = [
        (parent, name, child)
        for parent in net.modules()
        for name, child in parent.named_children()
        if is_depthwise(child) and not isinstance(child, FastGradDepthwiseConv2d)
    ]
    for parent, name, child in swaps:
        setattr(parent, name, FastGradDepthwiseConv2d.replacing(child))
    return len(swaps)
