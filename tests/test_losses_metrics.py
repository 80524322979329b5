"""Losses against direct formulas; metrics against hand-made cases."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from synchformer_jax import losses
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
