"""ONNX -> TFLite for fer's classifiers: an exact, small converter for the operators timm's EfficientNets
export to (convolutions with batch norm folded in, ReLU6/SiLU, squeeze-excitation, pooling, the head).

Why a converter of our own: the usual paths (onnx2tf, ai-edge-torch) need TensorFlow or torch_xla, GBs
for one file format, while this graph family needs a dozen operators. LiteRT's XNNPACK runs the result
faster than ONNX Runtime at batch 1 on a CPU, and the same file runs on phones.

The input is the static-shape ONNX model after ONNX Runtime's basic optimisations (constants folded, so
TF-style SAME padding is plain numbers in each Conv). Activations are NCHW there and NHWC here: weights
are transposed once, and axes and broadcast constants mapped. Any operator outside the set is an
ExportError naming it (never a silently different model); `fer.export` then compares the file with
PyTorch on real faces, as for every format.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from fer.errors import FERError

NHWC_AXIS = {0: 0, 1: 3, 2: 1, 3: 2}  # an NCHW axis -> the same axis in NHWC


class TFLiteExportError(FERError):
    """An ONNX graph this converter cannot translate exactly."""


def _schema():
    try:
        from ai_edge_litert import schema_py_generated as tfl
    except ImportError as exc:
        raise TFLiteExportError("TFLite export needs the ai-edge-litert package (pip install ai-edge-litert)") from exc
    return tfl


def same_pads(size: int, kernel: int, stride: int, dilation: int = 1) -> tuple[int, int]:
    """TensorFlow's SAME padding (before, after) along one axis: the extra pixel, if any, goes after."""
    effective = (kernel - 1) * dilation + 1
    out = -(-size // stride)
    total = max((out - 1) * stride + effective - size, 0)
    return total // 2, total - total // 2


class _Writer:
    """Tensors, buffers and operators of one subgraph, packed into a TFLite flatbuffer at the end."""

    def __init__(self) -> None:
        self.tfl = _schema()
        self.tensors: list[Any] = []
        self.buffers = [self.tfl.BufferT()]  # buffer 0 is the empty sentinel
        self.operators: list[Any] = []
        self.opcodes: dict[int, int] = {}

    def tensor(self, name: str, shape, data: np.ndarray | None = None, batch_free: bool = False) -> int:
        t = self.tfl.TensorT()
        t.name, t.shape = name, [int(v) for v in shape]
        if batch_free:  # activations: any batch size (LiteRT resizes the input, the rest follows)
            t.shapeSignature = [-1, *t.shape[1:]]
        t.type = self.tfl.TensorType.INT32 if data is not None and data.dtype == np.int32 else self.tfl.TensorType.FLOAT32
        if data is not None:
            buffer = self.tfl.BufferT()
            buffer.data = np.frombuffer(np.ascontiguousarray(data).tobytes(), dtype=np.uint8)
            self.buffers.append(buffer)
            t.buffer = len(self.buffers) - 1
        self.tensors.append(t)
        return len(self.tensors) - 1

    def constant(self, name: str, data: np.ndarray) -> int:
        data = np.asarray(data)
        data = data.astype(np.int32 if data.dtype.kind in "iu" else np.float32)
        return self.tensor(name, data.shape, data)

    def op(self, code: int, inputs: list[int], outputs: list[int], options_type: int = 0, options=None) -> None:
        self.opcodes.setdefault(code, len(self.opcodes))
        o = self.tfl.OperatorT()
        o.opcodeIndex, o.inputs, o.outputs = self.opcodes[code], inputs, outputs
        o.builtinOptionsType, o.builtinOptions = options_type, options
        self.operators.append(o)

    def finish(self, inputs: list[int], outputs: list[int], metadata: dict[str, str]) -> bytes:
        import flatbuffers

        tfl = self.tfl
        graph = tfl.SubGraphT()
        graph.tensors, graph.inputs, graph.outputs, graph.operators = self.tensors, inputs, outputs, self.operators
        graph.name = "main"
        codes = sorted(self.opcodes, key=self.opcodes.get)
        model = tfl.ModelT()
        model.version, model.subgraphs, model.description = 3, [graph], "fer-export"
        model.operatorCodes = []
        for code in codes:
            opcode = tfl.OperatorCodeT()
            opcode.builtinCode, opcode.deprecatedBuiltinCode, opcode.version = code, min(code, 127), 1
            model.operatorCodes.append(opcode)
        signature = tfl.SignatureDefT()
        signature.signatureKey, signature.subgraphIndex = "serving_default", 0
        signature.inputs, signature.outputs = [], []
        for names, indices in ((signature.inputs, inputs), (signature.outputs, outputs)):
            for index in indices:
                entry = tfl.TensorMapT()
                entry.name, entry.tensorIndex = self.tensors[index].name, index
                names.append(entry)
        model.signatureDefs = [signature]
        meta_buffer = tfl.BufferT()
        meta_buffer.data = np.frombuffer(json.dumps(metadata).encode(), dtype=np.uint8)
        self.buffers.append(meta_buffer)
        entry = tfl.MetadataT()
        entry.name, entry.buffer = METADATA_NAME, len(self.buffers) - 1
        model.metadata, model.buffers = [entry], self.buffers
        builder = flatbuffers.Builder(1 << 20)
        builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
        return bytes(builder.Output())


METADATA_NAME = "fer.json"


def _attrs(node) -> dict[str, Any]:
    from onnx import helper

    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


class _Converter:
    """Walks a topologically sorted ONNX graph once, one method per operator family, writing NHWC TFLite."""

    def __init__(self, model) -> None:
        from onnx import numpy_helper

        self.w = _Writer()
        self.tfl = self.w.tfl
        graph = self.graph = model.graph
        self.consts = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
        for node in graph.node:
            if node.op_type == "Constant":
                self.consts[node.output[0]] = numpy_helper.to_array(_attrs(node)["value"])
        self.consumers: dict[str, list] = {}
        for node in graph.node:
            for name in node.input:
                self.consumers.setdefault(name, []).append(node)
        self.outputs = {o.name for o in graph.output}
        self.ids: dict[str, int] = {}  # ONNX value name -> TFLite tensor index
        self.shapes: dict[str, list[int]] = {}  # ... -> its NHWC (or 2-D) shape at batch 1
        self.folded: set[int] = set()  # id() of nodes already written as part of the one before them

    def convert(self, metadata: dict[str, str]) -> bytes:
        (source,) = [i for i in self.graph.input if i.name not in self.consts]
        dims = [d.dim_value for d in source.type.tensor_type.shape.dim]
        if len(dims) != 4 or not all(dims[1:]):
            raise TFLiteExportError(f"input {source.name}: expected a static NCHW shape, got {dims}")
        _, c, h, w = dims
        self.emit(source.name, [1, h, w, c])
        handlers = {"Conv": self.conv, "Relu": self.activation, "Clip": self.activation, "Add": self.elementwise,
                    "Sub": self.elementwise, "Mul": self.elementwise, "Div": self.elementwise,
                    "Sigmoid": self.sigmoid, "GlobalAveragePool": self.mean, "ReduceMean": self.mean,
                    "Gemm": self.gemm, "Softmax": self.softmax, "Identity": self.identity}
        for node in self.graph.node:
            if id(node) in self.folded or node.op_type == "Constant":
                continue
            handler = handlers.get(node.op_type)
            if handler is None:
                raise TFLiteExportError(
                    f"ONNX operator {node.op_type} ({node.name or 'unnamed'}) has no TFLite translation here")
            handler(node, _attrs(node))
        return self.w.finish([self.ids[source.name]], [self.ids[o.name] for o in self.graph.output], metadata)

    # -- helpers ------------------------------------------------------------------------------------
    def emit(self, name: str, shape: list[int]) -> int:
        """A new activation tensor for the ONNX value `name`."""
        self.shapes[name] = shape
        self.ids[name] = self.w.tensor(name, shape, batch_free=True)
        return self.ids[name]

    def only_consumer(self, name: str):
        """The node that alone reads `name` (not a graph output), else None: a candidate for fusing."""
        readers = self.consumers.get(name, [])
        return readers[0] if len(readers) == 1 and name not in self.outputs else None

    def broadcast_constant(self, name: str, rank: int) -> int:
        """A constant operand of an elementwise op, laid out to broadcast against an NHWC activation."""
        value = np.asarray(self.consts[name], dtype=np.float32)
        if value.ndim == 4:
            value = value.transpose(0, 2, 3, 1)
        elif value.ndim == 3 and rank == 4:
            value = value.transpose(1, 2, 0)
        elif value.ndim > 1 or (value.ndim == 1 and value.size != 1 and rank == 4):
            raise TFLiteExportError(f"constant {name} of shape {value.shape}: no NHWC broadcast known")
        return self.w.constant(name, value)

    # -- operators ----------------------------------------------------------------------------------
    def identity(self, node, a) -> None:
        self.ids[node.output[0]], self.shapes[node.output[0]] = self.ids[node.input[0]], self.shapes[node.input[0]]

    def conv(self, node, a) -> None:
        tfl, w, B, O = self.tfl, self.w, self.tfl.BuiltinOperator, self.tfl.BuiltinOptions
        x, out = node.input[0], node.output[0]
        if a.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
            raise TFLiteExportError(f"Conv {node.name}: auto_pad={a['auto_pad']!r} is not supported")
        weight = self.consts[node.input[1]]
        bias = self.consts[node.input[2]] if len(node.input) > 2 and node.input[2] else np.zeros(weight.shape[0])
        sh, sw = a.get("strides", [1, 1])
        dh, dw = a.get("dilations", [1, 1])
        pt, pl, pb, pr = a.get("pads", [0, 0, 0, 0])
        group = a.get("group", 1)
        _, H, W, C = self.shapes[x]
        kh, kw = weight.shape[2:]
        fused = tfl.ActivationFunctionType.NONE
        follower = self.only_consumer(out)
        if follower is not None and _activation(follower, self.consts) is not None:
            fused, out = _activation(follower, self.consts), follower.output[0]
            self.folded.add(id(follower))
        if (pt, pb) == same_pads(H, kh, sh, dh) and (pl, pr) == same_pads(W, kw, sw, dw):
            padding, x_id = tfl.Padding.SAME, self.ids[x]  # TF-style padding (timm's tf_ models): built in
        elif not any((pt, pl, pb, pr)):
            padding, x_id = tfl.Padding.VALID, self.ids[x]
        else:  # any other padding: an explicit PAD, then VALID
            padding = tfl.Padding.VALID
            x_id = w.tensor(f"{x}/pad", [1, H + pt + pb, W + pl + pr, C], batch_free=True)
            w.op(B.PAD, [self.ids[x], w.constant(f"{x}/pads", np.array([[0, 0], [pt, pb], [pl, pr], [0, 0]]))],
                 [x_id], O.PadOptions, tfl.PadOptionsT())
        H, W = H + pt + pb, W + pl + pr  # SAME pads by these same amounts
        out_h, out_w = (H - (kh - 1) * dh - 1) // sh + 1, (W - (kw - 1) * dw - 1) // sw + 1
        filters = weight.shape[0]
        if group == 1:
            kernel = w.constant(f"{node.input[1]}/ohwi", weight.transpose(0, 2, 3, 1))
            options, code, options_type = tfl.Conv2DOptionsT(), B.CONV_2D, O.Conv2DOptions
        elif group == C and weight.shape[1] == 1:
            kernel = w.constant(f"{node.input[1]}/1hwo", weight.transpose(1, 2, 3, 0))
            options, code, options_type = tfl.DepthwiseConv2DOptionsT(), B.DEPTHWISE_CONV_2D, O.DepthwiseConv2DOptions
            options.depthMultiplier = filters // C
        else:
            raise TFLiteExportError(f"Conv {node.name}: grouped convolution (group={group}) is not supported")
        options.padding, options.strideH, options.strideW = padding, sh, sw
        options.dilationHFactor, options.dilationWFactor = dh, dw
        options.fusedActivationFunction = fused
        w.op(code, [x_id, kernel, w.constant(f"{node.input[1]}/bias", bias)],
             [self.emit(out, [1, out_h, out_w, filters])], options_type, options)

    def activation(self, node, a) -> None:
        kind = _activation(node, self.consts)
        if kind is None:
            raise TFLiteExportError(f"{node.op_type} {node.name}: only ReLU and ReLU6 (Clip 0..6) are supported")
        code = self.tfl.BuiltinOperator.RELU6 if kind == self.tfl.ActivationFunctionType.RELU6 else \
            self.tfl.BuiltinOperator.RELU
        self.w.op(code, [self.ids[node.input[0]]], [self.emit(node.output[0], self.shapes[node.input[0]])])

    def elementwise(self, node, a) -> None:
        tfl, op = self.tfl, node.op_type
        left, right = node.input[:2]
        live = [v for v in (left, right) if v not in self.consts]
        if not live:
            raise TFLiteExportError(f"{op} {node.name}: both operands constant (the graph was not folded)")
        rank = len(self.shapes[live[0]])
        operands = [self.ids[v] if v not in self.consts else self.broadcast_constant(v, rank) for v in (left, right)]
        shape = list(np.broadcast_shapes(*(tuple(self.shapes[v]) for v in live)))
        code = getattr(tfl.BuiltinOperator, op.upper())
        options = getattr(tfl, f"{op}OptionsT")()
        self.w.op(code, operands, [self.emit(node.output[0], shape)], getattr(tfl.BuiltinOptions, f"{op}Options"),
                  options)

    def sigmoid(self, node, a) -> None:
        self.w.op(self.tfl.BuiltinOperator.LOGISTIC, [self.ids[node.input[0]]],
                  [self.emit(node.output[0], self.shapes[node.input[0]])])

    def mean(self, node, a) -> None:
        tfl, x, out = self.tfl, node.input[0], node.output[0]
        axes = [2, 3] if node.op_type == "GlobalAveragePool" else list(
            a.get("axes") or self.consts.get(node.input[1] if len(node.input) > 1 else "", []))
        if len(self.shapes[x]) != 4 or sorted(v % 4 for v in axes) != [2, 3]:
            raise TFLiteExportError(f"{node.op_type} {node.name}: only the mean over height and width is supported")
        keep = bool(a.get("keepdims", 1))
        follower = self.only_consumer(out)
        if keep and follower is not None and follower.op_type == "Flatten":
            keep, out = False, follower.output[0]  # mean, then flatten: one MEAN without the kept dims
            self.folded.add(id(follower))
        options = tfl.ReducerOptionsT()
        options.keepDims = keep
        channels = self.shapes[x][3]
        self.w.op(tfl.BuiltinOperator.MEAN, [self.ids[x], self.w.constant(f"{out}/axes", np.array([1, 2]))],
                  [self.emit(out, [1, 1, 1, channels] if keep else [1, channels])], tfl.BuiltinOptions.ReducerOptions,
                  options)

    def gemm(self, node, a) -> None:
        tfl, x = self.tfl, node.input[0]
        if a.get("transA", 0) or len(self.shapes[x]) != 2:
            raise TFLiteExportError(f"Gemm {node.name}: only x @ W (+ b) on a flat input is supported")
        weight = self.consts[node.input[1]]
        weight = (weight if a.get("transB", 0) else weight.T) * a.get("alpha", 1.0)  # FULLY_CONNECTED: (out, in)
        bias = self.consts[node.input[2]] * a.get("beta", 1.0) if len(node.input) > 2 else np.zeros(weight.shape[0])
        self.w.op(tfl.BuiltinOperator.FULLY_CONNECTED,
                  [self.ids[x], self.w.constant(f"{node.input[1]}/fc", weight),
                   self.w.constant(f"{node.name}/bias", np.broadcast_to(bias, weight.shape[:1]))],
                  [self.emit(node.output[0], [1, weight.shape[0]])], tfl.BuiltinOptions.FullyConnectedOptions,
                  tfl.FullyConnectedOptionsT())

    def softmax(self, node, a) -> None:
        tfl, x = self.tfl, node.input[0]
        rank = len(self.shapes[x])
        if a.get("axis", -1) % rank != rank - 1:
            raise TFLiteExportError(f"Softmax {node.name}: only over the last axis is supported")
        options = tfl.SoftmaxOptionsT()
        options.beta = 1.0
        self.w.op(tfl.BuiltinOperator.SOFTMAX, [self.ids[x]], [self.emit(node.output[0], self.shapes[x])],
                  tfl.BuiltinOptions.SoftmaxOptions, options)


def onnx_to_tflite(model, metadata: dict[str, str] | None = None) -> bytes:
    """A static-shape, constant-folded ONNX model (one NCHW float input) as TFLite flatbuffer bytes (NHWC)."""
    return _Converter(model).convert(metadata or {})


def _activation(node, consts) -> int | None:
    """The fused-activation code for a Relu or a Clip(0, 6) node, else None."""
    tfl = _schema()
    if node.op_type == "Relu":
        return tfl.ActivationFunctionType.RELU
    if node.op_type == "Clip":
        a = _attrs(node)
        low = a.get("min", consts.get(node.input[1]) if len(node.input) > 1 and node.input[1] else None)
        high = a.get("max", consts.get(node.input[2]) if len(node.input) > 2 and node.input[2] else None)
        if low is not None and float(low) == 0.0:
            if high is None:
                return tfl.ActivationFunctionType.RELU
            if float(high) == 6.0:
                return tfl.ActivationFunctionType.RELU6
    return None


def read_tflite_metadata(content: bytes) -> dict[str, str]:
    """The fer metadata stored in a .tflite file by fer-export ({} for other files)."""
    tfl = _schema()
    model = tfl.Model.GetRootAs(content, 0)
    for i in range(model.MetadataLength()):
        entry = model.Metadata(i)
        if entry.Name() and entry.Name().decode() == METADATA_NAME:
            data = model.Buffers(entry.Buffer()).DataAsNumpy()
            return json.loads(bytes(data).decode())
    return {}
