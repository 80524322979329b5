"""One trainer for all stages: `train_and_evaluate(config, workdir)`.

The step is jitted over a `Mesh` with `NamedSharding`s (data parallel, or FSDP for the
parameters and optimizer state), the state is donated, the step's randomness is the run
seed folded with the step number (a resumed run draws the same numbers), and the loss
is checked for finiteness. Only the trainable subset is differentiated and carries
optimizer state. Checkpoints hold the train state, the data iterator state and the
config; a restart resumes from the latest complete one by itself, refusing a changed
model or pipeline state and recording any other change of the config (`resume`).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import pathlib
import re
import signal
import time
from typing import Any, Callable, Iterable, Iterator, Optional

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import traverse_util

from synchformer_jax import experiment, metric_writers, optim, sharding, tasks
from synchformer_jax.evaluators.coverage import list_coverage
from synchformer_jax.evaluators.offset import OffsetMetrics
from synchformer_jax.input import device as device_lib
from synchformer_jax.input import pipeline, sources
from synchformer_jax.models import convert_torch
from synchformer_jax.models import synchformer as sf
from synchformer_jax.skip_log import SkipLog

log = logging.getLogger(__name__)
Params = Any


class PartialInitError(ValueError):
    """`init_from` would leave frozen parameters at their random init."""


class NonFiniteLossError(FloatingPointError):
    """Training stopped: the loss became NaN or infinite."""


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Params  # all parameters, float32
    opt_state: Any  # over the trainable subset only


@dataclasses.dataclass
class Trainer:
    """Everything a training run needs, built once from the config."""

    config: ml_collections.ConfigDict
    task: tasks.Task
    mesh: jax.sharding.Mesh
    tx: optax.GradientTransformation
    schedule: optax.Schedule
    state_shardings: Any
    train_step: Callable
    predict_step: Callable
    recipe_devices: int  # the device count the device-scaled recipe (lr, warm-up, stage-I pools) uses


# ---------------------------------------------------------------- parameters ----------
def _abstract_state(task: tasks.Task, tx: optax.GradientTransformation, frozen: str) -> TrainState:
    def init(rng):
        params = sf.init_params(task.model_config, rng)
        trainable, _ = optim.split_params(params, frozen)
        return TrainState(jnp.zeros((), jnp.int32), params, tx.init(trainable))

    return jax.eval_shape(init, jax.random.key(0))


def init_from(params: Params, source: str, config: ml_collections.ConfigDict,
              model_config) -> tuple[Params, list[str]]:
    """Overwrite every parameter that `source` has (by official key), keep the rest.

    `source`: a model folder, an official `.pt`/`.safetensors`, or an earlier stage's
    workdir (its latest checkpoint). Stage-I names (`v_encoder`) map to stage-II names
    (`vfeat_extractor`); a longer position table is truncated (stage II -> III).

    The parameters `source` lacks keep their random init. That is the point for the
    trainable ones (stage II's new sync transformer), and a silent failure for frozen
    ones (`optim.frozen`: a shallower stage-I run leaves the extra extractor blocks random
    and never trained), so those raise `PartialInitError` naming them, unless the config sets
    `init_from_partial = True` (random frozen parameters on purpose, e.g. an ablation).
    """
    from synchformer_jax import pretrained as model_files

    path = pathlib.Path(source)
    if (path / "checkpoints").is_dir():
        src_params, src_config = restore_params(path)
    else:
        loaded = model_files.load_model(path, overrides=dict(config.init_overrides))
        src_params, src_config = loaded.params, loaded.config
    state_dict = convert_torch.canonical_keys(convert_torch.flax_to_torch(src_params), model_config.kind, [])
    flat = traverse_util.flatten_dict(params)
    frozen = re.compile(config.optim.frozen) if config.optim.frozen else None
    used, notes, missing_frozen = 0, [], []
    for p, current in flat.items():
        key = convert_torch.flax_path_to_torch_key(p)
        if key not in state_dict:
            if frozen is not None and frozen.search("/".join(p)):
                missing_frozen.append("/".join(p))
            continue
        value = convert_torch.torch_to_flax_array(key, state_dict[key])
        if key == "transformer.pos_emb_cfg.pos_emb" and value.shape[1] > current.shape[1]:
            value = value[:, : current.shape[1]]
            notes.append(f"truncated the position table to {current.shape[1]} rows")
        if value.shape != tuple(current.shape):
            raise ValueError(f"{source}: {key} has shape {value.shape}, the model wants {tuple(current.shape)}")
        flat[p] = jnp.asarray(value, jnp.float32)
        used += 1
    if not used:
        raise ValueError(f"{source} ({src_config.kind}) shares no parameter with the {model_config.kind} model")
    if missing_frozen:
        n_frozen = sum(1 for p in flat if frozen.search("/".join(p)))
        what = (f"{source} lacks {len(missing_frozen)} of the model's {n_frozen} frozen parameters "
                f"(optim.frozen {config.optim.frozen!r}): {', '.join(missing_frozen[:4])}"
                f"{', ...' if len(missing_frozen) > 4 else ''}")
        if not config.get("init_from_partial", False):
            raise PartialInitError(f"{what}. They would keep their random init and never train. Initialise from "
                                   "a model of the same depths (e.g. a stage-I run with this model config), or "
                                   "set init_from_partial=True to train on random frozen parameters on purpose")
        notes.append(f"{what}: left random (init_from_partial)")
    notes.insert(0, f"initialised {used} of {len(flat)} tensors from {source}")
    return traverse_util.unflatten_dict(flat), notes


# ---------------------------------------------------------------- steps ---------------
def build_trainer(config: ml_collections.ConfigDict, mesh: Optional[jax.sharding.Mesh] = None,
                  recipe_devices: Optional[int] = None) -> Trainer:
    """`recipe_devices`: the device count the official device-scaled rules use (peak lr x
    devices, warm-up / devices, stage-I InfoNCE pools per device); default the mesh's. A
    resumed run passes the count it started with (`resume.RunPosition`)."""
    mesh = mesh or sharding.mesh_from_config(config.mesh)
    model_config = experiment.model_config(config)
    num_devices = recipe_devices or mesh.size
    task = tasks.get_task(config.stage, model_config, negative_pools(config, num_devices))
    schedule = optim.learning_rate(config.optim, num_devices, config.train.num_steps)
    tx = optim.make_optimizer(config.optim, schedule)
    frozen = config.optim.frozen

    abstract = _abstract_state(task, tx, frozen)
    state_shardings = TrainState(sharding.replicated(mesh), sharding.tree_shardings(mesh, abstract.params),
                                 sharding.tree_shardings(mesh, abstract.opt_state))
    batch_sharding = sharding.batch_sharding(mesh)
    repl = sharding.replicated(mesh)

    def step_fn(state: TrainState, batch, rng):
        step_rng = jax.random.fold_in(rng, state.step)
        trainable, fixed = optim.split_params(state.params, frozen)

        def loss_of(t):
            return task.loss_fn(optim.merge_params(t, fixed), batch, step_rng, True)

        (loss, metrics), grads = jax.value_and_grad(loss_of, has_aux=True)(trainable)
        updates, opt_state = tx.update(grads, state.opt_state, trainable)
        trainable = optax.apply_updates(trainable, updates)
        params = task.constrain(optim.merge_params(trainable, fixed))
        metrics = dict(metrics, grad_norm=optim.global_norm(grads), param_norm=optim.global_norm(trainable),
                       learning_rate=schedule(state.step))
        return TrainState(state.step + 1, params, opt_state), metrics

    train_step = jax.jit(step_fn, in_shardings=(state_shardings, batch_sharding, repl),
                         out_shardings=(state_shardings, repl), donate_argnums=(0,))
    predict_step = jax.jit(task.predict_fn, in_shardings=(state_shardings.params, batch_sharding))
    return Trainer(config, task, mesh, tx, schedule, state_shardings, train_step, predict_step, num_devices)


def negative_pools(config: ml_collections.ConfigDict, num_devices: int) -> int:
    """Stage-I InfoNCE pools of a global batch: one per device (official), one pool of the
    whole batch (`train.negatives="global"`), or pools of `train.pool_clips` clips."""
    if config.stage != experiment.STAGE_AVCLIP:
        return 1
    if config.train.get("pool_clips", 0):
        return max(1, config.data.batch_size // config.train.pool_clips)
    return num_devices if config.train.negatives == "device" else 1


def check_batch_sizes(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh, *, training: bool = True) -> None:
    """The batch sizes against the processes, the mesh and the stage-I pools of
    `train.pool_clips` (one pool per device always fits a batch that fits the mesh), at start-up
    rather than at the first batch or the first evaluation (hours into a run): a one-line
    `cli.ConfigError` naming the setting and the sizes that fit."""
    from synchformer_jax.cli import ConfigError  # cli imports only the standard library and numpy

    procs, shards = jax.process_count(), mesh.size  # the batch axis spans the whole (data, fsdp) mesh
    names = ("data.batch_size", "data.eval_batch_size") if training else ("data.eval_batch_size",)
    problems = []
    for name in names:
        value = config.data[name.split(".")[1]]
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            problems.append(f"{name}={value!r} must be a positive whole number of clips")
        elif value % procs or value % shards:
            unit = np.lcm(procs, shards)
            problems.append(f"{name}={value} does not split over {procs} process{'es' * (procs != 1)} and "
                            f"{shards} device{'s' * (shards != 1)} (the global batch spans the mesh): use a "
                            f"multiple of {unit}, e.g. {name}={max(unit, value // unit * unit)}")
    pool_clips = config.train.get("pool_clips", 0) if config.stage == experiment.STAGE_AVCLIP else 0
    if training and not problems and pool_clips and config.data.batch_size % pool_clips:
        problems.append(f"data.batch_size={config.data.batch_size} does not split into stage-I pools of "
                        f"train.pool_clips={pool_clips} clips")
    if problems:
        raise ConfigError("; ".join(problems))


def initial_state(trainer: Trainer, rng: jax.Array) -> tuple[TrainState, list[str]]:
    config = trainer.config
    frozen = config.optim.frozen
    init = jax.jit(lambda r: sf.init_params(trainer.task.model_config, r),
                   out_shardings=trainer.state_shardings.params)
    params = init(rng)
    notes: list[str] = []
    if config.init_from:
        params, notes = init_from(jax.device_get(params), config.init_from, config, trainer.task.model_config)
        params = jax.device_put(params, trainer.state_shardings.params)
    trainable, _ = optim.split_params(params, frozen)
    opt_state = jax.jit(trainer.tx.init, out_shardings=trainer.state_shardings.opt_state)(trainable)
    step = jax.device_put(jnp.zeros((), jnp.int32), trainer.state_shardings.step)
    return TrainState(step, params, opt_state), notes


# ---------------------------------------------------------------- data ----------------
def _shards(spec: str) -> list[str]:
    """Comma-separated globs, directories or files -> shard paths; an incomplete shard
    set or a directory of several splits fails here, at start-up (`shard_sets`)."""
    paths: list[str] = []
    for part in [p for p in spec.split(",") if p]:
        paths.extend(sources.expand_paths(part))
    return paths


def data_paths(config: ml_collections.ConfigDict, workdir: pathlib.Path) -> tuple[list[str], list[str]]:
    """Train and eval shard paths: `data.train_shards` and `eval_data_paths`, or, with no
    shards configured at all, the synthetic set (made on first use)."""
    if not config.data.train_shards:
        if config.data.eval_shards:
            # Training on generated clips while scoring real ones is never what was meant.
            raise ValueError(f"data.eval_shards is set ({config.data.eval_shards!r}) but data.train_shards is "
                             "empty: set data.train_shards too (the synthetic set is used only when neither is set)")
        from synchformer_jax.input import shards as shard_lib

        out = _synthetic_set(config, workdir)
        return ([str(p) for p in shard_lib.list_shards(out, split="train")],
                [str(p) for p in shard_lib.list_shards(out, split="eval")])
    return _shards(config.data.train_shards), eval_data_paths(config, workdir)


def eval_data_spec(config: ml_collections.ConfigDict, workdir: pathlib.Path) -> str:
    """What an evaluation reads, as recorded in its results: `data.eval_shards`, else
    `data.train_shards` (scoring the training clips), else the synthetic set's folder."""
    spec = config.data.eval_shards or config.data.train_shards
    if spec:
        return spec
    return f"synthetic eval split of {_synthetic_dir(config, workdir)}"


def eval_data_paths(config: ml_collections.ConfigDict, workdir: pathlib.Path) -> list[str]:
    """The shard files an evaluation reads (`eval_data_spec`); the train shards need not
    exist unless they are the evaluation set."""
    spec = config.data.eval_shards or config.data.train_shards
    if spec:
        return _shards(spec)
    from synchformer_jax.input import shards as shard_lib

    return [str(p) for p in shard_lib.list_shards(_synthetic_set(config, workdir), split="eval")]


def _synthetic_dir(config: ml_collections.ConfigDict, workdir: pathlib.Path) -> pathlib.Path:
    return pathlib.Path(config.data.synthetic_dir or pathlib.Path(workdir) / "synthetic")


def _synthetic_set(config: ml_collections.ConfigDict, workdir: pathlib.Path) -> pathlib.Path:
    """The synthetic set's folder, rendered by process 0 on first use."""
    from synchformer_jax import synthetic

    out = _synthetic_dir(config, workdir)
    marker = out / "done.json"
    if jax.process_index() == 0 and not marker.exists():
        clip = config.data.get("synthetic_clip")
        clip = clip.to_dict() if clip is not None else {}
        synthetic.make_dataset(out, config.data.synthetic_train, config.data.synthetic_eval,
                               seed=config.data.synthetic_seed, format=config.data.format,
                               workers=config.data.get("synthetic_workers", 1), **clip)
        marker.write_text(json.dumps({"train": config.data.synthetic_train, "eval": config.data.synthetic_eval,
                                      "clip": clip}))
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices("synthetic data ready")
    return out


def train_iterator(config, task: tasks.Task, paths: list[str], start_example: int = 0):
    """Training batches of this host: ArrayRecord or, with `data.format = "tfrecord"`,
    TFRecord shards read by random access (`data.tfrecord_access = "indexed"`: the same
    global shuffle and batches as ArrayRecord) or streamed (`"stream"`: split between hosts
    by shard, window-shuffled); the iterator's `get_state` / `set_state` go into the
    checkpoints. `start_example`: begin at that global example (`pipeline.train_dataset`;
    not for the stream, whose hosts read whole shards)."""
    fmt = config.data.get("format", "array_record")
    access = config.data.get("tfrecord_access", "indexed")
    if access not in experiment.TFRECORD_ACCESS:
        raise ValueError(f"data.tfrecord_access must be one of {experiment.TFRECORD_ACCESS}, got {access!r}")
    per_host = config.data.batch_size // jax.process_count()
    curriculum = config.data.get("window_curriculum") or {}
    phases = tuple(curriculum.get("phases") or ())
    cache = config.data.get("feature_cache", "")
    if cache and task.stage != experiment.STAGE_SYNC:
        from synchformer_jax.cli import ConfigError  # cli imports only the standard library and numpy

        # Stage I trains the extractors a cache would freeze; stage III needs 13-segment,
        # +-4.48 s examples with a synchronizability target that no stage-II cache holds.
        raise ConfigError(f"data.feature_cache ({cache!r}) serves stage-II ({experiment.STAGE_SYNC!r}) training "
                          f"only; this run is stage {task.stage!r}: set --config.data.feature_cache=''")
    if cache:
        from synchformer_jax import feature_cache

        return feature_cache.train_iterator(cache, task.model_config, batch_size=per_host,
                                            seed=config.seed, process_index=jax.process_index(),
                                            process_count=jax.process_count(), window_curriculum=phases,
                                            keep_centred=curriculum.get("keep_centred", 0.0),
                                            workers=config.data.read_threads)
    if phases:
        # The anchors the phases centre on exist in feature caches only.
        raise ValueError("data.window_curriculum needs stage-II training from data.feature_cache "
                         f"(stage {task.stage!r}, feature_cache {config.data.get('feature_cache', '')!r})")
    augment = _stage1_augment(task.example_spec) if config.data.augment else None
    kw = dict(batch_size=per_host, seed=config.seed, process_index=jax.process_index(),
              process_count=jax.process_count(), num_workers=config.data.num_workers, augment=augment)
    if fmt == "tfrecord" and access == "stream":
        if start_example:
            raise ValueError("a streamed TFRecord run cannot start at a global example (its hosts read whole "
                             "shards); use data.tfrecord_access=\"indexed\"")
        ds = pipeline.tfrecord_train_dataset(paths, task.example_spec, **kw)
    elif fmt == "tfrecord":
        ds = pipeline.tfrecord_indexed_train_dataset(paths, task.example_spec, read_threads=config.data.read_threads,
                                                     start_example=start_example, **kw)
    elif fmt == "array_record":
        ds = pipeline.train_dataset(paths, task.example_spec, read_threads=config.data.read_threads,
                                    start_example=start_example, **kw)
    else:
        raise ValueError(f"data.format must be 'array_record' or 'tfrecord', got {fmt!r}")
    return iter(ds)


def _stage1_augment(spec: pipeline.ExampleSpec) -> pipeline.Stage1Augment:
    # The augmentation makes the crop itself (the official sometimes-upscale 192 -> 224):
    # both sizes follow the model's input size, or every clip would be cropped to 224.
    from synchformer_jax.input import augment as augment_lib

    crop = spec.crop_size
    return pipeline.Stage1Augment(augment_lib.Stage1AugmentConfig(
        crop_size=crop, smaller_crop_size=round(crop * 192 / 224)))


@dataclasses.dataclass
class EvalBatches:
    """This host's evaluation batches (iterate once) and the number of clips they are
    drawn from (an example's clip is `index % num_clips`, whatever the round or host)."""
    batches: Iterator[dict]
    num_clips: int

    def __iter__(self) -> Iterator[dict]:
        return self.batches


def eval_batches(config, task: tasks.Task, paths: list[str],
                 spec: Optional[pipeline.ExampleSpec] = None) -> EvalBatches:
    """This host's evaluation batches; the same number on every host, from either format
    (`pipeline.eval_dataset` / `pipeline.tfrecord_eval_dataset` yield identical batches).
    With `data.fixed_offsets`, a clip whose record has offset labels is scored at them,
    one without at the seeded draw of the random protocol (`meta["offset"]` says which).
    `spec`: other examples than the task's (`OffsetModel.task.example_spec`)."""
    fmt = config.data.get("format", "array_record")
    if fmt not in ("array_record", "tfrecord"):
        raise ValueError(f"data.format must be 'array_record' or 'tfrecord', got {fmt!r}")
    make = pipeline.tfrecord_eval_dataset if fmt == "tfrecord" else pipeline.eval_dataset
    spec = dataclasses.replace(spec or task.example_spec, train=False)
    fixed = "labels" if (config.data.fixed_offsets and task.stage == experiment.STAGE_SYNC) else None
    per_host = config.data.eval_batch_size // jax.process_count()
    ds = make(paths, spec, batch_size=per_host, seed=config.seed, rounds=config.data.eval_rounds,
              fixed_offsets=fixed, process_index=jax.process_index(),
              process_count=jax.process_count(), read_threads=config.data.read_threads)
    return EvalBatches(iter(ds), ds.num_clips)


# ---------------------------------------------------------------- evaluation ----------
class EmptyEvaluationError(ValueError):
    """An evaluation that scored no clip: its metrics would be meaningless (accuracy 0.0)."""


@dataclasses.dataclass
class OffsetModel:
    """A stage-II model scored next to the trainer's synchronizability model
    (`evaluate(offset_model=...)`); `predict_step(params, offset params, batch)`."""
    task: tasks.CombinedSyncOffsetTask
    params: Params
    predict_step: Callable


def build_offset_model(trainer: Trainer, params: Params, model_config) -> OffsetModel:
    """`params` of the offset model `model_config` on the trainer's mesh, and the jitted
    prediction of both models. Raises ValueError when the model does not fit
    (`tasks.offset_model_misfit`)."""
    combined = tasks.CombinedSyncOffsetTask(trainer.task, tasks.get_task(experiment.STAGE_SYNC, model_config))
    shardings = sharding.tree_shardings(trainer.mesh, params)
    step = jax.jit(combined.predict_fn, in_shardings=(trainer.state_shardings.params, shardings,
                                                      sharding.batch_sharding(trainer.mesh)))
    return OffsetModel(combined, jax.device_put(params, shardings), step)


def evaluate(trainer: Trainer, params: Params, batches: Iterable[dict], max_batches: int = 0,
             skips: Optional[pipeline.SkipReport] = None, offset_model: Optional[OffsetModel] = None) -> dict:
    """The stage's metrics over `batches`, plus `skipped_records` (summed over hosts),
    `offsets_fixed` / `offsets_drawn` (clips scored at a record's fixed offset / at a
    drawn one; stages with offsets) and, for `EvalBatches`, `clips_evaluated` (distinct
    clips scored, across rounds and hosts). `skips` (this host's) receives the skipped
    records' descriptions. Raises `EmptyEvaluationError` when nothing was scored.

    `offset_model` (synchronizability stage; `batches` of `offset_model.task.example_spec`):
    also `offset_at_sync_threshold`, the offset metrics of the items the
    synchronizability model accepts, per threshold (`CombinedSyncOffsetMetrics`)."""
    from jax.experimental import multihost_utils

    stage = trainer.task.stage
    combined = None
    if offset_model is not None:
        from synchformer_jax.evaluators.synchronizability import CombinedSyncOffsetMetrics
        combined = CombinedSyncOffsetMetrics()
    if stage == experiment.STAGE_AVCLIP:
        from synchformer_jax.evaluators.retrieval import RetrievalMetrics
        # Officially windows of 8 of the 14 segments; a model with fewer segments gets
        # shorter windows, at least two of them (one window would always score 1).
        segments = trainer.task.model_config.n_segments
        metrics = RetrievalMetrics(window=min(8, max(1, segments - 1)))
    elif stage == experiment.STAGE_SYNCHRONIZABILITY:
        from synchformer_jax.evaluators.synchronizability import SynchronizabilityMetrics
        metrics = SynchronizabilityMetrics()
    else:
        metrics = OffsetMetrics(trainer.task.model_config.sync.num_offset_classes)
    skips = skips if skips is not None else pipeline.SkipReport()
    skipped_before = skips.count
    offset_counts = np.zeros(2, np.int64)  # this host's scored clips at (fixed, drawn) offsets
    scored_indices = []

    def score(out, batch) -> None:
        out = multihost_utils.process_allgather(out, tiled=True)
        mask = np.asarray(multihost_utils.process_allgather(batch["mask"], tiled=True))
        scored_indices.append(np.asarray(multihost_utils.process_allgather(batch["index"], tiled=True))[mask])
        if stage == experiment.STAGE_AVCLIP:
            metrics.update(out["video_emb"], out["audio_emb"], mask)
        else:
            target = np.asarray(multihost_utils.process_allgather(batch[trainer.task.target_key], tiled=True))
            metrics.update(np.asarray(out["logits"]), target, mask)
            if combined is not None:
                offset_target = np.asarray(multihost_utils.process_allgather(batch["offset_target"], tiled=True))
                combined.update(np.asarray(out["offset_logits"]), offset_target, np.asarray(out["logits"]),
                                target, mask)

    queued = None  # a batch's outputs are fetched once the next batch is queued behind it
    for i, host_batch in enumerate(batches):
        if max_batches and i >= max_batches:
            break
        skips.update(host_batch)
        host_mask = np.asarray(host_batch["mask"], bool)
        offsets = np.asarray(host_batch.get("meta", {}).get("offset", np.full(len(host_mask), "")))[host_mask]
        offset_counts += [np.sum(offsets == "fixed"), np.sum(offsets == "drawn")]
        batch = device_lib.host_to_global(host_batch, trainer.mesh, sharding.BATCH_AXES)
        if offset_model is None:
            out = trainer.predict_step(params, batch)
        else:
            out = offset_model.predict_step(params, offset_model.params, batch)
        if queued is not None:
            score(*queued)
        queued = (out, batch)
    if queued is not None:
        score(*queued)
    result = metrics.result()
    if combined is not None:
        result["offset_at_sync_threshold"] = combined.result()
    # A broken record is in exactly one host's slice and `meta` stays on that host: the
    # sum over hosts counts each once.
    per_host = np.concatenate([[skips.count - skipped_before], offset_counts]).astype(np.int32)
    skipped, fixed, drawn = (int(x) for x in np.sum(
        np.asarray(multihost_utils.process_allgather(per_host)).reshape(-1, 3), axis=0))
    result["skipped_records"] = skipped
    if fixed + drawn:
        result["offsets_fixed"], result["offsets_drawn"] = fixed, drawn
    num_clips = getattr(batches, "num_clips", None)
    if num_clips:
        scored = np.concatenate(scored_indices) if scored_indices else np.zeros(0, np.int64)
        result["clips_evaluated"] = int(np.unique(scored.astype(np.int64) % num_clips).size)
    if not result["count"]:
        first = f" (the first: {skips.items[skipped_before]})" if skips.count > skipped_before else ""
        raise EmptyEvaluationError(
            f"the evaluation scored no clips: {skipped} records were skipped{first}" if skipped else
            "the evaluation scored no clips: the evaluation data holds no records")
    return result


def restore_params(workdir: pathlib.Path) -> tuple[Params, Any]:
    """Params and model config of the latest checkpoint of a training workdir."""
    from synchformer_jax import checkpoint

    return checkpoint.restore_params(workdir)


# ---------------------------------------------------------------- the loop ------------
class _Preemption:
    """SIGTERM/SIGUSR1 (cluster preemption notices) -> save at the next step and stop."""

    def __init__(self) -> None:
        self.requested = False
        self._previous = {}
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: no handlers, no preemption saves
                pass

    def _handle(self, signum, frame) -> None:
        self.requested = True

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def _scalars(metrics: dict) -> dict:
    return {k: float(v) for k, v in jax.device_get(metrics).items()}


def _compile_step(trainer: Trainer, state: TrainState, batch: dict, rng: jax.Array) -> tuple[Callable, float]:
    """The train step compiled ahead of time (shapes are fixed), and its FLOPs from XLA's
    cost analysis for the MFU log (0 where the backend does not report them)."""
    compiled = trainer.train_step.lower(state, batch, rng).compile()
    try:
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        flops = float(cost.get("flops", 0.0))
    except Exception:  # cost analysis is best-effort on some backends
        flops = 0.0
    return compiled, flops


def _resumed_data(config: ml_collections.ConfigDict, trainer: Trainer, paths: list[str], position,
                  examples: int, workdir: pathlib.Path, step: int, changed: list) -> Iterator:
    """The training iterator of a resumed run: restored from the saved state, or, on another
    process count (whose slices the saved positions do not fit), begun at the global example
    the run reached. A feature cache's state (the step) fits any process count."""
    from synchformer_jax import resume

    cached = bool(config.data.get("feature_cache", ""))  # train_iterator allows it in stage II only
    if position.processes in (None, jax.process_count()) or cached:
        if position.examples is None and config.data.num_workers > 1:
            log.warning("the checkpoint of step %d predates batches that do not depend on data.num_workers: with "
                        "%d workers the examples of the epoch in progress come in another order from here on",
                        step, config.data.num_workers)
        data_iter = train_iterator(config, trainer.task, paths)
        try:
            data_iter.set_state(position.iterator)
        except (KeyError, TypeError, IndexError, ValueError) as exc:  # grain: another pipeline's state
            raise resume.iterator_error(workdir, step, changed, exc) from exc
        return data_iter
    log.warning("resuming on %d processes a run saved by %d: its data iterator state counts positions in each "
                "process's slice, so the stream starts again at global example %d (the examples the run consumed)",
                jax.process_count(), position.processes, examples)
    try:
        return train_iterator(config, trainer.task, paths, start_example=examples)
    except ValueError as exc:
        raise resume.ResumeError(f"{workdir}: step {step} was saved by {position.processes} processes, this run "
                                 f"has {jax.process_count()}: {exc}") from exc


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | pathlib.Path) -> dict:
    """Train `config.train.num_steps` steps (resuming from `workdir` if it holds a run),
    evaluating every `eval_every` steps and at the end. Returns the final metrics."""
    from synchformer_jax import checkpoint, resume

    workdir = pathlib.Path(workdir).absolute()
    workdir.mkdir(parents=True, exist_ok=True)
    # The config's errors (mesh, batch sizes, shards) before the checkpoint manager makes its folder.
    mesh = sharding.mesh_from_config(config.mesh)
    check_batch_sizes(config, mesh)
    train_paths, eval_paths = data_paths(config, workdir)
    ckpts = checkpoint.RunCheckpoints(workdir, config.train.keep_checkpoints, config.train.best_metric)
    start = ckpts.latest_step()
    position = resume.RunPosition.from_json(ckpts.saved_data_state(start)) if start is not None else None
    trainer = build_trainer(config, mesh, recipe_devices=position.recipe_devices if position else None)
    if start is None:
        data_iter = train_iterator(config, trainer.task, train_paths)
        state, notes = initial_state(trainer, jax.random.key(config.seed))
        for note in notes:
            log.info(note)
        start, examples = 0, 0
    else:
        saved_config = ckpts.saved_config(start)
        changed = resume.changes(saved_config, config)
        resume.check_architecture(workdir, start, changed)
        abstract = checkpoint.abstract_with_shardings(
            _abstract_state(trainer.task, trainer.tx, config.optim.frozen), trainer.state_shardings)
        try:
            state = ckpts.restore(start, abstract)
        except (ValueError, KeyError, TypeError) as exc:  # orbax: another tree or other shapes
            raise resume.state_error(workdir, start, changed, exc) from exc
        # Format-1 states (no count) come from runs whose batch size is the saved config's.
        examples = (position.examples if position.examples is not None
                    else start * int(saved_config.get("data", {}).get("batch_size", config.data.batch_size)))
        if trainer.recipe_devices != trainer.mesh.size:
            peak, warmup = optim.device_scaled(config.optim, trainer.recipe_devices)
            log.warning("resuming on %d devices a run that started on %d: it keeps the recipe it was scaled for "
                        "(peak learning rate %.4g, warm-up %d steps, stage-I negatives in %d pools)",
                        trainer.mesh.size, trainer.recipe_devices, peak, warmup, trainer.task.negative_pools)
        data_iter = _resumed_data(config, trainer, train_paths, position, examples, workdir, start, changed)
        resume.record(workdir, start, changed + position.topology_changes(jax.process_count(), trainer.mesh.size),
                      write=jax.process_index() == 0)
        log.info("resumed from step %d", start)
    if config.data.get("feature_cache", ""):  # stage II (train_iterator refuses it elsewhere)
        # Only now are the run's frozen extractors known (init_from or the checkpoint).
        from synchformer_jax import feature_cache
        feature_cache.verify_for_training(
            config.data.feature_cache, state.params, train_paths, extractors_from=config.init_from,
            accept_other_shards=config.data.get("feature_cache_accept_other_shards", False))
    if jax.process_index() == 0:
        (workdir / "config.json").write_text(config.to_json_best_effort(indent=1))

    writer = metric_writers.create_default_writer(workdir)
    rng = jax.random.key(config.seed + 1)
    flops_per_step = None
    peak = float(config.train.get("peak_flops_per_device", 0.0)) * trainer.mesh.size
    preemption = _Preemption()
    skip_log = SkipLog(workdir, jax.process_index(), jax.process_count())
    skips = pipeline.SkipReport()
    skips.count = skip_log.resume(start)  # the count runs on across resumes, as skipped.jsonl does
    eval_coverage = list_coverage(eval_paths)
    step = start
    final: dict = {}
    tick, tick_step = time.perf_counter(), step
    # The loss of a step is read (a wait for the device) once the next step is queued behind
    # it, so the host makes batch n + 1 while the device runs step n; a step that is logged,
    # evaluated or saved is checked first, so no non-finite state is ever logged or saved.
    unchecked: list = []

    def check_loss() -> None:
        while unchecked:
            at, m = unchecked.pop()
            loss = float(m["loss"])
            if not np.isfinite(loss):
                raise NonFiniteLossError(f"loss became {loss} at step {at}; stopping (last checkpoint: "
                                         f"{ckpts.latest_step()})")

    try:
        while step < config.train.num_steps:
            host_batch = next(data_iter)
            skip_log.append("train", step + 1, host_batch.get("meta", {}).get("skipped", ()))
            skips.update(host_batch)
            batch = device_lib.host_to_global(host_batch, trainer.mesh, sharding.BATCH_AXES)
            if flops_per_step is None:
                step_fn, flops_per_step = _compile_step(trainer, state, batch, rng)
            state, metrics = step_fn(state, batch, rng)
            check_loss()  # the step before this one
            step += 1
            unchecked.append((step, metrics))
            if step % config.train.log_every == 0 or step == config.train.num_steps:
                check_loss()
                now = time.perf_counter()
                record = {"phase": "train", **_scalars(metrics),
                          "steps_per_sec": (step - tick_step) / max(now - tick, 1e-9),
                          "examples_per_sec": config.data.batch_size * (step - tick_step) / max(now - tick, 1e-9),
                          "skipped_records": skips.count}
                if flops_per_step and peak:
                    record["mfu"] = flops_per_step * record["steps_per_sec"] / peak
                tick, tick_step = now, step
                writer.write(step, record)
                log.info("step %d: %s", step, {k: round(v, 5) for k, v in record.items() if isinstance(v, float)})
            evaluate_now = step % config.train.eval_every == 0 or step == config.train.num_steps
            if evaluate_now:
                check_loss()
                eval_skips = pipeline.SkipReport()
                try:
                    final = evaluate(trainer, state.params, eval_batches(config, trainer.task, eval_paths),
                                     config.train.eval_max_batches, skips=eval_skips)
                finally:
                    skip_log.append("eval", step, eval_skips.items)
                if eval_coverage is not None:
                    final.update(clips_listed=eval_coverage.listed, clips_missing=len(eval_coverage.missing))
                    warning = eval_coverage.warning(final.get("clips_evaluated"))
                    if warning:
                        log.warning("eval at step %d: %s", step, warning)
                writer.write(step, {"phase": "eval", **{k: v for k, v in metric_writers.json_values(final).items()
                                                        if k != "roc_curve"}})
                log.info("eval at step %d: %s", step, {k: v for k, v in final.items() if isinstance(v, float)})
                best = config.train.best_metric
                if best and best not in final:
                    # A misspelt metric would silently never save a best checkpoint.
                    raise ValueError(f"train.best_metric={best!r} is not reported by this evaluation; it reports "
                                     + ", ".join(sorted(k for k, v in final.items() if isinstance(v, (int, float)))))
            examples += config.data.batch_size
            if step % config.train.checkpoint_every == 0 or step == config.train.num_steps or preemption.requested:
                check_loss()
                data_state = resume.RunPosition(data_iter.get_state(), examples, jax.process_count(),
                                                trainer.mesh.size, trainer.recipe_devices).to_json()
                ckpts.save(step, state, data_state, config, force=True)
                if evaluate_now and config.train.best_metric in final:
                    ckpts.save_best(step, state, data_state, config,
                                    {config.train.best_metric: final[config.train.best_metric]})
            if preemption.requested:
                log.warning("preemption notice: saved step %d, stopping", step)
                break
    finally:
        writer.close()
        ckpts.wait()
        ckpts.close()
        preemption.restore()
    if jax.process_index() == 0 and final:
        record = {"step": step, **metric_writers.json_values(final)}
        (workdir / "eval_metrics.json").write_text(json.dumps(record, indent=1, allow_nan=False))
    return final


if __name__ == "__main__":
    # `python -m synchformer_jax.train --config configs/sync.py:vggsound --workdir DIR
    # [--config.x=y ...]`: the same as `synchformer-jax train` (config loading, overrides,
    # multi-host initialisation live in cli.py).
    import sys

    from synchformer_jax import cli

    sys.exit(cli.main(["train", *sys.argv[1:]]))
