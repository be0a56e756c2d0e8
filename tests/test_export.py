"""fer-export: ONNX, TorchScript and TFLite round trips against PyTorch, metadata, failures; the exported
Predictor backends (ONNX Runtime, LiteRT)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from fer.checkpoint import CALIBRATION_KEY, best_checkpoint, load_checkpoint  # noqa: E402
from fer.export import (  # noqa: E402
    ExportError,
    export_checkpoint,
    export_model,
    main,
    onnx_session,
    pytorch_probabilities,
    read_metadata,
    verification_faces,
)
from fer.labels import CLASSES  # noqa: E402
from fer.litert import litert_available  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")  # torch: "torch.jit.* is deprecated"


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Exports are small: one intra-op thread keeps them fast when other tests share the cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def loaded(trained_run):
    return load_checkpoint(trained_run)


@pytest.fixture(scope="module")
def faces(loaded):
    """Real inputs: faces of the run's validation split, as the export verifies on."""
    x, described = verification_faces(loaded.run_config, loaded.image_size, loaded.channels)
    assert "validation" in described and x.shape == (32, 1, 48, 48)
    return x


def _run_exported(path, fmt, x):
    if fmt == "onnx":
        return onnx_session(path).run(["probabilities"], {"faces": x})[0]
    if fmt == "tflite":  # NHWC, as TFLite files take
        from fer.litert import LiteRTModel

        return LiteRTModel(path)(np.ascontiguousarray(x.transpose(0, 2, 3, 1)))
    module = torch.jit.load(str(path))
    with torch.no_grad(), torch.jit.optimized_execution(False):  # skips seconds of re-optimisation per shape
        return module(torch.from_numpy(x)).numpy()


needs_litert = pytest.mark.skipif(not litert_available(), reason="ai-edge-litert not installed")


@pytest.mark.parametrize("fmt,name", [("onnx", "fer.onnx"), ("torchscript", "fer.pt"),
                                      pytest.param("tflite", "fer.tflite", marks=needs_litert)])
def test_round_trip_matches_pytorch_with_metadata(tmp_path, trained_run, loaded, faces, fmt, name):
    out = tmp_path / name
    assert main(["--checkpoint", str(trained_run), "--output", str(out)]) == 0  # the format from the suffix
    reference = pytorch_probabilities(loaded.model, faces)
    for batch in (faces, faces[:1], faces[:7]):  # the batch axis is dynamic
        got = _run_exported(out, fmt, batch)
        assert got.shape == (len(batch), len(CLASSES))
        assert np.abs(got - reference[: len(batch)]).max() <= 1e-4
        assert np.allclose(got.sum(1), 1.0, atol=1e-5)  # probabilities: softmax inside
    meta = read_metadata(out)
    assert json.loads(meta["fer.class_names"]) == list(CLASSES)
    assert meta["fer.input_size"] == "48" and meta["fer.channels"] == "1" and meta["fer.input_range"] == "[0, 1]"
    norm = json.loads(meta["fer.normalization"])
    assert norm["mean"] == pytest.approx([0.5]) and norm["std"] == pytest.approx([0.5])
    assert float(meta["fer.temperature"]) == 1.0 and meta["fer.version"]
    assert ("[batch, 48, 48, 1] (NHWC)" if fmt == "tflite" else "[batch, 1, 48, 48] (NCHW)") in meta["fer.input"]
    assert not list(tmp_path.glob(".*.tmp"))  # no temporary file left


def test_calibration_temperature_is_applied_inside(tmp_path, copy_run, faces):
    from fer.checkpoint import write_calibration

    run = copy_run()
    write_calibration(best_checkpoint(run), {"temperature": 2.5})
    loaded = load_checkpoint(run)
    assert loaded.temperature == 2.5 and CALIBRATION_KEY
    result = export_checkpoint(run, tmp_path / "t.onnx", "onnx")
    assert float(result["metadata"]["fer.temperature"]) == 2.5
    got = _run_exported(tmp_path / "t.onnx", "onnx", faces)
    assert np.abs(got - pytorch_probabilities(loaded.model, faces, 2.5)).max() <= 1e-4
    assert np.abs(got - pytorch_probabilities(loaded.model, faces, 1.0)).max() > 1e-3  # really tempered


def test_mismatch_fails_loudly_and_writes_nothing(tmp_path, loaded, faces, monkeypatch):
    import fer.export as export

    real = export.pytorch_probabilities
    monkeypatch.setattr(export, "pytorch_probabilities", lambda *a, **k: real(*a, **k) + 1e-3)
    out = tmp_path / "bad.onnx"
    with pytest.raises(ExportError, match="differs from PyTorch"):
        export_model(loaded.model, out, "onnx", 48, 1, CLASSES, faces=faces)
    assert not out.exists() and not list(tmp_path.iterdir())


def test_cli_errors_are_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        main(["--checkpoint", str(tmp_path / "missing.ckpt"), "--output", str(tmp_path / "x.onnx")])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "missing.ckpt" in err and "Traceback" not in err
    with pytest.raises(SystemExit):  # no format and no telling extension
        main(["--checkpoint", "x.ckpt", "--output", str(tmp_path / "model.bin")])


def test_onnx_predictor_agrees_with_pytorch_on_a_photo(tmp_path, trained_run, astronaut_jpeg):
    from fer.inference import Predictor

    torch_predictor = Predictor.from_checkpoint(trained_run, backend="torch")
    torch_result = torch_predictor.predict(astronaut_jpeg)
    onnx_predictor = Predictor.from_checkpoint(trained_run, device="cpu", backend="onnx")
    assert (torch_predictor.backend, onnx_predictor.backend) == ("torch", "onnx")
    onnx_result = onnx_predictor.predict(astronaut_jpeg)
    assert len(torch_result.faces) == len(onnx_result.faces) == 1
    a, b = torch_result.faces[0], onnx_result.faces[0]
    assert a.box == b.box and a.label == b.label
    assert max(abs(a.probabilities[c] - b.probabilities[c]) for c in CLASSES) <= 1e-4

    # A file written by fer-export is used as is; one of another model (here: another temperature) is refused.
    path = tmp_path / "fer.onnx"
    export_checkpoint(trained_run, path, "onnx")
    from_file = Predictor(None, CLASSES, 48, 1, backend="onnx", onnx_model=path)  # no PyTorch model needed
    assert from_file.predict(astronaut_jpeg).faces[0].probabilities == pytest.approx(b.probabilities, abs=1e-6)
    from fer.errors import CheckpointError

    with pytest.raises(CheckpointError, match="temperature"):
        Predictor(None, CLASSES, 48, 1, backend="onnx", onnx_model=path, temperature=2.0)
    with pytest.raises(CheckpointError, match="input_size"):
        Predictor(None, CLASSES, 64, 1, backend="onnx", onnx_model=path)


@needs_litert
def test_litert_predictor_agrees_with_pytorch_and_is_the_cpu_default(tmp_path, trained_run, astronaut_jpeg):
    from fer.errors import CheckpointError
    from fer.inference import Predictor

    reference = Predictor.from_checkpoint(trained_run, backend="torch").predict(astronaut_jpeg).faces[0]
    auto = Predictor.from_checkpoint(trained_run, device="cpu")  # auto on a CPU: LiteRT where installed
    assert auto.backend == "litert"
    face = auto.predict(astronaut_jpeg).faces[0]
    assert face.box == reference.box and face.label == reference.label
    assert max(abs(face.probabilities[c] - reference.probabilities[c]) for c in CLASSES) <= 1e-4
    path = tmp_path / "fer.tflite"
    export_checkpoint(trained_run, path, "tflite")
    from_file = Predictor(None, CLASSES, 48, 1, exported_model=path)  # the suffix picks LiteRT
    assert from_file.backend == "litert"
    assert from_file.predict(astronaut_jpeg).faces[0].probabilities == pytest.approx(face.probabilities, abs=1e-5)
    with pytest.raises(CheckpointError, match="temperature"):
        Predictor(None, CLASSES, 48, 1, exported_model=path, temperature=2.0)
    with pytest.raises(CheckpointError, match="runs .onnx files"):
        Predictor(None, CLASSES, 48, 1, backend="onnx", exported_model=path)


@needs_litert
def test_auto_backend_takes_onnx_runtime_when_the_tflite_export_fails(trained_run, monkeypatch, caplog):
    import fer.tflite_export
    from fer.inference import Predictor

    def unsupported(*args, **kwargs):
        raise fer.tflite_export.TFLiteExportError("ONNX operator Resize (up) has no TFLite translation here")

    monkeypatch.setattr(fer.tflite_export, "onnx_to_tflite", unsupported)
    predictor = Predictor.from_checkpoint(trained_run, device="cpu")
    assert predictor.backend == "onnx" and "LiteRT unavailable" in caplog.text and "Resize" in caplog.text


def test_auto_backend_falls_back_to_pytorch_when_export_fails(trained_run, monkeypatch, caplog):
    import fer.export
    from fer.inference import Predictor

    def broken(*args, **kwargs):
        raise RuntimeError("exporter exploded\nsecond line")

    monkeypatch.setattr(fer.export, "export_model", broken)
    predictor = Predictor.from_checkpoint(trained_run, device="cpu")
    assert predictor.backend == "torch" and "exporter exploded" in caplog.text and "second line" not in caplog.text
    with pytest.raises(RuntimeError, match="exporter exploded"):  # asked for explicitly: no silent fallback
        Predictor.from_checkpoint(trained_run, device="cpu", backend="onnx")


def test_fer_predict_backend_onnx(trained_run, astronaut_jpeg, tmp_path):
    from fer.predict import main as predict_main

    out = tmp_path / "onnx.json"
    argv = [str(astronaut_jpeg), "-c", str(trained_run), "--backend", "onnx", "--json", str(out), "-q"]
    assert predict_main(argv) == 0
    faces = json.loads(out.read_text())["images"][0]["faces"]
    assert len(faces) == 1 and set(faces[0]["probabilities"]) == set(CLASSES)
