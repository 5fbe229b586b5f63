"""Input checks run before any kernel launch, so bad input fails with a ValueError naming the
problem instead of a device-side assert or silent garbage."""

from __future__ import annotations

import torch

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def check_float(name: str, t: torch.Tensor, ndim: int) -> None:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(t.shape)}")
    if t.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{name} must be float32, bfloat16 or float16, got {t.dtype}")


def check_labels(labels: torch.Tensor, shape: tuple[int, ...], device: torch.device) -> None:
    if not isinstance(labels, torch.Tensor):
        raise ValueError(f"labels must be a torch.Tensor, got {type(labels).__name__}")
    if labels.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"labels must be int64 (or int32), got {labels.dtype}")
    if tuple(labels.shape) != tuple(shape):
        raise ValueError(f"labels must have shape {tuple(shape)}, got {tuple(labels.shape)}")
    check_device("labels", labels, device)


def check_device(name: str, t: torch.Tensor, device: torch.device) -> None:
    if t.device != device:
        raise ValueError(f"{name} is on {t.device} but the inputs are on {device}")


def valid_positions(labels: torch.Tensor, ignore_index: int, vocab_size: int) -> torch.Tensor:
    """Flat indices of the positions whose label is not ``ignore_index``.

    Raises:
        ValueError: a label outside [0, vocab_size) other than ``ignore_index`` (names its position).
    """
    flat = labels.reshape(-1)
    rows = (flat != ignore_index).nonzero().squeeze(1)
    if rows.numel():
        lo, hi = torch.aminmax(flat[rows])
        if lo.item() < 0 or hi.item() >= vocab_size:
            bad = rows[((flat[rows] < 0) | (flat[rows] >= vocab_size)).nonzero()[0, 0]].item()
            position = tuple(int(i) for i in torch.unravel_index(torch.tensor(bad), labels.shape))
            raise ValueError(
                f"label {int(flat[bad])} at position {position} is outside the vocabulary [0, {vocab_size}) "
                f"and is not ignore_index={ignore_index}"
            )
    return rows
