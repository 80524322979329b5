#!/usr/bin/env bash
# Single host: one process that drives every local accelerator (or the CPU).
#
#   launch/local.sh configs/sync.py:vggsound workdirs/sync_vggsound [--config.optim.lr=1e-5 ...]
#   launch/local.sh configs/tiny.py:sync /tmp/tiny_sync                  # CPU smoke run
#
# Everything after the workdir goes to `synchformer-jax train` unchanged. Environment:
#   PYTHON          interpreter with synchformer-jax installed (default: python)
#   CUDA_VISIBLE_DEVICES / TPU_VISIBLE_CHIPS   the usual device selection
# A second run with the same workdir resumes from its latest checkpoint.
set -euo pipefail

if [[ $# -lt 2 ]]; then
    echo "usage: $0 CONFIG[:ARG] WORKDIR [--config.FIELD=VALUE ...]" >&2
    exit 2
fi
CONFIG="$1"
WORKDIR="$2"
shift 2
PYTHON="${PYTHON:-python}"

# Let XLA take most of the GPU memory up front (the default 75 % leaves room for other
# processes; a dedicated host wants the full step to fit).
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}"

mkdir -p "$WORKDIR"
# --distributed off: a lone process, even inside a SLURM allocation of several tasks.
"$PYTHON" -m synchformer_jax.cli train --config "$CONFIG" --workdir "$WORKDIR" \
    --distributed off "$@" 2>&1 | tee -a "$WORKDIR/train.log"
