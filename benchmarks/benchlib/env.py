"""What a result was measured on: device, library versions, git revision, date."""

from __future__ import annotations

import os
import platform
import subprocess
import time
from importlib.metadata import PackageNotFoundError, version

from .paths import REPO_DIR

PACKAGES = ("fastdpo", "torch", "triton", "transformers", "accelerate", "peft", "datasets", "trl", "liger-kernel",
            "cut-cross-entropy")


def package_version(package: str) -> str:
    try:
        return version(package)
    except PackageNotFoundError:
        if package == "fastdpo":    # a plain copy on PYTHONPATH, not installed: its own version string
            import fastdpo

            return f"{fastdpo.__version__} (plain copy)"
        return "not installed"


def default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def device_name(device: str) -> str:
    import torch

    if device == "cuda":
        return torch.cuda.get_device_name()
    return f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"


def git_revision() -> str:
    """Short hash of HEAD, with ``+dirty`` when tracked files differ from it; "unknown" in a plain copy of the
    repository or where git is not installed (the GPU machine may have neither)."""
    def git(*args):
        try:
            return subprocess.run(["git", *args], capture_output=True, text=True, cwd=REPO_DIR).stdout.strip()
        except OSError:
            return ""

    rev = git("rev-parse", "--short", "HEAD") or "unknown"
    return rev + ("+dirty" if git("status", "--porcelain", "--untracked-files=no") else "")


def metadata(device: str) -> dict:
    return {
        "device": device_name(device),
        "device_type": device,
        **{name: package_version(name) for name in PACKAGES},
        "git": git_revision(),
        "date": time.strftime("%Y-%m-%d %H:%M"),
        # other work on a shared machine shows here; timings taken under load are not comparable
        "load_avg_1min": os.getloadavg()[0],
    }


def header(meta: dict) -> str:
    """One markdown line naming the device, the versions and the revision."""
    versions = " · ".join(f"{name} {meta[name]}" for name in PACKAGES if name in meta)
    load = f" · load average {meta['load_avg_1min']:.1f} at the start" if "load_avg_1min" in meta else ""
    return f"Device: {meta['device']} · {versions} · git {meta['git']} · {meta['date']}{load}"
