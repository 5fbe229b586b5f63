"""Every Triton kernel compiles for sm_80 and sm_90 (sm_100 where Triton ships its assembler) with no GPU, and the
default launch configs spill no registers and fit each target's shared memory (``fastdpo.kernels.aot``)."""

import importlib.util
import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton not installed")


@pytest.fixture(scope="module")
def rows(tmp_path_factory):
    from fastdpo.kernels import aot

    missing = aot.missing_tools()
    if missing:
        pytest.skip(missing)
    out = tmp_path_factory.mktemp("aot") / "rows.json"
    # The interpreter replaces the JIT functions, so the compile runs in a process without it.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-W", "ignore", "-m", "fastdpo.kernels.aot", "--json", str(out)],
                          capture_output=True, text=True, env=env, timeout=900,
                          cwd=out.parent)
    assert out.exists(), proc.stderr[-3000:]
    return json.loads(out.read_text()), proc


def test_every_kernel_compiles_for_every_target(rows):
    from fastdpo.kernels import aot

    got = {(r["kernel"], r["dtype"], r["arch"]) for r in rows[0]}
    assert got == {(k, d, a) for k in aot.KERNELS for d in aot.DTYPES for a in aot.archs()}


def test_default_configs_do_not_spill(rows):
    from fastdpo.kernels import aot

    assert aot.problems(rows[0]) == [], rows[1].stdout[-3000:]
    assert rows[1].returncode == 0


def test_spill_check_catches_a_spilling_row():
    from fastdpo.kernels import aot

    row = {"kernel": "_dh_kernel", "dtype": "bf16", "arch": 80, "config": (128, 128, 64, 8, 2), "flags": {},
           "default": True, "stack": 432, "spill_ops": 185, "shared": 65536}
    assert aot.problems([row]) and aot.problems([{**row, "stack": 0, "spill_ops": 0, "shared": 10 ** 6}])
