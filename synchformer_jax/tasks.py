"""The only place the three training stages differ: model, inputs, loss, predictions.

* Stage I (Segment AVCLIP): both extractors train (drop path on); symmetric InfoNCE over
  the segments of a pool of clips, learned temperature.
* Stage II (sync): extractors frozen in eval mode, projections + sync transformer train
  with cross-entropy over the offset classes.
* Stage III (synchronizability): as stage II with the 2-way head and `sync_target`.
  Evaluated alone, or next to a stage-II offset model (`CombinedSyncOffsetTask`: paper
  Fig. 4 right, official `scripts/test_syncability.py` with `config_off`).

A batch is the host batch of `input.pipeline` as global arrays: `video` uint8 span,
`audio` waveform span, `mask`, and `offset_target` / `sync_target` for stages II/III.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from synchformer_jax import losses
from synchformer_jax.experiment import STAGE_AVCLIP, STAGE_SYNC, STAGE_SYNCHRONIZABILITY
from synchformer_jax.input import pipeline
from synchformer_jax.models import synchformer as sf
from synchformer_jax.models.config import HEAD_OFFSET, KIND_SYNC, ModelConfig

Params = Any
Batch = Mapping[str, jax.Array]


@dataclasses.dataclass(frozen=True)
class Task:
    stage: str
    model_config: ModelConfig
    # Stage I negatives: the batch splits into this many pools (1 = the global batch).
    negative_pools: int = 1

    @property
    def model(self) -> nn.Module:
        return sf.build_model(self.model_config)

    @property
    def example_spec(self) -> pipeline.ExampleSpec:
        # The crop is the model's input size (224 officially; smaller for CPU demos).
        return pipeline.ExampleSpec(stage=self.stage, n_segments=self.model_config.n_segments,
                                    crop_size=self.model_config.video.img_size,
                                    grid_size=self.model_config.sync.num_offset_classes,
                                    max_off_sec=self.model_config.sync.max_offset_sec)

    def model_inputs(self, batch: Batch, train: bool) -> tuple[jax.Array, jax.Array]:
        """uint8 span + waveform -> model video/audio, segmented and normalised on device.

        The official stage-I evaluation normalises in float32, every other path in
        float16 (spec §4.2).
        """
        half = not (self.stage == STAGE_AVCLIP and not train)
        return pipeline.assemble_on_device(batch, self.example_spec.layout, half=half)

    def loss_fn(self, params: Params, batch: Batch, rng: jax.Array, train: bool = True
                ) -> tuple[jax.Array, dict[str, jax.Array]]:
        """Scalar float32 loss and scalar metrics (averaged over the unmasked examples).

        Stage II batches from a feature cache (`vfeat`, `afeat`: the frozen extractors'
        outputs) skip the extractors: only the projections and the transformer run.
        """
        rngs = {"dropout": rng}
        if "vfeat" in batch:
            if self.stage == STAGE_AVCLIP:
                raise ValueError("cached features are for stages with frozen extractors, not stage I")
            logits = self.model.apply({"params": params}, batch["vfeat"], batch["afeat"], train, rngs=rngs,
                                      method="compare")
            return self._classification(logits, batch)
        video, audio = self.model_inputs(batch, train)
        if self.stage == STAGE_AVCLIP:
            v, a, tau = self.model.apply({"params": params}, video, audio, train=train, rngs=rngs)
            loss = losses.segment_infonce(v, a, tau, num_groups=self.negative_pools)
            return loss, {"loss": loss, "temperature": tau}
        logits = self.model.apply({"params": params}, video, audio, train=train, train_extractors=False, rngs=rngs)
        return self._classification(logits, batch)

    def _classification(self, logits: jax.Array, batch: Batch) -> tuple[jax.Array, dict[str, jax.Array]]:
        target = batch[self.target_key]
        mask = batch.get("mask")
        loss = losses.offset_cross_entropy(logits, target, mask)
        correct = (jnp.argmax(logits, -1) == target).astype(jnp.float32)
        weight = jnp.ones_like(correct) if mask is None else mask.astype(jnp.float32)
        accuracy = jnp.sum(correct * weight) / jnp.maximum(jnp.sum(weight), 1.0)
        return loss, {"loss": loss, "accuracy_1": accuracy}

    @property
    def target_key(self) -> str:
        return "sync_target" if self.stage == STAGE_SYNCHRONIZABILITY else "offset_target"

    def constrain(self, params: Params) -> Params:
        """Applied after every update: the official stage I clamps the temperature parameter
        in place before each forward, so the stored value never leaves [min, max]."""
        if self.stage != STAGE_AVCLIP:
            return params
        c = self.model_config
        return {**params, "logit_scale": jnp.clip(params["logit_scale"], c.temperature_min, c.temperature_max)}

    def predict_fn(self, params: Params, batch: Batch) -> dict[str, jax.Array]:
        """Evaluation outputs handed to the evaluators (never the model itself)."""
        video, audio = self.model_inputs(batch, train=False)
        if self.stage == STAGE_AVCLIP:
            v, a, _ = self.model.apply({"params": params}, video, audio)
            return {"video_emb": v, "audio_emb": a}
        return {"logits": self.model.apply({"params": params}, video, audio)}


@dataclasses.dataclass(frozen=True)
class CombinedSyncOffsetTask:
    """A synchronizability model and an offset model scored on the same examples.

    As the official `scripts/test_syncability.py` with `config_off`: the synchronizability
    examples (half synchronizable at a grid offset, half at +-crop length) are cut to the
    offset model's segments (14: a 4.8-s crop, so the unsynchronizable offset is +-4.8 s);
    the offset model sees all of them, the synchronizability model the first
    `n_segments` (13) of them, as it was trained.
    """
    sync: Task
    offset: Task

    def __post_init__(self):
        if self.sync.stage != STAGE_SYNCHRONIZABILITY:
            raise ValueError(f"an offset model is scored next to a synchronizability model, "
                             f"not a {self.sync.stage} one")
        problem = offset_model_misfit(self.sync.model_config, self.offset.model_config)
        if problem:
            raise ValueError(problem)

    @property
    def example_spec(self) -> pipeline.ExampleSpec:
        return dataclasses.replace(self.sync.example_spec, n_segments=self.offset.model_config.n_segments)

    def predict_fn(self, params: Params, offset_params: Params, batch: Batch) -> dict[str, jax.Array]:
        """`logits` `[B, 2]` of the synchronizability model, `offset_logits` `[B, C]`."""
        video, audio = pipeline.assemble_on_device(batch, self.example_spec.layout, half=True)
        n = self.sync.model_config.n_segments
        # Sliced after assembling (not a shorter layout) so that host log-mel batches,
        # which arrive already segmented, are cut the same way.
        sync_logits = self.sync.model.apply({"params": params}, video[:, :n], audio[:, :n])
        offset_logits = self.offset.model.apply({"params": offset_params}, video, audio)
        return {"logits": sync_logits, "offset_logits": offset_logits}


def offset_model_misfit(sync: ModelConfig, offset: ModelConfig) -> str:
    """Why `offset` cannot be scored next to the synchronizability model `sync` ("" if it can)."""
    if offset.kind != KIND_SYNC or offset.sync.head != HEAD_OFFSET:
        what = "a stage-I model" if offset.kind != KIND_SYNC else f"a {offset.sync.head} model"
        return f"it is {what}, not an offset (stage II) model"
    if offset.n_segments < sync.n_segments:
        return (f"its {offset.n_segments} segments are fewer than the {sync.n_segments} the synchronizability "
                "model takes from the same examples")
    # The examples' offset targets are classes of the synchronizability config's grid
    # (pipeline.ExampleSpec grid_size / max_off_sec); the offset head must mean the same classes.
    if (offset.sync.num_offset_classes != sync.sync.num_offset_classes
            or abs(offset.sync.max_offset_sec - sync.sync.max_offset_sec) > 1e-6):
        return (f"its {offset.sync.num_offset_classes} offset classes over +-{offset.sync.max_offset_sec:g} s are "
                f"not the examples' grid ({sync.sync.num_offset_classes} classes over "
                f"+-{sync.sync.max_offset_sec:g} s)")
    if (offset.video.img_size, offset.video.num_frames) != (sync.video.img_size, sync.video.num_frames):
        return (f"its video input ({offset.video.num_frames} frames of {offset.video.img_size} px per segment) "
                f"differs from the synchronizability model's ({sync.video.num_frames} of {sync.video.img_size} px)")
    return ""


def get_task(stage: str, model_config: ModelConfig, negative_pools: int = 1) -> Task:
    if stage not in (STAGE_AVCLIP, STAGE_SYNC, STAGE_SYNCHRONIZABILITY):
        raise ValueError(f"unknown stage {stage!r}")
    return Task(stage, model_config, negative_pools if stage == STAGE_AVCLIP else 1)

