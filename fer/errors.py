"""User-facing errors: each carries one line that names the file, row or key at fault."""


class FERError(Exception):
    """Base class for errors the command-line entry points print as a single line (no traceback)."""


class DataError(FERError, ValueError):
    """Bad input data: a corrupt image, an unknown class, a malformed CSV row, an empty folder."""


class WeightsError(FERError, RuntimeError):
    """Pretrained weights that cannot be had (offline hub, missing package, unreadable file)."""


class CheckpointError(FERError, ValueError):
    """A checkpoint that is missing, corrupt, not a fer checkpoint, or for another number of classes."""


class ConfigError(FERError, ValueError):
    """A config value out of range or unknown (`optim.gce_q=0`, `resume=typo`): names the key and what it expects."""
