"""Write a `torch.save`-style zip checkpoint without torch (test helper).

The real format is covered by fixtures written by torch itself (`make_torch_fixtures.py`);
this writer lets tests build checkpoints of any model size on the fly. It pickles
tensors as torch does, as `torch._utils._rebuild_tensor_v2(storage, offset, size,
stride, requires_grad, hooks)` with `('storage', torch.FloatStorage, key, 'cpu', numel)`
persistent ids, by registering stand-in modules under torch's names while pickling.
"""
from __future__ import annotations

import collections
import contextlib
import io
import pickle
import sys
import types
import zipfile

import numpy as np

_STORAGES = {np.dtype(np.float32): "FloatStorage", np.dtype(np.int64): "LongStorage",
             np.dtype(np.float16): "HalfStorage", np.dtype(np.float64): "DoubleStorage"}


@contextlib.contextmanager
def _fake_torch():
    torch = types.ModuleType("torch")
    utils = types.ModuleType("torch._utils")

    def _rebuild_tensor_v2(*args):  # never called: only its name is pickled
        raise AssertionError

    _rebuild_tensor_v2.__module__ = "torch._utils"
    _rebuild_tensor_v2.__qualname__ = "_rebuild_tensor_v2"
    utils._rebuild_tensor_v2 = _rebuild_tensor_v2
    for name in _STORAGES.values():
        cls = type(name, (), {"__module__": "torch", "__qualname__": name})
        setattr(torch, name, cls)
    torch._utils = utils
    saved = {k: sys.modules.get(k) for k in ("torch", "torch._utils")}
    sys.modules.update({"torch": torch, "torch._utils": utils})
    try:
        yield torch, utils
    finally:
        for k, v in saved.items():
            if v is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = v


class _Tensor:
    def __init__(self, array: np.ndarray, key: str):
        self.array, self.key = np.asarray(array, order="C"), key  # keeps 0-d tensors 0-d


def write_torch_zip(path, obj) -> None:
    """`obj`: nested dicts/lists of plain values and numpy arrays (the tensors)."""
    storages: dict[str, np.ndarray] = {}

    with _fake_torch() as (torch, utils):
        def convert(x):
            if isinstance(x, np.ndarray):
                key = str(len(storages))
                storages[key] = x
                return _Tensor(x, key)
            if isinstance(x, dict):
                return collections.OrderedDict((k, convert(v)) for k, v in x.items())
            if isinstance(x, list):
                return [convert(v) for v in x]
            return x

        class Pickler(pickle.Pickler):
            def persistent_id(self, o):
                if isinstance(o, tuple) and len(o) == 2 and o[0] == "__storage__":
                    a, key = storages[o[1]], o[1]
                    return ("storage", getattr(torch, _STORAGES[a.dtype]), key, "cpu", a.size)
                return None

            def reducer_override(self, o):
                if isinstance(o, _Tensor):
                    a = o.array
                    stride = tuple(s // a.itemsize for s in a.strides) if a.ndim else ()
                    return utils._rebuild_tensor_v2, (("__storage__", o.key), 0, a.shape, stride, False,
                                                      collections.OrderedDict())
                return NotImplemented

        buf = io.BytesIO()
        Pickler(buf, protocol=2).dump(convert(obj))
    root = str(path).rsplit("/", 1)[-1].rsplit(".", 1)[0]
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        z.writestr(f"{root}/data.pkl", buf.getvalue())
        z.writestr(f"{root}/byteorder", "little")
        for key, a in storages.items():
            z.writestr(f"{root}/data/{key}", a.astype(a.dtype.newbyteorder("<")).tobytes())
        z.writestr(f"{root}/version", "3\n")
