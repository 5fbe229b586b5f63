"""A test that needs the shared model or data (../shared) skips, naming what is missing, where it is absent, instead of
erroring: the guard sits in the shared helpers (``_shared.require``, ``smollm2_tokenizer``, the ``smollm2_cache``
fixture), so a test cannot forget it."""

import pytest

import _shared


def test_a_missing_shared_file_skips_with_its_path(tmp_path, monkeypatch):
    monkeypatch.setattr(_shared, "SMOLLM2_GGUF", tmp_path / "absent.gguf")
    _shared.smollm2_tokenizer.cache_clear()
    with pytest.raises(pytest.skip.Exception, match="the shared SmolLM2 GGUF not present at .*absent.gguf"):
        _shared.smollm2_tokenizer()
