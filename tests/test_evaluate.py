"""fer-eval: metrics, TTA, calibration, folder trees with unknown classes, the Hydra command line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import compose_eval
from fer.checkpoint import CALIBRATION_KEY, best_checkpoint
from fer.data.synthetic import draw_face
from fer.evaluate import evaluate
from fer.labels import CLASSES

REPO = Path(__file__).resolve().parents[1]


def test_shift_views_move_the_picture_at_its_own_scale():
    from fer.tta import NUM_VIEWS, views

    image = torch.zeros(1, 1, 64, 64)
    image[..., 30, 20] = 1.0  # one bright pixel, off centre
    moved = views(image, "shift")
    assert len(moved) == NUM_VIEWS["shift"] == 10 and all(v.shape == image.shape for v in moved)
    spots = [tuple(int(i) for i in torch.nonzero(v[0, 0])[0]) for v in moved]
    assert spots[:5] == [(30, 20), (34, 20), (26, 20), (30, 24), (30, 16)]  # 4 px = 1/16 of 64, no zoom
    assert spots[5:] == [(y, 63 - x) for y, x in spots[:5]]  # and their mirror images
    assert all(float(v.sum()) == 1.0 for v in moved)  # nothing rescaled or blurred
    with pytest.raises(ValueError, match="tta='mirror': expected one of none, flip"):
        views(image, "mirror")


def test_shift_rotate_adds_turned_views_about_the_centre():
    from fer.tta import NUM_VIEWS, ROTATE_DEGREES, views

    ys, xs = torch.meshgrid(torch.arange(64.0), torch.arange(64.0), indexing="ij")
    image = torch.exp(-((ys - 31.5) ** 2 + (xs - 51.5) ** 2) / 8).view(1, 1, 64, 64)  # a blob 20 px right of centre
    out = views(image, "shift_rotate")
    assert len(out) == NUM_VIEWS["shift_rotate"] == 14 and all(v.shape == image.shape for v in out)
    assert all(torch.equal(a, b) for a, b in zip(out[:10], views(image, "shift")))

    def centre_of_mass(v):
        w = v[0, 0] / v.sum()
        return float((w * ys).sum()), float((w * xs).sum())

    (y1, x1), (y2, x2) = centre_of_mass(out[10]), centre_of_mass(out[11])
    drop = 20 * np.sin(np.radians(ROTATE_DEGREES))  # 1.7 px: the blob swings up one way, down the other
    assert abs(y1 - 31.5) == pytest.approx(drop, abs=0.2) and (y1 - 31.5) * (y2 - 31.5) < 0
    assert x1 == pytest.approx(51.5, abs=0.3) and x2 == pytest.approx(51.5, abs=0.3)
    assert torch.equal(out[12], out[10].flip(-1)) and torch.equal(out[13], out[11].flip(-1))


@pytest.mark.parametrize("tta", ["none", "flip", "shift", "shift_rotate", "tencrop"])
def test_every_tta_mode(trained_run, tmp_path, tta):
    report = evaluate(compose_eval(tmp_path, [f"ckpt_path={trained_run}", f"tta={tta}"]))
    out = tmp_path / "eval"
    on_disk = json.loads((out / "report.json").read_text())
    assert on_disk["metrics"]["accuracy"] == pytest.approx(report["metrics"]["accuracy"])
    assert (out / "confusion_matrix.png").stat().st_size > 1000
    assert report["tta"] == tta and report["split"] == "test" and report["num_samples"] == 35
    assert report["image_size"] == 48 and report["data"].endswith(".hydra/config.yaml")
    metrics = report["metrics"]
    confusion = np.array(metrics["confusion_matrix"])
    assert confusion.sum() == 35
    assert metrics["accuracy"] == pytest.approx(np.trace(confusion) / confusion.sum())
    assert set(metrics["per_class"]) == set(CLASSES)
    assert [m["support"] for m in metrics["per_class"].values()] == confusion.sum(1).tolist()
    for name in ("precision", "recall", "f1"):
        assert all(0 <= m[name] <= 1 for m in metrics["per_class"].values())
    assert 0 <= metrics["f1_macro"] <= 1
    assert 0 <= report["calibration"]["ece"] <= 1 and report["calibration"]["temperature"] == 1.0
    assert report["left_out_classes"] == []


def test_calibration_fits_and_is_stored(copy_run, trained_run, tmp_path):
    run = copy_run()
    assert best_checkpoint(run).parent == run / "checkpoints"  # the copy's own file, not the original's
    report = evaluate(compose_eval(tmp_path, [f"ckpt_path={run}", "calibrate=true"]))
    fitted = report["calibration"]["fitted"]
    t = fitted["temperature"]
    assert t > 0 and abs(t - 1.0) > 1e-3
    assert fitted["nll_after"] <= fitted["nll_before"] + 1e-6  # what the fit minimises
    assert "val" in fitted["fitted_on"] and not fitted["same_images_as_evaluation"]
    assert {"ece", "ece_calibrated"} <= set(report["calibration"])
    stored = torch.load(best_checkpoint(run), weights_only=True)[CALIBRATION_KEY]
    assert stored["temperature"] == pytest.approx(t)
    # A later evaluation applies the stored temperature: other probabilities, same predictions.
    again = evaluate(compose_eval(tmp_path / "again", [f"ckpt_path={run}"]))
    raw = evaluate(compose_eval(tmp_path / "raw", [f"ckpt_path={run}", "use_calibration=false"]))
    assert again["calibration"]["temperature"] == pytest.approx(t)
    assert again["calibration"]["ece_calibrated"] != pytest.approx(raw["calibration"]["ece_calibrated"])
    assert again["metrics"]["confusion_matrix"] == raw["metrics"]["confusion_matrix"]
    assert CALIBRATION_KEY not in torch.load(best_checkpoint(trained_run), weights_only=True)


def _face_tree(root: Path, per_class: int = 3) -> Path:
    """<root>/<class>/*.png of synthetic faces, plus a `contempt` folder fer has no class for."""
    for label, name in enumerate([*CLASSES, "contempt"]):
        folder = root / ("happiness" if name == "happy" else name)  # an alias, as datasets spell it
        folder.mkdir(parents=True)
        for i in range(per_class if name != "contempt" else 2):
            Image.fromarray(draw_face(label % len(CLASSES), seed=1000 * label + i, image_size=64)).save(folder / f"{i}.png")
    return root


def test_folder_tree_through_the_command_line(trained_run, tmp_path):
    tree = _face_tree(tmp_path / "faces")
    env = {**os.environ, "COLUMNS": "120"}
    cmd = [sys.executable, "-m", "fer.evaluate", f"ckpt_path={best_checkpoint(trained_run)}", f"data_dir={tree}",
           "tta=flip", f"paths.log_dir={tmp_path / 'logs'}", f"paths.cache_dir={tmp_path / 'cache'}"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (out,) = (tmp_path / "logs" / "eval" / "runs").iterdir()  # the default run directory, as a user gets it
    assert "contempt" in proc.stdout and "accuracy" in proc.stdout
    report = json.loads((out / "report.json").read_text())
    assert report["left_out_classes"] == ["contempt"] and report["left_out_images"] == {"contempt": 2}
    assert report["num_samples"] == 3 * len(CLASSES) and report["split"] == "all"
    assert report["image_size"] == 48  # the checkpoint's size, not the 64 px files'
    assert (out / "confusion_matrix.png").is_file()
    assert (out / ".hydra" / "config.yaml").is_file()


def test_bad_checkpoint_and_bad_options(tmp_path, trained_run):
    from fer.errors import CheckpointError, ConfigError

    (tmp_path / "x.ckpt").write_bytes(b"junk")
    with pytest.raises(CheckpointError, match="x.ckpt"):
        evaluate(compose_eval(tmp_path, [f"ckpt_path={tmp_path / 'x.ckpt'}"]))
    with pytest.raises(ConfigError, match="tta='mirror'"):
        evaluate(compose_eval(tmp_path, [f"ckpt_path={trained_run}", "tta=mirror"]))
    with pytest.raises(ConfigError, match="split='train': expected test or val"):
        evaluate(compose_eval(tmp_path, [f"ckpt_path={trained_run}", "split=train"]))


def test_an_ensemble_averages_its_members_probabilities(copy_run, trained_run, tmp_path):
    from fer.checkpoint import load_checkpoint
    from fer.evaluate import all_logits, split_arrays

    # A second member that differs from the first: the same run, its weights nudged.
    other = copy_run()
    path = best_checkpoint(other)
    checkpoint = torch.load(path, weights_only=False)
    torch.manual_seed(0)
    for name, value in checkpoint["state_dict"].items():
        if value.is_floating_point() and name.startswith("net.classifier"):
            value.add_(torch.randn_like(value) * 0.5)
    torch.save(checkpoint, path)

    single = evaluate(compose_eval(tmp_path / "one", [f"ckpt_path={trained_run}", "tta=flip"]))
    twice = evaluate(compose_eval(tmp_path / "twice", [f"ckpt_path=[{trained_run},{trained_run}]", "tta=flip"]))
    assert twice["metrics"]["confusion_matrix"] == single["metrics"]["confusion_matrix"]
    assert twice["calibration"]["ece"] == pytest.approx(single["calibration"]["ece"], abs=1e-6)

    pair = evaluate(compose_eval(tmp_path / "pair", [f"ckpt_path=[{trained_run},{other}]", "tta=flip"]))
    assert pair["checkpoint"] == [str(best_checkpoint(trained_run)), str(path)]
    assert pair["num_samples"] == single["num_samples"] == 35
    # The same average computed by hand from each member's flip views.
    from hydra.utils import instantiate
    from fer.evaluate import data_config
    cfg = compose_eval(tmp_path / "by_hand", [f"ckpt_path={trained_run}"])
    first = load_checkpoint(trained_run)
    dm = instantiate(data_config(cfg, first, first.image_size)[0], _convert_="all")
    images, labels, _ = split_arrays(dm, "test")
    probs = sum(torch.softmax(all_logits(load_checkpoint(run).model, images, "flip", 128, torch.device("cpu")), -1).mean(1)
                for run in (trained_run, other)) / 2
    expected = (probs.argmax(1).numpy() == labels).mean()
    assert pair["metrics"]["accuracy"] == pytest.approx(expected)
    assert pair["metrics"]["confusion_matrix"] != single["metrics"]["confusion_matrix"]  # the nudge mattered


def test_ensemble_members_must_agree(copy_run, trained_run, tmp_path):
    from fer.errors import CheckpointError

    with pytest.raises(CheckpointError, match="calibrate=true"):
        evaluate(compose_eval(tmp_path, [f"ckpt_path=[{trained_run},{trained_run}]", "calibrate=true"]))
    other = copy_run()
    path = best_checkpoint(other)
    checkpoint = torch.load(path, weights_only=False)
    checkpoint["hyper_parameters"]["class_names"] = list(reversed(checkpoint["hyper_parameters"]["class_names"]))
    torch.save(checkpoint, path)
    with pytest.raises(CheckpointError, match=f"{path}: classes"):
        evaluate(compose_eval(tmp_path, [f"ckpt_path=[{trained_run},{other}]"]))

    from fer.checkpoint import DATAMODULE_KEY

    checkpoint["hyper_parameters"]["class_names"] = list(CLASSES)
    checkpoint[DATAMODULE_KEY] = {**checkpoint.get(DATAMODULE_KEY, {}), "image_size": 56}
    torch.save(checkpoint, path)
    with pytest.raises(CheckpointError, match="56 px"):
        evaluate(compose_eval(tmp_path, [f"ckpt_path=[{trained_run},{other}]"]))
    # One size given for all: both scored at it.
    report = evaluate(compose_eval(tmp_path, [f"ckpt_path=[{trained_run},{other}]", "image_size=56"]))
    assert report["image_size"] == 56 and len(report["checkpoint"]) == 2


def test_missing_checkpoint_and_bad_device_are_one_line_config_errors(tmp_path, trained_run, monkeypatch):
    from fer.errors import ConfigError

    with pytest.raises(ConfigError, match="ckpt_path: give a .ckpt, a run directory or a list of them"):
        evaluate(compose_eval(tmp_path, []))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # as on a machine without a GPU
    with pytest.raises(ConfigError, match="device=cuda: CUDA is not available on this machine"):
        evaluate(compose_eval(tmp_path, [f"ckpt_path={trained_run}", "device=cuda"]))


def test_fer_eval_without_a_checkpoint_is_one_line(tmp_path):
    cmd = [sys.executable, "-m", "fer.evaluate", f"paths.log_dir={tmp_path / 'logs'}"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "HYDRA_FULL_ERROR": "1"})
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-2000:]
    assert lines[0].startswith("error: ckpt_path: give a .ckpt"), proc.stderr


def test_data_keys_on_the_command_line_go_over_the_data_config(trained_run, tmp_path):
    tree = _face_tree(tmp_path / "faces")
    (tree / "sad" / "broken.png").write_bytes(b"not a png")
    report = evaluate(compose_eval(tmp_path, [f"ckpt_path={trained_run}", f"data_dir={tree}", "+data.on_bad=skip"]))
    assert report["num_samples"] == 3 * len(CLASSES)  # the broken file skipped, the rest scored


def test_a_whole_data_config_keeps_the_runs_held_out_split(copy_run, tmp_path):
    """data=... on the command line: the run's val_fraction and split_seed, unless given there too."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from fer.checkpoint import load_checkpoint
    from fer.evaluate import data_config
    from fer.utils import CONFIG_DIR

    run = copy_run()
    config = OmegaConf.load(run / ".hydra" / "config.yaml")
    config.data.split_seed, config.data.val_fraction = 1, 0.25
    OmegaConf.save(config, run / ".hydra" / "config.yaml")
    loaded = load_checkpoint(run)

    def data_for(*overrides: str) -> dict:
        with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
            cfg = compose("eval", overrides=[f"ckpt_path={run}", "data=synthetic", *overrides],
                          return_hydra_config=True)  # Hydra's record of the command line, as fer-eval has it
        return data_config(cfg, loaded, 48)[0]

    data = data_for()
    assert (data["split_seed"], data["val_fraction"]) == (1, 0.25)
    data = data_for("data.split_seed=0")
    assert (data["split_seed"], data["val_fraction"]) == (0, 0.25)


def test_calibrating_on_the_evaluated_images_warns_and_stores_nothing(copy_run, tmp_path, capsys):
    run = copy_run()
    tree = _face_tree(tmp_path / "faces")  # <dir>/<class>/: one folder is the test and the val split
    report = evaluate(compose_eval(tmp_path, [f"ckpt_path={run}", f"data_dir={tree}", "calibrate=true"]))
    assert report["calibration"]["fitted"]["same_images_as_evaluation"]
    assert CALIBRATION_KEY not in torch.load(best_checkpoint(run), weights_only=True)
    out = " ".join(capsys.readouterr().out.split())
    assert "(in-sample)" in out and "warning: T was fitted on the evaluated images" in out
    assert "not stored in the checkpoint" in out


def test_reported_nll_is_at_the_applied_temperature(copy_run, tmp_path):
    from fer.checkpoint import load_checkpoint, write_calibration
    from fer.evaluate import all_logits, data_config, split_arrays
    from hydra.utils import instantiate

    run = copy_run()
    write_calibration(best_checkpoint(run), {"temperature": 2.0})
    calibrated = evaluate(compose_eval(tmp_path / "t2", [f"ckpt_path={run}"]))["calibration"]
    raw = evaluate(compose_eval(tmp_path / "t1", [f"ckpt_path={run}", "use_calibration=false"]))["calibration"]
    loaded = load_checkpoint(run)
    dm = instantiate(data_config(compose_eval(tmp_path, [f"ckpt_path={run}"]), loaded, 48)[0], _convert_="all")
    images, labels, _ = split_arrays(dm, "test")
    logits = all_logits(loaded.model, images, "none", 128, torch.device("cpu"))[:, 0]
    labels = torch.from_numpy(labels.astype(np.int64))
    assert calibrated["temperature"] == 2.0
    assert calibrated["nll"] == pytest.approx(float(torch.nn.functional.cross_entropy(logits / 2, labels)), rel=1e-5)
    assert raw["nll"] == pytest.approx(float(torch.nn.functional.cross_entropy(logits, labels)), rel=1e-5)
