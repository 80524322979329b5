"""Offset-classification metrics as the official `calc_cls_metrics` defines them.

`accuracy_1_tol1` ("Acc@1 ±1 class" in the paper) counts a prediction as correct when it
is the target class or one of its neighbours (clamped to the class range).
Accumulate over batches with `OffsetMetrics.update`, padded examples masked out.
"""
from __future__ import annotations

import dataclasses

import numpy as np


def topk_correct(logits: np.ndarray, targets: np.ndarray, k: int, tolerance: int = 0) -> np.ndarray:
    """`[B]` bool: the target is within `tolerance` classes of one of the top-k predictions."""
    logits = np.asarray(logits, np.float32)
    topk = np.argsort(-logits, axis=-1, kind="stable")[:, :k]
    return np.any(np.abs(topk - np.asarray(targets)[:, None]) <= tolerance, axis=-1)


@dataclasses.dataclass
class OffsetMetrics:
    num_classes: int
    count: int = 0
    correct: dict = dataclasses.field(default_factory=lambda: {"accuracy_1": 0, "accuracy_5": 0,
                                                               "accuracy_1_tol1": 0, "accuracy_5_tol1": 0})
    per_class_total: np.ndarray = None
    per_class_correct: np.ndarray = None

    def __post_init__(self) -> None:
        self.per_class_total = np.zeros(self.num_classes, np.int64)
        self.per_class_correct = np.zeros(self.num_classes, np.int64)

    def update(self, logits: np.ndarray, targets: np.ndarray, mask: np.ndarray | None = None) -> None:
        logits, targets = np.asarray(logits), np.asarray(targets).astype(np.int64)
        keep = np.ones(len(targets), bool) if mask is None else np.asarray(mask).astype(bool)
        logits, targets = logits[keep], targets[keep]
        k5 = min(5, self.num_classes)
        hits = {"accuracy_1": topk_correct(logits, targets, 1), "accuracy_5": topk_correct(logits, targets, k5),
                "accuracy_1_tol1": topk_correct(logits, targets, 1, 1),
                "accuracy_5_tol1": topk_correct(logits, targets, k5, 1)}
        for name, h in hits.items():
            self.correct[name] += int(h.sum())
        self.count += len(targets)
        np.add.at(self.per_class_total, targets, 1)
        np.add.at(self.per_class_correct, targets, hits["accuracy_1"].astype(np.int64))

    def result(self) -> dict:
        out = {name: c / max(self.count, 1) for name, c in self.correct.items()}
        seen = self.per_class_total > 0
        per_class = np.where(seen, self.per_class_correct / np.maximum(self.per_class_total, 1), np.nan)
        out["per_class_accuracy_1"] = [None if np.isnan(x) else float(x) for x in per_class]
        out["median_class_accuracy_1"] = float(np.nanmedian(per_class)) if seen.any() else float("nan")
        out["count"] = self.count
        return out
