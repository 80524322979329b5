"""AST audio extractor (HF `ASTModel` layout) and its frequency aggregation.

Scope names mirror the official `afeat_extractor.*` keys:
`ast.embeddings.*`, `ast.encoder.layer.N.*`, `ast.layernorm`, `freq_attn_agg.*`.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from synchformer_jax.models import layers
from synchformer_jax.models.config import ASTConfig

Dtype = Any


class ASTEmbeddings(nn.Module):
    cfg: ASTConfig
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, spec: jax.Array) -> jax.Array:
        """`spec`: `[N, F, T]` log-mel -> `[N, 2 + f*t, D]` tokens `[CLS, DIST, patches]`."""
        c = self.cfg
        d = c.hidden_size
        n = spec.shape[0]
        # The conv sees a (frequency, time) image: frequency is the height, so patch
        # tokens come out frequency-major (index f*6 + t).
        x = spec[..., None].astype(self.dtype)
        x = _PatchEmbeddings(c, self.dtype, name="patch_embeddings")(x)
        x = x.reshape(n, -1, d)
        cls_token = self.param("cls_token", layers.DEFAULT_KERNEL_INIT, (1, 1, d))
        dist_token = self.param("distillation_token", layers.DEFAULT_KERNEL_INIT, (1, 1, d))
        pos = self.param("position_embeddings", layers.DEFAULT_KERNEL_INIT, (1, x.shape[1] + 2, d))
        tokens = jnp.broadcast_to(jnp.concatenate([cls_token, dist_token], axis=1), (n, 2, d))
        return jnp.concatenate([tokens, x.astype(jnp.float32)], axis=1) + pos


class _PatchEmbeddings(nn.Module):
    cfg: ASTConfig
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = self.cfg
        return nn.Conv(c.hidden_size, (c.patch_size, c.patch_size), strides=(c.frequency_stride, c.time_stride),
                       padding="VALID", dtype=self.dtype, param_dtype=jnp.float32,
                       kernel_init=layers.DEFAULT_KERNEL_INIT, name="projection")(x)


class _SelfAttention(nn.Module):
    """HF `ASTSelfAttention`: separate query/key/value projections."""

    dim: int
    num_heads: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        q, k, v = (layers.split_heads(layers.dense(self.dim, self.dtype, name=name)(x), self.num_heads)
                   for name in ("query", "key", "value"))
        out = layers.attention(q, k, v, scale=(self.dim // self.num_heads) ** -0.5)
        return layers.merge_heads(out)


class _Dense(nn.Module):
    """A scope holding one `dense` Linear (HF's `*.output.dense`, `intermediate.dense`)."""

    features: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        return layers.dense(self.features, self.dtype, name="dense")(x)


class _Attention(nn.Module):
    dim: int
    num_heads: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = _SelfAttention(self.dim, self.num_heads, self.dtype, name="attention")(x)
        return _Dense(self.dim, self.dtype, name="output")(x)


class ASTLayer(nn.Module):
    """Pre-LN ViT layer: `x + attn(LN_before(x))`, then `h + MLP(LN_after(h))`."""

    cfg: ASTConfig
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = self.cfg
        h = layers.layer_norm(c.layer_norm_eps, name="layernorm_before")(x)
        x = x + _Attention(c.hidden_size, c.num_heads, self.dtype, name="attention")(h)
        h = layers.layer_norm(c.layer_norm_eps, name="layernorm_after")(x)
        h = layers.gelu(_Dense(c.mlp_dim, self.dtype, name="intermediate")(h))
        return x + _Dense(c.hidden_size, self.dtype, name="output")(h)


class _Encoder(nn.Module):
    cfg: ASTConfig
    dtype: Dtype = jnp.float32
    remat: bool = False
    scan: bool = False  # the layers as one lax.scan (layers.scan_blocks); same parameters
    remat_policy: str = "nothing"  # layers.REMAT_POLICIES

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        names = [f"layer_{i}" for i in range(self.cfg.num_layers)]
        if self.scan and not self.is_initializing():
            return layers.scan_blocks(self, names, ASTLayer(self.cfg, self.dtype, parent=None), x, remat=self.remat,
                                      policy=self.remat_policy)
        layer_cls = layers.remat_block(ASTLayer, self.remat, self.remat_policy)
        for name in names:
            x = layer_cls(self.cfg, self.dtype, name=name)(x)
        return x


class ASTModel(nn.Module):
    """Embeddings, encoder and final LayerNorm: `[N, F, T]` -> `[N, 2 + f*t, D]`."""

    cfg: ASTConfig
    dtype: Dtype = jnp.float32
    remat: bool = False
    scan: bool = False
    remat_policy: str = "nothing"

    @nn.compact
    def __call__(self, spec: jax.Array) -> jax.Array:
        x = ASTEmbeddings(self.cfg, self.dtype, name="embeddings")(spec)
        x = _Encoder(self.cfg, self.dtype, self.remat, self.scan, self.remat_policy, name="encoder")(x)
        return layers.layer_norm(self.cfg.layer_norm_eps, name="layernorm")(x)


class AST(nn.Module):
    """Audio extractor: `[N, F, T]` per-segment log-mel -> `[N, t, D]` tokens.

    `temporal_pool=True` (stage I) averages the time tokens into one `[N, D]`.
    """

    cfg: ASTConfig
    dtype: Dtype = jnp.float32
    remat: bool = False
    temporal_pool: bool = False
    scan: bool = False  # the encoder layers as one lax.scan
    remat_policy: str = "nothing"  # layers.REMAT_POLICIES

    @nn.compact
    def __call__(self, spec: jax.Array, train: bool = False) -> jax.Array:
        del train  # AST has no dropout or drop path in any official config.
        c = self.cfg
        d = c.hidden_size
        f, t = c.freq_patches, c.time_patches
        x = ASTModel(c, self.dtype, self.remat, self.scan, self.remat_policy, name="ast")(spec)
        self.sow("intermediates", "last_hidden_state", x)
        n = x.shape[0]
        # Drop CLS/DIST; the patches are frequency-major, so [N, f, t, D] -> per time slot
        # a sequence over frequency (low to high).
        x = x[:, 2:].reshape(n, f, t, d).transpose(0, 2, 1, 3).reshape(n * t, f, d)
        x = layers.AggregationLayer(d, c.num_heads, c.mlp_dim, c.aggregator_layer_norm_eps, self.dtype,
                                    name="freq_attn_agg")(x)
        x = x.reshape(n, t, d)
        if self.temporal_pool:
            x = jnp.mean(x, axis=1)
        return x
