"""Checks the installed fastdpo (run from outside the source tree) against the repository: every module of the
source tree is in it, and each imports. Arguments: the environment it must come from, the repository root."""

import importlib
import pkgutil
import sys
from pathlib import Path

import fastdpo

prefix, repo = Path(sys.argv[1]).resolve(), Path(sys.argv[2]).resolve()
location = Path(fastdpo.__file__).resolve()
if prefix not in location.parents:
    raise SystemExit(f"fastdpo was imported from {location}, not from the wheel installed in {prefix}")


def dotted(path: Path, root: Path, package: str) -> str:
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join((package, *parts[:-1])) if parts[-1] == "__init__" else ".".join((package, *parts))


expected = {dotted(p, repo / "fastdpo", "fastdpo") for p in (repo / "fastdpo").rglob("*.py")}
installed = {m.name for m in pkgutil.walk_packages(fastdpo.__path__, "fastdpo.")} | {"fastdpo"}
missing = sorted(expected - installed)
if missing:
    raise SystemExit(f"the wheel lacks {len(missing)} module(s) of the source tree: {', '.join(missing)}")
for name in sorted(installed - {"fastdpo.__main__"}):   # __main__ runs the command
    importlib.import_module(name)
print(f"wheel: all {len(installed)} modules of the source tree imported from {location.parent}")
