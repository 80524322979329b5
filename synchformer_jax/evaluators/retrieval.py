"""Stage-I zero-shot "sync with shifts" precision (official `evaluate_on_sync_w_shifts`).

Per clip, the `S` (14) L2-normalised segment embeddings of each modality are cut into all
windows of `W` (8) consecutive segments (`S - W + 1` = 7 windows); each window is
flattened into one `W·D` vector, and the audio-window × video-window dot products form a
`[S-W+1, S-W+1]` matrix. A window is retrieved correctly when the arg-max of its row
(audio → video, `precision_a`) or column (video → audio, `precision_v`) is the window with
the same start; `precision` is the mean of the two. Each clip scores the mean over its
windows and the result is the mean over clips — every clip has the same number of windows,
so summing hits over windows and dividing once is the same number.

Inputs may be jax arrays; everything runs in numpy on the host. Accumulate over batches
with `SyncWithShiftsPrecision.update`, padded examples masked out.
"""
from __future__ import annotations

import dataclasses

import numpy as np

_EPS = 1e-12  # as `F.normalize`: guards all-zero embeddings (padding) against 0/0


def l2_normalize(x: np.ndarray, axis: int = -1) -> np.ndarray:
    norm = np.linalg.norm(x, axis=axis, keepdims=True)
    return x / np.maximum(norm, _EPS)


def window_similarities(video_emb: np.ndarray, audio_emb: np.ndarray, window: int = 8,
                        normalize: bool = True) -> np.ndarray:
    """`[B, N, N]` audio-window (rows) × video-window (columns) dot products, `N = S - W + 1`.

    `video_emb`, `audio_emb`: `[B, S, D]` per-segment embeddings.
    """
    v = np.asarray(video_emb, np.float64)
    a = np.asarray(audio_emb, np.float64)
    if v.shape != a.shape or v.ndim != 3:
        raise ValueError(f"expected two [B, S, D] arrays of one shape, got {v.shape} and {a.shape}")
    num_segments = v.shape[1]
    if not 1 <= window <= num_segments:
        raise ValueError(f"window {window} must be in [1, {num_segments}] (the number of segments)")
    if normalize:
        # Per segment, as in the official stage-I model, before the windows are concatenated.
        v, a = l2_normalize(v), l2_normalize(a)
    # The dot product of two concatenated windows is the sum of the segment dot products
    # along a diagonal of the segment similarity matrix: sim[i, j] = sum_k <a[i+k], v[j+k]>.
    # This avoids materialising the [B, N, W·D] window vectors.
    seg = np.einsum("bsd,btd->bst", a, v)
    n = num_segments - window + 1
    sim = np.zeros((v.shape[0], n, n))
    for k in range(window):
        sim += seg[:, k:k + n, k:k + n]
    return sim


def precision_per_clip(sim: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """`(precision_a [B], precision_v [B])` from `[B, N, N]` audio × video window similarities.

    Ties go to the lowest index (numpy's and torch's `argmax` both return the first maximum).
    """
    n = sim.shape[-1]
    target = np.arange(n)
    precision_a = np.mean(np.argmax(sim, axis=2) == target, axis=-1)  # row: an audio window
    precision_v = np.mean(np.argmax(sim, axis=1) == target, axis=-1)  # column: a video window
    return precision_a, precision_v


@dataclasses.dataclass
class SyncWithShiftsPrecision:
    """Accumulates the stage-I validation metric over batches (the stage-I early-stop key)."""
    window: int = 8
    # Checked when set (the official 14): a wrong crop would silently change the number of
    # windows and so the chance level. None accepts any S >= window.
    num_segments: int | None = None
    normalize: bool = True
    count: int = 0
    sum_precision_a: float = 0.0
    sum_precision_v: float = 0.0

    def update(self, video_emb: np.ndarray, audio_emb: np.ndarray, mask: np.ndarray | None = None) -> None:
        """`video_emb`, `audio_emb`: `[B, S, D]`; `mask`: `[B]`, False for padding."""
        video_emb, audio_emb = np.asarray(video_emb), np.asarray(audio_emb)
        if self.num_segments is not None and video_emb.shape[1] != self.num_segments:
            raise ValueError(f"expected {self.num_segments} segments, got shape {video_emb.shape}")
        keep = np.ones(len(video_emb), bool) if mask is None else np.asarray(mask).astype(bool)
        if not keep.any():
            return
        sim = window_similarities(video_emb[keep], audio_emb[keep], self.window, self.normalize)
        pa, pv = precision_per_clip(sim)
        self.sum_precision_a += float(pa.sum())
        self.sum_precision_v += float(pv.sum())
        self.count += int(keep.sum())

    def merge(self, other: "SyncWithShiftsPrecision") -> None:
        """Adds another accumulator's sums (e.g. another process's) into this one."""
        self.sum_precision_a += other.sum_precision_a
        self.sum_precision_v += other.sum_precision_v
        self.count += other.count

    def result(self) -> dict:
        if self.count == 0:
            nan = float("nan")
            return {"precision": nan, "precision_a": nan, "precision_v": nan, "count": 0}
        pa, pv = self.sum_precision_a / self.count, self.sum_precision_v / self.count
        return {"precision": 0.5 * (pa + pv), "precision_a": pa, "precision_v": pv, "count": self.count}


# The name the trainer's evaluation loop uses for the stage-I metric.
RetrievalMetrics = SyncWithShiftsPrecision
