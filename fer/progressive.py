"""Progressive resizing: the first part of a run trains on smaller images, growing to `data.image_size`.

Small images make the early epochs, where the network moves furthest from its ImageNet start, cheaper, so a
time-boxed run can fit more epochs. The last epochs train at the full size, so the network (and its
batch-norm statistics) end adapted to the size it is validated, evaluated and exported at. Fast.ai's
DAWNBench entries and EfficientNetV2's "progressive learning" (Tan & Le, 2021) train this way. On this
project's 2-core CPU it bought no epochs (48 px epochs ~0.8x the time of 64 px ones, 56 px ones no faster:
README ablation table); it is meant for accelerators, where small images do cut the step.

The size of an epoch follows from its index, the planned number of epochs and the size trained at last
(sizes never shrink), so `FitEpochsToMaxTime` can ask `size_at` for the sizes still to come.
"""

from __future__ import annotations

import logging

import lightning as L

from fer.errors import ConfigError

log = logging.getLogger(__name__)


class ProgressiveResize(L.Callback):
    """Train at `start_size` px first, growing in steps of `step` px to the datamodule's `image_size` over the
    first `fraction` of the planned epochs; the rest of the run trains at the full size."""

    def __init__(self, start_size: int = 48, step: int = 8, fraction: float = 0.5) -> None:
        if not 0.0 <= fraction < 1.0:
            raise ConfigError(f"callbacks.progressive_resize.fraction={fraction}: expected 0 <= fraction < 1")
        if start_size < 8 or step < 1:
            raise ConfigError(f"callbacks.progressive_resize: start_size={start_size} (>= 8), step={step} (>= 1)")
        self.start_size = int(start_size)
        self.step = int(step)
        self.fraction = float(fraction)
        self.current_size: int | None = None

    def size_at(self, epoch: int, max_epochs: int, full_size: int) -> int:
        """Training image size of `epoch` (0-based) in a run of `max_epochs` epochs; never below the size
        trained at last (a time budget that grows the plan mid-run must not shrink the images again)."""
        # The last planned epoch always trains at the full size, however short the plan (a time budget may
        # cut it to a few epochs) or large the fraction: the network must end adapted to that size.
        ramp = min(self.fraction * max_epochs, max_epochs - 1)
        if epoch >= ramp or self.start_size >= full_size:
            return full_size
        grown = self.start_size + (full_size - self.start_size) * epoch / ramp
        size = min(full_size, self.start_size + int(grown - self.start_size) // self.step * self.step)
        return max(size, self.current_size or 0)

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        datamodule = trainer.datamodule
        full_size = datamodule.image_size
        size = self.size_at(trainer.current_epoch, trainer.fit_loop.max_epochs, full_size)
        if size != self.current_size:
            log.info("progressive resizing: epoch %d trains at %d px (full size %d px)",
                     trainer.current_epoch, size, full_size)
        datamodule.augment.output_size = None if size == full_size else size
        self.current_size = size
        for logger in trainer.loggers:
            logger.log_metrics({"train/image_size": size}, step=trainer.global_step)

    # Saved in checkpoints, so a run resumed mid-ramp does not step back to a smaller size for an epoch.
    def state_dict(self) -> dict[str, int | None]:
        return {"current_size": self.current_size}

    def load_state_dict(self, state_dict: dict[str, int | None]) -> None:
        self.current_size = state_dict.get("current_size")

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.datamodule is not None:
            trainer.datamodule.augment.output_size = None
