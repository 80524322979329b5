"""Synchronizability metrics (official `scripts/test_syncability.py`) and the combined
"offset accuracy among confidently synchronizable items" evaluation (paper Fig. 4 right).

* `accuracy_1`: p(class 1 = synchronizable) > 0.5 against `sync_target` — the same as the
  arg-max of the two softmax probabilities (a tie at 0.5 goes to class 0 in both).
* `roc_auc`: the binary ROC-AUC of p(class 1). The official number is the mean of the two
  one-vs-rest AUCs on the softmax probabilities; with two classes p(class 0) = 1 - p(class 1)
  ranks the items in the reverse order with the roles of the classes swapped, so both
  one-vs-rest AUCs equal this one (up to float rounding of near-ties).
  Computed here from ranks (Mann-Whitney U) with tied scores given their mean rank, which
  is what `sklearn.metrics.roc_auc_score` computes (its trapezoids credit a tie with 1/2);
  scikit-learn is deliberately not a dependency.
* the ROC curve points, one per distinct score (`roc_curve`), and a PNG of it
  (`save_roc_png`, needs matplotlib from the `plots` extra).

Accumulate over batches with `SynchronizabilityMetrics.update`, padded examples masked out.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from synchformer_jax.evaluators.offset import OffsetMetrics, roc_auc  # binary ROC-AUC, ties count 1/2

SYNC_THRESHOLDS = (0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99)
# The official combined evaluation gives an item wrongly accepted as synchronizable the
# target (pred + 5) mod num_classes, a class 5 away from the prediction, so that it counts
# as wrong even under the ±1-class tolerance.
_WRONG_TARGET_SHIFT = 5


def softmax_p1(logits: np.ndarray) -> np.ndarray:
    """p(class 1) of `[B, 2]` logits, in float64 (the official script casts to fp32 first;
    float64 keeps close scores from collapsing into spurious ties)."""
    logits = np.asarray(logits, np.float64)
    if logits.ndim != 2 or logits.shape[1] != 2:
        raise ValueError(f"expected [B, 2] logits, got {logits.shape}")
    # softmax over two classes is a sigmoid of the logit difference; exp overflowing to
    # inf gives the correct limit 0.
    with np.errstate(over="ignore"):
        return 1.0 / (1.0 + np.exp(logits[:, 0] - logits[:, 1]))


def roc_curve(scores: np.ndarray, targets: np.ndarray) -> dict:
    """ROC points as `sklearn.metrics.roc_curve(drop_intermediate=False)` gives them:
    `thresholds` decreasing (the first is +inf: nothing accepted), one point per distinct
    score, an item accepted when `score >= threshold`; `fpr`/`tpr` are NaN for a class
    that is absent."""
    scores = np.asarray(scores, np.float64)
    targets = np.asarray(targets).astype(bool)
    order = np.argsort(-scores, kind="stable")
    s, t = scores[order], targets[order]
    # The last item of each run of equal scores: all of a tie is accepted together.
    last = np.flatnonzero(np.r_[s[1:] != s[:-1], True]) if len(s) else np.zeros(0, int)
    tps = np.r_[0, np.cumsum(t)[last]]
    fps = np.r_[0, np.cumsum(~t)[last]]
    with np.errstate(invalid="ignore", divide="ignore"):
        tpr = tps / tps[-1] if tps[-1] > 0 else np.full(len(tps), np.nan)
        fpr = fps / fps[-1] if fps[-1] > 0 else np.full(len(fps), np.nan)
    return {"fpr": fpr, "tpr": tpr, "thresholds": np.r_[np.inf, s[last]]}


def save_roc_png(path: str, fpr: np.ndarray, tpr: np.ndarray, auc: float, title: str = "ROC") -> None:
    """A PNG of the ROC curve with the chance diagonal and the AUC in the title."""
    try:
        # The object-oriented API without pyplot: no global figure state and no GUI backend
        # is touched, so this is safe from worker threads and headless hosts.
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as e:  # matplotlib is only in the `plots` extra
        raise ImportError("saving the ROC curve needs matplotlib: pip install 'synchformer-jax[plots]'") from e
    fig = Figure(figsize=(4.5, 4.5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    ax.plot(fpr, tpr, lw=2, label="ROC")
    ax.plot([0, 1], [0, 1], ls="--", color="gray", lw=1, label="chance")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.01)
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_title(f"{title} (AUC = {auc:.3f})")
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, format="png")


@dataclasses.dataclass
class SynchronizabilityMetrics:
    """Accumulates 2-way synchronizability logits; AUC needs every score, so they are kept."""
    scores: list = dataclasses.field(default_factory=list)   # p(class 1) per batch, float64
    targets: list = dataclasses.field(default_factory=list)  # sync_target per batch, bool

    def update(self, logits: np.ndarray, sync_targets: np.ndarray, mask: np.ndarray | None = None) -> None:
        """`logits`: `[B, 2]`; `sync_targets`: `[B]`, 1 = synchronizable; `mask`: `[B]`."""
        p1 = softmax_p1(logits)
        targets = np.asarray(sync_targets).astype(np.int64)
        if np.any((targets != 0) & (targets != 1)):
            raise ValueError(f"sync targets must be 0 or 1, got {np.unique(targets)}")
        keep = np.ones(len(targets), bool) if mask is None else np.asarray(mask).astype(bool)
        self.scores.append(p1[keep])
        self.targets.append(targets[keep].astype(bool))

    def merge(self, other: "SynchronizabilityMetrics") -> None:
        self.scores.extend(other.scores)
        self.targets.extend(other.targets)

    def _arrays(self) -> tuple[np.ndarray, np.ndarray]:
        if not self.scores:
            return np.zeros(0), np.zeros(0, bool)
        return np.concatenate(self.scores), np.concatenate(self.targets)

    def roc_curve(self) -> dict:
        return roc_curve(*self._arrays())

    def result(self) -> dict:
        scores, targets = self._arrays()
        count = len(scores)
        curve = roc_curve(scores, targets)
        return {
            "accuracy_1": float(np.mean((scores > 0.5) == targets)) if count else float("nan"),
            "roc_auc": roc_auc(scores, targets),
            "count": count,
            "num_synchronizable": int(targets.sum()),
            # Non-finite entries (the +inf first threshold, NaN rates with one class) become
            # None so that the result stays strict JSON for the metrics log.
            "roc_curve": {k: [float(x) if np.isfinite(x) else None for x in v] for k, v in curve.items()},
        }

    def save_roc_png(self, path: str, title: str = "Synchronizability ROC") -> None:
        scores, targets = self._arrays()
        curve = roc_curve(scores, targets)
        save_roc_png(path, curve["fpr"], curve["tpr"], roc_auc(scores, targets), title)


def offset_accuracy_at_sync_thresholds(offset_logits: np.ndarray, offset_targets: np.ndarray,
                                       p_sync: np.ndarray, sync_targets: np.ndarray | None = None,
                                       thresholds=SYNC_THRESHOLDS) -> dict:
    """Offset metrics over the items the synchronizability model accepts, per threshold.

    `offset_logits`: `[B, C]` from the offset model on the same inputs; `offset_targets`:
    `[B]`; `p_sync`: `[B]` p(synchronizable); `sync_targets`: `[B]` or None. An item is
    kept when `p_sync > threshold`. When `sync_targets` is given, kept items that are not
    synchronizable get the wrong target (pred + 5) mod C, as in the official script: their
    "true" offset is meaningless, and accepting them must cost accuracy.

    Returns `{threshold: {"count", "fraction_kept", accuracy_1, accuracy_1_tol1, ...}}`
    (the `OffsetMetrics` keys; accuracies 0 with `count` 0 when nothing passes).
    """
    offset_logits = np.asarray(offset_logits, np.float32)
    num_classes = offset_logits.shape[-1]
    targets = np.asarray(offset_targets).astype(np.int64)
    p_sync = np.asarray(p_sync, np.float64)
    if sync_targets is not None:
        pred = np.argmax(offset_logits, axis=-1)
        wrong = (pred + _WRONG_TARGET_SHIFT) % num_classes
        targets = np.where(np.asarray(sync_targets).astype(bool), targets, wrong)
    out = {}
    for thr in thresholds:
        keep = p_sync > thr
        metrics = OffsetMetrics(num_classes)
        metrics.update(offset_logits, targets, keep)
        res = metrics.result()
        res["fraction_kept"] = float(keep.mean()) if len(keep) else float("nan")
        out[float(thr)] = res
    return out


@dataclasses.dataclass
class CombinedSyncOffsetMetrics:
    """Accumulates offset and synchronizability predictions on the same items for
    `offset_accuracy_at_sync_thresholds`."""
    thresholds: tuple = SYNC_THRESHOLDS
    offset_logits: list = dataclasses.field(default_factory=list)
    offset_targets: list = dataclasses.field(default_factory=list)
    p_sync: list = dataclasses.field(default_factory=list)
    sync_targets: list = dataclasses.field(default_factory=list)

    def update(self, offset_logits: np.ndarray, offset_targets: np.ndarray, sync_logits: np.ndarray,
               sync_targets: np.ndarray, mask: np.ndarray | None = None) -> None:
        """`offset_logits`: `[B, C]`; `offset_targets`, `sync_targets`, `mask`: `[B]`;
        `sync_logits`: `[B, 2]`."""
        keep = np.ones(len(offset_targets), bool) if mask is None else np.asarray(mask).astype(bool)
        self.offset_logits.append(np.asarray(offset_logits, np.float32)[keep])
        self.offset_targets.append(np.asarray(offset_targets).astype(np.int64)[keep])
        self.p_sync.append(softmax_p1(sync_logits)[keep])
        self.sync_targets.append(np.asarray(sync_targets).astype(bool)[keep])

    def result(self) -> dict:
        if not self.offset_logits:
            return {}
        return offset_accuracy_at_sync_thresholds(
            np.concatenate(self.offset_logits), np.concatenate(self.offset_targets),
            np.concatenate(self.p_sync), np.concatenate(self.sync_targets), self.thresholds)
