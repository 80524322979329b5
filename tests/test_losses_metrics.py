"""Losses against direct formulas; metrics against hand-made cases."""
import re

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from synchformer_jax import losses, sharding
from synchformer_jax.evaluators.offset import OffsetMetrics, topk_correct


def _normed(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _reference_infonce(v, a, tau):
    """The official formulation, spelled out: CE with identity targets, both directions."""
    v, a = v.reshape(-1, v.shape[-1]).astype(np.float64), a.reshape(-1, a.shape[-1]).astype(np.float64)
    sim = v @ a.T / tau

    def ce(s):
        s = s - s.max(axis=1, keepdims=True)
        logp = s - np.log(np.exp(s).sum(axis=1, keepdims=True))
        return -np.mean(np.diag(logp))

    return 0.5 * (ce(sim) + ce(sim.T))


def test_segment_infonce_matches_formula_and_pools():
    rng = np.random.default_rng(0)
    v = _normed(rng.normal(size=(4, 3, 8))).astype(np.float32)
    a = _normed(rng.normal(size=(4, 3, 8))).astype(np.float32)
    got = float(losses.segment_infonce(jnp.asarray(v), jnp.asarray(a), jnp.asarray(0.07)))
    assert got == pytest.approx(_reference_infonce(v, a, 0.07), rel=1e-5)
    # Per-device pools: the mean of the losses of each pool.
    got2 = float(losses.segment_infonce(jnp.asarray(v), jnp.asarray(a), jnp.asarray(0.07), num_groups=2))
    want2 = 0.5 * (_reference_infonce(v[:2], a[:2], 0.07) + _reference_infonce(v[2:], a[2:], 0.07))
    assert got2 == pytest.approx(want2, rel=1e-5)
    assert got2 != pytest.approx(got, rel=1e-3)
    # Aligned embeddings at a low temperature: near-zero loss.
    assert float(losses.segment_infonce(jnp.asarray(v), jnp.asarray(v), jnp.asarray(0.01))) < 1e-3
    with pytest.raises(ValueError, match="negative pools"):
        losses.segment_infonce(jnp.asarray(v), jnp.asarray(a), jnp.asarray(0.07), num_groups=3)


@pytest.mark.parametrize("mesh_shape", [(8, 1), (2, 4)])
def test_global_negatives_split_the_similarity_matrix_by_rows(mesh_shape):
    # With negatives from the whole global batch the [N, N] similarity matrix grows with
    # the square of the number of devices (N = 28,672 segments on 256 GPUs x 8 clips:
    # 3.3 GB in float32). XLA must split it by rows over the batch axes (each device
    # gathers the other modality's [N, D] embeddings, 88 MB there) and never hold it whole;
    # per-device pools must not communicate at all beyond the scalar mean.
    mesh = sharding.mesh_from_config(ml_collections.ConfigDict(dict(data=mesh_shape[0], fsdp=mesh_shape[1])))
    b, s, d = 16, 14, 32
    n, rows = b * s, b * s // 8
    rng = np.random.default_rng(0)
    v = _normed(rng.normal(size=(b, s, d))).astype(np.float32)
    a = _normed(rng.normal(size=(b, s, d))).astype(np.float32)
    put = lambda x: jax.device_put(x, sharding.batch_sharding(mesh))  # noqa: E731
    tau = jax.device_put(np.float32(0.07), sharding.replicated(mesh))
    for pools in (1, 8):
        step = jax.jit(jax.value_and_grad(
            lambda v, a, t, pools=pools: losses.segment_infonce(v, a, t, num_groups=pools), argnums=(0, 1)))
        compiled = step.lower(put(v), put(a), tau).compile()
        text = compiled.as_text()
        if pools == 1:
            assert not re.search(rf"f32\[(1,)?{n},{n}\]", text), "the whole similarity matrix on one device"
            assert re.search(rf"f32\[(1,)?{rows},{n}\]", text), "no row block of the similarity matrix"
            want = _reference_infonce(v, a, 0.07)
        else:
            assert not re.search(r"all-gather|all-to-all|collective-permute", text)
            want = np.mean([_reference_infonce(v[i:i + 2], a[i:i + 2], 0.07) for i in range(0, b, 2)])
        loss, (gv, _) = compiled(put(v), put(a), tau)
        assert float(loss) == pytest.approx(want, rel=1e-5)
        assert gv.sharding.is_equivalent_to(sharding.batch_sharding(mesh), 3)


def test_offset_cross_entropy_with_mask():
    logits = jnp.asarray(np.random.default_rng(1).normal(size=(4, 21)).astype(np.float32))
    targets = jnp.asarray([0, 5, 20, 10])
    full = float(losses.offset_cross_entropy(logits, targets))
    want = -np.mean(np.asarray(jax.nn.log_softmax(logits))[np.arange(4), [0, 5, 20, 10]])
    assert full == pytest.approx(want, rel=1e-6)
    masked = float(losses.offset_cross_entropy(logits, targets, jnp.asarray([1, 1, 0, 0])))
    assert masked == pytest.approx(float(losses.offset_cross_entropy(logits[:2], targets[:2])), rel=1e-6)


def test_offset_metrics():
    logits = np.full((4, 21), -1.0, np.float32)
    logits[0, 3] = 5   # target 3: exact
    logits[1, 4] = 5   # target 3: off by one
    logits[2, 0] = 5   # target 20: wrong
    logits[3, 19] = 5  # target 20: off by one at the edge
    m = OffsetMetrics(21)
    m.update(logits, np.array([3, 3, 20, 20]))
    m.update(logits, np.array([0, 0, 0, 0]), mask=np.zeros(4))  # padding changes nothing
    r = m.result()
    assert r["count"] == 4 and r["accuracy_1"] == 0.25 and r["accuracy_1_tol1"] == 0.75
    assert r["per_class_accuracy_1"][3] == 0.5 and r["per_class_accuracy_1"][20] == 0.0
    assert r["per_class_accuracy_1"][0] is None
    assert r["accuracy_5"] == 0.5  # ties break towards low class ids, as a stable sort does
    assert topk_correct(logits, np.array([3, 3, 20, 20]), 1, tolerance=1).tolist() == [True, True, False, True]


def test_global_norm_metric_over_mixed_dtypes():
    from synchformer_jax import optim

    rng = np.random.default_rng(0)
    tree = {"a": rng.normal(size=(3, 5)).astype(np.float32),
            "b": {"c": rng.normal(size=(7,)).astype(np.float32), "d": np.float32(2.5)}}
    want = np.sqrt(sum(np.sum(np.square(x.astype(np.float64))) for x in jax.tree.leaves(tree)))
    assert float(optim.global_norm(tree)) == pytest.approx(want, rel=1e-6)
    half = jax.tree.map(lambda x: jnp.asarray(x, jnp.bfloat16), tree)  # summed in float32
    want_half = np.sqrt(sum(np.sum(np.square(np.asarray(x, np.float64))) for x in jax.tree.leaves(half)))
    assert float(optim.global_norm(half)) == pytest.approx(want_half, rel=1e-6)
    assert optim.global_norm(half).dtype == jnp.float32
