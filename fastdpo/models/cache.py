"""fastdpo's cache directory (``$FASTDPO_CACHE``, else ``~/.cache/fastdpo``), which holds the default model, converted
GGUF checkpoints and precomputed reference log-probs; and the file digest its entries are named and checked by."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

CHUNK_BYTES = 1 << 20   # of a file read while hashing it


def cache_dir() -> Path:
    """``$FASTDPO_CACHE``, else ``~/.cache/fastdpo``; created if missing."""
    path = Path(os.environ.get("FASTDPO_CACHE") or Path.home() / ".cache" / "fastdpo").expanduser()
    path.mkdir(parents=True, exist_ok=True)
    return path


def file_sha256(path: Path) -> str:
    """The hex sha256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()
