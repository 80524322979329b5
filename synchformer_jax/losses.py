"""Training losses, computed in float32 whatever the compute dtype."""
from __future__ import annotations

import jax
import jax.numpy as jnp


def offset_cross_entropy(logits: jax.Array, targets: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    """Mean cross-entropy of `logits [B, K]` against integer `targets [B]` (stages II/III)."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(logp, targets[:, None].astype(jnp.int32), axis=-1)[:, 0]
    if mask is None:
        return jnp.mean(nll)
    mask = mask.astype(jnp.float32)
    return jnp.sum(nll * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def segment_infonce(video_emb: jax.Array, audio_emb: jax.Array, temperature: jax.Array,
                    num_groups: int = 1) -> jax.Array:
    """Symmetric InfoNCE over the segments of a batch (stage I, Segment AVCLIP).

    `video_emb`, `audio_emb`: L2-normalised `[B, S, D]`. Every segment's positive is the
    other modality's segment at the same (clip, segment) position; negatives are all
    other segments in its pool — other segments of the same clip included, as in the
    paper. `num_groups` splits the batch into that many contiguous pools of B/num_groups
    clips: the official recipe contrasts within each GPU's local batch (num_groups = the
    number of data-parallel devices); num_groups=1 gathers negatives from the whole
    global batch. Similarities are divided by the temperature (it is tau, not 1/tau).
    """
    b, s, d = video_emb.shape
    if b % num_groups:
        raise ValueError(f"batch of {b} clips does not split into {num_groups} negative pools")
    v = video_emb.astype(jnp.float32).reshape(num_groups, (b // num_groups) * s, d)
    a = audio_emb.astype(jnp.float32).reshape(num_groups, (b // num_groups) * s, d)
    sim = jnp.einsum("gnd,gmd->gnm", v, a, precision=jax.lax.Precision.HIGHEST) / temperature
    labels = jnp.arange(sim.shape[-1])
    v2a = -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(sim, axis=-1), labels[None, :, None], axis=-1))
    a2v = -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(sim, axis=-2), labels[None, None, :], axis=-2))
    return 0.5 * (v2a + a2v)
