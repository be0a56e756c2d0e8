"""Temperature scaling: recovers a known temperature, stays bounded on a chance-level model."""

import pytest
import torch

from fer.calibration import TEMPERATURE_RANGE, at_range_bound, fit_temperature, nll


def _labels_drawn_from(logits: torch.Tensor, temperature: float, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.multinomial(torch.softmax(logits / temperature, 1), 1, generator=g).squeeze(1)


@pytest.mark.parametrize("true_t", [0.5, 2.0])
def test_recovers_the_temperature_the_labels_were_drawn_with(true_t):
    logits = 3 * torch.randn(20_000, 7, generator=torch.Generator().manual_seed(1))
    labels = _labels_drawn_from(logits, true_t)
    t = fit_temperature(logits, labels)
    assert t == pytest.approx(true_t, rel=0.05)
    assert nll(logits, labels, t) < nll(logits, labels, 1.0)
    assert not at_range_bound(t)


def test_chance_level_model_stops_at_the_bound_and_keeps_its_predictions():
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(500, 7, generator=g)
    labels = torch.randint(0, 7, (500,), generator=g)  # independent of the logits: NLL falls as T grows
    t = fit_temperature(logits, labels)
    assert t == TEMPERATURE_RANGE[1] and at_range_bound(t)
    assert nll(logits, labels, t) <= nll(logits, labels, 1.0)
    assert torch.equal(torch.softmax(logits / t, 1).argmax(1), logits.argmax(1))
