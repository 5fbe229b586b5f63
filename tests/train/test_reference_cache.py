"""Precomputed reference log-probs: one cache file per fingerprint (of the weights, hashed where they are, the
layout and the packing), damaged files detected and rebuilt, a killed writer's file never trusted, two runs at
once computing it once."""

import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from _shared import config, lora, pairs, tiny_llama
from fastdpo import DPOTrainer
from fastdpo.train.reference_cache import cache_path, load_ref_logps, save_ref_logps

TESTS = Path(__file__).resolve().parents[1]

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


def precompute(tmp_path, data, **kw):
    model = lora(tiny_llama(seed=4), seed=5)
    args = config(tmp_path, precompute_ref_log_probs=True, **{"max_tokens_per_batch": 60, **kw})
    trainer = DPOTrainer(model, args=args, train_dataset=data)
    return [list(trainer.train_dataset[c]) for c in ("ref_chosen_logps", "ref_rejected_logps")]


@pytest.fixture
def calls(monkeypatch):
    """Each computation of reference log-probs by a DPOTrainer of this process, appended."""
    calls = []
    compute = DPOTrainer._compute_reference
    monkeypatch.setattr(DPOTrainer, "_compute_reference",
                        lambda self, *a: calls.append(1) or compute(self, *a))
    return calls


def test_trainer_computes_once_then_loads_and_rebuilds_a_corrupted_cache(tmp_path, fastdpo_cache, calls, caplog):
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


def test_layout_and_packing_compute_their_own_file(tmp_path, fastdpo_cache, calls):
    """Each layout and token budget rounds the same log-probs its own way: each is its own file."""
    data = pairs(6, seed=1)
    shared = precompute(tmp_path, data)
    unshared = precompute(tmp_path, data, prefix_sharing=False)
    smaller = precompute(tmp_path, data, max_tokens_per_batch=30)
    assert len(calls) == 3 and len(list((fastdpo_cache / "ref_logps").iterdir())) == 3
    for other in (unshared, smaller):
        assert torch.allclose(torch.tensor(other), torch.tensor(shared), rtol=1e-5)


def test_fingerprint_sees_every_weight(monkeypatch):
    from fastdpo.train import reference_cache

    monkeypatch.setattr(reference_cache, "DIGEST_CHUNK", 1000)   # many chunks a tensor: the chunks' keys count too
    model = tiny_llama(seed=0)
    fingerprint = lambda: reference_cache.weights_fingerprint(model, exclude_adapters=True)
    base = fingerprint()
    bits = model.model.embed_tokens.weight.data.view(-1).view(torch.int32)     # 3,145,728 fp32 words
    for i in (0, 999, 1_500_000, bits.numel() - 1):
        bits[i] ^= 1                                      # the lowest mantissa bit of one weight
        assert fingerprint() != base, i
        bits[i] ^= 1
    for i, j in ((3, 7), (5, 1005)):                      # two weights swapped: in one chunk, across two
        bits[[i, j]] = bits[[j, i]]
        assert fingerprint() != base, (i, j)
        bits[[i, j]] = bits[[j, i]]
    assert fingerprint() == base
    assert reference_cache.weights_fingerprint(model.to(torch.bfloat16), exclude_adapters=True) != base


PEAK_WHILE_HASHING = """
import resource, torch
from fastdpo.train.reference_cache import weights_fingerprint
model = torch.nn.Linear(8192, 8192, bias=False)      # 256 MiB of fp32 weights
peak_mib = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
before = peak_mib()
weights_fingerprint(model, exclude_adapters=True)
print(peak_mib() - before)
"""


def test_fingerprint_does_not_copy_the_weights():
    """Hashed in place, chunk by chunk: the peak memory grows by a few chunks, not by the weights (on a GPU, the
    CPU sees none of them)."""
    proc = subprocess.run([sys.executable, "-c", PEAK_WHILE_HASHING], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert float(proc.stdout) < 128, f"the peak grew by {float(proc.stdout):.0f} MiB hashing 256 MiB of weights"


# a write of the cache file held just before its rename, touching the file named by argv[2], until it is killed
KILLED_WRITER = """
import os, sys, time, torch
from pathlib import Path
from fastdpo.train.reference_cache import save_ref_logps
def stalled(src, dst):
    open(sys.argv[2], "w").close()
    time.sleep(600)
os.replace = stalled
save_ref_logps(Path(sys.argv[1]), "f" * 16, torch.zeros(7), torch.ones(7))
"""


def test_a_writer_killed_mid_write_leaves_no_file_to_trust(tmp_path):
    path, stalled = tmp_path / "cache" / "ref.safetensors", tmp_path / "stalled"
    proc = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, str(path), str(stalled)])
    deadline = time.time() + 300
    while not stalled.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    proc.kill()                                                           # SIGKILL
    proc.wait()
    assert stalled.exists() and list(path.parent.glob(".*tmp")), "not killed mid-write"
    assert load_ref_logps(path, FINGERPRINT, 7) is None                  # nothing at the cache's name
    save_ref_logps(path, FINGERPRINT, torch.ones(7), torch.ones(7))      # the next run's write
    assert load_ref_logps(path, FINGERPRINT, 7) is not None
    assert [p.name for p in path.parent.iterdir()] == [path.name]        # the killed write's temporary file too


CONCURRENT_RUN = """
import sys, time
from pathlib import Path
from _shared import config, lora, pairs, tiny_llama
from fastdpo import DPOTrainer
import logging; logging.basicConfig(level=logging.INFO)
out, ready, other = map(Path, sys.argv[1:])
model = lora(tiny_llama(seed=4), seed=5)
ready.touch()
while not other.exists():                               # both runs ask for the reference log-probs at once
    time.sleep(0.01)
trainer = DPOTrainer(model, args=config(out, precompute_ref_log_probs=True, max_tokens_per_batch=60),
                     train_dataset=pairs(48, seed=1))
print(list(trainer.train_dataset["ref_chosen_logps"]))
"""


def test_two_runs_at_once_compute_the_cache_once(tmp_path, fastdpo_cache):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
    procs = [subprocess.Popen([sys.executable, "-c", CONCURRENT_RUN, str(tmp_path / f"run{i}"),
                               str(tmp_path / f"ready{i}"), str(tmp_path / f"ready{1 - i}")],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) for i in range(2)]
    (out0, err0), (out1, err1) = (p.communicate(timeout=600) for p in procs)
    assert [p.returncode for p in procs] == [0, 0], (err0 + err1)[-3000:]
    logs = err0 + err1
    assert logs.count("reference log-probs (train): computing 48 pairs") == 1, logs[-3000:]
    assert logs.count("reference log-probs (train): loaded from") == 1, logs[-3000:]
    assert out0 == out1
    [file] = (fastdpo_cache / "ref_logps").iterdir()
    assert load_ref_logps(file, file.stem, 48) is not None
