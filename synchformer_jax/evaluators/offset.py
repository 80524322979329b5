"""Offset-classification metrics as the official `scripts/train_utils.calc_cls_metrics` defines them.

On the gathered logits cast to fp32 and their float32 softmax (`torch.softmax` officially):

* `accuracy_1`, `accuracy_5`: the target is among the top-k classes as
  `sklearn.metrics.top_k_accuracy_score` ranks them: a stable ascending sort of the
  probabilities read from the end, so that among exactly equal probabilities the higher
  class id ranks first. Equal probabilities come from equal logits, and also from logits
  that differ: the fp32 softmax is 0 for every class more than ~104 below the top logit,
  and all of those tie. With two classes sklearn's binary rule: class 1 when p(1) > 0.5.
* `accuracy_1_tol1`, `accuracy_5_tol1` ("Acc@1 ±1 class" in the paper): a prediction also
  counts when it is a neighbour of the target (clamped to the class range). The official code
  ranks these differently from the accuracies above: `torch.topk` of the fp32 logits, so
  classes that the softmax ties at 0 keep their logit order; so here (`top_logit_classes`).
  Among exactly equal logits torch's order is unspecified (on CPU neither the lower nor the
  higher id first); ours puts the lower id first. As officially, with ties in the top k
  `accuracy_k_tol1` can fall below `accuracy_k`.
* `per_class_accuracy_1` (None for a class absent from the targets) and their median
  `median_class_accuracy_1` over the classes present (the official `accuracy_1_median`
  counts an absent class as 0).
* `mAP`, `mROCAUC`: one-vs-rest, the mean over classes of `average_precision_score` and
  `roc_auc_score` of the class's probability (`average_precision`, `roc_auc` below).
  The official code logs placeholders (mAP 0.0, mROCAUC 0.5, dprime 0.0) as soon as one
  class is absent from the targets; sklearn warns (AP 0 without positives) or raises (AUC
  with one class). Here each mean is over the classes where the metric is defined (AP: the
  class is among the targets; ROC-AUC: so is another class), as torchmetrics' macro
  averages skip undefined classes, and NaN (null in the JSON) when there is none. With
  every class present, as in the README protocols, these are the official numbers.
* `dprime`: `sqrt(2) * Phi^-1(mROCAUC)` (scipy's `norm.ppf`): +inf at AUC 1, -inf at 0.

Accumulate over batches with `OffsetMetrics.update`, padded examples masked out; AP and
ROC-AUC need every probability, so they are kept (float32 `[N, C]`: 30 MB for
VGGSound-Sparse's 25 rounds).
"""
from __future__ import annotations

import dataclasses
import math
import statistics

import numpy as np


def softmax_fp32(logits: np.ndarray) -> np.ndarray:
    """`[B, C]` float32 softmax: the max subtracted, exponentiated, divided by the sum, as
    `torch.softmax` computes it in fp32 (equal up to rounding, with the same zeros)."""
    x = np.asarray(logits, np.float32)
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def top_classes(probs: np.ndarray, k: int) -> np.ndarray:
    """`[B, k]` class ids, best first, as `sklearn.metrics.top_k_accuracy_score` ranks `probs`
    `[B, C]`: exactly equal probabilities rank the higher class id first."""
    probs = np.asarray(probs)
    if probs.shape[-1] == 2:
        # sklearn's binary branch (the official code passes it p(class 1) alone): class 1
        # only when p(1) > 0.5, so that a tie at 0.5 goes to class 0.
        first = (probs[:, 1] > 0.5).astype(np.int64)
        return np.stack([first, 1 - first], axis=-1)[:, :k]
    return np.argsort(probs, axis=-1, kind="stable")[:, ::-1][:, :k]


def top_logit_classes(logits: np.ndarray, k: int) -> np.ndarray:
    """`[B, k]` class ids, best first, by fp32 `logits` `[B, C]` (the official tolerance
    accuracies' `torch.topk`); exactly equal logits rank the lower class id first."""
    return np.argsort(-np.asarray(logits, np.float32), axis=-1, kind="stable")[:, :k]


def topk_correct(logits: np.ndarray, targets: np.ndarray, k: int, tolerance: int = 0) -> np.ndarray:
    """`[B]` bool: the target is within `tolerance` classes of one of the top-k predictions,
    ranked as the official metric with this tolerance ranks them: `top_classes` of the fp32
    softmax without a tolerance, `top_logit_classes` with one."""
    top = top_logit_classes(logits, k) if tolerance else top_classes(softmax_fp32(logits), k)
    return np.any(np.abs(top - np.asarray(targets)[:, None]) <= tolerance, axis=-1)


def _ranked_runs(scores: np.ndarray, positive: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Cumulative positives and items at the end of each run of equal scores, scores in
    decreasing order: a threshold accepts all of a tie or none of it."""
    order = np.argsort(scores, kind="stable")[::-1]
    s = scores[order]
    last = np.flatnonzero(np.r_[s[1:] != s[:-1], True])
    return np.cumsum(positive[order], dtype=np.int64)[last], last + 1


def average_precision(scores: np.ndarray, positive: np.ndarray) -> float:
    """`sklearn.metrics.average_precision_score`: the sum over decreasing thresholds (one per
    distinct score) of the recall gained there times the precision there, no interpolation.
    NaN without positives (sklearn warns and gives 0)."""
    scores, positive = np.asarray(scores), np.asarray(positive).astype(bool)
    n_pos = int(positive.sum())
    if n_pos == 0:
        return float("nan")
    tps, seen = _ranked_runs(scores, positive)
    return float(np.sum(np.diff(tps, prepend=0) / n_pos * (tps / seen)))


def roc_auc(scores: np.ndarray, positive: np.ndarray) -> float:
    """`sklearn.metrics.roc_auc_score` of a binary problem: the fraction of (positive,
    negative) pairs the scores order correctly, a tie counting 1/2 (the area under the ROC
    curve's trapezoids). NaN unless both classes are present (sklearn raises)."""
    scores, positive = np.asarray(scores), np.asarray(positive).astype(bool)
    n_pos = int(positive.sum())
    n_neg = len(positive) - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    tps, seen = _ranked_runs(scores, positive)
    fps = seen - tps
    # Each run's positives beat the negatives below the run and tie with those in it.
    pairs = np.diff(tps, prepend=0) * ((n_neg - fps) + 0.5 * np.diff(fps, prepend=0))
    return float(np.sum(pairs) / (n_pos * n_neg))


def dprime(auc: float) -> float:
    """`sqrt(2) * Phi^-1(auc)` (d' of equal-variance Gaussian scores with this AUC), as
    `scipy.stats.norm().ppf(auc) * np.sqrt(2)`: ±inf at 1 and 0, NaN for NaN."""
    if not 0.0 < auc < 1.0:
        return float("nan") if math.isnan(auc) else math.copysign(math.inf, auc - 0.5)
    return math.sqrt(2.0) * statistics.NormalDist().inv_cdf(auc)


@dataclasses.dataclass
class OffsetMetrics:
    num_classes: int
    count: int = 0
    correct: dict = dataclasses.field(default_factory=lambda: {"accuracy_1": 0, "accuracy_5": 0,
                                                               "accuracy_1_tol1": 0, "accuracy_5_tol1": 0})
    per_class_total: np.ndarray = None
    per_class_correct: np.ndarray = None
    probs: list = dataclasses.field(default_factory=list)    # [B, C] float32 softmax per update
    targets: list = dataclasses.field(default_factory=list)  # [B] int64 per update

    def __post_init__(self) -> None:
        self.per_class_total = np.zeros(self.num_classes, np.int64)
        self.per_class_correct = np.zeros(self.num_classes, np.int64)

    def update(self, logits: np.ndarray, targets: np.ndarray, mask: np.ndarray | None = None) -> None:
        """`logits`: `[B, C]`; `targets`, `mask`: `[B]`."""
        logits, targets = np.asarray(logits, np.float32), np.asarray(targets).astype(np.int64)
        if logits.ndim != 2 or logits.shape[-1] != self.num_classes:
            raise ValueError(f"expected [B, {self.num_classes}] logits, got {logits.shape}")
        keep = np.ones(len(targets), bool) if mask is None else np.asarray(mask).astype(bool)
        logits, targets = logits[keep], targets[keep]
        probs = softmax_fp32(logits)
        k5 = min(5, self.num_classes)
        hit = top_classes(probs, k5) == targets[:, None]
        near = np.abs(top_logit_classes(logits, k5) - targets[:, None]) <= 1
        hits = {"accuracy_1": hit[:, 0], "accuracy_5": np.any(hit, axis=-1),
                "accuracy_1_tol1": near[:, 0], "accuracy_5_tol1": np.any(near, axis=-1)}
        for name, h in hits.items():
            self.correct[name] += int(h.sum())
        self.count += len(targets)
        np.add.at(self.per_class_total, targets, 1)
        np.add.at(self.per_class_correct, targets, hits["accuracy_1"].astype(np.int64))
        self.probs.append(probs)
        self.targets.append(targets)

    def merge(self, other: "OffsetMetrics") -> None:
        """Adds `other`'s examples (another host's or shard's) to these."""
        if other.num_classes != self.num_classes:
            raise ValueError(f"cannot merge metrics of {other.num_classes} classes into {self.num_classes}")
        self.count += other.count
        for name, c in other.correct.items():
            self.correct[name] += c
        self.per_class_total += other.per_class_total
        self.per_class_correct += other.per_class_correct
        self.probs.extend(other.probs)
        self.targets.extend(other.targets)

    def result(self) -> dict:
        out = {name: c / max(self.count, 1) for name, c in self.correct.items()}
        seen = self.per_class_total > 0
        per_class = np.where(seen, self.per_class_correct / np.maximum(self.per_class_total, 1), np.nan)
        out["per_class_accuracy_1"] = [None if np.isnan(x) else float(x) for x in per_class]
        out["median_class_accuracy_1"] = float(np.nanmedian(per_class)) if seen.any() else float("nan")
        out["count"] = self.count
        probs = np.concatenate(self.probs) if self.probs else np.zeros((0, self.num_classes), np.float32)
        targets = np.concatenate(self.targets) if self.targets else np.zeros(0, np.int64)
        ap = [average_precision(probs[:, c], targets == c) for c in range(self.num_classes)]
        auc = [roc_auc(probs[:, c], targets == c) for c in range(self.num_classes)]
        out["mAP"] = _nanmean(ap)
        out["mROCAUC"] = _nanmean(auc)
        out["dprime"] = dprime(out["mROCAUC"])
        return out


def _nanmean(values: list) -> float:
    """The mean of the values that are not NaN; NaN when there is none (without numpy's warning)."""
    values = np.asarray(values, np.float64)
    defined = ~np.isnan(values)
    return float(values[defined].mean()) if defined.any() else float("nan")
