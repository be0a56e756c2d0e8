"""Fit the number of epochs to `Trainer(max_time=...)`, so a time-boxed run ends on a validated epoch
with its learning rate fully decayed.

Lightning's Timer stops a run mid-epoch when time is up: the last partial epoch is never validated, and
a schedule sized for `max_epochs` is cut off before its low-learning-rate end, where most of a
fine-tune's accuracy is made ("budgeted training", Li et al., ICLR 2020). After every epoch this callback
measures how long an epoch (training + validation) took, sets `max_epochs` to the epochs that still fit
in the time left (at most the configured number), and FERClassifier's schedule follows the new length. On a faster machine the run gets
more epochs, on a slower one fewer, and both end annealed. The Timer stays as the hard stop.
"""

from __future__ import annotations

import logging
import time

import lightning as L
from lightning.pytorch.callbacks import Timer

log = logging.getLogger(__name__)


class FitEpochsToMaxTime(L.Callback):
    """After each epoch, set max_epochs to the epochs that fit in the time the Timer has left, never above
    the configured max_epochs. The first epoch is the slowest (warm-up), so a later, faster epoch may give
    back epochs an early estimate took away (until the last planned epoch, which always stays the last)."""

    def __init__(self, safety: float = 1.15) -> None:
        self.safety = safety  # an epoch may run this much slower than the last (seen here: 109-122 s)
        self.upper: int | None = None  # the configured max_epochs
        self.max_epochs: int | None = None  # the current fit, kept in checkpoints for a resumed run
        self._epoch_start: float | None = None

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
        fits = int(max(0.0, remaining) // (epoch_time * self.safety))
        wanted = min(self.upper, trainer.current_epoch + 1 + fits)
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

    def state_dict(self) -> dict:
        return {"max_epochs": self.max_epochs, "upper": self.upper}

    def load_state_dict(self, state_dict: dict) -> None:
        self.max_epochs = state_dict.get("max_epochs")
        self.upper = state_dict.get("upper")
