"""Where the policy and reference models come from: a user's model argument resolved to a ``ModelSource`` (a local
checkpoint, a GGUF file, a hub id, or the default model of ``fastdpo.models.smollm2``)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .smollm2 import default_model


@dataclass(frozen=True)
class ModelSource:
    """Where to load a model from.

    Attributes:
        path: a local directory, or a Hugging Face Hub id.
        gguf_file: the file name inside ``path`` when the weights are GGUF, else None.
    """

    path: str
    gguf_file: str | None


def resolve_model(name_or_path: str | None) -> ModelSource:
    """Turn a user's model argument into a ``ModelSource``.

    None is the default model (``default_model()``). A .gguf file, or a directory holding exactly
    one .gguf and no config.json, is GGUF; a directory with config.json is a regular checkpoint.
    Anything that does not look like a local path passes through as a Hub id.

    Raises:
        FileNotFoundError: a path-like string (starting with ``.``, ``/`` or ``~``, ending in
            ``.gguf``, or whose parent directory exists) that does not exist, or a directory with
            neither config.json nor a .gguf file.
        ValueError: a file that is not .gguf, or a directory with several .gguf files and no config.json.
        RuntimeError: as ``default_model``.
    """
    if name_or_path is None:
        path = default_model()
        return ModelSource(str(path.parent.resolve()), path.name)
    path = Path(name_or_path).expanduser()
    if path.is_file():
        if path.suffix != ".gguf":
            raise ValueError(f"{name_or_path!r} is a file but not .gguf; pass a checkpoint directory or a .gguf file")
        return ModelSource(str(path.parent.resolve()), path.name)
    if path.is_dir():
        return _resolve_dir(path.resolve())
    if _looks_local(name_or_path, path):
        raise FileNotFoundError(f"model path {name_or_path!r} does not exist")
    return ModelSource(name_or_path, None)


def _resolve_dir(path: Path) -> ModelSource:
    if (path / "config.json").is_file():
        return ModelSource(str(path), None)
    ggufs = sorted(p.name for p in path.glob("*.gguf"))
    if len(ggufs) == 1:
        return ModelSource(str(path), ggufs[0])
    if not ggufs:
        raise FileNotFoundError(f"{str(path)!r} holds neither config.json nor a .gguf file")
    raise ValueError(f"{str(path)!r} holds several .gguf files ({', '.join(ggufs)}); pass one file's path")


def _looks_local(name: str, path: Path) -> bool:
    # A Hub id is "name" or "org/name"; a missing "org" directory keeps it a Hub id, while an
    # existing parent means the user meant a path here and mistyped its last part.
    parent_exists = path.parent != Path(".") and path.parent.exists()
    return name.startswith((".", "/", "~")) or path.suffix == ".gguf" or parent_exists
