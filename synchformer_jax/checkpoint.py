"""Training checkpoints: orbax `CheckpointManager` with the train state, the data
iterator state and the config of every saved step.

* Saves are asynchronous; orbax writes each step into a temporary folder and renames it
  when complete, so a half-written step is never listed and `latest_step()` is always a
  complete one (a kill during a write loses that write only).
* The newest `keep` steps are kept; a second manager under `best/` keeps the step with
  the best evaluation metric.
"""
from __future__ import annotations

import json
import pathlib
from typing import Any, Optional

import jax
import ml_collections
import orbax.checkpoint as ocp

CHECKPOINTS = "checkpoints"
BEST = "best"


def _options(keep: int, name: str, best_metric: Optional[str] = None, best_mode: str = "max"):
    # Each manager's multi-process barriers need names of their own: orbax names them by
    # purpose only, and the latest and best managers finalize their async saves at the
    # same time, which on several processes fails ("barrier ... is already ongoing").
    kw: dict[str, Any] = dict(max_to_keep=keep, enable_async_checkpointing=True, create=True,
                              multiprocessing_options=ocp.options.MultiprocessingOptions(
                                  barrier_sync_key_prefix=name))
    if best_metric:
        kw.update(best_fn=lambda metrics: float(metrics[best_metric]), best_mode=best_mode)
    return ocp.CheckpointManagerOptions(**kw)


def _handlers() -> dict:
    return {"state": ocp.StandardCheckpointHandler(), "data": ocp.JsonCheckpointHandler(),
            "config": ocp.JsonCheckpointHandler()}


class RunCheckpoints:
    def __init__(self, workdir: str | pathlib.Path, keep: int = 3, best_metric: str = "", best_mode: str = "max"):
        workdir = pathlib.Path(workdir).absolute()
        self.latest = ocp.CheckpointManager(workdir / CHECKPOINTS, options=_options(keep, CHECKPOINTS),
                                            item_handlers=_handlers())
        self.best = (ocp.CheckpointManager(workdir / BEST, options=_options(1, BEST, best_metric, best_mode),
                                           item_handlers=_handlers()) if best_metric else None)

    def latest_step(self) -> Optional[int]:
        return self.latest.latest_step()

    @staticmethod
    def _args(state: Any, data_state: Any, config: ml_collections.ConfigDict):
        return ocp.args.Composite(state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state),
                                  config=ocp.args.JsonSave(json.loads(config.to_json())))

    def save(self, step: int, state: Any, data_state: Any, config: ml_collections.ConfigDict,
             force: bool = False) -> bool:
        return self.latest.save(step, args=self._args(state, data_state, config), force=force)

    def save_best(self, step: int, state: Any, data_state: Any, config: ml_collections.ConfigDict,
                  metrics: dict) -> None:
        if self.best is not None:
            self.best.save(step, args=self._args(state, data_state, config), metrics=metrics, force=True)

    def restore(self, step: int, abstract_state: Any) -> Any:
        """The train state; `abstract_state`: ShapeDtypeStructs with shardings (restores
        straight to devices)."""
        return self.latest.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state))).state

    def saved_data_state(self, step: int) -> Any:
        """The data state that `step` was saved with (JSON values)."""
        return self.latest.restore(step, args=ocp.args.Composite(data=ocp.args.JsonRestore())).data

    def saved_config(self, step: int) -> dict:
        """The config that wrote `step` (as JSON values)."""
        return self.latest.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore())).config

    def wait(self) -> None:
        self.latest.wait_until_finished()
        if self.best is not None:
            self.best.wait_until_finished()

    def close(self) -> None:
        self.latest.close()
        if self.best is not None:
            self.best.close()


def abstract_with_shardings(abstract: Any, shardings: Any) -> Any:
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract, shardings)


def _host_device() -> jax.Device:
    try:
        return jax.local_devices(backend="cpu")[0]
    except RuntimeError:  # no CPU backend in this process (JAX_PLATFORMS without cpu)
        return jax.local_devices()[0]


def restore_on_host(workdir: str | pathlib.Path, which: str = CHECKPOINTS,
                    step: Optional[int] = None) -> tuple[int, Any, Any, dict]:
    """`(step, train state, data iterator state, config dict)` of a complete step of a run
    (the latest by default), the state as host numpy.

    Whatever wrote it: the saved shardings name the devices of the writing run (a pod
    slice, several processes), which this process need not have, so every array is
    restored onto one local device instead of the saved layout.
    """
    directory = pathlib.Path(workdir).absolute() / which
    handlers = _handlers()
    with ocp.CheckpointManager(directory, item_names=tuple(handlers), item_handlers=handlers) as mngr:
        step = mngr.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"{directory}: no complete checkpoint")
        one = jax.sharding.SingleDeviceSharding(_host_device())
        target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=one),
                              mngr.item_metadata(step)["state"])
        restored = mngr.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(target), data=ocp.args.JsonRestore(), config=ocp.args.JsonRestore()))
    return step, jax.device_get(restored.state), restored.data, restored.config


def restore_params(workdir: str | pathlib.Path, which: str = CHECKPOINTS) -> tuple[Any, Any]:
    """Params (host numpy) and model config of the latest (or best) step of a run."""
    from synchformer_jax import experiment

    _, state, _, config = restore_on_host(workdir, which)
    return state["params"], experiment.model_config(ml_collections.ConfigDict(config))
