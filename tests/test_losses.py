"""Generalized cross-entropy: its limits, its down-weighting of implausible labels, its wiring."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from conftest import compose_train
from fer.models.classifier import FERClassifier
from fer.models.losses import classification_loss, generalized_cross_entropy
from fer.train import train


def test_gce_tends_to_cross_entropy_as_q_tends_to_zero():
    torch.manual_seed(0)
    logits, labels = torch.randn(16, 7) * 3, torch.randint(0, 7, (16,))
    for smoothing in (0.0, 0.1):
        ce = F.cross_entropy(logits, labels, label_smoothing=smoothing)
        gce = generalized_cross_entropy(logits, labels, q=1e-5, label_smoothing=smoothing)
        assert gce.item() == pytest.approx(ce.item(), rel=1e-3)


def test_gce_at_q_one_is_the_mean_absolute_error_of_the_probabilities():
    torch.manual_seed(1)
    logits, labels = torch.randn(16, 7), torch.randint(0, 7, (16,))
    p_true = torch.softmax(logits, 1).gather(1, labels[:, None]).squeeze(1)
    assert generalized_cross_entropy(logits, labels, q=1.0).item() == pytest.approx((1 - p_true).mean().item())


def _gradient_norm(loss_fn, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    logits = logits.clone().requires_grad_(True)
    loss_fn(logits, labels).backward()
    return logits.grad.norm(dim=1)


def test_gce_gives_an_implausible_label_less_pull_than_cross_entropy_does():
    # Face 0 is confidently class 3 but labelled 0 (a likely label error); face 1 agrees with its label.
    logits = torch.tensor([[0.0, 0, 0, 6, 0, 0, 0], [0.0, 0, 0, 2, 0, 0, 0]])
    labels = torch.tensor([0, 3])
    ce = _gradient_norm(lambda x, y: classification_loss(x, y, "ce"), logits, labels)
    gce = _gradient_norm(lambda x, y: classification_loss(x, y, "gce", q=0.5), logits, labels)
    # Relative to the plausible face, the implausible one pulls ~p_y^q times as hard: far less than under CE.
    assert gce[0] / gce[1] < 0.2 * (ce[0] / ce[1])


def test_gce_takes_a_class_weighted_mean():
    logits, labels = torch.randn(6, 7), torch.tensor([0, 0, 1, 1, 1, 1])
    weight = torch.tensor([3.0, 1, 1, 1, 1, 1, 1])
    per_face = torch.stack([generalized_cross_entropy(logits[i:i + 1], labels[i:i + 1], q=0.5) for i in range(6)])
    expected = (weight[labels] * per_face).sum() / weight[labels].sum()
    assert generalized_cross_entropy(logits, labels, q=0.5, weight=weight).item() == pytest.approx(expected.item())


@pytest.mark.parametrize(("kwargs", "key"), [({"loss": "focal"}, "optim.loss='focal'"), ({"loss": "gce", "gce_q": 0.0}, "optim.gce_q=0.0")])
def test_bad_loss_settings_name_their_key(kwargs, key):
    with pytest.raises(ValueError, match=key.replace("[", r"\[")):
        FERClassifier(backbone={"weights": "none"}, **kwargs)


def test_short_fit_with_gce_trains_and_records_the_loss(tmp_path):
    cfg = compose_train(tmp_path, ["optim.loss=gce", "optim.gce_q=0.7", "trainer.max_epochs=1",
                                   "data.source.num_train=140", "data.source.num_val=70", "data.image_size=32"])
    summary = train(cfg)
    assert summary["epochs_completed"] == 1
    checkpoint = torch.load(summary["last_model_path"], map_location="cpu", weights_only=False)
    assert checkpoint["hyper_parameters"]["loss"] == "gce" and checkpoint["hyper_parameters"]["gce_q"] == 0.7
    # The validation loss is the objective trained: GCE is bounded by 1/q, cross-entropy is not.
    assert 0.0 < summary["metrics"]["val/loss"] < 1 / 0.7
