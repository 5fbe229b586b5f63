#!/usr/bin/env bash
# A replica of the GPU machine's Python software, checked on this CPU machine before GPU minutes are spent on it.
#
#   bash benchmarks/gpu_replica.sh [OUT_MD]      # default OUT_MD: benchmarks/results/gpu-replica.md
#
# 1. A virtual environment outside the repository (GPU_REPLICA_VENV, default /tmp/gpu-replica; Python 3.12 as there,
#    GPU_REPLICA_PYTHON) with the GPU machine's versions (/work/.library/device/KINDS.md): torch 2.11.0 (the
#    registry's CUDA build, ~5 GB; it runs on the CPU), triton 3.6.0, transformers 5.17.0, accelerate 1.15.0, peft,
#    pytest, pytest-benchmark, numpy, pandas, pyarrow, pyyaml and the small packages the image has, and none of what
#    it lacks (datasets, trl, liger-kernel, cut-cross-entropy, bitsandbytes, gguf): the script stops if one is there.
#    fastdpo is not installed (a fresh venv's setuptools cannot build it, and the GPU run uses PYTHONPATH too).
# 2. A plain copy of the repository as the device tool sends it (tracked and untracked-not-ignored files, no .git)
#    plus the carried .whl/, in a temporary folder.
# 3. There, the GPU command exactly (benchmarks/gpu_run.sh: the carried wheels installed as the runbook installs
#    them), in --dry-run mode, into a temporary output folder; then the imports the benchmark rows make of each
#    carried package, with those wheels.
# 4. python -m fastdpo.kernels.aot under this Triton 3.6 (sm_80/90, and sm_100 where it ships the assembler; a variant
#    the compiler rejects is its own failed row).
# Writes OUT_MD with the versions, each step's result and output. Not in CI: it downloads. Exits 1 when a step failed.
set -uo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
md=$(realpath -m "${1:-$repo/benchmarks/results/gpu-replica.md}")
venv=${GPU_REPLICA_VENV:-/tmp/gpu-replica}
python=${GPU_REPLICA_PYTHON:-python3.12}
work=$(mktemp -d /tmp/gpu-replica-run.XXXXXX)
failed=0

if [ ! -x "$venv/bin/python" ]; then "$python" -m venv "$venv" || exit 1; fi
"$venv/bin/python" -m pip install -q torch==2.11.0 triton==3.6.0 transformers==5.17.0 accelerate==1.15.0 peft \
    pytest pytest-benchmark numpy==2.5.2 pandas pyarrow pyyaml huggingface_hub==1.33.0 safetensors==0.8.0 \
    tokenizers==0.23.2 jinja2 psutil xxhash fsspec requests tqdm || exit 1
lacking=$("$venv/bin/python" -m pip list --format=freeze 2>/dev/null \
    | grep -i -E '^(datasets|trl|liger-kernel|liger_kernel|cut-cross-entropy|cut_cross_entropy|bitsandbytes|gguf)==')
if [ -n "$lacking" ]; then echo "the replica holds what the GPU machine lacks: $lacking" >&2; exit 1; fi

mkdir -p "$work/repo"
(cd "$repo" && git ls-files -z --cached --others --exclude-standard | xargs -0 -I{} cp --parents {} "$work/repo/")
[ -d "$repo/.whl" ] && cp -r "$repo/.whl" "$work/repo/.whl"

export PATH="$venv/bin:$PATH"    # python3 in the GPU command is the replica's
t0=$(date +%s)
(cd "$work/repo" && bash benchmarks/gpu_run.sh "$work/out" --dry-run > "$work/run.log" 2>&1)
run_rc=$?
run_s=$(( $(date +%s) - t0 ))
[ $run_rc -eq 0 ] || failed=1

imports='import datasets, trl, liger_kernel, cut_cross_entropy
from trl import DPOConfig, DPOTrainer
from trl.trainer.utils import _CHUNKED_LOGPROB_CHUNK_SIZE, _ChunkedLogProbFunction
from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
from liger_kernel.ops.fused_linear_scaled_cross_entropy import LigerFusedLinearScaledCrossEntropyFunction
from cut_cross_entropy import linear_cross_entropy
for m in (datasets, trl, liger_kernel, cut_cross_entropy):
    print(m.__name__, "from", m.__file__)'
if compgen -G "$repo/.whl/*.whl" > /dev/null; then
    imports_out=$(cd "$work" && PYTHONPATH=/tmp/site python3 -c "$imports" 2>&1)
    imports_rc=$?
else
    imports_out="no .whl/ in $repo: nothing carried"; imports_rc=1
fi
[ $imports_rc -eq 0 ] || failed=1

t0=$(date +%s)
aot_out=$(cd "$work/repo" && env -u TRITON_INTERPRET PYTHONPATH="$work/repo" python3 -m fastdpo.kernels.aot 2>&1)
aot_rc=$?
aot_s=$(( $(date +%s) - t0 ))
[ $aot_rc -eq 0 ] || failed=1

versions=$(python3 -m pip list --format=freeze 2>/dev/null | grep -i -E \
    '^(torch|triton|transformers|accelerate|peft|pytest|pytest-benchmark|numpy|pandas|pyarrow|tokenizers|huggingface.hub|safetensors)==' \
    | tr '\n' ' ')
{
    echo "# GPU replica check"
    echo
    echo "Written by \`bash benchmarks/gpu_replica.sh\` on $(date -u '+%Y-%m-%d %H:%M UTC'): the GPU machine's software"
    echo "on this CPU machine (Python $(python3 -c 'import platform; print(platform.python_version())'), $versions),"
    echo "a plain copy of the repository (no .git) with the carried wheels: $(cd "$repo" && ls .whl 2>/dev/null | tr '\n' ' ')"
    echo
    echo "| step | result | seconds |"
    echo "|---|---|---|"
    echo "| \`bash benchmarks/gpu_run.sh OUT --dry-run\` (the GPU command, dry run) | exit $run_rc | $run_s |"
    echo "| imports of the carried packages the benchmark rows use | exit $imports_rc | |"
    echo "| \`python -m fastdpo.kernels.aot\` under Triton 3.6 | exit $aot_rc | $aot_s |"
    echo
    echo "## The GPU command's dry run"
    echo
    if [ -f "$work/out/gpu-check.md" ]; then sed 's/^# /### /; s/^## /#### /' "$work/out/gpu-check.md"; else tail -40 "$work/run.log"; fi
    echo
    echo "Files it wrote: $(ls "$work/out" 2>/dev/null | tr '\n' ' ')"
    echo
    echo "## Imports of the carried packages"
    echo
    echo '```'
    echo "$imports_out" | sed "s#$work#<tmp>#g"
    echo '```'
    echo
    echo "## Ahead-of-time compile check under Triton 3.6"
    echo
    # a rejected variant makes the compiler print the kernel's MLIR: the table and the problems are the news
    echo "$aot_out" | sed -n '/^# Ahead-of-time/,$p' | sed 's/^# /### /' | cut -c1-400
} > "$md"
echo "wrote $md (dry run exit $run_rc, imports exit $imports_rc, aot exit $aot_rc; work folder $work)"
exit $failed
