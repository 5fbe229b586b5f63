import os

import pytest
import torch

# The Triton kernels run on the CPU through the interpreter; it must be chosen before triton is
# first imported. On a GPU machine the kernels run natively.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="session")
def smollm2_cache(tmp_path_factory):
    """A fastdpo cache holding the one conversion of the shared SmolLM2 GGUF made in this test session."""
    from _shared import SMOLLM2_DIR, SMOLLM2_GGUF, require
    from fastdpo.models import ModelSource, gguf_checkpoint

    require(SMOLLM2_GGUF, "the shared SmolLM2 GGUF")
    cache = tmp_path_factory.mktemp("smollm2-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FASTDPO_CACHE", str(cache))
        gguf_checkpoint(ModelSource(str(SMOLLM2_DIR), SMOLLM2_GGUF.name))
    return cache


@pytest.fixture(autouse=True)
def fastdpo_cache(tmp_path, monkeypatch):
    """Every test writes fastdpo's caches (reference log-probs, converted checkpoints) to its own directory,
    never to the user's; tests that need the converted SmolLM2 point $FASTDPO_CACHE at ``smollm2_cache``."""
    cache = tmp_path / "fastdpo-cache"
    monkeypatch.setenv("FASTDPO_CACHE", str(cache))
    return cache
