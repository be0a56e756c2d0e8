"""The optimiser's parameter groups: no weight decay on 1-d tensors, and layer-wise learning-rate decay."""

from __future__ import annotations

from typing import Any, Iterable

import torch
from timm.models import group_parameters


def depth_of_parameters(net: torch.nn.Module) -> dict[str, int]:
    """Parameter name -> depth from the input: the stem 0, each block stage one more, the classifier last.

    The stages are timm's coarse groups (`group_matcher(coarse=True)`), so this works for any timm
    model that defines them; one without gets a single depth, i.e. no layer decay.
    """
    if not hasattr(net, "group_matcher"):
        return {name: 0 for name, _ in net.named_parameters()}
    groups = group_parameters(net, net.group_matcher(coarse=True))
    return {name: depth for depth, names in groups.items() for name in names}


def param_groups(
    net: torch.nn.Module, skip: Iterable[torch.nn.Parameter] = (), layer_decay: float = 1.0
) -> list[dict[str, Any]]:
    """Groups for the optimiser, each with an `lr_scale`: layer_decay ** (steps below the classifier).

    layer_decay < 1 keeps the pretrained early layers closer to where they started (BEiT, ConvNeXt
    fine-tuning); 1.0 gives every parameter the base rate. Biases and norm scales get no weight decay:
    decaying them only hurts (timm, torchvision recipes).
    """
    skipped = {id(p) for p in skip}
    depths = depth_of_parameters(net) if layer_decay < 1.0 else {}
    top = max(depths.values(), default=0)
    groups: dict[tuple[int, bool], dict[str, Any]] = {}
    for name, param in net.named_parameters():
        if id(param) in skipped:
            continue
        depth, decayed = depths.get(name, top), param.ndim > 1
        group = groups.setdefault(
            (depth, decayed), {"params": [], "lr_scale": layer_decay ** (top - depth)}
        )
        if not decayed:
            group["weight_decay"] = 0.0
        group["params"].append(param)
    return [groups[key] for key in sorted(groups, key=lambda key: (key[0], not key[1]))]


def apply_lr_scales(optimizer: torch.optim.Optimizer) -> None:
    """Scales each group's learning rate by its `lr_scale`, once, before a scheduler records it."""
    for group in optimizer.param_groups:
        group["lr"] *= group.get("lr_scale", 1.0)
