"""Precomputed reference log-probs: one cache file per fingerprint, damaged files detected and rebuilt."""

import logging

import pytest
import torch

from _shared import config, lora, pairs, tiny_llama
from fastdpo import DPOTrainer
from fastdpo.train.reference_cache import cache_path, load_ref_logps, save_ref_logps

FINGERPRINT = "f" * 16


@pytest.fixture
def saved(tmp_path):
    g = torch.Generator().manual_seed(0)
    chosen, rejected = -10 * torch.rand(7, generator=g), -10 * torch.rand(7, generator=g)
    path = tmp_path / "ref.safetensors"
    save_ref_logps(path, FINGERPRINT, chosen, rejected)
    return path, chosen, rejected


def test_round_trip(saved):
    path, chosen, rejected = saved
    got = load_ref_logps(path, FINGERPRINT, 7)
    assert torch.equal(got[0], chosen) and torch.equal(got[1], rejected)
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]    # no temporary file left


def flip_last_value_byte(path):
    data = bytearray(path.read_bytes())
    data[-2] ^= 0x40          # inside the last float: the file still parses
    path.write_bytes(bytes(data))


def truncate(path):
    path.write_bytes(path.read_bytes()[:-5])


def garbage(path):
    path.write_bytes(b"\x00not a safetensors file")


@pytest.mark.parametrize("damage, reason", [(flip_last_value_byte, "sha256"), (truncate, "unreadable"),
                                            (garbage, "unreadable")])
def test_damaged_file_is_detected(saved, damage, reason, caplog):
    path = saved[0]
    damage(path)
    with caplog.at_level(logging.WARNING, logger="fastdpo.train.reference_cache"):
        assert load_ref_logps(path, FINGERPRINT, 7) is None
    assert "corrupted" in caplog.text and reason in caplog.text and str(path) in caplog.text


def test_file_of_another_fingerprint_or_size_is_not_used(saved, caplog):
    path = saved[0]
    with caplog.at_level(logging.WARNING, logger="fastdpo.train.reference_cache"):
        assert load_ref_logps(path, "0" * 16, 7) is None
        assert load_ref_logps(path, FINGERPRINT, 8) is None
    assert "fingerprint" in caplog.text and "for 8 pairs" in caplog.text
    assert load_ref_logps(path.with_name("absent.safetensors"), FINGERPRINT, 7) is None


def precompute(tmp_path, data):
    model = lora(tiny_llama(seed=4), seed=5)
    trainer = DPOTrainer(model, args=config(tmp_path, precompute_ref_log_probs=True, max_tokens_per_batch=60),
                         train_dataset=data)
    return [trainer.train_dataset[c] for c in ("ref_chosen_logps", "ref_rejected_logps")]


def test_trainer_computes_once_then_loads_and_rebuilds_a_corrupted_cache(tmp_path, fastdpo_cache, monkeypatch,
                                                                         caplog):
    calls = []
    compute = DPOTrainer._compute_reference
    monkeypatch.setattr(DPOTrainer, "_compute_reference",
                        lambda self, *a: calls.append(1) or compute(self, *a))
    data = pairs(6, seed=1)
    first = precompute(tmp_path, data)
    files = list((fastdpo_cache / "ref_logps").iterdir())
    assert len(calls) == 1 and len(files) == 1
    assert precompute(tmp_path, data) == first and len(calls) == 1        # a cache hit
    flip_last_value_byte(files[0])
    with caplog.at_level(logging.WARNING, logger="fastdpo.train.reference_cache"):
        rebuilt = precompute(tmp_path, data)
    assert len(calls) == 2 and "corrupted" in caplog.text
    assert rebuilt == first and load_ref_logps(files[0], files[0].stem, 6) is not None   # rewritten whole
    assert precompute(tmp_path, pairs(6, seed=2)) != first and len(calls) == 3     # other data, other file
    assert files[0] == cache_path(files[0].stem)
