"""Inference speed, measured in one run: eager PyTorch against ONNX Runtime, and whole photos.

    python bench/inference.py                          # the default model: Lite0, 64 px, grayscale
    python bench/inference.py --checkpoint logs/train/runs/<run>
    python bench/inference.py --tiny                   # seconds: a smoke test of the script itself

  - per-face latency at batch 1 and throughput at batch 64 of `Predictor._forward` (float32 NCHW in [0, 1]
    -> probabilities), the one method the backends implement: eager PyTorch, ONNX Runtime and LiteRT (the
    model exported by fer.export, normalisation and softmax inside; LiteRT where ai-edge-litert is installed)
  - the whole photo pipeline, `Predictor.predict(photo)`: face detection (BlazeFace, the default), crop,
    resize, classify, on a real photo (scikit-image's astronaut, 512x512, one face)
  - the same pipeline with an HSEmotion-sized classifier in place of ours: timm tf_efficientnet_b0 at 224 px,
    3 channels (random weights: only the cost matters), same detector
  - each detector alone: BlazeFace on the engine fer picks (LiteRT where installed) and on ONNX Runtime,
    and the Haar cascade `--detector haar` selects

Backends alternate within every repeat, each timed in a block of calls that starts with one untimed call
(the first call after another pipeline refills caches and wakes its own worker threads, which a program
running one pipeline does not pay); latencies are medians of a block, and each figure is the best repeat
(the least disturbed by other work on the machine). CPU only.
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
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--latency-calls", type=int, default=40, help="batch-1 calls per repeat and backend")
    p.add_argument("--batch-calls", type=int, default=6, help="full-batch calls per repeat and backend")
    p.add_argument("--photo-calls", type=int, default=12, help="whole-photo calls per repeat and pipeline")
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
    fn()  # untimed: see the module docstring
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


BACKEND_NAMES = {"torch": "eager PyTorch", "onnx": "ONNX Runtime", "litert": "LiteRT"}
ROWS = {
    "lat_{b}": "per-face latency, batch 1: {name}",
    "thr_{b}": "throughput, batch {batch}: {name}",
    "photo_{b}": "photo (detect + classify): fer {fer}, {name}",
    "photo_hse": "photo (detect + classify): HSEmotion-sized B0@{hse}, eager PyTorch",
    "photo_hse_onnx": "photo (detect + classify): HSEmotion-sized B0@{hse}, ONNX Runtime",
    "detect": "face detection alone ({detector}, {engine}: part of every photo row)",
    "detect_onnx": "face detection alone (blazeface on ONNX Runtime, where ai-edge-litert is not installed)",
    "detect_haar": "face detection alone (Haar cascade, fer-predict --detector haar)",
}


def row_labels(backends, default, **names) -> dict[str, str]:
    """Every row's key -> label, one row per backend where the key has {b}."""
    labels = {}
    for key, label in ROWS.items():
        for b in backends if "{b}" in key else [None]:
            name = BACKEND_NAMES.get(b, "") + (" (the CPU default)" if b == default and key.startswith("photo") else "")
            labels[key.format(b=b)] = label.format(name=name, **names)
    return labels


def main(argv=None) -> dict:
    args = parse_args(argv)
    C.prepare(args)
    from skimage import data

    from fer.faces import FaceDetector, load_pixels
    from fer.inference import Predictor
    from fer.litert import litert_available

    console = C.console()
    model, size, channels, classes, temperature, what = fer_model(args)
    fer_name = f"{model.hparams['backbone']['name']}@{size}"
    console.print(f"[bold]inference[/]: {what}, {size} px, {channels} channel(s); {C.machine_line()}", soft_wrap=True)

    detector = FaceDetector(method=args.detector)
    haar = FaceDetector(method="haar")
    blazeface_onnx = FaceDetector(method="blazeface", engine="onnx")
    backends = ["torch", "onnx"] + (["litert"] if litert_available() else [])
    ours = {b: Predictor(model, classes, size, channels, device="cpu", detector=detector, temperature=temperature,
                         batch_size=args.batch_size, backend=b) for b in backends}
    default = Predictor(model, classes, size, channels, device="cpu", detector=detector, temperature=temperature,
                        backend="auto").backend  # what fer-predict and Predictor.from_checkpoint run here
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
    found = len(ours["torch"].predict(photo).faces)
    engine = type(detector._blazeface._engine).__name__.replace("Engine", "") if args.detector == "blazeface" else "-"

    results = C.Repeats()
    for _ in range(args.repeats):
        for b, p in ours.items():
            results.add(f"lat_{b}", statistics.median(time_calls(lambda p=p: p._forward(one), args.latency_calls)))
            batch_time = min(time_calls(lambda p=p: p._forward(faces), args.batch_calls))
            results.add(f"thr_{b}", len(faces) / batch_time)
        for key, p in [(f"photo_{b}", p) for b, p in ours.items()] + [("photo_hse", hse), ("photo_hse_onnx", hse_onnx)]:
            results.add(key, statistics.median(time_calls(lambda p=p: p.predict(photo), args.photo_calls)))
        results.add("detect", statistics.median(time_calls(lambda: detector(pixels), args.photo_calls)))
        results.add("detect_onnx", statistics.median(time_calls(lambda: blazeface_onnx(pixels), args.photo_calls)))
        results.add("detect_haar", statistics.median(time_calls(lambda: haar(pixels), args.photo_calls)))

    from rich.table import Table

    table = Table(title=f"inference on CPU (torch {torch.get_num_threads()} threads; ONNX Runtime and LiteRT defaults)")
    table.add_column("what")
    table.add_column("best", justify="right")
    table.add_column("median", justify="right")
    labels = row_labels(backends, default, batch=args.batch_size, fer=fer_name, hse=args.hse_size,
                        detector=args.detector, engine=engine)
    for key, label in labels.items():
        if key.startswith("thr"):
            table.add_row(label, f"{results.best(key):,.0f} faces/s", f"{results.median(key):,.0f} faces/s")
        else:
            table.add_row(label, f"{results.low(key) * 1e3:.2f} ms", f"{results.median(key) * 1e3:.2f} ms")
    console.print(table)
    console.print(f"faces found in the photo: {found}; the CPU default backend here: {BACKEND_NAMES[default]}")

    ratios = {}
    for b in backends[1:]:
        ratios[f"{b}/eager batch 1"] = results.low("lat_torch") / results.low(f"lat_{b}")
        ratios[f"{b}/eager batch {args.batch_size}"] = results.best(f"thr_{b}") / results.best("thr_torch")
    ratios["hse eager/fer default photo"] = results.low("photo_hse") / results.low(f"photo_{default}")
    ratios["hse/fer photo both eager"] = results.low("photo_hse") / results.low("photo_torch")
    ratios["hse/fer photo both onnx"] = results.low("photo_hse_onnx") / results.low("photo_onnx")
    classify_hse = results.low("photo_hse") - results.low("detect")
    classify_ours = results.low(f"photo_{default}") - results.low("detect")
    for b in backends[1:]:
        verdict = f"   (target >= 1.5: {C.verdict(ratios[f'{b}/eager batch 1'], 1.5)})" if b == "onnx" else ""
        console.print(f"{BACKEND_NAMES[b]} / eager, batch 1  = {ratios[f'{b}/eager batch 1']:.2f}x{verdict}")
        console.print(f"{BACKEND_NAMES[b]} / eager, batch {args.batch_size} = "
                      f"{ratios[f'{b}/eager batch {args.batch_size}']:.2f}x")
    photo_ratio = ratios["hse eager/fer default photo"]
    console.print(f"B0@{args.hse_size} photo (eager) / fer photo (default: {BACKEND_NAMES[default]}) = "
                  f"{photo_ratio:.2f}x   (target >= 5: {C.verdict(photo_ratio, 5)})")
    console.print(f"B0@{args.hse_size} photo / fer photo, both eager = {ratios['hse/fer photo both eager']:.2f}x")
    console.print(f"B0@{args.hse_size} photo / fer photo, both ONNX Runtime = {ratios['hse/fer photo both onnx']:.2f}x")
    console.print(f"beyond detection: B0@{args.hse_size} eager {classify_hse * 1e3:.1f} ms vs fer default "
                  f"{classify_ours * 1e3:.1f} ms per photo = {classify_hse / max(classify_ours, 1e-9):.1f}x")

    figures = {
        "seconds": {k: results.values[k] for k in labels if not k.startswith("thr")},
        "faces_per_s": {k: results.values[k] for k in labels if k.startswith("thr")},
        "ratios": ratios, "default_backend": default,
        "model": what, "image_size": size, "threads": torch.get_num_threads(), "detector": args.detector,
    }
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")
    return figures


if __name__ == "__main__":
    main()
