"""LiteRT (TensorFlow Lite, XNNPACK) interpreters as fer runs them: BlazeFace and exported classifiers."""

from __future__ import annotations

import contextlib
import importlib.util
import os
import sys
import threading
from pathlib import Path

import numpy as np

from fer.data.cache import usable_cpus
from fer.errors import DataError


def litert_available() -> bool:
    return importlib.util.find_spec("ai_edge_litert") is not None


def default_threads() -> int:
    # The CPUs this process may use (a SLURM task's share, taskset), as the data loader counts them.
    return min(4, usable_cpus())


@contextlib.contextmanager
def stderr_silenced():
    """File descriptor 2 pointed at /dev/null for the block (C++ writes there, past sys.stderr); errors
    still raise as Python exceptions."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def new_interpreter(model: str | os.PathLike | bytes, threads: int | None = None):
    """An allocated Interpreter for a .tflite file or its bytes, without LiteRT's "Created XNNPACK delegate"
    line on the console."""
    if not litert_available():
        raise DataError("LiteRT is not installed: pip install ai-edge-litert")
    from ai_edge_litert.interpreter import Interpreter

    source = {"model_content": bytes(model)} if isinstance(model, (bytes, bytearray)) else {"model_path": str(model)}
    with stderr_silenced():
        interpreter = Interpreter(**source, num_threads=threads or default_threads())
        interpreter.allocate_tensors()
    return interpreter


class PerThreadInterpreter:
    """One Interpreter per calling thread (an Interpreter must not be shared between threads), made on first
    use, with a per-thread dict beside it for what its user looks up once (tensor indices, shapes)."""

    def __init__(self, model: str | os.PathLike | bytes, threads: int | None = None) -> None:
        self.model = model if isinstance(model, (bytes, bytearray)) else Path(model)
        self.threads = threads or default_threads()
        self._local = threading.local()

    def get(self) -> tuple[object, dict]:
        local = self._local
        if not hasattr(local, "interpreter"):
            local.interpreter, local.cache = new_interpreter(self.model, self.threads), {}
        return local.interpreter, local.cache


class LiteRTModel:
    """A one-input, one-output .tflite model as a function of a numpy batch (any batch size: the input is
    resized when the batch changes)."""

    def __init__(self, model: str | os.PathLike | bytes, threads: int | None = None) -> None:
        self._interpreters = PerThreadInterpreter(model, threads)

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        interpreter, cache = self._interpreters.get()
        if not cache:  # the details are looked up once: they cost more than a small model's invoke
            (source,), (target,) = interpreter.get_input_details(), interpreter.get_output_details()
            cache.update(source=source["index"], target=target["index"], shape=tuple(source["shape"]))
        if batch.shape != cache["shape"]:
            interpreter.resize_tensor_input(cache["source"], list(batch.shape))
            interpreter.allocate_tensors()
            cache["shape"] = batch.shape
        interpreter.set_tensor(cache["source"], np.ascontiguousarray(batch, dtype=np.float32))
        interpreter.invoke()
        return interpreter.get_tensor(cache["target"])
