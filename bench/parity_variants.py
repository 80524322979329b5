"""The official models `official_parity.py` builds: sizes, seeds, class counts and heads.

Plain data without jax or torch imports, read by both sides: the torch worker (which has
no jax) builds each variant with the official code, the JAX side converts its checkpoint
and checks the config it gets against `expected_config()`.

Sizes other than the official 768 widths are what makes these useful: state dicts do not
store head counts, so every unofficial width must come with its head count
(`overrides()`, what a user gives with `--set`), and a head width other than 64 (16 to 64
here) would expose a converter that guesses. The official heads are 12 (both extractors)
and 8 (sync transformer); the official extractor code hard-codes its sizes, which the
worker injects the way the reference set's README describes.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Optional

# What the official configs build: the yaml file (configs/<name>.yaml) of the checkout.
SYNC = "sync"  # stage II: model.sync_model.Synchformer with the offset head
SYNCHRONIZABILITY = "ft_synchability"  # stage III: 13 segments, 2-way sync_head
SEGMENT_AVCLIP = "segment_avclip"  # stage I: AVCLIP over both extractors

OFFICIAL_WIDTH = 768
OFFICIAL_EXTRACTOR_HEADS = 12
OFFICIAL_SYNC_HEADS = 8


@dataclasses.dataclass(frozen=True)
class AudioSize:
    """HF `ASTConfig` fields the worker replaces."""

    hidden: int
    layers: int
    heads: int
    mlp: int


@dataclasses.dataclass(frozen=True)
class VideoSize:
    """Motionformer `VIT.EMBED_DIM / DEPTH / NUM_HEADS`."""

    dim: int
    depth: int
    heads: int


@dataclasses.dataclass(frozen=True)
class SyncSize:
    """`model.params.transformer.params` of the yaml."""

    n_embd: int
    n_layer: int
    n_head: int


@dataclasses.dataclass(frozen=True)
class Variant:
    name: str
    covers: str  # one line for the table
    official_config: str  # SYNC, SYNCHRONIZABILITY or SEGMENT_AVCLIP
    audio: Optional[AudioSize] = None  # None: the official size
    video: Optional[VideoSize] = None
    sync: Optional[SyncSize] = None  # ignored for SEGMENT_AVCLIP (no sync transformer)
    num_off_cls: Optional[int] = None  # None: the yaml's 21
    max_off_sec: Optional[float] = None  # None: the yaml's 2.0
    seed: int = 1337  # the official set_seed before construction
    rerandomize_seed: int = 20240101  # torch_official_worker.rerandomize_
    input_seed: int = 0
    batch: int = 1
    full: bool = False  # full size: minutes and GBs per side, only with --full

    # ---- sizes as built -------------------------------------------------------------
    def audio_size(self) -> AudioSize:
        return self.audio or AudioSize(OFFICIAL_WIDTH, 12, OFFICIAL_EXTRACTOR_HEADS, 3072)

    def video_size(self) -> VideoSize:
        return self.video or VideoSize(OFFICIAL_WIDTH, 12, OFFICIAL_EXTRACTOR_HEADS)

    def sync_size(self) -> SyncSize:
        return self.sync or SyncSize(OFFICIAL_WIDTH, 3, OFFICIAL_SYNC_HEADS)

    @property
    def is_stage_one(self) -> bool:
        return self.official_config == SEGMENT_AVCLIP

    @property
    def n_segments(self) -> int:
        return 13 if self.official_config == SYNCHRONIZABILITY else 14

    # ---- what the JAX side is given and expects ---------------------------------------
    def overrides(self) -> dict[str, int]:
        """The `--set` head counts a user must give: those of every unofficial width.

        Official widths get the official counts from the converter; giving them anyway
        would hide a converter that lost them.
        """
        out = {}
        if self.audio_size().hidden != OFFICIAL_WIDTH:
            out["audio.num_heads"] = self.audio_size().heads
        if self.video_size().dim != OFFICIAL_WIDTH:
            out["video.num_heads"] = self.video_size().heads
        if not self.is_stage_one and self.sync_size().n_embd != OFFICIAL_WIDTH:
            out["sync.n_head"] = self.sync_size().n_head
        return out

    def expected_heads(self) -> dict[str, int]:
        """Head counts the official modules must report after construction (worker's
        `official_heads`): the aggregators take their extractor's count."""
        heads = {"ast": self.audio_size().heads, "ast_agg": self.audio_size().heads,
                 "mf": self.video_size().heads, "mf_agg": self.video_size().heads}
        if not self.is_stage_one:
            heads["sync"] = self.sync_size().n_head
        return heads

    def expected_config(self) -> Any:
        """The `ModelConfig` a correct conversion of this variant's checkpoint yields."""
        from synchformer_jax.models.config import (ASTConfig, ModelConfig, MotionformerConfig,
                                                   SyncTransformerConfig, HEAD_SYNCHRONIZABILITY)

        a, v, s = self.audio_size(), self.video_size(), self.sync_size()
        audio = ASTConfig(hidden_size=a.hidden, num_layers=a.layers, num_heads=a.heads, mlp_dim=a.mlp)
        video = MotionformerConfig(embed_dim=v.dim, depth=v.depth, num_heads=v.heads)
        if self.is_stage_one:
            return ModelConfig.avclip(audio=audio, video=video)
        sync = SyncTransformerConfig(n_embd=s.n_embd, n_layer=s.n_layer, n_head=s.n_head,
                                     num_offset_classes=self.num_off_cls or 21,
                                     max_offset_sec=self.max_off_sec if self.max_off_sec is not None else 2.0)
        if self.official_config == SYNCHRONIZABILITY:
            sync = dataclasses.replace(sync, head=HEAD_SYNCHRONIZABILITY)
        return ModelConfig(audio=audio, video=video, sync=sync, n_segments=self.n_segments)

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# The audit's variants (v1-v7), at its sizes and seeds. Widths: Segment-AVCLIP needs equal
# extractor widths (one n_embd); the sync model projects each to the transformer's width.
VARIANTS: dict[str, Variant] = {v.name: v for v in (
    Variant("v1", "other widths/depths, head dims 16-32, B=2", SYNC,
            AudioSize(128, 3, 8, 512), VideoSize(64, 1, 2), SyncSize(96, 1, 6),
            seed=7, rerandomize_seed=11, input_seed=1, batch=2),
    Variant("v2", "41 offset classes", SYNC,
            AudioSize(96, 2, 4, 384), VideoSize(96, 2, 4), SyncSize(64, 2, 4),
            num_off_cls=41, max_off_sec=2.0, seed=42, rerandomize_seed=5, input_seed=2),
    Variant("v3", "3 offset classes, +-1 s (range from args)", SYNC,
            AudioSize(64, 1, 2, 256), VideoSize(64, 1, 2), SyncSize(64, 1, 2),
            num_off_cls=3, max_off_sec=1.0, seed=3, rerandomize_seed=6, input_seed=3),
    Variant("v4", "synchronizability: 13 segments, 2-way head", SYNCHRONIZABILITY,
            AudioSize(96, 1, 3, 192), VideoSize(96, 1, 6), SyncSize(48, 2, 3),
            seed=99, rerandomize_seed=7, input_seed=4),
    Variant("v5", "stage-I Segment-AVCLIP (epoch_best.pt), B=2", SEGMENT_AVCLIP,
            AudioSize(96, 1, 4, 384), VideoSize(96, 1, 4),
            seed=1, rerandomize_seed=8, input_seed=5, batch=2),
    Variant("v6", "full official sync.yaml, no overrides", SYNC,
            seed=2024, rerandomize_seed=77, input_seed=6, full=True),
    Variant("v7", "full official segment_avclip.yaml, no overrides", SEGMENT_AVCLIP,
            seed=5, rerandomize_seed=9, input_seed=7, full=True),
)}
