"""The sync module (official `GlobalTransformer`): minGPT pre-LN blocks over
`[OFF, v_1..v_Nv, MOD, a_1..a_Na]` with a learned absolute position table.

Scope names mirror `transformer.*`: `OFF_tok`, `MOD_tok`, `vis_in_lnorm`,
`aud_in_lnorm`, `pos_emb_cfg.pos_emb`, `blocks.N.{ln1,ln2,attn.{key,query,value,proj},
mlp.0,mlp.2}`, `ln_f`, `off_head` or `sync_head`.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from synchformer_jax.models import layers
from synchformer_jax.models.config import HEAD_OFFSET, HEAD_SYNCHRONIZABILITY, SyncTransformerConfig

Dtype = Any


class SelfAttention(nn.Module):
    """Separate key/query/value Linears (state-dict order key, query, value), no mask."""

    dim: int
    num_heads: int
    attn_pdrop: float
    resid_pdrop: float
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        k, q, v = (layers.split_heads(layers.dense(self.dim, self.dtype, name=name)(x), self.num_heads)
                   for name in ("key", "query", "value"))
        rng = self.make_rng("dropout") if (train and self.attn_pdrop > 0) else None
        y = layers.attention(q, k, v, scale=(self.dim // self.num_heads) ** -0.5,
                             dropout_rate=self.attn_pdrop, deterministic=not train, dropout_rng=rng)
        y = layers.dense(self.dim, self.dtype, name="proj")(layers.merge_heads(y))
        return nn.Dropout(self.resid_pdrop)(y, deterministic=not train)


class Block(nn.Module):
    cfg: SyncTransformerConfig
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        c = self.cfg
        h = layers.layer_norm(c.layer_norm_eps, name="ln1")(x)
        x = x + SelfAttention(c.n_embd, c.n_head, c.attn_pdrop, c.resid_pdrop, self.dtype, name="attn")(h, train)
        h = layers.layer_norm(c.layer_norm_eps, name="ln2")(x)
        # Names follow the official nn.Sequential indices: 0 Linear, 1 GELU, 2 Linear, 3 Dropout.
        h = layers.gelu(layers.dense(c.mlp_ratio * c.n_embd, self.dtype, name="mlp_0")(h))
        h = layers.dense(c.n_embd, self.dtype, name="mlp_2")(h)
        return x + nn.Dropout(c.resid_pdrop)(h, deterministic=not train)


class PositionTable(nn.Module):
    """`pos_emb_cfg.pos_emb` `[1, L, D]`, drawn from N(0, 1) as in the official code."""

    length: int
    dim: int

    @nn.compact
    def __call__(self) -> jax.Array:
        return self.param("pos_emb", nn.initializers.normal(stddev=1.0), (1, self.length, self.dim))


class GlobalTransformer(nn.Module):
    """`v [B, Nv, D]`, `a [B, Na, D]` -> head logits `[B, K]` (K = offset classes or 2)."""

    cfg: SyncTransformerConfig
    pos_emb_len: int
    dtype: Dtype = jnp.float32
    remat: bool = False
    remat_policy: str = "nothing"  # layers.REMAT_POLICIES

    @nn.compact
    def __call__(self, v: jax.Array, a: jax.Array, train: bool = False) -> jax.Array:
        c = self.cfg
        b = v.shape[0]
        seq_len = v.shape[1] + a.shape[1] + 2
        if seq_len != self.pos_emb_len:
            raise ValueError(
                f"sync transformer got {v.shape[1]} visual + {a.shape[1]} audio tokens (+2) = {seq_len}, "
                f"but its position table has {self.pos_emb_len} rows; the number of segments must match "
                "the model's n_segments")
        off_tok = self.param("OFF_tok", nn.initializers.normal(stddev=1.0), (1, 1, c.n_embd))
        mod_tok = self.param("MOD_tok", nn.initializers.normal(stddev=1.0), (1, 1, c.n_embd))
        v = layers.layer_norm(c.layer_norm_eps, name="vis_in_lnorm")(v)
        a = layers.layer_norm(c.layer_norm_eps, name="aud_in_lnorm")(a)
        x = jnp.concatenate([jnp.broadcast_to(off_tok, (b, 1, c.n_embd)), v,
                             jnp.broadcast_to(mod_tok, (b, 1, c.n_embd)), a], axis=1)
        x = x + PositionTable(self.pos_emb_len, c.n_embd, name="pos_emb_cfg")()
        self.sow("intermediates", "tokens_after_pos_emb", x)
        x = nn.Dropout(c.embd_pdrop)(x, deterministic=not train)
        block_cls = layers.remat_block(Block, self.remat, self.remat_policy, static_argnums=(2,))
        for i in range(c.n_layer):
            x = block_cls(c, self.dtype, name=f"blocks_{i}")(x, train)
            self.sow("intermediates", "block_outs", x)
        x = layers.layer_norm(c.layer_norm_eps, name="ln_f")(x)
        self.sow("intermediates", "ln_f_out", x)
        # Logits in float32 whatever the compute dtype.
        if c.head == HEAD_OFFSET:
            head = layers.dense(c.num_offset_classes, jnp.float32, name="off_head")
        elif c.head == HEAD_SYNCHRONIZABILITY:
            head = layers.dense(2, jnp.float32, name="sync_head")
        else:
            raise ValueError(f"unknown head {c.head!r}")
        return head(x[:, 0])
