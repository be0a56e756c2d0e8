"""Confidence calibration: expected calibration error and temperature scaling (Guo et al., 2017)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor
from torchmetrics.classification import MulticlassCalibrationError

ECE_BINS = 15
# Unbounded, a model no better than chance on the validation split drives T towards infinity: uniform
# probabilities, whose argmax float rounding then picks.
TEMPERATURE_RANGE = (0.05, 20.0)


def expected_calibration_error(probabilities: Tensor, labels: Tensor, n_bins: int = ECE_BINS) -> float:
    """Top-label ECE (L1, `n_bins` equal-width confidence bins) of (N, K) probabilities."""
    metric = MulticlassCalibrationError(num_classes=probabilities.shape[1], n_bins=n_bins, norm="l1")
    return float(metric(probabilities.float(), labels.long()))


def fit_temperature(logits: Tensor, labels: Tensor, max_iter: int = 100) -> float:
    """The scalar T > 0 minimising the NLL of softmax(logits / T) on held-out (validation) data.

    Optimised over log T with L-BFGS: positive by construction, and the problem is smooth and 1-D,
    so a few line-search steps converge. The NLL is convex in 1/T, so clamping the free optimum to
    TEMPERATURE_RANGE gives the optimum within it.
    """
    logits, labels = logits.detach().float(), labels.long()
    log_t = torch.zeros(1, requires_grad=True)
    optimizer = torch.optim.LBFGS([log_t], lr=0.5, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure() -> Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(logits / log_t.exp(), labels)
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    t = float(log_t.detach().exp())
    if math.isnan(t):
        return 1.0
    low, high = TEMPERATURE_RANGE
    return min(max(t, low), high)


def at_range_bound(temperature: float) -> bool:
    return temperature in TEMPERATURE_RANGE


def nll(logits: Tensor, labels: Tensor, temperature: float = 1.0) -> float:
    return float(F.cross_entropy(logits.float() / temperature, labels.long()))
