"""Sharpness-aware minimisation: the step it takes, what it saves, and a real fit through Lightning."""

from __future__ import annotations

from functools import partial

import pytest
import torch
from torch import nn

from conftest import compose_train
from fer.errors import ConfigError
from fer.models.classifier import FERClassifier
from fer.models.sam import SAM
from fer.train import train


def test_step_applies_the_gradient_taken_uphill_at_radius_rho():
    w = nn.Parameter(torch.tensor([3.0, -4.0]))
    target = torch.tensor([1.0, 1.0])
    optimizer = SAM(torch.optim.SGD([w], lr=0.1), rho=0.5)

    def closure():  # loss = sum((w - t)^4): its gradient changes along the climb, unlike a quadratic's scale
        optimizer.zero_grad()
        loss = ((w - target) ** 4).sum()
        loss.backward()
        return loss

    start = w.detach().clone()
    g = 4 * (start - target) ** 3
    uphill = start + 0.5 * g / g.norm()
    expected = start - 0.1 * 4 * (uphill - target) ** 3
    loss = optimizer.step(closure)
    assert loss.item() == pytest.approx(((start - target) ** 4).sum().item())  # the loss where the step began
    assert torch.allclose(w.detach(), expected, atol=1e-5)
    assert not torch.allclose(w.detach(), start - 0.1 * g, atol=1e-3)  # not a plain SGD step
    with pytest.raises(RuntimeError, match="sam_rho > 0 needs a closure"):
        optimizer.step()
    with pytest.raises(ValueError, match=r"optim.sam_rho=0: expected a value > 0"):
        SAM(torch.optim.SGD([w], lr=0.1), rho=0)


def test_checkpoints_hold_the_base_optimiser_so_runs_resume_with_or_without_sam():
    model = FERClassifier(backbone={"weights": "none"}, sam_rho=0.05, scheduler={"name": "none"},
                          optimizer=partial(torch.optim.AdamW, lr=1e-3, weight_decay=0.05))
    optimizer = model.configure_optimizers()["optimizer"]
    assert isinstance(optimizer, SAM) and isinstance(optimizer.base, torch.optim.AdamW)
    images, labels = torch.rand(4, 1, 32, 32), torch.tensor([0, 1, 2, 3])

    def closure():
        optimizer.zero_grad()
        loss = model._loss(model(images), labels)
        loss.backward()
        return loss

    model.train()
    optimizer.step(closure)
    saved = optimizer.state_dict()
    assert saved == optimizer.base.state_dict() and len(saved["state"]) > 0  # Adam's moments, nothing of SAM's
    model.sam_rho = 0.0  # the same run configured without SAM resumes from it
    plain = model.configure_optimizers()["optimizer"]
    assert isinstance(plain, torch.optim.AdamW)
    plain.load_state_dict(saved)
    fresh = SAM(model.configure_optimizers()["optimizer"], rho=0.05)  # and back
    fresh.load_state_dict(plain.state_dict())
    assert torch.equal(fresh.state_dict()["state"][0]["exp_avg"], saved["state"][0]["exp_avg"])
    assert fresh.param_groups is fresh.base.param_groups and fresh.state is fresh.base.state
    fresh.param_groups[0]["lr"] = 5e-4  # what a scheduler does: the base optimiser must see it
    assert fresh.base.param_groups[0]["lr"] == 5e-4
    cycle = torch.optim.lr_scheduler.OneCycleLR(fresh, max_lr=1e-3, total_steps=10)  # cycles Adam's beta1
    assert fresh.base.param_groups[0]["betas"][0] == pytest.approx(0.95) and cycle.get_last_lr()[0] < 1e-3

    class HalfPrecisionTrainer:  # 16-mixed: torch's GradScaler would step without SAM's closure
        precision = "16-mixed"

    model.sam_rho, model._trainer = 0.05, HalfPrecisionTrainer()
    with pytest.raises(ValueError, match="sam_rho=0.05 does not work with trainer.precision=16-mixed"):
        model.configure_optimizers()


def test_second_pass_keeps_batch_norm_statistics_and_metric_counts():
    model = FERClassifier(backbone={"weights": "none"}).train()
    norm = model.net.bn1
    before = norm.running_mean.clone()
    with model.perturbed_pass():
        assert model.perturbed and norm.momentum == 0.0
        model.training_step((torch.rand(4, 1, 32, 32), torch.tensor([0, 1, 2, 3])), 0)
    assert torch.equal(norm.running_mean, before) and norm.momentum > 0 and not model.perturbed
    assert model.train_acc.tp.sum() + model.train_acc.fn.sum() == 0  # nothing counted
    model.training_step((torch.rand(4, 1, 32, 32), torch.tensor([0, 1, 2, 3])), 0)
    assert not torch.equal(norm.running_mean, before)
    assert model.train_acc.tp.sum() + model.train_acc.fn.sum() == 4


def test_fit_with_sam_runs_two_passes_a_step_and_counts_each_sample_once(tmp_path, monkeypatch):
    calls = {"steps": 0, "perturbed": 0}
    original = FERClassifier.training_step

    def counted(self, batch, batch_idx):
        calls["steps"] += 1
        calls["perturbed"] += self.perturbed
        return original(self, batch, batch_idx)

    monkeypatch.setattr(FERClassifier, "training_step", counted)
    cfg = compose_train(tmp_path, ["optim.sam_rho=0.05", "trainer.max_epochs=1", "data.source.num_train=128",
                                   "data.source.num_val=32", "data.image_size=32", "data.batch_size=32"])
    summary = train(cfg)
    assert summary["epochs_completed"] == 1
    assert calls == {"steps": 8, "perturbed": 4}  # 4 batches, each seen at w and at w + e(w)
    checkpoint = torch.load(summary["last_model_path"], map_location="cpu", weights_only=False)
    assert checkpoint["hyper_parameters"]["sam_rho"] == 0.05
    assert checkpoint["optimizer_states"][0]["state"]  # AdamW's moments, as a plain run saves them


def test_perturbed_pass_reuses_the_first_pass_mixed_batch(monkeypatch):
    torch.manual_seed(0)
    model = FERClassifier(backbone={"weights": "none", "drop_rate": 0.0}, sam_rho=0.05, mixup_alpha=0.4,
                          cutmix_alpha=1.0).train()  # no dropout: both passes at the same weights agree
    draws, seen = [], []
    original = FERClassifier._mix

    def counted(self, images):
        draws.append(self.perturbed)
        return original(self, images)

    monkeypatch.setattr(FERClassifier, "_mix", counted)
    model.net.register_forward_pre_hook(lambda module, args: seen.append(args[0].detach().clone()))
    batch = (torch.rand(8, 1, 32, 32), torch.arange(8) % 7)
    first = model.training_step(batch, 0)
    with model.perturbed_pass():
        second = model.training_step(batch, 0)
    assert draws == [False]  # one draw a step: the uphill gradient is taken on the same mixed batch
    assert torch.equal(seen[0], seen[1]) and second.item() == pytest.approx(first.item(), rel=1e-4)
    assert model.step_mix is None  # not held on to after the step


def test_sam_refuses_gradient_accumulation_before_training(tmp_path, monkeypatch):
    steps = []
    monkeypatch.setattr(FERClassifier, "training_step", lambda self, batch, batch_idx: steps.append(batch_idx))
    cfg = compose_train(tmp_path, ["optim.sam_rho=0.05", "trainer.accumulate_grad_batches=2", "trainer.max_epochs=1",
                                   "data.source.num_train=64", "data.source.num_val=32", "data.image_size=32"])
    # Lightning zeroes gradients on an accumulation's first micro-batch only: the perturbed pass would add to them.
    with pytest.raises(ConfigError, match=r"^optim.sam_rho=0.05 does not work with trainer.accumulate_grad_batches=2"):
        train(cfg)
    assert steps == [] and not list(tmp_path.rglob("*.ckpt"))
