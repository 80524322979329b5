"""The CPU demo: synthetic data -> stage I (Segment AVCLIP) -> stage II (sync) -> table.

`run_demo(workdir)` (the `synchformer-jax demo` command):

1. renders the procedural clips (the config's cue) once into `<workdir>/synthetic` (train split
   for both stages, a held-out eval split whose records carry fixed offsets);
2. trains stage I (both extractors, segment InfoNCE) in `<workdir>/stage1`;
3. caches the features of the stage-I extractors for the training clips in
   `<workdir>/feature_cache` (when the config names `data.feature_cache`; the demo's does);
4. trains stage II in `<workdir>/stage2`, initialised from the stage-I run
   (`init_from=<workdir>/stage1`: extractors copied and frozen, the rest fresh), on
   batches from the cache;
5. evaluates stage II on the held-out clips at their fixed offsets, writes
   `<workdir>/results.json` and the model folder `<workdir>/model` (final stage-II
   params + config, loadable with `pretrained.load_model`), and prints the table.

Each stage is an ordinary `train.train_and_evaluate` run, so an interrupted demo resumes
from the stages' latest checkpoints when started again with the same workdir.
"""
from __future__ import annotations

import importlib.util
import json
import os
import pathlib
import sys
import time
from typing import Any, Callable, Mapping, Optional

import ml_collections

from synchformer_jax import experiment

NUM_CLASSES_CHANCE = 1 / 21
# Acceptance targets of the full demo (21 classes): see configs/demo.py.
TARGET_ACC1, TARGET_ACC1_TOL1 = 0.50, 0.80


def default_config_path() -> pathlib.Path:
    """`configs/demo.py` of the source tree this package sits in."""
    return pathlib.Path(__file__).resolve().parents[1] / "configs" / "demo.py"


def load_config(path: str | os.PathLike, arg: str) -> ml_collections.ConfigDict:
    """`get_config(arg)` of a config file (ml_collections style)."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such config file (the demo reads configs/demo.py of the "
                                f"source tree; give --config to point elsewhere)")
    spec = importlib.util.spec_from_file_location(f"_synchformer_config_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


def stage_configs(config_path: Optional[str | os.PathLike] = None, fast: bool = False,
                  overrides: Optional[Mapping[str, Any]] = None) -> tuple[ml_collections.ConfigDict, ...]:
    """Stage-I and stage-II configs; `overrides` maps dotted keys (`"sync.train.num_steps"`,
    `"segment_avclip.data.batch_size"`, or `"data.eval_batch_size"` for both) to values."""
    path = config_path or default_config_path()
    suffix = ",fast" if fast else ""
    c1 = load_config(path, experiment.STAGE_AVCLIP + suffix)
    c2 = load_config(path, experiment.STAGE_SYNC + suffix)
    for key, value in (overrides or {}).items():
        head, _, rest = key.partition(".")
        targets = {experiment.STAGE_AVCLIP: [c1], experiment.STAGE_SYNC: [c2]}.get(head)
        if targets is None:
            targets, rest = [c1, c2], key
        for c in targets:
            _set(c, rest, value)
    return c1, c2


def _set(config: ml_collections.ConfigDict, dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    node = config
    for p in parents:
        node = node[p]
    if leaf not in node:
        raise KeyError(f"no config field {dotted!r}")
    node[leaf] = value


def write_scratch_init(directory: str | os.PathLike, config: ml_collections.ConfigDict) -> pathlib.Path:
    """A from-scratch starting point for stage I, as a model folder (`init_from`).

    The official stage I starts from pretrained extractors (SSv2 Motionformer, AudioSet
    AST), so the Motionformer's own init leaves its 3-D patch embedding at zero (the
    pretrained 2-D one is inflated into it). From scratch, a zero patch embedding makes
    every video embedding the same vector: the segment InfoNCE sits at its uniform value
    (log of the pool size) and does not get away from it. Here the kernel gets PyTorch's
    default `Conv3d` init (uniform +-1/sqrt(fan_in)); everything else is the model's own
    init with the run's seed.
    """
    import jax
    import numpy as np

    from synchformer_jax import pretrained
    from synchformer_jax.models import synchformer as sf

    model_config = experiment.model_config(config).replace(dtype="float32")
    rng_params, rng_patch = jax.random.split(jax.random.key(config.seed))
    params = jax.device_get(sf.init_params(model_config, rng_params))
    proj = params["v_encoder"]["patch_embed_3d"]["proj"]
    bound = 1.0 / np.sqrt(np.prod(proj["kernel"].shape[:-1]))
    proj["kernel"] = np.asarray(jax.random.uniform(rng_patch, proj["kernel"].shape, minval=-bound, maxval=bound))
    return pretrained.save_model(directory, params, model_config, overwrite=True,
                                 provenance={"source": "synchformer-jax demo: from-scratch stage-I init"})


def _cpu_seconds() -> float:
    """CPU time of this process and its finished children (the clip renderers)."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def _final_metrics(workdir: pathlib.Path, returned: dict) -> dict:
    """The run's final evaluation: what `train_and_evaluate` returned, or, when the stage
    had already finished (a rerun of a complete demo), the metrics file it left."""
    if returned:
        return returned
    path = workdir / "eval_metrics.json"
    if path.exists():
        return json.loads(path.read_text())
    return {}


def format_table(metrics: dict, timings: dict) -> str:
    rows = [("Acc@1", metrics.get("accuracy_1"), TARGET_ACC1),
            ("Acc@1 +-1 class", metrics.get("accuracy_1_tol1"), TARGET_ACC1_TOL1),
            ("Acc@5", metrics.get("accuracy_5"), None),
            ("chance (1 of 21)", NUM_CLASSES_CHANCE, None)]
    lines = [f"stage II on {metrics.get('count', 0)} held-out synthetic clips (fixed offsets, 21 classes)",
             f"  {'metric':<18}{'value':>8}   target"]
    for name, value, target in rows:
        v = "n/a" if value is None else f"{100 * value:6.1f} %"
        t = "" if target is None else f">= {100 * target:.0f} %"
        lines.append(f"  {name:<18}{v:>8}   {t}")
    lines.append(f"  wall {timings['wall_sec']:.0f} s (data {timings['data_wall_sec']:.0f} s, "
                 f"stage I {timings['stage1_wall_sec']:.0f} s, feature cache {timings.get('cache_wall_sec', 0):.0f} s, "
                 f"stage II {timings['stage2_wall_sec']:.0f} s), "
                 f"CPU {timings['cpu_sec']:.0f} s, load average {timings['load_start'][0]:.1f} -> "
                 f"{timings['load_end'][0]:.1f} on {os.cpu_count()} cores")
    return "\n".join(lines)


STAGE1_DIR, STAGE2_DIR, INIT_DIR, MODEL_DIR, SYNTHETIC_DIR = "stage1", "stage2", "init", "model", "synthetic"


def prepare_configs(workdir: str | os.PathLike, *, fast: bool = False,
                    config_path: Optional[str | os.PathLike] = None,
                    overrides: Optional[Mapping[str, Any]] = None) -> tuple[ml_collections.ConfigDict, ...]:
    """The two stage configs wired to `workdir`: one synthetic set, stage I from the
    from-scratch init folder (written here if absent), stage II from the stage-I run."""
    workdir = pathlib.Path(workdir).absolute()
    workdir.mkdir(parents=True, exist_ok=True)
    c1, c2 = stage_configs(config_path, fast, overrides)
    c1.data.synthetic_dir = c2.data.synthetic_dir = str(workdir / SYNTHETIC_DIR)
    if not c1.init_from:  # from scratch: see write_scratch_init
        c1.init_from = str(workdir / INIT_DIR)
        if not (workdir / INIT_DIR / "model_config.json").exists():
            write_scratch_init(workdir / INIT_DIR, c1)
    if not c2.init_from:
        c2.init_from = str(workdir / STAGE1_DIR)
    cache = c2.data.get("feature_cache", "")
    if cache and not pathlib.Path(cache).is_absolute():
        c2.data.feature_cache = str(workdir / cache)
    return c1, c2


def run_demo(workdir: str | os.PathLike, *, fast: bool = False, config_path: Optional[str | os.PathLike] = None,
             overrides: Optional[Mapping[str, Any]] = None,
             echo: Callable[[str], None] = print) -> dict:
    """Runs the demo in `workdir` (resuming what is there); returns `results.json`'s content."""
    from synchformer_jax import feature_cache_build, pretrained, train

    workdir = pathlib.Path(workdir).absolute()
    t0, cpu0, load0 = time.perf_counter(), _cpu_seconds(), os.getloadavg()
    c1, c2 = prepare_configs(workdir, fast=fast, config_path=config_path, overrides=overrides)
    synthetic_dir = c1.data.synthetic_dir
    stage1_dir, stage2_dir = workdir / STAGE1_DIR, workdir / STAGE2_DIR
    echo(f"[demo] synthetic clips: {c1.data.synthetic_train} train + {c1.data.synthetic_eval} held out, "
         f"{dict(c1.data.synthetic_clip) or 'default'} -> {synthetic_dir}")
    train_paths, _ = train.data_paths(c1, stage1_dir)  # renders the set once (both stages read it)
    t_data = time.perf_counter()

    echo(f"[demo] stage I (Segment AVCLIP): {c1.train.num_steps} steps of {c1.data.batch_size} clips "
         f"-> {stage1_dir}")
    m1 = _final_metrics(stage1_dir, train.train_and_evaluate(c1, stage1_dir))
    t_stage1 = time.perf_counter()
    if "precision" in m1:
        echo(f"[demo] stage I held-out sync-with-shifts precision {100 * m1['precision']:.1f} % "
             f"(chance {100 / 7:.1f} %)")

    if c2.data.get("feature_cache", ""):
        made = feature_cache_build.build_for_config(c2, train_paths, overwrite=True)
        echo(f"[demo] stage-II feature cache of the frozen stage-I extractors: {made['num_clips']} clips "
             f"-> {c2.data.feature_cache}")
    t_cache = time.perf_counter()

    echo(f"[demo] stage II (sync, extractors frozen from stage I): {c2.train.num_steps} steps of "
         f"{c2.data.batch_size} {'cached windows' if c2.data.get('feature_cache', '') else 'clips'} "
         f"-> {stage2_dir}")
    m2 = _final_metrics(stage2_dir, train.train_and_evaluate(c2, stage2_dir))
    t_stage2 = time.perf_counter()

    params, model_config = train.restore_params(stage2_dir)
    model_dir = pretrained.save_model(
        workdir / MODEL_DIR, params, model_config.replace(dtype="float32"), overwrite=True,
        provenance={"source": "synchformer-jax demo", "stage1": str(stage1_dir), "stage2": str(stage2_dir),
                    "fast": fast, "synthetic_clip": dict(c1.data.synthetic_clip)})
    t1, cpu1, load1 = time.perf_counter(), _cpu_seconds(), os.getloadavg()
    timings = {"wall_sec": t1 - t0, "data_wall_sec": t_data - t0, "stage1_wall_sec": t_stage1 - t_data,
               "cache_wall_sec": t_cache - t_stage1, "stage2_wall_sec": t_stage2 - t_cache, "cpu_sec": cpu1 - cpu0,
               "load_start": list(load0), "load_end": list(load1), "cpu_count": os.cpu_count()}
    keys = ("accuracy_1", "accuracy_1_tol1", "accuracy_5", "accuracy_5_tol1", "median_class_accuracy_1", "count")
    results = {"stage2": {k: m2.get(k) for k in keys}, "stage1": {k: v for k, v in m1.items()
                                                                  if isinstance(v, (int, float))},
               "chance_accuracy_1": NUM_CLASSES_CHANCE, "timings": timings, "model": str(model_dir),
               "fast": fast,
               "passed": (not fast and m2.get("accuracy_1", 0) >= TARGET_ACC1
                          and m2.get("accuracy_1_tol1", 0) >= TARGET_ACC1_TOL1)}
    (workdir / "results.json").write_text(json.dumps(results, indent=1))
    echo(format_table(m2, timings))
    echo(f"[demo] model folder: {model_dir}  (results: {workdir / 'results.json'})")
    if fast:
        echo("[demo] --fast: a few steps only, the accuracy is not expected to beat chance")
    return results


if __name__ == "__main__":  # python -m synchformer_jax.demo [workdir]
    run_demo(sys.argv[1] if len(sys.argv) > 1 else "workdir/demo")
