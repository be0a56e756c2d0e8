"""Training throughput, measured in one run: the framework against the model's ceiling and a seed-style baseline.

    python bench/train_throughput.py                 # FER2013 from ../shared/data/fer2013 (synthetic when absent)
    python bench/train_throughput.py --tiny          # seconds: a smoke test of the script itself

Same model (the configured EfficientNet-Lite0), resolution, batch size, optimiser and intra-op threads:

  (a) model step on ready tensors: forward + loss + backward + AdamW step, channels_last as the framework does
  (a0) the same step with oneDNN's own depthwise weight gradients (model.fast_depthwise_grad=false)
  (ac) with --compile: the same step, torch.compile'd (model.compile=true)
  (b) the framework end to end: `fer.train.train(cfg)` (experiment=fer2013, all default callbacks, logger and
      progress bar), images/s over the steady-state steps (a callback stamps batch ends after the warm-up)
  (bc) with --compile: (b) with model.compile=true; the run's time outside its timed steps, against (b)'s, is
      what compiling the training and validation graphs costs (the first repeat, on a cold inductor cache)
  (c) a seed-style baseline: torchvision ImageFolder + PIL transforms + DataLoader(num_workers=2) + a plain loop
  (d) the framework's data path alone: cache gather + keep_batch collate + BatchAugment, no model
  (e) the seed-style PIL pipeline alone (DataLoader with 2 workers)

(a), (a0), (b) and (c) alternate (with --compile, (ac) and (bc) too), then (d) and (e); each reports its best
repeat (the least disturbed by other work on the machine) and the median. CPU only: this is the machine the
framework's defaults are tuned for.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import shutil
import statistics
import time
from pathlib import Path

# Read before torch is imported: importing Lightning sets it to inductor's default cache for the process.
USER_INDUCTOR_CACHE = os.environ.get("TORCHINDUCTOR_CACHE_DIR")

import _common as C  # noqa: E402  (sets sys.path to the repository)

import lightning as L  # noqa: E402
import torch  # noqa: E402
from hydra.utils import instantiate  # noqa: E402
from omegaconf import OmegaConf, open_dict  # noqa: E402


class StepTimer(L.Callback):
    """Stamps the end of every training batch; instantiated by Hydra from the run's callbacks config."""

    runs: list["StepTimer"] = []

    def __init__(self) -> None:
        self.stamps: list[float] = []
        StepTimer.runs.append(self)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.stamps.append(time.perf_counter())


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", help="FER2013 image-folder root (default ../shared/data/fer2013; synthetic if absent)")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's own)")
    p.add_argument("--steps", type=int, default=30, help="timed steps per run of (a), (b), (c)")
    p.add_argument("--warmup", type=int, default=5, help="steps run before the timing starts")
    p.add_argument("--repeats", type=int, default=2, help="alternating repeats of a, b, c (and of d, e)")
    p.add_argument("--data-batches", type=int, default=150, help="timed batches per run of (d) and (e)")
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers of the seed-style baseline")
    p.add_argument("--compile", action="store_true",
                   help="also time torch.compile: rows (ac) and (bc), its cold compile cost and break-even (minutes)")
    p.add_argument("--tiny", action="store_true", help="a few steps at 32 px on 84 synthetic faces (tests)")
    p.add_argument("--json", type=Path, help="also write the figures to this file")
    p.add_argument("--workdir", help="keep runs, caches and synthetic images here (default: a temp folder)")
    p.add_argument("--verbose", action="store_true", help="show the output of the framework's training runs")
    args = p.parse_args(argv)
    if args.tiny:
        args.image_size, args.batch_size = 32, 16
        args.steps, args.warmup, args.repeats, args.data_batches = 4, 2, 1, 6
    return args


# -- shared setup -------------------------------------------------------------------------------------
def framework_cfg(args, root: Path, out: Path, cache_dir: Path | None):
    overrides = [
        "experiment=fer2013", f"data.root={root}", f"data.image_size={args.image_size}",
        f"data.batch_size={args.batch_size}", "trainer.accelerator=cpu", "trainer.max_epochs=1",
        f"trainer.limit_train_batches={args.warmup + 1 + args.steps}", "trainer.limit_val_batches=2", "seed=0",
    ]
    return C.compose(overrides, out, cache_dir)


def build_model(cfg, **model_overrides):
    """The configured FERClassifier and its optimiser, parameter groups as configure_optimizers makes them."""
    model = instantiate(
        cfg.model, **model_overrides, optimizer=instantiate(cfg.optim.optimizer),
        scheduler=OmegaConf.to_container(cfg.optim.scheduler, resolve=True),
        label_smoothing=cfg.optim.label_smoothing, _convert_="all",
    )
    model.configure_model()  # channels_last (and compile) as Lightning applies them
    model.train()
    decay = [p for p in model.net.parameters() if p.ndim > 1]
    no_decay = [p for p in model.net.parameters() if p.ndim <= 1]
    optimizer = model.optimizer_factory(params=[{"params": decay}, {"params": no_decay, "weight_decay": 0.0}])
    return model, optimizer


def seed_transform(size: int, channels: int, mean, std):
    from torchvision import transforms as T

    return T.Compose([
        T.Grayscale(num_output_channels=channels), T.Resize((size, size)), T.RandomHorizontalFlip(),
        T.RandomRotation(10), T.ToTensor(), T.Normalize(mean, std),
    ])


def seed_loader(root: Path, args, channels: int, mean, std):
    from torch.utils.data import DataLoader
    from torchvision.datasets import ImageFolder

    dataset = ImageFolder(str(root / "train"), transform=seed_transform(args.image_size, channels, mean, std))
    # persistent_workers only spares the tiny runs a worker restart per epoch; steady state is the same.
    return DataLoader(dataset, batch_size=args.batch_size, shuffle=True, num_workers=args.workers,
                      drop_last=True, persistent_workers=args.workers > 0)


def cycle(loader):
    while True:
        yield from loader


# -- the five measurements ----------------------------------------------------------------------------
def measure_model_step(model, optimizer, args, channels: int) -> float:
    x = torch.rand(args.batch_size, channels, args.image_size, args.image_size)
    y = torch.randint(0, 7, (args.batch_size,))
    stamps = []
    for _ in range(args.warmup + 1 + args.steps):
        optimizer.zero_grad(set_to_none=True)
        loss = model._loss(model(x), y)
        loss.backward()
        optimizer.step()
        stamps.append(time.perf_counter())
    return C.steady_rate(stamps, args.warmup, args.batch_size)


def measure_fit(cfg, args) -> tuple[float, float]:
    """(steady images/s, seconds of the whole train() call outside its timed steps: start-up, compiles, validation)."""
    from fer.train import train

    with open_dict(cfg):
        cfg.callbacks.bench_step_timer = {"_target_": "__main__.StepTimer"}
    StepTimer.runs.clear()
    with contextlib.ExitStack() as stack:
        if not args.verbose:
            buffer = io.StringIO()
            stack.enter_context(contextlib.redirect_stdout(buffer))
            stack.enter_context(contextlib.redirect_stderr(buffer))
        start = time.perf_counter()
        train(cfg)
        wall = time.perf_counter() - start
    (timer,) = StepTimer.runs
    timed = timer.stamps[-1] - timer.stamps[args.warmup]
    return C.steady_rate(timer.stamps, args.warmup, args.batch_size), wall - timed


def measure_seed_training(loader, model, optimizer, args) -> float:
    batches = cycle(loader)
    stamps = []
    for _ in range(args.warmup + 1 + args.steps):
        x, y = next(batches)
        optimizer.zero_grad(set_to_none=True)
        logits = model.net(x.contiguous(memory_format=torch.channels_last))  # Normalize ran in the transforms
        loss = model._loss(logits, y)
        loss.backward()
        optimizer.step()
        stamps.append(time.perf_counter())
    return C.steady_rate(stamps, args.warmup, args.batch_size)


class _Training:
    """Stands in for the Trainer in FERDataModule.on_after_batch_transfer: training, so it augments."""

    training = True


def measure_framework_data(dm, args) -> float:
    loader = dm.train_dataloader()  # built before the stand-in trainer is attached: CPU settings
    dm.trainer = _Training()
    try:
        batches = cycle(loader)
        stamps = []
        warmup = 3
        for _ in range(warmup + 1 + args.data_batches):
            images, labels, _ = dm.on_after_batch_transfer(next(batches), 0)
            stamps.append(time.perf_counter())
        return C.steady_rate(stamps, warmup, args.batch_size)
    finally:
        dm.trainer = None


def measure_seed_data(loader, args) -> float:
    batches = cycle(loader)
    stamps = []
    warmup = 3  # the first batches wait for the workers to start
    for _ in range(warmup + 1 + args.data_batches):
        next(batches)
        stamps.append(time.perf_counter())
    return C.steady_rate(stamps, warmup, args.batch_size)


# -- the run ------------------------------------------------------------------------------------------
ROWS = {
    "a": "(a) model step on ready tensors (fwd+bwd+AdamW, channels_last)",
    "a0": "(a0) the same, oneDNN's depthwise weight gradients (fast_depthwise_grad=false)",
    "ac": "(ac) the same as (a), torch.compile'd (model.compile=true)",
    "b": "(b) fer end to end: train() / Trainer.fit, all default callbacks",
    "bc": "(bc) the same as (b) with model.compile=true",
    "c": "(c) seed-style: ImageFolder + PIL transforms, 2 workers, plain loop",
    "d": "(d) fer data path alone: cache gather + BatchAugment",
    "e": "(e) seed-style PIL pipeline alone, 2 workers",
}


def main(argv=None) -> dict:
    args = parse_args(argv)
    C.prepare(args)
    console = C.console()
    work = C.workdir(args.workdir)
    if args.compile and USER_INDUCTOR_CACHE is None:
        # A cache of its own, so the first compile is a cold one, as in a user's first run.
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(work / "inductor_cache")
    try:
        return measure(args, console, work)
    finally:
        if not args.workdir:  # runs, checkpoints, synthetic images, compiled kernels: nothing is left behind
            shutil.rmtree(work, ignore_errors=True)


def measure(args, console, work: Path) -> dict:
    root, described = C.bench_data(args.data, args.tiny, work)
    real = C.fer2013_root(args.data) == root
    cache_dir = None if real else work / "cache"  # FER2013: the user's cache, decoded once for every run

    console.print(f"[bold]training throughput[/]: {described}", soft_wrap=True)
    console.print(f"{args.image_size} px, batch {args.batch_size}, {args.steps} timed steps after {args.warmup} "
                  f"warm-up, {args.repeats} alternating repeats; {C.machine_line()}", soft_wrap=True)

    base_cfg = framework_cfg(args, root, work / "cfg", cache_dir)
    channels = int(base_cfg.data.channels)
    dm = instantiate(base_cfg.data, _convert_="all")
    dm.prepare_data()  # decode the cache now, outside every timing
    dm.setup("fit")
    model_a, opt_a = build_model(base_cfg)
    model_a0, opt_a0 = build_model(base_cfg, fast_depthwise_grad=False)
    rows = [k for k in ROWS if args.compile or k not in ("ac", "bc")]
    outside_s: dict[str, list[float]] = {"b": [], "bc": []}  # seconds of each fit outside its timed steps
    model_ac, opt_ac = build_model(base_cfg, compile=True) if args.compile else (None, None)
    mean, std = model_a.hparams["mean"], model_a.hparams["std"]
    model_c, opt_c = build_model(base_cfg)
    loader_c = seed_loader(root, args, channels, mean, std)

    results = C.Repeats()
    for rep in range(args.repeats):
        results.add("a", measure_model_step(model_a, opt_a, args, channels))
        results.add("a0", measure_model_step(model_a0, opt_a0, args, channels))
        if args.compile:
            # (bc) before (ac): the first repeat's fit compiles from a cold cache, as a user's first run does.
            # Later fits find the graphs compiled in this process: only (bc)'s first repeat shows the full cost.
            cfg_c = framework_cfg(args, root, work / f"fitc{rep}", cache_dir)
            with open_dict(cfg_c):
                cfg_c.model.compile = True
            rate, outside = measure_fit(cfg_c, args)
            results.add("bc", rate)
            outside_s["bc"].append(outside)
            results.add("ac", measure_model_step(model_ac, opt_ac, args, channels))
        rate, outside = measure_fit(framework_cfg(args, root, work / f"fit{rep}", cache_dir), args)
        results.add("b", rate)
        outside_s["b"].append(outside)
        results.add("c", measure_seed_training(loader_c, model_c, opt_c, args))
        done = "  ".join(f"{k} {results.values[k][-1]:.1f}" for k in rows if k in results.values)
        console.print(f"  repeat {rep + 1}: {done} images/s")
    del loader_c
    loader_e = seed_loader(root, args, channels, mean, std)
    for _ in range(args.repeats):
        results.add("d", measure_framework_data(dm, args))
        results.add("e", measure_seed_data(loader_e, args))
    del loader_e

    from rich.table import Table

    table = Table(title=f"training throughput, images/s ({args.image_size} px, batch {args.batch_size})")
    table.add_column("what")
    table.add_column("best", justify="right")
    table.add_column("median", justify="right")
    table.add_column("repeats", justify="right")
    for key in rows:
        label = ROWS[key]
        table.add_row(label, f"{results.best(key):,.1f}", f"{results.median(key):,.1f}",
                      " ".join(f"{v:,.0f}" for v in results.values[key]))
    console.print(table)

    b_a = results.best("b") / results.best("a")
    a_a0 = results.best("a") / results.best("a0")
    b_c = results.best("b") / results.best("c")
    d = results.best("d")
    d_e = results.best("d") / results.best("e")
    console.print(f"a/a0 = {a_a0:.2f}   (tap-sum depthwise weight gradients / oneDNN's, the same step; target > 1: "
                  f"{C.verdict(a_a0, 1.0)})")
    console.print(f"b/a = {b_a:.3f}   (framework / model-step ceiling; target >= 0.95: {C.verdict(b_a, 0.95)})")
    console.print(f"b/c = {b_c:.2f}    (framework / seed-style baseline; target >= 1.0: {C.verdict(b_c, 1.0)})")
    console.print(f"d   = {d:,.0f} images/s (data path alone; target >= 10,000: {C.verdict(d, 10_000)})")
    console.print(f"d/e = {d_e:.1f}    (data path / seed-style PIL pipeline; target >= 5: {C.verdict(d_e, 5)})")
    per_rep = [b / a for a, b in zip(results.values["a"], results.values["b"])]
    console.print("b/a per repeat: " + ", ".join(f"{r:.3f}" for r in per_rep))
    ratios = {"a/a0": a_a0, "b/a": b_a, "b/c": b_c, "d/e": d_e}
    if args.compile:
        ratios.update(report_compile(console, results, outside_s))

    figures = {
        "images_per_s": {k: results.values[k] for k in rows},
        "ratios": ratios,
        "seconds_outside_timed_steps": {k: v for k, v in outside_s.items() if v},
        "image_size": args.image_size, "batch_size": args.batch_size, "threads": torch.get_num_threads(),
        "data": described,
    }
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")
    return figures


def report_compile(console, results: C.Repeats, seconds: dict[str, list[float]]) -> dict[str, float]:
    """Compiled against eager, per repeat (alternated, so each pair saw the same machine), and the break-even."""
    ac_a = [c / e for c, e in zip(results.values["ac"], results.values["a"])]
    bc_b = [c / e for c, e in zip(results.values["bc"], results.values["b"])]
    cold = seconds["bc"][0] - seconds["b"][0]
    console.print(f"ac/a per repeat: {', '.join(f'{r:.3f}' for r in ac_a)}   (compiled / eager model step)")
    console.print(f"bc/b per repeat: {', '.join(f'{r:.3f}' for r in bc_b)}   (compiled / eager fer-train steps)")
    cache = "a cold cache" if USER_INDUCTOR_CACHE is None else f"the cache in {USER_INDUCTOR_CACHE}"
    console.print(f"compiling costs a fer-train run {cold:.0f} s from {cache} (the first repeat's time outside its "
                  "timed steps, bc - b)")
    gain = statistics.median(bc_b)
    if gain > 1:
        # Compiled training catches up once the time saved per second of eager training repays the overhead.
        console.print(f"break-even at the median bc/b ({gain:.3f}): after {cold / (1 - 1 / gain) / 60:.1f} minutes "
                      "of eager training")
    else:
        console.print(f"median bc/b = {gain:.3f}: compiled fer-train steps are no faster here, compiling never pays")
    return {"ac/a": statistics.median(ac_a), "bc/b": gain, "compile_s_cold": cold}


if __name__ == "__main__":
    main()
