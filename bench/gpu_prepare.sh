#!/usr/bin/env bash
# Prepares, on a machine with pip and network, what the one GPU call (bench/gpu_call.sh)
# carries to a GPU host that has jax, flax, optax, orbax, torch, timm, transformers and
# einops but no network: the other wheels synchformer-jax and the official code import,
# for CPython 3.12 on x86-64, in .wheels/; and, when given a checkout (or a bare git
# directory) of github.com/v-iashin/Synchformer, its code (no data, no media) in .official/.
# Both folders are git-ignored; carry them with the call. Never commit either.
#
#   bash bench/gpu_prepare.sh [OFFICIAL_CHECKOUT_OR_GIT_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-python3}
rm -rf .wheels && mkdir -p .wheels
# The versions this repository is tested with (setup.py ranges admit them).
"$py" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .wheels \
    array_record==0.8.6 av==18.1.1 grain==0.2.18 ml_collections==1.1.0 portpicker==1.6.0 \
    zstandard==0.25.0 dm-tree==0.1.10 omegaconf==2.3.0 ftfy==6.3.1 wcwidth==0.9.5
# omegaconf's parser runtime is published as a source archive only: build its (pure-Python) wheel.
"$py" -m pip wheel -q --no-deps -w .wheels antlr4-python3-runtime==4.9.3
if [ $# -ge 1 ]; then
    src=$1
    rm -rf .official && mkdir -p .official
    if [ -d "$src/.git" ]; then gitdir="$src/.git"; else gitdir="$src"; fi
    # The code and configs the official model is built from; not its data lists, sample
    # media or bundled weights (one folder at a time: a partial mirror may lack those blobs).
    for part in model configs utils dataset; do
        git --git-dir="$gitdir" archive HEAD -- "$part" ':(exclude)*.pt' ':(exclude)*.pth' | tar -x -C .official
    done
    echo "official code $(git --git-dir="$gitdir" rev-parse --short HEAD) in .official/ ($(du -sh .official | cut -f1))"
fi
echo "wheels in .wheels/ ($(du -sh .wheels | cut -f1)): $(ls .wheels | tr '\n' ' ')"
