"""Motionformer video extractor (divided space-time ViT) and its spatial aggregation.

Scope names mirror the official `vfeat_extractor.*` state-dict keys; the unused 2-D
`patch_embed` of the official model is not built (the converter drops and restores it).
"""
from __future__ import annotations

from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from synchformer_jax.models import layers
from synchformer_jax.models.config import MotionformerConfig

Dtype = Any


class DividedAttention(nn.Module):
    """One attention step of a divided block, over time or over space.

    The CLS query attends to every token; each patch query attends to its group (the 8
    tokens at its spatial location for time, the 196 tokens of its frame for space) plus
    the CLS key/value. q is scaled before anything else, as in the official code.
    """

    dim: int
    num_heads: int
    over: str  # "time" or "space"
    dtype: Dtype = jnp.float32
    time_pack: int = 1  # spatial locations per time-attention sequence (packed_time_attention)

    @nn.compact
    def __call__(self, x: jax.Array, num_frames: int, num_patches: int) -> jax.Array:
        """`x`: `[N, 1 + F*P, D]` (CLS then frame-major patches) -> same shape."""
        qkv = layers.dense(3 * self.dim, self.dtype, name="qkv")(x)
        q, k, v = (layers.split_heads(t, self.num_heads) for t in jnp.split(qkv, 3, axis=-1))
        head_dim = self.dim // self.num_heads
        q = q * jnp.asarray(head_dim ** -0.5, q.dtype)

        cls_out = layers.single_query_attention(q[:, 0], k, v)[:, None]  # [N, 1, H, d]
        if self.over == "time" and self.time_pack > 1:
            out = packed_time_attention(q, k, v, num_frames, num_patches, self.time_pack)
        else:
            out = grouped_attention(q, k, v, num_frames, num_patches, self.over)
        out = jnp.concatenate([cls_out, out], axis=1)
        return layers.dense(self.dim, self.dtype, name="proj")(layers.merge_heads(out))


def grouped_attention(q: jax.Array, k: jax.Array, v: jax.Array, num_frames: int, num_patches: int,
                      over: str) -> jax.Array:
    """The patch queries' divided attention, one sequence per group plus the CLS key/value:
    over "time" a group is the F tokens at one spatial location, over "space" the P
    tokens of one frame. `q` (scaled), `k`, `v`: `[N, 1 + F*P, H, d]` -> `[N, F*P, H, d]`."""
    n, _, heads, head_dim = k.shape

    def group(t: jax.Array) -> jax.Array:
        t = t[:, 1:].reshape(n, num_frames, num_patches, heads, head_dim)
        if over == "time":  # sequences over frames at one spatial location
            return t.transpose(0, 2, 1, 3, 4).reshape(n * num_patches, num_frames, heads, head_dim)
        return t.reshape(n * num_frames, num_patches, heads, head_dim)  # the patches of one frame

    groups = num_patches if over == "time" else num_frames
    cls_k = jnp.repeat(k[:, :1], groups, axis=0)
    cls_v = jnp.repeat(v[:, :1], groups, axis=0)
    out = layers.attention(group(q), jnp.concatenate([cls_k, group(k)], axis=1),
                           jnp.concatenate([cls_v, group(v)], axis=1), scale=1.0)
    if over == "time":
        out = out.reshape(n, num_patches, num_frames, heads, head_dim).transpose(0, 2, 1, 3, 4)
    return out.reshape(n, num_frames * num_patches, heads, head_dim)


def packed_time_attention(q: jax.Array, k: jax.Array, v: jax.Array, num_frames: int, num_patches: int,
                          pack: int) -> jax.Array:
    """The patch queries' time attention, `pack` spatial locations per sequence.

    Divided time attention gives every spatial location its own sequence: F = 8 queries
    over the CLS key and the location's 8 keys. A fused kernel (cuDNN flash attention)
    works in tiles of 64-128 query rows, so such sequences fill an eighth of a tile and
    the call is tile- and launch-bound (43,904 sequences x 12 heads per block at 16
    clips). Here `pack` locations (consecutive patch indices of a frame) share one
    sequence of F*pack queries over the CLS key, their F*pack keys and one masked pad key
    (cuDNN trains masked attention only on even lengths), under a block-diagonal mask:
    a query still sees exactly its own location's keys and the CLS key, so the result is
    the unpacked attention's up to summation order. The attention products grow by
    (F*pack + 2) / (F + 1) (12.7x at pack 14: +1.6 % of the model's FLOPs); the tiles
    fill. `q` (scaled), `k`, `v`: `[N, 1 + F*P, H, d]` -> `[N, F*P, H, d]`.
    """
    n, _, heads, head_dim = k.shape
    if num_patches % pack:
        raise ValueError(f"time_attention_pack={pack} must divide the {num_patches} patches of a frame")
    groups = num_patches // pack

    def packed(t: jax.Array) -> jax.Array:  # [N, F*P, H, d] -> [N*groups, F*pack, H, d]
        t = t.reshape(n, num_frames, groups, pack, heads, head_dim).transpose(0, 2, 1, 3, 4, 5)
        return t.reshape(n * groups, num_frames * pack, heads, head_dim)

    def with_cls_and_pad(t: jax.Array) -> jax.Array:
        cls = jnp.repeat(t[:, :1], groups, axis=0)
        pad = jnp.zeros((n * groups, 1, heads, head_dim), t.dtype)
        return jnp.concatenate([cls, packed(t[:, 1:]), pad], axis=1)

    out = layers.attention(packed(q[:, 1:]), with_cls_and_pad(k), with_cls_and_pad(v), scale=1.0,
                           mask=jnp.asarray(time_pack_mask(num_frames, pack))[None, None])
    out = out.reshape(n, groups, num_frames, pack, heads, head_dim).transpose(0, 2, 1, 3, 4, 5)
    return out.reshape(n, num_frames * num_patches, heads, head_dim)


def time_pack_mask(num_frames: int, pack: int) -> np.ndarray:
    """`[F*pack, 1 + F*pack + 1]` bool: query (frame, location) attends to the CLS key and
    to the keys of its own location in every frame, not to the final pad key."""
    location = np.tile(np.arange(pack), num_frames)
    same = location[:, None] == location[None, :]
    cls = np.ones((num_frames * pack, 1), bool)
    pad = np.zeros((num_frames * pack, 1), bool)
    return np.concatenate([cls, same, pad], axis=1)


class Mlp(nn.Module):
    dim: int
    hidden: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = layers.gelu(layers.dense(self.hidden, self.dtype, name="fc1")(x))
        return layers.dense(self.dim, self.dtype, name="fc2")(x)


class DividedSpaceTimeBlock(nn.Module):
    """time attention (norm3) -> space attention (norm1) -> MLP (norm2).

    The time branch has no drop path in the official code; the other two do.
    """

    dim: int
    num_heads: int
    mlp_dim: int
    eps: float
    drop_path: float
    dtype: Dtype = jnp.float32
    time_pack: int = 1

    @nn.compact
    def __call__(self, x: jax.Array, num_frames: int, num_patches: int, train: bool,
                 drop_path: Optional[jax.Array] = None) -> jax.Array:
        """`drop_path` (traced) overrides the field: blocks run in a scan share one module."""
        drop = layers.DropPath(self.drop_path)
        norm = lambda name: layers.layer_norm(self.eps, name=name)  # noqa: E731
        x = x + DividedAttention(self.dim, self.num_heads, "time", self.dtype, self.time_pack, name="timeattn")(
            norm("norm3")(x), num_frames, num_patches)
        x = x + drop(DividedAttention(self.dim, self.num_heads, "space", self.dtype, name="attn")(
            norm("norm1")(x), num_frames, num_patches), deterministic=not train, rate=drop_path)
        x = x + drop(Mlp(self.dim, self.mlp_dim, self.dtype, name="mlp")(norm("norm2")(x)),
                     deterministic=not train, rate=drop_path)
        return x


class PatchEmbed3D(nn.Module):
    """Conv3d tubelets `(2, 16, 16)`, stride = kernel; scope `patch_embed_3d.proj`."""

    dim: int
    kernel: tuple[int, int, int]
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        return nn.Conv(self.dim, self.kernel, strides=self.kernel, padding="VALID", dtype=self.dtype,
                       param_dtype=jnp.float32, kernel_init=nn.initializers.zeros, name="proj")(x)


class MotionFormer(nn.Module):
    """Video extractor: `[N, T, C, H, W]` segments -> `[N, T/2, D]` per-segment tokens.

    `temporal_pool=True` (stage I) averages the 8 temporal tokens into one `[N, D]`.
    """

    cfg: MotionformerConfig
    dtype: Dtype = jnp.float32
    remat: bool = False
    temporal_pool: bool = False
    scan: bool = False  # the blocks as one lax.scan (layers.scan_blocks); same parameters
    remat_policy: str = "nothing"  # layers.REMAT_POLICIES
    time_pack: int = 1  # spatial locations per time-attention sequence (packed_time_attention)

    @nn.compact
    def __call__(self, video: jax.Array, train: bool = False) -> jax.Array:
        c = self.cfg
        d = c.embed_dim
        f, p = c.temporal_patches, c.spatial_patches
        # [N, T, C, H, W] -> [N, T, H, W, C] for a channels-last conv.
        x = jnp.transpose(video, (0, 1, 3, 4, 2)).astype(self.dtype)
        x = PatchEmbed3D(d, (c.patch_size_temp, c.patch_size, c.patch_size), self.dtype, name="patch_embed_3d")(x)
        n = x.shape[0]
        x = x.reshape(n, f * p, d)  # token t*196 + h*14 + w

        cls_token = self.param("cls_token", layers.DEFAULT_KERNEL_INIT, (1, 1, d))
        pos_embed = self.param("pos_embed", layers.DEFAULT_KERNEL_INIT, (1, p + 1, d))
        temp_embed = self.param("temp_embed", nn.initializers.zeros, (1, f, d))
        # "separate" positions: spatial table for every frame plus a temporal table.
        patch_pos = (pos_embed[:, 1:][:, None] + temp_embed[:, :, None]).reshape(1, f * p, d)
        x = jnp.concatenate([jnp.broadcast_to(cls_token + pos_embed[:, :1], (n, 1, d)),
                             x.astype(jnp.float32) + patch_pos], axis=1)

        rates = np.linspace(0.0, c.drop_path_rate, c.depth) if c.depth > 1 else np.zeros(1)
        names = [f"blocks_{i}" for i in range(c.depth)]
        if self.scan and not self.is_initializing():
            dropping = train and c.drop_path_rate > 0
            x = layers.scan_blocks(
                self, names, DividedSpaceTimeBlock(d, c.num_heads, c.mlp_dim, c.layer_norm_eps, 0.0, self.dtype,
                                                   self.time_pack, parent=None),
                x, f, p, train, remat=self.remat, policy=self.remat_policy,
                per_block={"drop_path": jnp.asarray(rates, jnp.float32)} if dropping else None,
                rng=self.make_rng("dropout") if dropping else None)
        else:
            block_cls = layers.remat_block(DividedSpaceTimeBlock, self.remat, self.remat_policy,
                                           static_argnums=(2, 3, 4))
            for i, name in enumerate(names):
                x = block_cls(d, c.num_heads, c.mlp_dim, c.layer_norm_eps, float(rates[i]), self.dtype,
                              self.time_pack, name=name)(x, f, p, train)
        self.sow("intermediates", "tokens_last_block", x)

        x = layers.layer_norm(c.layer_norm_eps, name="norm")(x[:, 1:])  # CLS dropped first
        # Spatial aggregation per temporal slot: [N*F, P, D] -> [N, F, D].
        x = layers.AggregationLayer(d, c.num_heads, c.mlp_dim, c.layer_norm_eps, self.dtype,
                                    name="spatial_attn_agg")(x.reshape(n * f, p, d))
        x = x.reshape(n, f, d)
        if self.temporal_pool:
            x = jnp.mean(x, axis=1)
        return x
