"""``python -m fastdpo.kernels.aot``'s check with every variant compiled in a process of its own: where a Triton's
compiler aborts on some variants (3.6 on six sm_100 backward ones: "parent layout must have at least rank >= 2"),
the module's process pool dies with the first and its table is lost; here each crash costs only its own row.

    python benchmarks/aot_isolated.py          # run without TRITON_INTERPRET; benchmarks/gpu_replica.sh runs it

Prints ``fastdpo.kernels.aot``'s table of the variants that compiled, its problems (spills, shared memory) and the
variants whose compilation failed, with the compiler's first error line; exits 1 when there is any of either.
"""

from __future__ import annotations

import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

from fastdpo.kernels import aot


def compile_in_child(index: int) -> dict | str:
    """aot.compile_variant's row for variant ``index``, or the compiler's first error line."""
    proc = subprocess.run([sys.executable, __file__, "--variant", str(index)], capture_output=True, text=True)
    if proc.returncode == 0:
        return json.loads(proc.stdout.strip().splitlines()[-1])
    lines = (proc.stderr + proc.stdout).strip().splitlines()
    return next((line for line in lines if "error" in line.lower()), lines[-1] if lines else f"exit {proc.returncode}")


def main(argv: list[str]) -> int:
    if argv[:1] == ["--variant"]:
        print(json.dumps(aot.compile_variant(aot.variants()[int(argv[1])])))
        return 0
    variants = aot.variants()
    with ThreadPoolExecutor(2) as pool:     # each child compiles in its own process
        results = list(pool.map(compile_in_child, range(len(variants))))
    rows = [r for r in results if isinstance(r, dict)]
    failed = [f"{v.kernel} {v.dtype} sm_{v.arch} {v.config} {dict(v.flags)}: {r[:300]}"
              for v, r in zip(variants, results) if isinstance(r, str)]
    print(aot.markdown(rows))
    problems = aot.problems(rows)
    print("\n".join(f"- {p}" for p in problems) or f"{len(rows)} variants: no spills, shared memory within limits")
    print(f"\n{len(failed)} of {len(variants)} variants failed to compile" + "".join(f"\n- {f}" for f in failed))
    return 1 if problems or failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
