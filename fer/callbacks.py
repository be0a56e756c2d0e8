"""Lightning callbacks: confusion-matrix figure, augmented-sample grid, backbone freeze, EMA of weights."""

from __future__ import annotations

import lightning as L
import torch
import torchvision
from lightning.pytorch.callbacks import BaseFinetuning, EMAWeightAveraging
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_only

from fer.plots import confusion_matrix_figure


def tensorboard(trainer: L.Trainer):
    """The SummaryWriter of the trainer's TensorBoard logger, or None."""
    for logger in trainer.loggers:
        if isinstance(logger, TensorBoardLogger):
            return logger.experiment
    return None


class ConfusionMatrixLogger(L.Callback):
    """Logs `val/confusion_matrix` (normalised, class names on the axes) after every validation epoch."""

    @rank_zero_only
    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # on_validation_end runs after the module's on_validation_epoch_end has computed the matrix.
        writer = tensorboard(trainer)
        confusion = getattr(pl_module, "last_confusion", None)
        if writer is None or confusion is None or trainer.sanity_checking:
            return
        figure = confusion_matrix_figure(confusion.numpy(), pl_module.class_names)
        writer.add_figure("val/confusion_matrix", figure, global_step=trainer.current_epoch, close=True)


class AugmentedSampleGrid(L.Callback):
    """Logs one grid of augmented training images, so the augmentation can be checked by eye."""

    def __init__(self, num_images: int = 32) -> None:
        self.num_images = num_images
        self.logged = False

    @rank_zero_only
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        writer = tensorboard(trainer)
        if self.logged or writer is None:
            return
        images = batch[0][: self.num_images].detach().float().cpu().clamp(0, 1)
        grid = torchvision.utils.make_grid(images, nrow=8, padding=2, pad_value=1.0)
        writer.add_image("train/augmented_samples", grid, global_step=trainer.global_step)
        self.logged = True


class BackboneFreeze(BaseFinetuning):
    """Trains only the classifier head for the first `epochs` epochs, then the whole network.

    Every parameter sits in the optimiser from the start (frozen ones simply get no gradient), so the
    learning-rate schedule covers the whole run without new parameter groups mid-way.
    """

    def __init__(self, epochs: int = 0) -> None:
        super().__init__()
        self.epochs = int(epochs)

    @staticmethod
    def _body(pl_module: L.LightningModule) -> list[torch.nn.Module]:
        head = pl_module.net.get_classifier()
        return [m for name, m in pl_module.net.named_children() if m is not head]

    def freeze_before_training(self, pl_module: L.LightningModule) -> None:
        if self.epochs > 0:
            self.freeze(self._body(pl_module), train_bn=False)

    def finetune_function(self, pl_module: L.LightningModule, epoch: int, optimizer) -> None:
        if self.epochs > 0 and epoch == self.epochs:
            self._unfreeze(pl_module)

    def on_fit_start(self, trainer, pl_module) -> None:
        # BaseFinetuning restores the parameter groups it added; this callback adds none.
        if self.epochs > 0 and trainer.current_epoch >= self.epochs:
            self._unfreeze(pl_module)

    def _unfreeze(self, pl_module: L.LightningModule) -> None:
        self.make_trainable(self._body(pl_module))
        for param in getattr(pl_module, "frozen_parameters", []):  # model.frozen_stages stay frozen for good
            param.requires_grad_(False)


class EMAWeights(EMAWeightAveraging):
    """Lightning's EMAWeightAveraging, but the live weights stand in until averaging has started.

    Lightning validates, checkpoints and finally keeps the average model even before its first update
    (`update_starting_at_step`), i.e. the untrained initial weights: a run's first epochs then report
    chance accuracy and a run shorter than the start step ends with its initial weights.
    """

    def _averaging(self) -> bool:
        return self._average_model is not None and int(self._average_model.n_averaged) > 0

    def on_validation_epoch_start(self, trainer, pl_module) -> None:
        if self._averaging():
            super().on_validation_epoch_start(trainer, pl_module)

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if self._averaging():
            super().on_validation_epoch_end(trainer, pl_module)

    def on_save_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        if self._averaging():  # before that, the checkpoint holds the live weights (and resumes from them)
            super().on_save_checkpoint(trainer, pl_module, checkpoint)

    def on_train_end(self, trainer, pl_module) -> None:
        if self._averaging():
            super().on_train_end(trainer, pl_module)


from fer.checkpointing import Preemption  # noqa: E402,F401 - configured as fer.callbacks.Preemption
