"""Inference speed, measured in one run: eager PyTorch against ONNX Runtime, and whole photos.

    python bench/inference.py                          # the default model: Lite0, 64 px, grayscale
    python bench/inference.py --checkpoint logs/train/runs/<run>
    python bench/inference.py --tiny                   # seconds: a smoke test of the script itself

  - per-face latency at batch 1 and throughput at batch 64 of `Predictor._forward` (float32 NCHW in [0, 1]
    -> probabilities), the one method the two backends implement: eager PyTorch and ONNX Runtime (the model
    exported by fer.export, normalisation and softmax inside)
  - the whole photo pipeline, `Predictor.predict(photo)`: face detection (BlazeFace, the default), crop,
    resize, classify, on a real photo (scikit-image's astronaut, 512x512, one face)
  - the same pipeline with an HSEmotion-sized classifier in place of ours: timm tf_efficientnet_b0 at 224 px,
    3 channels (random weights: only the cost matters), same detector
  - each detector alone: BlazeFace on the engine fer picks (LiteRT where installed) and on ONNX Runtime,
    and the Haar cascade `--detector haar` selects

Backends alternate within every repeat; latencies are medians of many calls, and each figure is the best
repeat (the least disturbed by other work on the machine). CPU only.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import _common as C  # noqa: E402  (sets sys.path to the repository)

import torch  # noqa: E402

from fer.faces import DETECTORS  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", help="a fer checkpoint or run directory (default: a fresh Lite0 at --image-size)")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=64, help="batch of the throughput figure")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's own)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--latency-calls", type=int, default=40, help="batch-1 calls per repeat and backend")
    p.add_argument("--batch-calls", type=int, default=6, help="full-batch calls per repeat and backend")
    p.add_argument("--photo-calls", type=int, default=8, help="whole-photo calls per repeat and pipeline")
    p.add_argument("--hse-size", type=int, default=224, help="input size of the HSEmotion-sized classifier")
    p.add_argument("--detector", choices=DETECTORS, default="blazeface",
                   help="face detector of the photo pipelines (default: fer's default, blazeface)")
    p.add_argument("--tiny", action="store_true", help="few calls, small inputs (tests)")
    p.add_argument("--json", type=Path, help="also write the figures to this file")
    args = p.parse_args(argv)
    if args.tiny:
        args.image_size, args.batch_size, args.hse_size = 32, 8, 64
        args.repeats, args.latency_calls, args.batch_calls, args.photo_calls = 1, 3, 2, 2
    return args


def time_calls(fn, calls: int) -> list[float]:
    out = []
    for _ in range(calls):
        start = time.perf_counter()
        fn()
        out.append(time.perf_counter() - start)
    return out


def fer_model(args):
    """(model, image size, channels, class names, temperature, what): the checkpoint's, or the default config's."""
    if args.checkpoint:
        from fer.checkpoint import load_checkpoint

        loaded = load_checkpoint(args.checkpoint)
        return (loaded.model, loaded.image_size or args.image_size, loaded.channels, loaded.model.class_names,
                loaded.temperature, f"checkpoint {loaded.path.name}")
    import tempfile

    from hydra.utils import instantiate

    with tempfile.TemporaryDirectory() as tmp:
        cfg = C.compose([], Path(tmp))
    model = instantiate(cfg.model, _convert_="all").eval()
    name = cfg.model.backbone.name
    return (model, args.image_size, int(cfg.model.backbone.in_chans), model.class_names, 1.0,
            f"{name} ({cfg.model.backbone.weights} weights), the default config")


def hse_model():
    from fer.models.classifier import FERClassifier

    # HSEmotion's classifiers are timm EfficientNet-B0s on 224 px RGB faces; random weights cost the same.
    return FERClassifier(backbone={"name": "tf_efficientnet_b0", "weights": "none", "in_chans": 3}).eval()


ROWS = {
    "lat_torch": "per-face latency, batch 1: eager PyTorch",
    "lat_onnx": "per-face latency, batch 1: ONNX Runtime",
    "thr_torch": "throughput, batch {b}: eager PyTorch",
    "thr_onnx": "throughput, batch {b}: ONNX Runtime",
    "photo_torch": "photo (detect + classify): fer {fer}, eager PyTorch",
    "photo_onnx": "photo (detect + classify): fer {fer}, ONNX Runtime (the CPU default)",
    "photo_hse": "photo (detect + classify): HSEmotion-sized B0@{hse}, eager PyTorch",
    "photo_hse_onnx": "photo (detect + classify): HSEmotion-sized B0@{hse}, ONNX Runtime",
    "detect": "face detection alone ({detector}, {engine}: part of every photo row)",
    "detect_onnx": "face detection alone (blazeface on ONNX Runtime, where ai-edge-litert is not installed)",
    "detect_haar": "face detection alone (Haar cascade, fer-predict --detector haar)",
}


def main(argv=None) -> dict:
    args = parse_args(argv)
    C.prepare(args)
    from skimage import data

    from fer.faces import FaceDetector, load_pixels
    from fer.inference import Predictor

    console = C.console()
    model, size, channels, classes, temperature, what = fer_model(args)
    fer_name = f"{model.hparams['backbone']['name']}@{size}"
    console.print(f"[bold]inference[/]: {what}, {size} px, {channels} channel(s); {C.machine_line()}", soft_wrap=True)

    detector = FaceDetector(method=args.detector)
    haar = FaceDetector(method="haar")
    blazeface_onnx = FaceDetector(method="blazeface", engine="onnx")
    ours = Predictor(model, classes, size, channels, device="cpu", detector=detector, temperature=temperature,
                     batch_size=args.batch_size, backend="torch")
    ours_onnx = Predictor(model, classes, size, channels, device="cpu", detector=detector,
                          temperature=temperature, batch_size=args.batch_size, backend="onnx")
    hse_net = hse_model()
    hse = Predictor(hse_net, classes, args.hse_size, 3, device="cpu", detector=detector,
                    batch_size=args.batch_size, backend="torch")
    hse_onnx = Predictor(hse_net, classes, args.hse_size, 3, device="cpu", detector=detector,
                         batch_size=args.batch_size, backend="onnx")

    from fer.export import synthetic_faces

    faces = synthetic_faces(args.batch_size, size, channels)
    one = faces[:1]
    photo = data.astronaut()  # RGB uint8, 512x512, one face
    pixels = load_pixels(photo)  # what Predictor.predict hands its detector
    found = len(ours.predict(photo).faces)
    for p in (ours, ours_onnx):  # warm-up: allocator, ORT arenas, first-call paths
        p._forward(faces)
    for p in (ours, ours_onnx, hse, hse_onnx):
        p.predict(photo)
    blazeface_onnx(pixels)
    engine = type(detector._blazeface._engine).__name__.replace("Engine", "") if args.detector == "blazeface" else "-"

    results = C.Repeats()
    for _ in range(args.repeats):
        for key, p in (("torch", ours), ("onnx", ours_onnx)):
            results.add(f"lat_{key}", statistics.median(time_calls(lambda p=p: p._forward(one), args.latency_calls)))
            batch_time = min(time_calls(lambda p=p: p._forward(faces), args.batch_calls))
            results.add(f"thr_{key}", len(faces) / batch_time)
        for key, p in (("photo_torch", ours), ("photo_onnx", ours_onnx), ("photo_hse", hse),
                       ("photo_hse_onnx", hse_onnx)):
            results.add(key, statistics.median(time_calls(lambda p=p: p.predict(photo), args.photo_calls)))
        results.add("detect", statistics.median(time_calls(lambda: detector(pixels), args.photo_calls)))
        results.add("detect_onnx", statistics.median(time_calls(lambda: blazeface_onnx(pixels), args.photo_calls)))
        results.add("detect_haar", statistics.median(time_calls(lambda: haar(pixels), args.photo_calls)))

    from rich.table import Table

    table = Table(title=f"inference on CPU (torch {torch.get_num_threads()} threads; ONNX Runtime defaults)")
    table.add_column("what")
    table.add_column("best", justify="right")
    table.add_column("median", justify="right")
    labels = {k: v.format(b=args.batch_size, fer=fer_name, hse=args.hse_size, detector=args.detector, engine=engine)
              for k, v in ROWS.items()}
    for key, label in labels.items():
        if key.startswith("thr"):
            table.add_row(label, f"{results.best(key):,.0f} faces/s", f"{results.median(key):,.0f} faces/s")
        else:
            table.add_row(label, f"{results.low(key) * 1e3:.2f} ms", f"{results.median(key) * 1e3:.2f} ms")
    console.print(table)
    console.print(f"faces found in the photo: {found}")

    speed_1 = results.low("lat_torch") / results.low("lat_onnx")
    speed_b = results.best("thr_onnx") / results.best("thr_torch")
    photo_ratio = results.low("photo_hse") / results.low("photo_onnx")
    photo_ratio_eager = results.low("photo_hse") / results.low("photo_torch")
    photo_ratio_both_onnx = results.low("photo_hse_onnx") / results.low("photo_onnx")
    classify_hse = results.low("photo_hse") - results.low("detect")
    classify_ours = results.low("photo_onnx") - results.low("detect")
    console.print(f"ONNX Runtime / eager, batch 1  = {speed_1:.2f}x   (target >= 1.5: {C.verdict(speed_1, 1.5)})")
    console.print(f"ONNX Runtime / eager, batch {args.batch_size} = {speed_b:.2f}x")
    console.print(f"B0@{args.hse_size} photo (eager) / fer photo (default: ONNX Runtime) = {photo_ratio:.2f}x   "
                  f"(target >= 5: {C.verdict(photo_ratio, 5)})")
    console.print(f"B0@{args.hse_size} photo / fer photo, both eager = {photo_ratio_eager:.2f}x")
    console.print(f"B0@{args.hse_size} photo / fer photo, both ONNX Runtime = {photo_ratio_both_onnx:.2f}x")
    console.print(f"beyond detection: B0@{args.hse_size} eager {classify_hse * 1e3:.1f} ms vs fer default "
                  f"{classify_ours * 1e3:.1f} ms per photo = {classify_hse / max(classify_ours, 1e-9):.1f}x")

    figures = {
        "seconds": {k: results.values[k] for k in ROWS if not k.startswith("thr")},
        "faces_per_s": {k: results.values[k] for k in ROWS if k.startswith("thr")},
        "ratios": {"onnx/eager batch 1": speed_1, f"onnx/eager batch {args.batch_size}": speed_b,
                   "hse eager/fer default photo": photo_ratio, "hse/fer photo both eager": photo_ratio_eager,
                   "hse/fer photo both onnx": photo_ratio_both_onnx},
        "model": what, "image_size": size, "threads": torch.get_num_threads(), "detector": args.detector,
    }
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")
    return figures


if __name__ == "__main__":
    main()
