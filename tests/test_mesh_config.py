"""A `config.mesh` that does not fit the devices (e.g. an FSDP-8 run resumed on 4 of them)
is a one-line `cli.ConfigError` (exit 2 from the CLI) naming `mesh.data` / `mesh.fsdp`,
the device count and a shape that fits; a batch that does not split names `data.batch_size`.
Batch sizes that do not split over the mesh (or into the stage-I pools) are refused at
start-up, before any folder is made, in one line naming the setting and a size that fits.
"""
from __future__ import annotations

import jax
import ml_collections
import numpy as np
import pytest

from synchformer_jax import cli, experiment, sharding, train
from synchformer_jax.input import device as device_lib


def _mesh(data, fsdp):
    return ml_collections.ConfigDict(dict(data=data, fsdp=fsdp))


@pytest.mark.parametrize("data, fsdp, n, shape", [(-1, 1, 4, (4, 1)), (1, 8, 8, (1, 8)), (2, 2, 4, (2, 2)),
                                                  (-1, 2, 8, (4, 2)), (2, -1, 8, (2, 4))])
def test_meshes_that_fit(data, fsdp, n, shape):
    mesh = sharding.mesh_from_config(_mesh(data, fsdp), devices=jax.devices()[:n])
    assert (mesh.shape[sharding.DATA], mesh.shape[sharding.FSDP]) == shape


@pytest.mark.parametrize("data, fsdp, n, says, fix", [
    # The audit's case: the FSDP-8 config on 4 devices.
    (1, 8, 4, "mesh.data=1, mesh.fsdp=8 need 8 devices, this run has 4", "--config.mesh.data=-1 --config.mesh.fsdp=4"),
    (-1, 8, 4, "mesh.data=-1, mesh.fsdp=8 need a multiple of 8 devices, this run has 4",
     "--config.mesh.data=-1 --config.mesh.fsdp=4"),
    (8, 1, 4, "mesh.data=8, mesh.fsdp=1 need 8 devices, this run has 4", "--config.mesh.data=-1, keeping mesh.fsdp=1"),
    (-1, 3, 4, "need a multiple of 3 devices, this run has 4", "--config.mesh.fsdp=2"),
    (2, 2, 3, "need 4 devices, this run has 3", "--config.mesh.data=-1 --config.mesh.fsdp=1"),
    (-1, -1, 4, "at most one of mesh.data and mesh.fsdp may be -1", "--config.mesh.fsdp=1"),
    (0, 1, 4, "mesh.data must be a positive device count or -1", "--config.mesh.data=-1"),
])
def test_a_mesh_that_does_not_fit_names_the_config_keys(data, fsdp, n, says, fix):
    with pytest.raises(cli.ConfigError) as e:
        sharding.mesh_from_config(_mesh(data, fsdp), devices=jax.devices()[:n])
    message = str(e.value)
    assert says in message and fix in message and "\n" not in message, message


def test_the_suggested_mesh_fits():
    """Every suggestion is itself a mesh that builds on those devices."""
    for n in (1, 2, 3, 4, 6, 8):
        for data, fsdp in [(1, 8), (-1, 8), (8, 1), (-1, 3), (2, 2), (4, 2), (3, -1), (16, -1)]:
            problem = sharding.mesh_problem(data, fsdp, n)
            if not problem:
                continue
            fix = problem.split("Set ", 1)[1].split("(")[0]  # the first suggestion, not the alternatives
            keys = dict(kv.rstrip(",").split("=") for kv in fix.split() if kv.startswith("--config.mesh."))
            d, f = int(keys.get("--config.mesh.data", data)), int(keys.get("--config.mesh.fsdp", fsdp))
            assert not sharding.mesh_problem(d, f, n), (data, fsdp, n, problem)
            sharding.mesh_from_config(_mesh(d, f), devices=jax.devices()[:n])


def test_a_mesh_error_is_one_line_with_exit_2(tmp_path, capsys):
    """Through the CLI (the FSDP-8 tiny config on this session's 8 devices asks for 16)."""
    rc = cli.main(["train", "--config", "configs/tiny.py:sync", "--workdir", str(tmp_path / "run"),
                   "--config.mesh.data=2", "--config.mesh.fsdp=8"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1, err
    assert err.startswith("error: mesh.data=2, mesh.fsdp=8 need 16 devices, this run has 8") and "Traceback" not in err


def test_a_batch_that_does_not_split_names_data_batch_size():
    mesh = device_lib.make_mesh((3, 1), sharding.BATCH_AXES, devices=jax.devices()[:3])
    with pytest.raises(ValueError, match=r"global batch 8 does not split over 3 batch shards.*data\.batch_size"):
        device_lib.host_to_global({"x": np.zeros((8, 2), np.float32)}, mesh, sharding.BATCH_AXES)


def _batch_config(stage=experiment.STAGE_SYNC, **data):
    config = experiment.default_config(stage)
    config.data.update(data)
    return config


@pytest.mark.parametrize("stage, data, n, training, says", [
    (experiment.STAGE_SYNC, dict(batch_size=12, eval_batch_size=16), 8, True,
     "data.batch_size=12 does not split over 1 process and 8 devices (the global batch spans the mesh): "
     "use a multiple of 8, e.g. data.batch_size=8"),
    (experiment.STAGE_SYNC, dict(batch_size=16, eval_batch_size=6), 4, True,
     "data.eval_batch_size=6 does not split over 1 process and 4 devices"),
    # Evaluation alone does not mind the training batch.
    (experiment.STAGE_SYNC, dict(batch_size=3, eval_batch_size=6), 4, False,
     "data.eval_batch_size=6 does not split"),
    (experiment.STAGE_SYNC, dict(batch_size=0, eval_batch_size=8), 1, True,
     "data.batch_size=0 must be a positive whole number of clips"),
    (experiment.STAGE_AVCLIP, dict(batch_size=4, eval_batch_size=8), 8, True,
     "data.batch_size=4 does not split over 1 process and 8 devices"),
])
def test_batch_sizes_that_do_not_split_are_refused(stage, data, n, training, says):
    mesh = sharding.mesh_from_config(_mesh(-1, 1), devices=jax.devices()[:n])
    with pytest.raises(cli.ConfigError) as e:
        train.check_batch_sizes(_batch_config(stage, **data), mesh, training=training)
    assert says in str(e.value) and "\n" not in str(e.value), str(e.value)


def test_stage1_pools_must_split_the_batch():
    mesh = sharding.mesh_from_config(_mesh(-1, 1), devices=jax.devices()[:2])
    config = _batch_config(experiment.STAGE_AVCLIP, batch_size=6, eval_batch_size=8)
    config.train.pool_clips = 4
    with pytest.raises(cli.ConfigError, match=r"data.batch_size=6 does not split into stage-I pools of "
                                              r"train.pool_clips=4 clips"):
        train.check_batch_sizes(config, mesh)
    config.train.pool_clips = 3
    train.check_batch_sizes(config, mesh)  # 2 pools of 3, 3 clips per device
    config.train.pool_clips = 0
    train.check_batch_sizes(config, mesh)  # official: a pool per device
    assert train.negative_pools(config, mesh.size) == 2


def test_sizes_that_fit_pass():
    for n, batch in ((1, 3), (2, 2), (4, 8), (8, 16)):
        mesh = sharding.mesh_from_config(_mesh(-1, 1), devices=jax.devices()[:n])
        train.check_batch_sizes(_batch_config(batch_size=batch, eval_batch_size=batch), mesh)


def test_a_batch_error_is_one_line_with_exit_2_and_no_folder(tmp_path, capsys):
    run = tmp_path / "run"
    rc = cli.main(["train", "--config", "configs/tiny.py:sync", "--workdir", str(run),
                   "--config.mesh.data=-1", "--config.mesh.fsdp=1", "--config.data.batch_size=12"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert err.startswith("error: data.batch_size=12 does not split over 1 process and 8 devices"), err
    assert not (run / "checkpoints").exists()
