"""Resume: a run killed with SIGKILL (at a random step, and once in the middle of writing
a checkpoint) and restarted in the same workdir ends exactly where an uninterrupted run
ends: the same parameters, optimizer state, data-iterator state and per-step metrics,
bit for bit on CPU, having seen the same batches. A half-written checkpoint is never
resumed from. A clip with NaN audio is skipped, not fatal; a non-finite loss still stops
a run with `NonFiniteLossError`.

Stage II, data parallel on 2 fake CPU devices (2, not 8, only because every checkpoint
save slices each replicated array once per device): the data pipeline draws a random
crop, offset, jitter and flip per example, and the sync transformer draws dropout, so a
resume that lost the iterator position or the step's key would show. The runs are
subprocesses of `tests/train_driver.py` sharing a persistent compilation cache, so only
the first one compiles.
"""
from __future__ import annotations

import json
import pathlib
import random
import re
import shutil

import jax
import numpy as np
import pytest

from synchformer_jax import checkpoint, experiment, pretrained, resume
from tests import train_helpers as th

NUM_STEPS = 6
DEVICES = 2
KILL_SEED = 20240611  # which step the random kill hits is seeded, so a failure replays


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return th.session_synthetic(tmp_path_factory)


@pytest.fixture(scope="module")
def resume_config(shards, tmp_path_factory):
    config = th.small_config(experiment.STAGE_SYNC, shards, **{"train.num_steps": NUM_STEPS})
    return th.write_config(config, tmp_path_factory.mktemp("config") / "sync.json")


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("jax_cache")


@pytest.fixture(scope="module")
def uninterrupted(resume_config, cache_dir, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("uninterrupted")
    th.run_driver(resume_config, workdir, local_devices=DEVICES, cache_dir=cache_dir,
                  extra=["--batch-log", str(workdir / "batches.jsonl")])
    return workdir


def _complete_steps(workdir: pathlib.Path) -> list[int]:
    d = workdir / "checkpoints"
    return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit()) if d.is_dir() else []


def _latest(workdir: pathlib.Path):
    ckpts = checkpoint.RunCheckpoints(workdir)
    try:
        return ckpts.latest_step()
    finally:
        ckpts.close()


def _assert_trees_equal(a, b, what: str) -> None:
    la, lb = jax.tree_util.tree_flatten_with_path(a)[0], jax.tree_util.tree_flatten_with_path(b)[0]
    assert [p for p, _ in la] == [p for p, _ in lb], what
    for (path, x), (_, y) in zip(la, lb):
        x, y = np.asarray(x), np.asarray(y)
        assert x.dtype == y.dtype and x.shape == y.shape, (what, jax.tree_util.keystr(path))
        assert np.array_equal(x, y), f"{what}: {jax.tree_util.keystr(path)} differs (max {np.abs(x - y).max()})"


def test_killed_and_restarted_run_ends_bitwise_like_an_uninterrupted_one(uninterrupted, resume_config, cache_dir,
                                                                       tmp_path):
    workdir = tmp_path / "run"
    batch_log = workdir / "batches.jsonl"
    common = dict(local_devices=DEVICES, cache_dir=cache_dir, extra=["--batch-log", str(batch_log)])

    # 1. SIGKILL at a random step: as soon as that step's checkpoint is complete, the
    #    process is somewhere in the next step (or its checkpoint) when the kill lands.
    kill_at = random.Random(KILL_SEED).randint(1, NUM_STEPS - 3)
    run = th.Driver(resume_config, workdir, tmp_path / "run1.log", **common)
    run.wait_for(lambda: (workdir / "checkpoints" / str(kill_at)).is_dir(), what=f"checkpoint {kill_at}")
    run.kill()
    assert run.proc.returncode == -9
    resumed_from = _latest(workdir)
    assert resumed_from is not None and kill_at <= resumed_from < NUM_STEPS - 1

    # 2. SIGKILL while the checkpoint of step `stall` is being written: the driver holds
    #    that save just before orbax's commit (all files written, folder still temporary).
    stall = resumed_from + 2
    run = th.Driver(resume_config, workdir, tmp_path / "run2.log", local_devices=DEVICES, cache_dir=cache_dir,
                    extra=common["extra"] + ["--stall-save-at", str(stall)])
    run.wait_for(lambda: (workdir / f"stalled_save_{stall}").exists(), what=f"the write of checkpoint {stall}")
    run.kill()
    partial = [p.name for p in (workdir / "checkpoints").iterdir() if p.name.startswith(f"{stall}.orbax-checkpoint-tmp")]
    assert partial, "the kill did not land during the write"
    assert stall not in _complete_steps(workdir)
    assert _latest(workdir) == stall - 1, "a half-written checkpoint was taken as complete"

    # 3. Restart to the end: it resumes from the step before the half-written one.
    th.run_driver(resume_config, workdir, **common)
    log = th.read_batch_log(batch_log)
    assert len(log[stall]) >= 2  # drawn before the kill and again after the resume

    # Same final train state (params, optimizer state, step) and data-iterator state, bit for bit.
    step_a, state_a, data_a, _ = checkpoint.restore_on_host(uninterrupted)
    step_b, state_b, data_b, _ = checkpoint.restore_on_host(workdir)
    assert step_a == step_b == NUM_STEPS
    _assert_trees_equal(state_a, state_b, "train state")
    assert data_a == data_b

    # Same metrics at every step (each record of a step run twice) and the same evaluation.
    metrics_a, metrics_b = th.read_metrics(uninterrupted, every=True), th.read_metrics(workdir, every=True)
    assert sorted(metrics_a) == sorted(metrics_b) == list(range(1, NUM_STEPS + 1))
    assert any(len(recs) > 1 for recs in metrics_b.values())
    for step, recs in metrics_b.items():
        (want,) = metrics_a[step]
        for rec in recs:
            for k, v in want.items():
                if k not in th.TIMING_FIELDS:
                    assert rec[k] == v, f"step {step}: {k} {rec[k]} != {v}"
    eval_a = json.loads((uninterrupted / "eval_metrics.json").read_text())
    assert json.loads((workdir / "eval_metrics.json").read_text()) == eval_a

    # Same batches: every step's batch (also each one drawn twice, before a kill and after
    # the resume) equals the uninterrupted run's.
    log_a = th.read_batch_log(uninterrupted / "batches.jsonl")
    assert sorted(log) == sorted(log_a) == list(range(1, NUM_STEPS + 1))
    for step, entries in log.items():
        assert len(log_a[step]) == 1
        for e in entries:
            assert e == log_a[step][0], f"step {step}: another batch after the resume"


def test_a_clip_with_nan_audio_is_skipped_not_fatal(uninterrupted, shards, cache_dir, tmp_path):
    """A clip whose audio is NaN (a corrupt recording that decodes fine) would turn the
    loss NaN at the step that draws it and stop the run, and a relaunch would draw it
    again. It is a broken record instead: skipped, named, counted, and the run finishes.

    The poisoned clip is one the uninterrupted run drew at step 2. (Same config as the
    resume runs apart from the shard paths, so the compiled step comes from the cache.)"""
    first_batches = th.read_batch_log(uninterrupted / "batches.jsonl")
    bad_clip = first_batches[2][0]["clip_id"][0]
    poisoned = th.poisoned_shards(shards, tmp_path / "poisoned", {bad_clip})
    config = th.small_config(experiment.STAGE_SYNC, poisoned, **{"train.num_steps": NUM_STEPS})
    config_path = th.write_config(config, tmp_path / "poisoned.json")
    run = th.Driver(config_path, tmp_path / "run", tmp_path / "run.log", local_devices=DEVICES, cache_dir=cache_dir)
    rc = run.wait()
    out = run.log_path.read_text()
    assert rc == 0, out[-4000:]
    assert f"clip {bad_clip!r}" in out and "non-finite sample(s)" in out
    metrics = th.read_metrics(tmp_path / "run")
    assert sorted(metrics) == list(range(1, NUM_STEPS + 1))
    assert all(np.isfinite(m["loss"]) for m in metrics.values())
    assert metrics[NUM_STEPS]["skipped_records"] >= 1


def test_non_finite_loss_stops_training(shards, cache_dir, tmp_path):
    """A loss that becomes non-finite anyway (here: a learning rate of 1e30 blows the
    parameters up after the first step) stops the run with `NonFiniteLossError` and
    leaves no checkpoint of that step."""
    config = th.small_config(experiment.STAGE_SYNC, shards, **{"train.num_steps": NUM_STEPS, "optim.lr": 1e30})
    config_path = th.write_config(config, tmp_path / "diverging.json")
    run = th.Driver(config_path, tmp_path / "run", tmp_path / "run.log", local_devices=DEVICES, cache_dir=cache_dir)
    rc = run.wait()
    out = run.log_path.read_text()
    assert rc == th.NON_FINITE_EXIT, out[-4000:]
    found = re.search(r"NonFiniteLossError: loss became (nan|-?inf) at step (\d+)", out)
    assert found, out[-4000:]
    bad_step = int(found.group(2))
    assert bad_step > 1
    assert max(_complete_steps(tmp_path / "run")) == bad_step - 1
    assert sorted(th.read_metrics(tmp_path / "run")) == list(range(1, bad_step))  # the bad step logged nothing
    _, state, _, _ = checkpoint.restore_on_host(tmp_path / "run")
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(state["params"]))


def _restart_with(resume_config, uninterrupted, cache_dir, tmp_path, name: str, **overrides):
    """Restart a copy of the finished uninterrupted run with a changed config:
    `(exit code, log, workdir)`."""
    workdir = tmp_path / name
    shutil.copytree(uninterrupted, workdir)
    config = json.loads(pathlib.Path(resume_config).read_text())
    for key, value in overrides.items():
        node = config
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        assert leaf in node, key
        node[leaf] = value
    config_path = tmp_path / f"{name}.json"
    config_path.write_text(json.dumps(config))
    run = th.Driver(config_path, workdir, tmp_path / f"{name}.log", local_devices=DEVICES, cache_dir=cache_dir)
    rc = run.wait()
    return rc, run.log_path.read_text(), workdir


@pytest.mark.parametrize("overrides, says", [
    # Another model: refused before orbax (a head count restores the same arrays).
    ({"model.sync.n_head": 4}, "was trained as another model; changed: model.sync.n_head: 2 -> 4; "
                               "put the checkpoint's values back (--config.model.sync.n_head=2)"),
    # Another optimizer-state tree (no clipping transform): named as the cause.
    ({"optim.clip_norm": 0.0}, "changed since it was written: optim.clip_norm: 1.0 -> 0.0; put the "
                               "checkpoint's values back (--config.optim.clip_norm=1.0)"),
    # Another data pipeline (grain's per-worker state): the value to resume with.
    ({"data.num_workers": 2}, "was written by another data pipeline (data.num_workers: 0 -> 2); "
                              "resume with --config.data.num_workers=0"),
])
def test_a_restart_that_cannot_continue_the_run_names_the_changed_keys(resume_config, uninterrupted, cache_dir,
                                                                      tmp_path, overrides, says):
    rc, out, workdir = _restart_with(resume_config, uninterrupted, cache_dir, tmp_path, "changed",
                                     **{"train.num_steps": NUM_STEPS + 1, **overrides})
    assert rc != 0
    assert "ResumeError" in out and says in out, out[-3000:]
    assert _complete_steps(workdir) == _complete_steps(uninterrupted)  # nothing written
    assert not (workdir / "config_changes.jsonl").exists()


def test_a_restart_with_other_settings_resumes_and_records_them(resume_config, uninterrupted, cache_dir, tmp_path):
    """A longer schedule with another learning rate, and rematerialisation switched on
    (another way to compute the same model), resumes from the last step; the changes are
    logged, appended to config_changes.jsonl, and config.json and the new checkpoint hold
    the new values."""
    rc, out, workdir = _restart_with(resume_config, uninterrupted, cache_dir, tmp_path, "longer",
                                     **{"train.num_steps": NUM_STEPS + 1, "optim.lr": 5e-5, "model.remat": True})
    assert rc == 0, out[-3000:]
    assert ("resuming step 6 with a changed config: model.remat: false -> true; optim.lr: 0.0001 -> 5e-05; "
            "train.num_steps: 6 -> 7") in out
    assert resume.history(workdir) == [{"step": NUM_STEPS, "changes": {"model.remat": [False, True],
                                                                       "optim.lr": [1e-4, 5e-5],
                                                                       "train.num_steps": [NUM_STEPS, NUM_STEPS + 1]}}]
    assert json.loads((workdir / "config.json").read_text())["optim"]["lr"] == 5e-5
    step, _, _, saved = checkpoint.restore_on_host(workdir)
    assert step == NUM_STEPS + 1 and saved["optim"]["lr"] == 5e-5
    # The run as a model (predict / export / info) says what it was trained with.
    assert ("resumed at step 6 with a changed config: model.remat: false -> true; optim.lr: 0.0001 -> 5e-05; "
            "train.num_steps: 6 -> 7" in pretrained.load_model(workdir).notes)


def test_a_restart_on_other_hardware_keeps_the_recipe_and_the_data_position(shards, cache_dir, tmp_path):
    """A preempted run restarted on another slice. Stage II with the official lr x devices:
    4 steps on 2 devices; a copy restarts from its step-2 checkpoint on 1 device, its data
    state marked as written by 2 processes (a 2-process run's per-process positions would
    repeat data on 1 process; the saved state is not used there). Steps 3 and 4 draw the
    uninterrupted run's examples at its learning rate (before: half of it, and on another
    process count the saved per-process positions), and the changes are on record."""
    config = th.small_config(experiment.STAGE_SYNC, shards, **{"optim.lr_per_device": True})
    config_path = th.write_config(config, tmp_path / "scaled.json")
    full, restarted = tmp_path / "full", tmp_path / "restarted"
    th.run_driver(config_path, full, local_devices=2, cache_dir=cache_dir,
                  extra=["--batch-log", str(tmp_path / "full.jsonl")])
    shutil.copytree(full, restarted)
    for step in (3, 4):
        shutil.rmtree(restarted / checkpoint.CHECKPOINTS / str(step))
    shutil.rmtree(restarted / checkpoint.BEST)  # step 4's; the restart saves it again
    data_file = restarted / "checkpoints" / "2" / "data" / "metadata"
    saved = json.loads(data_file.read_text())
    assert (saved["format"], saved["examples"], saved["processes"], saved["devices"]) == (2, 16, 1, 2)
    data_file.write_text(json.dumps(dict(saved, processes=2, iterator={"not": "a state this process can use"})))
    th.run_driver(config_path, restarted, local_devices=1, cache_dir=cache_dir,
                  extra=["--batch-log", str(tmp_path / "restarted.jsonl")])

    a, b = th.read_batch_log(tmp_path / "full.jsonl"), th.read_batch_log(tmp_path / "restarted.jsonl")
    assert sorted(b) == [3, 4]
    for step in (3, 4):
        assert b[step][0]["index"] == a[step][0]["index"] and b[step][0]["digest"] == a[step][0]["digest"], step
    lr_a, lr_b = th.read_metrics(full), th.read_metrics(restarted)
    for step in (3, 4):
        assert lr_b[step]["learning_rate"] == lr_a[step]["learning_rate"] > 0, step
    assert resume.history(restarted) == [{"step": 2, "changes": {"run.processes": [2, 1], "run.devices": [2, 1]}}]
    _, _, data_state, _ = checkpoint.restore_on_host(restarted)
    assert (data_state["examples"], data_state["processes"], data_state["devices"],
            data_state["recipe_devices"]) == (32, 1, 1, 2)


def test_config_changes_compare_only_keys_both_configs_have():
    saved = {"model": {"sync": {"n_head": 2}}, "data": {"crop": [1, 2], "gone": 1}, "seed": 1}
    current = {"model": {"sync": {"n_head": 2, "new_key": True}}, "data": {"crop": (1, 2)}, "seed": 7}
    found = resume.changes(saved, current)
    assert [(c.key, c.before, c.after) for c in found] == [("seed", 1, 7)]  # tuples are lists in JSON
    assert found[0].put_back() == "--config.seed=1"
    assert resume.Change("init_from", "", "x").put_back() == "--config.init_from=''"
