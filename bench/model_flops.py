"""What MFU divides by: the analytic model FLOPs of each task, and the measured matmul peak.

Counts are of the model's matmuls and attention products only (2 FLOPs per multiply-add;
norms, softmax, GELU, the log-mel and the loss are well under 1 %). Training counts 3x the
forward of the trained parts (forward + two backward matmuls) and 1x of frozen ones;
recompute under remat is not counted (MFU is model FLOPs, not hardware FLOPs).
`docs/benchmarks.md` ("FLOP counts") checks them against XLA's cost analysis.

Importing this module needs no jax (the parent of `side_by_side.py` never touches the
accelerator); `measure_peak_flops` imports it when called.
"""
from __future__ import annotations

import time


def block_flops(n_tokens: int, d: int, mlp: int, attn_len: int) -> float:
    """Pre-LN transformer block over `n_tokens`: qkv + proj, MLP, QK^T and AV (2/MAC)."""
    return 2.0 * n_tokens * (4 * d * d + 2 * d * mlp) + 4.0 * n_tokens * attn_len * d


def part_flops(m) -> dict:
    """Forward FLOPs of each part of a `ModelConfig`: Motionformer and AST per segment
    (aggregators included), sync transformer (projections, blocks, head) per clip."""
    v, a = m.video, m.audio
    d = v.embed_dim
    tv, sp = v.temporal_patches, v.spatial_patches
    nv = tv * sp
    mf = {"patch_embed": 2.0 * nv * (v.patch_size_temp * v.patch_size ** 2 * 3) * d}
    # Divided block: time attention (each patch over tv+1 keys incl. CLS), space attention
    # (over sp+1 keys), each with its own qkv + proj on all 1+nv tokens; CLS queries over all
    # 1+nv keys in both; MLP.
    per_block = (2.0 * (nv + 1) * (8 * d * d + 2 * d * v.mlp_dim)
                 + 4.0 * nv * d * ((tv + 1) + (sp + 1)) + 2 * 4.0 * (nv + 1) * d)
    mf["blocks"] = v.depth * per_block
    mf["spatial_agg"] = tv * block_flops(sp + 1, d, v.mlp_dim, sp + 1)
    mf["total"] = sum(mf.values())
    da = a.hidden_size
    na = a.freq_patches * a.time_patches
    ast = {"patch_embed": 2.0 * na * a.patch_size ** 2 * da,
           "blocks": a.num_layers * block_flops(na + 2, da, a.mlp_dim, na + 2),
           "freq_agg": a.time_patches * block_flops(a.freq_patches + 1, da, a.mlp_dim, a.freq_patches + 1)}
    ast["total"] = sum(ast.values())
    s = m.sync
    n = m.pos_emb_len
    sync = {"projections": 2.0 * m.n_segments * (tv * d + a.time_patches * da) * s.n_embd,
            "blocks": s.n_layer * block_flops(n, s.n_embd, s.mlp_ratio * s.n_embd, n),
            "head": 2.0 * s.n_embd * m.num_outputs}
    sync["total"] = sum(sync.values())
    return {"motionformer_per_segment": mf, "ast_per_segment": ast, "sync_transformer_per_clip": sync}


def task_flops(m) -> dict:
    """Model FLOPs per clip (one 14-segment window) of each task.

    `infer`: forward; `stage2`: frozen extractors forward + sync transformer trained;
    `stage1`: both extractors trained; `stage2_cached`: the stage-II step on cached
    extractor features (projections + transformer only); `extractors_fwd`: both
    extractors' forward alone.
    """
    p = part_flops(m)
    ext = m.n_segments * (p["motionformer_per_segment"]["total"] + p["ast_per_segment"]["total"])
    sync = p["sync_transformer_per_clip"]["total"]
    return {"infer": ext + sync, "stage2": ext + 3.0 * sync, "stage1": 3.0 * ext,
            "stage2_cached": 3.0 * sync, "extractors_fwd": ext}


def mfu(flops_per_s: float, peak_flops_per_s: float | None) -> str:
    """`flops_per_s` as a percentage of the peak, for tables ('' without a peak)."""
    return f"{100.0 * flops_per_s / peak_flops_per_s:.1f}%" if peak_flops_per_s else ""


def measure_peak_flops(dtype: str = "float32") -> tuple[float, float]:
    """Best FLOP/s of a jitted square matmul chain in `dtype` on device 0, and its FLOP per
    second of process CPU time (what one fully used core gives; other load does not
    change it)."""
    import jax
    import jax.numpy as jnp

    n = 2048 if jax.default_backend() == "cpu" else 8192
    reps = 4
    x = jax.random.normal(jax.random.key(0), (n, n), jnp.float32).astype(dtype)

    @jax.jit
    def chain(x):
        y = x
        for _ in range(reps):
            y = (y @ x) * (1.0 / n)
        return y

    chain(x).block_until_ready()
    best, best_cpu = float("inf"), float("inf")
    for _ in range(5):
        c, t = time.process_time(), time.perf_counter()
        chain(x).block_until_ready()
        best = min(best, time.perf_counter() - t)
        best_cpu = min(best_cpu, time.process_time() - c)
    flops = 2.0 * n ** 3 * reps
    return flops / best, flops / max(best_cpu, 1e-9)
