"""The Beam pipeline (DirectRunner) writes exactly what the local `prepare` writes."""
from __future__ import annotations

import pytest

pytest.importorskip("apache_beam")

from synchformer_jax import prepare as prep  # noqa: E402
from synchformer_jax import prepare_beam  # noqa: E402
from synchformer_jax.input import shards  # noqa: E402
from tests.test_prepare import make_folder, read_split  # noqa: E402


@pytest.mark.parametrize("fmt", ["array_record", "tfrecord"])
def test_beam_equals_local(tmp_path, fmt):
    src = make_folder(tmp_path / "in", n=4, broken=True, seconds=1.0)
    local = prep.prepare([src], tmp_path / "local", format=fmt, shard_size=2, num_workers=0, progress=False)
    beam = prepare_beam.prepare_beam([src], tmp_path / "beam", format=fmt, shard_size=2)
    assert beam.shards_written == 3 and beam.shards_reused == 0
    assert beam.manifest == local.manifest  # same shard files, sha256, counts, skipped list
    a, b = read_split(tmp_path / "local", "train"), read_split(tmp_path / "beam", "train")
    assert [r.clip_id for r in a] == [r.clip_id for r in b] == ["clip00", "clip02", "sub/clip01", "sub/clip03"]
    for x, y in zip(a, b):
        assert x.video_mp4 == y.video_mp4 and (x.audio == y.audio).all() and x.labels == y.labels
    assert {s["source"] for s in beam.manifest["splits"]["train"]["skipped"]} == {"zero.mp4", "text.mp4"}
    for s in beam.manifest["splits"]["train"]["shards"]:
        assert shards.sha256_file(tmp_path / "beam" / s["file"]) == s["sha256"]


def test_beam_resumes_from_local_journal(tmp_path):
    src = make_folder(tmp_path / "in", n=3, broken=False, seconds=0.5)
    first = prep.prepare([src], tmp_path / "out", shard_size=1, num_workers=0, progress=False)
    # Drop one finished shard (as if the run had been killed before it) and let Beam finish.
    (tmp_path / "out" / first.manifest["splits"]["train"]["shards"][1]["file"]).unlink()
    again = prepare_beam.prepare_beam([src], tmp_path / "out", shard_size=1)
    assert again.shards_written == 1 and again.shards_reused == 2 and again.manifest == first.manifest
