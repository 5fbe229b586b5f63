"""Imports every module of the installed fastdpo (run from outside the source tree): a module the wheel lacks, or
an import that only works from the repository, fails here. Argument: the environment it must come from."""

import importlib
import pkgutil
import sys
from pathlib import Path

import fastdpo

prefix = Path(sys.argv[1]).resolve()
location = Path(fastdpo.__file__).resolve()
if prefix not in location.parents:
    raise SystemExit(f"fastdpo was imported from {location}, not from the wheel installed in {prefix}")
modules = [m.name for m in pkgutil.walk_packages(fastdpo.__path__, "fastdpo.") if not m.name.endswith("__main__")]
for name in modules:
    importlib.import_module(name)
print(f"wheel: imported {len(modules)} modules from {location.parent}")
