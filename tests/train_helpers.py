"""Shared pieces of the trainer tests: a very small experiment config, the synthetic set
they train on, and how to run `tests/train_driver.py` in a subprocess.

Everything is sized so that a compile of a whole train step takes seconds on a 2-core
CPU: a two-segment model with 32x32 crops, width 32 and one or two blocks per tower,
float32 compute (the comparisons are float32-tight), and a handful of short 64x64 clips.
"""
from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import subprocess
import sys
from typing import Optional, Sequence

import ml_collections
import numpy as np

from synchformer_jax import experiment
from synchformer_jax.models.config import tiny_config

TESTS_DIR = pathlib.Path(__file__).resolve().parent
DRIVER = TESTS_DIR / "train_driver.py"

# The clips: 8 s is the shortest stage II can cut its 5-s crop plus a +-2 s offset from;
# 64x64 frames keep decoding cheap (the crop is the model's 32x32 input).
# The driver's exit status when training stopped on a non-finite loss (train_driver.py).
NON_FINITE_EXIT = 3

CLIP_KW = dict(height=64, width=64, duration_sec=8.0)
N_TRAIN, N_EVAL = 16, 8


def make_synthetic(out: pathlib.Path) -> dict:
    """Train/eval shards of the synthetic set (16 + 8 clips) under `out`."""
    from synchformer_jax import synthetic

    made = synthetic.make_dataset(out, N_TRAIN, N_EVAL, seed=0, **CLIP_KW)
    return {split: ",".join(str(p) for p in paths) for split, paths in made.items()}


_SESSION: dict = {}


def session_synthetic(tmp_path_factory) -> dict:
    """One synthetic set per test session, shared by the trainer test modules (their
    configs then match, so `single_device_run` results can be shared too)."""
    if "shards" not in _SESSION:
        _SESSION["shards"] = make_synthetic(tmp_path_factory.mktemp("synthetic"))
    return _SESSION["shards"]


def stage1_config(shards: dict, **overrides) -> ml_collections.ConfigDict:
    """Stage I for the sharding and multi-process comparisons: global negatives, and drop
    path off. A two-process run's global batch holds the same examples as one process's
    but in another row order (process p feeds examples p, p+2, ... of each batch), and
    drop path draws per row, so with it on the two runs would legitimately differ."""
    return small_config(experiment.STAGE_AVCLIP, shards, **{"model.video.drop_path_rate": 0.0, **overrides})


def poisoned_shards(shards: dict, out: pathlib.Path, clip_ids) -> dict:
    """A copy of the train shards whose clips `clip_ids` carry NaN audio (a corrupt
    recording that decodes fine); eval shards unchanged."""
    from synchformer_jax import records
    from synchformer_jax.input import shards as shard_lib

    out.mkdir(parents=True, exist_ok=True)
    payloads = []
    for data in shard_lib.iter_records(shards["train"].split(",")):
        rec = records.decode(data)
        if rec.clip_id in clip_ids:
            rec = dataclasses.replace(rec, audio=np.full_like(rec.audio, np.nan))
        payloads.append(records.encode(rec))
    path = out / shard_lib.shard_name("poisoned", "train", "array_record", 0, 1)
    shard_lib.write_shard(path, payloads)
    return {"train": str(path), "eval": shards["eval"]}


def small_model(stage: str):
    base = tiny_config(n_segments=2, **{
        "video.img_size": 32, "video.embed_dim": 32, "video.num_heads": 2, "video.depth": 2,
        "audio.hidden_size": 32, "audio.num_heads": 2, "audio.mlp_dim": 64, "audio.num_layers": 1,
        "sync.n_embd": 32, "sync.n_head": 2, "sync.n_layer": 1})
    return experiment.model_config_for_stage(stage, base)


def small_config(stage: str, shards: dict, **overrides) -> ml_collections.ConfigDict:
    """The official recipe of `stage` with the small model and a short, busy schedule.

    `overrides`: dotted keys (`{"optim.lr": 1e30}`).
    """
    c = experiment.default_config(stage)
    c.model = small_model(stage).to_dict()
    c.data.train_shards, c.data.eval_shards = shards["train"], shards["eval"]
    c.data.batch_size = 8  # global: one example per fake device
    c.data.eval_batch_size = 8
    c.data.eval_max_batches = 1
    c.data.read_threads = 1  # 2-core machines: the test process itself needs the other
    c.train.compute_dtype = "float32"  # comparisons are float32-tight
    c.train.num_steps = 4
    c.train.log_every = 1
    c.train.eval_every = 10 ** 6  # evaluate once, at the end
    c.train.checkpoint_every = 1
    c.train.negatives = "global"
    c.optim.lr = 1e-3 if stage == experiment.STAGE_AVCLIP else 1e-4
    c.optim.warmup_steps = 2
    # The official schedules scale with the device count (stage II lr x devices, stage I
    # warm-up / devices); fixed here so that runs on different meshes are comparable.
    c.optim.lr_per_device = False
    c.optim.warmup_divided_by_devices = False
    c.mesh.data, c.mesh.fsdp = -1, 1
    for key, value in overrides.items():
        node = c
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    return c


def write_config(config: ml_collections.ConfigDict, path: pathlib.Path) -> pathlib.Path:
    path.write_text(config.to_json())
    return path


def driver_env(local_devices: int) -> dict:
    """The environment of a driver process: CPU only, `local_devices` fake devices.

    The driver sets the device count itself (before importing jax); inherited XLA_FLAGS
    (the test session's 8 devices) must not override it.
    """
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS_DIR.parent)] + [p for p in [env.get("PYTHONPATH")] if p])
    env["SYNCHFORMER_TEST_LOCAL_DEVICES"] = str(local_devices)
    return env


def driver_command(config_path: pathlib.Path, workdir: pathlib.Path, *, cache_dir: Optional[pathlib.Path] = None,
                   extra: Sequence[str] = ()) -> list[str]:
    cmd = [sys.executable, str(DRIVER), "--config", str(config_path), "--workdir", str(workdir)]
    if cache_dir is not None:
        cmd += ["--cache-dir", str(cache_dir)]
    return cmd + list(extra)


def run_driver(config_path, workdir, *, local_devices: int = 8, timeout: float = 300, **kw) -> None:
    """Runs one driver to completion; fails the test with its log on a non-zero exit."""
    proc = subprocess.run(driver_command(config_path, workdir, **kw), env=driver_env(local_devices),
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"driver exited with {proc.returncode}:\n{proc.stdout[-6000:]}")


def read_metrics(workdir: pathlib.Path, every: bool = False) -> dict:
    """`{step: record}` of the train records of `metrics.jsonl`, the last one per step
    (a resumed run logs the steps after its checkpoint again), or with `every`
    `{step: [records]}`. A torn last line (a killed run) is skipped."""
    out: dict = {}
    for line in (pathlib.Path(workdir) / "metrics.jsonl").read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if rec["phase"] == "train":
            if every:
                out.setdefault(rec["step"], []).append(rec)
            else:
                out[rec["step"]] = rec
    return out


def host(tree):
    import jax

    return jax.tree.map(np.asarray, jax.device_get(tree))


def first_state(trainer, params0):
    """Step-0 train state from host parameters, placed with the trainer's shardings (as
    `train.initial_state` makes it, without compiling the initialiser per mesh)."""
    import jax
    import jax.numpy as jnp

    from synchformer_jax import optim, train

    trainable, _ = optim.split_params(params0, trainer.config.optim.frozen)
    state = train.TrainState(jnp.zeros((), jnp.int32), params0, trainer.tx.init(trainable))
    return jax.device_put(state, trainer.state_shardings)


def single_mesh():
    import jax

    from synchformer_jax import sharding
    from synchformer_jax.input import device as device_lib

    return device_lib.make_mesh((1, 1), sharding.BATCH_AXES, devices=jax.devices()[:1])


def single_device_run(config: ml_collections.ConfigDict, num_steps: int) -> dict:
    """The first `num_steps` train steps of `config`'s run on one device, taken as
    `train.train_and_evaluate` takes them: parameters initialised from `config.seed`, the
    run key `config.seed + 1`, the batches of `train.train_iterator`. The reference of
    the sharded and multi-process tests; computed once per session (the mesh and
    checkpoint settings do not enter the computation, so runs that differ only there
    share it).

    Returns `trainer`, `params0`, `rng`, and per step `batches` (host), `params`, `metrics`.
    """
    import jax

    from synchformer_jax import sharding, train
    from synchformer_jax.input import device as device_lib
    from synchformer_jax.models import synchformer as sf

    key_config = config.copy_and_resolve_references()
    del key_config["mesh"]
    key_config.train.checkpoint_every = 0
    key = key_config.to_json()
    if key not in _SESSION:
        trainer = train.build_trainer(config, single_mesh())
        model_config = trainer.task.model_config
        params0 = host(jax.jit(lambda r: sf.init_params(model_config, r))(jax.random.key(config.seed)))
        _SESSION[key] = dict(trainer=trainer, params0=params0, rng=jax.random.key(config.seed + 1),
                             state=first_state(trainer, params0), batches=[], params=[], metrics=[],
                             iterator=train.train_iterator(config, trainer.task, config.data.train_shards.split(",")))
    run = _SESSION[key]
    trainer = run["trainer"]
    while len(run["params"]) < num_steps:
        batch = next(run["iterator"])
        run["state"], m = trainer.train_step(
            run["state"], device_lib.host_to_global(batch, trainer.mesh, sharding.BATCH_AXES), run["rng"])
        run["batches"].append(batch)
        run["params"].append(host(run["state"].params))
        run["metrics"].append(host(m))
    return run


def update_difference(got, want, lr: float) -> np.ndarray:
    """|got - want| over all parameters, in units of the learning rate.

    Why in lr: Adam's update is about lr * g / |g| per element whatever the gradient's
    size, so a wrong gradient (another loss, other dropout masks, a missing all-reduce)
    moves most elements by ~lr, while float32 reassociation moves only the few elements
    whose |g| is near eps, by a small fraction of lr. (Adam's step is scale-free: a
    mis-scaled gradient shows in the grad_norm metric, not here.)
    """
    from flax import traverse_util

    g, w = traverse_util.flatten_dict(got, sep="/"), traverse_util.flatten_dict(want, sep="/")
    assert g.keys() == w.keys()
    return np.concatenate([np.abs(np.asarray(g[k]) - np.asarray(w[k])).ravel() for k in w]) / lr


# Fields of a train record that depend on the wall clock, not on the computation.
TIMING_FIELDS = ("steps_per_sec", "examples_per_sec")


class Driver:
    """A driver process in the background, its output in `<log>`; for tests that watch
    a run and kill it."""

    def __init__(self, config_path, workdir, log: pathlib.Path, *, local_devices: int = 8, **kw):
        self.log_path = pathlib.Path(log)
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(driver_command(config_path, workdir, **kw), env=driver_env(local_devices),
                                     stdout=self._log, stderr=subprocess.STDOUT)

    def output(self) -> str:
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text()[-6000:]

    def wait_for(self, condition, timeout: float = 300, what: str = "") -> None:
        """Polls `condition()` every few milliseconds while the process runs."""
        import time

        deadline = time.monotonic() + timeout
        while not condition():
            if self.proc.poll() is not None:
                raise AssertionError(f"the driver exited ({self.proc.returncode}) before {what}:\n{self.output()}")
            if time.monotonic() > deadline:
                self.kill()
                raise AssertionError(f"timed out waiting for {what}:\n{self.output()}")
            time.sleep(0.003)

    def kill(self) -> None:
        import signal

        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()
        self._log.close()

    def wait(self, timeout: float = 300) -> int:
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"the driver did not finish in {timeout} s:\n{self.output()}")
        self._log.close()
        return rc


def wait_all(drivers: Sequence["Driver"], timeout: float = 300) -> None:
    """Waits for every driver to exit 0; the first failure (or the timeout) kills the
    others at once (processes in a collective would otherwise wait for a dead peer)."""
    import time

    deadline = time.monotonic() + timeout
    try:
        while any(d.proc.poll() is None for d in drivers):
            for d in drivers:
                if d.proc.poll() not in (None, 0):
                    raise AssertionError(f"a driver exited with {d.proc.returncode}:\n{d.output()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout} s:\n" + "\n".join(d.output() for d in drivers))
            time.sleep(0.05)
        for d in drivers:
            assert d.proc.returncode == 0, d.output()
    finally:
        for d in drivers:
            d.kill()


def read_batch_log(path: pathlib.Path) -> dict:
    """`{step: [entries]}` of a driver's `--batch-log` (a killed run may leave a torn
    last line, which is skipped)."""
    out: dict = {}
    for line in pathlib.Path(path).read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        out.setdefault(rec["step"], []).append(rec)
    return out
