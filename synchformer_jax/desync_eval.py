"""av-benchmark's DeSync from files: a folder of videos, a folder of generated audio, one number.

av-benchmark (github.com/hkchengrex/av-benchmark, the metric video-to-audio papers report)
computes DeSync in two steps, `extract_video.py --audio_length L` and `evaluate.py
--audio_length L`. This module reproduces what they read from the files; the model side
(segments, windows, argmax, mean |offset|) is `inference.DesyncScorer`:

* video: the `.mp4` files of the video folder, decoded through libavfilter's
  `fps=25,format=rgb24` at the source resolution (av-benchmark's torio decoder builds that
  graph; here PyAV's own libavfilter runs it, so which source frame lands on each
  25-fps frame is FFmpeg's choice by construction, not a re-implementation of it). The
  first `int(25 L)` frames; the audio streams of the videos are never read, so silent
  and video-only files work. Then the 224-px bicubic resize and centre crop
  (`inference.desync_resize_crop`) and the float32 normalisation.
* audio: the `.wav` / `.flac` files of the audio folder, as float in [-1, 1] the way
  `torchaudio.load` scales integer samples, averaged over channels, resampled to 16 kHz
  with torchaudio's default sinc-Hann filter (`input.resample`), the first `int(16000 L)`
  samples.
* pairs: a video and an audio file belong together when their names without extension
  (stems) are equal (av-benchmark keys both caches by stem); several audio files may
  name one video (`names="av-benchmark"`: audio stems first go through av-benchmark's
  VGGSound-specific renaming, `avbench_clip_name`).
* exclusions: a file that cannot be read, or is shorter than L, is left out of the mean
  and reported (av-benchmark logs and drops it); files without a partner likewise.
* the number: the mean over the scored pairs of the mean |offset| of their two windows
  (`[:14]` and `[-14:]` of the S segments) = av-benchmark's mean over all windows.

Matmuls run at full float32 precision (`jax.default_matmul_precision("highest")`) and the
model in float32: av-benchmark runs PyTorch in float32 with TF32 matmuls off, while JAX on
a GPU multiplies float32 matrices in TF32 by default (`jax.image.resize`, under the
224-px resize, asks for the highest precision itself).
"""
from __future__ import annotations

import dataclasses
import os
import pathlib
from typing import Any, Callable, Iterable, Optional, Sequence

import numpy as np

from synchformer_jax import media
from synchformer_jax.input import resample

SCHEMA = "synchformer-jax/desync/1"
VIDEO_EXTENSIONS = (".mp4",)  # extract_video.py lists `*.mp4` only
AUDIO_EXTENSIONS = (".wav", ".flac")  # evaluate.py globs `*.wav` and `*.flac`
NAME_RULES = ("stem", "av-benchmark")
MATMUL_PRECISION = "highest"
SYNC_FPS = 25
SYNC_RATE = 16000


class DesyncFileError(ValueError):
    """One input file that cannot be used: `path`, `problem`; the message is one line
    `PATH: problem`."""

    def __init__(self, path: str | os.PathLike, problem: str):
        self.path, self.problem = str(path), _one_line(problem)
        super().__init__(f"{self.path}: {self.problem}")


def _one_line(text: Any) -> str:
    return " ".join(str(text).split())


# ----------------------------------------------------------------------------- video


def decode_sync_frames(path: str | os.PathLike, num_frames: int) -> np.ndarray:
    """The first `num_frames` 25-fps frames of `path`'s video stream, uint8 `[T, H, W, 3]`
    at the source resolution, through libavfilter's `fps=25.0,format=pix_fmts=rgb24`.

    The fps filter (round=near) gives output frame j the latest source frame whose
    timestamp, rounded to the nearest 1/25 s, is at most j; that is av-benchmark's frame
    selection (its decoder builds the same filter chain). Raises `DesyncFileError` naming
    the file when it is unreadable, has no video stream or is too short.
    """
    import av

    path = str(path)
    frames: list[np.ndarray] = []
    try:
        with av.open(path) as container:
            stream = container.streams.best("video")  # torio's default stream: FFmpeg's best
            if stream is None:
                raise DesyncFileError(path, "no video stream")
            stream.thread_type = "AUTO"
            graph = av.filter.Graph()
            source = graph.add_buffer(template=stream)
            fps = graph.add("fps", f"{float(SYNC_FPS)}")
            rgb = graph.add("format", "pix_fmts=rgb24")
            sink = graph.add("buffersink")
            source.link_to(fps)
            fps.link_to(rgb)
            rgb.link_to(sink)
            graph.configure()

            def drain() -> None:
                while len(frames) < num_frames:
                    try:
                        frames.append(graph.pull().to_ndarray(format="rgb24"))
                    except (av.error.BlockingIOError, av.error.EOFError):  # needs the next source frame / done
                        return

            for frame in container.decode(stream):
                graph.push(frame)
                drain()
                if len(frames) >= num_frames:
                    break
            else:  # end of the stream: the fps filter flushes what it holds
                graph.push(None)
                drain()
    except DesyncFileError:
        raise
    except (av.error.FFmpegError, OSError, ValueError) as e:
        raise DesyncFileError(path, f"cannot decode the video ({_one_line(e)})") from None
    if len(frames) < num_frames:
        raise DesyncFileError(path, f"video too short: {len(frames)} frames at 25 fps "
                              f"({len(frames) / SYNC_FPS:.2f} s), {num_frames} needed")
    return np.stack(frames)


# ----------------------------------------------------------------------------- audio

def load_audio(path: str | os.PathLike) -> tuple[np.ndarray, int]:
    """`(float32 [channels, N] in [-1, 1], sample_rate)` of the best audio stream of `path`
    (wav, flac, or anything FFmpeg reads), scaled like `torchaudio.load`."""
    import av

    path = str(path)
    chunks: list[np.ndarray] = []
    rate = None
    try:
        with av.open(path) as container:
            stream = container.streams.best("audio")
            if stream is None:
                raise DesyncFileError(path, "no audio stream")
            for frame in container.decode(stream):
                if rate is None:
                    rate = int(frame.sample_rate)
                elif int(frame.sample_rate) != rate:
                    raise DesyncFileError(path, f"the sample rate changes ({rate} -> {frame.sample_rate} Hz)")
                chunk = media._audio_to_float_planar(frame)  # FFmpeg's int -> float scaling, as torchaudio.load
                if chunks and chunk.shape[0] != chunks[0].shape[0]:
                    raise DesyncFileError(path, "the channel count changes")
                chunks.append(chunk)
    except DesyncFileError:
        raise
    except (av.error.FFmpegError, OSError, ValueError) as e:
        raise DesyncFileError(path, f"cannot decode the audio ({_one_line(e)})") from None
    if not chunks:
        raise DesyncFileError(path, "the audio stream holds no samples")
    return np.concatenate(chunks, axis=1), rate


def sync_waveform(path: str | os.PathLike, num_samples: int) -> np.ndarray:
    """av-benchmark's Synchformer audio of one file: mono (mean over channels, no mean
    removal), 16 kHz through torchaudio's default resampler, the first `num_samples`;
    float32 `[num_samples]`. Shorter audio raises `DesyncFileError` naming the file."""
    audio, rate = load_audio(path)
    mono = audio.mean(axis=0, dtype=np.float32)
    available = resample.resampled_length(mono.shape[-1], rate, SYNC_RATE)
    if available < num_samples:
        raise DesyncFileError(path, f"audio too short: {available} samples at 16 kHz "
                              f"({available / SYNC_RATE:.2f} s), {num_samples} needed")
    return resample.resample_sinc_hann(mono, rate, SYNC_RATE, num_output=num_samples)


# ----------------------------------------------------------------------------- pairs


def avbench_clip_name(stem: str) -> str:
    """av-benchmark's renaming of a generated audio file's stem before it looks up the
    video (its `clean_sample_name`, written for VGGSound names): 30 characters
    (`000000014_zxpo56cpUBU_000007-0`) keep characters 10-27, 20 (`zxpo56cpUBU_000007-0`)
    the first 18, 21 (`Y---g-f_I2yQ_000001_0`) characters 1-18; other stems are kept."""
    if len(stem) == 30:
        return stem[10:28]
    if len(stem) == 20:
        return stem[:18]
    if len(stem) == 21:
        return stem[1:19]
    return stem


@dataclasses.dataclass(frozen=True)
class Pair:
    """One scored item: the video `name` (stem), its video file and one audio file."""

    name: str
    video: str
    audio: str


@dataclasses.dataclass(frozen=True)
class Excluded:
    """A file left out of the mean. `kind`: "error" (the file itself cannot be used) or
    "unpaired" (it has no partner, or its partner was excluded)."""

    path: str
    name: str
    kind: str
    reason: str

    def line(self) -> str:
        return _one_line(f"{self.path}: {self.reason}")


@dataclasses.dataclass
class Pairing:
    pairs: list[Pair]
    excluded: list[Excluded]


def _listed(folder: pathlib.Path, extensions: Sequence[str]) -> list[pathlib.Path]:
    # The folder itself, not its subfolders, and case-sensitive extensions: the files
    # av-benchmark's os.listdir / glob pick up.
    return sorted(p for p in folder.iterdir() if p.name.endswith(tuple(extensions)) and p.is_file())


def pair_files(video_dir: str | os.PathLike, audio_dir: str | os.PathLike, *, names: str = "stem",
               video_extensions: Sequence[str] = VIDEO_EXTENSIONS,
               audio_extensions: Sequence[str] = AUDIO_EXTENSIONS) -> Pairing:
    """Videos and audio files paired by stem, sorted by video name then audio name.

    `names="av-benchmark"` maps audio stems through `avbench_clip_name` first. Audio
    files whose (mapped) name has no video, videos without audio, and two files of one
    folder with the same stem (`a.wav`, `a.flac`: which one av-benchmark keeps depends on
    its listing order) come back in `excluded`. Missing folders raise `DesyncFileError`.
    """
    if names not in NAME_RULES:
        raise ValueError(f"names must be one of {NAME_RULES}, got {names!r}")
    video_dir, audio_dir = pathlib.Path(video_dir), pathlib.Path(audio_dir)
    for folder, what in ((video_dir, "video"), (audio_dir, "audio")):
        if not folder.is_dir():
            raise DesyncFileError(folder, f"no such {what} folder")
    excluded: list[Excluded] = []

    def unique(paths: Iterable[pathlib.Path]) -> dict[str, pathlib.Path]:
        by_stem: dict[str, list[pathlib.Path]] = {}
        for p in paths:
            by_stem.setdefault(p.stem, []).append(p)
        out = {}
        for stem, group in by_stem.items():
            if len(group) == 1:
                out[stem] = group[0]
                continue
            listed = ", ".join(p.name for p in group)
            excluded.extend(Excluded(str(p), stem, "error", f"ambiguous: several files share the name {stem!r} "
                                                              f"({listed})") for p in group)
        return out

    videos = unique(_listed(video_dir, video_extensions))
    audios = unique(_listed(audio_dir, audio_extensions))
    rename = avbench_clip_name if names == "av-benchmark" else (lambda s: s)
    pairs, used = [], set()
    for stem, audio in sorted(audios.items()):
        name = rename(stem)
        if name not in videos:
            hint = f" (named {name!r} by av-benchmark's rule)" if name != stem else ""
            excluded.append(Excluded(str(audio), name, "unpaired", f"no video named {name}{hint} in {video_dir}"))
            continue
        pairs.append(Pair(name, str(videos[name]), str(audio)))
        used.add(name)
    for name, video in sorted(videos.items()):
        if name not in used:
            excluded.append(Excluded(str(video), name, "unpaired", f"no audio file for it in {audio_dir}"))
    pairs.sort(key=lambda p: (p.name, p.audio))
    return Pairing(pairs, excluded)


# --------------------------------------------------------------------------- scoring


@dataclasses.dataclass(frozen=True)
class ClipResult:
    """One scored pair: the argmax offsets of the two windows and their mean |offset|."""

    name: str
    video: str
    audio: str
    offsets_sec: tuple[float, float]
    desync_sec: float


@dataclasses.dataclass
class DesyncReport:
    """Per-pair results, what was left out, and av-benchmark's number (`desync_sec`: None
    when nothing could be scored)."""

    clip_sec: float
    clips: list[ClipResult]
    excluded: list[Excluded]

    @property
    def desync_sec(self) -> Optional[float]:
        if not self.clips:
            return None
        # av-benchmark's np.mean over every window of every pair (= the mean of the pairs' means).
        return float(np.mean([abs(o) for c in self.clips for o in c.offsets_sec]))

    @property
    def errors(self) -> list[Excluded]:
        return [e for e in self.excluded if e.kind == "error"]

    def to_dict(self) -> dict[str, Any]:
        return {"clips": [dataclasses.asdict(c) for c in self.clips],
                "excluded": [dataclasses.asdict(e) for e in self.excluded],
                "num_clips": len(self.clips), "num_excluded": len(self.excluded),
                "num_errors": len(self.errors), "desync_sec": self.desync_sec}


def evaluate_desync(config, params, video_dir: str | os.PathLike, audio_dir: str | os.PathLike, *,
                    clip_sec: float = 8.0, names: str = "stem", chunk_size: Optional[int] = None,
                    on_clip: Optional[Callable[[ClipResult], None]] = None,
                    on_excluded: Optional[Callable[[Excluded], None]] = None,
                    progress: bool = False) -> DesyncReport:
    """DeSync of the audio files of `audio_dir` against the videos of `video_dir`, as
    av-benchmark's `extract_video.py` + `evaluate.py --audio_length clip_sec` compute it.

    `config`, `params`: a stage-II offset model (`pretrained.load_model`); it runs in
    float32 whatever `config.dtype` says. Each video is decoded and its features are
    computed once, then every audio file paired with it is scored. A file that cannot be
    used never stops the run: it lands in `report.excluded` (and `on_excluded`).
    """
    import jax

    from synchformer_jax import inference
    from synchformer_jax.models import synchformer as sf

    model = sf.Synchformer(config.replace(dtype="float32"))  # av-benchmark runs in float32
    scorer = inference.DesyncScorer(model, params, chunk_size=chunk_size, clip_sec=clip_sec,
                                    matmul_precision=MATMUL_PRECISION)
    lengths = scorer.lengths
    size = config.video.img_size
    resize = jax.jit(lambda frames: inference.desync_resize_crop(frames, size))
    pairing = pair_files(video_dir, audio_dir, names=names)
    report = DesyncReport(lengths.clip_sec, [], [])

    def exclude(item: Excluded) -> None:
        report.excluded.append(item)
        if on_excluded is not None:
            on_excluded(item)

    for item in pairing.excluded:
        exclude(item)
    by_video: dict[str, list[Pair]] = {}
    for pair in pairing.pairs:
        by_video.setdefault(pair.video, []).append(pair)

    from tqdm import tqdm

    bar = tqdm(total=len(pairing.pairs), unit="clip", disable=not progress, dynamic_ncols=True)
    for video, pairs in by_video.items():
        try:
            frames = decode_sync_frames(video, lengths.frames)
        except DesyncFileError as e:
            exclude(Excluded(video, pairs[0].name, "error", e.problem))
            for pair in pairs:
                exclude(Excluded(pair.audio, pair.name, "unpaired", f"its video {video} was excluded"))
            bar.update(len(pairs))
            continue
        frames = resize(frames[None])  # one compilation per source resolution
        vfeat = scorer.video_features(frames)
        for pair in pairs:
            try:
                wave = sync_waveform(pair.audio, lengths.samples)
            except DesyncFileError as e:
                exclude(Excluded(pair.audio, pair.name, "error", e.problem))
                bar.update(1)
                continue
            result = scorer.score(vfeat, wave[None, None])
            first, last = (float(o) for o in np.asarray(result.offsets_sec)[0, 0])
            # float64 means of the float32 grid values, as av-benchmark's np.mean over `.item()`s
            clip = ClipResult(pair.name, video, pair.audio, (first, last), (abs(first) + abs(last)) / 2)
            report.clips.append(clip)
            if on_clip is not None:
                on_clip(clip)
            bar.update(1)
    bar.close()
    return report


def window_segments(clip_sec: float, window: int = 14) -> list[list[int]]:
    """The segments (first, last) of the two windows for `clip_sec` (8 s: [0, 13], [10, 23])."""
    from synchformer_jax import inference

    lengths = inference.desync_lengths(clip_sec, window)
    return [[s, s + window - 1] for s in inference.desync_window_starts(lengths.segments, window)]

