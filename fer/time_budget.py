"""Fit the number of epochs to `Trainer(max_time=...)`, so a time-boxed run ends on a validated epoch
with its learning rate fully decayed.

Lightning's Timer stops a run mid-epoch when time is up: the last partial epoch is never validated, and
a schedule sized for `max_epochs` is cut off before its low-learning-rate end, where most of a
fine-tune's accuracy is made ("budgeted training", Li et al., ICLR 2020). After every epoch this callback
measures how long an epoch (training + validation) took, sets `max_epochs` to the epochs that still fit
in the time left (at most the configured number), and FERClassifier's schedule follows the new length. On a faster machine the run gets
more epochs, on a slower one fewer, and both end annealed. The Timer stays as the hard stop.

With `ProgressiveResize`, epochs differ in cost: the plan adds up the predicted time of each epoch still to
come at its own image size (measured once that size has run; until then scaled from the nearest measured
size by its side length; the plan corrects itself once the size has run).
"""

from __future__ import annotations

import logging
import statistics
import time

import lightning as L
from lightning.pytorch.callbacks import Timer

from fer.progressive import ProgressiveResize

log = logging.getLogger(__name__)

RECENT = 3  # epoch times per image size that the plan looks at


class FitEpochsToMaxTime(L.Callback):
    """After each epoch, set max_epochs to the epochs that fit in the time the Timer has left, never above
    the configured max_epochs. The first epoch is the slowest (warm-up), so a later, faster epoch may give
    back epochs an early estimate took away (until the last planned epoch, which always stays the last)."""

    def __init__(self, safety: float = 1.15) -> None:
        self.safety = safety  # epochs may run this much slower than the recent median (seen here: 109-130 s)
        self.upper: int | None = None  # the configured max_epochs
        self.max_epochs: int | None = None  # the current fit, kept in checkpoints for a resumed run
        self._epoch_start: float | None = None
        # Recent epoch times at each training image size; their median plans the rest (one slow epoch,
        # e.g. the first, must not shorten the run and the next fast one lengthen it again).
        self.seconds_at_size: dict[int, list[float]] = {}

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.upper = self.upper or trainer.fit_loop.max_epochs
        if self.max_epochs is not None:  # resumed: continue with the fitted length, not the configured one
            trainer.fit_loop.max_epochs = self.max_epochs

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._epoch_start = time.monotonic()

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Called after the epoch's validation, so the measured time includes it.
        timer = next((c for c in trainer.callbacks if isinstance(c, Timer)), None)
        remaining = timer.time_remaining("train") if timer is not None else None
        if remaining is None or self._epoch_start is None or not self.upper:
            return
        epoch_time = time.monotonic() - self._epoch_start
        resize = next((c for c in trainer.callbacks if isinstance(c, ProgressiveResize)), None)
        full_size = getattr(trainer.datamodule, "image_size", 0)
        size = resize.current_size if resize and resize.current_size else full_size
        self.seconds_at_size[size] = [*self.seconds_at_size.get(size, [])[-(RECENT - 1):], epoch_time]
        wanted = self._epochs_that_fit(trainer.current_epoch + 1, max(0.0, remaining), resize, full_size)
        if trainer.current_epoch + 1 >= trainer.fit_loop.max_epochs:
            # The schedule has just reached its end: an extra epoch would only re-warm a finished run
            # and race the Timer's hard stop.
            wanted = trainer.fit_loop.max_epochs
        wanted = int(trainer.strategy.broadcast(wanted))
        if wanted != trainer.fit_loop.max_epochs:
            log.info("time budget: epoch %d took %.0f s and %.0f s are left, so the run ends after epoch %d "
                     "(was %d); the learning-rate schedule ends there too",
                     trainer.current_epoch, epoch_time, remaining, wanted - 1, trainer.fit_loop.max_epochs - 1)
            trainer.fit_loop.max_epochs = wanted
        self.max_epochs = wanted

    def _epochs_that_fit(self, done: int, remaining: float, resize: ProgressiveResize | None, full_size: int) -> int:
        """The largest max_epochs (<= upper) whose epochs after the `done` ones fit in `remaining` seconds."""
        for max_epochs in range(self.upper, done, -1):
            sizes = [resize.size_at(e, max_epochs, full_size) if resize else full_size for e in range(done, max_epochs)]
            if sum(self._predicted_seconds(size) for size in sizes) * self.safety <= remaining:
                return max_epochs
        return done

    def _predicted_seconds(self, size: int) -> float:
        if size in self.seconds_at_size:
            return statistics.median(self.seconds_at_size[size])
        nearest = min(self.seconds_at_size, key=lambda seen: abs(seen - size))
        # Scaled by the side, not the pixel count: validation runs at the full size whatever the training
        # size, and the step itself is sub-quadratic at these sizes (Lite0: 48 px steps ~1.45x faster than 64 px).
        return statistics.median(self.seconds_at_size[nearest]) * size / nearest

    def state_dict(self) -> dict:
        return {"max_epochs": self.max_epochs, "upper": self.upper, "seconds_at_size": self.seconds_at_size}

    def load_state_dict(self, state_dict: dict) -> None:
        self.max_epochs = state_dict.get("max_epochs")
        self.upper = state_dict.get("upper")
        self.seconds_at_size = {size: list(times) for size, times in (state_dict.get("seconds_at_size") or {}).items()}
