"""Checks a built wheel against the repository: every module of the source tree is in the wheel, and each imports
from where the wheel was installed. Arguments: the wheel file, the folder it was installed into (``pip install
--target``, first on ``sys.path``), the repository root. Run from outside the source tree."""

import importlib
import sys
import zipfile
from pathlib import Path

wheel, target, repo = (Path(a).resolve() for a in sys.argv[1:4])


def dotted(parts: tuple[str, ...]) -> str:
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


expected = {dotted(p.relative_to(repo).with_suffix("").parts) for p in (repo / "fastdpo").rglob("*.py")}
shipped = {dotted(Path(n).with_suffix("").parts) for n in zipfile.ZipFile(wheel).namelist()
           if n.startswith("fastdpo/") and n.endswith(".py")}
missing = sorted(expected - shipped)
if missing:
    raise SystemExit(f"the wheel lacks {len(missing)} module(s) of the source tree: {', '.join(missing)}")
import fastdpo  # noqa: E402  (after the listing: an import error here is the installed package's, reported as such)

location = Path(fastdpo.__file__).resolve()
if target not in location.parents:
    raise SystemExit(f"fastdpo was imported from {location}, not from the wheel installed in {target}")
for name in sorted(shipped - {"fastdpo.__main__"}):   # __main__ runs the command
    importlib.import_module(name)      # an ImportError propagates with its own message and traceback
print(f"wheel: all {len(shipped)} modules of the source tree shipped and imported from {location.parent}")
