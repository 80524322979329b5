"""Transforms: the official index arithmetic (reference cases and quirks) and the video
normalisation."""
from __future__ import annotations

import collections
import csv
import random

import jax
import numpy as np
import pytest

from synchformer_jax.input import transforms as T
from synchformer_jax.input.melspec import log_mel_np
from synchformer_jax.input.normalize import (model_input_lut, video_uint8_to_model_input,
                                             video_uint8_to_model_input_np)
from tests import decoded_media as dm
from tests import reference_data as rd

GRID = T.class_grid(2.0, 21)


def _official_data_dir(reference_path):
    """`<shared>/official_data` next to `<shared>/reference/tiny` (skip when absent)."""
    path = reference_path.parent.parent / "official_data"
    if not path.is_dir():
        pytest.skip(f"no official data lists at {path}")
    return path


# ----------------------------------------------------------------- reference cases


def _reference_plan(case, media):
    t, h, w = media.frames.shape[:3]
    return T.plan_sync_example(t, media.audio.shape[0], h, w, train=False,
                               offset_sec=float(case["offset_sec"]),
                               v_start_i_sec=float(case["v_start_i_sec"]))


def test_reference_cases_indices_and_labels(reference_path):
    for path in rd.case_files(reference_path):
        with np.load(path) as case:
            name = path.stem
            media = dm.decode_reference_video(reference_path, str(case["video_id"]))
            plan = _reference_plan(case, media)
            crop = plan.temporal
            assert crop.v_start_i == int(case["v_start_i"]), name
            assert crop.a_start_i == int(case["a_start_i"]), name
            assert crop.v_crop_len == int(case["v_crop_len_frames"]), name
            assert crop.a_crop_len == int(case["a_crop_len_samples"]), name
            assert np.array_equal(crop.frame_indices, case["crop_frame_indices"]), name
            assert np.array_equal(plan.segments.v_ranges, case["segment_v_ranges_in_crop"]), name
            assert np.array_equal(plan.segments.a_ranges, case["segment_a_ranges_in_crop"]), name
            assert np.array_equal(plan.segment_frame_indices, case["segment_frame_indices"]), name
            assert tuple(plan.top_left) == tuple(int(v) for v in case["spatial_crop_top_left"]), name
            assert crop.offset_class == int(case["offset_class"]), name
            assert crop.offset_label == case["offset_label_sec"], name
            assert np.asarray(crop.offset_label).dtype == np.float32
            assert np.array_equal(T.class_grid(), case["class_grid_sec"])
            assert plan.flip is False


def test_reference_cases_crops(reference_path):
    for path in rd.case_files(reference_path):
        with np.load(path) as case:
            name = path.stem
            media = dm.decode_reference_video(reference_path, str(case["video_id"]))
            plan = _reference_plan(case, media)
            frames, audio = T.take_temporal_crop(media.frames[:plan.v_len], media.audio[:plan.a_len],
                                                 plan.temporal)
            assert np.array_equal(audio, case["audio_crop"]), name
            cropped = T.crop_frames(frames, plan.top_left, 224)
            sha = dm.frame_sha256(cropped)
            bad = [i for i, (a, b) in enumerate(zip(sha, case["crop_frame_sha256"])) if a != b]
            assert len(sha) == len(case["crop_frame_sha256"]) and not bad, f"{name}: frames {bad[:5]} differ"


def test_reference_cases_model_inputs(reference_path):
    """Decoded file -> plan -> uint8 segments -> device normalisation / host log-mel."""
    normalize = jax.jit(video_uint8_to_model_input)
    for path in rd.case_files(reference_path):
        with np.load(path) as case:
            name = path.stem
            media = dm.decode_reference_video(reference_path, str(case["video_id"]))
            plan = _reference_plan(case, media)
            video_u8, audio_segments = T.apply_plan(media.frames, media.audio, plan)
            assert video_u8.shape == (14, 16, 224, 224, 3) and video_u8.dtype == np.uint8
            assert audio_segments.shape == (14, 10240)
            video = np.asarray(normalize(video_u8))  # [S, 16, 224, 224, 3]
            assert video.dtype == np.float32
            # probe = video_input[0, :, 0, :, 100:104, 100:104] in the official (S,T,C,H,W) layout
            probe = video[:, 0, 100:104, 100:104, :].transpose(0, 3, 1, 2)
            assert np.array_equal(probe, case["video_input_probe"]), name
            # Device gather == host twin everywhere; then the float64 sums of the official
            # tensor from level counts (exact, and much faster than summing 33.7 M floats).
            assert np.array_equal(video, video_uint8_to_model_input_np(video_u8)), name
            del video
            counts = np.bincount(video_u8.ravel(), minlength=256).astype(np.float64)
            lut = model_input_lut(True).astype(np.float64)
            assert abs(counts @ lut - float(case["video_input_sum_f64"])) < 1e-6, name
            assert abs(counts @ lut ** 2 - float(case["video_input_sumsq_f64"])) < 1e-6, name
            mel = log_mel_np(audio_segments)[None]
            assert mel.shape == case["audio_input"].shape
            diff = np.abs(mel - case["audio_input"]).max()
            assert diff < 1e-4, f"{name}: audio input max |diff| {diff}"


def test_reference_spatial_crop_and_equalify(reference_path):
    for path in dm.decoded_reference_files(reference_path):
        with np.load(path) as ref:
            t, _, h, w = (int(v) for v in ref["decoded_rgb_shape_TCHW"])
            assert T.center_crop_top_left(h, w, 224) == tuple(int(v) for v in ref["spatial_crop_top_left"])
            v_len, a_len = T.equalify_from_right(t, ref["audio_decoded"].shape[0], float(ref["video_fps"]),
                                                 int(ref["audio_fps"]))
            assert (v_len, a_len) == (250, 160000), path.stem


# ------------------------------------------------------------------ normalisation


def test_video_normalisation_lut_matches_official(reference_path):
    official = rd.constants(reference_path)["rgb_u8_to_model_input_lut"]
    assert np.array_equal(model_input_lut(True), official)
    levels = np.arange(256, dtype=np.uint8).reshape(2, 8, 16)
    assert np.array_equal(np.asarray(jax.jit(video_uint8_to_model_input)(levels)).ravel(), official)
    assert np.array_equal(video_uint8_to_model_input_np(levels).ravel(), official)


def test_video_normalisation_float16_quirk():
    half, full = model_input_lut(True), model_input_lut(False)
    assert half[0] == -1.0 and half[255] == 1.0 and half[128] == 0.00390625
    assert np.array_equal(full, ((np.arange(256, dtype=np.float32) / np.float32(255) - np.float32(0.5))
                                 / np.float32(0.5)))
    # The float16 path differs from float32 on all but two levels (by up to 4.9e-4).
    assert (half != full).sum() == 254
    assert np.abs(half - full).max() < 5e-4
    with pytest.raises(TypeError):
        video_uint8_to_model_input(np.zeros((2, 2), np.float32))


# ------------------------------------------------------------------------- quirks


def test_sec2frames_truncates():
    assert 2.28 * 25 < 57
    assert T.sec2frames(2.28, 25) == 56
    assert T.sec2frames(0.64 * 10, 25) == 160
    assert T.sec2frames(16 / 25, 16000) == 10240


# (clip, offset_sec, vstart_sec, v_start_i, a_start_i) from the official VGGSound fixed-offset
# test list: the first two rows start one frame early (x.xx * 25 = n - 1e-14).
FIXED_ROWS = [
    ("-7tYmeOmsRg_180000_190000", -2.0, 2.28, 56, 4479),
    ("-0pJqpNjft4_267000_277000", -1.6, 4.6, 114, 47999),
    ("--U7joUcTCo_0_10000", 1.4, 0.8, 20, 35200),
    ("3qesirWAGt4 (reference)", -1.6, 2.0, 50, 6399),
    ("ZYc410CE4Rg (reference)", 0.4, 1.3, 32, 27200),
]


@pytest.mark.parametrize("clip,offset,vstart,v_start_i,a_start_i", FIXED_ROWS)
def test_fixed_offset_branch(clip, offset, vstart, v_start_i, a_start_i):
    crop = T.temporal_crop_and_offset(250, 160000, offset_sec=offset, v_start_i_sec=vstart)
    assert (crop.v_start_i, crop.a_start_i) == (v_start_i, a_start_i), clip
    assert crop.v_start_i_sec == vstart and crop.offset_sec == round(offset, 2)
    assert crop.offset_class == int(np.argmin(np.abs(GRID - np.float32(offset))))
    assert crop.a_jitter_i == 0 and crop.is_synchronizable is None


def test_fixed_offsets_file_vggsound(reference_path):
    path = (_official_data_dir(reference_path) / "fixed_offsets_vggsound"
            / "test_size21_crop5_min-2.00_max2.00.csv")
    rows = list(csv.DictReader(path.open()))
    assert len(rows) > 10000
    early = 0
    for row in rows:
        off, vstart = float(row["offset_sec"]), float(row["vstart_sec"])
        crop = T.temporal_crop_and_offset(250, 160000, offset_sec=off, v_start_i_sec=vstart)
        assert crop.v_start_i == int(vstart * 25)
        assert crop.a_start_i == int((vstart + round(off, 2)) * 16000)
        assert GRID[crop.offset_class] == np.float32(off) == crop.offset_label
        assert 0 <= crop.v_start_i and crop.v_end_i <= 250 and crop.a_end_i <= 160000
        early += crop.v_start_i != round(vstart * 25)
    # ~5 % of the official rows start one frame (40 ms) before `vstart_sec`.
    assert 0.03 < early / len(rows) < 0.08, early


def test_negative_audio_start_clamp():
    # Up to one frame of samples (640) before the audio is clamped to 0, more is an error.
    assert T.temporal_crop_and_offset(250, 160000, offset_sec=-0.04, v_start_i_sec=0.0).a_start_i == 0
    assert T.temporal_crop_and_offset(250, 160000, offset_sec=-0.02, v_start_i_sec=0.0).a_start_i == 0
    with pytest.raises(ValueError, match="before the audio"):
        T.temporal_crop_and_offset(250, 160000, offset_sec=-0.2, v_start_i_sec=0.0)
    # The offset is rounded to 2 decimals first: -0.0449 -> -0.04 -> clamped.
    assert T.temporal_crop_and_offset(250, 160000, offset_sec=-0.0449, v_start_i_sec=0.0).a_start_i == 0


def test_fixed_args_must_come_together():
    with pytest.raises(ValueError, match="both"):
        T.temporal_crop_and_offset(250, 160000, offset_sec=0.4)
    with pytest.raises(ValueError, match="rng"):
        T.temporal_crop_and_offset(250, 160000)


def test_class_grid_matches_official(reference_path):
    assert np.array_equal(GRID, rd.constants(reference_path)["class_grid_sec"])


def test_class_grid_and_quantize():
    assert np.array_equal(GRID, np.linspace(-2.0, 2.0, 21).astype(np.float32))
    assert GRID.dtype == np.float32 and GRID[10] == 0.0
    for k, value in enumerate(GRID.tolist()):
        # grid values go through round(., 2) in the random branch: -1.600000023841858 -> -1.6
        assert T.quantize_offset(GRID, round(value, 2))[1] == k
        assert T.quantize_offset(GRID, round(value, 2) + 0.04)[1] == k
    assert T.quantize_offset(GRID, 5.0)[1] == 20 and T.quantize_offset(GRID, -4.48)[1] == 0
    with pytest.raises(ValueError):
        T.class_grid(2.0, 2)


def test_equalify_from_right():
    assert T.equalify_from_right(393, 251904) == (250, 160000)  # 15.7 s LRS3 clip -> 10 s
    # 9.6 s of video, 9.375 s of audio: shorter stream wins, 640 samples per frame.
    assert T.equalify_from_right(240, 150000) == (234, 234 * 640)
    assert T.equalify_from_right(250, 160768) == (250, 160000)


def test_center_crop_bankers_rounding():
    assert T.center_crop_top_left(256, 454) == (16, 115)
    assert T.center_crop_top_left(256, 340) == (16, 58)
    assert T.center_crop_top_left(257, 227) == (16, 2)  # 16.5 -> 16, 1.5 -> 2 (half to even)
    assert T.center_crop_top_left(259, 229) == (18, 2)  # 17.5 -> 18, 2.5 -> 2
    with pytest.raises(ValueError):
        T.center_crop_top_left(200, 300)


def test_random_crop():
    rng = random.Random(0)
    seen = set()
    for _ in range(500):
        i, j = T.spatial_crop(256, 340, 224, rng)
        assert 0 <= i <= 32 and 0 <= j <= 116
        seen.add((i == 0, i == 32))
    assert (True, False) in seen and (False, True) in seen  # both ends are reachable
    # Same size: no draw is consumed (keeps the official random stream aligned).
    rng = random.Random(1)
    state = rng.getstate()
    assert T.spatial_crop(224, 224, 224, rng) == (0, 0)
    assert rng.getstate() == state
    frames = np.arange(2 * 256 * 340 * 3, dtype=np.int64).reshape(2, 256, 340, 3)
    out = T.crop_frames(frames, (5, 7), 224)
    assert out.shape == (2, 224, 224, 3) and out[0, 0, 0, 0] == frames[0, 5, 7, 0]


def _random_crops(n, seed_rng, jitter, v_len=250, a_len=160000):
    return [T.temporal_crop_and_offset(v_len, a_len, max_jitter_sec=jitter, rng=seed_rng)
            for _ in range(n)]


def test_random_branch_invariants():
    rng = random.Random(1234)
    classes = collections.Counter()
    for crop in _random_crops(3000, rng, jitter=0.05):
        off = crop.offset_sec
        assert GRID[crop.offset_class] == crop.offset_label
        assert round(float(crop.offset_label), 2) == off  # label on the grid
        assert 0 <= crop.v_start_i and crop.v_end_i <= 250
        assert 0 <= crop.a_start_i and crop.a_end_i <= 160000
        assert crop.v_start_i_sec == crop.v_start_i / 25  # snapped in the random branch
        nominal = max(0, int((crop.v_start_i / 25 + off) * 16000))
        assert crop.a_start_i - crop.a_jitter_i == nominal
        assert abs(crop.a_jitter_i) <= 800
        classes[crop.offset_class] += 1
    assert sorted(classes) == list(range(21))


def test_jitter_never_changes_the_label():
    # Offset and start are drawn before the jitter, so the same seed gives the same
    # offset / start with and without jitter; only the audio start moves.
    moved = 0
    for seed in range(300):
        a = T.temporal_crop_and_offset(250, 160000, max_jitter_sec=0.0, rng=random.Random(seed))
        b = T.temporal_crop_and_offset(250, 160000, max_jitter_sec=0.05, rng=random.Random(seed))
        assert (a.offset_class, a.offset_label, a.offset_sec) == (b.offset_class, b.offset_label, b.offset_sec)
        assert (a.v_start_i, a.v_start_i_sec) == (b.v_start_i, b.v_start_i_sec)
        assert b.a_start_i - a.a_start_i == b.a_jitter_i
        moved += b.a_jitter_i != 0
    assert moved > 250
    with pytest.raises(ValueError, match="half the class step"):
        T.temporal_crop_and_offset(250, 160000, max_jitter_sec=0.2, rng=0)


def test_jitter_stays_inside_the_audio():
    # Crop at the very start / end of the audio: the jitter can only move inwards.
    rng = random.Random(7)
    for _ in range(200):
        first = T.temporal_crop_and_offset(250, 160000, offset_sec=0.0, v_start_i_sec=0.0,
                                           max_jitter_sec=0.05, rng=rng)
        assert 0 <= first.a_jitter_i <= 800
        last = T.temporal_crop_and_offset(250, 160000, offset_sec=0.0, v_start_i_sec=5.0,
                                          max_jitter_sec=0.05, rng=rng)
        assert -800 <= last.a_jitter_i <= 0 and last.a_end_i <= 160000


def test_random_branch_seeded_reproducibility():
    for make in (lambda: random.Random(99), lambda: np.random.default_rng(99)):
        a = _random_crops(50, make(), 0.05)
        b = _random_crops(50, make(), 0.05)
        assert a == b
    assert _random_crops(20, random.Random(1), 0.05) != _random_crops(20, random.Random(2), 0.05)
    # numpy Generators obey the same invariants.
    for crop in _random_crops(500, np.random.default_rng(5), 0.05):
        assert 0 <= crop.a_start_i and crop.a_end_i <= 160000 and crop.v_end_i <= 250


def test_random_branch_short_clips():
    with pytest.raises(ValueError, match="not longer"):
        T.temporal_crop_and_offset(125, 80000, rng=0)
    # 5.5 s clip: only offsets with |off| <= 0.5 s fit; others are an error, as officially.
    ok, failed = 0, 0
    rng = random.Random(3)
    for _ in range(200):
        try:
            crop = T.temporal_crop_and_offset(137, 137 * 640, rng=rng)
        except ValueError:
            failed += 1
        else:
            ok += 1
            assert abs(crop.offset_sec) <= 0.5 + 1e-9
    assert ok and failed



@pytest.mark.parametrize("case", ["stage_one", "train", "test", "fixed", "synchronizability"])
def test_a_clip_too_short_because_of_its_audio_says_so(case):
    """10 s of video with 3 s of audio: the crop sees 75 frames after trimming both
    streams to the shorter, and the reason must blame the audio, not the video (it said
    "video of 75 frames is not longer than the 125-frame crop" after the audio part)."""
    kwargs = {"train": case in ("stage_one", "train", "synchronizability"), "rng": np.random.default_rng(0)}
    if case == "fixed":
        kwargs.update(train=False, rng=None, offset_sec=0.0, v_start_i_sec=4.0)
    if case == "synchronizability":
        kwargs["synchronizability"] = True
    plan = T.plan_segment_avclip_example if case == "stage_one" else T.plan_sync_example
    with pytest.raises(ValueError) as err:
        plan(250, 3 * 16000, 256, 256, **kwargs)
    message = str(err.value)
    assert message.startswith("audio of 3.00 s (48000 samples) is shorter than the video of 10.00 s (250 frames): "
                              "after trimming both streams to the shorter one (75 frames), "), message
    assert "video of 75" not in message and "outside 75 frames" not in message, message
    tail = {"stage_one": "75 frames / 48000 samples cannot hold 14 segments of 16 frames",
            "fixed": "the video crop [100, 225) is outside those 75 frames",
            "synchronizability": "75 frames are not longer than the 112-frame crop"}
    assert message.endswith(tail.get(case, "75 frames are not longer than the 125-frame crop")), message


def test_a_short_video_is_reported_as_it_was():
    with pytest.raises(ValueError, match=r"^video of 75 frames is not longer than the 125-frame crop$"):
        T.plan_sync_example(75, 10 * 16000, 256, 256, train=True, rng=np.random.default_rng(0))
    with pytest.raises(ValueError, match=r"^video crop \[100, 225\) is outside 75 frames$"):
        T.plan_sync_example(75, 10 * 16000, 256, 256, train=False, offset_sec=0.0, v_start_i_sec=4.0)
    # The building blocks keep their own (stream-named) messages.
    with pytest.raises(ValueError, match=r"^video of 75 frames is not longer than the 125-frame crop$"):
        T.temporal_crop_and_offset(75, 48000, rng=0)


# ------------------------------------------------------------------------ segments


def test_generate_segments_test_time():
    seg = T.generate_segments(125, 80000, n_segments=14, step_size_seg=0.5)
    assert seg.v_start_i == 2 and seg.a_start_i == 1280
    assert seg.v_ranges[0].tolist() == [2, 18] and seg.v_ranges[-1].tolist() == [106, 122]
    assert seg.a_ranges[0].tolist() == [1280, 11520] and seg.a_ranges[-1].tolist() == [67840, 78080]
    assert (np.diff(seg.v_ranges[:, 0]) == 8).all() and (np.diff(seg.a_ranges[:, 0]) == 5120).all()
    # Video segment k spans the same time as audio segment k.
    assert np.array_equal(seg.v_ranges * 640, seg.a_ranges)
    assert seg.frame_indices.shape == (14, 16)
    assert T.generate_segments(125, 80000, step_size_seg=0.5).n_segments == 14  # as many as fit
    with pytest.raises(ValueError, match="cannot make"):
        T.generate_segments(125, 80000, n_segments=15)


def test_generate_segments_random_start():
    rng = random.Random(0)
    starts = collections.Counter(T.generate_segments(125, 80000, n_segments=14, is_start_random=True,
                                                     rng=rng).v_start_i for _ in range(600))
    assert sorted(starts) == [0, 1, 2, 3, 4, 5]


def test_generate_segments_stage_one_jitter():
    seg = T.generate_segments(250, 160000, n_segments=14, step_size_seg=1.0)
    assert seg.v_start_i == (250 - 224) // 2 == 13 and seg.a_start_i == 13 * 640
    assert (np.diff(seg.v_ranges[:, 0]) == 16).all() and (np.diff(seg.a_ranges[:, 0]) == 10240).all()
    rng = random.Random(4)
    shifts = set()
    for _ in range(400):
        s = T.generate_segments(250, 160000, n_segments=14, step_size_seg=1.0, is_start_random=True,
                                audio_jitter_sec=0.05, rng=rng)
        # one shared shift, bounded by 0.05 s and by the audio on both sides
        assert np.array_equal(s.a_ranges - s.v_ranges * 640, np.full((14, 2), s.a_jitter_i))
        assert abs(s.a_jitter_i) <= min(800, s.a_start_i, 160000 - s.a_start_i - 143360)
        assert s.a_ranges.min() >= 0 and s.a_ranges.max() <= 160000
        shifts.add(np.sign(s.a_jitter_i))
    assert shifts == {-1, 0, 1}


# -------------------------------------------------------------- synchronizability


def test_synchronizability_crop_geometry():
    assert T.synchronizability_crop_len_sec(13, 16, 0.5, 25) == 4.48
    crop = T.synchronizability_crop(250, 160000, offset_sec=0.4, v_start_i_sec=1.0)
    assert (crop.v_crop_len, crop.a_crop_len) == (112, 71680)
    assert crop.is_synchronizable is True and crop.offset_class == 12
    seg = T.generate_segments(crop.v_crop_len, crop.a_crop_len, n_segments=13)
    assert seg.v_start_i == 0 and seg.v_ranges[-1, 1] == 112 and seg.a_ranges[-1, 1] == 71680


def test_synchronizability_sampling():
    rng = random.Random(2024)
    n, positives, signs = 4000, 0, collections.Counter()
    for _ in range(n):
        crop = T.synchronizability_crop(250, 160000, rng=rng)
        assert 0 <= crop.v_start_i and crop.v_end_i <= 250
        assert 0 <= crop.a_start_i and crop.a_end_i <= 160000
        if crop.is_synchronizable:
            positives += 1
            assert GRID[crop.offset_class] == crop.offset_label
            assert round(float(crop.offset_label), 2) == crop.offset_sec
        else:
            assert abs(crop.offset_sec) == 4.48
            signs[np.sign(crop.offset_sec)] += 1
            # Audio and video crops do not overlap (up to 1 sample of int() truncation).
            v0, v1 = crop.v_start_i * 640, crop.v_end_i * 640
            a0, a1 = crop.a_start_i, crop.a_end_i
            assert min(v1, a1) - max(v0, a0) <= 1
    assert abs(positives / n - 0.5) < 0.04, positives  # 5 sigma
    assert signs[-1] > 0.4 * (n - positives) and signs[1] > 0.4 * (n - positives)


def test_synchronizability_jitter_and_seed():
    a = [T.synchronizability_crop(250, 160000, max_jitter_sec=0.05, rng=random.Random(s)) for s in range(50)]
    b = [T.synchronizability_crop(250, 160000, max_jitter_sec=0.05, rng=random.Random(s)) for s in range(50)]
    assert a == b
    assert all(abs(c.a_jitter_i) <= 800 and 0 <= c.a_start_i and c.a_end_i <= 160000 for c in a)


# -------------------------------------------------------------------- whole plans


def _synthetic_stream(t=250, n=160000):
    frames = np.zeros((t, 256, 340, 3), np.uint8)
    frames[..., 0] = (np.arange(t) % 256)[:, None, None]  # red channel = frame index
    frames[..., 1] = (np.arange(340) % 256)[None, None, :]  # green channel = column
    audio = np.arange(n, dtype=np.float32)
    return frames, audio


def test_plan_train_and_apply():
    frames, audio = _synthetic_stream()
    plans = [T.plan_sync_example(250, 160000, 256, 340, train=True, rng=random.Random(s)) for s in range(40)]
    again = [T.plan_sync_example(250, 160000, 256, 340, train=True, rng=random.Random(s)) for s in range(40)]
    assert plans == again
    assert plans != [T.plan_sync_example(250, 160000, 256, 340, train=True, rng=random.Random(s + 1))
                     for s in range(40)]
    assert {p.flip for p in plans} == {True, False}
    for p in plans[:6]:
        video, aud = T.apply_plan(frames, audio, p)
        assert video.shape == (14, 16, 224, 224, 3) and aud.shape == (14, 10240)
        assert np.array_equal(video[:, :, 0, 0, 0], p.segment_frame_indices % 256)
        cols = video[0, 0, 0, :, 1].astype(int)
        j = p.top_left[1]
        expected = np.arange(j, j + 224) % 256
        assert np.array_equal(cols, expected[::-1] if p.flip else expected)
        assert np.array_equal(aud[:, 0], p.segment_sample_starts.astype(np.float32))
        assert np.array_equal(np.diff(aud, axis=1), np.ones((14, 10239), np.float32))
    with pytest.raises(ValueError, match="rng"):
        T.plan_sync_example(250, 160000, 256, 340, train=True)


def test_plan_test_time_fixed():
    p = T.plan_sync_example(250, 160768, 256, 454, train=False, offset_sec=-2.0, v_start_i_sec=4.0)
    # Worked example of the spec: segment k uses frames 102+8k.., samples 33280+5120k..
    assert p.segment_frame_indices[:, 0].tolist() == [102 + 8 * k for k in range(14)]
    assert p.segment_sample_starts.tolist() == [33280 + 5120 * k for k in range(14)]
    assert p.temporal.offset_class == 0 and p.top_left == (16, 115) and not p.flip


def test_plan_stage_three_and_one():
    p = T.plan_sync_example(250, 160000, 256, 340, train=True, rng=3, synchronizability=True)
    assert p.segments.n_segments == 13 and p.temporal.is_synchronizable in (True, False)
    assert p.segment_frame_indices.shape == (13, 16)
    q = T.plan_segment_avclip_example(250, 160000, 256, 340, train=False)
    assert q.temporal is None and q.segment_frame_indices[0, 0] == 13
    assert q.segment_frame_indices[-1, -1] == 13 + 223
    frames, audio = _synthetic_stream()
    video, aud = T.apply_plan(frames, audio, q)
    assert video.shape == (14, 16, 224, 224, 3) and aud.shape == (14, 10240)
    r = T.plan_segment_avclip_example(250, 160000, 256, 340, train=True, rng=random.Random(0))
    assert 0 <= r.segment_frame_indices[0, 0] <= 26


def test_host_audio_pipeline_shapes():
    _, audio = _synthetic_stream()
    p = T.plan_sync_example(250, 160000, 256, 340, train=False, offset_sec=0.0, v_start_i_sec=0.0)
    _, aud = T.apply_plan(np.zeros((250, 256, 340, 3), np.uint8), np.sin(audio / 50).astype(np.float32), p)
    assert log_mel_np(aud).shape == (14, 1, 128, 66)
