"""Two JAX processes on this machine (`jax.distributed.initialize` on localhost, gloo CPU
collectives, 2 fake CPU devices each) train like one device with the same global batch.

Stage I with global InfoNCE negatives, FSDP over all four devices (`data=1, fsdp=4`):
parameters and Adam moments are split across the two processes, the loss gathers the
embeddings of both, each process feeds only its half of every batch, and both write the
checkpoint. The reference is the same run's steps on one device in this process
(`train_helpers.single_device_run`, shared with test_train_sharding.py). Drop path is
off: see `train_helpers.stage1_config`.
"""
from __future__ import annotations

import socket

import numpy as np
import pytest

from synchformer_jax import checkpoint
from tests import train_helpers as th

NUM_STEPS = 4  # = small_config's num_steps, so the single-device reference is shared
TIMEOUT = 300


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return th.session_synthetic(tmp_path_factory)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_two_processes_train_like_one(shards, tmp_path):
    config = th.stage1_config(shards, **{
        "mesh.data": 1, "mesh.fsdp": 4, "train.num_steps": NUM_STEPS,
        # One checkpoint, at the end (the one compared): saves cost time, not coverage.
        "train.checkpoint_every": NUM_STEPS})
    config_path = th.write_config(config, tmp_path / "config.json")
    workdir = tmp_path / "run"
    coordinator = f"localhost:{_free_port()}"
    runs = [th.Driver(config_path, workdir, tmp_path / f"process{i}.log", local_devices=2, extra=[
        "--coordinator", coordinator, "--num-processes", "2", "--process-id", str(i),
        "--batch-log", str(tmp_path / f"batches{i}.jsonl")]) for i in range(2)]
    ref = th.single_device_run(config, NUM_STEPS)  # computed while the processes run
    th.wait_all(runs, TIMEOUT)

    # Each process drew half of every global batch; together, the single run's batch.
    logs = [th.read_batch_log(tmp_path / f"batches{i}.jsonl") for i in range(2)]
    for step in range(1, NUM_STEPS + 1):
        (half0,), (half1,) = logs[0][step], logs[1][step]
        assert len(half0["index"]) == len(half1["index"]) == 4  # of the global batch of 8
        assert sorted(half0["index"] + half1["index"]) == sorted(ref["batches"][step - 1]["index"].tolist())

    # The same training: per-step metrics (written once, by process 0) ...
    got = th.read_metrics(workdir, every=True)
    assert sorted(got) == list(range(1, NUM_STEPS + 1)) and all(len(r) == 1 for r in got.values())
    for step, want in enumerate(ref["metrics"], start=1):
        for k, v in want.items():
            np.testing.assert_allclose(got[step][0][k], v, rtol=2e-5, err_msg=f"step {step}: {k}")
    # ... and final parameters, from the two-process checkpoint restored here (one
    # process, another device layout).
    step, state, _, _ = checkpoint.restore_on_host(workdir)
    assert step == NUM_STEPS
    lr = max(float(m["learning_rate"]) for m in ref["metrics"])
    diff = th.update_difference(state["params"], ref["params"][-1], lr)
    assert diff.max() < 0.05, f"params differ by up to {diff.max():.3g} x lr"
    assert np.mean(diff > 1e-3) < 1e-3, f"{np.mean(diff > 1e-3):.2%} of the parameters differ"
