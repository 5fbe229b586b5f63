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


def test_a_compiler_failure_is_a_problem_unless_never_launched(monkeypatch):
    """A variant the compiler rejects is its own failed row (not the end of the run), and a problem wherever the
    dispatch would launch it; on sm_100 under Triton < 3.9 the fused kernels are never launched."""
    import triton

    from fastdpo.kernels import aot, launch

    row = {"kernel": "_dh_kernel", "dtype": "bf16", "arch": 100, "config": (64, 64, 64, 8, 3), "flags": {},
           "default": True, "error": "RuntimeError: PassManager::run failed"}
    monkeypatch.setattr(triton, "__version__", "3.6.0")
    assert launch.fused_unsupported(100) and launch.fused_unsupported(90) is None
    assert aot.problems([row]) == [] and "never launched" in aot.markdown([row])
    assert aot.problems([{**row, "kernel": "_logits_grad_kernel"}])        # the chunked backend's: always launched
    monkeypatch.setattr(triton, "__version__", "3.9.0")
    assert launch.fused_unsupported(100) is None and aot.problems([row])
    bad = aot.Variant("_dh_kernel", "bf16", 90, (("NO_SUCH_FLAG", True),), (64, 64, 64, 8, 3), True)
    assert "error" in aot.compile_or_error(bad)
