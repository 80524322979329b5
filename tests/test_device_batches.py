"""Host batches -> global arrays on the 8 fake CPU devices (tests/conftest.py)."""
import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from synchformer_jax.input import device, normalize, pipeline as pl


def _rows(n, *shape, dtype=np.float32):
    """Row r is filled with r, so a shard's rows identify themselves."""
    return (np.arange(n).reshape((n,) + (1,) * len(shape)) * np.ones(shape)).astype(dtype)


def test_make_mesh_shapes_and_auto_axes():
    assert jax.device_count() == 8
    m1 = device.make_mesh()
    assert m1.shape == {"data": 8} and m1.axis_types == (jax.sharding.AxisType.Auto,)
    m2 = device.make_mesh((-1, 2), ("data", "fsdp"))
    assert dict(m2.shape) == {"data": 4, "fsdp": 2}
    assert m2.axis_types == (jax.sharding.AxisType.Auto,) * 2
    with pytest.raises(ValueError):
        device.make_mesh((3, 2), ("data", "fsdp"))
    with pytest.raises(ValueError):
        device.make_mesh((8,), ("data", "fsdp"))


def test_global_batch_rows_land_on_their_devices():
    mesh = device.make_mesh()
    batch = {"video": _rows(16, 3, 4, 4, 3, dtype=np.uint8), "label": np.arange(16, dtype=np.int32),
             "mask": np.ones(16, bool), "meta": {"clip_id": np.array([str(i) for i in range(16)])}}
    g = device.host_to_global(batch, mesh)
    assert set(g) == {"video", "label", "mask"}  # meta stays on the host
    assert g["video"].shape == (16, 3, 4, 4, 3) and g["video"].dtype == np.uint8
    assert g["label"].sharding.spec == P("data")
    for shard in g["video"].addressable_shards:
        rows = np.arange(16)[shard.index[0]]
        assert len(rows) == 2
        np.testing.assert_array_equal(np.asarray(shard.data)[:, 0, 0, 0, 0], rows)
        # The mesh's device order decides which rows a device holds.
        pos = list(mesh.devices.flat).index(shard.device)
        np.testing.assert_array_equal(rows, [2 * pos, 2 * pos + 1])
    np.testing.assert_array_equal(np.asarray(g["label"]), batch["label"])


@pytest.mark.parametrize("batch_axes,rows_per_device", [(("data",), 2), (("data", "fsdp"), 1)])
def test_two_dimensional_mesh(batch_axes, rows_per_device):
    mesh = device.make_mesh((4, 2), ("data", "fsdp"))
    x = _rows(8, 5)
    g = device.host_to_global({"x": x}, mesh, batch_axes)["x"]
    for shard in g.addressable_shards:
        data = np.asarray(shard.data)
        assert data.shape == (rows_per_device, 5)
        np.testing.assert_array_equal(data[:, 0], np.arange(8)[shard.index[0]])
    np.testing.assert_array_equal(np.asarray(g), x)


def test_indivisible_batch_is_an_error():
    mesh = device.make_mesh()
    with pytest.raises(ValueError, match="does not split"):
        device.host_to_global({"x": np.zeros((6, 2))}, mesh)
    with pytest.raises(ValueError, match="scalar"):
        device.host_to_global({"x": np.float32(1)}, mesh)


def test_assemble_on_device_keeps_the_batch_sharding():
    """The device-side segmenting / normalising runs on the sharded global batch."""
    mesh = device.make_mesh()
    layout = pl.SegmentLayout(n_segments=3, frame_stride=2, sample_stride=160, segment_frames=4,
                              segment_samples=320)
    rng = np.random.default_rng(0)
    batch = {"video": rng.integers(0, 256, (8, layout.video_span, 6, 6, 3), dtype=np.uint8),
             "audio": rng.normal(0, 0.1, (8, layout.audio_span)).astype(np.float32)}
    g = device.host_to_global(batch, mesh)
    video, audio = pl.assemble_on_device(g, layout)
    assert video.shape == (8, 3, 4, 3, 6, 6) and audio.shape == (8, 3, 1, 128, 66)
    assert video.sharding.spec == P("data") and audio.sharding.spec == P("data")
    ref, _ = pl.assemble_on_device(batch, layout)  # unsharded, same numbers
    np.testing.assert_array_equal(np.asarray(video), np.asarray(ref))
    # Segment k of example b is span frames [2k, 2k + 4), channels first.
    np.testing.assert_array_equal(np.asarray(video)[1, 2], normalize.video_uint8_to_model_input_np(
        np.moveaxis(batch["video"][1, 4:8], -1, -3)))
