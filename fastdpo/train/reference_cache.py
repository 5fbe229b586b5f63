"""Precomputed reference log-probs on disk: one safetensors file per fingerprint of (tokenised data,
reference weights, options), checked on every load and rebuilt when it does not check out.

A file is trusted only when its recorded fingerprint is the one asked for, it holds one value per pair
of the dataset, and the sha256 of its values matches the one recorded when it was written; anything
else (a truncated or overwritten file, flipped bytes, a file of another run) is reported and recomputed.
Files are written to a temporary name and renamed into place, so a killed writer leaves no half file.
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..models import cache_dir

logger = logging.getLogger(__name__)

_NAMES = ("chosen", "rejected")


def model_fingerprint(model: torch.nn.Module, *, exclude_adapters: bool) -> str:
    """sha256 over parameter names and bytes (LoRA weights left out for an adapter-disabled reference)."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        if exclude_adapters and "lora_" in name:
            continue
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def cache_path(fingerprint: str) -> Path:
    """``<fastdpo cache>/ref_logps/<fingerprint>.safetensors`` (``$FASTDPO_CACHE``, else ``~/.cache/fastdpo``)."""
    return cache_dir() / "ref_logps" / f"{fingerprint}.safetensors"


def _checksum(chosen: torch.Tensor, rejected: torch.Tensor) -> str:
    h = hashlib.sha256()
    for t in (chosen, rejected):
        h.update(t.contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def save_ref_logps(path: Path, fingerprint: str, chosen: torch.Tensor, rejected: torch.Tensor) -> None:
    """Write [B] float32 chosen/rejected reference log-probs (nats) with their fingerprint and checksum,
    atomically (temporary file + rename)."""
    chosen, rejected = chosen.detach().float().cpu().contiguous(), rejected.detach().float().cpu().contiguous()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    save_file(dict(zip(_NAMES, (chosen, rejected))), tmp,
              metadata={"fingerprint": fingerprint, "sha256": _checksum(chosen, rejected)})
    os.replace(tmp, path)


def load_ref_logps(path: Path, fingerprint: str, num_pairs: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The cached ([B] float32 chosen, [B] float32 rejected) reference log-probs, or None when there is no
    file or it does not check out (a warning names the reason; the caller recomputes and overwrites it).
    Only safetensors is read: nothing in the file can execute."""
    if not path.exists():
        return None
    try:
        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
            chosen, rejected = (f.get_tensor(name) for name in _NAMES)
    except Exception as e:   # truncated or overwritten: safetensors' own errors vary with the damage
        return _rejected(path, f"unreadable ({type(e).__name__}: {e})")
    if meta.get("fingerprint") != fingerprint:
        return _rejected(path, f"fingerprint {meta.get('fingerprint')!r} is not {fingerprint!r}")
    if not chosen.shape == rejected.shape == (num_pairs,) or chosen.dtype != torch.float32:
        return _rejected(path, f"holds {tuple(chosen.shape)} {chosen.dtype} values for {num_pairs} pairs")
    if meta.get("sha256") != _checksum(chosen, rejected):
        return _rejected(path, "its values do not match their recorded sha256")
    return chosen, rejected


def _rejected(path: Path, reason: str) -> None:
    logger.warning("reference log-prob cache %s is corrupted: %s; recomputing it", path, reason)
    return None
