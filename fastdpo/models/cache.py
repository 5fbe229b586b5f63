"""fastdpo's cache directory (``$FASTDPO_CACHE``, else ``~/.cache/fastdpo``), which holds the default model, converted
GGUF checkpoints and precomputed reference log-probs; the file digest its entries are named and checked by; and the
two things a writer of an entry needs when runs share the directory: a lock per entry and an atomic write."""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

CHUNK_BYTES = 1 << 20   # of a file read while hashing it

logger = logging.getLogger(__name__)


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


@contextmanager
def entry_lock(name: str) -> Iterator[None]:
    """Hold the exclusive lock ``<cache>/locks/<name>.lock`` (``fcntl.flock``) while the block runs; another process
    asking for the same name waits until it ends. The kernel drops a lock when its holder exits, SIGKILL included,
    so a killed run never leaves the next one waiting. The empty lock files stay: deleting one while another
    process waits on it would let a third lock a new file of the same name."""
    path = cache_dir() / "locks" / f"{name}.lock"
    path.parent.mkdir(exist_ok=True)
    with open(path, "a") as f:   # closing it releases the lock
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            logger.info("waiting for another run that holds %s", path)
            fcntl.flock(f, fcntl.LOCK_EX)
        yield


def write_atomically(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` whole or not at all: into ``.<name>.tmp`` beside it, flushed to the disk (fsync),
    renamed over ``path``, and the rename flushed too (fsync of the directory), so that neither a killed process
    nor a crash of the machine leaves a partial ``path``. Writers of one path share the temporary name, so they
    hold its ``entry_lock``; a killed writer's temporary file is overwritten by the next one."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)
