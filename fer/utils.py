"""Small helpers for the entry points: Hydra config paths, seeding, one-line errors."""

from __future__ import annotations

import functools
import random
import sys
from pathlib import Path
from typing import Any, Callable

from rich.console import Console

from fer.errors import FERError

CONFIG_DIR = str(Path(__file__).resolve().parent.parent / "conf")
err_console = Console(stderr=True)


def resolve_seed(seed: int | None) -> int:
    """The seed to apply: the configured one (0 included), or a fresh one when it is null."""
    return int(seed) if seed is not None else random.SystemRandom().randrange(2**31)


def one_line_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turns FERError (bad data, missing weights, bad checkpoint) into one red line and exit code 2."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except FERError as error:
            err_console.print(f"[bold red]error:[/] {error}", highlight=False, soft_wrap=True)
            sys.exit(2)

    return wrapper
