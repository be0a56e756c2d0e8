"""The seven expression classes in FER2013 label order, and the aliases other datasets use for them."""

from __future__ import annotations

from fer.errors import DataError

CLASSES: tuple[str, ...] = ("angry", "disgust", "fear", "happy", "sad", "surprise", "neutral")
NUM_CLASSES = len(CLASSES)
CLASS_TO_INDEX = {name: i for i, name in enumerate(CLASSES)}

# Folder names seen in RAF-DB, AffectNet exports, CK+, KDEF and users' own trees.
ALIASES: dict[str, str] = {
    "anger": "angry", "angry": "angry", "mad": "angry",
    "disgust": "disgust", "disgusted": "disgust", "disgusting": "disgust",
    "fear": "fear", "fearful": "fear", "afraid": "fear", "scared": "fear",
    "happy": "happy", "happiness": "happy", "joy": "happy", "happily": "happy",
    "sad": "sad", "sadness": "sad",
    "surprise": "surprise", "surprised": "surprise", "suprise": "surprise",
    "neutral": "neutral", "neutrality": "neutral", "calm": "neutral",
}


def canonical(name: str) -> str | None:
    """Canonical class for a folder or label name (case, spaces and dashes ignored), or None if unknown."""
    key = name.strip().lower().replace("-", "").replace("_", "").replace(" ", "")
    return ALIASES.get(key)


def class_index(name: str, where: str = "", ignore: frozenset[str] | set[str] = frozenset()) -> int | None:
    """Index of `name` in CLASSES; None when listed in `ignore`; DataError naming `where` otherwise."""
    if ignored(name, ignore):
        return None
    found = canonical(name)
    if found is not None:
        return CLASS_TO_INDEX[found]
    raise DataError(
        f"{where or name}: unknown expression class {name!r}; expected one of {', '.join(CLASSES)} "
        f"(or an alias such as anger, happiness, sadness), or list it in data.source.ignore_classes"
    )


def ignored(name: str, ignore: frozenset[str] | set[str]) -> bool:
    """Whether a folder `name` is left out by `ignore`: by its own name (any case), or by its class, so that
    [disgust] also drops disgusted/ (checked before the aliases, which would otherwise keep it)."""
    raw, found = name.strip().lower(), canonical(name)
    return any(i.strip().lower() == raw or (found is not None and canonical(i) == found) for i in ignore)
