#!/usr/bin/env bash
# The one GPU call of issue 6, sized for a 15-minute device lease (about 1.5 minutes to
# start, this script at most ~8 minutes, the rest for a short rerun). Prepare on a machine
# with network first (bench/gpu_prepare.sh), then run it on the GPU host from the
# repository root, carrying .wheels and .official:
#
#   bash bench/gpu_call.sh                  # writes to $OUT (the device tool's folder), else ./gpu_out
#   DEADLINE_S=300 bash bench/gpu_call.sh   # a shorter budget: the later cases are skipped, the table printed
#   bash bench/gpu_call.sh --size tiny --platform cpu --torch-python '' --batch-infer 1 --batch-stage2 1 \
#       --batch-stage1 1 --lever-time-pack 4 --steps 1    # a dry run of the same path on a CPU (~4 min)
#
# One side_by_side.py run: the JAX model in bfloat16 and the official PyTorch model under
# its fp16 autocast recipe (when .official is present) on the same inputs, inference and a
# stage-II step at 16 clips, a stage-I step at 8 clips with remat and scanned blocks (the
# official model at 4, the most it fits), the attention kernels alone (time attention
# unpacked and packed, space and CLS attention; cuDNN vs XLA, forward and backward), then
# inference and stage I with the time attention packed 14 locations per sequence, and
# stage I with cuDNN also training the odd-length attentions (padded to even). Cases run
# cheapest first and the deadline cuts the rest; one table at the end, the JSON and the
# log in $OUT.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-gpu_out}
mkdir -p "$out"
# The carried wheels (CPython 3.12), where what they hold is missing: the GPU host has no
# grain, PyAV, ml_collections, omegaconf, ... Another Python (a CPU dry run) uses its own.
if ! python3 -c "import grain, array_record, av, ml_collections, omegaconf, ftfy" 2>/dev/null \
        && python3 -c "import sys; sys.exit(sys.version_info[:2] != (3, 12))" \
        && ls .wheels/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        .wheels/*.whl || exit 1
    export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-} JAX_COMPILATION_CACHE_DIR=/tmp/jcc PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version,power.limit --format=csv,noheader | tee "$out/gpu.txt"
torch_args=()
if [ -f .official/configs/sync.yaml ]; then
    torch_args=(--torch-python python3 --official-repo .official --torch-batch-stage1 4)
fi
# Traces stay on the host's disk (their summaries are in the JSON): what comes back from
# $OUT is limited in count and size.
python3 bench/side_by_side.py --size full --modes infer,stage2,stage1 --remat on --scan-stage1 \
    --batch-stage1 8 "${torch_args[@]}" --levers attn-micro,time-pack,attention --lever-time-pack 14 \
    --lever-modes infer,stage1 --lever-attention cudnn-train \
    --steps 5 --warmup 1 --profile 1 --profile-dir /tmp/sbs_traces --case-timeout 240 \
    --deadline-s "${DEADLINE_S:-450}" --json-out "$out/sbs.json" "$@" 2>&1 | tee "$out/log.txt"
