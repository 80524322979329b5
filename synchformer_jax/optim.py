"""Optimizers and schedules from the config, as the official recipes define them.

Stage I: AdamW, linear warm-up (`lr * (step + 1) / warmup`) then cosine to zero over
the remaining steps; warm-up length divided by the number of devices (official).
Stages II/III: Adam (eps 1e-7), `LinearLR(0.01 -> 1)` over the warm-up, then constant;
the learning rate is per device and scales with their number (official 2e-6 x world).
All stages clip the global gradient norm at 1. Frozen parameters get no optimizer state:
the trainer differentiates and updates only the trainable subset (`split_params`).
"""
from __future__ import annotations

import re
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import traverse_util

Params = Any


def device_scaled(optim: ml_collections.ConfigDict, num_devices: int) -> tuple[float, int]:
    """`(peak lr, warm-up steps)` after the official device-count rules (stage II: lr x
    devices; stage I: warm-up // devices), as the config asks for them."""
    peak = optim.lr * (num_devices if optim.lr_per_device else 1)
    warmup = max(optim.warmup_steps // num_devices if optim.warmup_divided_by_devices else optim.warmup_steps, 0)
    return peak, warmup


def learning_rate(optim: ml_collections.ConfigDict, num_devices: int, total_steps: int) -> optax.Schedule:
    peak, warmup = device_scaled(optim, num_devices)
    if optim.schedule == "cosine":
        decay_steps = max(total_steps - warmup, 1)

        def schedule(step):
            step = jnp.asarray(step, jnp.float32)
            warm = peak * (step + 1) / max(warmup, 1)
            e = jnp.clip(step - warmup, 0, decay_steps)
            cos = 0.5 * (1 + jnp.cos(jnp.pi * e / decay_steps)) * peak
            return jnp.where(step < warmup, warm, cos)

        return schedule
    if optim.schedule == "constant":
        def schedule(step):
            frac = jnp.clip(jnp.asarray(step, jnp.float32) / max(warmup, 1), 0.0, 1.0)
            factor = jnp.where(warmup > 0, 0.01 + (1 - 0.01) * frac, 1.0)
            return peak * factor

        return schedule
    raise ValueError(f"unknown schedule {optim.schedule!r} (cosine or constant)")


def _decay_mask(params: Params) -> Params:
    """Official stage-I groups: no weight decay for ndim < 2, norms, biases, temperature."""
    flat = traverse_util.flatten_dict(params, sep="/")
    no_decay = re.compile(r"(bn|ln|norm|bias|scale|logit_scale)")
    mask = {k: (jnp.ndim(v) >= 2 and not no_decay.search(k)) for k, v in flat.items()}
    return traverse_util.unflatten_dict(mask, sep="/")


def make_optimizer(optim: ml_collections.ConfigDict, schedule: optax.Schedule) -> optax.GradientTransformation:
    if optim.name == "adamw":
        opt = optax.adamw(schedule, b1=optim.b1, b2=optim.b2, eps=optim.eps, weight_decay=optim.weight_decay,
                          mask=_decay_mask)
    elif optim.name == "adam":
        opt = optax.adam(schedule, b1=optim.b1, b2=optim.b2, eps=optim.eps)
    else:
        raise ValueError(f"unknown optimizer {optim.name!r} (adam or adamw)")
    chain = [opt]
    if optim.clip_norm:
        chain.insert(0, optax.clip_by_global_norm(optim.clip_norm))
    return optax.chain(*chain)


def split_params(params: Params, frozen: str) -> tuple[Params, Params]:
    """(trainable, frozen) sub-trees by a regex on "/"-joined parameter paths."""
    flat = traverse_util.flatten_dict(params, sep="/")
    rx = re.compile(frozen) if frozen else None
    train = {k: v for k, v in flat.items() if not (rx and rx.search(k))}
    fixed = {k: v for k, v in flat.items() if rx and rx.search(k)}
    if not train:
        raise ValueError(f"the frozen pattern {frozen!r} leaves no parameter to train")
    return traverse_util.unflatten_dict(train, sep="/"), traverse_util.unflatten_dict(fixed, sep="/")


def merge_params(trainable: Params, frozen: Params) -> Params:
    flat = traverse_util.flatten_dict(trainable, sep="/")
    flat.update(traverse_util.flatten_dict(frozen, sep="/"))
    return traverse_util.unflatten_dict(flat, sep="/")


def global_norm(tree: Any) -> jax.Array:
    """L2 norm over all leaves, in float32 (the grad_norm / param_norm metrics). Written out:
    `optax.global_norm` warns as deprecated (optax 0.2.8) and `optax.tree.norm` is not in 0.2.4."""
    return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree.leaves(tree)))
