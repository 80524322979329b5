"""Artifacts for other tools: a PyTorch-compatible state dict in safetensors.

The file carries the official key names, shapes and layouts (loadable with the official
`Synchformer.load_state_dict(strict=True)` after `safetensors.torch.load_file`), plus our
model config as metadata so that reading it back needs no guessing.
"""
from __future__ import annotations

import json
import os
from typing import Any, Mapping, Optional

import numpy as np
from safetensors.numpy import save_file

from synchformer_jax.models.config import ModelConfig
from synchformer_jax.models.convert_torch import flax_to_torch

CONFIG_METADATA_KEY = "synchformer_jax.model_config"


def save_torch_state_dict(path: str | os.PathLike, params: Mapping[str, Any], config: ModelConfig,
                          passthrough: Optional[Mapping[str, np.ndarray]] = None) -> dict[str, np.ndarray]:
    """Write `params` as an official-layout state dict (float32 safetensors); return it."""
    state_dict = flax_to_torch(params, passthrough)
    metadata = {CONFIG_METADATA_KEY: json.dumps(config.to_dict()), "format": "pt"}
    # np.asarray(order="C") keeps 0-d tensors (logit_scale) 0-d; ascontiguousarray would not.
    save_file({k: np.asarray(v, order="C") for k, v in state_dict.items()}, os.fspath(path), metadata=metadata)
    return state_dict


def config_from_metadata(metadata: Optional[Mapping[str, str]]) -> Optional[ModelConfig]:
    if metadata and CONFIG_METADATA_KEY in metadata:
        return ModelConfig.from_dict(json.loads(metadata[CONFIG_METADATA_KEY]))
    return None
