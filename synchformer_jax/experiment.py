"""The experiment configuration: every field with its default, in code.

Files in `configs/` start from `default_config(stage)` and change only what differs;
any field can then be overridden from the command line (`--config.optim.lr=1e-4`).
The model part mirrors `ModelConfig` field by field, so that overrides such as
`--config.model.sync.n_layer=2` reach the architecture.
"""
from __future__ import annotations

import re

import ml_collections

from synchformer_jax.input.shards import FORMATS as DATA_FORMATS
from synchformer_jax.models.config import (HEAD_OFFSET, HEAD_SYNCHRONIZABILITY, KIND_AVCLIP, KIND_SYNC,
                                           ModelConfig)

STAGE_AVCLIP = "segment_avclip"  # stage I
STAGE_SYNC = "sync"  # stage II
STAGE_SYNCHRONIZABILITY = "synchronizability"  # stage III
STAGES = (STAGE_AVCLIP, STAGE_SYNC, STAGE_SYNCHRONIZABILITY)
TFRECORD_ACCESS = ("indexed", "stream")  # `data.tfrecord_access`


def model_config_for_stage(stage: str, base: ModelConfig | None = None) -> ModelConfig:
    base = base or ModelConfig()
    if stage == STAGE_AVCLIP:
        return base.replace(kind=KIND_AVCLIP)
    if stage == STAGE_SYNC:
        return base.replace(kind=KIND_SYNC, **{"sync.head": HEAD_OFFSET})
    if stage == STAGE_SYNCHRONIZABILITY:
        return base.replace(kind=KIND_SYNC, n_segments=13, **{"sync.head": HEAD_SYNCHRONIZABILITY})
    raise ValueError(f"unknown stage {stage!r}; expected one of {STAGES}")


def default_config(stage: str = STAGE_SYNC) -> ml_collections.ConfigDict:
    """Official recipe of `stage` (spec §5) at full size, on synthetic data by default."""
    c = ml_collections.ConfigDict()
    c.stage = stage
    c.seed = 1337
    c.model = model_config_for_stage(stage).to_dict()
    # Where parameters start: a model folder, an official .pt/.safetensors, or a
    # training workdir of an earlier stage. Stage II takes the extractors from it;
    # stage III the whole sync model (table truncated to 13 segments).
    c.init_from = ""
    c.init_overrides = ml_collections.ConfigDict()  # e.g. head counts of unofficial widths
    # Frozen parameters (`optim.frozen`) the source lacks are an error: they would keep
    # their random init forever. True accepts that on purpose (an ablation).
    c.init_from_partial = False

    c.data = ml_collections.ConfigDict()
    c.data.format = "array_record"  # or "tfrecord"
    # TFRecord training: "indexed" (one pass over the record headers, then the ArrayRecord
    # pipeline: global shuffle, threaded decoding, the same batches as ArrayRecord shards of
    # the same records) or "stream" (shards read front to back, window shuffle; for storage
    # where a seek per record is expensive, such as object stores). A run resumes only with
    # the access it started with (the data iterator states differ).
    c.data.tfrecord_access = "indexed"
    c.data.train_shards = ""  # glob or comma-separated paths; empty: the synthetic set
    # What evaluation reads (training and the eval command); empty: the train shards, or,
    # when neither is set, the synthetic set's eval split. Only eval shards: an error for
    # training; the eval command reads them alone.
    c.data.eval_shards = ""
    c.data.synthetic_dir = ""  # where the synthetic set is made (default: <workdir>/synthetic)
    c.data.synthetic_train = 256
    c.data.synthetic_eval = 64
    c.data.synthetic_seed = 0
    # `synthetic.make_clip` arguments (empty: its defaults, 256 px as the input contract);
    # e.g. a smaller model input (`model.video.img_size`) wants smaller frames.
    c.data.synthetic_clip = ml_collections.ConfigDict()
    c.data.synthetic_workers = 1  # processes rendering/encoding clips (the output does not depend on it)
    c.data.batch_size = 16 if stage != STAGE_AVCLIP else 2  # global batch (per device x devices)
    c.data.eval_batch_size = 16
    c.data.eval_rounds = 1  # repeated random-offset rounds (LRS3 2, VGGSound-Sparse 25)
    # Stage II evaluation at the records' fixed offsets (labels offset_sec / vstart_sec,
    # from a fixed-offset CSV) where a record has them; a record without them gets the
    # seeded draw of the random protocol. The results count both (offsets_fixed / _drawn).
    c.data.fixed_offsets = True
    c.data.read_threads = 2  # decoding threads; with data.feature_cache, batch-making threads
    c.data.num_workers = 0
    c.data.augment = stage == STAGE_AVCLIP  # the official stage-I augmentations
    c.data.max_off_sec = 2.0
    # Stage II only: a folder built by `feature_cache.build_feature_cache` (frozen-extractor
    # features on a fixed segment grid, centre crop); training then reads features instead
    # of clips (evaluation stays on the clips). Empty: train on the clips.
    c.data.feature_cache = ""
    # The cache records the frozen extractors and the shards it was built from; training
    # refuses a mismatch. True accepts other shards (e.g. the same clips in another format).
    c.data.feature_cache_accept_other_shards = False
    # Stage II from a feature cache only: a synthetic-demo training schedule for clips with
    # one event each (`synthetic` cue "pulse"), whose time the cache stores per clip.
    # `phases`: ((num_steps, jitter_sec), ...) drawing only windows whose video segments
    # are centred within jitter of the event, then every window; `keep_centred`: the share
    # of every later batch kept at the first phase's jitter (feature_cache.CacheTrainIterator).
    # Empty phases: off.
    c.data.window_curriculum = ml_collections.ConfigDict({"phases": (), "keep_centred": 0.0})

    c.optim = ml_collections.ConfigDict()
    if stage == STAGE_AVCLIP:
        c.optim.name = "adamw"
        c.optim.lr = 1e-4  # not scaled with the number of devices (official)
        c.optim.lr_per_device = False
        c.optim.eps = 1e-8
        c.optim.schedule = "cosine"
        c.optim.warmup_steps = 1000
        c.optim.warmup_divided_by_devices = True  # official: warm-up // world size
    else:
        c.optim.name = "adam"
        c.optim.lr = 2e-6  # per device: official lr = 2e-6 x world size
        c.optim.lr_per_device = True
        c.optim.eps = 1e-7  # official value (chosen there because of fp16)
        c.optim.schedule = "constant"
        c.optim.warmup_steps = 1000  # linear from lr/100 to lr
        c.optim.warmup_divided_by_devices = False
    c.optim.b1 = 0.9
    c.optim.b2 = 0.999
    c.optim.weight_decay = 0.0
    c.optim.clip_norm = 1.0
    # Parameters (regex on "/"-joined paths) that receive no update and hold no optimizer
    # state: stage II/III train only the projections and the sync transformer.
    c.optim.frozen = "" if stage == STAGE_AVCLIP else r"^(vfeat_extractor|afeat_extractor)/"

    c.train = ml_collections.ConfigDict()
    c.train.num_steps = 100_000
    c.train.log_every = 50
    c.train.eval_every = 1000
    c.train.eval_max_batches = 0  # 0: the whole evaluation set
    c.train.checkpoint_every = 1000
    c.train.keep_checkpoints = 3
    c.train.best_metric = "precision" if stage == STAGE_AVCLIP else "accuracy_1"
    c.train.negatives = "device"  # stage I InfoNCE pool: "device" (official) or "global"
    # >0: pools of this many clips instead (the official pool is a GPU's 2 clips; this
    # keeps it on fewer devices with a larger per-device batch).
    c.train.pool_clips = 0
    c.train.compute_dtype = "bfloat16"  # model compute; params float32
    c.train.peak_flops_per_device = 0.0  # for MFU in the logs (e.g. ~8e14 bf16 on an H100); 0: not reported

    c.mesh = ml_collections.ConfigDict()
    c.mesh.data = -1  # -1: all remaining devices
    c.mesh.fsdp = 1  # >1 shards parameters and optimizer state (stage I)
    return c


def model_config(config: ml_collections.ConfigDict) -> ModelConfig:
    """The architecture a config describes, with the training compute dtype."""
    model = ModelConfig.from_dict(config.model.to_dict())
    return model.replace(dtype=config.train.compute_dtype)


# Values a misspelling would otherwise turn into something else without a word
# ("globl" negatives read as global). `train.best_metric` is checked against the first
# evaluation's keys (train.py): they depend on the stage's evaluators.
_CHOICES = {
    "stage": STAGES,
    "train.negatives": ("device", "global"),
    "optim.name": ("adam", "adamw"),
    "data.format": DATA_FORMATS,
    "data.tfrecord_access": TFRECORD_ACCESS,
}


def check_values(config: ml_collections.ConfigDict) -> None:
    """Raise ValueError for a config value outside its choices (names the field and them)."""
    for field, choices in _CHOICES.items():
        value = config
        for part in field.split("."):
            value = value.get(part) if hasattr(value, "get") else None
        if value is not None and value not in choices:
            raise ValueError(f"{field}={value!r}: choose one of {', '.join(map(str, choices))}")
    try:
        re.compile(config.optim.frozen)
    except re.error as e:
        raise ValueError(f"optim.frozen={config.optim.frozen!r} is not a regular expression ({e})") from None
