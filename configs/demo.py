# The CPU demo: `synchformer-jax demo [--workdir DIR] [--fast]` trains both stages of a
# tiny Synchformer on the procedural synthetic clips (onset cue, below) and evaluates
# stage II on held-out clips with fixed offsets. Target on a 2-core CPU: >= 50 % Acc@1
# and >= 80 % Acc@1 +-1 class (21 classes, chance 4.8 %) within 15 minutes. Measured
# (2026-11-24, this machine's 2 cores): 76.2 % Acc@1 / 96.5 % +-1 class on 256 held-out
# clips in 673 s wall (data 22 s, stage I 111 s, feature cache 118 s, stage II 421 s);
# other seeds and settings 69.5-83.2 % (docs/benchmarks.md "CPU demo").
# `--fast` runs a few steps of each stage only (a smoke test; the accuracy stays near chance).
"""Demo configs: `get_config("segment_avclip")` (stage I), `get_config("sync")` (stage II).

Both start from the official recipes (`experiment.default_config`) and change only what a
two-core CPU needs; every change says why. The structure stays official: 14 segments of
16 frames / 0.64 s, the stage-I segment InfoNCE over pools of 2 clips, stage II with
frozen extractors over the 21-class offset grid (-2.0 ... +2.0 s).

`get_config("sync,fast")` / `"segment_avclip,fast"`: the `--fast` step budget.
Usable directly as an ml_collections config file (`configs/demo.py:sync`); the demo
itself adds the shared synthetic folder, stage I's from-scratch init folder, stage II's
`init_from` and the feature cache folder inside its workdir, and builds the cache
between the stages (synchformer_jax/demo.py).
"""
from synchformer_jax import experiment
from synchformer_jax.models.config import tiny_config

# Model input side. 64 px instead of 224: the tiny model at 224 costs ~12x more per clip
# (196 vs 16 patches per frame), too slow for 15 minutes on 2 cores. The synthetic clips
# are rendered at 72 px so the random/centre crop keeps the whole scene (their geometry
# scales with the frame).
IMG_SIZE = 64
CLIP_SIZE = 72

# The cue: one lamp switches on for good, its hum starts in the same frame
# (`synthetic.make_clip(cue="onset")`), in the middle second of each 10-s clip (10 s:
# stage I's 14 x 0.64-s segments need 9 s), which ~90 % of the stage-II windows hold in
# both streams. Why not the default sparse events (2-5 short bounces/flashes/collisions
# per 10 s): the tiny sync transformer does not leave its loss plateau on them within a
# 2-core budget, even on ideal features (docs/benchmarks.md "Stage-II plateau"); an
# onset that stays on makes the share of "on" tokens in each stream a direct reading of
# the onset's place in that stream's window, which the transformer picks up in a few
# hundred steps. The sparse events stay the synthetic default for everything else.
# (Single short pulses do leave the plateau when the windows are first centred on them
# and then widened, `data.window_curriculum`; the schedule that reaches the official
# windows needs ~8,000 steps, over this demo's budget: configs/demo_pulse.py, whose
# model is the one evidence attribution can pin to an event.)
CLIP = dict(cue="onset")

# Stage II trains on a feature cache of the frozen stage-I extractors, built by the
# demo between the stages (synchformer_jax/feature_cache.py: centre crop, starts on
# the 0.32-s segment grid, no audio jitter; evaluation stays on the raw clips). A
# relative path is taken inside the demo's workdir; "" trains on the raw clips.
FEATURE_CACHE = "feature_cache"

# Step budgets (full demo / --fast).
STEPS = {"segment_avclip": 60, "sync": 1500}
FAST_STEPS = {"segment_avclip": 4, "sync": 8}


def _model(stage: str) -> dict:
    # The reference parity set's tiny widths (96-d extractors of 2 blocks, 64-d sync
    # transformer of 2 layers) at the official structure.
    base = tiny_config(**{"video.img_size": IMG_SIZE,
                          # 2 blocks, a few hundred steps: drop path only slows learning down.
                          "video.drop_path_rate": 0.0})
    return experiment.model_config_for_stage(stage, base).to_dict()


def get_config(arg: str = "sync"):
    stage, *opts = [a.strip() for a in arg.split(",")]
    fast = "fast" in opts
    c = experiment.default_config(stage)
    c.model = _model(stage)

    # Data: one synthetic set shared by both stages (the demo points `synthetic_dir` at it).
    c.data.synthetic_clip = dict(height=CLIP_SIZE, width=CLIP_SIZE, **CLIP)
    c.data.synthetic_train = 24 if fast else 256
    # Held-out clips, each with a fixed offset from its record labels: enough for the
    # accuracy to be known to about +-3 % (binomial standard error at 50 %, n = 256).
    c.data.synthetic_eval = 16 if fast else 256
    c.data.synthetic_workers = 2  # both cores render/encode while nothing else runs
    c.data.read_threads = 2  # decoding overlaps the step; more threads only contend
    c.data.eval_batch_size = 32
    # float32 on CPU: bfloat16 matmuls are emulated there and several times slower.
    c.train.compute_dtype = "float32"
    c.train.log_every = 2 if fast else 10
    c.train.keep_checkpoints = 1

    steps = (FAST_STEPS if fast else STEPS)[stage]
    c.train.num_steps = steps
    c.train.checkpoint_every = steps  # the end of each stage (the trainer also saves there)
    c.train.eval_every = steps  # evaluate once, at the end

    if stage == experiment.STAGE_AVCLIP:
        # 8 clips per step: 4 pools of the official 2 clips.
        c.data.batch_size = 8
        # InfoNCE pools of 2 clips (28 segments) as on each official GPU, not one pool of
        # the whole single-device batch.
        c.train.pool_clips = 2
        # The official colour/flip/audio augmentations cost more CPU than the tiny model;
        # with a few hundred steps there is nothing to regularise.
        c.data.augment = False
        # The official peak rate 1e-4 with a 10-step warm-up instead of 1000 (cosine kept).
        # From scratch, larger rates (3e-4, 1e-3; also with temperature 0.5 and one-clip
        # pools) collapsed every embedding onto one vector within ~20 steps (InfoNCE at
        # log(pool size)), which leaves stage II with near-constant frozen features.
        c.optim.lr = 1e-4
        c.optim.warmup_steps = 10
        c.optim.warmup_divided_by_devices = False
        # The retrieval metric over a subset of the held-out clips (a progress number).
        c.train.eval_max_batches = 2
    elif stage == experiment.STAGE_SYNC:
        # 32 cached windows per step (official: 16 per GPU on 16 GPUs); a cached step
        # costs only the projections and the sync transformer.
        c.data.batch_size = 32
        c.data.feature_cache = FEATURE_CACHE
        # Official: 2e-6 x 16 GPUs with a 1000-step warm-up, then constant; here 1e-3 after
        # a 30-step warm-up, decayed by a cosine over the short run so that the last steps
        # settle (Adam, eps, clipping official).
        c.optim.lr = 1e-3
        c.optim.warmup_steps = 30
        c.optim.schedule = "cosine"
        c.optim.lr_per_device = False  # the demo's rate is for the whole (1-device) batch
    else:
        raise ValueError(f"the demo has stages segment_avclip and sync, not {stage!r}")
    return c
