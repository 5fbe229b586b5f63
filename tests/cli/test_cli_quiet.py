"""A harmless probe must not print a failure: bitsandbytes' import logs "Failed to load CPU gemm_4bit_forward from
kernels-community" on CPUs with AVX512-BF16 when Hugging Face's `kernels` is absent, and peft and transformers'
Trainer import bitsandbytes whenever it is installed. Each command runs in a fresh interpreter on a simulated
AVX512-BF16 CPU, so the probe really runs and really fails."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PROBE = "Failed to load CPU gemm_4bit_forward"
# As if on a CPU with AVX512-BF16 and without the `kernels` package: bitsandbytes then probes, and the probe fails.
SIMULATE = '''
import importlib.abc, importlib.machinery, sys
sys.modules["kernels"] = None
class _AVX512BF16(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != "bitsandbytes.cextension":
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        exec_module = spec.loader.exec_module
        def patched(module):
            exec_module(module)
            module.lib.has_avx512bf16_cpu = lambda: True
        spec.loader.exec_module = patched
        return spec
sys.meta_path.insert(0, _AVX512BF16())
'''


def run(code: str, tmp_path) -> subprocess.CompletedProcess:
    # cwd outside the repository: its kernels/ folder would otherwise stand in for the missing package
    return subprocess.run([sys.executable, "-c", SIMULATE + code], capture_output=True, text=True, cwd=tmp_path,
                          timeout=600)


@pytest.mark.skipif(sys.platform != "linux", reason="bitsandbytes' CPU backend probe")
def test_the_simulated_probe_prints_without_fastdpo(tmp_path):
    """The control: without fastdpo, the probe's failure reaches stderr (so the tests below can fail)."""
    out = run("import bitsandbytes", tmp_path)
    assert out.returncode == 0, out.stderr
    assert PROBE in out.stderr


@pytest.mark.skipif(sys.platform != "linux", reason="bitsandbytes' CPU backend probe")
@pytest.mark.parametrize("code", [
    "import fastdpo",
    "from fastdpo.cli import main; sys.exit(main(['--help']))",
    "from fastdpo.cli import main; sys.exit(main(['train', '--help']))",
    "import logging; logging.basicConfig(level=logging.INFO); import fastdpo; from fastdpo import DPOTrainer",
])
def test_no_probe_failure_on_stderr(code, tmp_path):
    out = run(code, tmp_path)
    assert out.returncode == 0, out.stderr
    assert PROBE not in out.stderr, out.stderr
    assert "Traceback" not in out.stderr


def test_import_fastdpo_and_help_do_not_import_bitsandbytes(tmp_path):
    code = ("import sys\nfrom fastdpo.cli import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
            "print('bitsandbytes' in sys.modules, 'peft' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert out.stdout.strip().splitlines()[-1] == "False False", out.stdout + out.stderr


def test_the_probe_is_kept_at_debug_level(tmp_path):
    """Demoted, not deleted: with DEBUG logging on, the message is there, as a DEBUG record."""
    out = run("import logging; logging.basicConfig(level=logging.DEBUG); import fastdpo, bitsandbytes", tmp_path)
    assert f"DEBUG:bitsandbytes.backends.cpu.ops:{PROBE}" in out.stderr
