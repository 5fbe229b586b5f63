"""The package's shape: layers import only downward, `from fastdpo import linear_logps` stays light, modules stay
short, every package ships in the wheel and says what it is."""

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "fastdpo"
# Each layer may import its own and lower ranks only (ops imports nothing above it; losses is pure torch).
RANKS = {"kernels": 0, "ops": 1, "losses": 2, "data": 3, "models": 4, "train": 5, "online": 6, "sft": 6, "kto": 6,
         "integrations": 7, "cli": 7}
HEAVY = ("transformers", "datasets", "peft", "bitsandbytes", "accelerate", "trl")


def _sources():
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE).with_suffix("").parts
        if parts[0] not in ("__init__", "__main__"):
            yield path, parts[0]


def _imported_layers(source: str, module: str, depth: int) -> set[str]:
    """The fastdpo layers a module imports, relative or absolute, at any nesting (lazy imports count too).
    ``module`` is its dotted name under fastdpo (``ops.dispatch``), ``depth`` its package depth."""
    package = module.split(".")[:depth]
    layers = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                target = base + (node.module.split(".") if node.module else [])
                names = [target] if target else [[alias.name] for alias in node.names]
            elif node.module and node.module.split(".")[0] == "fastdpo":
                rest = node.module.split(".")[1:]
                names = [rest] if rest else [[alias.name] for alias in node.names]
            else:
                continue
            layers |= {n[0] for n in names if n and n[0] in RANKS}
        elif isinstance(node, ast.Import):
            layers |= {a.name.split(".")[1] for a in node.names
                       if a.name.startswith("fastdpo.") and a.name.split(".")[1] in RANKS}
    return layers


def _violations(path: Path, layer: str) -> list[str]:
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    module, depth = ".".join(parts), len(parts) - (0 if parts[-1] == "__init__" else 1)
    return [f"{module} ({layer}) imports {other}" for other in _imported_layers(path.read_text(), module, depth)
            if RANKS[other] > RANKS[layer]]


def test_layers_import_only_downward():
    problems = [v for path, layer in _sources() for v in _violations(path, layer)]
    assert not problems, "\n".join(problems)


def test_the_direction_check_can_fail(tmp_path):
    bad = tmp_path / "dispatch.py"
    bad.write_text("def f():\n    from ..train import DPOTrainer\n    from fastdpo.data import pack_pairs\n")
    assert _imported_layers(bad.read_text(), "ops.dispatch", 1) == {"train", "data"}


def test_ops_import_loads_nothing_heavy():
    code = f"import sys; from fastdpo import linear_logps; print([m for m in {HEAVY!r} if m in sys.modules])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT.parent)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def _code_lines(path: Path) -> int:
    return sum(1 for line in path.read_text().splitlines() if line.strip() and not line.strip().startswith("#"))


def test_modules_stay_short():
    long = {str(p.relative_to(ROOT)): n for p, _ in _sources() if p.name != "losses.py"
            and (n := _code_lines(p)) > 300}
    assert not long, f"modules over 300 lines of code: {long}"


def test_every_package_is_a_regular_package_and_documented():
    """An ``__init__.py`` in every folder of modules (setuptools' find would drop a namespace folder from the
    wheel), with a docstring."""
    folders = {p.parent for p in PACKAGE.rglob("*.py") if "__pycache__" not in p.parts}
    missing = sorted(str(f.relative_to(ROOT)) for f in folders if not (f / "__init__.py").is_file())
    assert not missing, f"folders without __init__.py: {missing}"
    for init in PACKAGE.rglob("__init__.py"):
        assert ast.get_docstring(ast.parse(init.read_text())), f"{init} has no docstring"


def test_no_top_level_package_shadows_an_installed_one():
    """Only fastdpo/ is importable from the repository root: a top-level ``kernels/`` once shadowed Hugging Face's
    ``kernels`` for every ``python -m`` started there (transformers imports it)."""
    packages = sorted(p.parent.name for p in ROOT.glob("*/__init__.py"))
    assert packages == ["fastdpo"], packages


@pytest.mark.parametrize("name", ["DPOConfig", "DPOTrainer", "OnlineDPOConfig", "OnlineDPOTrainer", "dpo_loss",
                                  "KTOConfig", "KTOTrainer", "kto_loss",
                                  "linear_logps", "get_batch_logps", "sequence_logps", "LogitTransform"])
def test_public_names_resolve(name):
    import fastdpo

    assert getattr(fastdpo, name) is not None and name in dir(fastdpo)


def test_commands_run_from_the_repository_root():
    """``python -m fastdpo train`` from the root, beside Hugging Face's ``kernels``, which transformers' trainer imports
    (a dependency of transformers 5.2x; the 2-process launch from the root is ``tests/train/test_distributed.py``)."""
    code = "import importlib.util as u; s = u.find_spec('kernels'); print(s.origin if s else None)"
    found = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    origin = found.stdout.strip()
    assert origin == "None" or Path(origin).parent.parent != ROOT, f"a folder of the repository shadows it: {origin}"
    proc = subprocess.run([sys.executable, "-m", "fastdpo", "train", "--help"], capture_output=True, text=True,
                          cwd=ROOT)
    assert proc.returncode == 0 and "--model" in proc.stdout, proc.stderr[-2000:]


def _supported_versions_table() -> dict[str, tuple[str, str, str]]:
    """README "Supported versions": package -> (range, oldest tested, newest tested)."""
    section = (ROOT / "README.md").read_text().split("\n## Supported versions\n", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\| (\w+)[^|]* \| `([^`]+)`[^|]* \| ([\w.]+) \| ([\w.]+) \|$", section, re.M)
    return {name: (spec, oldest, newest) for name, spec, oldest, newest in rows}


def test_supported_versions_agree():
    """The README's ranges are pyproject.toml's (trl's: the test extra's and fastdpo.integrations.trl's), and its
    oldest and newest columns are the pins `.ci/compat` installs, each inside its range."""
    tomllib = pytest.importorskip("tomllib")
    from packaging.requirements import Requirement
    from packaging.specifiers import SpecifierSet

    table = _supported_versions_table()
    assert set(table) == {"torch", "triton", "transformers", "peft", "accelerate", "trl"}, table
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    requirements = project["dependencies"] + project["optional-dependencies"]["test"]
    declared = {r.name: r.specifier for r in map(Requirement, requirements)}
    trl_module = (PACKAGE / "integrations" / "trl.py").read_text()
    declared_trl = SpecifierSet(re.search(r'SUPPORTED_TRL = SpecifierSet\("([^"]+)"\)', trl_module).group(1))
    assert declared_trl == declared["trl"]
    script = (ROOT / ".ci" / "compat").read_text()
    pins = {end: dict(p.split("==") for p in re.search(rf"^{end}=\(([^)]*)\)", script, re.M).group(1).split())
            for end in ("OLDEST", "NEWEST")}  # numpy, pinned for Triton 3.6's interpreter, has no README row
    for name, (spec, oldest, newest) in table.items():
        assert SpecifierSet(spec) == declared[name], f"{name}: README {spec}, pyproject {declared[name]}"
        assert (pins["OLDEST"][name], pins["NEWEST"][name]) == (oldest, newest), name
        assert oldest in declared[name] and newest in declared[name], name
