# Tiny model on the embedded synthetic set: a CPU-sized smoke run of any stage, and the
# config the tests train with.
#
#   synchformer-jax train --config configs/tiny.py:sync --workdir /tmp/tiny_sync
#   synchformer-jax train --config configs/tiny.py:segment_avclip --workdir /tmp/tiny_avclip
#   synchformer-jax eval  --config configs/tiny.py:sync --workdir /tmp/tiny_sync --checkpoint latest
#
# Expected: the run finishes in minutes on a laptop CPU, the loss is finite and the
# metrics JSON is written. No accuracy target: 8 steps of a 2-layer model on 16 clips is
# a plumbing check, not training (chance is 1/21 for stage II, 1/2 for stage III).
#
# Widths follow `models.config.tiny_config` (the reference parity set's tiny model), so
# the same structure as the official model runs, only narrower and shallower. The time
# geometry is official (16-frame / 0.64 s segments, 14 / 13 of them, the 21-class offset
# grid); frames are 64 px instead of 224 (16 instead of 196 patches per frame: a tiny
# stage-I step at 224 px and batch 8 costs ~30 CPU s, which no test can afford), cut
# from 72-px synthetic clips so that the crop keeps the whole scene.
import ml_collections

from synchformer_jax import experiment

STAGES = {"segment_avclip": experiment.STAGE_AVCLIP, "avclip": experiment.STAGE_AVCLIP,
          "stage1": experiment.STAGE_AVCLIP, "sync": experiment.STAGE_SYNC, "stage2": experiment.STAGE_SYNC,
          "synchronizability": experiment.STAGE_SYNCHRONIZABILITY,
          "stage3": experiment.STAGE_SYNCHRONIZABILITY}
ARGS = ("segment_avclip", "sync", "synchronizability")  # the documented arguments


def get_config(arg=None) -> ml_collections.ConfigDict:
    arg = arg or "sync"
    if arg not in STAGES:
        raise ValueError(f"configs/tiny.py: unknown argument {arg!r}; expected one of {ARGS}")
    c = experiment.default_config(STAGES[arg])

    # models.config.tiny_config()
    c.model.audio.hidden_size = 96
    c.model.audio.num_layers = 2
    c.model.audio.num_heads = 4
    c.model.audio.mlp_dim = 384
    c.model.video.embed_dim = 96
    c.model.video.depth = 2
    c.model.video.num_heads = 4
    c.model.sync.n_embd = 64
    c.model.sync.n_layer = 2
    c.model.sync.n_head = 4
    c.model.video.img_size = 64  # the pipeline crops to this size


    # 8 divides the test suite's 8 fake CPU devices as well as 1, 2 and 4 real ones.
    c.data.batch_size = 8
    c.data.eval_batch_size = 8
    c.data.synthetic_train = 16
    c.data.synthetic_eval = 8
    c.data.synthetic_clip = ml_collections.ConfigDict({"height": 72, "width": 72})  # just above the 64-px crop
    c.data.read_threads = 2

    # Larger than the official rates: a few steps should visibly move the loss.
    c.optim.lr = 1e-3 if STAGES[arg] == experiment.STAGE_AVCLIP else 1e-4
    c.optim.warmup_steps = 2

    c.train.num_steps = 8
    c.train.log_every = 2
    c.train.eval_every = 8
    c.train.checkpoint_every = 4
    c.train.keep_checkpoints = 2
    c.train.compute_dtype = "float32"  # bfloat16 matmuls are emulated (slow) on CPU
    c.lock()
    return c
