"""The Python API: safe checkpoint loading, face finding, image loading, batched prediction."""

from __future__ import annotations


import numpy as np
import pytest
import torch
from PIL import Image

from fer.checkpoint import CALIBRATION_KEY, best_checkpoint, load_checkpoint, resolve_checkpoint
from fer.errors import CheckpointError, ConfigError
from fer.data.cache import decode
from fer.faces import FaceDetector, ImageError, crop_box, load_image, load_pixels
from fer.inference import Predictor, load_classifier
from fer.labels import CLASSES


@pytest.fixture(scope="module")
def predictor(trained_run) -> Predictor:
    return Predictor.from_checkpoint(trained_run)


def test_load_classifier_is_strict_safe_and_restores_normalisation(trained_run):
    ckpt_path = best_checkpoint(trained_run)
    model = load_classifier(ckpt_path)
    saved = torch.load(ckpt_path, weights_only=True)  # the file needs no code to load
    assert model.class_names == list(CLASSES)
    assert not model.training
    assert model.mean.flatten().tolist() == pytest.approx(saved["hyper_parameters"]["mean"])
    assert model.hparams["backbone"]["weights"] == saved["hyper_parameters"]["backbone"]["weights"]
    for key, value in model.state_dict().items():
        assert torch.equal(value, saved["state_dict"][key]), key
    loaded = load_checkpoint(trained_run)  # a run directory resolves to its best checkpoint
    assert loaded.path == ckpt_path and loaded.image_size == 48 and loaded.channels == 1
    assert loaded.temperature == 1.0
    assert saved["FERDataModule"] == {"image_size": 48, "channels": 1}  # self-contained without the run


class _NotAllowed:
    pass


def _bad_files(tmp_path, trained_run):
    good = torch.load(best_checkpoint(trained_run), weights_only=True)
    raw = best_checkpoint(trained_run).read_bytes()
    files = {
        "random.ckpt": np.random.default_rng(0).bytes(4096),
        "truncated.ckpt": raw[: len(raw) // 2],
        "empty.ckpt": b"",
    }
    for name, content in files.items():
        (tmp_path / name).write_bytes(content)
    torch.save(torch.nn.Linear(4, 2).state_dict(), tmp_path / "plain_state_dict.pth")
    torch.save({"epoch": 1, "state_dict": good["state_dict"]}, tmp_path / "no_hparams.ckpt")
    torch.save({"hyper_parameters": good["hyper_parameters"], "obj": _NotAllowed()}, tmp_path / "code.ckpt")
    six = dict(good, hyper_parameters={**good["hyper_parameters"], "class_names": list(CLASSES[:6])})
    torch.save(six, tmp_path / "six_names.ckpt")
    state = dict(good["state_dict"])
    state["net.classifier.weight"] = state["net.classifier.weight"][:5]
    state["net.classifier.bias"] = state["net.classifier.bias"][:5]
    torch.save(dict(good, state_dict=state), tmp_path / "five_outputs.ckpt")
    return sorted(p.name for p in tmp_path.iterdir())


def test_not_a_fer_checkpoint_is_one_clear_error(tmp_path, trained_run):
    for name in _bad_files(tmp_path, trained_run):
        with pytest.raises(CheckpointError) as info:
            load_classifier(tmp_path / name)
        message = str(info.value)
        assert str(tmp_path / name) in message and "\n" not in message, message
    for missing in (tmp_path / "nope.ckpt", tmp_path):  # no file; a folder that is no run
        with pytest.raises(CheckpointError):
            resolve_checkpoint(missing)


def test_predict_astronaut_one_face(predictor, astronaut_jpeg):
    result = predictor.predict(astronaut_jpeg)
    assert result.ok and (result.width, result.height) == (512, 512)
    assert len(result.faces) == 1
    face = result.faces[0]
    x, y, w, h = face.box
    assert 150 < x < 210 and 40 < y < 100 and 80 < w < 130  # the astronaut's face
    assert list(face.probabilities) == list(CLASSES)
    assert sum(face.probabilities.values()) == pytest.approx(1.0, abs=1e-5)
    assert face.label == max(face.probabilities, key=face.probabilities.get)
    assert face.score == face.probabilities[face.label]


def test_inputs_of_every_kind_in_one_forward_pass(predictor, astronaut_jpeg, monkeypatch):
    from skimage import data

    calls = []
    forward = predictor._forward
    monkeypatch.setattr(predictor, "_forward", lambda batch: calls.append(batch.shape) or forward(batch))
    pil = Image.open(astronaut_jpeg)
    results = predictor.predict([str(astronaut_jpeg), pil, data.astronaut(), data.astronaut() / 255.0])
    assert [len(r.faces) for r in results] == [1, 1, 1, 1]
    assert len(calls) == 1 and calls[0][0] == 4  # all faces of all images batched together
    assert calls[0][1:] == (1, 48, 48)
    p = [r.faces[0].probabilities["happy"] for r in results]
    assert p[2] == pytest.approx(p[3], abs=1e-4)  # uint8 and float arrays are the same picture


@pytest.mark.parametrize("tta", ["flip", "shift"])
def test_tta_averages_the_views_fer_eval_averages(predictor, trained_run, astronaut_jpeg, monkeypatch, tta):
    from fer.tta import NUM_VIEWS, average_probabilities, tta_logits

    pixels = load_pixels(astronaut_jpeg)
    crop = predictor.preprocess(pixels, predictor.detector(pixels)[0])
    crops = np.stack([crop, crop[..., ::-1]])  # two faces: the astronaut and her mirror image
    eager = Predictor.from_checkpoint(trained_run, backend="torch", batch_size=4, tta=tta)
    calls = []
    forward = eager._forward
    monkeypatch.setattr(eager, "_forward", lambda batch: calls.append(len(batch)) or forward(batch))
    got = eager.probabilities(crops)
    # What fer-eval tta=... computes for the same pixels: the numbers its accuracy was measured with.
    x = torch.from_numpy(crops.astype(np.float32) / 255.0)
    expected = average_probabilities(tta_logits(eager.model, x, tta), eager.temperature).numpy()
    np.testing.assert_allclose(got, expected, atol=1e-5)
    assert got.shape == (2, len(CLASSES)) and np.allclose(got.sum(1), 1.0, atol=1e-5)
    # batch_size counts views: flip fits both faces (2 x 2 views) in one pass, shift takes one face a pass.
    assert calls == ([4] if tta == "flip" else [NUM_VIEWS["shift"]] * 2)
    if tta == "flip":  # a face and its mirror image have the same flip-averaged probabilities
        np.testing.assert_allclose(got[0], got[1], atol=1e-5)
    assert not np.allclose(got, eager._forward(crops.astype(np.float32) / 255.0), atol=1e-4)  # views matter
    monkeypatch.setattr(predictor, "tta", tta)  # the exported default backend averages the same views
    np.testing.assert_allclose(predictor.probabilities(crops), expected, atol=1e-4)
    with pytest.raises(ValueError, match="tta='mirror'"):
        Predictor.from_checkpoint(trained_run, backend="torch", tta="mirror")


@pytest.mark.parametrize("option, message", [
    ({"backend": "tpu"}, "backend='tpu': expected one of"),
    ({"fallback": "crop"}, "fallback='crop': expected 'none' or 'full-image'"),
    ({"margin": -0.5}, "margin=-0.5: expected a number above -0.5"),  # an empty crop
    ({"margin": -2}, "margin=-2: expected a number above -0.5"),
    ({"margin": float("nan")}, "margin=nan: expected"),
    ({"device": "cuda"}, "device=cuda: CUDA is not available on this machine"),
    ({"device": "gpu"}, "device=gpu: not a device"),
])
def test_bad_options_are_one_line_config_errors(option, message, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match=message) as error:
        Predictor(None, CLASSES, image_size=48, channels=1, **option)
    assert "\n" not in str(error.value)


def test_bad_errors_mode_is_a_config_error(predictor, astronaut_jpeg):
    with pytest.raises(ConfigError, match="errors='ignore': expected 'raise' or 'record'"):
        predictor.predict(astronaut_jpeg, errors="ignore")


def test_face_crops_are_the_training_decode_of_the_photo_region(predictor, astronaut_jpeg):
    from skimage import data

    photo = data.astronaut()
    assert np.shares_memory(load_pixels(photo), photo)  # a uint8 RGB array is used as it is, never copied
    pixels = load_pixels(astronaut_jpeg)
    assert pixels.dtype == np.uint8 and pixels.shape == (512, 512, 3)
    assert np.array_equal(pixels, np.asarray(load_image(astronaut_jpeg)))
    box = predictor.detector(pixels)[0]
    # What the model sees is exactly what fer.data.cache.decode made of training faces: the PIL crop of
    # the photo (the box plus margin), converted to gray and resized by Pillow.
    expected = decode(load_image(astronaut_jpeg).crop(crop_box(box, predictor.margin)),
                      predictor.image_size, predictor.channels)
    assert np.array_equal(predictor.preprocess(pixels, box), expected)


def test_face_crop_is_a_square_around_the_box_padded_by_its_edge_pixels():
    from fer.faces import crop_face

    image = np.random.default_rng(0).integers(0, 256, (40, 60, 3), dtype=np.uint8)
    inside = crop_face(image, (20, 10, 20, 16), 0.1)  # side max(20, 16) * 1.2 = 24 about the box's centre
    assert inside.shape == (24, 24, 3) and np.shares_memory(inside, image)
    assert np.array_equal(inside, image[6:30, 18:42])
    cut = crop_face(image, (-10, 5, 30, 30), 0.1)  # a face cut by the left edge: 36 px square, not 23x36
    padded = np.pad(image, ((50, 50), (50, 50), (0, 0)), mode="edge")
    assert np.array_equal(cut, padded[50 + 2:50 + 38, 50 - 13:50 + 23])
    corner = crop_face(image[..., 0], (45, 30, 30, 30), 0.0)  # past two edges, grayscale
    assert np.array_equal(corner, np.pad(image[..., 0], 30, mode="edge")[60:90, 75:105])


def test_a_face_cut_by_the_photos_edge_is_not_stretched(predictor, astronaut_jpeg):
    pixels = load_pixels(astronaut_jpeg)
    x, y, w, h = predictor.detector(pixels)[0]
    cut = x + w // 4  # the photo's left edge through the face, a quarter of it cut away
    photo = np.ascontiguousarray(pixels[:, cut:])
    (found,) = predictor.detector.find(photo)
    assert found.box[0] == 0 and found.box[0] + found.box[2] <= photo.shape[1]  # reported inside the photo
    assert found.face[0] < 0 and found.face[2] > found.box[2]  # cropped from where the face really is
    # Same face geometry in both photos: the part of the crop inside the cut photo is the same picture.
    whole, edge = predictor.preprocess(pixels, (x, y, w, h)), predictor.preprocess(photo, (x - cut, y, w, h))
    left = round(x + (w - max(w, h) * (1 + 2 * predictor.margin)) / 2)
    seen = round((cut - left) / (max(w, h) * (1 + 2 * predictor.margin)) * predictor.image_size) + 2
    assert np.abs(whole[..., seen:].astype(int) - edge[..., seen:]).max() <= 2
    result = predictor.predict(photo)
    assert [f.box for f in result.faces] == [found.box]


@pytest.mark.parametrize("method", ["blazeface", "haar"])
def test_detector_options(predictor, astronaut_jpeg, method):
    image = load_image(astronaut_jpeg)
    assert FaceDetector(detect=False, method=method)(image) == [(0, 0, 512, 512)]
    assert FaceDetector(min_face_size=200, method=method)(image) == []
    # A huge photo is detected on a smaller copy and the box mapped back to its own pixels.
    big = image.resize((3072, 3072), Image.Resampling.BILINEAR)
    boxes = FaceDetector(max_side=1024, min_face_size=150, method=method)(big)
    assert len(boxes) == 1
    (x, y, w, h), (x0, y0, w0, h0) = boxes[0], FaceDetector(method=method)(image)[0]
    assert abs(x - 6 * x0) < 60 and abs(y - 6 * y0) < 60 and abs(w - 6 * w0) < 90


def test_unknown_detector_named():
    with pytest.raises(ConfigError, match="unknown face detector 'mtcnn'; choose one of blazeface, haar"):
        FaceDetector(method="mtcnn")


def _astronaut_variants(tmp_path, astronaut_jpeg) -> dict[str, Image.Image]:
    rgb = Image.open(astronaut_jpeg).convert("RGB")
    variants = {
        "rgba.png": rgb.convert("RGBA"),
        "palette.png": rgb.convert("P", palette=Image.Palette.ADAPTIVE),
        "cmyk.jpg": rgb.convert("CMYK"),
        "gray.png": rgb.convert("L"),
    }
    paths = {}
    for name, im in variants.items():
        im.save(tmp_path / name)
        paths[name] = tmp_path / name
    sixteen = (np.asarray(rgb.convert("L"), dtype=np.uint16) * 257)
    Image.fromarray(sixteen).save(tmp_path / "gray16.png")  # mode I;16
    paths["gray16.png"] = tmp_path / "gray16.png"
    # Stored rotated, with the EXIF tag that says how to turn it upright (as phone cameras do).
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 CW to display
    rgb.transpose(Image.Transpose.ROTATE_90).save(tmp_path / "exif_rotated.jpg", exif=exif, quality=92)
    paths["exif_rotated.jpg"] = tmp_path / "exif_rotated.jpg"
    return paths


def test_image_modes_and_exif(predictor, tmp_path, astronaut_jpeg):
    paths = _astronaut_variants(tmp_path, astronaut_jpeg)
    assert Image.open(paths["gray16.png"]).mode.startswith("I")
    for name, path in paths.items():
        image = load_image(path)
        assert image.mode in ("L", "RGB") and image.size == (512, 512), name
        if name == "gray16.png":  # rescaled to 8 bits, not clipped to white
            assert 60 < np.asarray(image).mean() < 200
    results = predictor.predict(list(paths.values()))
    assert [len(r.faces) for r in results] == [1] * len(paths), [(r.source, r.faces) for r in results]
    upright = predictor.predict(astronaut_jpeg).faces[0].box
    rotated = results[list(paths).index("exif_rotated.jpg")].faces[0].box
    assert all(abs(a - b) <= 8 for a, b in zip(upright, rotated))


def test_unreadable_images(predictor, tmp_path, astronaut_jpeg, monkeypatch):
    (tmp_path / "notes.jpg").write_text("not an image")
    (tmp_path / "cut.jpg").write_bytes(astronaut_jpeg.read_bytes()[:2000])
    for name, words in (("notes.jpg", "not a recognised image"), ("cut.jpg", "truncated"), ("gone.jpg", "no such")):
        with pytest.raises(ImageError, match=words) as info:
            load_image(tmp_path / name)
        assert str(tmp_path / name) in str(info.value)
    results = predictor.predict([tmp_path / "notes.jpg", astronaut_jpeg], errors="record")
    assert results[0].error and not results[0].faces and len(results[1].faces) == 1
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 512 * 512 // 4)  # astronaut is > 2x the limit
    with pytest.raises(ImageError, match="decompression bomb"):
        load_image(astronaut_jpeg)


def test_calibrated_checkpoint_changes_probabilities_not_argmax(copy_run, astronaut_jpeg):
    from fer.checkpoint import write_calibration

    run = copy_run()
    plain = Predictor.from_checkpoint(run).predict(astronaut_jpeg).faces[0]
    write_calibration(best_checkpoint(run), {"temperature": 2.5})
    assert torch.load(best_checkpoint(run), weights_only=True)[CALIBRATION_KEY]["temperature"] == 2.5
    calibrated = Predictor.from_checkpoint(run)
    assert calibrated.temperature == 2.5
    face = calibrated.predict(astronaut_jpeg).faces[0]
    assert face.label == plain.label and face.score < plain.score  # T > 1 softens, never reorders
    assert sum(face.probabilities.values()) == pytest.approx(1.0, abs=1e-5)
    assert not list(run.rglob("*.tmp"))  # the atomic write left nothing behind
