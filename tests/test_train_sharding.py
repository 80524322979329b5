"""One train step on 8 fake CPU devices (tests/conftest.py) equals the same step on one
device: data parallel (`data=8`) and FSDP (`data=2, fsdp=4`), for stage I (both
extractors train, global InfoNCE negatives; drop path off, see
`train_helpers.stage1_config`) and stage II (extractors frozen, dropout in the sync
transformer, so randomness under sharding is covered there).

Every mesh starts from the same host parameters, takes the same host batch and the same
run key, so any difference beyond float32 reassociation (sharded reductions sum in
another order) is a sharding bug: a wrongly partitioned loss, randomness that depends on
the device layout, a missing gradient all-reduce, a frozen tensor that moves.
"""
from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from synchformer_jax import experiment, losses, sharding, train
from synchformer_jax.input import device as device_lib
from tests import train_helpers as th

MESHES = {
    "data": lambda: device_lib.make_mesh((8, 1), sharding.BATCH_AXES),
    "fsdp": lambda: device_lib.make_mesh((2, 4), sharding.BATCH_AXES),
}
# float32 on both sides; a sharded step reassociates sums (gradients all-reduced per
# shard, InfoNCE over gathered embeddings), which moves the metrics by a few ulps.
RTOL = 2e-5


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return th.session_synthetic(tmp_path_factory)


def _flat(tree):
    return traverse_util.flatten_dict(tree, sep="/")


def _step(trainer: train.Trainer, params0, host_batch, rng, step: int = 0):
    state = th.first_state(trainer, params0)
    if step:
        state = state.replace(step=jax.device_put(jnp.int32(step), trainer.state_shardings.step))
    batch = device_lib.host_to_global(host_batch, trainer.mesh, sharding.BATCH_AXES)
    new_state, metrics = trainer.train_step(state, batch, rng)
    return new_state, th.host(metrics)


def _runs(config) -> dict:
    """The first step of the run on one device and on each 8-device mesh."""
    ref = th.single_device_run(config, 1)
    runs = {"single": dict(trainer=ref["trainer"], params=ref["params"][0], metrics=ref["metrics"][0])}
    for name, mesh in MESHES.items():
        trainer = train.build_trainer(config, mesh())
        state, metrics = _step(trainer, ref["params0"], ref["batches"][0], ref["rng"])
        runs[name] = dict(trainer=trainer, state=state, params=th.host(state.params), metrics=metrics)
    return dict(config=config, ref=ref, runs=runs)


@pytest.fixture(scope="module")
def stage1(shards):
    return _runs(th.stage1_config(shards))


@pytest.fixture(scope="module")
def stage2(shards):
    return _runs(th.small_config(experiment.STAGE_SYNC, shards))


def _assert_same_step(runs, name):
    ref, got = runs["single"], runs[name]
    assert set(got["metrics"]) == set(ref["metrics"])
    for k, v in ref["metrics"].items():
        np.testing.assert_allclose(got["metrics"][k], v, rtol=RTOL, err_msg=f"{name}: metric {k}")
    diff = th.update_difference(got["params"], ref["params"], float(ref["metrics"]["learning_rate"]))
    assert diff.max() < 0.05, f"{name}: a parameter differs by {diff.max():.3g} x lr"
    assert np.mean(diff > 1e-3) < 1e-3, f"{name}: {np.mean(diff > 1e-3):.2%} of the parameters differ"


@pytest.mark.parametrize("mesh_name", list(MESHES))
def test_stage1_sharded_step_equals_single_device(stage1, mesh_name):
    _assert_same_step(stage1["runs"], mesh_name)
    # The step did something: a comparison of two unchanged parameter sets proves nothing.
    moved = [not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(stage1["ref"]["params0"]),
                                                      jax.tree.leaves(stage1["runs"]["single"]["params"]))]
    assert sum(moved) > 0.9 * len(moved)


def test_stage1_fsdp_step_with_scanned_remat_blocks_equals_single_device(stage1):
    """`model.scan_blocks` + `model.remat` under FSDP (the scanned weights are stacked from
    sharded per-block parameters) is the same step as the unrolled one on one device."""
    config = stage1["config"].copy_and_resolve_references()
    config.model.scan_blocks = True
    config.model.remat = True
    trainer = train.build_trainer(config, MESHES["fsdp"]())
    ref = stage1["ref"]
    state, metrics = _step(trainer, ref["params0"], ref["batches"][0], ref["rng"])
    runs = dict(stage1["runs"], scanned=dict(params=th.host(state.params), metrics=metrics))
    _assert_same_step(runs, "scanned")


@pytest.mark.parametrize("mesh_name", list(MESHES))
def test_stage2_sharded_step_equals_single_device(stage2, mesh_name):
    _assert_same_step(stage2["runs"], mesh_name)


def test_stage1_device_pools_are_per_device_losses(stage1):
    """`negatives='device'` contrasts within each device's rows only (the official recipe):
    the trainer's loss is then the mean of the per-device InfoNCE losses, not the
    global-pool loss. Evaluated as the train step does (sharded over 8 devices, train
    mode, the step's key), next to the embeddings it pools."""
    config = stage1["config"].copy_and_resolve_references()
    config.train.negatives = "device"
    trainer = train.build_trainer(config, MESHES["data"]())
    task = trainer.task
    assert task.negative_pools == 8
    step_rng = jax.random.fold_in(stage1["ref"]["rng"], 0)

    @jax.jit
    def loss_and_embeddings(params, batch):
        video, audio = task.model_inputs(batch, True)
        embeddings = task.model.apply({"params": params}, video, audio, train=True, rngs={"dropout": step_rng})
        return task.loss_fn(params, batch, step_rng, True)[0], embeddings

    loss, (v, a, tau) = loss_and_embeddings(
        jax.device_put(stage1["ref"]["params0"], trainer.state_shardings.params),
        device_lib.host_to_global(stage1["ref"]["batches"][0], trainer.mesh, sharding.BATCH_AXES))
    # One row per device (batch 8 on 8 devices).
    per_device = [losses.segment_infonce(v[i:i + 1], a[i:i + 1], tau) for i in range(8)]
    np.testing.assert_allclose(loss, np.mean(per_device), rtol=RTOL)
    # The global pool of the same embeddings is the single-device step's loss, and a
    # different number.
    global_loss = stage1["runs"]["single"]["metrics"]["loss"]
    np.testing.assert_allclose(losses.segment_infonce(v, a, tau), global_loss, rtol=RTOL)
    assert abs(float(loss) - global_loss) > 1e-3


@pytest.mark.parametrize("fixture", ["stage1", "stage2"])
def test_fsdp_shards_parameters_and_optimizer_state(fixture, request):
    runs = request.getfixturevalue(fixture)["runs"]
    run = runs["fsdp"]
    state, shardings = run["state"], run["trainer"].state_shardings
    split = [k for k, s in _flat(shardings.params).items() if sharding.FSDP in jax.tree.leaves(tuple(s.spec))]
    assert split, "FSDP left every parameter replicated"
    params = _flat(state.params)
    for k in split:
        x = params[k]
        assert sharding.FSDP in jax.tree.leaves(tuple(x.sharding.spec))  # the step kept it sharded
        dim = [i for i, ax in enumerate(x.sharding.spec) if ax == sharding.FSDP][0]
        assert x.addressable_shards[0].data.shape[dim] == x.shape[dim] // 4
    # Adam's moments of a split trainable parameter are split the same way (stage II
    # splits only the frozen video patch embedding, which has no moments).
    frozen = run["trainer"].config.optim.frozen
    trainable = [k for k in split if not (frozen and re.search(frozen, k))]
    opt_split = [p for p, s in jax.tree_util.tree_flatten_with_path(shardings.opt_state)[0]
                 if sharding.FSDP in jax.tree.leaves(tuple(s.spec))]
    assert len(opt_split) == 2 * len(trainable)  # mu and nu
    # Data parallel replicates every parameter.
    data_specs = [s.spec for s in jax.tree.leaves(runs["data"]["trainer"].state_shardings.params)]
    assert all(spec == jax.sharding.PartitionSpec() for spec in data_specs)


def test_stage2_frozen_extractors_have_no_optimizer_state_and_stay_put(stage2):
    frozen = ("vfeat_extractor", "afeat_extractor")
    before = _flat(stage2["ref"]["params0"])
    for name, run in stage2["runs"].items():
        # (The single-device reference's state moved on; its structure is the same.)
        opt_state = run["state"].opt_state if "state" in run else stage2["ref"]["state"].opt_state
        paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(opt_state)[0]]
        assert not [p for p in paths if any(f in p for f in frozen)], f"{name}: optimizer state for a frozen tensor"
        assert any("transformer" in p for p in paths)  # ... while the trained part has some
        after = _flat(run["params"])
        for k, v in before.items():
            if k.split("/")[0] in frozen:
                assert np.array_equal(after[k], v), f"{name}: frozen {k} changed"
        trained = [k for k in before if k.split("/")[0] not in frozen]
        assert sum(not np.array_equal(after[k], before[k]) for k in trained) > 0.9 * len(trained)


def test_stage2_dropout_key_is_the_run_key_folded_with_the_step(stage2):
    """The step draws dropout from `fold_in(rng, state.step)`: the train loss equals the
    loss evaluated with that key, for the step the state is at (not a Python counter),
    and another key gives another loss (dropout is on)."""
    ref = stage2["ref"]
    trainer, rng = ref["trainer"], ref["rng"]
    loss_at = jax.jit(lambda p, b, r: trainer.task.loss_fn(p, b, r, True)[0])
    params = jax.device_put(ref["params0"], sharding.replicated(trainer.mesh))
    batch = device_lib.host_to_global(ref["batches"][0], trainer.mesh, sharding.BATCH_AXES)
    step0 = float(loss_at(params, batch, jax.random.fold_in(rng, 0)))
    step5 = float(loss_at(params, batch, jax.random.fold_in(rng, 5)))
    assert abs(step0 - step5) > 1e-4, "dropout is off: the key does not matter"
    np.testing.assert_allclose(ref["metrics"][0]["loss"], step0, rtol=RTOL)
    _, metrics5 = _step(trainer, ref["params0"], ref["batches"][0], rng, step=5)
    np.testing.assert_allclose(metrics5["loss"], step5, rtol=RTOL)
    # The sharded steps drew the same dropout masks as the single device.
    for name in MESHES:
        np.testing.assert_allclose(stage2["runs"][name]["metrics"]["loss"], step0, rtol=RTOL)
