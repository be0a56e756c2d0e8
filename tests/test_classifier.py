"""The LightningModule's options: schedules, optimisers, class weights, backbone freezing."""

from __future__ import annotations

from functools import partial

import numpy as np
import pytest
import torch

from conftest import compose_train
from fer.callbacks import BackboneFreeze, EMAWeights
from fer.errors import ConfigError
from fer.models.classifier import FERClassifier, scheduled_lr_factor
from fer.train import train


def small_model(**kwargs) -> FERClassifier:
    return FERClassifier(backbone={"weights": "none"}, **kwargs)


def fake_trainer(steps: float, epochs: int):
    """What configure_optimizers reads of a Trainer: `steps` optimiser steps over `epochs` epochs."""

    class T:
        estimated_stepping_batches, max_epochs = steps, epochs
        fit_loop = type("FitLoop", (), {"max_epochs": epochs})

    return T()


def test_forward_normalises_unit_range_images_to_seven_logits():
    model = small_model().eval()
    with torch.no_grad():
        assert model(torch.rand(2, 1, 48, 48)).shape == (2, 7)
    assert model.hparams["mean"] == [0.5] and model.hparams["std"] == [0.5]


def test_cosine_schedule_warms_up_then_decays_to_the_floor():
    factors = [scheduled_lr_factor(s, total=100, warmup=10, min_ratio=0.01) for s in range(100)]
    assert factors[0] == pytest.approx(0.1) and factors[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(factors[10:], factors[11:]))
    assert factors[-1] == pytest.approx(0.01, abs=1e-3)


def test_onecycle_is_a_stateless_schedule_that_resumes_with_more_epochs():
    model = small_model(optimizer=partial(torch.optim.SGD, lr=0.1, momentum=0.9),
                        scheduler={"name": "onecycle", "warmup_epochs": 1.0, "min_lr_ratio": 0.01})
    model._trainer = fake_trainer(8, 2)  # warm-up min(4, 8 // 5) = 1 step: torch's OneCycleLR divided by zero
    configured = model.configure_optimizers()
    optimizer, scheduler = configured["optimizer"], configured["lr_scheduler"]["scheduler"]
    rates = []
    for _ in range(8):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert rates[0] == pytest.approx(0.1 / 25) and rates[1] == pytest.approx(0.1)  # OneCycleLR's div_factor
    assert all(a > b for a, b in zip(rates[1:], rates[2:]))
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.1 / 25 / 1e4)  # and its final_div_factor
    assert optimizer.param_groups[0]["momentum"] == 0.9  # not cycled
    # resume=auto trainer.max_epochs=3: a new schedule with the saved state stretches to 12 steps.
    model._trainer = fake_trainer(12, 3)
    configured = model.configure_optimizers()
    resumed, again = configured["optimizer"], configured["lr_scheduler"]["scheduler"]
    resumed.load_state_dict(optimizer.state_dict())
    again.load_state_dict(scheduler.state_dict())
    rates = []
    for _ in range(4):
        resumed.step()
        again.step()
        rates.append(resumed.param_groups[0]["lr"])
    assert rates[0] > 0.01 and rates[-1] == pytest.approx(0.1 / 25 / 1e4)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"label_smoothing": 1.5}, r"^optim.label_smoothing=1.5: expected a value in \[0, 1\)$"),
    ({"mixup_alpha": -0.2}, r"^optim.mixup_alpha=-0.2: expected 0 \(off\)"),
    ({"cutmix_alpha": -1.0}, r"^optim.cutmix_alpha=-1.0: expected 0 \(off\)"),
    ({"scheduler": {"min_lr_ratio": 3}}, r"^optim.scheduler.min_lr_ratio=3: expected a value in \[0, 1\]$"),
    ({"scheduler": {"warmup_epochs": -2}}, r"^optim.scheduler.warmup_epochs=-2: expected a value >= 0$"),
    ({"scheduler": {"name": "step"}}, r"^optim.scheduler.name='step': expected one of cosine, onecycle, none$"),
])
def test_bad_optim_values_are_refused_when_the_model_is_built(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        small_model(**kwargs)


def test_an_endless_run_needs_no_schedule_or_a_finite_max_epochs():
    model = small_model()
    model._trainer = fake_trainer(float("inf"), -1)  # trainer.max_epochs=-1: until trainer.max_time
    with pytest.raises(ConfigError, match=r"^trainer.max_epochs=-1: optim.scheduler.name=cosine needs a finite run"):
        model.configure_optimizers()
    model.scheduler_cfg["name"] = "none"
    assert "lr_scheduler" not in model.configure_optimizers()


def test_best_accuracy_travels_in_checkpoints():
    model = small_model()
    checkpoint = {}
    model.on_save_checkpoint(checkpoint)
    assert "val_acc_best" not in checkpoint  # nothing validated yet
    model.val_acc_best(torch.tensor(0.6))
    model.on_save_checkpoint(checkpoint)
    resumed = small_model()
    resumed.on_load_checkpoint(checkpoint)
    resumed.on_train_start()
    resumed.val_acc_best(torch.tensor(0.4))
    assert resumed.val_acc_best.compute() == pytest.approx(0.6)  # a worse epoch after the resume keeps the best
    old = small_model()
    old.on_load_checkpoint({})  # a checkpoint from before the key
    old.on_train_start()
    old.val_acc_best(torch.tensor(0.4))
    assert old.val_acc_best.compute() == pytest.approx(0.4)


def test_no_weight_decay_on_biases_and_norms():
    model = small_model(optimizer=partial(torch.optim.AdamW, lr=1e-3, weight_decay=0.05),
                        scheduler={"name": "none"})
    optimizer = model.configure_optimizers()["optimizer"]
    decayed, plain = optimizer.param_groups
    assert decayed["weight_decay"] == 0.05 and plain["weight_decay"] == 0.0
    assert all(p.ndim > 1 for p in decayed["params"]) and all(p.ndim <= 1 for p in plain["params"])


def test_layer_decay_lowers_the_rate_stage_by_stage_down_to_the_stem():
    model = small_model(optimizer=partial(torch.optim.AdamW, lr=1e-3, weight_decay=0.05),
                        scheduler={"name": "cosine", "warmup_epochs": 0.0, "min_lr_ratio": 0.01},
                        layer_decay=0.5)

    model._trainer = fake_trainer(100, 10)
    configured = model.configure_optimizers()
    optimizer, scheduler = configured["optimizer"], configured["lr_scheduler"]["scheduler"]
    rate = {id(p): g["lr"] for g in optimizer.param_groups for p in g["params"]}
    decay = {id(p): g["weight_decay"] for g in optimizer.param_groups for p in g["params"]}
    named = dict(model.net.named_parameters())
    assert len(rate) == len(named)  # every parameter in exactly one group
    assert rate[id(named["classifier.weight"])] == pytest.approx(1e-3)
    # Lite0's stem sits 8 coarse stages below the classifier: 1e-3 * 0.5**8.
    assert rate[id(named["conv_stem.weight"])] == pytest.approx(1e-3 * 0.5**8)
    stages = [rate[id(named[f"blocks.{i}.0.conv_dw.weight"])] for i in range(7)]
    assert stages == sorted(stages) and len(set(stages)) == 7
    assert decay[id(named["blocks.3.0.bn1.weight"])] == 0.0 and decay[id(named["blocks.3.0.conv_pw.weight"])] == 0.05
    # The schedule scales every group alike, so the ratios hold through it.
    for _ in range(50):
        optimizer.step()
        scheduler.step()
    now = {id(p): g["lr"] for g in optimizer.param_groups for p in g["params"]}
    stem, head = id(named["conv_stem.weight"]), id(named["classifier.weight"])
    assert now[head] < 1e-3 and now[stem] / now[head] == pytest.approx(0.5**8)
    with pytest.raises(ValueError, match=r"optim.layer_decay=0: expected a value in \(0, 1\]"):
        small_model(layer_decay=0)


def test_freeze_trains_only_the_head_until_the_epoch_given():
    model = small_model()
    freeze = BackboneFreeze(epochs=1)
    freeze.freeze_before_training(model)
    head = set(map(id, model.net.get_classifier().parameters()))
    for p in model.net.parameters():
        assert p.requires_grad == (id(p) in head)
    freeze.finetune_function(model, epoch=1, optimizer=None)
    assert all(p.requires_grad for p in model.net.parameters())


def test_frozen_stages_keep_the_stem_and_first_blocks_at_their_weights():
    model = small_model(frozen_stages=2, scheduler={"name": "none"})
    frozen = {name for name, p in model.net.named_parameters() if not p.requires_grad}
    assert frozen and all(name.startswith(("conv_stem.", "bn1.", "blocks.0.", "blocks.1.")) for name in frozen)
    assert not any(p.requires_grad for p in model.net.blocks[1].parameters())
    optimizer = model.configure_optimizers()["optimizer"]
    in_optimizer = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert in_optimizer == {id(p) for p in model.net.parameters() if p.requires_grad}
    before = {k: v.clone() for k, v in model.net.state_dict().items()}
    model.train()
    loss = model._loss(model(torch.rand(4, 1, 32, 32)), torch.tensor([0, 1, 2, 3]))
    loss.backward()
    optimizer.step()
    after = model.net.state_dict()
    assert torch.equal(before["conv_stem.weight"], after["conv_stem.weight"])
    assert torch.equal(before["blocks.1.0.conv_pw.weight"], after["blocks.1.0.conv_pw.weight"])
    assert not torch.equal(before["blocks.2.0.conv_pw.weight"], after["blocks.2.0.conv_pw.weight"])
    assert not torch.equal(before["bn1.running_mean"], after["bn1.running_mean"])  # statistics still adapt
    # A head-only warm-up (optim.freeze_backbone_epochs) unfreezes the body, but not the frozen stages.
    freeze = BackboneFreeze(epochs=1)
    freeze.freeze_before_training(model)
    freeze.finetune_function(model, epoch=1, optimizer=None)
    assert {name for name, p in model.net.named_parameters() if not p.requires_grad} == frozen
    with pytest.raises(ValueError, match="frozen_stages=9: this EfficientNet has 7 blocks"):
        small_model(frozen_stages=9)


def test_ema_leaves_the_live_weights_in_place_until_averaging_starts():
    model = small_model()
    weight = model.net.get_classifier().weight
    ema = EMAWeights(decay=0.5, update_starting_at_step=1000)
    ema.setup(None, model, "fit")
    with torch.no_grad():
        weight.add_(1.0)  # training moved the weights; no averaging step yet
    live = weight.detach().clone()
    ema.on_validation_epoch_start(None, model)
    assert torch.equal(weight, live)  # validated as they are, not as initialised
    ema.on_validation_epoch_end(None, model)
    checkpoint = {"state_dict": model.state_dict()}
    ema.on_save_checkpoint(None, model, checkpoint)
    assert "current_model_state" not in checkpoint and torch.equal(checkpoint["state_dict"]["net.classifier.weight"], live)
    ema.on_train_end(None, model)
    assert torch.equal(weight, live)
    # Once averaging has started, validation sees the average and training resumes from the live weights.
    ema._average_model.update_parameters(model)  # the first update copies the weights
    with torch.no_grad():
        weight.add_(1.0)
    ema.on_validation_epoch_start(None, model)
    assert torch.equal(weight, live)
    ema.on_validation_epoch_end(None, model)
    assert torch.equal(weight, live + 1.0)


def test_short_fit_with_sgd_onecycle_class_weights_and_frozen_backbone(tmp_path):
    cfg = compose_train(tmp_path, [
        "optim=sgd", "optim.scheduler.name=onecycle", "optim.class_weights=inverse_freq",
        "optim.freeze_backbone_epochs=5", "trainer.max_epochs=1", "data.source.num_train=140",
        "data.source.num_val=70", "data.image_size=32",
    ])
    summary = train(cfg)
    assert summary["epochs_completed"] == 1
    state = torch.load(summary["last_model_path"], map_location="cpu", weights_only=True)["state_dict"]
    pretrained = FERClassifier().state_dict()  # the same offline Lite0 weights, untrained
    assert torch.equal(state["net.conv_stem.weight"], pretrained["net.conv_stem.weight"])  # frozen
    assert not torch.equal(state["net.classifier.weight"], pretrained["net.classifier.weight"])
    assert torch.allclose(state["loss_weights"], torch.ones(7), atol=0.2)  # balanced classes: near 1


def test_inverse_frequency_weights_favour_rare_classes():
    model = small_model(class_weights="inverse_freq")

    class DM:
        @staticmethod
        def class_counts():
            return np.array([400, 40, 400, 800, 400, 300, 400])

    class T:
        datamodule = DM()

    model._trainer = T()
    model.setup("fit")
    weights = model.loss_weights
    assert weights[1] > 5 * weights[3] and weights.mean() == pytest.approx(1.0)


@pytest.mark.parametrize(("mixup", "cutmix"), [(0.4, 0.0), (0.0, 1.0), (0.4, 1.0)])
def test_mixing_blends_images_and_reports_the_weight(mixup, cutmix):
    torch.manual_seed(0)
    model = small_model(mixup_alpha=mixup, cutmix_alpha=cutmix)
    images = torch.rand(8, 1, 32, 32)
    mixed, order, lam = model._mix(images)
    assert order is not None and 0.0 <= lam <= 1.0 and mixed.shape == images.shape
    if cutmix and not mixup:  # pasted pixels come from the partner image, the rest stay
        pasted = ~torch.isclose(mixed, images)
        paired = order != torch.arange(8)  # a sample paired with itself looks unchanged
        assert pasted[paired].float().mean().item() == pytest.approx(1 - lam, abs=0.02)
        assert torch.equal(mixed[pasted], images[order][pasted])


def test_no_mixing_by_default():
    images = torch.rand(4, 1, 16, 16)
    mixed, order, lam = small_model()._mix(images)
    assert mixed is images and order is None and lam == 1.0
