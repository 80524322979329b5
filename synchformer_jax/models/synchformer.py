"""Top-level models: `Synchformer` (stages II/III) and `SegmentAVCLIP` (stage I).

Input layouts (the project's one contract, kept from the official stage-II model):
  video `[B, S, T, C, H, W]` float in [-1, 1] (16 frames of 224x224 per segment),
  audio `[B, S, 1, F, Ta]` (or `[B, S, F, Ta]`) normalised log-mel, F=128, Ta=66.

Besides `__call__`, the modules expose separate entry points, and this file has
functional wrappers that can be jitted, differentiated and chunked over segments:
`extract_video_features`, `extract_audio_features`, `compare`.
"""
from __future__ import annotations

import functools
from typing import Any, Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from synchformer_jax.models import layers
from synchformer_jax.models.audio_ast import AST
from synchformer_jax.models.config import KIND_AVCLIP, KIND_SYNC, ModelConfig
from synchformer_jax.models.motionformer import MotionFormer
from synchformer_jax.models.sync_transformer import GlobalTransformer

Params = Any


def compute_dtype(cfg: ModelConfig) -> Any:
    return jnp.dtype(cfg.dtype)


def _audio_segments(audio: jax.Array) -> jax.Array:
    """`[B, S, 1, F, T]` or `[B, S, F, T]` -> `[B*S, F, T]`."""
    if audio.ndim == 5:
        if audio.shape[2] != 1:
            raise ValueError(f"audio must be [B, S, 1, F, T]; got shape {audio.shape}")
        audio = audio[:, :, 0]
    if audio.ndim != 4:
        raise ValueError(f"audio must be [B, S, 1, F, T] or [B, S, F, T]; got shape {audio.shape}")
    return audio.reshape(-1, *audio.shape[2:])


def _video_segments(video: jax.Array) -> jax.Array:
    """`[B, S, T, C, H, W]` -> `[B*S, T, C, H, W]`."""
    if video.ndim != 6:
        raise ValueError(f"video must be [B, S, T, C, H, W]; got shape {video.shape}")
    return video.reshape(-1, *video.shape[2:])


class Synchformer(nn.Module):
    """Offset (or synchronizability) model: extractors, projections, sync transformer."""

    config: ModelConfig

    def setup(self) -> None:
        c = self.config
        if c.kind != KIND_SYNC:
            raise ValueError(f"Synchformer needs a config of kind {KIND_SYNC!r}, got {c.kind!r}")
        dtype = compute_dtype(c)
        self.vfeat_extractor = MotionFormer(c.video, dtype, c.remat, scan=c.scan_blocks, remat_policy=c.remat_policy,
                                            time_pack=c.time_attention_pack)
        self.afeat_extractor = AST(c.audio, dtype, c.remat, scan=c.scan_blocks, remat_policy=c.remat_policy)
        # torch.nn.Linear created outside the transformer: default Kaiming-uniform init.
        torch_linear_init = nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform")
        self.vproj = layers.dense(c.sync.n_embd, dtype, kernel_init=torch_linear_init)
        self.aproj = layers.dense(c.sync.n_embd, dtype, kernel_init=torch_linear_init)
        self.transformer = GlobalTransformer(c.sync, c.pos_emb_len, dtype, c.remat, c.remat_policy)

    # --- per-segment entry points (inputs already flattened over B*S) -----------------
    def video_segment_features(self, segments: jax.Array, train: bool = False) -> jax.Array:
        """`[N, T, C, H, W]` -> `[N, t, D]` (t = T / 2)."""
        return self.vfeat_extractor(segments, train)

    def audio_segment_features(self, spec: jax.Array, train: bool = False) -> jax.Array:
        """`[N, F, T]` -> `[N, t, D]` (t = 6)."""
        return self.afeat_extractor(spec, train)

    # --- public entry points ------------------------------------------------------------
    def extract_video_features(self, video: jax.Array, train: bool = False) -> jax.Array:
        """`[B, S, T, C, H, W]` -> `[B, S, 8, D]`."""
        b, s = video.shape[:2]
        feats = self.video_segment_features(_video_segments(video), train)
        return feats.reshape(b, s, *feats.shape[1:])

    def extract_audio_features(self, audio: jax.Array, train: bool = False) -> jax.Array:
        """`[B, S, 1, F, T]` -> `[B, S, 6, D]`."""
        b, s = audio.shape[:2]
        feats = self.audio_segment_features(_audio_segments(audio), train)
        return feats.reshape(b, s, *feats.shape[1:])

    def compare(self, vfeat: jax.Array, afeat: jax.Array, train: bool = False) -> jax.Array:
        """Features `[B, S, 8, Dv]`, `[B, S, 6, Da]` -> logits `[B, K]` (float32)."""
        v = self.vproj(vfeat)
        a = self.aproj(afeat)
        self.sow("intermediates", "vproj_out", v)
        self.sow("intermediates", "aproj_out", a)
        # Segment-major flattening: token s*8 + t (video), s*6 + t (audio).
        v = v.reshape(v.shape[0], -1, v.shape[-1])
        a = a.reshape(a.shape[0], -1, a.shape[-1])
        return self.transformer(v, a, train)

    def __call__(self, video: jax.Array, audio: jax.Array, train: bool = False,
                 train_extractors: Optional[bool] = None) -> jax.Array:
        """Logits `[B, K]`. Stage II trains the transformer with the extractors frozen in
        eval mode: `train=True, train_extractors=False` (default: same as `train`)."""
        train_extractors = train if train_extractors is None else train_extractors
        vfeat = self.extract_video_features(video, train_extractors)
        afeat = self.extract_audio_features(audio, train_extractors)
        self.sow("intermediates", "vfeat", vfeat)
        self.sow("intermediates", "afeat", afeat)
        return self.compare(vfeat, afeat, train)


def l2_normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
    """`F.normalize`: x / max(||x||, eps), in float32."""
    x = x.astype(jnp.float32)
    norm = jnp.sqrt(jnp.sum(x * x, axis=-1, keepdims=True))
    return x / jnp.maximum(norm, eps)


class SegmentAVCLIP(nn.Module):
    """Stage-I model: per-segment embeddings of both streams and the temperature.

    Returns `(video_emb [B, S, D], audio_emb [B, S, D], temperature [])`, embeddings
    L2-normalised in float32. The temperature is stored as tau itself (similarities are
    divided by it) and clamped to [min, max] with a straight-through gradient, which is
    what the official in-place clamp before every forward amounts to.
    """

    config: ModelConfig

    def setup(self) -> None:
        c = self.config
        if c.kind != KIND_AVCLIP:
            raise ValueError(f"SegmentAVCLIP needs a config of kind {KIND_AVCLIP!r}, got {c.kind!r}")
        dtype = compute_dtype(c)
        self.v_encoder = MotionFormer(c.video, dtype, c.remat, temporal_pool=True, scan=c.scan_blocks,
                                      remat_policy=c.remat_policy, time_pack=c.time_attention_pack)
        self.a_encoder = AST(c.audio, dtype, c.remat, temporal_pool=True, scan=c.scan_blocks,
                             remat_policy=c.remat_policy)
        self.logit_scale = self.param("logit_scale", nn.initializers.constant(c.init_temperature), ())

    def temperature(self) -> jax.Array:
        c = self.config
        clamped = jnp.clip(jax.lax.stop_gradient(self.logit_scale), c.temperature_min, c.temperature_max)
        # Value: the clamped temperature, exactly. Gradient: as if unclamped.
        return clamped + (self.logit_scale - jax.lax.stop_gradient(self.logit_scale))

    def video_segment_features(self, segments: jax.Array, train: bool = False) -> jax.Array:
        return self.v_encoder(segments, train)

    def audio_segment_features(self, spec: jax.Array, train: bool = False) -> jax.Array:
        return self.a_encoder(spec, train)

    def __call__(self, video: jax.Array, audio: jax.Array, train: bool = False):
        b, s = video.shape[:2]
        v = self.v_encoder(_video_segments(video), train).reshape(b, s, -1)
        a = self.a_encoder(_audio_segments(audio), train).reshape(b, s, -1)
        return l2_normalize(v), l2_normalize(a), self.temperature()


def build_model(config: ModelConfig) -> nn.Module:
    if config.kind == KIND_SYNC:
        return Synchformer(config)
    if config.kind == KIND_AVCLIP:
        return SegmentAVCLIP(config)
    raise ValueError(f"unknown model kind {config.kind!r}")


def dummy_inputs(config: ModelConfig, batch: int = 1, dtype: Any = jnp.float32) -> tuple[jax.Array, jax.Array]:
    """Zero inputs of the model's shapes (for `init` and `eval_shape`)."""
    v, a = config.video, config.audio
    video = jnp.zeros((batch, config.n_segments, v.num_frames, 3, v.img_size, v.img_size), dtype)
    audio = jnp.zeros((batch, config.n_segments, 1, a.num_mel_bins, a.max_spec_t), dtype)
    return video, audio


def _init(config: ModelConfig, rng: jax.Array) -> Params:
    video, audio = dummy_inputs(config)
    return build_model(config).init({"params": rng, "dropout": rng}, video, audio)["params"]


@functools.lru_cache(maxsize=8)
def _jitted_init(config: ModelConfig) -> Callable[[jax.Array], Params]:
    return jax.jit(functools.partial(_init, config))


def init_params(config: ModelConfig, rng: jax.Array) -> Params:
    """Randomly initialised float32 parameters."""
    return _jitted_init(config)(rng)


@functools.lru_cache(maxsize=32)
def abstract_params(config: ModelConfig) -> Params:
    """`ShapeDtypeStruct` tree of the parameters, without allocating them."""
    return jax.eval_shape(functools.partial(_init, config), jax.random.key(0))


# --- functional entry points: jit-able, differentiable, chunked over segments ----------
def _chunked(fn: Callable[[jax.Array], jax.Array], segments: jax.Array, chunk_size: Optional[int]) -> jax.Array:
    """Apply `fn` to `[N, ...]` in chunks of `chunk_size` (bounded activation memory)."""
    n = segments.shape[0]
    if not chunk_size or chunk_size >= n:
        return fn(segments)
    pad = (-n) % chunk_size
    if pad:
        segments = jnp.concatenate([segments, jnp.zeros((pad, *segments.shape[1:]), segments.dtype)])
    chunks = segments.reshape(-1, chunk_size, *segments.shape[1:])
    out = jax.lax.map(fn, chunks)
    return out.reshape(-1, *out.shape[2:])[:n]


def extract_video_features(model: nn.Module, params: Params, video: jax.Array, *,
                           chunk_size: Optional[int] = None) -> jax.Array:
    """`[B, S, T, C, H, W]` -> `[B, S, 8, D]` (`[B, S, D]` for SegmentAVCLIP).

    `chunk_size` bounds how many segments go through the extractor at once.
    """
    b, s = video.shape[:2]
    fn = lambda x: model.apply({"params": params}, x, method="video_segment_features")  # noqa: E731
    out = _chunked(fn, _video_segments(video), chunk_size)
    return out.reshape(b, s, *out.shape[1:])


def extract_audio_features(model: nn.Module, params: Params, audio: jax.Array, *,
                           chunk_size: Optional[int] = None) -> jax.Array:
    """`[B, S, 1, F, T]` -> `[B, S, 6, D]` (`[B, S, D]` for SegmentAVCLIP)."""
    b, s = audio.shape[:2]
    fn = lambda x: model.apply({"params": params}, x, method="audio_segment_features")  # noqa: E731
    out = _chunked(fn, _audio_segments(audio), chunk_size)
    return out.reshape(b, s, *out.shape[1:])


def compare(model: nn.Module, params: Params, vfeat: jax.Array, afeat: jax.Array) -> jax.Array:
    """Cached features -> logits `[B, K]`; only the projections and transformer run."""
    return model.apply({"params": params}, vfeat, afeat, method="compare")
