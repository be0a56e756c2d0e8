"""The bundled BlazeFace detector: finds real faces where they are, ignores non-faces, maps boxes back."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from PIL import Image

from fer.detectors.blazeface import (
    BlazeFace,
    LiteRTEngine,
    default_model_path,
    default_tflite_path,
    open_engine,
    weighted_nms,
)
from fer.errors import ConfigError, DataError
from fer.faces import FaceDetector, load_image

data = pytest.importorskip("skimage.data")


def _iou(a, b) -> float:
    ax0, ay0, aw, ah = a
    bx0, by0, bw, bh = b
    w = max(0, min(ax0 + aw, bx0 + bw) - max(ax0, bx0))
    h = max(0, min(ay0 + ah, by0 + bh) - max(ay0, by0))
    return w * h / (aw * ah + bw * bh - w * h)


def test_model_file_records_its_provenance():
    model = onnx.load(str(default_model_path()))  # made by `make venv` (tflite_to_onnx --fetch)
    meta = {p.key: p.value for p in model.metadata_props}
    assert "face_detection_full_range.tflite" in meta["source"] and meta["licence"].startswith("Apache-2.0")
    assert [i.name for i in model.graph.input] == ["image"]


def test_model_file_has_its_same_padding_inside_the_convolutions():
    ops = [n.op_type for n in onnx.load(str(default_model_path())).graph.node]
    # What Pads remain widen channels for BlazeFace's residual additions; none feeds a convolution.
    assert ops.count("Conv") == 89 and ops.count("Pad") == 8


def test_pads_fold_into_convolutions_with_identical_outputs(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    torch = pytest.importorskip("torch")
    import torch.nn.functional as F

    from fer.detectors.tflite_to_onnx import fold_pads_into_convs
    from fer.ort_session import basic_optimise

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 3, 3, stride=2, groups=3)
            self.wide = torch.nn.Conv2d(3, 5, 1)

        def forward(self, x):
            y = self.conv(F.pad(x, (0, 1, 0, 1)))  # TensorFlow's asymmetric SAME padding: foldable
            return self.wide(y) + F.pad(y, (0, 0, 0, 0, 0, 2))  # a channel pad: must stay

    path = tmp_path / "block.onnx"
    torch.onnx.export(Block().eval(), (torch.zeros(1, 3, 16, 16),), str(path), dynamo=False,
                      input_names=["x"], opset_version=17)
    basic_optimise(path, tmp_path / "basic.onnx")  # as convert() does: the pad amounts become constants
    model = onnx.load(str(tmp_path / "basic.onnx"))
    x = np.random.default_rng(0).normal(size=(1, 3, 16, 16)).astype(np.float32)
    before = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    folded = fold_pads_into_convs(model)
    after = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    assert folded == 1 and [n.op_type for n in model.graph.node].count("Pad") == 1
    np.testing.assert_allclose(after[0], before[0], atol=1e-6)


def test_missing_model_is_one_line_naming_it_and_the_fix(tmp_path):
    missing = tmp_path / "none.onnx"
    with pytest.raises(DataError) as error:  # no .tflite either: auto falls back to the ONNX file, also missing
        BlazeFace(model_path=missing, tflite_path=tmp_path / "none.tflite")(data.astronaut())
    message = str(error.value)
    assert "\n" not in message and str(missing) in message and "tflite_to_onnx --fetch" in message
    with pytest.raises(ConfigError, match="engine 'tvm': choose one of auto, litert, onnx"):
        BlazeFace(engine="tvm")(data.astronaut())


def test_both_engines_find_the_same_faces():
    pytest.importorskip("ai_edge_litert")
    if not default_tflite_path().is_file():
        pytest.skip(f"{default_tflite_path()} not made (python -m fer.detectors.tflite_to_onnx --fetch)")
    assert isinstance(open_engine("auto"), LiteRTEngine)  # the faster one, where it is installed
    squares = [BlazeFace().letterbox(picture)[0] for picture in (data.astronaut(), data.chelsea())]
    (lite_reg, lite_scores), (onnx_reg, onnx_scores) = LiteRTEngine(default_tflite_path())(squares), \
        open_engine("onnx")(squares)
    assert lite_reg.shape == onnx_reg.shape == (2, 2304, 16) and lite_scores.shape == (2, 2304, 1)
    np.testing.assert_allclose(lite_scores, onnx_scores, atol=1e-3)
    np.testing.assert_allclose(lite_reg, onnx_reg, atol=1e-2)  # pixels of the 192 px input
    photo = data.astronaut()
    boxes = {engine: BlazeFace(engine=engine)(photo) for engine in ("litert", "onnx")}
    assert len(boxes["litert"]) == len(boxes["onnx"]) == 1
    np.testing.assert_allclose(boxes["litert"][0][0], boxes["onnx"][0][0], atol=0.05)


def test_astronaut_face_agrees_with_haar():
    image = load_image(data.astronaut())
    (box,) = FaceDetector(method="blazeface")(image)
    (haar,) = FaceDetector(method="haar")(image)
    assert _iou(box, haar) > 0.6, (box, haar)  # two unrelated detectors put the face in the same place


def test_no_faces_in_cat_coffee_or_noise():
    detector = FaceDetector(method="blazeface", min_face_size=1)
    noise = np.random.default_rng(0).integers(0, 256, (300, 400, 3), dtype=np.uint8)
    for picture in (data.chelsea(), data.coffee(), noise, np.zeros((64, 64), np.uint8)):
        assert detector(load_image(picture)) == []


def test_every_face_of_a_wide_group_photo_in_its_own_pixels():
    face = data.astronaut()[20:260, 120:330]  # 240 x 210
    canvas = np.full((420, 1200, 3), 180, np.uint8)
    placed = [(60, 40), (500, 150), (920, 90)]
    for i, (x, y) in enumerate(placed):
        canvas[y:y + 240, x:x + 210] = face[:, ::-1] if i % 2 else face
    boxes = FaceDetector(method="blazeface")(load_image(canvas))
    assert len(boxes) == 3
    # Each box lies inside the patch it came from: the letterbox padding and scale were undone.
    for x, y in placed:
        assert any(x <= bx and bx + bw <= x + 210 + 5 and y <= by and by + bh <= y + 240 + 5
                   for bx, by, bw, bh in boxes), (x, y, boxes)


def test_grayscale_photo():
    gray = Image.fromarray(data.astronaut()).convert("L")
    assert len(FaceDetector(method="blazeface")(gray)) == 1
    assert FaceDetector(method="blazeface")(np.asarray(gray)) == FaceDetector(method="blazeface")(gray)


@pytest.mark.parametrize("method", ["blazeface", "haar"])
def test_arrays_and_pil_images_give_the_same_boxes(method):
    photo = data.astronaut()
    detector = FaceDetector(method=method)
    assert detector(photo) == detector(Image.fromarray(photo)) and len(detector(photo)) == 1


def test_letterbox_scales_the_photo_into_a_black_square():
    photo = data.astronaut()[:, 56:456]  # 512 x 400: padded left and right
    square, scale, (left, top) = BlazeFace().letterbox(photo)
    assert square.shape == (192, 192, 3) and square.dtype == np.uint8
    assert scale == pytest.approx(192 / 512) and top == 0 and left == (192 - 150) // 2
    assert not square[:, :left].any() and not square[:, left + 150:].any()
    inside = square[:, left:left + 150].astype(np.float32)
    for channel in range(3):  # the same picture, channels in the same (RGB) order
        assert abs(inside[..., channel].mean() - photo[..., channel].mean()) < 3


def test_onnx_engine_feeds_the_network_unit_range_nchw(monkeypatch):
    engine = open_engine("onnx")
    seen = {}
    run = engine.session.run
    monkeypatch.setattr(engine.session, "run", lambda names, feed: seen.update(feed) or run(names, feed), raising=False)
    square = BlazeFace().letterbox(data.astronaut())[0]
    engine([square, square])
    blob = seen["image"]
    assert blob.shape == (2, 3, 192, 192) and blob.dtype == np.float32
    np.testing.assert_allclose(blob[1], (square.transpose(2, 0, 1) - 127.5) / 127.5, atol=1e-6)


def test_weighted_nms_blends_overlaps_and_keeps_the_rest():
    boxes = np.array([[0, 0, 10, 10], [1, 1, 11, 11], [50, 50, 60, 60]], np.float32)
    scores = np.array([0.9, 0.3, 0.8], np.float32)
    kept = weighted_nms(boxes, scores, iou_threshold=0.3)
    assert [round(s, 2) for _, s in kept] == [0.9, 0.8]
    np.testing.assert_allclose(kept[0][0], [0.25, 0.25, 10.25, 10.25], atol=1e-5)  # 0.9/0.3-weighted mean
    np.testing.assert_allclose(kept[1][0], boxes[2])


def test_score_threshold_is_respected():
    rgb = data.astronaut()
    (_, score), = BlazeFace()(rgb)
    assert BlazeFace(score_threshold=min(0.999, score + 0.01))(rgb) == []


@pytest.mark.parametrize("size", [(512, 512), (640, 480), (1200, 420), (300, 1000), (4000, 2001)])
def test_tiles_cover_the_photo(size):
    from fer.detectors.blazeface import tiles

    width, height = size
    covered = np.zeros((height, width), bool)
    for x, y, w, h in tiles(width, height):
        assert 0 <= x and 0 <= y and x + w <= width and y + h <= height
        covered[y:y + h, x:x + w] = True
    assert covered.all()
    assert len(tiles(width, height)) == (1 if max(size) <= 1.5 * min(size) else -(-max(size) // min(size)) + 1)


def test_litert_threads_follow_the_usable_cpus(monkeypatch):
    from fer import litert

    monkeypatch.setattr(litert, "usable_cpus", lambda: 2)  # a SLURM task's share of a 64-core node
    assert litert.default_threads() == 2
    monkeypatch.setattr(litert, "usable_cpus", lambda: 64)
    assert litert.default_threads() == 4
