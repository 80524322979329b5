"""Architecture description of the Synchformer family, with the official sizes as defaults.

Plain frozen dataclasses (not ConfigDicts): modules receive typed fields, the experiment
configs in `configs/` hold only what differs, and a converted checkpoint stores this as
JSON next to its parameters (`to_dict` / `from_dict`).
"""
from __future__ import annotations

import dataclasses
import numbers
from typing import Any, Optional

# The three heads a sync transformer can carry.
HEAD_OFFSET = "offset"  # stage II: `off_head`, one logit per offset class
HEAD_SYNCHRONIZABILITY = "synchronizability"  # stage III: `sync_head`, 2 logits

# The two top-level models the official code trains.
KIND_SYNC = "sync"  # model.sync_model.Synchformer (stages II and III)
KIND_AVCLIP = "avclip"  # Segment AVCLIP (stage I)


@dataclasses.dataclass(frozen=True)
class ASTConfig:
    """AST audio extractor (HF `ASTConfig` defaults) plus its frequency aggregator."""

    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    mlp_dim: int = 3072
    patch_size: int = 16
    frequency_stride: int = 10
    time_stride: int = 10
    num_mel_bins: int = 128
    max_spec_t: int = 66  # 65 STFT frames per 0.64 s segment, padded to 66
    layer_norm_eps: float = 1e-12
    aggregator_layer_norm_eps: float = 1e-6

    @property
    def freq_patches(self) -> int:
        return (self.num_mel_bins - self.patch_size) // self.frequency_stride + 1

    @property
    def time_patches(self) -> int:
        return (self.max_spec_t - self.patch_size) // self.time_stride + 1


@dataclasses.dataclass(frozen=True)
class MotionformerConfig:
    """Motionformer ViT-B with divided space-time attention plus its spatial aggregator."""

    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: int = 4
    patch_size: int = 16
    patch_size_temp: int = 2
    img_size: int = 224
    num_frames: int = 16  # frames per segment
    drop_path_rate: float = 0.2  # linearly spaced over blocks; active only when training
    layer_norm_eps: float = 1e-6

    @property
    def mlp_dim(self) -> int:
        return self.embed_dim * self.mlp_ratio

    @property
    def temporal_patches(self) -> int:
        return self.num_frames // self.patch_size_temp

    @property
    def spatial_patches(self) -> int:
        return (self.img_size // self.patch_size) ** 2


@dataclasses.dataclass(frozen=True)
class SyncTransformerConfig:
    """minGPT-style GlobalTransformer over `[OFF, v..., MOD, a...]` with one head."""

    n_embd: int = 768
    n_layer: int = 3
    n_head: int = 8
    mlp_ratio: int = 4
    embd_pdrop: float = 0.1
    attn_pdrop: float = 0.1
    resid_pdrop: float = 0.1
    layer_norm_eps: float = 1e-5
    head: str = HEAD_OFFSET
    num_offset_classes: int = 21  # 3, 21 or 41 in the paper
    max_offset_sec: float = 2.0
    # Length of the learned position table; None: 2 + S * (8 + 6) for n_segments.
    pos_emb_len: Optional[int] = None


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Everything needed to build a model; defaults reproduce `configs/sync.yaml`."""

    kind: str = KIND_SYNC
    audio: ASTConfig = ASTConfig()
    video: MotionformerConfig = MotionformerConfig()
    sync: SyncTransformerConfig = SyncTransformerConfig()
    n_segments: int = 14
    # Compute dtype ("float32" for parity, "bfloat16" on accelerators). Parameters stay
    # float32; LayerNorm, softmax and logits run in float32 regardless.
    dtype: str = "float32"
    remat: bool = False  # rematerialise each transformer block in the backward pass
    # What a rematerialised block keeps from its forward (layers.REMAT_POLICIES): "nothing"
    # (recompute the whole block: least memory) or "dots" (keep the outputs of the weight
    # matmuls, recompute norms, activations and attention: less recompute, more memory).
    remat_policy: str = "nothing"
    # Run each extractor's blocks as one lax.scan (same parameters, one block compiled;
    # with remat, activation memory bounded to one block's recompute on every backend).
    scan_blocks: bool = False
    # Motionformer time attention with this many spatial locations per fused-attention
    # sequence (motionformer.packed_time_attention: the same values, fuller kernel tiles
    # on a GPU, more attention FLOPs); 1: one 8-frame sequence per location, as officially.
    # Must divide the patches of a frame (196 at 224 px: 1, 2, 4, 7, 14, 28, 49, 98, 196).
    time_attention_pack: int = 1
    # Initial (and clamped) stage-I temperature.
    init_temperature: float = 0.07
    temperature_min: float = 0.001
    temperature_max: float = 0.5

    def __post_init__(self) -> None:
        pack, patches = self.time_attention_pack, self.video.spatial_patches
        if not (isinstance(pack, numbers.Integral) and not isinstance(pack, bool) and pack >= 1
                and patches % pack == 0):
            raise ValueError(f"time_attention_pack={pack!r} must be a whole number >= 1 that divides the "
                             f"{patches} patches of a frame (video.img_size {self.video.img_size}, "
                             f"patch {self.video.patch_size})")

    # ---- derived sizes -------------------------------------------------------------
    @property
    def video_tokens_per_segment(self) -> int:
        return self.video.temporal_patches

    @property
    def audio_tokens_per_segment(self) -> int:
        return self.audio.time_patches

    @property
    def pos_emb_len(self) -> int:
        if self.sync.pos_emb_len is not None:
            return self.sync.pos_emb_len
        return 2 + self.n_segments * (self.video_tokens_per_segment + self.audio_tokens_per_segment)

    @property
    def num_outputs(self) -> int:
        return 2 if self.sync.head == HEAD_SYNCHRONIZABILITY else self.sync.num_offset_classes

    # ---- constructors ----------------------------------------------------------------
    @classmethod
    def synchronizability(cls, **kw: Any) -> "ModelConfig":
        """`configs/ft_synchability.yaml`: 13 segments, 2-way head, table of 184."""
        sync = SyncTransformerConfig(head=HEAD_SYNCHRONIZABILITY)
        return cls(sync=sync, n_segments=13, **kw)

    @classmethod
    def avclip(cls, **kw: Any) -> "ModelConfig":
        """Stage-I Segment AVCLIP: both extractors, time-averaged segments, temperature."""
        return cls(kind=KIND_AVCLIP, **kw)

    def replace(self, **changes: Any) -> "ModelConfig":
        """`dataclasses.replace` that also accepts dotted keys (`"audio.num_layers"`)."""
        nested: dict[str, dict[str, Any]] = {}
        flat: dict[str, Any] = {}
        for key, value in changes.items():
            if "." in key:
                group, field = key.split(".", 1)
                nested.setdefault(group, {})[field] = value
            else:
                flat[key] = value
        top = {f.name for f in dataclasses.fields(self)}
        for key in flat:
            if key not in top:
                raise ValueError(f"unknown model config field {key!r}")
        for group, fields in nested.items():
            current = getattr(self, group, None)
            if not dataclasses.is_dataclass(current):
                raise ValueError(f"unknown model config group {group!r} (groups: audio, video, sync)")
            known = {f.name for f in dataclasses.fields(current)}
            for field in fields:
                if field not in known:
                    raise ValueError(f"unknown model config field {group}.{field!r}; {group} has: "
                                     + ", ".join(sorted(known)))
            flat[group] = dataclasses.replace(flat.get(group, current), **fields)
        return dataclasses.replace(self, **flat)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        d = dict(d)
        groups = {"audio": ASTConfig, "video": MotionformerConfig, "sync": SyncTransformerConfig}
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown model config fields: {sorted(unknown)}")
        for name, group_cls in groups.items():
            if name in d and isinstance(d[name], dict):
                group_known = {f.name for f in dataclasses.fields(group_cls)}
                bad = set(d[name]) - group_known
                if bad:
                    raise ValueError(f"unknown model config fields in {name!r}: {sorted(bad)}")
                d[name] = group_cls(**d[name])
        return cls(**d)


def tiny_config(**kw: Any) -> ModelConfig:
    """A small model with the official structure (as the reference parity set uses)."""
    base = ModelConfig(
        audio=ASTConfig(hidden_size=96, num_layers=2, num_heads=4, mlp_dim=384),
        video=MotionformerConfig(embed_dim=96, depth=2, num_heads=4),
        sync=SyncTransformerConfig(n_embd=64, n_layer=2, n_head=4),
    )
    return base.replace(**kw) if kw else base
