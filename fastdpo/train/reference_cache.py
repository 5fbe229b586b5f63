"""Precomputed reference log-probs on disk: one safetensors file per ``ReferenceKey`` (the tokenised data, the
reference's weights and config, the layout and packing, the precision), checked on every load and rebuilt when it
does not check out.

A file is trusted only when its recorded fingerprint is the one asked for, it holds one value per pair of the
dataset, and the sha256 of its values matches the one recorded when it was written; anything else (a truncated or
overwritten file, flipped bytes, a file of another run) is reported and recomputed. Files are written whole or not
at all (``fastdpo.models.cache.write_atomically``: a temporary file, fsync, rename), and under a lock per key, so
that of several runs asking for one key at once the first computes it and the others load its file.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import datasets
import torch
from datasets.fingerprint import Hasher
from safetensors import safe_open
from safetensors.torch import save

from ..models import cache_dir, causal_lm
from ..models.cache import entry_lock, write_atomically
from .packed_config import PackedConfig
from .reference import Logps

logger = logging.getLogger(__name__)

_NAMES = ("chosen", "rejected")

DIGEST_CHUNK = 1 << 20   # words hashed per step: the digest's int64 buffers are 8 MiB each
_INTEGERS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}   # by element size
# splitmix64's constants, as the signed 64-bit integers torch multiplies by
_GOLDEN, _MIX1, _MIX2 = (c - (1 << 64) for c in (0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB))


def _digest_keys(device: torch.device) -> torch.Tensor:
    """``DIGEST_CHUNK`` odd pseudo-random int64 keys (splitmix64's mixer over 1, 2, 3, ...) on ``device``."""
    z = torch.arange(1, DIGEST_CHUNK + 1, dtype=torch.int64, device=device).mul_(_GOLDEN)
    z.bitwise_xor_(z >> 30).mul_(_MIX1)
    z.bitwise_xor_(z >> 27).mul_(_MIX2)
    return z.bitwise_xor_(z >> 31).bitwise_or_(1)


def tensor_digest(t: torch.Tensor, keys: torch.Tensor) -> int:
    """A 64-bit digest of ``t``'s bits, computed on its device without copying it: Σ_j w_j·k_j mod 2^64 over each
    chunk of ``DIGEST_CHUNK`` of its elements' bits read as integers w, with the odd ``keys`` k
    (``_digest_keys``), then the chunks' sums digested the same way until one is left. Changing any one element
    always changes it (the change times odd keys is not 0 mod 2^64); several changes cancel by a chance of about
    2^-64. It guards against stale files, not against forgery."""
    words = t.detach().reshape(-1).view(_INTEGERS[t.element_size()])
    if words.numel() == 0:
        return 0
    # one int64 buffer reused by every chunk: fresh temporaries per chunk left the allocator holding hundreds of MiB
    products = torch.empty(min(words.numel(), DIGEST_CHUNK), dtype=torch.int64, device=t.device)
    sums = torch.stack([products[:len(chunk)].copy_(chunk).mul_(keys[:len(chunk)]).sum()
                        for chunk in words.split(DIGEST_CHUNK)])
    return int(sums[0]) % (1 << 64) if sums.numel() == 1 else tensor_digest(sums, keys)


def weights_fingerprint(model: torch.nn.Module, *, exclude_adapters: bool) -> str:
    """sha256 over the name, dtype, shape and ``tensor_digest`` of each tensor of ``model``'s state dict (LoRA
    weights left out for an adapter-disabled reference). Each digest is computed where the tensor lives, one
    chunk at a time: a 7B model on a GPU is not copied to the CPU (14 GB, as a sha256 of its bytes would need)."""
    h, keys = hashlib.sha256(), {}
    for name, t in sorted(model.state_dict().items()):
        if exclude_adapters and "lora_" in name:
            continue
        if t.device not in keys:
            keys[t.device] = _digest_keys(t.device)
        h.update(f"{name} {t.dtype} {tuple(t.shape)} {tensor_digest(t, keys[t.device]):016x}\n".encode())
    return h.hexdigest()


@dataclass(frozen=True)
class ReferenceKey:
    """What shapes a dataset's reference log-probs, so what their cache file is named and checked by
    (``fingerprint``): a change to any field computes another file."""

    data: str                   # the tokenised dataset's fingerprint: its rows, the tokenizer, the truncation
    weights: str                # weights_fingerprint of the reference
    config: str                 # JSON: the model's config and a reference adapter's (RoPE, norm eps, LoRA scaling)
    attention: str              # the attention implementation
    prefix_sharing: bool        # the layout: [prompt][chosen][rejected] or [prompt+chosen][prompt+rejected]
    max_tokens_per_batch: int   # the packing: which pairs share a micro-batch, so the shapes the kernels see
    precision: str              # autocast: bf16, fp16 or fp32
    device: str                 # the device type computing them (its kernels round differently)
    ld_alpha: float | None
    version: int = 3            # of how the values are computed; raising it retires every older file

    @classmethod
    def of(cls, reference: torch.nn.Module, args: PackedConfig, *, data: str, prefix_sharing: bool,
           adapter: bool) -> ReferenceKey:
        """The key of ``reference``: a model, or a PEFT policy whose reference is one of its adapters (``adapter``)
        or its disabled adapters."""
        config = causal_lm(reference).config
        configs = {"model": config.to_dict()}
        if adapter:
            configs["adapters"] = {name: c.to_dict() for name, c in reference.peft_config.items()}
        return cls(data=data, weights=weights_fingerprint(reference, exclude_adapters=not adapter),
                   config=json.dumps(configs, sort_keys=True, default=_jsonable), attention=config._attn_implementation,
                   prefix_sharing=prefix_sharing, max_tokens_per_batch=args.max_tokens_per_batch,
                   precision="bf16" if args.bf16 else "fp16" if args.fp16 else "fp32", device=args.device.type,
                   ld_alpha=getattr(args, "ld_alpha", None))   # DPO's configs; KTO's has no LD-DPO

    @property
    def fingerprint(self) -> str:
        return hashlib.sha256(json.dumps(dataclasses.asdict(self), sort_keys=True).encode()).hexdigest()


def _jsonable(value) -> list | str:
    """Sets (peft's target modules) as sorted lists, anything else JSON lacks (dtypes, enums) as its str."""
    return sorted(value) if isinstance(value, set | frozenset) else str(value)


def cache_path(fingerprint: str) -> Path:
    """``<fastdpo cache>/ref_logps/<fingerprint>.safetensors`` (``$FASTDPO_CACHE``, else ``~/.cache/fastdpo``)."""
    return cache_dir() / "ref_logps" / f"{fingerprint}.safetensors"


def cached_ref_logps(key: ReferenceKey, num_pairs: int, compute: Callable[[], Logps], what: str) -> Logps:
    """The ([B] float32 chosen, [B] float32 rejected) reference log-probs of ``key``: loaded from its cache file,
    or computed by ``compute`` and saved there. Under the key's lock, so a second run asking for the same key
    waits for the first and loads its file; ``what`` names them in the log."""
    fingerprint = key.fingerprint
    path = cache_path(fingerprint)
    with entry_lock(f"ref_logps-{fingerprint}"):
        cached = load_ref_logps(path, fingerprint, num_pairs)
        if cached is not None:
            logger.info("%s: loaded from %s", what, path)
            return cached
        logger.info("%s: computing %d pairs into %s", what, num_pairs, path)
        cached = compute()
        save_ref_logps(path, fingerprint, *cached)
        return cached


def with_cached_ref_logps(dataset: datasets.Dataset, key: ReferenceKey, columns: tuple[str, ...],
                          compute: Callable[[], Logps], accelerator, what: str) -> datasets.Dataset:
    """``dataset`` with ``cached_ref_logps(key, ...)``'s two [N] tensors as ``columns`` (one column: the first
    only), in the order ``compute`` returns them: each machine's main process computes or loads them first, the other
    processes then load its file. The columns' fingerprints derive from the key, so datasets' own cache follows it."""
    with accelerator.local_main_process_first():
        cached = cached_ref_logps(key, len(dataset), compute, what)
    for column, values in zip(columns, cached):
        dataset = dataset.add_column(column, values.tolist(), new_fingerprint=Hasher.hash((key.fingerprint, column)))
    return dataset


def _checksum(chosen: torch.Tensor, rejected: torch.Tensor) -> str:
    h = hashlib.sha256()
    for t in (chosen, rejected):
        h.update(t.contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def save_ref_logps(path: Path, fingerprint: str, chosen: torch.Tensor, rejected: torch.Tensor) -> None:
    """Write [B] float32 chosen/rejected reference log-probs (nats) with their fingerprint and checksum, whole or
    not at all (``write_atomically``; concurrent writers of one path hold its lock, as ``cached_ref_logps`` does)."""
    chosen, rejected = chosen.detach().float().cpu().contiguous(), rejected.detach().float().cpu().contiguous()
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(path, save(dict(zip(_NAMES, (chosen, rejected))),
                                metadata={"fingerprint": fingerprint, "sha256": _checksum(chosen, rejected)}))


def load_ref_logps(path: Path, fingerprint: str, num_pairs: int) -> Logps | None:
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
