#!/usr/bin/env bash
# Cloud TPU VM pod slice: the same command on every worker (one process per TPU VM host).
#
#   TPU_NAME=my-v5p-64 ZONE=us-east5-a launch/tpu_vm_pod.sh \
#       configs/sync.py:vggsound gs://my-bucket/workdirs/sync_vggsound [--config.FIELD=VALUE ...]
#
# Needs: gcloud authenticated for the project; the TPU VM created with synchformer-jax
# installed on every worker (jax[tpu]); records and the workdir on storage every worker
# sees (a GCS bucket through gcsfuse, or Filestore), since each worker reads its own
# slice of the shards and orbax writes one checkpoint from all of them.
#
# Environment:
#   TPU_NAME, ZONE     the TPU VM (required); PROJECT (optional, gcloud's default otherwise)
#   REPO_DIR           where the repository (configs/) lives on the workers (default: ~/synchformer-jax)
#   PYTHON             the workers' interpreter (default: python3)
#
# `--distributed on`: jax.distributed.initialize() reads the pod's topology from the TPU
# metadata server; no coordinator address is needed.
set -euo pipefail

if [[ $# -lt 2 ]]; then
    echo "usage: TPU_NAME=... ZONE=... $0 CONFIG[:ARG] WORKDIR [--config.FIELD=VALUE ...]" >&2
    exit 2
fi
: "${TPU_NAME:?set TPU_NAME}"
: "${ZONE:?set ZONE}"
CONFIG="$1"
WORKDIR="$2"
shift 2
REPO_DIR="${REPO_DIR:-~/synchformer-jax}"
PYTHON="${PYTHON:-python3}"

# Quote every argument for the remote shell.
ARGS=""
for a in "$@"; do
    ARGS+=" $(printf '%q' "$a")"
done
REMOTE="cd $REPO_DIR && $PYTHON -m synchformer_jax.cli train --config $(printf '%q' "$CONFIG") \
--workdir $(printf '%q' "$WORKDIR") --distributed on$ARGS 2>&1 | tee -a train_\$(hostname).log"

PROJECT_FLAG=()
if [[ -n "${PROJECT:-}" ]]; then
    PROJECT_FLAG=(--project "$PROJECT")
fi
echo "on all workers of $TPU_NAME: $REMOTE"
gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" ${PROJECT_FLAG[@]+"${PROJECT_FLAG[@]}"} --worker=all \
    --command "$REMOTE"
