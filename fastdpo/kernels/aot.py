"""Ahead-of-time compile check of every kernel for NVIDIA targets, on a machine without a GPU.

``python -m fastdpo.kernels.aot [--full] [--md PATH]`` compiles each kernel for sm_80 and sm_90 (and sm_100
where this Triton ships its assembler) through ``triton.compile`` and reads registers, stack (spill) bytes and
STL/LDL instructions from ``cuobjdump``, shared memory from the compile metadata, and the PTX's MMA instructions.
Run it without ``TRITON_INTERPRET`` (the interpreter replaces the JIT functions); ``tests/kernels/test_aot.py``
runs it in a subprocess. ``--full`` compiles every constexpr combination the launchers can produce; the default
set is each kernel x dtype x target with every flag on (the most live registers), at every config in ``launch``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass

DTYPES = {"fp32": "*fp32", "bf16": "*bf16", "fp16": "*fp16"}
#: Largest dynamic shared memory of one block (A100: 163 KiB; H100/B200: 227 KiB).
SMEM_LIMIT = {80: 166912, 90: 232448, 100: 232448}
FLOATS = ("logit_scale", "softcap", "inv_temperature", "filter_eps")
SIZES = ("N", "V", "D", "T")   # capitalised like the pointers, but ints
#: kernel -> (module, launch-config kernel name or None, pointer args in the input dtype, {flag: values}).
KERNELS = {
    "_lse_forward_kernel": ("linear_lse_forward", "forward", ("H", "W", "B"),
                            dict.fromkeys(("HAS_BIAS", "HAS_SOFTCAP", "EXP_LOGIT", "LSE_2Z", "SUM_LOGIT",
                                           "MAX_OTHER"), (False, True))),
    "_dh_kernel": ("linear_backward", "backward_dh", ("H", "W", "B"),
                   dict.fromkeys(("HAS_BIAS", "HAS_SOFTCAP", "FILTER"), (False, True))),
    "_dw_kernel": ("linear_backward", "backward_dw", ("H", "W", "B"),
                   {**dict.fromkeys(("HAS_BIAS", "HAS_SOFTCAP", "FILTER"), (False, True)),
                    "COMPUTE_DW": (True, False), "COMPUTE_DB": (True, False)}),
    "_indexed_dot_kernel": ("indexed_dot", None, ("H", "W", "B"),
                            dict.fromkeys(("HAS_BIAS", "HAS_SOFTCAP"), (False, True))),
    "_update_lse_kernel": ("logit_chunks", None, ("B",),
                           dict.fromkeys(("HAS_BIAS", "HAS_SOFTCAP", "EXP_LOGIT", "LSE_2Z", "SUM_LOGIT", "MAX_OTHER"),
                                         (False, True))),
    "_logits_grad_kernel": ("logit_chunks", None, ("B", "DZ"), dict.fromkeys(("HAS_BIAS", "HAS_SOFTCAP"), (False, True))),
    "_logits_forward_kernel": ("logits_logps", None, ("X",), {}),
    "_logits_backward_kernel": ("logits_logps", None, ("X", "DX"), {}),
}
#: The modules of the fused backend (``backend="triton"``), which ``launch.fused_unsupported`` keeps off some targets.
FUSED_MODULES = ("linear_lse_forward", "linear_backward", "indexed_dot")
#: Launch constants of the kernels that have no TileConfig (see their launchers).
FIXED = {"_indexed_dot_kernel": ({"BLOCK_N": 16, "BLOCK_D": 128}, 4),
         **dict.fromkeys(("_update_lse_kernel", "_logits_grad_kernel"), ({"BLOCK_M": 4, "BLOCK_V": 1024}, 4)),
         "_logits_forward_kernel": ({"BLOCK_V": 4096}, 8), "_logits_backward_kernel": ({"BLOCK_V": 4096}, 16)}


@dataclass(frozen=True)
class Variant:
    kernel: str
    dtype: str
    arch: int
    flags: tuple[tuple[str, bool | str], ...]
    config: tuple[int, ...]        # (block_n, block_v, block_d, num_warps, num_stages); () for fixed kernels
    default: bool                  # the config a launch uses


def _bin(tool: str) -> str | None:
    import triton

    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", tool)
    return path if os.path.exists(path) else shutil.which(tool)


def archs() -> tuple[int, ...]:
    """sm_80 and sm_90, plus sm_100 when Triton ships the Blackwell assembler."""
    return (80, 90, 100) if _bin("ptxas-blackwell") else (80, 90)


def missing_tools() -> str | None:
    for tool in ("cuobjdump", "ptxas"):
        if _bin(tool) is None:
            return f"{tool} not found (neither in the triton wheel nor on PATH)"
    return None


def _configs(kernel: str, arch: int):
    """(dtype, config tuple, is the default) of every config ``kernel`` may launch with on sm_``arch``."""
    from . import launch

    name = KERNELS[kernel][1]
    if name is None:
        return [(dtype, (), True) for dtype in DTYPES]
    out = []
    for dtype in DTYPES:
        cls = "fp32" if dtype == "fp32" else "16bit"
        default = launch.default_config(name, cls, arch)
        configs = dict.fromkeys((default, *launch.CANDIDATES.get((name, cls), ())))
        out += [(dtype, tuple(asdict(c).values()), c == default) for c in configs]
    return out


def variants(full: bool = False) -> list[Variant]:
    out = []
    for kernel, (_, _, _, flags) in KERNELS.items():
        names = list(flags)
        if full:
            combos = list(itertools.product(*flags.values()))
        else:
            combos = [tuple(v[-1] if n != "COMPUTE_DW" else True for n, v in flags.items())]   # the most registers
        for arch, (dtype, config, default) in ((a, c) for a in archs() for c in _configs(kernel, a)):
            # fp32 products run as IEEE FMAs or as TF32 MMAs, following torch's allow_tf32
            precisions = ("ieee", "tf32") if dtype == "fp32" and config else ("ieee",)
            for combo, precision in itertools.product(combos if default else combos[-1:], precisions):
                if kernel == "_dw_kernel" and not (dict(zip(names, combo))["COMPUTE_DW"]
                                                   or dict(zip(names, combo))["COMPUTE_DB"]):
                    continue      # the launcher never runs it for nothing
                out.append(Variant(kernel, dtype, arch, (*zip(names, combo), ("DOT_PRECISION", precision)), config,
                                   default))
    return out


def _signature(fn, v: Variant, pointers):
    consts = {"stride_hd": 1, "stride_wd": 1, "UPCAST": False, **dict(v.flags)}
    if v.config:
        consts.update(BLOCK_N=v.config[0], BLOCK_V=v.config[1], BLOCK_D=v.config[2])
    else:
        consts.update(FIXED[v.kernel][0])
    consts = {k: val for k, val in consts.items() if k in fn.arg_names}
    sig, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in consts or i in fn.constexprs:
            sig[name] = "constexpr"
        elif name[0].isupper() and name not in SIZES:
            sig[name] = DTYPES[v.dtype] if name in pointers else "*i32" if name == "Skipped" else \
                "*i64" if name in ("Labels", "Rows") else "*fp32"
            attrs[(i,)] = [["tt.divisibility", 16]]
        else:
            sig[name] = "fp32" if name in FLOATS else "i32"
            if name == "D" or name.startswith("stride_"):    # hidden sizes and row strides are multiples of 16
                attrs[(i,)] = [["tt.divisibility", 16]]
    return sig, consts, attrs


def compile_variant(v: Variant) -> dict:
    """Resource usage of one variant: {"regs", "stack", "spill_ops", "shared", "wgmma"} plus the variant."""
    import importlib

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    module, _, pointers, _ = KERNELS[v.kernel]
    fn = getattr(importlib.import_module(f"{__package__}.{module}"), v.kernel)
    sig, consts, attrs = _signature(fn, v, pointers)
    warps, stages = (v.config[3], v.config[4]) if v.config else (FIXED[v.kernel][1], 1)
    compiled = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs),
                              target=GPUTarget("cuda", v.arch, 32), options={"num_warps": warps, "num_stages": stages})
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        usage = subprocess.run([_bin("cuobjdump"), "--dump-resource-usage", f.name], capture_output=True,
                               text=True, check=True).stdout
        sass = subprocess.run([_bin("cuobjdump"), "-sass", f.name], capture_output=True, text=True, check=True).stdout
    field = lambda key: int(re.search(rf"{key}:(\d+)", usage).group(1))
    return {**asdict(v), "flags": dict(v.flags), "regs": field("REG"), "stack": field("STACK"),
            "spill_ops": len(re.findall(r"\b(?:STL|LDL)(?:\.\w+)*\b", sass)), "shared": compiled.metadata.shared,
            "mma": _mma_kind(compiled.asm["ptx"])}


def _mma_kind(ptx: str) -> str:
    """The tensor-core instruction family the PTX uses (``fma`` when the products run on the FP32 units)."""
    return next((kind for kind in ("wgmma", "tcgen05.mma", "mma.sync") if kind in ptx), "fma")


def compile_or_error(v: Variant) -> dict:
    """``compile_variant``'s row, or the variant with ``error``: a compiler failure in one variant (an MLIR pass that
    rejects it raises ``PassManager::run failed``) must not hide the other rows."""
    try:
        return compile_variant(v)
    except Exception as exc:
        lines = str(exc).strip().splitlines() or [""]
        return {**asdict(v), "flags": dict(v.flags), "error": f"{type(exc).__name__}: {lines[-1][:300]}"}


def run(full: bool = False, workers: int = 2) -> list[dict]:
    with ProcessPoolExecutor(workers) as pool:
        return list(pool.map(compile_or_error, variants(full)))


def never_launched(row: dict) -> str | None:
    """Why the dispatch never launches this variant's kernel on its target with this Triton, or None."""
    from .launch import fused_unsupported

    return fused_unsupported(row["arch"]) if KERNELS[row["kernel"]][0] in FUSED_MODULES else None


def problems(rows: list[dict]) -> list[str]:
    """Why rows fail the check: a config (default or autotune candidate) that spills, one over the target's shared
    memory, or one that does not compile, among the variants the dispatch can launch."""
    out = []
    for r in rows:
        if never_launched(r):
            continue
        where = f"{r['kernel']} {r['dtype']} sm_{r['arch']} {r['config']} {r['flags']}"
        if "error" in r:
            out.append(f"{where}: does not compile: {r['error']}")
            continue
        if r["stack"] or r["spill_ops"]:
            out.append(f"{where}: {r['stack']} stack bytes, {r['spill_ops']} STL/LDL")
        if r["shared"] > SMEM_LIMIT[r["arch"]]:
            out.append(f"{where}: {r['shared']} B shared memory > {SMEM_LIMIT[r['arch']]}")
    return out


def markdown(rows: list[dict]) -> str:
    """Worst case over the flag combinations per kernel x dtype x target, at the default config."""
    worst = {}
    for r in rows:
        if r["default"] and "error" not in r and not never_launched(r):
            tf32 = r["flags"].get("DOT_PRECISION") == "tf32"
            key = (r["kernel"], r["dtype"] + (" tf32" if tf32 else ""), r["arch"])
            w = worst.setdefault(key, {**r, "variants": 0})
            w.update({k: max(w[k], r[k]) for k in ("regs", "stack", "spill_ops", "shared")},
                     variants=w["variants"] + 1)
    import triton

    lines = [f"# Ahead-of-time compile check (Triton {triton.__version__}, no GPU)", "",
             "Written by `python -m fastdpo.kernels.aot --md benchmarks/results/kernels-aot.md` (CI: "
             "`tests/kernels/test_aot.py`). Per kernel x dtype x target, the worst case over the flag combinations "
             "compiled (every flag on: the most live registers; `--full` compiles all of them) at the default "
             "launch config. Stack bytes and STL/LDL count register spills; MMA is the tensor-core instruction "
             "family in the PTX (`fma`: IEEE fp32 products on the FP32 units).", "",
             "| kernel | dtype | target | config (BN, BV, BD, warps, stages) | variants | registers | stack B "
             "| STL/LDL | shared B | MMA |", "|---|---|---|---|---|---|---|---|---|---|"]
    for (kernel, dtype, arch), w in sorted(worst.items()):
        lines.append(f"| `{kernel}` | {dtype} | sm_{arch} | {w['config'] or 'fixed'} | {w['variants']} | {w['regs']} "
                     f"| {w['stack']} | {w['spill_ops']} | {w['shared']} | {w['mma']} |")
    failed = [r for r in rows if "error" in r and not never_launched(r)]
    if failed:
        lines += ["", f"Variants the compiler rejects ({len(failed)}):", ""]
        lines += [f"- `{r['kernel']}` {r['dtype']} sm_{r['arch']} {r['flags']}: {r['error']}" for r in failed]
    skipped = sorted({(r["kernel"], r["arch"], never_launched(r)) for r in rows if never_launched(r)})
    if skipped:
        lines += ["", "Compiled but never launched (the dispatch takes the chunked backend there):", ""]
        lines += [f"- `{kernel}` sm_{arch}: {why}" for kernel, arch, why in skipped]
    alts = [r for r in rows if not r["default"] and "error" not in r and not never_launched(r)]
    if alts:
        lines += ["", f"Autotune candidates: {len(alts)} compiled, "
                  f"{sum(1 for r in alts if r['stack'])} spill."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true", help="every constexpr combination")
    parser.add_argument("--json", help="write the rows as JSON here")
    parser.add_argument("--md", help="write the markdown table here")
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        parser.error("unset TRITON_INTERPRET: the interpreter replaces the kernels it would compile")
    rows = run(args.full, args.workers)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f)
    table = markdown(rows)
    if args.md:
        with open(args.md, "w") as f:
            f.write(table)
    print(table)
    bad = problems(rows)
    print("\n".join(bad) or f"{len(rows)} variants: no spills at the defaults, shared memory within limits")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
