"""Building blocks shared by the extractors and the sync transformer.

Numerics follow the official PyTorch model: exact (erf) GELU, LayerNorm statistics in
float32 with the caller's epsilon, attention softmax in float32. Matmuls run in the
module's compute `dtype`; parameters are always float32. The residual stream keeps the
dtype of its input (float32 in the model), which is what CUDA autocast does in the
official code: fp16 branch outputs are added to an fp32 residual.
"""
from __future__ import annotations

import functools
import os
from typing import Any, Callable, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any
Initializer = Callable[..., jax.Array]

# torch.nn.Linear / Conv weights in the official code are mostly trunc-normal(0.02).
DEFAULT_KERNEL_INIT = nn.initializers.truncated_normal(stddev=0.02)


def gelu(x: jax.Array) -> jax.Array:
    """Exact GELU: torch `nn.GELU()` and HF `"gelu"` use erf, not the tanh approximation."""
    return jax.nn.gelu(x, approximate=False)


def layer_norm(eps: float, name: Optional[str] = None) -> nn.LayerNorm:
    """LayerNorm computed and returned in float32 (statistics and affine in float32)."""
    return nn.LayerNorm(epsilon=eps, dtype=jnp.float32, param_dtype=jnp.float32, name=name)


def dense(features: int, dtype: Dtype, name: Optional[str] = None, use_bias: bool = True,
          kernel_init: Initializer = DEFAULT_KERNEL_INIT) -> nn.Dense:
    return nn.Dense(features, use_bias=use_bias, dtype=dtype, param_dtype=jnp.float32,
                    kernel_init=kernel_init, bias_init=nn.initializers.zeros, name=name)


def split_heads(x: jax.Array, num_heads: int) -> jax.Array:
    """`[..., L, H*d] -> [..., L, H, d]`; heads are contiguous feature chunks (h outer)."""
    return x.reshape(*x.shape[:-1], num_heads, x.shape[-1] // num_heads)


def merge_heads(x: jax.Array) -> jax.Array:
    return x.reshape(*x.shape[:-2], x.shape[-2] * x.shape[-1])


def attention(q: jax.Array, k: jax.Array, v: jax.Array, *, scale: float,
              dropout_rate: float = 0.0, deterministic: bool = True,
              dropout_rng: Optional[jax.Array] = None, mask: Optional[jax.Array] = None) -> jax.Array:
    """Softmax attention over `[B, L, H, d]` tensors.

    `mask` (optional, boolean, broadcastable to `[B, H, Lq, Lk]`, True = attend) is only
    given with even sequence lengths: cuDNN trains a masked attention (a bias to it) only
    on those. Goes through `jax.nn.dot_product_attention` (so GPUs get the fused cuDNN
    kernel) unless attention-probability dropout is active, which the fused path cannot
    do. Odd sequence lengths use cuDNN only when not differentiated, unless
    `$SYNCHFORMER_JAX_ODD_ATTENTION_GRAD=cudnn` (see `_fused_forward`). Softmax runs in
    float32 on both paths.
    """
    if mask is not None and (q.shape[1] % 2 or k.shape[1] % 2):
        raise ValueError(f"a masked attention needs even sequence lengths (cuDNN trains no other), "
                         f"got {q.shape[1]} queries and {k.shape[1]} keys")
    if dropout_rate > 0.0 and not deterministic:
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) * scale
        if mask is not None:
            logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(logits, axis=-1)
        keep = jax.random.bernoulli(dropout_rng, 1.0 - dropout_rate, probs.shape)
        probs = jnp.where(keep, probs / (1.0 - dropout_rate), 0.0).astype(v.dtype)
        return jnp.einsum("bhqk,bkhd->bqhd", probs, v)
    if _use_cudnn(q):
        try:
            if q.shape[1] % 2 == 0 and k.shape[1] % 2 == 0:
                return jax.nn.dot_product_attention(q, k, v, mask=mask, scale=scale, implementation="cudnn")
            return _fused_forward(q, k, v, scale, "cudnn", odd_length_grad_kernel())
        except (ValueError, NotImplementedError, RuntimeError):
            pass  # a shape/dtype cuDNN does not take: the XLA path below computes the same
    return jax.nn.dot_product_attention(q, k, v, mask=mask, scale=scale, implementation="xla")


def even_padded_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, scale: float,
                          implementation: str) -> jax.Array:
    """`attention` with odd sequence lengths padded by one zero token to even ones.

    The pad key is masked out through `key_value_seq_lengths` (a padding mask, not a bias),
    the pad query's row is dropped, so the result and its gradients are those of the
    unpadded attention. cuDNN trains only even lengths (see `_fused_forward`).
    """
    t, s = q.shape[1], k.shape[1]
    lengths = jnp.full((q.shape[0],), s, jnp.int32)
    out = jax.nn.dot_product_attention(_pad_to_even(q), _pad_to_even(k), _pad_to_even(v), scale=scale,
                                       key_value_seq_lengths=lengths, implementation=implementation)
    return out[:, :t]


def _pad_to_even(x: jax.Array) -> jax.Array:
    if x.shape[1] % 2 == 0:
        return x
    return jnp.pad(x, [(0, 0), (0, 1)] + [(0, 0)] * (x.ndim - 2))


def single_query_attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    """One query per sequence over all of its keys: `q [N, H, d]` (already scaled),
    `k, v [N, L, H, d]` -> `[N, H, d]`. Softmax in float32, as in `attention`.

    The Motionformer's CLS token attends to all 1,569 tokens twice per block. Through the
    generic path (XLA) that single query makes XLA copy k and v into head-major layout,
    two full copies of the block's keys and values for two tiny products. Here the heads
    stay packed: the logits are one matmul of the keys `[L, H*d]` with a block-diagonal
    `[H*d, H]` query matrix, and the output is `p^T [H, L] @ v [L, H*d]`, of which the
    diagonal head blocks are kept. That is H times the FLOPs of the two products (0.4 % of
    a block) and no copies: the Motionformer block's forward is ~8 % faster on 2 CPU
    cores (docs/benchmarks.md).
    """
    n, length, heads, head_dim = k.shape
    block_diag = (q[:, :, :, None] * jnp.eye(heads, dtype=q.dtype)[None, :, None, :])
    logits = jnp.einsum("nlc,nch->nlh", k.reshape(n, length, heads * head_dim),
                        block_diag.reshape(n, heads * head_dim, heads),
                        preferred_element_type=jnp.float32)
    probs = jax.nn.softmax(logits, axis=1).astype(v.dtype)
    every_head = jnp.einsum("nlh,nlc->nhc", probs, v.reshape(n, length, heads * head_dim),
                            preferred_element_type=jnp.float32).reshape(n, heads, heads, head_dim)
    head = jnp.arange(heads)
    return every_head[:, head, head].astype(v.dtype)


# cuDNN's fused attention takes odd sequence lengths (the Motionformer's 9 and 197 keys,
# the aggregators' 13 and 197 tokens) in inference but not in training: jax's training
# rule passes its "no bias" placeholder as a bias, and biased training needs even lengths
# ("Unsupported sequence length Q 1, KV 1569" on an H100 with jax 0.11.2 / cuDNN 9.19,
# 2026-11-23, docs/benchmarks.md; the same check in jax 0.10-0.12). Without remat that
# error is raised inside `attention`'s try and the XLA path is taken; under `nn.remat`
# (jax.checkpoint) the rule runs later, when the checkpointed block is differentiated,
# outside the try, and the whole stage-I step failed. So odd lengths go through this
# wrapper: the `forward` kernel when not differentiated (inference and the frozen
# extractors of stage II keep the cuDNN kernel measured there) and, when differentiated,
# the `grad` kernel's own forward and backward: "xla" (XLA attention, what the try/except
# gave stage I without remat) or "cudnn" (cuDNN on lengths padded to even,
# `even_padded_attention`; not yet measured on a GPU).
@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _fused_forward(q, k, v, scale, forward, grad):
    return jax.nn.dot_product_attention(q, k, v, scale=scale, implementation=forward)


def _fused_forward_fwd(q, k, v, scale, forward, grad):
    if grad == "cudnn":
        return jax.vjp(functools.partial(even_padded_attention, scale=scale, implementation="cudnn"), q, k, v)
    # "xla-padded" is the cuDNN recipe on the XLA kernel, so that it can be tested on a CPU.
    if grad == "xla-padded":
        return jax.vjp(functools.partial(even_padded_attention, scale=scale, implementation="xla"), q, k, v)
    return jax.vjp(lambda q, k, v: jax.nn.dot_product_attention(
        q, k, v, scale=scale, implementation="xla"), q, k, v)


def _fused_forward_bwd(scale, forward, grad, vjp_fn, g):
    return vjp_fn(g)


_fused_forward.defvjp(_fused_forward_fwd, _fused_forward_bwd)

ODD_LENGTH_GRAD_ENV = "SYNCHFORMER_JAX_ODD_ATTENTION_GRAD"
ODD_LENGTH_GRAD_KERNELS = ("xla", "cudnn")


def odd_length_grad_kernel() -> str:
    """Which kernel trains odd-length attention on a GPU: `$SYNCHFORMER_JAX_ODD_ATTENTION_GRAD`,
    "xla" (default) or "cudnn" (padded to even). Read at trace time."""
    kernel = os.environ.get(ODD_LENGTH_GRAD_ENV, "xla") or "xla"
    if kernel not in ODD_LENGTH_GRAD_KERNELS:
        raise ValueError(f"{ODD_LENGTH_GRAD_ENV}={kernel!r}: choose one of {', '.join(ODD_LENGTH_GRAD_KERNELS)}")
    return kernel


def _use_cudnn(q: jax.Array) -> bool:
    """cuDNN's fused kernel on NVIDIA GPUs for 16-bit inputs; `implementation=None` in
    jax.nn.dot_product_attention still means XLA, so the choice is made here."""
    return q.dtype in (jnp.bfloat16, jnp.float16) and jax.default_backend() == "gpu"


class DropPath(nn.Module):
    """Stochastic depth: drops the whole residual branch per example (timm semantics).

    `rate` given at call time (an array, inside `scan_blocks`) overrides the field.
    """

    rate: float

    @nn.compact
    def __call__(self, x: jax.Array, deterministic: bool, rate: Optional[jax.Array] = None) -> jax.Array:
        if deterministic or (rate is None and self.rate == 0.0):
            return x
        keep_prob = 1.0 - (self.rate if rate is None else rate)
        rng = self.make_rng("dropout")
        mask = jax.random.bernoulli(rng, keep_prob, (x.shape[0],) + (1,) * (x.ndim - 1))
        return jnp.where(mask, x / keep_prob, jnp.zeros_like(x))


# Rematerialisation policies by name (`ModelConfig.remat_policy`).
REMAT_POLICIES = {
    "nothing": None,  # jax.checkpoint's default: nothing saved, the block recomputed
    # Outputs of matmuls without batch dimensions: the Dense projections and MLPs (the
    # FLOPs), not the attention products (batched einsums) nor any elementwise op.
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def remat_policy(name: str):
    if name not in REMAT_POLICIES:
        raise ValueError(f"unknown remat_policy {name!r}; choose from {sorted(REMAT_POLICIES)}")
    return REMAT_POLICIES[name]


def remat_block(cls: type, remat: bool, policy: str, static_argnums: tuple[int, ...] = ()) -> type:
    """`cls` rematerialised under the named policy when `remat`, else `cls` itself."""
    return nn.remat(cls, static_argnums=static_argnums, policy=remat_policy(policy)) if remat else cls


def scan_blocks(parent: nn.Module, names: Sequence[str], block: nn.Module, x: jax.Array, *args: Any,
                remat: bool = False, policy: str = "nothing", per_block: Optional[dict[str, jax.Array]] = None,
                rng: Optional[jax.Array] = None) -> jax.Array:
    """Applies `parent`'s same-shaped child blocks `names` in order, as one `lax.scan`.

    The parameters stay one subtree per block (`blocks_0`, `blocks_1`, ...: the official
    layout, what conversion and checkpoints use); they are stacked here, per call, into the
    scanned operand (a copy of the blocks' weights, small next to a block's activations).
    XLA then compiles one block instead of `len(names)` (compile time), and with `remat`
    the backward pass recomputes one block at a time inside the loop, which bounds the
    activation memory on every backend (XLA:CPU's scheduler hoists the recomputation of
    an unrolled remat forward, so there it does not save memory).

    `block` is an unbound template (`parent=None`) with the blocks' shared fields; per-block
    call arguments go in `per_block` (arrays with a leading block axis, passed by keyword),
    and `rng` (when given) is folded with the block index into each block's `dropout` rng.
    `policy` names what a rematerialised block keeps (`REMAT_POLICIES`).
    Only for apply: `parent` must have created the blocks, unscanned, at init.
    """
    params = parent.variables["params"]
    stacked = jax.tree.map(lambda *leaves: jnp.stack(leaves), *[params[n] for n in names])
    index = jnp.arange(len(names))

    def body(carry, scanned):
        block_params, extra, i = scanned
        rngs = {"dropout": jax.random.fold_in(rng, i)} if rng is not None else {}
        return block.apply({"params": block_params}, carry, *args, rngs=rngs, **extra), None

    if remat:
        # prevent_cse off: the loop already keeps the recompute in place.
        body = jax.checkpoint(body, prevent_cse=False, policy=remat_policy(policy))
    x, _ = jax.lax.scan(body, x, (stacked, per_block or {}, index))
    return x


class TorchMultiheadAttention(nn.Module):
    """`torch.nn.MultiheadAttention` (batch-first, no mask): fused `in_proj` rows [q; k; v]."""

    dim: int
    num_heads: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        qkv = dense(3 * self.dim, self.dtype, name="in_proj",
                    kernel_init=nn.initializers.xavier_uniform())(x)
        q, k, v = (split_heads(t, self.num_heads) for t in jnp.split(qkv, 3, axis=-1))
        head_dim = self.dim // self.num_heads
        out = attention(q, k, v, scale=head_dim ** -0.5)
        return dense(self.dim, self.dtype, name="out_proj")(merge_heads(out))


class AggregationLayer(nn.Module):
    """Learned-token pooling: pre-LN `torch.nn.TransformerEncoderLayer` over `[tok, x]`.

    Used by both extractors (spatial aggregation for video, frequency aggregation for
    audio). Returns the token's output with no final LayerNorm, as the official layer.

    Input `[N, L, D]`, output `[N, D]`.
    """

    dim: int
    num_heads: int
    mlp_dim: int
    eps: float = 1e-6
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        token = self.param("cls_token", DEFAULT_KERNEL_INIT, (1, 1, self.dim))
        x = jnp.concatenate([jnp.broadcast_to(token, (x.shape[0], 1, self.dim)).astype(x.dtype), x], axis=1)
        h = layer_norm(self.eps, name="norm1")(x)
        x = x + TorchMultiheadAttention(self.dim, self.num_heads, self.dtype, name="self_attn")(h)
        h = layer_norm(self.eps, name="norm2")(x)
        h = gelu(dense(self.mlp_dim, self.dtype, name="linear1")(h))
        x = x + dense(self.dim, self.dtype, name="linear2")(h)
        return x[:, 0]
