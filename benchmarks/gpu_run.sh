#!/usr/bin/env bash
# THE GPU command (benchmarks/README.md): the runbook from a plain copy of the repository, nothing installed.
#
#   bash benchmarks/gpu_run.sh "$OUT" [benchmarks/gpu_check.py options, e.g. --skip tests or --dry-run]
#
# Installs the wheels carried in .whl/ (trl, liger-kernel, cut-cross-entropy, datasets and what they need that the GPU
# machine lacks) into /tmp/site with the device README's line, puts them and this checkout on PYTHONPATH, and runs
# benchmarks/gpu_check.py into OUT, its output also in OUT/gpu-check.log.
set -uo pipefail
out=$(realpath -m "${1:?usage: gpu_run.sh OUT_DIR [gpu_check.py options]}")
shift
cd "$(dirname "$0")/.."
mkdir -p "$out"
if compgen -G ".whl/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH} || exit
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
python3 benchmarks/gpu_check.py --out-dir "$out" "$@" 2>&1 | tee "$out/gpu-check.log"
