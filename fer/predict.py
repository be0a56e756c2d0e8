"""fer-predict: expressions of the faces in photos.

    fer-predict photo.jpg holiday/ "shots/*.png" --checkpoint logs/train/runs/<run>
    fer-predict faces/ --checkpoint best.ckpt --no-detect --json out.json --csv out.csv --output-dir annotated/

Every face of every photo is classified (as the `fer` PyPI package does; `--largest-face` keeps one per
photo). Folders are searched recursively for image files. A photo without a face is reported, not an
error; an unreadable file is named in one line on stderr, the others are still processed, and the exit
code is 1 at the end. Bad input never prints a traceback.
"""

from __future__ import annotations

import argparse
import csv
import glob
import json
import sys
import time
from pathlib import Path
from typing import Iterable

from fer.errors import FERError
from fer.faces import DEFAULT_MARGIN, DETECTOR_HELP, DETECTORS, FaceDetector, check_margin, load_image
from fer.inference import BACKENDS, ImageResult, Predictor, resolve_device
from fer.tta import MODES as TTA_MODES
from fer.utils import err_console

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm"}
CHUNK = 64  # photos per predict() call: bounds memory however many files are given


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="fer-predict", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("paths", nargs="+", metavar="PATH", help="image files, folders (searched recursively) or globs")
    p.add_argument("--checkpoint", "-c", required=True, help="a .ckpt file or a training run directory (its best)")
    p.add_argument("--no-detect", action="store_true", help="each image is one pre-cropped face: no detection")
    faces = p.add_mutually_exclusive_group()
    faces.add_argument("--all-faces", dest="all_faces", action="store_true", default=True,
                       help="classify every face found (default)")
    faces.add_argument("--largest-face", dest="all_faces", action="store_false",
                       help="classify only the largest face of each image")
    p.add_argument("--min-face-size", type=int, default=30, metavar="PX", help="smallest face to detect (default 30)")
    p.add_argument("--detector", choices=DETECTORS, default=FaceDetector.method, help=DETECTOR_HELP)
    p.add_argument("--fallback", choices=("none", "full-image"), default="none",
                   help="when no face is found: report it (none, default) or classify the whole image")
    p.add_argument("--margin", type=float, default=DEFAULT_MARGIN,
                   help=f"context around each face box, as a fraction of its longer side: faces are cropped "
                        f"as squares 1 + 2 * margin times that side (default {DEFAULT_MARGIN}: FER2013's framing)")
    p.add_argument("--image-size", type=int, default=None,
                   help="model input size (default: the size the checkpoint was trained at)")
    p.add_argument("--json", type=Path, metavar="FILE", help="write every result to FILE as JSON")
    p.add_argument("--csv", type=Path, metavar="FILE", help="write one row per face to FILE")
    p.add_argument("--output-dir", type=Path, metavar="DIR",
                   help="save annotated photos and a probability bar chart per face in DIR")
    p.add_argument("--batch-size", type=int, default=None, help="faces per forward pass (default: 32 CPU, 256 GPU)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    p.add_argument("--backend", choices=BACKENDS, default="auto",
                   help="auto (default): on a CPU LiteRT if installed, else ONNX Runtime (exported on the fly and "
                        "checked, or --exported-model), PyTorch on a GPU; or force torch / onnx / litert")
    p.add_argument("--exported-model", "--onnx-model", type=Path, default=None, metavar="FILE",
                   help="a fer-export .onnx or .tflite file of this checkpoint, run instead of exporting it")
    p.add_argument("--tta", choices=TTA_MODES, default="none",
                   help="test-time augmentation as in fer-eval: each face's probabilities averaged over its "
                        "views (flip: 2, shift: 10, shift_rotate: 14, tencrop: 10; default none: 1 view)")
    p.add_argument("--quiet", "-q", action="store_true", help="no table on stdout")
    return p.parse_args(argv)


def expand_inputs(args: Iterable[str]) -> tuple[list[str], list[str]]:
    """(image files, messages for arguments that name nothing). Folders recurse; quoted globs are expanded."""
    files: list[str] = []
    missing: list[str] = []
    for arg in args:
        path = Path(arg)
        if path.is_dir():
            found = sorted(
                str(p) for p in path.rglob("*")
                if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()
                and not any(part.startswith(".") for part in p.relative_to(path).parts)
            )
            if not found:
                missing.append(f"{arg}: no image files in this folder")
            files.extend(found)
        elif path.exists():
            files.append(arg)  # named explicitly: tried whatever its extension
        elif glob.has_magic(arg):
            found = sorted(p for p in glob.glob(arg, recursive=True) if Path(p).is_file())
            if not found:
                missing.append(f"{arg}: no file matches this pattern")
            files.extend(found)
        else:
            missing.append(f"{arg}: no such file or directory")
    return list(dict.fromkeys(files)), missing  # each file once, in order


def print_table(results: list[ImageResult], class_names: list[str]) -> None:
    """One row per face: where it is, its expression, and the runners-up (all seven are in --json/--csv)."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title="fer-predict", header_style="bold")
    table.add_column("image", overflow="fold")
    table.add_column("face", justify="right")
    table.add_column("box x,y,w,h")
    table.add_column("expression")
    table.add_column("next most likely", overflow="fold")
    for result in results:
        if result.error:
            continue  # already on stderr
        if not result.faces:
            table.add_row(result.source, "-", "[yellow]no face found[/]", "", "")
        for i, face in enumerate(result.faces):
            box = ",".join(map(str, face.box)) + ("" if face.detected else " (whole image)")
            ranked = sorted(face.probabilities.items(), key=lambda kv: kv[1], reverse=True)[1:4]
            others = "  ".join(f"{name} {100 * p:.0f}%" for name, p in ranked)
            table.add_row(result.source, str(i), box, f"[bold]{face.label}[/] {100 * face.score:.0f}%", others)
    Console().print(table)


def write_csv(path: Path, results: list[ImageResult], class_names: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["image", "face", "x", "y", "w", "h", "label", "score", *class_names, "detected", "error"])
        for r in results:
            if not r.faces:  # one row per photo without faces, so every input appears in the file
                writer.writerow([r.source, "", "", "", "", "", "", "", *[""] * len(class_names), "", r.error or ""])
            for i, face in enumerate(r.faces):
                writer.writerow([r.source, i, *face.box, face.label, f"{face.score:.6f}",
                                 *[f"{face.probabilities[c]:.6f}" for c in class_names], face.detected, ""])


def write_json(path: Path, results: list[ImageResult], predictor: Predictor, checkpoint: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "checkpoint": checkpoint,
        "classes": predictor.class_names,
        "image_size": predictor.image_size,
        "temperature": predictor.temperature,
        "tta": predictor.tta,
        "images": [r.to_dict() for r in results],
    }
    path.write_text(json.dumps(payload, indent=2) + "\n")


def _unique_stem(source: str, used: set[str]) -> str:
    stem = Path(source).stem or "image"
    candidate, n = stem, 1
    while candidate in used:
        n += 1
        candidate = f"{stem}_{n}"
    used.add(candidate)
    return candidate


def save_pictures(out_dir: Path, result: ImageResult, stem: str) -> None:
    """<stem>_annotated.jpg (boxes, labels, probabilities) and <stem>_face<i>.png bar charts."""
    import matplotlib.pyplot as plt
    from PIL import ImageDraw, ImageFont

    from fer.plots import probabilities_figure

    out_dir.mkdir(parents=True, exist_ok=True)
    image = load_image(result.source).convert("RGB")
    draw = ImageDraw.Draw(image)
    size = max(12, round(min(image.size) / 30))
    font = ImageFont.load_default(size=size)
    for i, face in enumerate(result.faces):
        x, y, w, h = face.box
        width = max(2, round(min(image.size) / 200))
        draw.rectangle([x, y, x + w - 1, y + h - 1], outline=(255, 140, 0), width=width)
        text = f"{i}: {face.label} {100 * face.score:.0f}%"
        left, top, right, bottom = draw.textbbox((x, y), text, font=font)
        ty = y - (bottom - top) - 4 if y - (bottom - top) - 4 >= 0 else y + h + 2
        draw.rectangle([x, ty, x + (right - left) + 6, ty + (bottom - top) + 4], fill=(255, 140, 0))
        draw.text((x + 3, ty + 2 - (top - y)), text, fill=(0, 0, 0), font=font)
        fig = probabilities_figure(face.probabilities, title=f"{Path(result.source).name}, face {i}")
        fig.savefig(out_dir / f"{stem}_face{i}.png")
        plt.close(fig)
    image.save(out_dir / f"{stem}_annotated.jpg", quality=92)


def run(args: argparse.Namespace) -> int:
    # Checked first, so an error names the option as typed (the Predictor checks them again).
    check_margin(args.margin, "--margin")
    resolve_device(args.device, "--device")
    files, missing = expand_inputs(args.paths)
    for line in missing:
        err_console.print(f"[bold red]error:[/] {line}", highlight=False, soft_wrap=True)
    started = time.perf_counter()
    detector = FaceDetector(detect=not args.no_detect, all_faces=args.all_faces, min_face_size=args.min_face_size,
                            method=args.detector)
    predictor = Predictor.from_checkpoint(args.checkpoint, device=args.device, batch_size=args.batch_size,
                                          detector=detector, image_size=args.image_size, margin=args.margin,
                                          fallback=args.fallback, backend=args.backend,
                                          exported_model=args.exported_model, tta=args.tta)
    results: list[ImageResult] = []
    used: set[str] = set()
    for start in range(0, len(files), CHUNK):
        for result in predictor.predict(files[start:start + CHUNK], errors="record"):
            results.append(result)
            if result.error:
                err_console.print(f"[bold red]error:[/] {result.error}", highlight=False, soft_wrap=True)
            elif args.output_dir is not None:
                save_pictures(args.output_dir, result, _unique_stem(result.source, used))
    if not args.quiet:
        print_table(results, predictor.class_names)
    if args.json is not None:
        write_json(args.json, results, predictor, str(args.checkpoint))
    if args.csv is not None:
        write_csv(args.csv, results, predictor.class_names)
    failed = sum(1 for r in results if r.error) + len(missing)
    faces = sum(len(r.faces) for r in results)
    err_console.print(
        f"{len(results)} image(s), {faces} face(s), {failed} failed, {time.perf_counter() - started:.2f} s",
        highlight=False,
    )
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        return run(args)
    except FERError as error:  # a bad checkpoint, or an option the data cannot satisfy: one line
        err_console.print(f"[bold red]error:[/] {error}", highlight=False, soft_wrap=True)
        return 2
    except OSError as error:  # e.g. an output file that cannot be written
        err_console.print(f"[bold red]error:[/] {error}", highlight=False, soft_wrap=True)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
