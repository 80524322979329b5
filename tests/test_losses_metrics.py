"""Losses against direct formulas; metrics against hand-made cases."""
import re

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from synchformer_jax import losses, sharding
from synchformer_jax.evaluators import offset
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
    # Top-5 as sklearn's top_k_accuracy_score ranks the tied -1 classes: the higher ids
    # first, so [4, 20, 19, 18, 17] misses target 3 while [0, 20, ...] and [19, 20, ...] hit 20.
    assert r["accuracy_5"] == 0.75
    # The tolerance accuracies rank the logits (the official torch.topk), ties to low ids:
    # [0, 1, 2, 3, 4] is no nearer than 16 to target 20.
    assert r["accuracy_5_tol1"] == 0.75
    assert topk_correct(logits, np.array([3, 3, 20, 20]), 1, tolerance=1).tolist() == [True, True, False, True]
    assert topk_correct(logits, np.array([3, 3, 20, 20]), 5).tolist() == [True, False, True, True]


def test_offset_metrics_rank_as_official_code_among_fp32_softmax_ties():
    # Logits 150 and 200 below the top: distinct, but the fp32 softmax underflows to 0 for
    # both (and for the -300 classes), so sklearn ranks the zeros by class id, highest first.
    logits = np.full((4, 21), -300.0, np.float32)
    logits[:, 10], logits[:, 0], logits[:, 20] = 0.0, -150.0, -200.0
    assert offset.softmax_fp32(logits)[0, 0] == 0.0
    assert offset.top_classes(offset.softmax_fp32(logits), 5)[0].tolist() == [10, 20, 19, 18, 17]
    assert offset.top_logit_classes(logits, 5)[0].tolist() == [10, 0, 20, 1, 2]
    m = OffsetMetrics(21)
    m.update(logits, np.array([0, 17, 1, 10]))
    r = m.result()
    assert r["accuracy_1"] == 0.25 and r["accuracy_5"] == 0.5         # 17 and 10 in the top 5; 0 is not
    assert r["accuracy_1_tol1"] == 0.25 and r["accuracy_5_tol1"] == 0.75  # by logits: 0 and 1 (next to 0), 10
    # Equal logits: sklearn's top-1 is the highest class id; two classes use its binary rule
    # (class 1 only when p(1) > 0.5), so there a tie goes to class 0.
    assert topk_correct(np.zeros((1, 21)), np.array([20]), 1).tolist() == [True]
    assert topk_correct(np.zeros((2, 2)), np.array([0, 1]), 1).tolist() == [True, False]
    assert offset.top_logit_classes(np.zeros((1, 21)), 2)[0].tolist() == [0, 1]


def test_average_precision_and_roc_auc_by_hand():
    scores = np.array([0.9, 0.8, 0.8, 0.7, 0.6])
    positive = np.array([1, 1, 0, 0, 1], bool)
    # Thresholds 0.9 / 0.8 (a positive and a negative tied: taken together) / 0.7 / 0.6:
    # recall gained 1/3 at precision 1/1, 1/3 at 2/3, 0 at 2/4, 1/3 at 3/5. Ranking the tied
    # positive first would give 13/15.
    assert offset.average_precision(scores, positive) == pytest.approx(1 / 3 + 2 / 9 + 1 / 5, abs=1e-15)
    # Pairs (positive, negative) in order: 0.9 beats both, 0.8 ties 0.8 (1/2) and beats 0.7,
    # 0.6 beats neither: 3.5 / 6.
    assert offset.roc_auc(scores, positive) == pytest.approx(7 / 12, abs=1e-15)
    distinct, perfect = np.array([0.9, 0.8, 0.7, 0.6, 0.5]), np.array([1, 1, 0, 0, 0], bool)
    assert offset.average_precision(distinct, perfect) == 1.0 and offset.roc_auc(distinct, perfect) == 1.0
    inverted = perfect[::-1]  # the positives 4th and 5th: precision 1/4 and 2/5
    assert offset.roc_auc(distinct, inverted) == 0.0
    assert offset.average_precision(distinct, inverted) == pytest.approx(0.5 * (1 / 4 + 2 / 5), abs=1e-15)
    assert offset.average_precision(np.ones(4), np.array([1, 0, 0, 0])) == 0.25  # one tie: precision 1/4
    assert offset.roc_auc(np.ones(4), np.array([1, 0, 0, 0])) == 0.5
    assert np.isnan(offset.average_precision(scores, np.zeros(5))) and np.isnan(offset.roc_auc(scores, np.ones(5)))


def test_dprime():
    assert offset.dprime(0.5) == 0.0
    assert offset.dprime(0.975) == pytest.approx(np.sqrt(2) * 1.959963984540054, rel=1e-12)  # z of 97.5 %
    assert offset.dprime(0.25) == pytest.approx(-np.sqrt(2) * 0.6744897501960817, rel=1e-12)
    assert offset.dprime(1.0) == np.inf and offset.dprime(0.0) == -np.inf and np.isnan(offset.dprime(np.nan))


def test_offset_metrics_one_vs_rest_over_the_classes_present():
    import json

    from synchformer_jax.metric_writers import json_values

    probs = np.array([[0.7, 0.2, 0.1], [0.4, 0.5, 0.1], [0.3, 0.6, 0.1], [0.5, 0.3, 0.2]])
    targets = np.array([0, 0, 1, 1])  # class 2 never a target: left out of the means
    m = OffsetMetrics(3)
    m.update(np.log(probs), targets)
    r = m.result()
    # Class 0 ranks the items a+ d- b+ c-, class 1 c+ b- d+ a-: AP 1/2 + 1/2 * 2/3 and
    # AUC 3/4 for both.
    assert r["mAP"] == pytest.approx(5 / 6, abs=1e-12)
    assert r["mROCAUC"] == pytest.approx(0.75, abs=1e-12)
    assert r["dprime"] == pytest.approx(np.sqrt(2) * 0.6744897501960817, rel=1e-12)
    assert r["accuracy_1"] == 0.5 and r["count"] == 4  # the accuracies are unchanged
    one = OffsetMetrics(3)
    one.update(np.log(probs[:1]), targets[:1])  # one item: AP 1 for its class, AUC undefined
    r1 = one.result()
    assert r1["mAP"] == 1.0 and np.isnan(r1["mROCAUC"]) and np.isnan(r1["dprime"])
    r0 = OffsetMetrics(3).result()
    assert r0["count"] == 0 and np.isnan(r0["mAP"]) and np.isnan(r0["mROCAUC"])
    text = json.dumps(json_values(r1), allow_nan=False)
    assert json.loads(text)["mROCAUC"] is None and json.loads(text)["mAP"] == 1.0


def test_offset_metrics_merge_equals_one_pass():
    rng = np.random.default_rng(0)
    logits, targets = rng.normal(size=(50, 21)).astype(np.float32), rng.integers(0, 21, 50)
    whole, a, b = OffsetMetrics(21), OffsetMetrics(21), OffsetMetrics(21)
    whole.update(logits, targets)
    a.update(logits[:20], targets[:20])
    b.update(logits[20:], targets[20:])
    a.merge(b)
    assert a.result() == whole.result()
    with pytest.raises(ValueError, match="cannot merge"):
        a.merge(OffsetMetrics(3))
    with pytest.raises(ValueError, match=r"expected \[B, 21\] logits"):
        whole.update(logits[:, :3], targets)


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
