"""Media I/O: decode exactly like the official pipeline, and bring any file to the contract.

Decoding (`decode_media`)
-------------------------
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
* `video_fps = float(stream.average_rate)` (torchvision's value, exactly 25 for the
  contract files) unless the decoded frames' timestamps contradict it (more than 10 %
  off their typical spacing): then FFmpeg's `guessed_rate` if the timestamps agree with
  it, else the typical spacing itself. An Ogg VP8 stream declares 1 / its time base
  (30000 fps for 30 fps video written with a 1/30000 time base, or none at all), and
  30000 fps would make `EqualifyFromRight` keep one audio sample per frame;
  `audio_rate = stream.rate`.

Bit-exactness was checked against the official decoder's output (frame sha256 and
waveforms stored in the reference set). Decoded values depend on the FFmpeg build that
ships with PyAV; the official README notes that the reported accuracy was obtained
with av 8.1/9.0 (upstream issue #11), the reference set with av 18.1. PyAV 19's FFmpeg
drops the AAC priming samples this decode keeps (audio 1,024 samples early), hence av<19.

Note what this does *not* do: it trusts that audio sample 0 and video frame 0 are at
the same instant (true for the contract files, whose streams both start at pts 0).
Files that do not follow the contract must go through `conform` first.

The input contract (`conform`, `load_clip`)
-------------------------------------------
The model expects H.264 video at 25 fps (constant), shorter side 256 px with both sides
even, and 16 kHz audio (official data preparation; `example.py` re-encodes anything
else with the ffmpeg CLI). `conform` does the same in-process with PyAV:

* **Already conforming files are kept byte for byte** (mp4 container, H.264 yuv420p at
  exactly 25 fps with pts k/25 from 0, shorter side 256, even sides, AAC at 16 kHz whose
  first non-negative packet is at pts 0): re-encoding would change pixels, and the bytes
  are what the official preparation produced. Frames and audio are `decode_media`'s.
* **Anything else is re-encoded** (libx264 yuv420p CRF 23 + AAC 16 kHz mono, in memory;
  never MPEG-4 Part 2) and `frames` / `audio` are `decode_media` of the produced bytes,
  so that a record's arrays and its mp4 always agree (also for the copied files).

Timeline (what makes audio and video line up):

* The output origin `t0` is the presentation time of the first decoded video frame,
  or 0 if that is negative (edit lists / muxers with negative timestamps: presentation
  starts at 0; not in MPEG-TS, whose negative times are the part before a timestamp
  wrap). Timestamps are taken from each decoded frame (`pts * time_base`, i.e.
  after the demuxer applied stream start times and edit lists and after the audio
  decoder dropped its priming samples), not from the container's nominal start.
  Decoders output video in presentation order; the k-th frame out is given the k-th
  smallest timestamp within a 16-frame window, which repairs containers that hand out
  decode-order times (AVI with B-frames) and changes nothing elsewhere. Timestamps
  going back by more than 0.5 s (a reset: concatenated recordings) raise.
* Video: output frame k shows the latest input frame whose time is <= t0 + k/25
  (sample-and-hold: what a player displays at that instant; this is what ffmpeg's
  `fps` filter does for frames that land on the grid). A tolerance of 1/100 of an
  output frame (0.4 ms) absorbs timestamp rounding in millisecond time bases
  (mkv/webm). The clip ends where the last input frame's display ends.
* Audio: the stream's start is the median, over its first 50 decoded frames, of
  "frame time minus samples before it" (robust to the 1 ms rounding of mkv/webm
  timestamps); after that samples are counted, and only a timestamp jump of more
  than 2 ms against the count is honoured (gaps become silence, overlaps are cut).
  Channels are averaged, then sample 0 is moved to t0: audio starting later than the
  video is padded with silence at the front, earlier audio is trimmed. A sample rate
  that changes mid-stream is brought to the highest one first, run by run
  (`ConformedClip.source["audio_rates_decoded"]` lists them).
  Resampling to 16 kHz uses libswresample (`av.AudioResampler`, the library behind
  ffmpeg's `-ar`); its output is delay-compensated (sample 0 stays at time 0).
* The produced mp4 relies on the AAC encoder's priming being signalled by the muxer
  (edit list) and removed by the decoder; `tests/test_media_contract.py` checks this
  by decoding the output again and locating a click to within 1 ms.

Streams: the first video stream that is not cover art (an attached picture) and the
first audio stream, as torchvision picks them; "default" flags are not consulted (a
file whose first audio track is a commentary gives the commentary, as it did in the
official pipeline). `ConformedClip.source` says which audio stream was used
(`audio_stream_index`, the container index, of `audio_streams`; its default flag, title
and language; `default_audio_stream_index`), so such files can be found and re-muxed.

Ogg timing: FFmpeg's ogg demuxer dates the frames on a VP8 stream's first page back
from the page's end by one tick per frame, and gives every frame a one-tick duration:
right when the time base is one frame, as the VP8-in-Ogg mapping means; with a finer
time base (1/30000 for 30 fps) the first frame lands one tick before the second and the
last one ends one tick after it starts. `conform` re-dates such leading frames at the
typical spacing and holds a last frame whose own duration is under half the typical
spacing for the typical spacing (any container).

Size: scale so that the shorter side is 256 (the longer one `trunc(long * 256 /
short)`, as ffmpeg's scale filter truncates the expression), then drop the last column
/ row if odd (the crop filter's centred offset rounds down to 0 for a 1-pixel excess).
Scaling is bicubic (ffmpeg's default) through swscale (`VideoFrame.reformat`), one
frame at a time, straight from the source size to the output size, so a 4000x3000
input never exists as an RGB array. Sample aspect ratio is ignored (the official
filter uses the stored width/height too). Rotation metadata (phone videos) is ignored
as well, whereas the ffmpeg CLI would rotate by default: a known difference. Both are
recorded in `ConformedClip.source` (`sample_aspect_ratio`, `rotation_deg_ignored`).

Errors: every problem raises `MediaError` with one line naming the file (the repr of
the name when it is not printable UTF-8). Damage policy of `conform` (raise rather
than return a shorter or smeared example):

* audio with NaN or infinite samples (float PCM from a broken recorder or tool) raises,
  saying how many and where the first is (the AAC encoder would refuse them with
  "Invalid argument"; `decode_media` returns them as they are);
* decoders run with `err_detect=explode`; a decoder error or a frame flagged corrupt
  raises (H.264 / AAC damage is caught this way);
* a stream that decodes to more than 0.15 s less than the file declares raises
  ("truncated or damaged": cut files, and the matroska demuxer, which stops at
  garbage it cannot resync past); an mp4 whose top-level boxes run past the end of
  the file raises ("truncated");
* data skipped mid-stream that the demuxer resyncs after is decoded around: video
  frames are held, audio gaps become silence and are reported in
  `ConformedClip.source["audio_gap_sec"]`;
* payload damage that neither container nor codec can detect (no checksums in
  VP9 / Opus / mkv clusters as FFmpeg reads them) cannot be caught.

`decode_media` keeps the official behaviour (FFmpeg conceals what it can; an exception
from the decoder raises). Silent audio is not an error: `ConformedClip.silent` (peak
below -60 dBFS) and `is_silent` let a data preparation step decide.

Records (`load_clip`) keep the audio only up to `RECORD_AUDIO_PAST_VIDEO_SEC` (1 s) past
the end of the video: every official pipeline (stages I-III, `example.py`) starts with
`EqualifyFromRight`, which trims both streams to the shorter one, so audio past the
video's end is never used (a 2-s video beside 120 s of audio kept 7.7 MB of PCM that
no crop, offset or jitter can reach). The margin only keeps ordinary clips (AAC's last
frame ends up to 64 ms after the video) exactly as decoded.
"""
from __future__ import annotations

import collections
import contextlib
import dataclasses
import functools
import heapq
import io
import os
import warnings
from fractions import Fraction
from typing import Any, NamedTuple, Optional

import av
import numpy as np

__all__ = [
    "MediaError", "DecodedMedia", "decode_media", "decode_media_bytes",
    "ConformedClip", "conform", "load_clip", "is_silent", "decoder_versions",
    "TARGET_FPS", "TARGET_SAMPLE_RATE", "TARGET_SHORT_SIDE", "RECORD_AUDIO_PAST_VIDEO_SEC",
]

TARGET_FPS = 25
TARGET_SAMPLE_RATE = 16000
TARGET_SHORT_SIDE = 256
# Audio a record keeps past the end of its video (module doc: EqualifyFromRight never
# reads past it; the margin keeps ordinary clips whole).
RECORD_AUDIO_PAST_VIDEO_SEC = 1.0

# Output encoder settings. libx264 at ffmpeg's defaults (CRF 23, preset medium), and one
# thread because x264's output depends on its thread count: the same input then gives
# the same bytes on every machine with the same libx264 build (data preparation
# parallelises over clips anyway).
_X264_OPTIONS = {"crf": "23", "preset": "medium"}
_AAC_BIT_RATE = 64000  # mono 16 kHz; plenty (AAC-LC tops out at 96 kbit/s per channel here)
_GRID_TOLERANCE = Fraction(1, 100 * TARGET_FPS)  # 0.4 ms: timestamp rounding, see module doc
_AUDIO_JUMP_SEC = 0.002  # timestamp jumps below this are treated as rounding, not gaps
_SILENCE_DBFS = -60.0
# Container and stream metadata (titles, encoder tags) are often not UTF-8. PyAV < 19
# decodes them strictly unless told to ignore errors; PyAV 19 dropped the option and
# decodes them with "surrogateescape", which never fails.
_AV_MAJOR = int(av.__version__.split(".")[0])
_OPEN_OPTIONS = {"metadata_errors": "ignore"} if _AV_MAJOR < 19 else {}
if _AV_MAJOR >= 19:
    # setup.py asks for av < 19; this is for environments that installed it anyway.
    warnings.warn(f"PyAV {av.__version__}: its FFmpeg drops the 1,024 AAC priming samples at the front of "
                  "mp4 audio that the official decode keeps, so sounds arrive 64 ms early at 16 kHz "
                  "and offsets are biased; install av<19 for the decode the model was trained on",
                  RuntimeWarning, stacklevel=2)


def _display_name(path) -> str:
    """The file name for messages: as is when printable, else its repr (one line)."""
    name = os.fsdecode(path) if isinstance(path, (bytes, bytearray)) else os.fspath(path)
    if isinstance(name, bytes):
        name = os.fsdecode(name)
    try:
        name.encode("utf-8")
        printable = name.isprintable()
    except UnicodeEncodeError:  # undecodable bytes became lone surrogates
        printable = False
    return name if printable else repr(name)


class MediaError(ValueError):
    """A file that cannot be used as an audio-visual example (one-line message)."""

    def __init__(self, path, problem: str):
        self.path = os.fspath(path) if not isinstance(path, bytearray) else bytes(path)
        self.problem = " ".join(str(problem).split())  # one line, whatever FFmpeg said
        super().__init__(f"{_display_name(path)}: {self.problem}")


class DecodedMedia(NamedTuple):
    frames: np.ndarray  # uint8 [T, H, W, 3] RGB
    audio: np.ndarray  # float32 [N] channel mean
    video_fps: float
    audio_rate: int


def _check_file(path) -> None:
    if not os.path.exists(path):
        if os.path.islink(path):
            raise MediaError(path, f"broken symbolic link (to {_display_name(os.readlink(path))}, which does not exist)")
        raise MediaError(path, "no such file")
    if os.path.isdir(path):
        raise MediaError(path, "is a directory, not a media file")
    if os.path.getsize(path) == 0:
        raise MediaError(path, "empty file (0 bytes), not a media file")


@contextlib.contextmanager
def _open_input(path):
    """An input container for `path` (str, PathLike or bytes), closed afterwards.

    FFmpeg takes file names as UTF-8, so a name that is not valid UTF-8 (bytes from a
    Linux file system, surrogate-escaped str) is opened by Python and handed over as a
    file object; the decoded content is the same. Names with a colon are made absolute,
    so that FFmpeg does not take their start for a protocol.
    """
    fspath = os.fspath(path)
    handle = None
    try:
        if isinstance(fspath, bytes):
            fspath.decode("utf-8")
        else:
            fspath.encode("utf-8")
        source = fspath if isinstance(fspath, str) else fspath.decode("utf-8")
        if ":" in source:
            # FFmpeg reads "12:30 clip.mkv" or "data:x.mp4" as a URL scheme; a path with a
            # directory part ("/abs/12:30 clip.mkv") is always a file to it.
            source = os.path.abspath(source)
    except UnicodeError:
        handle = open(fspath, "rb")
        source = handle
    try:
        try:
            container = av.open(source, **_OPEN_OPTIONS)
        except (av.error.FFmpegError, OSError, UnicodeDecodeError) as exc:
            raise MediaError(path, f"not a readable media file ({exc})") from exc
        with container:
            yield container
    finally:
        if handle is not None:
            handle.close()


def _frame_pts(frame, index: int) -> int:
    # Streams without timestamps (raw elementary streams) give pts None; decode order
    # is the only order there is then.
    return index if frame.pts is None else int(frame.pts)


def _decode_stream(container, stream, path, kind: str, end_pts: Optional[int], strict: bool = False):
    """Frames of one stream with 0 <= pts (<= end_pts), sorted, one per pts.

    `strict` (used by `conform`, not by `decode_media`) also rejects frames the decoder
    flagged corrupt; together with `_strict` options this turns concealed damage into
    an error. It does not change the decoded values of an undamaged file.
    """
    # torchvision seeks to the requested start before decoding each stream. The seek
    # is not a no-op at 0: it resets FFmpeg's AAC decoder so that the priming packet
    # (pts -1024 in these mp4s) is handled differently and the first 1024 samples of
    # the output change (without it the first samples of the VGGSound files are not
    # the official zeros). Mirror it.
    seek_error = None
    try:
        container.seek(0, any_frame=False, backward=True, stream=stream)
    except av.error.FFmpegError as exc:
        seek_error = exc  # unseekable inputs decode from where they are: the start, for the first stream
    frames = {}
    try:
        for index, frame in enumerate(container.decode(stream)):
            pts = _frame_pts(frame, index)
            if end_pts is not None and pts > end_pts:
                break
            if strict and frame.is_corrupt:
                raise MediaError(path, f"{kind} stream is corrupt near {float(pts * stream.time_base):.2f}s")
            if pts >= 0:
                frames[pts] = frame  # a repeated pts keeps the last frame, as torchvision
    except av.error.FFmpegError as exc:
        # torchvision silently keeps what was decoded before a decode error; a damaged
        # file should not silently become a shorter example here.
        raise MediaError(path, f"{kind} stream fails to decode ({exc})") from exc
    if not frames and seek_error is not None:
        # e.g. FLV (no index for its audio): the other stream's decode left the demuxer at the end.
        raise MediaError(path, f"{kind} stream cannot be read: the container cannot seek back to its start "
                               f"({seek_error}); `conform` reads such files in one pass")
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


def _av_streams(container, path):
    """The first video stream that is not a cover image, and the first audio stream
    (torchvision's choice, which the official decode makes)."""
    # The first audio stream even when another one is flagged "default" (a commentary
    # or second-language track first): the official data went through read_video, which
    # takes streams.audio[0], and the choice is recorded in `_probe_source` instead.
    # Cover art (an "attached picture": album art of an m4a, a thumbnail) is a video
    # stream of one still image; it is not the video.
    videos = [s for s in container.streams.video if not s.disposition & av.stream.Disposition.attached_pic]
    if not videos:
        raise MediaError(path, "has no video stream" + (" (only a cover image)" if container.streams.video else ""))
    if not container.streams.audio:
        raise MediaError(path, "has no audio stream")
    return videos[0], container.streams.audio[0]


def _decode_container(container, path, end_sec: Optional[float], strict: bool = False) -> DecodedMedia:
    vstream, astream = _av_streams(container, path)
    if strict:
        _strict(vstream)
        _strict(astream)
    if not astream.rate:
        raise MediaError(path, "audio stream has no sample rate")

    def end_pts(stream):
        if end_sec is None:
            return None
        return int(np.ceil(end_sec / float(stream.time_base)))

    vframes = _decode_stream(container, vstream, path, "video", end_pts(vstream), strict)
    aframes = _decode_stream(container, astream, path, "audio", end_pts(astream), strict)
    audio_rate = int(astream.rate)
    if not vframes:
        raise MediaError(path, "video stream has no decodable frames")
    video_fps = _video_fps(path, vstream, vframes)
    if not aframes:
        raise MediaError(path, "audio stream has no decodable samples")
    frames = np.stack([f.to_ndarray(format="rgb24") for f in vframes])
    audio = np.concatenate([_audio_to_float_planar(f) for f in aframes], axis=1)
    # Channel mean in float32 (official: `audio.mean(dim=0)` on the float32 tensor).
    audio = audio.mean(axis=0, dtype=np.float32) if audio.shape[0] > 1 else audio[0].copy()
    return DecodedMedia(frames, audio, video_fps, audio_rate)


def _stated_rates(stream) -> list[Fraction]:
    """The stream's `average_rate` and FFmpeg's `guessed_rate`, those that are set."""
    rates = []
    for rate in (stream.average_rate, getattr(stream, "guessed_rate", None)):
        if rate is not None and rate > 0 and Fraction(rate) not in rates:
            rates.append(Fraction(rate))
    return rates


def _declared_rate(stream) -> Optional[Fraction]:
    """`average_rate`, or `guessed_rate` where the two disagree by more than 10 % (an
    Ogg VP8 stream states 1 / its time base: 30000 fps for 30 fps video)."""
    rates = _stated_rates(stream)
    if len(rates) == 2 and abs(rates[0] / rates[1] - 1) > Fraction(1, 10):
        return rates[1]
    return rates[0] if rates else None


def _video_fps(path, stream, frames) -> float:
    """Rate of the decoded frames (module doc): `average_rate` unless their timestamps
    contradict it, then `guessed_rate` if they agree with that, else their own spacing.

    The typical spacing is the (upper) median of the steps between timestamps: a
    misdated first frame (Ogg VP8) does not move it. The tolerance, 10 % plus one tick,
    covers variable frame rates and millisecond time bases (33 / 34 ms at 30 fps).
    """
    rates = _stated_rates(stream)
    pts = [f.pts for f in frames]
    if len(pts) >= 2 and None not in pts and stream.time_base:
        tick = Fraction(stream.time_base)
        steps = sorted(b - a for a, b in zip(pts, pts[1:]))
        typical = steps[len(steps) // 2] * tick
        for rate in rates:
            if abs(1 / rate - typical) <= typical / 10 + tick:
                return float(rate)
        return float(1 / typical)
    if not rates:
        raise MediaError(path, "video stream has no frame rate")
    return float(rates[0])


def decode_media(path, end_sec: Optional[float] = None) -> DecodedMedia:
    """Decode a whole file like the official `get_video_and_audio` (see module doc).

    Args:
      path: media file (str, PathLike or bytes; names need not be UTF-8).
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
    _check_file(path)
    with _open_input(path) as container:
        return _decode_container(container, path, end_sec)


def decode_media_bytes(data: bytes, name: str = "<bytes>", end_sec: Optional[float] = None) -> DecodedMedia:
    """`decode_media` of an in-memory file (e.g. a record's mp4); `name` is for messages."""
    if not data:
        raise MediaError(name, "empty file (0 bytes), not a media file")
    try:
        container = av.open(io.BytesIO(data), **_OPEN_OPTIONS)
    except (av.error.FFmpegError, OSError) as exc:
        raise MediaError(name, f"not a readable media file ({exc})") from exc
    with container:
        return _decode_container(container, name, end_sec)


# --------------------------------------------------------------------- the contract


def is_silent(audio: np.ndarray, threshold_dbfs: float = _SILENCE_DBFS) -> bool:
    """True when the peak of `audio` is below `threshold_dbfs` (digital or near silence)."""
    audio = np.asarray(audio)
    if audio.size == 0:
        return True
    return bool(np.max(np.abs(audio)) < 10.0 ** (threshold_dbfs / 20.0))


def decoder_versions() -> dict[str, str]:
    """The decoding stack, for `ClipRecord.decoder` (decoded values depend on it)."""
    versions = {"av": av.__version__, "ffmpeg": str(getattr(av, "ffmpeg_version_info", "unknown"))}
    for lib, ver in getattr(av, "library_versions", {}).items():
        versions[lib] = ".".join(str(v) for v in ver)
    return versions


@dataclasses.dataclass
class ConformedClip:
    """A clip at the input contract; `frames` / `audio` == `decode_media(mp4_bytes)`."""

    frames: np.ndarray  # uint8 [T, H, W, 3] RGB, 25 fps, shorter side 256, even sides
    audio: np.ndarray  # float32 [N] mono, 16 kHz; sample 0 is at the time of frame 0
    mp4_bytes: bytes  # H.264 + AAC mp4 (the input's own bytes when it already conformed)
    reencoded: bool  # False: `mp4_bytes` are the input file's bytes
    silent: bool  # audio peak below -60 dBFS (not an error; the caller decides)
    source: dict[str, Any]  # what the input was (codecs, fps, size, rate, start times)
    fps: float = float(TARGET_FPS)
    sample_rate: int = TARGET_SAMPLE_RATE

    @property
    def num_frames(self) -> int:
        return int(self.frames.shape[0])

    @property
    def duration_sec(self) -> float:
        """Length of the shorter stream (video frames / audio samples)."""
        return min(self.num_frames / self.fps, self.audio.shape[0] / self.sample_rate)


def _target_size(width: int, height: int) -> tuple[int, int, int, int]:
    """(scaled w, scaled h, cropped w, cropped h) of the official scale+crop filter."""
    short = min(width, height)
    # Integer arithmetic = truncation of the exact quotient, as ffmpeg's (int) cast.
    sw = width * TARGET_SHORT_SIDE // short
    sh = height * TARGET_SHORT_SIDE // short
    return sw, sh, sw - sw % 2, sh - sh % 2


def _probe_source(container, path) -> dict[str, Any]:
    vstream, astream = _av_streams(container, path)
    vcc, acc = vstream.codec_context, astream.codec_context

    def sec(stream):
        if stream.start_time is None:
            return None
        return float(stream.start_time * stream.time_base)

    def end(stream):
        if not stream.duration or stream.time_base is None:
            return None
        return float(((stream.start_time or 0) + stream.duration) * stream.time_base)

    return {
        "format": container.format.name,
        "major_brand": str(container.metadata.get("major_brand", "")),
        "video_codec": vcc.name, "audio_codec": acc.name,
        "pix_fmt": vcc.format.name if vcc.format is not None else None,
        "width": vcc.width, "height": vcc.height,
        "average_rate": float(vstream.average_rate) if vstream.average_rate else None,
        "audio_rate": int(astream.rate or 0), "audio_channels": len(acc.layout.channels) if acc.layout else 0,
        # Ignored by the conversion (module doc), recorded so that a user can tell.
        "sample_aspect_ratio": (str(vstream.sample_aspect_ratio)
                                if vstream.sample_aspect_ratio not in (None, 0, 1) else None),
        # Which audio stream was used (the first, see `_av_streams`), so that files whose
        # first track is not the main one (commentary, another language) can be found.
        "audio_stream_index": int(astream.index), "audio_streams": len(container.streams.audio),
        "audio_stream_default": bool(astream.disposition & av.stream.Disposition.default),
        "audio_stream_title": _tag(astream, "title"), "audio_stream_language": _tag(astream, "language"),
        "default_audio_stream_index": next((int(s.index) for s in container.streams.audio
                                            if s.disposition & av.stream.Disposition.default), None),
        "video_start_sec": sec(vstream), "audio_start_sec": sec(astream),
        "video_end_sec": end(vstream), "audio_end_sec": end(astream),
        "container_end_sec": _container_end_sec(container),
    }


def _tag(stream, key: str) -> Optional[str]:
    value = stream.metadata.get(key)
    return None if value is None else str(value)


def _container_end_sec(container) -> Optional[float]:
    """Where the file says its media ends, in its own timeline."""
    if not container.duration:
        return None
    duration = container.duration / 1e6
    if "matroska" in container.format.name.split(","):
        # FFmpeg reports matroska's Segment Duration as is, and its muxer writes the end
        # time there (streams starting at 1 s and lasting 3 s: 4 s), not the length from
        # the first timestamp. Adding the start would count it twice; for a writer that
        # means a length, the end is merely checked less strictly.
        return duration
    return (container.start_time or 0) / 1e6 + duration


def _truncated_mp4_box(path) -> Optional[str]:
    """For an ISO-BMFF (mp4/mov) file: the top-level box that runs past the end, if any.

    A cut mp4 whose index ('moov') is at the end may still open, with some streams
    missing; checking the box sizes gives the real reason.
    """
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            pos = 0
            while pos + 8 <= size:
                f.seek(pos)
                head = f.read(16)
                box_size, kind = int.from_bytes(head[:4], "big"), head[4:8]
                if box_size == 1 and len(head) == 16:
                    box_size = int.from_bytes(head[8:16], "big")  # 64-bit size
                elif box_size == 0:
                    return None  # "to the end of the file"
                if box_size < 8:
                    return None  # not box structure we understand; leave it to FFmpeg
                if pos + box_size > size:
                    return kind.decode("latin-1")
                pos += box_size
    except OSError:
        return None
    return None


def _conforms(container, info: dict[str, Any]) -> bool:
    """Cheap (demux-only) test that the file is already at the contract, see module doc."""
    if "mp4" not in info["format"].split(",") or info["major_brand"].strip() == "qt":
        return False  # QuickTime .mov / other containers are re-muxed and re-encoded
    if info["video_codec"] != "h264" or info["audio_codec"] != "aac" or info["pix_fmt"] != "yuv420p":
        return False
    w, h = info["width"], info["height"]
    if min(w, h) != TARGET_SHORT_SIDE or w % 2 or h % 2 or info["audio_rate"] != TARGET_SAMPLE_RATE:
        return False
    vstream, astream = _av_streams(container, None)
    vpts, apts = [], []
    try:
        for packet in container.demux(vstream, astream):
            if packet.size == 0 or packet.pts is None:
                continue
            (vpts if packet.stream is vstream else apts).append(packet.pts)
    except av.error.FFmpegError:
        return False  # damaged: let the strict decode report it
    # CFR at exactly 25 fps starting at 0: the kept (pts >= 0) video timestamps are k/25.
    tick = Fraction(1, TARGET_FPS) / Fraction(vstream.time_base)
    kept = sorted(p for p in vpts if p >= 0)
    if not kept or tick.denominator != 1:
        return False
    if kept != [k * int(tick) for k in range(len(kept))]:
        return False
    # Audio: decode_media keeps frames with pts >= 0, so its sample 0 is at the first
    # such packet, which must be at time 0 for sample 0 to be the time of frame 0.
    apos = [p for p in apts if p >= 0]
    return bool(apos) and min(apos) == 0


class _Grid:
    """Sample-and-hold of timestamped frames onto the 25 fps output grid (module doc)."""

    def __init__(self, path, t_limit: Optional[Fraction], negative_start_is_lead_in: bool = True):
        self.path = path
        self.t_limit = t_limit  # output times at or beyond this are not produced
        # Whether frames before time 0 are a lead-in that presentation skips (edit lists);
        # where a format has no such thing (MPEG-TS) they are content (see `_decode_any`).
        self.negative_start_is_lead_in = negative_start_is_lead_in
        self.t0: Optional[Fraction] = None
        self.size = None
        self.out: list[np.ndarray] = []
        self._held = None  # (time, source frame, its scaled rgb or None)
        self.done = False
        self.decoded = 0  # input frames seen
        self.rotation = 0  # the first frame's display rotation (degrees), which is not applied

    def _scaled(self):
        time, frame, rgb = self._held
        if rgb is None:
            sw, sh, cw, ch = self.size
            # One swscale call: source pixel format and size -> rgb24 at the output size.
            rgb = frame.reformat(width=sw, height=sh, format="rgb24", interpolation="BICUBIC").to_ndarray()
            rgb = np.ascontiguousarray(rgb[:ch, :cw])
            self._held = (time, frame, rgb)
        return rgb

    def _emit_until(self, t_next: Fraction) -> None:
        """Output the held frame for every grid time before `t_next`."""
        while not self.done:
            k = len(self.out)
            tk = self.t0 + Fraction(k, TARGET_FPS)
            if self.t_limit is not None and tk >= self.t_limit - _GRID_TOLERANCE:
                self.done = True
                return
            if tk + _GRID_TOLERANCE >= t_next:
                return
            self.out.append(self._scaled())

    def push(self, time: Fraction, frame) -> None:
        self.decoded += 1
        if self.done:
            return
        if self._held is None:
            self.size = _target_size(frame.width, frame.height)
            self.rotation = int(getattr(frame, "rotation", 0) or 0)
            self.t0 = max(time, Fraction(0)) if self.negative_start_is_lead_in else time
            self._held = (time, frame, None)
            return
        if time <= self._held[0]:
            return  # out of order or repeated timestamp: keep presentation order
        if time <= self.t0 + _GRID_TOLERANCE:
            self._held = (time, frame, None)  # a later frame still at or before t0
            return
        self._emit_until(time)
        self._held = (time, frame, None)

    def finish(self, t_end: Fraction) -> None:
        if self._held is not None:
            self._emit_until(t_end)


class _PresentationTimes:
    """Pairs decoded frames with their presentation times, in output order.

    Decoders output frames in presentation order, but a container without presentation
    timestamps (AVI) hands each frame the timestamp of the packet it was decoded from:
    with B-frames the times come out permuted within the codec's reorder window
    (1, 4, 3, 5, 2, 8, ... for frames 0, 1, 2, ...). The k-th frame out is shown at the
    k-th smallest time, which a min-heap over a window of `window` frames gives; for
    correct timestamps it changes nothing. The frames wait in the window (16, the most
    that H.264/HEVC reorder).
    """

    def __init__(self, window: int = 16):
        self.window = window
        self._times: list[Fraction] = []
        self._frames: collections.deque = collections.deque()

    def push(self, time: Fraction, frame) -> list:
        heapq.heappush(self._times, time)
        self._frames.append(frame)
        if len(self._frames) > self.window:
            return [(heapq.heappop(self._times), self._frames.popleft())]
        return []

    def flush(self) -> list:
        out = []
        while self._frames:
            out.append((heapq.heappop(self._times), self._frames.popleft()))
        return out


_TIMESTAMP_RESET_SEC = 0.5  # a stream going back further than this is discontinuous


def _frame_time(frame, index: int, fallback_rate) -> Optional[Fraction]:
    if frame.pts is not None and frame.time_base is not None:
        return Fraction(frame.pts) * Fraction(frame.time_base)
    if fallback_rate:
        return Fraction(index) / Fraction(fallback_rate)
    return None


_OGG_LEAD_FRAMES = 8  # enough frames to know the typical spacing after a misdated first page


def _redate_ogg_start(lead: list, tick: Optional[Fraction]) -> list:
    """`(time, frame)` of an Ogg stream's first frames, those of its first page re-dated.

    FFmpeg's ogg demuxer dates the first page's frames back from the page's granule
    position (the end of its last frame) by one tick each (module doc). Frames one tick
    apart, followed by frames several ticks apart, are those: they are put at the
    typical spacing before the first correctly dated frame. A stream whose time base is
    its frame rate (frames one tick apart throughout) is left as it is.
    """
    if tick is None or len(lead) < 3:
        return lead
    times = [time for time, _ in lead]
    steps = [b - a for a, b in zip(times, times[1:])]
    m = 0
    while m < len(steps) and steps[m] == tick:
        m += 1
    rest = steps[m:]
    if m == 0 or not rest:
        return lead
    typical = sorted(rest)[len(rest) // 2]
    if typical <= 2 * tick:
        return lead
    return [(times[m] - (m - j) * typical, frame) for j, (_, frame) in enumerate(lead[:m])] + lead[m:]


def _require_finite_audio(path, audio: np.ndarray, rate: int, t0: Fraction) -> None:
    """Raise when the samples hold NaN or inf (the AAC encoder refuses them cryptically)."""
    bad = ~np.isfinite(audio)
    if bad.any():
        first = int(np.argmax(bad))
        raise MediaError(path, f"audio has {int(bad.sum())} non-finite sample(s) (NaN or inf) at {rate} Hz, the "
                               f"first at {float(t0) + first / rate:.2f} s; such audio cannot be encoded or "
                               "trained on (repair the file or leave it out)")


def _strict(stream) -> None:
    # Ask the decoder to fail on damage it would otherwise conceal (see module doc).
    try:
        stream.codec_context.options = {**stream.codec_context.options, "err_detect": "explode"}
    except Exception:  # noqa: BLE001 - an option the decoder lacks is not fatal
        pass


def _decode_any(container, path, max_duration_sec: Optional[float]):
    """Decode both streams in one demux pass; video onto the grid, audio timestamped."""
    vstream, astream = _av_streams(container, path)
    _strict(vstream)
    _strict(astream)
    vstream.thread_type = "AUTO"
    limit = None if max_duration_sec is None else Fraction(max_duration_sec).limit_denominator(10 ** 6)
    # MPEG-TS has no edit lists: its only negative times are FFmpeg's correction of a
    # timestamp wrap (the part before the wrap), which is content, not a lead-in.
    grid = _Grid(path, None, negative_start_is_lead_in="mpegts" not in container.format.name.split(","))
    vrate = _declared_rate(vstream)  # for frames without timestamps and a single frame's duration
    # Ogg: the first frames wait until their spacing is known (`_redate_ogg_start`).
    lead: Optional[list] = [] if "ogg" in container.format.name.split(",") else None
    tick = Fraction(vstream.time_base) if vstream.time_base else None
    last_time, last_duration, intervals = None, None, []
    vindex = 0
    presentation = _PresentationTimes()
    achunks: list[tuple[Optional[Fraction], np.ndarray, int]] = []  # (time, mono samples, their rate)
    audio_past_end = video_past_end = False

    def check(frame, kind, time):
        if getattr(frame, "is_corrupt", False):
            raise MediaError(path, f"{kind} stream is corrupt near {float(time or 0):.2f}s")

    def show(time, frame):
        """One video frame at its presentation time, in presentation order."""
        nonlocal last_time, last_duration, video_past_end
        if grid.t0 is None and limit is not None:
            grid.t_limit = (max(time, Fraction(0)) if grid.negative_start_is_lead_in else time) + limit
        if last_time is not None and time < last_time - _TIMESTAMP_RESET_SEC:
            raise MediaError(path, f"video timestamps jump back from {float(last_time):.2f}s to {float(time):.2f}s "
                                   "(a timestamp reset: concatenated recordings?); re-mux it with continuous times")
        if last_time is not None and time > last_time:
            intervals.append(time - last_time)
        if last_time is None or time > last_time:
            last_time = time
            dur = frame.duration
            last_duration = (Fraction(dur) * Fraction(frame.time_base)
                             if dur and frame.time_base is not None else None)
        grid.push(time, frame)
        if grid.done:
            video_past_end = True

    def present(time, frame):
        if lead is None:
            show(time, frame)
            return
        lead.append((time, frame))
        if len(lead) >= _OGG_LEAD_FRAMES:
            release()

    def release():
        nonlocal lead
        pending, lead = lead, None
        for shown in _redate_ogg_start(pending, tick):
            show(*shown)

    current = "video"
    try:
        for packet in container.demux(vstream, astream):
            is_video = packet.stream is vstream
            if (is_video and video_past_end) or (not is_video and audio_past_end):
                if video_past_end and audio_past_end:
                    break
                continue
            current = "video" if is_video else "audio"
            for frame in packet.decode():
                if is_video:
                    time = _frame_time(frame, vindex, vrate)
                    vindex += 1
                    if time is None:
                        raise MediaError(path, "video frames have no timestamps and the stream no frame rate")
                    check(frame, "video", time)
                    for shown in presentation.push(time, frame):
                        present(*shown)
                else:
                    time = _frame_time(frame, 0, None)
                    check(frame, "audio", time)
                    x = _audio_to_float_planar(frame)
                    mono = x.mean(axis=0, dtype=np.float32) if x.shape[0] > 1 else x[0]
                    achunks.append((time, np.array(mono, dtype=np.float32), int(frame.sample_rate)))
                    if grid.t_limit is not None and time is not None and time > grid.t_limit + 1:
                        audio_past_end = True
        # container.demux ends with an empty packet per stream, whose decode() flushed
        # the decoders (frames held back for reordering / lookahead came out above).
    except av.error.FFmpegError as exc:
        raise MediaError(path, f"{current} stream fails to decode ({exc})") from exc
    for shown in presentation.flush():
        if not video_past_end:
            present(*shown)
    if lead is not None:
        release()
    if grid.t0 is None:
        raise MediaError(path, "video stream has no decodable frames")
    if not achunks:
        raise MediaError(path, "audio stream has no decodable samples")
    # Where the last frame's display ends: its own duration, else the typical spacing;
    # also the typical spacing where its own is under half of that (Ogg VP8: one tick).
    typical = sorted(intervals)[len(intervals) // 2] if intervals else None
    if not last_duration or last_duration <= 0 or (typical is not None and last_duration < typical / 2):
        if typical is not None:
            last_duration = typical
        elif vrate:
            last_duration = 1 / Fraction(vrate)
        else:
            last_duration = Fraction(1, TARGET_FPS)
    t_end = last_time + last_duration
    if grid.t_limit is not None:
        t_end = min(t_end, grid.t_limit)
    grid.finish(t_end)
    if not grid.out:
        raise MediaError(path, "video is shorter than one output frame (1/25 s)")
    return grid, achunks


def _at_one_rate(achunks) -> tuple[list[tuple[Optional[Fraction], np.ndarray]], int]:
    """Audio frames at one sample rate: the highest the stream uses.

    A stream's rate can change mid-stream (broadcast captures, concatenated
    recordings); read at one rate, the other parts would be pitch-shifted and cut. Each
    run of frames at another rate is resampled as one piece (libswresample, no seams
    inside the run) and split back into its frames, so their timestamps still place
    them.
    """
    rate = max(r for _, _, r in achunks)
    out, i = [], 0
    while i < len(achunks):
        j = i
        while j < len(achunks) and achunks[j][2] == achunks[i][2]:
            j += 1
        run, run_rate = achunks[i:j], achunks[i][2]
        if run_rate == rate:
            out.extend((time, x) for time, x, _ in run)
        else:
            y = _resample(np.concatenate([x for _, x, _ in run]), run_rate, rate)
            ends = np.cumsum([len(x) for _, x, _ in run])
            cuts = [0] + [min(len(y), int(round(n * rate / run_rate))) for n in ends]
            out.extend((time, y[a:b]) for (time, _, _), a, b in zip(run, cuts[:-1], cuts[1:]))
        i = j
    return out, rate


def _audio_anchor(achunks, rate: int, jump: int, frames: int = 50) -> Fraction:
    """Time of the stream's first sample, from the timestamps of its first frames.

    Each frame says where the stream starts (its time minus the samples before it);
    the median over the first `frames` frames (until a gap) is used rather than the
    first frame alone: containers with millisecond time bases (mkv/webm) round every
    timestamp, and the first frame's is rounded twice when the decoder moves it past
    the codec delay (Opus pre-skip), which put the audio 1 ms late in the tests.
    """
    estimates, pos, first = [], 0, None
    for time, x in achunks:
        if time is not None:
            if first is not None and abs(int(round((time - first) * rate)) - pos) > jump:
                break  # a gap: later frames do not tell where the first run started
            estimates.append(time - Fraction(pos, rate))
            if first is None:
                first = time
        pos += len(x)
        if len(estimates) >= frames:
            break
    if not estimates:
        return Fraction(0)
    return sorted(estimates)[len(estimates) // 2]


_COMPLETE_TOLERANCE_SEC = 0.15  # end padding, last-frame duration guesses, AAC frames


def _check_complete(path, info, t0: Fraction, video_len: Fraction, audio_len: Fraction,
                    max_duration_sec: Optional[float]) -> None:
    """Raise when the decoded streams end well before the file says they do.

    Demuxers stop quietly at a truncated end or at garbage they cannot resync past
    (matroska does both); without this, such a file would become a shorter example.
    `video_len` / `audio_len` are what was decoded, measured from `t0`. Positions are
    compared in the file's own timeline.
    """
    limit = None if max_duration_sec is None else float(t0) + max_duration_sec
    got = {"video": float(t0 + video_len), "audio": float(t0 + audio_len)}
    want = {"video": info.get("video_end_sec"), "audio": info.get("audio_end_sec")}
    container_end = info.get("container_end_sec")
    checks = [(kind, got[kind], want[kind]) for kind in ("video", "audio") if want[kind]]
    if container_end:
        checks.append(("media", max(got.values()), container_end))
    for kind, have, declared in checks:
        if limit is not None:
            declared = min(declared, limit)
        if have < declared - _COMPLETE_TOLERANCE_SEC:
            raise MediaError(path, f"truncated or damaged: {kind} decodes to {have:.2f}s but the file "
                                   f"declares {declared:.2f}s")


def _place_audio(path, achunks, rate: int, t0: Fraction, report: Optional[dict] = None) -> np.ndarray:
    """Mono samples at `rate` with sample 0 at time `t0` (gaps silent, see module doc).

    The silence inserted for gaps is added up in `report["audio_gap_sec"]`: a demuxer
    that skipped damaged data mid-stream leaves such gaps, and so do legitimate files
    (discontinuous transmission), so it is reported rather than raised. Timestamps
    that go back by more than `_TIMESTAMP_RESET_SEC` (a reset) raise: cutting the
    overlap would silently drop the rest of the stream.
    """
    gap = 0
    jump = max(1, int(round(_AUDIO_JUMP_SEC * rate)))
    first_time = _audio_anchor(achunks, rate, jump)
    pieces, pos = [], 0  # pos: samples written, counted from `first_time`
    for time, x in achunks:
        if time is not None:
            want = int(round((time - first_time) * rate))
            if want - pos > jump:  # a gap in the stream: silence, not a shift of the rest
                pieces.append(np.zeros(want - pos, np.float32))
                gap += want - pos
                pos = want
            elif pos - want > jump:  # overlapping timestamps: drop what was already covered
                if pos - want > _TIMESTAMP_RESET_SEC * rate:
                    raise MediaError(path, f"audio timestamps jump back by {(pos - want) / rate:.2f}s at "
                                           f"{float(time):.2f}s (a timestamp reset: concatenated recordings?); "
                                           "re-mux it with continuous times")
                x = x[pos - want:]
        pieces.append(x)
        pos += len(x)
    audio = np.concatenate(pieces) if pieces else np.zeros(0, np.float32)
    if report is not None:
        report["audio_gap_sec"] = gap / rate
    # Move sample 0 to t0: pad (audio starts after the first frame) or trim.
    shift = int(round((first_time - t0) * rate))
    if shift > 0:
        audio = np.concatenate([np.zeros(shift, np.float32), audio])
    elif shift < 0:
        audio = audio[-shift:]
    return audio


def _resample(audio: np.ndarray, rate: int, target: int = TARGET_SAMPLE_RATE) -> np.ndarray:
    if rate == target or audio.size == 0:
        return audio.astype(np.float32, copy=False)
    resampler = av.AudioResampler(format="flt", layout="mono", rate=target)
    out = []
    step = 1 << 16
    for start in range(0, audio.shape[0], step):
        frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(audio[None, start:start + step]),
                                           format="flt", layout="mono")
        frame.sample_rate = rate
        frame.pts = start
        out.extend(resampler.resample(frame))
    out.extend(resampler.resample(None))
    y = np.concatenate([f.to_ndarray().reshape(-1) for f in out]).astype(np.float32, copy=False)
    # The resampler's length is the input's duration at the target rate (up to rounding).
    return y[:int(round(audio.shape[0] * target / rate))]


def _cpu_has_avx512() -> bool:
    try:
        from numpy._core._multiarray_umath import __cpu_features__
    except ImportError:  # not numpy 2's layout: assume the worst case is not present
        return False
    return bool(__cpu_features__.get("AVX512F"))


@functools.lru_cache(maxsize=1)
def _x264_options() -> dict[str, str]:
    options = dict(_X264_OPTIONS)
    if _cpu_has_avx512():
        # libx264's AVX-512 code paths made repeated encodes of the same frames differ
        # within one process (2 outputs for some clips, e.g. 340x256 fades: mbtree and
        # trellis paths; PyAV 18.1's libx264 on an AMD EPYC). Capped at AVX2 (which every
        # AVX-512 CPU has, with FMA3 / BMI / LZCNT), the output is one, and the same as on
        # CPUs without AVX-512.
        options["x264-params"] = "asm=AVX2,FMA3,BMI1,BMI2,LZCNT"
    return options


def _encode_mp4(frames: list[np.ndarray], audio: np.ndarray) -> bytes:
    """H.264 (libx264, yuv420p) + AAC (mono 16 kHz) mp4, in memory."""
    height, width = frames[0].shape[:2]
    buf = io.BytesIO()
    with av.open(buf, "w", format="mp4") as out:
        vs = out.add_stream("libx264", rate=TARGET_FPS, options=_x264_options())
        vs.width, vs.height, vs.pix_fmt = width, height, "yuv420p"
        vs.codec_context.thread_count = 1
        aus = out.add_stream("aac", rate=TARGET_SAMPLE_RATE, layout="mono")
        aus.bit_rate = _AAC_BIT_RATE
        packets = []
        for k, rgb in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(rgb, format="rgb24")
            frame.pts = k
            frame.time_base = Fraction(1, TARGET_FPS)
            packets.extend(vs.encode(frame))
        packets.extend(vs.encode(None))
        size = 1024  # the AAC frame size; the encoder signals its priming delay itself
        for start in range(0, audio.shape[0], size):
            frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(audio[None, start:start + size]),
                                               format="flt", layout="mono")
            frame.sample_rate = TARGET_SAMPLE_RATE
            frame.pts = start
            frame.time_base = Fraction(1, TARGET_SAMPLE_RATE)
            packets.extend(aus.encode(frame))
        packets.extend(aus.encode(None))
        # Interleave by decode time so that the file plays progressively.
        packets.sort(key=lambda p: (p.dts if p.dts is not None else 0) * p.time_base)
        out.mux(packets)
    return buf.getvalue()


def _conform_open(container, path, max_duration_sec, info, audio_past_video_sec=None) -> ConformedClip:
    grid, achunks = _decode_any(container, path, max_duration_sec)
    info = dict(info)
    rates = sorted({r for _, _, r in achunks})
    if len(rates) > 1:
        info["audio_rates_decoded"] = rates
    achunks, arate = _at_one_rate(achunks)
    placed = _place_audio(path, achunks, arate, grid.t0, info)
    _require_finite_audio(path, placed, arate, grid.t0)  # before resampling spreads them
    _check_complete(path, info, grid.t0, Fraction(len(grid.out), TARGET_FPS), Fraction(len(placed), arate),
                    max_duration_sec)
    audio = _resample(placed, arate)
    if max_duration_sec is not None:
        audio = audio[:int(round(max_duration_sec * TARGET_SAMPLE_RATE))]
    if audio_past_video_sec is not None:
        audio = audio[:_audio_keep(len(grid.out), audio_past_video_sec)]
    if audio.size == 0:
        raise MediaError(path, "audio stream ends before the first video frame")
    info.update(t0_sec=float(grid.t0), audio_rate_decoded=arate, video_frames_decoded=grid.decoded,
                rotation_deg_ignored=grid.rotation,
                audio_start_pad_sec=float(max(Fraction(0), _audio_anchor(achunks, arate, max(1, round(_AUDIO_JUMP_SEC * arate))) - grid.t0)))
    data = _encode_mp4(grid.out, audio)
    n_frames = len(grid.out)
    del grid
    media = decode_media_bytes(data, _display_name(path))
    if media.frames.shape[0] != n_frames:  # the mp4 round trip must keep every frame
        raise MediaError(path, f"re-encoded video has {media.frames.shape[0]} frames, expected {n_frames}")
    return ConformedClip(media.frames, media.audio, data, True, is_silent(media.audio), info)


def _audio_keep(num_frames: int, past_video_sec: float) -> int:
    """Samples from the first frame to `past_video_sec` after the video's end."""
    return num_frames * TARGET_SAMPLE_RATE // TARGET_FPS + int(round(past_video_sec * TARGET_SAMPLE_RATE))


def conform(path, *, max_duration_sec: Optional[float] = None,
            min_duration_sec: Optional[float] = None,
            audio_past_video_sec: Optional[float] = None) -> ConformedClip:
    """Bring a media file to the input contract (25 fps, shorter side 256, 16 kHz mono).

    Args:
      path: any file FFmpeg can read (str, PathLike, or bytes for non-UTF-8 names).
      max_duration_sec: keep at most this much (from the first video frame); a
        conforming file that is longer is re-encoded to be cut.
      min_duration_sec: raise `MediaError` when the result (the shorter of video and
        audio) is shorter than this.
      audio_past_video_sec: when re-encoding, keep at most this much audio past the
        end of the video (None: all of it). A file kept byte for byte keeps all its
        audio (`load_clip` cuts a record's PCM itself).

    Returns:
      `ConformedClip`; see the module doc for timing, scaling and when bytes are kept.

    Raises:
      MediaError: unreadable / damaged file, missing stream, nothing decodable, too short.
    """
    path = os.fspath(path)
    _check_file(path)
    with _open_input(path) as container:
        if "mp4" in container.format.name.split(","):
            box = _truncated_mp4_box(path)
            if box is not None:
                raise MediaError(path, f"truncated: mp4 box {box!r} runs past the end of the file")
        info = _probe_source(container, path)
        keep = _conforms(container, info)
    if keep:
        with _open_input(path) as container:
            media = _decode_container(container, path, None, strict=True)
        _check_complete(path, info, Fraction(0), Fraction(media.frames.shape[0], TARGET_FPS),
                        Fraction(media.audio.shape[0], TARGET_SAMPLE_RATE), None)
        if max_duration_sec is not None and media.frames.shape[0] > round(max_duration_sec * TARGET_FPS):
            keep = False  # cutting needs a re-encode
    if not keep:
        # A fresh demuxer rather than a seek back to 0: decoding Opus-in-mkv after a
        # seek to 0 gave audio 1 ms (48 samples at 48 kHz) later than a fresh open in
        # the tests (observed; the cause inside FFmpeg was not investigated).
        with _open_input(path) as container:
            clip = _conform_open(container, path, max_duration_sec, info, audio_past_video_sec)
    else:
        _require_finite_audio(path, media.audio, TARGET_SAMPLE_RATE, Fraction(0))
        with open(path, "rb") as f:
            data = f.read()
        clip = ConformedClip(media.frames, media.audio, data, False, is_silent(media.audio),
                             dict(info, t0_sec=0.0, audio_rate_decoded=TARGET_SAMPLE_RATE, audio_gap_sec=0.0,
                                  video_frames_decoded=int(media.frames.shape[0]), audio_start_pad_sec=0.0))
    if min_duration_sec is not None and clip.duration_sec < min_duration_sec:
        raise MediaError(path, f"too short: {clip.duration_sec:.2f}s < minimum {min_duration_sec:.2f}s "
                               f"({clip.num_frames} frames, {clip.audio.shape[0]} audio samples)")
    return clip


def load_clip(path, clip_id: Optional[str] = None, labels: Optional[dict] = None,
              max_duration_sec: Optional[float] = None, min_duration_sec: Optional[float] = None):
    """`conform` a file into a `records.ClipRecord` (decoder versions filled in).

    The record does not carry the `silent` flag (the schema has no field for it); call
    `is_silent(record.audio)` or use `conform` directly to decide on silent clips.
    Its PCM ends `RECORD_AUDIO_PAST_VIDEO_SEC` after the video at the latest (module
    doc); a re-encoded mp4 is cut there too, a copied one keeps its bytes.
    """
    from synchformer_jax import records  # local: keeps media importable on its own

    clip = conform(path, max_duration_sec=max_duration_sec, min_duration_sec=min_duration_sec,
                   audio_past_video_sec=RECORD_AUDIO_PAST_VIDEO_SEC)
    audio = clip.audio[:_audio_keep(clip.num_frames, RECORD_AUDIO_PAST_VIDEO_SEC)]
    name = os.fsdecode(os.fspath(path))
    if clip_id is None:
        # Undecodable bytes of a file name become \xNN escapes (records are UTF-8 JSON).
        stem = os.path.splitext(os.path.basename(name))[0]
        clip_id = stem.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    decoder = decoder_versions()
    decoder["conform"] = "re-encoded" if clip.reencoded else "copied"
    return records.ClipRecord(
        clip_id=clip_id, video_mp4=clip.mp4_bytes, audio=audio, fps=clip.fps,
        sample_rate=clip.sample_rate, duration_sec=clip.duration_sec, num_frames=clip.num_frames,
        labels=dict(labels or {}), source=_display_name(path), decoder=decoder)
