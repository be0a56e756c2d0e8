"""Checkpoints that survive being killed: atomic writes, a kept previous last.ckpt, saving on preemption.

- `AtomicCheckpointIO` (a Trainer plugin, so it covers every write: top-k, last, preemption, hpc): the
  checkpoint goes to a temporary file in the same folder, is fsync'ed and renamed over the target.
  A kill at any moment leaves either the old file or the new one, never half of one. Before `last.ckpt` is
  replaced, the current one becomes `last.ckpt.prev`, so there is always a previous good checkpoint.
- `Preemption` (a callback): SIGTERM (Lightning's own handling) and SIGUSR1/SIGUSR2 (what SLURM and
  submitit send before a time limit or preemption) finish the current batch, save `last.ckpt` and stop.
  The entry point then exits with 143, or hands the signal on to submitit, which requeues the job.
- `load_initial_weights`: `init_from=` loads the network weights of a checkpoint (weights_only) and nothing
  else: fine-tuning on new data with a fresh optimiser, schedule and epoch count.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import uuid
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.fabric.utilities.cloud_io import _is_local_file_protocol
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities.exceptions import SIGTERMException

from fer.resume import LAST, PREVIOUS

log = logging.getLogger("fer.checkpointing")


class AtomicCheckpointIO(TorchCheckpointIO):
    """TorchCheckpointIO whose writes are atomic (temp file + fsync + os.replace) and keep the previous last.ckpt."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options, got {storage_options!r}")
        if not _is_local_file_protocol(str(path)):  # s3:// and friends: rename is not atomic there anyway
            return super().save_checkpoint(checkpoint, path, storage_options)
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
        try:
            with open(tmp, "wb") as file:
                torch.save(checkpoint, file)
                file.flush()
                os.fsync(file.fileno())
            if path.name == LAST and path.is_file():
                os.replace(path, path.with_name(PREVIOUS))
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)


class EpochCheckpoint(ModelCheckpoint):
    """ModelCheckpoint whose last.ckpt is written at every save point, whether or not the monitored metric improved.

    Lightning 2.6 writes last.ckpt only together with a new top-k checkpoint, so an epoch that does not beat the
    best would leave last.ckpt behind, and a resume would redo that epoch. Resuming needs the latest state.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._last_written_step = -1

    def _save_last_checkpoint(self, trainer: L.Trainer, monitor_candidates: dict[str, Any]) -> None:
        super()._save_last_checkpoint(trainer, monitor_candidates)
        if self.save_last:
            self._last_written_step = trainer.global_step

    def _ensure_last(self, trainer: L.Trainer) -> None:
        if (self.save_last and trainer.global_step != self._last_written_step and not trainer.sanity_checking
                and not trainer.fast_dev_run and trainer.state.fn == "fit"):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if self._every_n_train_steps >= 1 and trainer.global_step % self._every_n_train_steps == 0:
            self._ensure_last(trainer)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_epoch_end(trainer, pl_module)
        if self._should_save_on_train_epoch_end(trainer) and self._every_n_epochs >= 1:
            self._ensure_last(trainer)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_validation_end(trainer, pl_module)
        if not self._should_save_on_train_epoch_end(trainer) and self._every_n_epochs >= 1:
            self._ensure_last(trainer)


def _last_path(trainer: L.Trainer) -> Path:
    for callback in trainer.checkpoint_callbacks:
        if isinstance(callback, ModelCheckpoint) and callback.dirpath:
            return Path(callback.dirpath) / LAST
    return Path(trainer.default_root_dir) / "checkpoints" / LAST


def submitit_signal() -> int | None:
    """The signal submitit asks SLURM to send before a time limit (USR2 unless SUBMITIT_PREEMPT_SIGNAL says)."""
    return getattr(signal, "SIG" + os.environ.get("SUBMITIT_PREEMPT_SIGNAL", "USR2"), None)


class Preemption(L.Callback):
    """Saves last.ckpt and stops cleanly on SIGTERM, SIGUSR1 or SIGUSR2 (after the current batch)."""

    def __init__(self, signals: tuple[str, ...] | list[str] = ("SIGUSR1", "SIGUSR2")) -> None:
        # SIGTERM is not in the list: Lightning handles it already (it stops after the current batch by raising
        # SIGTERMException); the signals here are routed into that same path.
        self.signals = tuple(signals)
        self.received: int | None = None
        self.saved_path: str | None = None
        self.previous_handlers: dict[int, Any] = {}

    def __getstate__(self) -> dict[str, Any]:  # ddp_spawn pickles callbacks: handlers are per process
        return {**self.__dict__, "previous_handlers": {}}

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit" or threading.current_thread() is not threading.main_thread():
            return
        self.received, self.saved_path = None, None

        def handler(signum: int, frame: Any) -> None:
            log.warning("received %s: stopping after the current batch and saving %s",
                        signal.Signals(signum).name, LAST)
            self.received = signum
            trainer._signal_connector.received_sigterm = True  # the loops then raise SIGTERMException

        for name in self.signals:
            signum = getattr(signal, name, None)
            if signum is not None:
                self.previous_handlers[signum] = signal.getsignal(signum)
                signal.signal(signum, handler)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Lightning resets its SIGTERM flag when it registers its handlers, just before this hook.
        if self.received is not None:
            trainer._signal_connector.received_sigterm = True
        log.info("training loop running: SIGTERM, %s now save %s and stop", "/".join(self.signals), LAST)

    def _restore_handlers(self) -> None:
        if threading.current_thread() is threading.main_thread():
            for signum, previous in self.previous_handlers.items():
                signal.signal(signum, previous if previous is not None else signal.SIG_DFL)

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._restore_handlers()
        if not isinstance(exception, SIGTERMException):
            return
        if self.received is None:
            self.received = signal.SIGTERM
        path = _last_path(trainer)
        trainer.save_checkpoint(path, weights_only=False)  # atomic (AtomicCheckpointIO); consistent: between batches
        for callback in trainer.checkpoint_callbacks:
            if isinstance(callback, ModelCheckpoint):
                callback.last_model_path = str(path)
        self.saved_path = str(path)
        log.warning("preempted at epoch %d, step %d: saved %s; rerun with resume=auto to continue",
                    trainer.current_epoch, trainer.global_step, path)

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._restore_handlers()

    def hand_on(self) -> bool:
        """After a stop: pass the signal to the handler that was there before (submitit's requeue). True if one ran."""
        previous = self.previous_handlers.get(self.received) if self.received is not None else None
        if callable(previous):
            previous(self.received, None)  # submitit: requeue the job, then sys.exit
            return True
        return False


# -- init_from: weights only ----------------------------------------------------------------------------
def load_initial_weights(model: L.LightningModule, source: str | os.PathLike) -> Path:
    """Load the `net.*` weights of a checkpoint (or a run directory's best, or a plain state dict) strictly into `model.net`."""
    from fer.checkpoint import plain_network_keys, read_checkpoint, resolve_checkpoint
    from fer.errors import CheckpointError

    path = resolve_checkpoint(source)
    ckpt = read_checkpoint(path)
    state = ckpt.get("state_dict", ckpt)
    if not isinstance(state, dict):
        raise CheckpointError(f"init_from={path}: holds no state_dict")
    state = plain_network_keys(state)
    net = {k[len("net."):]: v for k, v in state.items() if k.startswith("net.")}
    if not net:  # a bare network state dict (e.g. exported from timm)
        net = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    if not net:
        raise CheckpointError(f"init_from={path}: no network weights (net.*) inside")
    try:
        model.net.load_state_dict(net, strict=True)
    except RuntimeError as exc:
        detail = " ".join(str(exc).split())[:300]
        raise CheckpointError(f"init_from={path}: weights do not fit the configured model ({detail})") from exc
    log.info("init_from: loaded %d tensors from %s (weights only; fresh optimiser and schedule)", len(net), path)
    return path
