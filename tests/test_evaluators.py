"""Stage-I retrieval precision and synchronizability metrics against hand-made cases."""
import importlib.util
import json
import sys

import jax.numpy as jnp
import numpy as np
import pytest

from synchformer_jax.evaluators import retrieval, synchronizability as sy

HAS_SKLEARN = importlib.util.find_spec("sklearn") is not None
HAS_MATPLOTLIB = importlib.util.find_spec("matplotlib") is not None


def _normed(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


# --------------------------------------------------------------------------- retrieval

def _brute_force_precision(v, a, window):
    """The official procedure spelled out: normalise, concatenate windows, 7x7 matrix."""
    v, a = _normed(v.astype(np.float64)), _normed(a.astype(np.float64))
    pas, pvs = [], []
    for vc, ac in zip(v, a):
        n = len(vc) - window + 1
        vw = np.stack([vc[i:i + window].reshape(-1) for i in range(n)])
        aw = np.stack([ac[i:i + window].reshape(-1) for i in range(n)])
        sim = aw @ vw.T
        pas.append(np.mean(sim.argmax(1) == np.arange(n)))
        pvs.append(np.mean(sim.argmax(0) == np.arange(n)))
    return np.mean(pas), np.mean(pvs)


def test_retrieval_identical_embeddings_is_perfect():
    rng = np.random.default_rng(0)
    v = rng.normal(size=(5, 14, 32))
    m = retrieval.SyncWithShiftsPrecision(num_segments=14)
    m.update(v, v + 0.05 * rng.normal(size=v.shape))
    res = m.result()
    assert res == {"precision": 1.0, "precision_a": 1.0, "precision_v": 1.0, "count": 5}


def test_retrieval_unrelated_embeddings_are_near_chance():
    rng = np.random.default_rng(1)
    v, a = rng.normal(size=(64, 14, 32)), rng.normal(size=(64, 14, 32))
    m = retrieval.SyncWithShiftsPrecision()
    m.update(v, a)
    # Chance is 1/7; overlapping windows correlate neighbours, so allow some slack.
    assert m.result()["precision"] < 0.35


def test_retrieval_hand_computed_tie():
    # S=3, W=2: video e0,e1,e2; audio e0,e0,e2. Audio windows (e0,e0), (e0,e2); video
    # windows (e0,e1), (e1,e2). sim = [[1, 0], [1, 1]]: row 1 ties and argmax picks the
    # first (wrong) window -> precision_a 1/2; columns [1,1]->0 and [0,1]->1 -> precision_v 1.
    eye = np.eye(3)
    v = eye[None, [0, 1, 2]]
    a = eye[None, [0, 0, 2]]
    sim = retrieval.window_similarities(v, a, window=2)
    np.testing.assert_allclose(sim[0], [[1, 0], [1, 1]])
    m = retrieval.SyncWithShiftsPrecision(window=2, num_segments=3)
    m.update(v, a)
    assert m.result() == {"precision": 0.75, "precision_a": 0.5, "precision_v": 1.0, "count": 1}


def test_retrieval_matches_concatenated_windows_and_ignores_scale():
    rng = np.random.default_rng(2)
    v = rng.normal(size=(6, 14, 8))
    a = v + 1.5 * rng.normal(size=v.shape)  # noisy enough for partial, non-trivial precision
    want_a, want_v = _brute_force_precision(v, a, 8)
    m = retrieval.SyncWithShiftsPrecision()
    m.update(3.0 * v, 0.2 * a)  # per-segment normalisation makes the scale irrelevant
    res = m.result()
    assert 0.0 < res["precision"] < 1.0
    assert res["precision_a"] == pytest.approx(want_a)
    assert res["precision_v"] == pytest.approx(want_v)


def test_retrieval_mask_batches_and_jax_inputs():
    rng = np.random.default_rng(3)
    v = rng.normal(size=(8, 14, 16)).astype(np.float32)
    a = (v + 1.0 * rng.normal(size=v.shape)).astype(np.float32)
    whole = retrieval.SyncWithShiftsPrecision()
    whole.update(v[:6], a[:6])
    # Two batches, the second padded with two garbage clips that the mask removes.
    parts = retrieval.SyncWithShiftsPrecision()
    parts.update(jnp.asarray(v[:4]), jnp.asarray(a[:4]))
    garbage = rng.normal(size=(2, 14, 16)).astype(np.float32)
    parts.update(jnp.asarray(np.concatenate([v[4:6], garbage])),
                 jnp.asarray(np.concatenate([a[4:6], -garbage])), np.array([1, 1, 0, 0]))
    assert parts.result() == pytest.approx(whole.result())
    # Merging two processes' accumulators equals one accumulator over both.
    p0, p1 = retrieval.SyncWithShiftsPrecision(), retrieval.SyncWithShiftsPrecision()
    p0.update(v[:3], a[:3])
    p1.update(v[3:6], a[3:6])
    p0.merge(p1)
    assert p0.result() == pytest.approx(whole.result())


def test_retrieval_trainer_name():
    # train.evaluate builds the stage-I metric under this name and early-stops on "precision".
    assert retrieval.RetrievalMetrics is retrieval.SyncWithShiftsPrecision
    assert "precision" in retrieval.RetrievalMetrics().result()


def test_retrieval_configurable_and_checked():
    rng = np.random.default_rng(4)
    v = rng.normal(size=(2, 10, 4))
    m = retrieval.SyncWithShiftsPrecision(window=4, num_segments=10)
    m.update(v, v)
    assert m.result()["precision"] == 1.0
    with pytest.raises(ValueError, match="segments"):
        retrieval.SyncWithShiftsPrecision(num_segments=14).update(v, v)  # 10 segments, 14 expected
    with pytest.raises(ValueError, match="window"):
        retrieval.window_similarities(v, v, window=11)
    assert np.isnan(retrieval.SyncWithShiftsPrecision().result()["precision"])


# --------------------------------------------------------------------------- AUC / ROC

def test_auc_hand_cases():
    t = np.array([0, 0, 1, 1])
    assert sy.roc_auc(np.array([0.1, 0.2, 0.8, 0.9]), t) == 1.0
    assert sy.roc_auc(np.array([0.9, 0.8, 0.2, 0.1]), t) == 0.0
    assert sy.roc_auc(np.full(4, 0.3), t) == 0.5
    # sklearn's documented example.
    assert sy.roc_auc(np.array([0.1, 0.4, 0.35, 0.8]), t) == pytest.approx(0.75)
    # One tie between classes counts 1/2: pairs (.5,.5)=.5, (.5,.1)=1, (.9,.5)=1, (.9,.1)=1.
    assert sy.roc_auc(np.array([0.5, 0.5, 0.9, 0.1]), np.array([1, 0, 1, 0])) == pytest.approx(0.875)
    assert np.isnan(sy.roc_auc(np.array([0.1, 0.9]), np.array([1, 1])))


def test_roc_auc_counts_pairs_ties_as_half():
    """Against the definition, pair by pair, on scores with many ties."""
    rng = np.random.default_rng(0)
    for _ in range(20):
        scores, t = rng.integers(0, 4, 30).astype(float), rng.integers(0, 2, 30).astype(bool)
        if t.all() or not t.any():
            continue
        diff = scores[t][:, None] - scores[~t][None, :]
        want = (np.sum(diff > 0) + 0.5 * np.sum(diff == 0)) / diff.size
        assert sy.roc_auc(scores, t) == pytest.approx(want, abs=1e-12)


def test_roc_curve_hand_case():
    curve = sy.roc_curve(np.array([0.1, 0.4, 0.35, 0.8]), np.array([0, 0, 1, 1]))
    np.testing.assert_allclose(curve["thresholds"], [np.inf, 0.8, 0.4, 0.35, 0.1])
    np.testing.assert_allclose(curve["tpr"], [0, 0.5, 0.5, 1, 1])
    np.testing.assert_allclose(curve["fpr"], [0, 0, 0.5, 0.5, 1])
    # The trapezoid area under the points is the rank AUC.
    assert np.trapezoid(curve["tpr"], curve["fpr"]) == pytest.approx(0.75)


@pytest.mark.skipif(not HAS_SKLEARN, reason="scikit-learn (not a dependency) is not installed")
def test_auc_and_curve_match_sklearn_with_ties():
    from sklearn.metrics import roc_auc_score, roc_curve

    rng = np.random.default_rng(5)
    scores = np.round(rng.uniform(size=300), 1)  # coarse rounding: many ties across classes
    targets = (rng.uniform(size=300) < 0.3 + 0.4 * scores).astype(int)
    assert sy.roc_auc(scores, targets) == pytest.approx(roc_auc_score(targets, scores), abs=1e-12)
    fpr, tpr, thr = roc_curve(targets, scores, drop_intermediate=False)
    curve = sy.roc_curve(scores, targets)
    np.testing.assert_allclose(curve["fpr"], fpr)
    np.testing.assert_allclose(curve["tpr"], tpr)
    np.testing.assert_allclose(curve["thresholds"][1:], thr[1:])
    # The official number: mean of the two one-vs-rest AUCs of the softmax probabilities.
    logits = rng.normal(size=(300, 2))
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    official = roc_auc_score(targets, probs[:, 1]) / 2 + roc_auc_score(1 - targets, probs[:, 0]) / 2
    m = sy.SynchronizabilityMetrics()
    m.update(logits, targets)
    assert m.result()["roc_auc"] == pytest.approx(official, abs=1e-12)


def test_synchronizability_metrics_accumulate_with_mask():
    # p(class 1) from logits: item 0 0.88 (t=1 ok), item 1 0.27 (t=0 ok), item 2 0.73 (t=0 wrong),
    # item 3 0.5 exactly -> not > 0.5, predicted 0 (t=1 wrong); item 4 is padding.
    logits = np.array([[0.0, 2.0], [1.0, 0.0], [0.0, 1.0], [0.5, 0.5], [0.0, 9.0]])
    targets = np.array([1, 0, 0, 1, 0])
    m = sy.SynchronizabilityMetrics()
    m.update(logits[:2], targets[:2])
    m.update(jnp.asarray(logits[2:]), jnp.asarray(targets[2:]), np.array([True, True, False]))
    res = m.result()
    assert res["count"] == 4 and res["num_synchronizable"] == 2
    assert res["accuracy_1"] == 0.5
    # Positives 0.88, 0.5; negatives 0.27, 0.73: pairs (.88>.27), (.88>.73), (.5>.27), (.5<.73).
    assert res["roc_auc"] == pytest.approx(0.75)
    assert res["roc_curve"]["tpr"][-1] == 1.0 and res["roc_curve"]["fpr"][0] == 0.0
    assert res["roc_curve"]["thresholds"][0] is None  # +inf, kept strict-JSON
    json.dumps(res, allow_nan=False)
    with pytest.raises(ValueError):
        m.update(logits[:1], np.array([2]))


@pytest.mark.skipif(not HAS_MATPLOTLIB, reason="matplotlib (the `plots` extra) is not installed")
def test_save_roc_png(tmp_path):
    m = sy.SynchronizabilityMetrics()
    rng = np.random.default_rng(6)
    targets = rng.integers(0, 2, size=50)
    m.update(np.stack([np.zeros(50), targets + rng.normal(size=50)], 1), targets)
    path = tmp_path / "roc.png"
    m.save_roc_png(str(path))
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_save_roc_png_without_matplotlib_says_so(tmp_path, monkeypatch):
    # A None entry in sys.modules makes the import fail as if the package were absent.
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    monkeypatch.setitem(sys.modules, "matplotlib.backends.backend_agg", None)
    with pytest.raises(ImportError, match=r"synchformer-jax\[plots\]"):
        sy.save_roc_png(str(tmp_path / "x.png"), np.array([0, 1]), np.array([0, 1]), 0.5)


# --------------------------------------------------------------------------- combined evaluation

def _onehot_logits(preds, num_classes=21):
    logits = np.zeros((len(preds), num_classes), np.float32)
    logits[np.arange(len(preds)), preds] = 5.0
    return logits


def test_offset_accuracy_at_sync_thresholds():
    # item 0: confident, synchronizable, offset right; item 1: accepted at 0.5, offset wrong
    # by one class; item 2: NOT synchronizable but accepted at 0.5 with target == pred (the
    # official script must count it wrong); item 3: p(sync) exactly 0.5, which does not
    # exceed the lowest threshold, so it is rejected everywhere.
    logits = _onehot_logits([10, 4, 7, 0])
    targets = np.array([10, 5, 7, 0])
    p_sync = np.array([0.95, 0.7, 0.6, 0.5])
    sync_t = np.array([1, 1, 0, 1])
    out = sy.offset_accuracy_at_sync_thresholds(logits, targets, p_sync, sync_t, thresholds=(0.5, 0.9, 0.99))
    assert set(out) == {0.5, 0.9, 0.99}
    assert out[0.5]["count"] == 3 and out[0.5]["fraction_kept"] == 0.75
    assert out[0.5]["accuracy_1"] == pytest.approx(1 / 3)
    assert out[0.5]["accuracy_1_tol1"] == pytest.approx(2 / 3)  # item 2's target is 5 classes off
    assert out[0.9]["count"] == 1 and out[0.9]["accuracy_1"] == 1.0
    assert out[0.99]["count"] == 0 and out[0.99]["fraction_kept"] == 0.0
    # Without sync targets nothing is rewritten: item 2 is right.
    plain = sy.offset_accuracy_at_sync_thresholds(logits, targets, p_sync)
    assert plain[0.5]["accuracy_1"] == pytest.approx(2 / 3)
    assert list(plain) == list(sy.SYNC_THRESHOLDS)
    # Near the class range's end the wrong target wraps: pred 18 -> 2.
    wrap = sy.offset_accuracy_at_sync_thresholds(_onehot_logits([18]), np.array([18]), np.array([0.9]),
                                                 np.array([0]), thresholds=(0.5,))
    assert wrap[0.5]["accuracy_1"] == 0.0 and wrap[0.5]["accuracy_1_tol1"] == 0.0


def test_combined_accumulator_matches_function():
    rng = np.random.default_rng(7)
    off_logits = rng.normal(size=(10, 21))
    off_t = rng.integers(0, 21, size=10)
    sync_logits = rng.normal(size=(10, 2)) * 2
    sync_t = rng.integers(0, 2, size=10)
    mask = np.array([1] * 8 + [0] * 2, bool)
    acc = sy.CombinedSyncOffsetMetrics()
    acc.update(off_logits[:5], off_t[:5], sync_logits[:5], sync_t[:5])
    acc.update(off_logits[5:], off_t[5:], sync_logits[5:], sync_t[5:], mask[5:])
    want = sy.offset_accuracy_at_sync_thresholds(off_logits[:8], off_t[:8], sy.softmax_p1(sync_logits[:8]),
                                                 sync_t[:8])
    got = acc.result()
    assert got.keys() == want.keys()
    for thr in want:
        assert got[thr]["accuracy_1"] == want[thr]["accuracy_1"]
        assert got[thr]["count"] == want[thr]["count"]
