"""fer-export: a trained checkpoint as a self-contained ONNX, TorchScript or TFLite model.

    fer-export --checkpoint logs/train/runs/<run> --format onnx --output fer.onnx
    fer-export --checkpoint best.ckpt --format torchscript --output fer.pt
    fer-export --checkpoint best.ckpt --format tflite --output fer.tflite   # LiteRT: phones, and fastest on a CPU

The exported model takes a batch of face crops, float32 NCHW in [0, 1] at the trained size and channel
count (any batch size; TFLite takes NHWC, its own convention), and returns class probabilities: the normalisation (mean/std) and the softmax are
inside, and so is the calibration temperature when `fer-eval calibrate=true` stored one in the checkpoint.
Preprocessing is recorded in the file (ONNX metadata_props; TorchScript `_extra_files["fer.json"]`; TFLite
model metadata "fer.json").

Every export is checked before the file is written: the exported model and PyTorch must agree on real
faces (the checkpoint run's validation images; synthetic faces when that data is gone) within
`--tolerance` (1e-4) on every probability, at batch sizes 1 and 32. A larger difference is an error and no
file is left behind.

ONNX uses torch's TorchScript-based exporter (`dynamo=False`): it needs only `onnx`, works offline, and
gives a graph with a dynamic batch axis that ONNX Runtime runs as is. The torch.export-based exporter
(torch's default since 2.9) needs the extra `onnxscript` package; it is used only if the other is gone.
TFLite is converted from a static-shape ONNX export by fer.tflite_export (no TensorFlow needed) and run
with LiteRT (`ai-edge-litert`) for the check.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import uuid
import warnings
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from fer.errors import FERError
from fer.ort_session import onnx_session

log = logging.getLogger(__name__)

FORMATS = ("onnx", "torchscript", "tflite")
TOLERANCE = 1e-4
OPSET = 17
INPUT_NAME, OUTPUT_NAME = "faces", "probabilities"
METADATA_FILE = "fer.json"  # the TorchScript extra file holding the metadata


class ExportError(FERError):
    """An export that could not be made or did not match PyTorch."""


class ProbabilityModel(nn.Module):
    """Float32 NCHW faces in [0, 1] -> probabilities: normalise, the network, logits / T, softmax."""

    def __init__(self, net: nn.Module, mean: Tensor, std: Tensor, temperature: float = 1.0) -> None:
        super().__init__()
        self.net = net
        self.register_buffer("mean", mean.detach().clone().float().view(1, -1, 1, 1))
        self.register_buffer("std", std.detach().clone().float().view(1, -1, 1, 1))
        self.temperature = float(temperature)

    def forward(self, faces: Tensor) -> Tensor:
        logits = self.net((faces - self.mean) / self.std)
        return torch.softmax(logits / self.temperature, dim=1)


def probability_model(model: nn.Module, temperature: float = 1.0) -> ProbabilityModel:
    """A FERClassifier's network and normalisation as a standalone module (a copy, in eval mode, fp32)."""
    # A network compiled in place (model.compile) copies uncompiled: deepcopy leaves its compiled __call__ behind.
    net = copy.deepcopy(model.net).float().cpu().eval()
    net.to(memory_format=torch.contiguous_format)  # exporters record plain NCHW
    return ProbabilityModel(net, model.mean.cpu(), model.std.cpu(), temperature).eval()


def face_crop_text() -> str:
    """How fer crops a detected face for the model (fer.faces.crop_face at its default margin)."""
    from fer.faces import DEFAULT_MARGIN

    return (f"a square of side {1 + 2 * DEFAULT_MARGIN:g}x the longer side of the detected face box, about its centre "
            f"(pixels outside the photo repeat its edge), resized (bilinear) to the input size")


def metadata(model: nn.Module, image_size: int, channels: int, temperature: float,
             class_names: Sequence[str], checkpoint: str | None = None, fmt: str = "onnx") -> dict[str, str]:
    """What a user of the file needs to feed it: every value a string (ONNX metadata_props are strings)."""
    import fer

    hp = getattr(model, "hparams", {}) or {}
    mean = [round(float(v), 6) for v in model.mean.flatten()]
    std = [round(float(v), 6) for v in model.std.flatten()]
    layout = (f"[batch, {image_size}, {image_size}, {channels}] (NHWC)" if fmt == "tflite"
              else f"[batch, {channels}, {image_size}, {image_size}] (NCHW)")
    return {
        "fer.version": fer.__version__,
        "fer.input": f"{INPUT_NAME}: float32 {layout}, pixel values "
                     f"in [0, 1] ({'grayscale' if channels == 1 else 'RGB'}); any batch size",
        "fer.input_size": str(int(image_size)),
        "fer.channels": str(int(channels)),
        "fer.input_range": "[0, 1]",
        "fer.normalization": json.dumps({"mean": mean, "std": std, "applied": "inside the model"}),
        "fer.output": f"{OUTPUT_NAME}: float32 [batch, {len(class_names)}], softmax(logits / temperature), "
                      f"in the order of fer.class_names",
        "fer.class_names": json.dumps(list(class_names)),
        "fer.temperature": repr(float(temperature)),
        "fer.backbone": str((hp.get("backbone") or {}).get("name", "")),
        "fer.face_crop": face_crop_text(),
        "fer.checkpoint": Path(checkpoint).name if checkpoint else "",
    }


# -- inputs to verify on ------------------------------------------------------------------------------
def synthetic_faces(n: int, image_size: int, channels: int, seed: int = 0) -> np.ndarray:
    """float32 (n, channels, S, S) in [0, 1]: fer's synthetic faces, every class."""
    from fer.data.synthetic import draw_face

    faces = np.stack([draw_face(i % 7, seed * 100_003 + i, image_size) for i in range(n)]).astype(np.float32) / 255
    return np.repeat(faces[:, None], channels, axis=1)


def validation_faces(run_config: Any, n: int, image_size: int, channels: int) -> tuple[np.ndarray, str] | None:
    """(up to `n` faces of the checkpoint run's validation split, its description), or None when unreadable.

    A source without a validation split of its own gives faces of its test split (else its training split).
    """
    if run_config is None or "data" not in run_config or "source" not in run_config.data:
        return None
    try:
        from hydra.utils import instantiate

        from fer.data.cache import decode

        source = instantiate(run_config.data.source, _convert_="all")
        roles = source.roles()
        split = roles.val or roles.test or roles.train
        samples = source.samples(split)
        picked = samples[:: max(1, len(samples) // n)][:n]  # spread over the split (folders list class by class)
        faces = np.stack([decode(source.load(s), image_size, channels) for s in picked]).astype(np.float32) / 255
    except Exception as exc:  # noqa: BLE001 - data moved, deleted or unreadable: synthetic faces instead
        log.info("validation data of the run not readable (%s); verifying on synthetic faces", exc)
        return None
    role = "validation" if split == roles.val else "test" if split == roles.test else "training"
    return faces, f"{len(faces)} faces of the run's {role} split ({source.name}/{split})"


def verification_faces(run_config: Any, image_size: int, channels: int, n: int = 32) -> tuple[np.ndarray, str]:
    """Real faces to check an export on: the run's validation faces, else fer's synthetic faces."""
    found = validation_faces(run_config, n, image_size, channels)
    if found is not None and len(found[0]):
        return found
    return synthetic_faces(n, image_size, channels), f"{n} synthetic faces (the run's data is not readable)"


# -- the two formats ----------------------------------------------------------------------------------
def _export_onnx(module: ProbabilityModel, example: Tensor, path: Path, opset: int, dynamic_batch: bool = True) -> None:
    """`module` as ONNX at `example`'s shape, the batch dimension left free when `dynamic_batch`."""
    kwargs = dict(input_names=[INPUT_NAME], output_names=[OUTPUT_NAME], opset_version=opset)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript-based exporter's deprecation notices
        try:
            axes = {INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}} if dynamic_batch else None
            torch.onnx.export(module, (example,), str(path), dynamo=False, do_constant_folding=True,
                              dynamic_axes=axes, **kwargs)
        except TypeError:  # a torch without the TorchScript-based exporter
            try:
                import onnxscript  # noqa: F401
            except ImportError as exc:
                raise ExportError("this torch only has the torch.export-based ONNX exporter, which needs "
                                  "`pip install onnxscript`") from exc
            shapes = ({0: torch.export.Dim("batch", min=1)},) if dynamic_batch else None
            torch.onnx.export(module, (example,), str(path), dynamo=True, external_data=False,
                              dynamic_shapes=shapes, **kwargs)


def _export_tflite(module: ProbabilityModel, example: Tensor, path: Path, opset: int, meta: dict[str, str]) -> None:
    """Static-shape ONNX (batch 1; LiteRT resizes the batch at run time), constants folded by ONNX Runtime,
    then translated operator by operator (fer.tflite_export)."""
    import tempfile

    import onnx

    from fer.ort_session import basic_optimise
    from fer.tflite_export import onnx_to_tflite

    with tempfile.TemporaryDirectory(prefix="fer-tflite-") as tmp:
        static, folded = Path(tmp) / "static.onnx", Path(tmp) / "folded.onnx"
        _export_onnx(module, example[:1], static, opset, dynamic_batch=False)
        basic_optimise(static, folded)
        path.write_bytes(onnx_to_tflite(onnx.load(str(folded)), meta))


def _add_onnx_metadata(path: Path, meta: dict[str, str]) -> None:
    import onnx

    proto = onnx.load(str(path))
    del proto.metadata_props[:]
    for key, value in meta.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    proto.doc_string = "fer facial expression classifier: " + meta["fer.input"] + " -> " + meta["fer.output"]
    proto.producer_name = "fer-export"
    onnx.checker.check_model(proto)
    onnx.save(proto, str(path))


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The fer metadata of an exported file (.onnx, .tflite, or TorchScript with fer.json)."""
    path = Path(path)
    if path.suffix.lower() == ".tflite":
        from fer.tflite_export import read_tflite_metadata

        return read_tflite_metadata(path.read_bytes())
    if path.suffix.lower() == ".onnx":
        import onnx

        proto = onnx.load(str(path), load_external_data=False)
        return {p.key: p.value for p in proto.metadata_props}
    extra = {METADATA_FILE: ""}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        torch.jit.load(str(path), map_location="cpu", _extra_files=extra)
    return json.loads(extra[METADATA_FILE])


def nchw_to_nhwc(batch: np.ndarray) -> np.ndarray:
    """fer's NCHW face batch in TFLite's NHWC layout (one channel: a free reshape)."""
    if batch.shape[1] == 1:
        return np.ascontiguousarray(batch, dtype=np.float32).reshape(batch.shape[0], *batch.shape[2:], 1)
    return np.ascontiguousarray(batch.transpose(0, 2, 3, 1), dtype=np.float32)


def exported_runner(fmt: str, path: str | os.PathLike):
    """A callable float32 NCHW array -> probabilities array, running the exported file (the export check
    and Predictor's exported backends both run files through this)."""
    if fmt == "onnx":
        session = onnx_session(path)
        return lambda x: session.run([OUTPUT_NAME], {INPUT_NAME: x})[0]
    if fmt == "tflite":  # the bytes are read now: interpreters are made per thread later, the file may be gone
        from fer.litert import LiteRTModel

        model = LiteRTModel(Path(path).read_bytes())
        return lambda x: model(nchw_to_nhwc(x))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        loaded = torch.jit.load(str(path), map_location="cpu").eval()

    def run(x: np.ndarray) -> np.ndarray:
        # Unoptimised execution runs the same CPU kernels (TorchScript does not fuse on the CPU) without
        # the profiling executor's seconds of re-optimisation for every new batch size.
        with torch.inference_mode(), torch.jit.optimized_execution(False):
            return loaded(torch.from_numpy(x)).numpy()

    return run


def pytorch_probabilities(model: nn.Module, faces: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """The reference: the FERClassifier itself (eval mode), softmax(logits / T)."""
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            logits = model(torch.from_numpy(faces).to(model.mean.device)).float().cpu()
        return torch.softmax(logits / temperature, dim=1).numpy()
    finally:
        model.train(was_training)


def verify(fmt: str, path: Path, reference: np.ndarray, faces: np.ndarray, tolerance: float) -> float:
    """Largest |p_exported - p_pytorch| over `faces`, run at full batch and at batch 1; ExportError above tolerance."""
    run = exported_runner(fmt, path)
    full = run(faces)
    singles = np.concatenate([run(faces[i:i + 1]) for i in range(min(4, len(faces)))])
    if full.shape != reference.shape:
        raise ExportError(f"{path}: the exported model returned shape {full.shape}, PyTorch {reference.shape}")
    diff = max(float(np.abs(full - reference).max()), float(np.abs(singles - reference[: len(singles)]).max()))
    if not np.isfinite(diff) or diff > tolerance:
        raise ExportError(
            f"{path.name}: the {fmt} export differs from PyTorch by {diff:.3g} in probability "
            f"(tolerance {tolerance:g}); file not written"
        )
    return diff


def export_model(
    model: nn.Module,
    output: str | os.PathLike,
    fmt: str,
    image_size: int,
    channels: int,
    class_names: Sequence[str],
    temperature: float = 1.0,
    faces: np.ndarray | None = None,
    tolerance: float = TOLERANCE,
    opset: int = OPSET,
    checkpoint: str | None = None,
) -> dict[str, Any]:
    """Export a FERClassifier (its weights as they are) and verify it; returns what was written and checked.

    The file appears at `output` only once it has matched PyTorch on `faces` (synthetic faces if None).
    """
    if fmt not in FORMATS:
        raise ExportError(f"format={fmt!r}: expected one of {', '.join(FORMATS)}")
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    module = probability_model(model, temperature)
    meta = metadata(model, image_size, channels, temperature, class_names, checkpoint, fmt)
    described = "given faces"
    if faces is None:
        faces, described = synthetic_faces(32, image_size, channels), "32 synthetic faces"
    faces = np.ascontiguousarray(faces, dtype=np.float32)
    if faces.shape[1:] != (channels, image_size, image_size):
        raise ExportError(f"verification faces have shape {faces.shape[1:]}, the model takes "
                          f"{(channels, image_size, image_size)}")
    example = torch.from_numpy(faces[:2])
    tmp = output.with_name(f".{output.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        if fmt == "onnx":
            _export_onnx(module, example, tmp, opset)
            _add_onnx_metadata(tmp, meta)
        elif fmt == "tflite":
            _export_tflite(module, example, tmp, opset, meta)
        else:
            with warnings.catch_warnings(), torch.no_grad():
                warnings.simplefilter("ignore", FutureWarning)  # torch's notices that TorchScript is deprecated
                traced = torch.jit.trace(module, example, check_trace=False)
                traced = torch.jit.freeze(traced.eval())  # weights become constants: folding, no Python attributes
                torch.jit.save(traced, str(tmp), _extra_files={METADATA_FILE: json.dumps(meta, indent=1)})
        diff = verify(fmt, tmp, pytorch_probabilities(model, faces, temperature), faces, tolerance)
        os.replace(tmp, output)
    except ExportError:
        raise
    except Exception as exc:  # noqa: BLE001 - exporter failures: one line naming the format
        text = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ExportError(f"{fmt} export of {checkpoint or 'the model'} failed: {text[:300]}") from exc
    finally:
        tmp.unlink(missing_ok=True)
    return {"output": str(output), "format": fmt, "max_abs_diff": diff, "verified_on": described,
            "bytes": output.stat().st_size, "metadata": meta}


def export_checkpoint(checkpoint: str | os.PathLike, output: str | os.PathLike, fmt: str,
                      image_size: int | None = None, calibrated: bool = True,
                      tolerance: float = TOLERANCE, opset: int = OPSET) -> dict[str, Any]:
    """Export the model of a checkpoint file or run directory, verified on its run's validation faces."""
    from fer.checkpoint import load_checkpoint

    loaded = load_checkpoint(checkpoint, map_location="cpu")
    size = image_size or loaded.image_size
    if not size:
        raise ExportError(f"{loaded.path}: the training image size is not recorded; pass --image-size")
    temperature = loaded.temperature if calibrated else 1.0
    faces, described = verification_faces(loaded.run_config, size, loaded.channels)
    result = export_model(loaded.model, output, fmt, size, loaded.channels, loaded.model.class_names,
                          temperature=temperature, faces=faces, tolerance=tolerance, opset=opset,
                          checkpoint=str(loaded.path))
    result["verified_on"] = described
    result["checkpoint"] = str(loaded.path)
    return result


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="fer-export", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", "-c", required=True, help="a .ckpt file or a training run directory (its best)")
    p.add_argument("--format", "-f", choices=FORMATS, default=None,
                   help="onnx, torchscript or tflite (default: from the output's extension, .onnx, .pt or .tflite)")
    p.add_argument("--output", "-o", required=True, type=Path, help="the file to write")
    p.add_argument("--image-size", type=int, default=None, help="input size (default: the trained size)")
    p.add_argument("--no-calibration", action="store_true", help="ignore a stored calibration temperature")
    p.add_argument("--tolerance", type=float, default=TOLERANCE,
                   help=f"largest allowed probability difference from PyTorch (default {TOLERANCE:g})")
    p.add_argument("--opset", type=int, default=OPSET, help=f"ONNX opset (default {OPSET})")
    args = p.parse_args(argv)
    if args.format is None:
        suffix = args.output.suffix.lower()
        if suffix == ".onnx":
            args.format = "onnx"
        elif suffix in (".pt", ".pth", ".ts", ".torchscript"):
            args.format = "torchscript"
        elif suffix == ".tflite":
            args.format = "tflite"
        else:
            p.error(f"--format is needed: cannot tell it from {args.output.name!r} (use .onnx, .pt or .tflite)")
    return args


def main(argv: list[str] | None = None) -> int:
    from fer.utils import err_console, one_line_errors

    args = parse_args(argv)

    @one_line_errors
    def run() -> dict[str, Any]:
        return export_checkpoint(args.checkpoint, args.output, args.format, image_size=args.image_size,
                                 calibrated=not args.no_calibration, tolerance=args.tolerance, opset=args.opset)

    from rich.markup import escape

    result = run()
    meta = result["metadata"]
    err_console.print(
        f"[green]wrote[/] {escape(result['output'])} ({result['format']}, {result['bytes'] / 1e6:.1f} MB): "
        + escape(f"{meta['fer.input']}; temperature {meta['fer.temperature']}; matches PyTorch within "
                 f"{result['max_abs_diff']:.1e} on {result['verified_on']}"),
        highlight=False, soft_wrap=True,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
