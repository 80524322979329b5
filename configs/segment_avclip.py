# Stage I, Segment AVCLIP: contrastive pre-training of both feature extractors
# (official `configs/segment_avclip.yaml`, spec §5.1).
#
#   synchformer-jax train --config configs/segment_avclip.py:vggsound --workdir workdirs/segment_avclip_vggsound
#   synchformer-jax train --config configs/segment_avclip.py:lrs3     --workdir workdirs/segment_avclip_lrs3
#   synchformer-jax train --config configs/segment_avclip.py:audioset --workdir workdirs/segment_avclip_audioset
#   (multi-host: launch/slurm_multinode_gpu.sbatch or launch/tpu_vm_pod.sh with the same arguments)
#
# What it should reach: stage I has no headline number of its own; its product is the
# pair of extractors that stage II (configs/sync.py) trains on top of. The official runs
# (README) took LRS3 ~10 h (30 epochs), VGGSound 24 h (20 epochs), AudioSet 12 days
# (28 epochs, loss not saturated) on 4 nodes of AMD MI250. The validation metric is the
# zero-shot "sync with shifts" `precision` (7x7 sliding-window retrieval; chance 1/7).
#
# Official recipe, kept here (see experiment.default_config for every other field):
# * AdamW, lr 1e-4 (LRS3 5e-5), NOT scaled with the number of devices; eps 1e-8; no
#   weight decay; clip 1.0; warm-up 1000 // world_size steps, then cosine to zero over
#   100 epochs' worth of steps (the official cosine is laid out over num_epochs = 100
#   and the runs were stopped early, so the epochs above are where they stopped).
# * 2 clips x 14 segments per device; InfoNCE negatives from the device's own clips
#   (train.negatives = "device", as the official DDP loss without gathering).
# * Drop path 0.2 in the Motionformer, augmentations on (LRS3: off, see below).
#
# Memory (docs/benchmarks.md): without remat, XLA:CPU plans 37 GB for one full-size clip
# in float32 (not yet measured on a GPU; the official fp16 code fits 4 per 80 GB). For more clips
# per device, --config.model.remat=True (~2.7 GiB per clip in bfloat16 on an H100: 24 fit);
# --config.model.scan_blocks=True runs each extractor's blocks as one lax.scan (one block
# compiled; on CPUs only the scanned remat actually saves memory); and
# --config.model.remat_policy=dots keeps the blocks' matmul outputs (less recompute, more
# memory); --config.model.time_attention_pack=14 packs a patch row into each time-attention
# sequence (fuller cuDNN tiles, and a time attention cuDNN can train; not yet timed on a GPU).
# None of these changes the parameters or the results beyond float rounding, and a resumed
# run may switch them.
import ml_collections

from synchformer_jax import experiment

# Official world size: 4 nodes x 4 MI250 (README). The global batch keeps the official
# 2 clips per device on 16 devices; on N devices use --config.data.batch_size=2N so each
# device's negative pool stays 2 clips (the lr does not depend on it in stage I).
OFFICIAL_WORLD = 16
PER_DEVICE_BATCH = 2
EPOCHS_OF_COSINE = 100

# name: (train clips after the official filters, where the run stopped, lr, augmentations)
DATASETS = {
    "lrs3": dict(train_clips=46_400, stopped_epoch=30, lr=5e-5, augment=False),
    "vggsound": dict(train_clips=156_700, stopped_epoch=20, lr=1e-4, augment=True),
    # AudioSet unbalanced train: ~2.0M listed; fewer are downloadable (approximate).
    "audioset": dict(train_clips=2_000_000, stopped_epoch=28, lr=1e-4, augment=True),
}
# Record locations are relative to the working directory (see data/README.md for
# `synchformer-jax prepare`); override with --config.data.train_shards=... .
SHARDS = {
    "lrs3": ("records/lrs3/lrs3-train.array_record-*", "records/lrs3/lrs3-valid.array_record-*"),
    "vggsound": ("records/vggsound/vggsound-train.array_record-*", "records/vggsound/vggsound-valid.array_record-*"),
    "audioset": ("records/audioset/audioset-train.array_record-*", "records/audioset/audioset-valid.array_record-*"),
}
ARGS = tuple(DATASETS)  # the documented arguments


def get_config(arg=None) -> ml_collections.ConfigDict:
    arg = arg or "vggsound"
    if arg not in DATASETS:
        raise ValueError(f"configs/segment_avclip.py: unknown dataset {arg!r}; expected one of {ARGS}")
    d = DATASETS[arg]
    c = experiment.default_config(experiment.STAGE_AVCLIP)
    c.data.train_shards, c.data.eval_shards = SHARDS[arg]
    c.data.batch_size = PER_DEVICE_BATCH * OFFICIAL_WORLD
    c.data.eval_batch_size = PER_DEVICE_BATCH * OFFICIAL_WORLD
    # LRS3: sometimes_upscale_p = p_color_jitter = p_gray_scale = p_audio_aug = 0 in the
    # official sbatch. `data.augment` is all-or-nothing here, so the per-segment flips the
    # official LRS3 run keeps (p 0.5) are off as well.
    c.data.augment = d["augment"]

    c.optim.lr = d["lr"]  # global: stage I does not scale the lr with the devices
    steps_per_epoch = d["train_clips"] // c.data.batch_size  # drop_last=True
    c.train.num_steps = EPOCHS_OF_COSINE * steps_per_epoch
    # Validation, checkpoint and best-model selection once per epoch (official).
    c.train.eval_every = steps_per_epoch
    c.train.checkpoint_every = steps_per_epoch
    c.train.log_every = 50
    c.lock()
    return c
