"""Serialised inference with `jax.export`: a folder that runs without this package's model code.

`export_model(params, config, out_dir, batch=B)` writes:

  inference.jax_exported   `jax.export.Exported.serialize()` of
                           `f(params, video, audio) -> logits`, lowered for every platform
                           asked for (default cpu and cuda) with a fixed batch `B`
  params.safetensors       the float32 parameters, flat keys `"<module>/<...>/<name>"`
                           (the Flax tree joined with "/"); passed to `f` as a flat dict,
                           so the exported file holds no weights and one params file
                           serves several exports (batch sizes, input variants)
  contract.json            what `f` takes and returns (below), the class grid, the model
                           config, the jax version, the platforms

The contract (`inputs="model"`, the default: the model's own inputs):
  video  float32 [B, S, 16, 3, H, W]   official values in [-1, 1]
                                       (`input.normalize.video_uint8_to_model_input`)
  audio  float32 [B, S, 1, 128, 66]    normalised log-mel per segment (`input.melspec`)
  ->     logits float32 [B, C]         C = 21 offset classes (grid in contract.json) or
                                       2 synchronizability logits (index 1 = synchronizable)
with S = 14 (offset) / 13 (synchronizability), H = W = the model's crop (`video.img_size`, 224).

`inputs="raw"`: the official test-time preprocessing runs inside the function:
  video  uint8   [B, Tv, H, W, 3]      the 5 s (4.48 s) video crop at 25 fps, already
                                       cropped to H x W (centre crop of the 256-px frames)
  audio  float32 [B, Ta]               the audio crop at 16 kHz (starting `offset` after
                                       the video crop), mono
with Tv = 125 / Ta = 80 000 (offset) or 112 / 71 680 (synchronizability); the centred
segments, the float16-exact normalisation and the log-mel are applied inside.

Running it: `serving_loader.load(folder)` (jax + numpy + safetensors only), or by hand:
`jax.export.deserialize(bytes).call(params_dict, video, audio)`.

Params-only artifacts (no exported function): `--model-folder` writes the orbax model
folder (`pretrained.save_model`) and `--torch-safetensors` the official-layout state dict
(`export.save_torch_state_dict`); `synchformer-jax convert` writes both too.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import pathlib
import sys
from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from synchformer_jax.input import transforms
from synchformer_jax.models.config import HEAD_SYNCHRONIZABILITY, KIND_SYNC, ModelConfig

__all__ = ["FUNCTION_FILE", "PARAMS_FILE", "CONTRACT_FILE", "FORMAT", "INPUT_VARIANTS", "flatten_params",
           "unflatten_params", "input_specs", "inference_fn", "export_model", "add_export_parser", "export_cli"]

FUNCTION_FILE = "inference.jax_exported"
PARAMS_FILE = "params.safetensors"
CONTRACT_FILE = "contract.json"
FORMAT = "synchformer-jax/serving/1"
INPUT_VARIANTS = ("model", "raw")
SEP = "/"


def flatten_params(params: Any) -> dict[str, np.ndarray]:
    """Nested Flax params -> `{"a/b/kernel": float32 array}`."""
    out: dict[str, np.ndarray] = {}

    def walk(node, prefix):
        if isinstance(node, dict) or hasattr(node, "items"):
            for k, v in node.items():
                if SEP in str(k):
                    raise ValueError(f"parameter name {k!r} contains {SEP!r}")
                walk(v, f"{prefix}{SEP}{k}" if prefix else str(k))
        else:
            out[prefix] = np.ascontiguousarray(np.asarray(node, dtype=np.float32))

    walk(params, "")
    return out


def unflatten_params(flat: dict[str, Any]) -> dict[str, Any]:
    nested: dict[str, Any] = {}
    for key, value in flat.items():
        node = nested
        *parents, leaf = key.split(SEP)
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return nested


def _window(config: ModelConfig) -> tuple[int, int]:
    """(frames, samples) of the official crop the raw variant takes."""
    if config.sync.head == HEAD_SYNCHRONIZABILITY:
        sec = transforms.synchronizability_crop_len_sec(config.n_segments, config.video.num_frames)
    else:
        sec = 5.0
    return transforms.sec2frames(sec, transforms.VIDEO_FPS), transforms.sec2frames(sec, transforms.AUDIO_RATE)


def _preprocessing(config: ModelConfig) -> str:
    """The contract's description of the official test transform, in this model's sizes."""
    frames, samples = _window(config)
    seg_frames = config.video.num_frames
    return (f"official test transform: {frames / transforms.VIDEO_FPS:g} s crops (video at int(v_start*25), audio "
            f"at int((v_start+offset)*16000)), centre {config.video.img_size} crop of the 256-px frames, "
            f"{config.n_segments} centred segments of {seg_frames} frames / "
            f"{seg_frames * transforms.AUDIO_RATE // transforms.VIDEO_FPS} samples with 50 % overlap; "
            "see docs and synchformer_jax/input")


def input_specs(config: ModelConfig, batch: int, inputs: str = "model") -> dict[str, dict[str, Any]]:
    """`{"video": {"shape", "dtype", "layout"}, "audio": {...}}` of the exported function."""
    s, v, a = config.n_segments, config.video, config.audio
    if inputs == "model":
        return {"video": {"shape": [batch, s, v.num_frames, 3, v.img_size, v.img_size], "dtype": "float32",
                          "layout": "B S T C H W", "values": "official normalised RGB in [-1, 1]"},
                "audio": {"shape": [batch, s, 1, a.num_mel_bins, a.max_spec_t], "dtype": "float32",
                          "layout": "B S 1 F T", "values": "official normalised log-mel per 0.64 s segment"}}
    if inputs == "raw":
        frames, samples = _window(config)
        return {"video": {"shape": [batch, frames, v.img_size, v.img_size, 3], "dtype": "uint8",
                          "layout": "B T H W C", "values": f"RGB frames at 25 fps, the {frames / 25:g} s video crop, "
                                                          "spatially cropped (centre crop of 256-px frames)"},
                "audio": {"shape": [batch, samples], "dtype": "float32", "layout": "B N",
                          "values": "mono 16 kHz waveform of the audio crop (starts `offset` after the video crop)"}}
    raise ValueError(f"inputs must be one of {INPUT_VARIANTS}, got {inputs!r}")


def inference_fn(config: ModelConfig, inputs: str = "model") -> Callable:
    """`f(flat_params, video, audio) -> logits [B, C] float32` (jit-able)."""
    from synchformer_jax.input import melspec, normalize
    from synchformer_jax.models.synchformer import Synchformer

    if config.kind != KIND_SYNC:
        raise ValueError(f"only sync models (offset / synchronizability heads) are served; got kind {config.kind!r}")
    model = Synchformer(config)
    compute = jnp.dtype(config.dtype)
    if inputs == "raw":
        frames, samples = _window(config)
        seg = transforms.generate_segments(frames, samples, n_segments=config.n_segments,
                                           segment_size_vframes=config.video.num_frames, is_start_random=False)
        frame_idx = seg.frame_indices
        sample_idx = seg.sample_starts[:, None] + np.arange(seg.a_ranges[0, 1] - seg.a_ranges[0, 0])[None]
    elif inputs != "model":
        raise ValueError(f"inputs must be one of {INPUT_VARIANTS}, got {inputs!r}")

    def f(flat_params, video, audio):
        if inputs == "raw":
            v = jnp.moveaxis(jnp.take(video, jnp.asarray(frame_idx), axis=1), -1, -3)
            video = normalize.video_uint8_to_model_input(v, half=True, dtype=compute)
            audio = melspec.log_mel_jax(jnp.take(audio, jnp.asarray(sample_idx), axis=1))
        # The model casts to its compute dtype itself (after the patch embeddings' input).
        logits = model.apply({"params": unflatten_params(flat_params)}, video, audio)
        return logits.astype(jnp.float32)

    return f


def _class_info(config: ModelConfig) -> dict[str, Any]:
    if config.sync.head == HEAD_SYNCHRONIZABILITY:
        return {"head": config.sync.head, "labels": ["not synchronizable", "synchronizable"]}
    grid = transforms.class_grid(config.sync.max_offset_sec, config.sync.num_offset_classes)
    return {"head": config.sync.head, "offset_sec": [round(float(g), 6) for g in grid],
            "meaning": "class k: the audio starts offset_sec[k] seconds after the video"}


def _sha256(path: pathlib.Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def export_model(params: Any, config: ModelConfig, out_dir: str | os.PathLike, *, batch: int,
                 inputs: str = "model", dtype: Optional[str] = None,
                 platforms: Sequence[str] = ("cpu", "cuda"), overwrite: bool = False) -> pathlib.Path:
    """Write `inference.jax_exported`, `params.safetensors` and `contract.json` to `out_dir`.

    `dtype` sets the compute dtype (e.g. "bfloat16"); inputs, params and logits stay
    as in the contract (float32 params, float32 logits). Returns `out_dir`.
    """
    from jax import export as jax_export
    from safetensors.numpy import save_file

    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    if dtype:
        config = config.replace(dtype=dtype)
    out = pathlib.Path(out_dir)
    existing = [n for n in (FUNCTION_FILE, PARAMS_FILE, CONTRACT_FILE) if (out / n).exists()]
    if existing and not overwrite:
        raise FileExistsError(f"{out} already holds an export ({', '.join(existing)}); pass overwrite (--overwrite)")
    flat = flatten_params(params)
    specs = input_specs(config, batch, inputs)
    args = ({k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in flat.items()},
            jax.ShapeDtypeStruct(tuple(specs["video"]["shape"]), jnp.dtype(specs["video"]["dtype"])),
            jax.ShapeDtypeStruct(tuple(specs["audio"]["shape"]), jnp.dtype(specs["audio"]["dtype"])))
    try:
        exported = jax_export.export(jax.jit(inference_fn(config, inputs)), platforms=tuple(platforms))(*args)
        blob = exported.serialize()
    except ImportError as e:  # serialisation needs the flatbuffers package
        raise ImportError(f"jax.export serialisation needs flatbuffers: pip install flatbuffers ({e})") from e
    out.mkdir(parents=True, exist_ok=True)
    (out / FUNCTION_FILE).write_bytes(bytes(blob))
    save_file(flat, str(out / PARAMS_FILE), metadata={"format": FORMAT})
    out_avals = exported.out_avals[0]
    contract = {
        "format": FORMAT,
        "function": FUNCTION_FILE, "function_sha256": _sha256(out / FUNCTION_FILE),
        "params": PARAMS_FILE, "params_sha256": _sha256(out / PARAMS_FILE),
        "call": "logits = exported.call(params, video, audio); params = the flat dict of params.safetensors",
        "inputs_variant": inputs,
        "batch": batch,
        "inputs": specs,
        "outputs": {"logits": {"shape": list(out_avals.shape), "dtype": str(out_avals.dtype), "layout": "B C"}},
        "classes": _class_info(config),
        "num_params": int(sum(v.size for v in flat.values())),
        "compute_dtype": config.dtype,
        "model_config": config.to_dict(),
        "platforms": list(exported.platforms),
        "jax_version": jax.__version__,
        "calling_convention_version": int(exported.calling_convention_version),
        "preprocessing": _preprocessing(config),
    }
    (out / CONTRACT_FILE).write_text(json.dumps(contract, indent=1))
    return out


# ------------------------------------------------------------------------------- CLI


def add_export_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "export", help="model -> serialised jax.export inference function + params.safetensors + contract.json "
                       "(runs with jax, numpy and safetensors only; see synchformer_jax/serving_loader.py)")
    p.add_argument("source", metavar="MODEL", help="model folder or official .pt / .safetensors (sync model)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--batch", type=int, required=True, help="fixed batch size of the exported function")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None,
                   help="compute dtype (default: the model's); params and logits stay float32")
    p.add_argument("--inputs", choices=INPUT_VARIANTS, default="model",
                   help="model: normalised video + log-mel; raw: uint8 crop + waveform, preprocessing inside")
    p.add_argument("--platforms", default="cpu,cuda", help="comma separated: cpu, cuda, rocm, tpu")
    p.add_argument("--model-folder", action="store_true", help="also write the orbax model folder to OUT/model")
    p.add_argument("--torch-safetensors", action="store_true",
                   help="also write the official-layout state dict to OUT/model.safetensors")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(fn=export_cli)


def export_cli(args: argparse.Namespace) -> int:
    from synchformer_jax import export, pretrained

    loaded = pretrained.load_model(args.source)
    out = pathlib.Path(args.out)
    platforms = [p.strip() for p in args.platforms.split(",") if p.strip()]
    try:
        export_model(loaded.params, loaded.config, out, batch=args.batch, inputs=args.inputs, dtype=args.dtype,
                     platforms=platforms, overwrite=args.overwrite)
    except (ValueError, FileExistsError, ImportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    contract = json.loads((out / CONTRACT_FILE).read_text())
    print(f"wrote {out / FUNCTION_FILE} ({(out / FUNCTION_FILE).stat().st_size:,} bytes, platforms "
          f"{','.join(contract['platforms'])}), {out / PARAMS_FILE} ({contract['num_params']:,} params), "
          f"{out / CONTRACT_FILE}")
    print(f"  video {contract['inputs']['video']['dtype']} {contract['inputs']['video']['shape']}, audio "
          f"{contract['inputs']['audio']['dtype']} {contract['inputs']['audio']['shape']} -> logits float32 "
          f"{contract['outputs']['logits']['shape']}")
    if args.model_folder:
        folder = pretrained.save_model(out / "model", loaded.params, loaded.config, passthrough=loaded.passthrough,
                                       provenance={"source": str(args.source)}, overwrite=args.overwrite)
        print(f"wrote model folder {folder}")
    if args.torch_safetensors:
        export.save_torch_state_dict(out / "model.safetensors", loaded.params, loaded.config, loaded.passthrough)
        print(f"wrote PyTorch-compatible state dict {out / 'model.safetensors'}")
    return 0
