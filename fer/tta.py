"""Test-time augmentation: the views of a batch whose softmax probabilities are averaged."""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from fer.data.augment import affine_grid
from fer.errors import ConfigError

MODES = ("none", "flip", "shift", "shift_rotate", "tencrop")
NUM_VIEWS = {"none": 1, "flip": 2, "shift": 10, "shift_rotate": 14, "tencrop": 10}
CROP_SCALE = 0.875  # torchvision's ten-crop at the usual 224/256 ratio
SHIFT = 1 / 16  # of the side: 4 px at 64 px (6.25%), a little past the +-5% translations the training data saw
ROTATE_DEGREES = 5.0  # half the +-10 degrees the training data saw: faces tilt a little, both ways


def check_mode(mode: str) -> str:
    """`mode` if fer knows it; else a one-line ConfigError (a ValueError) naming the choices."""
    if mode not in MODES:
        raise ConfigError(f"tta={mode!r}: expected one of {', '.join(MODES)}")
    return mode


def images_per_pass(batch_size: int, mode: str) -> int:
    """Images per forward pass when `batch_size` counts views, so a TTA pass stays the size it was tuned for."""
    return max(1, batch_size // NUM_VIEWS[check_mode(mode)])


def _resize(x: Tensor, size: tuple[int, int]) -> Tensor:
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)


def _rotate(x: Tensor, degrees: float) -> Tensor:
    """Rotate about the centre, the border reflected as in training (fer.data.augment.BatchAugment)."""
    a = math.radians(degrees)
    theta = x.new_tensor([[math.cos(a), -math.sin(a), 0.0], [math.sin(a), math.cos(a), 0.0]])
    grid = affine_grid(theta.expand(x.shape[0], 2, 3), *x.shape[-2:])
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


def views(images: Tensor, mode: str) -> list[Tensor]:
    """Float (B, C, H, W) -> the list of views to classify; each view has the input's shape.

    flip: the batch and its mirror image. shift: the batch moved by 1/16 of the side up, down, left and
    right (edges replicated), unmoved, and the mirror images of those five: every view keeps the scale the
    model was trained at. tencrop: four corners and the centre at 0.875 of the side, and their mirror
    images, each resized back to (H, W) so the model sees its trained input size (but zoomed in).
    shift_rotate: the ten shift views, plus the batch turned 5 degrees each way and their mirror images.
    """
    if check_mode(mode) == "none":
        return [images]
    if mode == "flip":
        return [images, images.flip(-1)]
    if mode == "shift_rotate":
        turned = [_rotate(images, d) for d in (ROTATE_DEGREES, -ROTATE_DEGREES)]
        return views(images, "shift") + turned + [t.flip(-1) for t in turned]
    if mode == "shift":
        h, w = images.shape[-2:]
        p = max(1, round(min(h, w) * SHIFT))
        padded = F.pad(images, (p, p, p, p), mode="replicate")
        moved = [padded[..., p + dy:p + dy + h, p + dx:p + dx + w]
                 for dy, dx in ((0, 0), (-p, 0), (p, 0), (0, -p), (0, p))]
        return moved + [m.flip(-1) for m in moved]
    h, w = images.shape[-2:]  # tencrop
    ch, cw = max(1, round(h * CROP_SCALE)), max(1, round(w * CROP_SCALE))
    top, left = (h - ch) // 2, (w - cw) // 2
    corners = [(0, 0), (0, w - cw), (h - ch, 0), (h - ch, w - cw), (top, left)]
    crops = [_resize(images[..., y:y + ch, x:x + cw], (h, w)) for y, x in corners]
    return crops + [c.flip(-1) for c in crops]


def per_view(run: Callable[[Tensor], Tensor], images: Tensor, mode: str) -> Tensor:
    """`run` (a batch -> (N, classes) scores) on every view of every image: (B, V, classes)."""
    batch = views(images, mode)
    # One call over all views: cheaper than one per view on every backend, CPU and GPU.
    scores = run(torch.cat(batch).contiguous())
    return scores.view(len(batch), images.shape[0], -1).transpose(0, 1)


@torch.inference_mode()
def tta_logits(model: torch.nn.Module, images: Tensor, mode: str) -> Tensor:
    """Logits of every view: (B, V, classes). Kept per view so a temperature can be applied before averaging."""
    return per_view(model, images, mode)


def average_probabilities(logits: Tensor, temperature: float = 1.0) -> Tensor:
    """(B, V, K) logits -> (B, K): the mean over views of softmax(logits / T)."""
    return torch.softmax(logits.float() / temperature, dim=-1).mean(dim=1)
