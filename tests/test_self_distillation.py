"""Progressive self-distillation: the targets it builds, the positions it needs, and a fit that resumes with it."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import compose_train
from fer.data.datamodule import ArrayDataset, FERDataModule
from fer.data.synthetic import SyntheticSource
from fer.errors import ConfigError
from fer.models.classifier import FERClassifier
from fer.models.losses import smoothed_targets
from fer.models.self_distillation import PredictionMemory
from fer.train import train


def test_targets_keep_the_label_until_a_face_is_seen_then_mix_in_its_last_prediction():
    memory = PredictionMemory(alpha=0.8, num_classes=7)
    memory.reset(5)
    assert [memory.share(e, 4) for e in (0, 1, 3, 9)] == pytest.approx([0.2, 0.4, 0.8, 0.8])  # rises, then holds
    labels, positions = torch.tensor([0, 5, 6]), torch.tensor([1, 2, 3])
    base = smoothed_targets(labels, 7, 0.1)
    assert torch.equal(memory.targets(base, positions, 0.5), base)  # nothing remembered yet
    probs = F.softmax(torch.randn(2, 7), dim=1)
    memory.remember(torch.tensor([3, 1]), probs)
    mixed = memory.targets(base, positions, 0.5)
    assert torch.allclose(mixed[0], 0.5 * base[0] + 0.5 * probs[1])  # position 1
    assert torch.equal(mixed[1], base[1])  # position 2: still unseen
    assert torch.allclose(mixed[2], 0.5 * base[2] + 0.5 * probs[0])  # position 3
    assert torch.allclose(mixed.sum(dim=1), torch.ones(3))


def test_training_batches_carry_each_faces_position_and_evaluation_batches_do_not(tmp_path):
    images = np.arange(10, dtype=np.uint8).reshape(10, 1, 1, 1).repeat(4, 2).repeat(4, 3)
    ds = ArrayDataset(images, np.arange(10) % 7, indices=np.array([9, 3, 5, 1]), with_positions=True)
    batch, labels, positions = ds.__getitems__([2, 0, 3])
    assert positions.tolist() == [2, 0, 3] and batch[:, 0, 0, 0].tolist() == [5, 9, 1]

    dm = FERDataModule(SyntheticSource(140, 70, 70), image_size=32, batch_size=16, cache_dir=tmp_path)
    dm.setup("fit")
    images, labels, positions = next(iter(dm.train_dataloader()))
    assert positions.dtype == torch.int64 and len(set(positions.tolist())) == 16
    expected = [dm.train_set[p] for p in positions.tolist()]
    assert torch.equal(images, torch.stack([image for image, _ in expected]))
    assert labels.tolist() == [label for _, label in expected]
    assert len(next(iter(dm.val_dataloader()))) == 2
    dm.trainer = SimpleNamespace(training=True)
    augmented = dm.on_after_batch_transfer((images, labels, positions), 0)
    assert len(augmented) == 3 and augmented[2] is positions and augmented[0].dtype == torch.float32


def test_distilled_loss_is_cross_entropy_against_the_softened_targets():
    model = FERClassifier(backbone={"weights": "none"}, label_smoothing=0.1, self_distill=0.5)
    model.memory.reset(8)
    model._trainer = SimpleNamespace(current_epoch=0, max_epochs=4, world_size=1)
    labels, positions = torch.tensor([0, 3, 6]), torch.tensor([4, 0, 7])
    first = torch.randn(3, 7)
    loss = model._distilled_loss(first, labels, positions)
    assert loss.item() == pytest.approx(F.cross_entropy(first, labels, label_smoothing=0.1).item())  # epoch 0
    assert (model.memory.probs.sum(dim=1) > 0).sum() == 3  # three faces remembered

    model._trainer.current_epoch = 1  # weight 0.5 * 2 / 4
    second = torch.randn(3, 7)
    targets = 0.75 * smoothed_targets(labels, 7, 0.1) + 0.25 * F.softmax(first, dim=1)
    loss = model._distilled_loss(second, labels, positions)
    assert loss.item() == pytest.approx(F.cross_entropy(second, targets).item(), rel=1e-5)
    assert torch.allclose(model.memory.probs[positions], F.softmax(second, dim=1))

    model.perturbed = True  # SAM's second pass: the step's own targets; its predictions are not remembered
    uphill = torch.randn(3, 7)
    loss = model._distilled_loss(uphill, labels, positions)
    assert loss.item() == pytest.approx(F.cross_entropy(uphill, targets).item(), rel=1e-5)
    assert torch.allclose(model.memory.probs[positions], F.softmax(second, dim=1))
    with pytest.raises(ConfigError, match="optim.self_distill needs training batches of"):
        model._distilled_loss(second, labels, None)


def test_with_class_weights_the_distilled_loss_starts_from_the_plain_weighted_loss():
    # PyTorch averages a weighted loss over the labels' weights for class indices but over the batch for
    # probability targets; the distilled loss must average as the plain one does, or weights change its scale.
    model = FERClassifier(backbone={"weights": "none"}, label_smoothing=0.1, self_distill=0.5)
    model.loss_weights.copy_(torch.tensor([3.0, 0.2, 1.0, 0.5, 1.5, 0.6, 0.2]))
    model.memory.reset(8)
    model._trainer = SimpleNamespace(current_epoch=0, max_epochs=4, world_size=1)
    labels, positions = torch.tensor([0, 3, 6, 0]), torch.tensor([4, 0, 7, 1])
    logits = torch.randn(4, 7)
    plain = F.cross_entropy(logits, labels, weight=model.loss_weights, label_smoothing=0.1)
    assert model._distilled_loss(logits, labels, positions).item() == pytest.approx(plain.item(), rel=1e-6)


@pytest.mark.parametrize(("options", "message"), [
    ({"self_distill": 1.0}, r"optim.self_distill=1.0: expected a value in \[0, 1\)"),
    ({"self_distill": -0.1}, r"optim.self_distill=-0.1: expected"),
    ({"self_distill": 0.5, "loss": "gce"}, "works with optim.loss=ce only, not 'gce'"),
    ({"self_distill": 0.5, "mixup_alpha": 0.2}, "does not combine with mixup or CutMix"),
])
def test_bad_settings_name_the_key(options, message):
    with pytest.raises(ConfigError, match=message):
        FERClassifier(backbone={"weights": "none"}, **options)


def test_fit_remembers_every_face_and_a_resumed_run_goes_on_with_the_memory(tmp_path, monkeypatch):
    cfg = compose_train(tmp_path, ["optim.self_distill=0.5", "trainer.max_epochs=1", "data.source.num_train=128",
                                   "data.source.num_val=32", "data.image_size=32", "data.batch_size=32",
                                   "callbacks.sample_grid=null", "callbacks.confusion_matrix=null", "run_name=pskd"])
    summary = train(cfg)
    saved = torch.load(summary["last_model_path"], map_location="cpu", weights_only=True)
    memory = saved["prediction_memory"]
    assert memory["probs"].shape == (128, 7)
    assert torch.allclose(memory["probs"].sum(dim=1), torch.ones(128))  # one epoch: every face remembered once
    assert not [key for key in saved["state_dict"] if "memory" in key]  # inference loads no part of it

    at_start = {}
    original = FERClassifier.on_train_start

    def spy(self):
        original(self)
        at_start["probs"] = self.memory.probs.clone()

    monkeypatch.setattr(FERClassifier, "on_train_start", spy)
    again = copy.deepcopy(cfg)
    again.resume, again.trainer.max_epochs = "auto", 2
    resumed = train(again)
    assert resumed["epochs_completed"] == 2 and resumed["resumed_from"]
    assert torch.equal(at_start["probs"], memory["probs"])  # restored, not reset
