"""Official PyTorch state dicts <-> Flax parameters, both ways, exactly.

Flax scope names mirror the official keys, so the mapping is one rule, not a table:
`a.b.0.c.weight` <-> `('a', 'b_0', 'c', 'kernel')` with these layout changes:
  Linear `[out, in]` -> kernel `[in, out]`; Conv2d `[O, I, kh, kw]` -> `[kh, kw, I, O]`;
  Conv3d `[O, I, kt, kh, kw]` -> `[kt, kh, kw, I, O]`; LayerNorm `weight` -> `scale`;
  MultiheadAttention `in_proj_weight/bias` -> `in_proj/{kernel,bias}`.
Everything else (tokens, position tables, the temperature) keeps its name and shape.

The official visual extractor carries a 2-D `patch_embed` it never applies. It has no
Flax counterpart; `torch_to_flax` returns it separately ("passthrough") so that writing
back reproduces the original state dict bit for bit.
"""
from __future__ import annotations

import dataclasses
import logging
import re
from typing import Any, Iterable, Mapping, Optional

import jax
import numpy as np
from flax import traverse_util

from synchformer_jax.models.config import (
    HEAD_OFFSET, HEAD_SYNCHRONIZABILITY, KIND_AVCLIP, KIND_SYNC, ASTConfig, ModelConfig,
    MotionformerConfig, SyncTransformerConfig)

log = logging.getLogger(__name__)

# Top-level module names of each model kind, in the official registration order.
SYNC_MODULES = ("vfeat_extractor", "afeat_extractor", "vproj", "aproj", "transformer")
AVCLIP_MODULES = ("logit_scale", "v_encoder", "a_encoder")
# The never-used 2-D patch embedding of the official Motionformer.
UNUSED_SUFFIXES = ("patch_embed.proj.weight", "patch_embed.proj.bias")

_INDEXED = re.compile(r"^(.*)_(\d+)$")


class ConversionError(ValueError):
    """A state dict does not fit the model: missing, unexpected or misshapen tensors."""


@dataclasses.dataclass
class Converted:
    params: dict  # nested Flax params (numpy arrays)
    config: ModelConfig
    passthrough: dict[str, np.ndarray]  # official tensors without a Flax counterpart
    notes: list[str]  # what was renamed, truncated or dropped on the way


# ---- key mapping ------------------------------------------------------------------------
def torch_key_to_flax_path(key: str, ndim: int) -> tuple[str, ...]:
    parts = key.split(".")
    path: list[str] = []
    for part in parts[:-1]:
        if part.isdigit():
            if not path:
                raise ConversionError(f"cannot map key {key!r}")
            path[-1] = f"{path[-1]}_{part}"
        else:
            path.append(part)
    leaf = parts[-1]
    if leaf == "in_proj_weight":
        return (*path, "in_proj", "kernel")
    if leaf == "in_proj_bias":
        return (*path, "in_proj", "bias")
    if leaf == "weight":
        return (*path, "scale" if ndim == 1 else "kernel")
    return (*path, leaf)


def flax_path_to_torch_key(path: tuple[str, ...]) -> str:
    *mods, leaf = path
    if mods and mods[-1] == "in_proj":
        return ".".join(_unindex(mods[:-1]) + [f"in_proj_{'weight' if leaf == 'kernel' else leaf}"])
    if leaf in ("kernel", "scale"):
        leaf = "weight"
    return ".".join(_unindex(mods) + [leaf])


def _unindex(mods: Iterable[str]) -> list[str]:
    out = []
    for m in mods:
        match = _INDEXED.match(m)
        out.extend([match.group(1), match.group(2)] if match else [m])
    return out


def torch_to_flax_array(key: str, value: np.ndarray) -> np.ndarray:
    leaf = key.rsplit(".", 1)[-1]
    if leaf in ("weight", "in_proj_weight") and value.ndim >= 2:
        if value.ndim == 2:
            return np.ascontiguousarray(value.T)
        # [O, I, *k] -> [*k, I, O]
        k = value.ndim - 2
        return np.ascontiguousarray(value.transpose(*range(2, 2 + k), 1, 0))
    return np.asarray(value)


def flax_to_torch_array(path: tuple[str, ...], value: np.ndarray) -> np.ndarray:
    if path[-1] == "kernel":
        if value.ndim == 2:
            return np.ascontiguousarray(value.T)
        k = value.ndim - 2
        return np.ascontiguousarray(value.transpose(k + 1, k, *range(k)))
    return np.asarray(value)


# ---- key normalisation between the official file kinds ----------------------------------
def canonical_keys(state_dict: Mapping[str, np.ndarray], kind: str, notes: list[str]) -> dict[str, np.ndarray]:
    """Bring stage-I, stage-II, synchronizability and MMAudio key sets to `kind`'s names.

    Stage-I files come from a DDP-wrapped AVCLIP (`module.` prefix, `v_encoder.`,
    `a_encoder.`, `logit_scale`); stage-II/III files use `vfeat_extractor.` etc.
    """
    out: dict[str, np.ndarray] = {}
    stripped = False
    for key, value in state_dict.items():
        if key.startswith("module."):
            key = key[len("module."):]
            stripped = True
        if kind == KIND_SYNC:
            if key == "logit_scale":
                notes.append("dropped the stage-I temperature `logit_scale` (not part of the sync model)")
                continue
            key = re.sub(r"^v_encoder\.", "vfeat_extractor.", key)
            key = re.sub(r"^a_encoder\.", "afeat_extractor.", key)
        else:
            key = re.sub(r"^vfeat_extractor\.", "v_encoder.", key)
            key = re.sub(r"^afeat_extractor\.", "a_encoder.", key)
        if key in out:
            raise ConversionError(f"two tensors map to the key {key!r}")
        out[key] = value
    if stripped:
        notes.append("stripped the DDP prefix `module.`")
    return out


def _is_unused(key: str) -> bool:
    return key.split(".", 1)[0] in ("vfeat_extractor", "v_encoder") and key.endswith(UNUSED_SUFFIXES) \
        and key.count(".") == 3


# ---- architecture from a state dict ------------------------------------------------------
def _count(sd: Mapping[str, Any], pattern: str) -> int:
    rx = re.compile(pattern)
    return len({m.group(1) for k in sd if (m := rx.match(k))})


def _heads(dim: int, official_dim: int, official_heads: int, override: Optional[int]) -> Optional[int]:
    """Head counts are not stored in state dicts: official widths get the official count;
    any other width needs it given (None: unknown). Guessing from a head width would
    build a wrong model without a word (a 128-wide AST of 8 heads is not 2 of 64)."""
    if override:
        return int(override)
    if dim == official_dim:
        return official_heads
    return None


# Top-level modules of each group (sync model / stage-I model), for `modules` filters.
_GROUP_MODULES = {"video": ("vfeat_extractor", "v_encoder"), "audio": ("afeat_extractor", "a_encoder"),
                  "sync": ("transformer",)}


class _Shape:
    """Lets inference read `.shape` from arrays and from plain shape tuples alike."""

    def __init__(self, value: Any) -> None:
        self.shape = tuple(value) if isinstance(value, (tuple, list)) else tuple(np.shape(value))


def infer_config(state_dict: Mapping[str, Any], embedded: Optional[Mapping[str, Any]] = None,
                 overrides: Optional[Mapping[str, Any]] = None,
                 modules: Optional[Iterable[str]] = None) -> ModelConfig:
    """Model sizes from the embedded official config where present, else tensor shapes.

    `state_dict` maps keys to arrays or to shape tuples.

    `overrides` uses dotted `ModelConfig` names (`"video.num_heads"`, `"sync.n_head"`,
    `"n_segments"`, ...) and wins over both. What neither the file nor `overrides` gives
    (head counts of unofficial widths; the offset range of a class count other than 21
    in a file without its training config) is asked for in one error listing all of it;
    for modules left out by `modules` it is not needed (1 head is recorded).
    """
    overrides = dict(overrides or {})
    wanted = set(modules) if modules is not None else None
    missing: list[str] = []

    def heads(group: str, dim: int, official_dim: int, official_heads: int, field: str,
              given: Optional[int] = None) -> int:
        n = given or _heads(dim, official_dim, official_heads, overrides.pop(f"{group}.{field}", None))
        if n is not None:
            return n
        if wanted is not None and not wanted & set(_GROUP_MODULES[group]):
            return 1  # a module that is not converted: its params, and so its heads, never exist
        missing.append(f"--set {group}.{field}=N (width {dim})")
        return 1

    sd = {k[len("module."):] if k.startswith("module.") else k: _Shape(v) for k, v in state_dict.items()}
    kind = overrides.pop("kind", None) or (KIND_AVCLIP if ("logit_scale" in sd or any(
        k.startswith(("v_encoder.", "a_encoder.")) for k in sd)) else KIND_SYNC)
    v_prefix = "v_encoder." if any(k.startswith("v_encoder.") for k in sd) else "vfeat_extractor."
    a_prefix = "a_encoder." if any(k.startswith("a_encoder.") for k in sd) else "afeat_extractor."
    tparams = _embedded_transformer_params(embedded)

    video = MotionformerConfig()
    if v_prefix + "cls_token" in sd:
        dim = sd[v_prefix + "cls_token"].shape[-1]
        pe = sd[v_prefix + "patch_embed_3d.proj.weight"].shape  # [D, 3, kt, kh, kw]
        n_spatial = sd[v_prefix + "pos_embed"].shape[1] - 1
        grid = int(round(n_spatial ** 0.5))
        video = MotionformerConfig(
            embed_dim=dim,
            depth=_count(sd, re.escape(v_prefix) + r"blocks\.(\d+)\."),
            num_heads=heads("video", dim, 768, 12, "num_heads"),
            mlp_ratio=sd[v_prefix + "blocks.0.mlp.fc1.weight"].shape[0] // dim,
            patch_size=pe[3], patch_size_temp=pe[2], img_size=grid * pe[3],
            num_frames=sd[v_prefix + "temp_embed"].shape[1] * pe[2])
    audio = ASTConfig()
    if a_prefix + "ast.embeddings.cls_token" in sd:
        dim = sd[a_prefix + "ast.embeddings.cls_token"].shape[-1]
        audio = ASTConfig(
            hidden_size=dim,
            num_layers=_count(sd, re.escape(a_prefix) + r"ast\.encoder\.layer\.(\d+)\."),
            num_heads=heads("audio", dim, 768, 12, "num_heads"),
            mlp_dim=sd[a_prefix + "ast.encoder.layer.0.intermediate.dense.weight"].shape[0],
            patch_size=sd[a_prefix + "ast.embeddings.patch_embeddings.projection.weight"].shape[-1])
        n_pos = sd[a_prefix + "ast.embeddings.position_embeddings"].shape[1]
        if n_pos != audio.freq_patches * audio.time_patches + 2:
            raise ConversionError(
                f"AST position table has {n_pos} rows, but a {audio.num_mel_bins}x{audio.max_spec_t} spectrogram "
                f"gives {audio.freq_patches * audio.time_patches + 2} tokens; set audio.* overrides")
    sync = SyncTransformerConfig()
    n_segments = ModelConfig().n_segments
    if "transformer.OFF_tok" in sd:
        dim = sd["transformer.OFF_tok"].shape[-1]
        head = HEAD_SYNCHRONIZABILITY if "transformer.sync_head.weight" in sd else HEAD_OFFSET
        given = overrides.pop("sync.n_head", None) or tparams.get("n_head")
        n_head = heads("sync", dim, 768, 8, "n_head", given)
        pos_len = sd["transformer.pos_emb_cfg.pos_emb"].shape[1]
        per_seg = video.temporal_patches + audio.time_patches
        if (pos_len - 2) % per_seg:
            raise ConversionError(f"position table of {pos_len} rows does not fit {per_seg} tokens per segment")
        n_segments = (pos_len - 2) // per_seg
        num_classes = sd["transformer.off_head.weight"].shape[0] if head == HEAD_OFFSET else 21
        max_offset = overrides.pop("sync.max_offset_sec", None) or tparams.get("max_off_sec")
        if max_offset is None:
            # The class grid is not stored. 21 classes are the official +-2 s; other counts
            # have been trained with other ranges (SparseSync's 3 classes: +-1 s).
            if num_classes != 21 and (wanted is None or "transformer" in wanted):
                missing.append(f"--set sync.max_offset_sec=S ({num_classes} offset classes; the file does not "
                               "say their range)")
            max_offset = 2.0
        sync = SyncTransformerConfig(
            n_embd=dim, n_layer=_count(sd, r"transformer\.blocks\.(\d+)\."), n_head=int(n_head),
            mlp_ratio=sd["transformer.blocks.0.mlp.0.weight"].shape[0] // dim, head=head,
            num_offset_classes=num_classes, max_offset_sec=float(max_offset))
    if missing:
        raise ConversionError("the file does not store what this model needs (head counts of widths other than "
                              "the official 768; the offset range of a head other than 21 classes); give: "
                              + "; ".join(missing))
    config = ModelConfig(kind=kind, audio=audio, video=video, sync=sync, n_segments=n_segments)
    if overrides:
        try:
            config = config.replace(**overrides)
        except (TypeError, ValueError) as e:
            raise ConversionError(f"bad override: {e}") from None
    return config


def _embedded_transformer_params(embedded: Optional[Mapping[str, Any]]) -> dict[str, Any]:
    """Pull the sync transformer's sizes from a checkpoint's resolved OmegaConf `args`."""
    out: dict[str, Any] = {}
    if not embedded:
        return out
    try:
        params = embedded["model"]["params"]["transformer"]["params"]
        out["n_head"] = int(params["n_head"])
    except (KeyError, TypeError, ValueError):
        pass
    try:
        out["max_off_sec"] = float(embedded["data"]["max_off_sec"])
    except (KeyError, TypeError, ValueError):
        pass
    return out


# ---- conversion ----------------------------------------------------------------------------
def flax_shape(key: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    """The Flax shape a torch tensor of `shape` under `key` takes."""
    leaf = key.rsplit(".", 1)[-1]
    if leaf in ("weight", "in_proj_weight") and len(shape) >= 2:
        return tuple(shape[2:]) + (shape[1], shape[0])
    return tuple(shape)


@dataclasses.dataclass
class Plan:
    """Where every tensor of a state dict goes, computed from shapes alone."""

    paths: dict[str, tuple[str, ...]]  # canonical torch key -> Flax path
    truncate: dict[str, int]  # key -> rows kept of a longer position table
    passthrough: list[str]  # canonical keys with no Flax counterpart
    renamed: dict[str, str]  # canonical key -> key in the given state dict
    notes: list[str]


def _check_head_counts(config: ModelConfig) -> None:
    for field, width, heads in (("video.num_heads", config.video.embed_dim, config.video.num_heads),
                                ("audio.num_heads", config.audio.hidden_size, config.audio.num_heads),
                                ("sync.n_head", config.sync.n_embd, config.sync.n_head)):
        if heads < 1 or width % heads:
            raise ConversionError(f"{field}={heads} does not divide the width {width}")


def plan_conversion(shapes: Mapping[str, tuple[int, ...]], config: ModelConfig, *,
                    modules: Optional[Iterable[str]] = None) -> Plan:
    """Match official keys and shapes to the parameters `config` builds, or explain why not.

    `modules` limits the match to some top-level modules (e.g. `["vfeat_extractor"]`, all that
    MMAudio uses of `synchformer_state_dict.pth`, a whole model, or a visual-only state
    dict); otherwise every module of the model must be present.
    A longer position table is truncated to the model's length (stage II -> III
    initialisation, as the official `load_state_dict` does).
    """
    from synchformer_jax.models.synchformer import abstract_params  # avoid an import cycle

    _check_head_counts(config)
    notes: list[str] = []
    originals = {}
    for key in shapes:
        canon = next(iter(canonical_keys({key: None}, config.kind, [])), None)
        if canon is not None:
            originals[canon] = key
    canonical = canonical_keys(dict(shapes), config.kind, notes)
    expected = traverse_util.flatten_dict(abstract_params(config))
    wanted = set(modules) if modules is not None else None
    if wanted is not None:
        expected = {p: s for p, s in expected.items() if p[0] in wanted}
        unknown = wanted - {p[0] for p in expected}
        if unknown:
            raise ConversionError(f"the model has no top-level module(s) {sorted(unknown)}")

    paths: dict[str, tuple[str, ...]] = {}
    truncate: dict[str, int] = {}
    passthrough: list[str] = []
    unexpected: list[str] = []
    misshapen: list[str] = []
    for key, shape in canonical.items():
        shape = tuple(shape)
        if _is_unused(key):
            passthrough.append(key)
            continue
        if wanted is not None and key.split(".", 1)[0] not in wanted:
            continue
        path = torch_key_to_flax_path(key, len(shape))
        if path not in expected:
            unexpected.append(key)
            continue
        got, want = flax_shape(key, shape), tuple(expected[path].shape)
        if key == "transformer.pos_emb_cfg.pos_emb" and len(got) == 3 and got[1] > want[1] \
                and got[::2] == want[::2]:
            notes.append(f"truncated the position table from {got[1]} to its first {want[1]} rows")
            truncate[key] = want[1]
            got = want
        if got != want:
            misshapen.append(f"{key}: file {shape} -> {got}, model wants {want}")
            continue
        paths[key] = path
    found = set(paths.values())
    missing = sorted(flax_path_to_torch_key(p) for p in expected if p not in found)
    if unexpected or missing or misshapen:
        lines = []
        if missing:
            lines.append(f"missing {len(missing)}: {', '.join(missing[:12])}{' ...' if len(missing) > 12 else ''}")
        if unexpected:
            lines.append(f"unexpected {len(unexpected)}: {', '.join(unexpected[:12])}"
                         f"{' ...' if len(unexpected) > 12 else ''}")
        if misshapen:
            lines.append(f"wrong shape {len(misshapen)}: {'; '.join(misshapen[:6])}")
        raise ConversionError("state dict does not fit the model: " + " | ".join(lines))
    return Plan(paths, truncate, passthrough, originals, notes)


def torch_to_flax(state_dict: Mapping[str, np.ndarray], config: ModelConfig, *,
                  modules: Optional[Iterable[str]] = None) -> Converted:
    """Official state dict -> float32 Flax params for `config`; see `plan_conversion`."""
    plan = plan_conversion({k: np.shape(v) for k, v in state_dict.items()}, config, modules=modules)
    flat: dict[tuple[str, ...], np.ndarray] = {}
    for key, path in plan.paths.items():
        array = torch_to_flax_array(key, np.asarray(state_dict[plan.renamed[key]]))
        if key in plan.truncate:
            array = array[:, : plan.truncate[key]]
        # np.array, not np.ascontiguousarray: that one turns the 0-d `logit_scale` into (1,).
        flat[path] = np.array(array, dtype=np.float32, order="C")
    passthrough = {key: np.asarray(state_dict[plan.renamed[key]]) for key in plan.passthrough}
    return Converted(traverse_util.unflatten_dict(flat), config, passthrough, plan.notes)


def flax_to_torch(params: Mapping[str, Any], passthrough: Optional[Mapping[str, np.ndarray]] = None,
                  *, fill_unused: bool = True) -> dict[str, np.ndarray]:
    """Flax params -> a state dict with official key names, shapes and layouts (float32).

    The unused 2-D patch embedding comes from `passthrough` if given; otherwise, with
    `fill_unused`, it is written as zeros so that the official `load_state_dict`
    (strict) accepts the file — its values never influence the output.
    """
    out: dict[str, np.ndarray] = {}
    flat = traverse_util.flatten_dict(dict(params))
    for path, value in flat.items():
        key = flax_path_to_torch_key(path)
        out[key] = flax_to_torch_array(path, np.asarray(jax.device_get(value)))
    passthrough = dict(passthrough or {})
    for prefix in ("vfeat_extractor", "v_encoder"):
        if f"{prefix}.patch_embed_3d.proj.weight" not in out:
            continue
        w3 = out[f"{prefix}.patch_embed_3d.proj.weight"]  # [D, 3, kt, kh, kw]
        shapes = {"patch_embed.proj.weight": (w3.shape[0], w3.shape[1], w3.shape[3], w3.shape[4]),
                  "patch_embed.proj.bias": (w3.shape[0],)}
        for suffix, shape in shapes.items():
            key = f"{prefix}.{suffix}"
            if key in passthrough:
                out[key] = passthrough.pop(key)
            elif fill_unused:
                out[key] = np.zeros(shape, np.float32)
    out.update(passthrough)
    return out
