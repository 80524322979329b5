"""Decoding media files with PyAV exactly as the official data pipeline does.

The official code decodes with `torchvision.io.read_video(path, 0, None, pts_unit='sec')`
(PyAV backend) and averages the audio over channels. `decode_media` returns the same
arrays without torch:

* video: every frame with `pts >= 0`, sorted by pts (one frame per pts), converted to
  RGB24 by FFmpeg's swscale (`VideoFrame.to_ndarray(format='rgb24')`, what
  `frame.to_rgb().to_ndarray()` gives) -> `uint8 [T, H, W, 3]`;
* audio: the decoded frames with `pts >= 0`, each `AudioFrame.to_ndarray()` (planar
  float: `[C, n]`), concatenated along time and averaged over channels in float32 ->
  `float32 [N]`. For a whole-file read torchvision's pts-based trimming never removes
  samples (the first kept frame starts at or after 0 and there is no end), so
  nothing is trimmed here either;
* `video_fps = float(stream.average_rate)`, `audio_rate = stream.rate`.

Bit-exactness was checked against the official decoder's output (frame sha256 and
waveforms stored in the reference set). Decoded values depend on the FFmpeg build that
ships with PyAV; the official README notes that the reported accuracy was obtained
with av 8.1/9.0 (upstream issue #11), the reference set with av 18.1.

TODO(media): the "any container / codec -> H.264 25 fps, shorter side 256 px, AAC
16 kHz" re-encode of the input contract (official `example.py` calls ffmpeg for
non-conforming files) and A/V start-time alignment are not implemented yet; this
module only decodes files that already follow the contract (others decode too, but
the transforms assume 25 fps / 16 kHz).
"""
from __future__ import annotations

import os
from typing import NamedTuple, Optional

import av
import numpy as np

__all__ = ["MediaError", "DecodedMedia", "decode_media"]


class MediaError(ValueError):
    """A file that cannot be used as an audio-visual example (one-line message)."""

    def __init__(self, path, problem: str):
        self.path = os.fspath(path)
        self.problem = " ".join(str(problem).split())  # one line, whatever FFmpeg said
        super().__init__(f"{self.path}: {self.problem}")


class DecodedMedia(NamedTuple):
    frames: np.ndarray  # uint8 [T, H, W, 3] RGB
    audio: np.ndarray  # float32 [N] channel mean
    video_fps: float
    audio_rate: int


def _frame_pts(frame, index: int) -> int:
    # Streams without timestamps (raw elementary streams) give pts None; decode order
    # is the only order there is then.
    return index if frame.pts is None else int(frame.pts)


def _decode_stream(container, stream, path, kind: str, end_pts: Optional[int]):
    """Frames of one stream with 0 <= pts (<= end_pts), sorted, one per pts."""
    # torchvision seeks to the requested start before decoding each stream. The seek
    # is not a no-op at 0: it resets FFmpeg's AAC decoder so that the priming packet
    # (pts -1024 in these mp4s) is handled differently and the first 1024 samples of
    # the output change (without it the first samples of the VGGSound files are not
    # the official zeros). Mirror it.
    try:
        container.seek(0, any_frame=False, backward=True, stream=stream)
    except av.error.FFmpegError:
        pass  # unseekable inputs decode from where they are, which is the start
    frames = {}
    try:
        for index, frame in enumerate(container.decode(stream)):
            pts = _frame_pts(frame, index)
            if end_pts is not None and pts > end_pts:
                break
            if pts >= 0:
                frames[pts] = frame  # a repeated pts keeps the last frame, as torchvision
    except av.error.FFmpegError as exc:
        # torchvision silently keeps what was decoded before a decode error; a damaged
        # file should not silently become a shorter example here.
        raise MediaError(path, f"{kind} stream fails to decode ({exc})") from exc
    return [frames[k] for k in sorted(frames)]


def _audio_to_float_planar(frame) -> np.ndarray:
    """`[C, n]` float32 samples of one audio frame."""
    x = frame.to_ndarray()
    fmt = frame.format
    if not fmt.is_planar:
        # Packed formats come back as [1, n*C] interleaved.
        x = x.reshape(-1, len(frame.layout.channels)).T
    if np.issubdtype(x.dtype, np.integer):
        # The contract's AAC decodes to float planar already; integer PCM is scaled to
        # [-1, 1) like FFmpeg's s16/s32 -> flt conversion.
        if x.dtype == np.uint8:
            x = (x.astype(np.float32) - 128.0) / 128.0
        else:
            x = x.astype(np.float32) / float(2 ** (8 * x.dtype.itemsize - 1))
    return x.astype(np.float32, copy=False)


def decode_media(path, end_sec: Optional[float] = None) -> DecodedMedia:
    """Decode a whole file like the official `get_video_and_audio` (see module doc).

    Args:
      path: media file.
      end_sec: stop after this time (frames with `pts <= ceil(end_sec / time_base)`
        are kept, torchvision's inclusive end). Everything returned is identical to
        the corresponding prefix of a whole-file decode; `None` decodes everything.

    Returns:
      `DecodedMedia(frames uint8 [T, H, W, 3], audio float32 [N], video_fps, audio_rate)`.

    Raises:
      MediaError: missing / unreadable / non-media file, no video or no audio stream,
        a stream without decodable frames.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise MediaError(path, "no such file")
    if os.path.isdir(path):
        raise MediaError(path, "is a directory, not a media file")
    if os.path.getsize(path) == 0:
        raise MediaError(path, "empty file (0 bytes), not a media file")
    try:
        container = av.open(path, metadata_errors="ignore")
    except (av.error.FFmpegError, OSError, UnicodeDecodeError) as exc:
        raise MediaError(path, f"not a readable media file ({exc})") from exc
    with container:
        if not container.streams.video:
            raise MediaError(path, "has no video stream")
        if not container.streams.audio:
            raise MediaError(path, "has no audio stream")
        vstream = container.streams.video[0]
        astream = container.streams.audio[0]
        if vstream.average_rate is None or float(vstream.average_rate) <= 0:
            raise MediaError(path, "video stream has no frame rate")
        if not astream.rate:
            raise MediaError(path, "audio stream has no sample rate")

        def end_pts(stream):
            if end_sec is None:
                return None
            return int(np.ceil(end_sec / float(stream.time_base)))

        vframes = _decode_stream(container, vstream, path, "video", end_pts(vstream))
        aframes = _decode_stream(container, astream, path, "audio", end_pts(astream))
        video_fps = float(vstream.average_rate)
        audio_rate = int(astream.rate)
        if not vframes:
            raise MediaError(path, "video stream has no decodable frames")
        if not aframes:
            raise MediaError(path, "audio stream has no decodable samples")
        frames = np.stack([f.to_ndarray(format="rgb24") for f in vframes])
        audio = np.concatenate([_audio_to_float_planar(f) for f in aframes], axis=1)
    # Channel mean in float32 (official: `audio.mean(dim=0)` on the float32 tensor).
    audio = audio.mean(axis=0, dtype=np.float32) if audio.shape[0] > 1 else audio[0].copy()
    return DecodedMedia(frames, audio, video_fps, audio_rate)
