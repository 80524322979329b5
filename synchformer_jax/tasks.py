"""The only place the three training stages differ: model, inputs, loss, predictions.

* Stage I (Segment AVCLIP): both extractors train (drop path on); symmetric InfoNCE over
  the segments of a pool of clips, learned temperature.
* Stage II (sync): extractors frozen in eval mode, projections + sync transformer train
  with cross-entropy over the offset classes.
* Stage III (synchronizability): as stage II with the 2-way head and `sync_target`.

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
from synchformer_jax.models.config import ModelConfig

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


def get_task(stage: str, model_config: ModelConfig, negative_pools: int = 1) -> Task:
    if stage not in (STAGE_AVCLIP, STAGE_SYNC, STAGE_SYNCHRONIZABILITY):
        raise ValueError(f"unknown stage {stage!r}")
    return Task(stage, model_config, negative_pools if stage == STAGE_AVCLIP else 1)

