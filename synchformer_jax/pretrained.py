"""Pretrained models: a folder with orbax params, the model config and provenance.

Layout of a converted (or exported) model folder:
  params/               orbax StandardCheckpointer tree of float32 Flax params
  model_config.json     `ModelConfig.to_dict()`
  passthrough.safetensors  official tensors without a Flax counterpart (optional)
  conversion.json       where it came from and what the conversion did (optional)

`load_model` also takes official files directly (`.pt`, `.pth`, `.safetensors`) and
converts them in memory.
"""
from __future__ import annotations

import dataclasses
import json
import os
import pathlib
from typing import Any, Iterable, Mapping, Optional

import jax
import numpy as np

from synchformer_jax import torch_pickle
from synchformer_jax.export import config_from_metadata
from synchformer_jax.models import convert_torch
from synchformer_jax.models.config import ModelConfig

CONFIG_FILE = "model_config.json"
PARAMS_DIR = "params"
PASSTHROUGH_FILE = "passthrough.safetensors"
PROVENANCE_FILE = "conversion.json"


class CheckpointError(ValueError):
    """A model folder or file that cannot be loaded; the message names it."""


@dataclasses.dataclass
class LoadedModel:
    config: ModelConfig
    params: Any
    passthrough: dict[str, np.ndarray]
    notes: list[str]


def save_model(directory: str | os.PathLike, params: Any, config: ModelConfig, *,
               passthrough: Optional[Mapping[str, np.ndarray]] = None,
               provenance: Optional[Mapping[str, Any]] = None, overwrite: bool = False) -> pathlib.Path:
    """Write a model folder (see module docstring); an existing one only with `overwrite`."""
    import shutil

    import orbax.checkpoint as ocp

    directory = pathlib.Path(directory).absolute()
    if (directory / PARAMS_DIR).exists():
        if not overwrite:
            raise CheckpointError(f"{directory} already holds a model; pass overwrite (--overwrite) to replace it")
        for name in (PARAMS_DIR, CONFIG_FILE, PASSTHROUGH_FILE, PROVENANCE_FILE):
            target = directory / name
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()
    directory.mkdir(parents=True, exist_ok=True)
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(directory / PARAMS_DIR, jax.tree.map(np.asarray, params))
        ckptr.wait_until_finished()
    (directory / CONFIG_FILE).write_text(json.dumps(config.to_dict(), indent=1))
    if passthrough:
        from safetensors.numpy import save_file

        save_file({k: np.asarray(v, order="C") for k, v in passthrough.items()}, str(directory / PASSTHROUGH_FILE))
    if provenance is not None:
        (directory / PROVENANCE_FILE).write_text(json.dumps(provenance, indent=1, default=str))
    return directory


def read_provenance(directory: str | os.PathLike) -> dict[str, Any]:
    """The provenance a model folder was saved with (`{}` when it has none, e.g. a .pt)."""
    path = pathlib.Path(directory) / PROVENANCE_FILE
    if not path.is_file():
        return {}
    try:
        record = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    return record if isinstance(record, dict) else {}


def load_model(path: str | os.PathLike, *, overrides: Optional[Mapping[str, Any]] = None,
               modules: Optional[Iterable[str]] = None) -> LoadedModel:
    """Params and config from a model folder, a training workdir (its best checkpoint,
    else its latest) or an official checkpoint file.

    `overrides` (dotted `ModelConfig` names) fix sizes a state dict does not store, such
    as head counts of unofficial widths; `modules` converts only some top-level modules
    (e.g. `["vfeat_extractor"]`: the part of `synchformer_state_dict.pth`, a whole AudioSet
    model, that MMAudio conditions on).
    """
    path = pathlib.Path(path)
    if path.is_dir() and (path / "checkpoints").is_dir() and not (path / CONFIG_FILE).exists():
        return _load_workdir(path, overrides)
    if path.is_dir():
        return _load_folder(path, overrides)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or folder")
    state_dict, extras = torch_pickle.load_state_dict_file(path)
    config = config_from_metadata(extras.get("metadata"))
    overrides = dict(overrides or {})
    if config is None:
        config = convert_torch.infer_config(state_dict, embedded=extras.get("args"), overrides=overrides,
                                            modules=modules)
    elif overrides:
        config = _with_overrides(path, config, overrides)
    converted = convert_torch.torch_to_flax(state_dict, config, modules=modules)
    return LoadedModel(converted.config, converted.params, converted.passthrough, converted.notes)


def _load_workdir(workdir: pathlib.Path, overrides: Optional[Mapping[str, Any]]) -> LoadedModel:
    """A training workdir: its best checkpoint if it has one (`train.best_metric`), else
    its latest, so that `predict` / `export` / `convert` take a run as it is."""
    from synchformer_jax import checkpoint, resume

    errors = []
    for which in (checkpoint.BEST, checkpoint.CHECKPOINTS):
        if not (workdir / which).is_dir():
            continue
        try:
            params, config = checkpoint.restore_params(workdir, which)
            break
        except (FileNotFoundError, ValueError) as e:  # e.g. no best step saved yet
            errors.append(f"{which}/: {e}")
    else:
        raise CheckpointError(f"{workdir}: no usable checkpoint ({'; '.join(errors)})")
    if overrides:
        config = _with_overrides(workdir, config, overrides)
    notes = [f"the {which} checkpoint of training run {workdir}"]
    # A run resumed with other settings says so (`resume`): what it was trained with.
    notes += [f"resumed at step {r['step']} with a changed config: "
              + "; ".join(str(resume.Change(k, b, a)) for k, (b, a) in r["changes"].items())
              for r in resume.history(workdir)]
    return LoadedModel(config, jax.tree.map(np.asarray, params), {}, notes)


def _with_overrides(path, config: ModelConfig, overrides: Mapping[str, Any]) -> ModelConfig:
    try:
        return config.replace(**overrides)
    except (TypeError, ValueError) as e:  # a misspelt field: one line, not a dataclasses traceback
        raise CheckpointError(f"{path}: bad override ({e})") from None


def _load_folder(directory: pathlib.Path, overrides: Optional[Mapping[str, Any]]) -> LoadedModel:
    import orbax.checkpoint as ocp

    config_path = directory / CONFIG_FILE
    if not config_path.exists() or not (directory / PARAMS_DIR).exists():
        raise CheckpointError(f"{directory}: not a model folder (needs {CONFIG_FILE} and {PARAMS_DIR}/)")
    config = ModelConfig.from_dict(json.loads(config_path.read_text()))
    if overrides:
        config = _with_overrides(directory, config, overrides)
    try:
        with ocp.StandardCheckpointer() as ckptr:
            params = ckptr.restore((directory / PARAMS_DIR).absolute())  # orbax refuses relative paths
    except Exception as exc:  # noqa: BLE001 - orbax/tensorstore raise many kinds; one line names the folder
        raise CheckpointError(f"{directory}: cannot read {PARAMS_DIR}/ ({type(exc).__name__}: {exc})") from exc
    passthrough = {}
    if (directory / PASSTHROUGH_FILE).exists():
        from safetensors.numpy import load_file

        passthrough = load_file(str(directory / PASSTHROUGH_FILE))
    return LoadedModel(config, params, passthrough, [])
