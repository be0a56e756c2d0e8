"""Small helpers for the entry points: Hydra config paths, seeding, one-line errors."""

from __future__ import annotations

import functools
import random
import sys
from pathlib import Path
from typing import Any, Callable

from rich.console import Console

from fer.errors import FERError
from fer.resume import register_resolvers

register_resolvers()  # ${fer.run_dir:...} in conf/hydra/default.yaml, needed before Hydra composes
CONFIG_DIR = str(Path(__file__).resolve().parent.parent / "conf")
err_console = Console(stderr=True)


def resolve_seed(seed: int | None) -> int:
    """The seed to apply: the configured one (0 included), or a fresh one when it is null."""
    return int(seed) if seed is not None else random.SystemRandom().randrange(2**31)


def fer_error(error: BaseException) -> FERError | None:
    """The FERError behind `error`: itself, or the cause Hydra's instantiate wrapped it in."""
    seen = 0
    while error is not None and seen < 5:
        if isinstance(error, FERError):
            return error
        error, seen = error.__cause__, seen + 1
    return None


def one_line(error: BaseException, limit: int | None = 300) -> str:
    """`Type: first line` of an error (its FERError cause when Hydra wrapped one), cut at `limit` characters."""
    inner = fer_error(error) or error
    lines = [line.strip() for line in str(inner).strip().splitlines() if line.strip()]
    text = lines[0][:limit] if lines else ""
    return f"{type(inner).__name__}: {text}" if text else type(inner).__name__


def one_line_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turns FERError (bad data, missing weights, bad checkpoint) into one red line and exit code 2.

    Also when Hydra's instantiate wrapped it (a bad `data.on_bad=` value raises inside FERDataModule()).
    """

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except Exception as error:
            inner = fer_error(error)
            if inner is None:
                raise
            err_console.print(f"[bold red]error:[/] {inner}", highlight=False, soft_wrap=True)
            sys.exit(2)

    return wrapper
