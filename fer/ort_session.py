"""ONNX Runtime sessions as fer runs them (the classifier and BlazeFace alike), without importing torch."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence


def onnx_session(path: str | os.PathLike, threads: int | None = None, providers: Sequence[str] | None = None,
                 spin: bool = True):
    """An ONNX Runtime session (CPU unless `providers` says otherwise), shared by the classifier and BlazeFace.

    spin=True: worker threads busy-wait for work only while a run is in progress and stop the moment it
    returns (session.force_spinning_stop), so small models skip a thread wake-up per operator (BlazeFace
    3.7 -> 2.5 ms a photo on 2 cores) without stealing the CPU from what runs next (spinning left on after
    the run slowed a following eager B0 from 17 to 38 ms). spin=False: threads sleep between operators too.
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
    options.add_session_config_entry("session.force_spinning_stop", "1")
    # Denormal floats (~1e-38) take a slow microcode path on x86; flushing them changes no probability
    # measurably. Measured once: in a process where LiteRT had run, BlazeFace on ONNX Runtime took 6.4 ms
    # without this and 3.2 ms with it (2.45 ms either way in a fresh process).
    options.add_session_config_entry("session.set_denormal_as_zero", "1")
    if threads:
        options.intra_op_num_threads = int(threads)
    return ort.InferenceSession(str(path), options, providers=list(providers or ["CPUExecutionProvider"]))


def basic_optimise(source: str | os.PathLike, target: str | os.PathLike) -> None:
    """ONNX Runtime's basic (hardware-independent) graph optimisations, saved: constants folded, so the
    file is small and shape arithmetic (the exporter's pad amounts) becomes plain numbers that converters
    (fer.detectors.tflite_to_onnx, fer.tflite_export) can read."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    options.optimized_model_filepath = str(Path(target))
    options.log_severity_level = 3
    ort.InferenceSession(str(Path(source)), options, providers=["CPUExecutionProvider"])
