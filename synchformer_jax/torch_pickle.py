"""Read PyTorch ``torch.save`` files without PyTorch and without running pickled code.

Why this module exists
----------------------
The official Synchformer checkpoints are ``torch.save`` files.  Besides the weights they
contain a pickled OmegaConf ``DictConfig`` (``args``), numpy scalars (``metrics``) and
optimizer state, so ``torch.load(weights_only=True)`` refuses them and
``torch.load(weights_only=False)`` would execute whatever the pickle asks for (a pickle
is a small program: ``GLOBAL os system`` + ``REDUCE`` runs a shell command).  The JAX
port must read these files on machines without torch, and must never run code from a
downloaded file.  So we interpret the pickle ourselves:

* ``pickle.Unpickler.find_class`` is overridden with an explicit allow-list.  Every
  allowed name maps to *our own* small, argument-checking stand-in (never the real
  class or function), so ``REDUCE``/``NEWOBJ``/``BUILD`` on an allowed name can only
  build inert data.  Any other global (``os.system``, ``builtins.eval``,
  ``builtins.getattr``, ``torch.load`` ...) raises :class:`UnsafePickleError` *while the
  opcode is being decoded*, i.e. before anything it could have called runs.  There is no
  fallback to the default ``find_class``.
* Every object our stand-ins return is either a plain builtin value (whose ``BUILD``
  fails: no ``__dict__``) or a ``_Stub`` whose ``__setstate__`` refuses, except the few
  stand-ins that legitimately receive state (OmegaConf objects, ``OrderedDict``,
  ``numpy.dtype``, numpy arrays) and which only *store* that state as data.
* Tensors are rebuilt lazily: the pickle yields ``_Tensor`` stubs that reference storage
  keys; after the pickle is parsed the raw storage bytes are read (zip entry or legacy
  trailer) and each stub becomes a fresh C-contiguous ``numpy.ndarray``.  This also works
  for the legacy format, where storage bytes come *after* the pickle.
* The object graph is finally converted to plain Python data: ``OrderedDict`` ->
  ``dict``, OmegaConf containers -> ``dict``/``list``/values (read from their pickled
  ``__dict__``, without importing omegaconf), numpy scalar stubs -> numpy scalars, and
  globals that only appear as *values* (e.g. ``typing.Any``) -> their dotted name.

File formats (facts about the format; no code copied from PyTorch)
------------------------------------------------------------------
* Zip format (torch >= 1.6 default): a zip archive with one root folder whose name is
  arbitrary (torch uses the file stem, e.g. ``24-01-04T16-39-21/``).  ``<root>/data.pkl``
  is the pickle; ``<root>/data/<key>`` holds the raw bytes of storage ``<key>``;
  ``<root>/byteorder`` (``little``/``big``, absent in older files = little) gives the byte
  order of those bytes.  Persistent ids are ``('storage', storage_type, key, location,
  numel)`` where ``storage_type`` is a typed-storage class (``torch.FloatStorage``) or
  ``torch.UntypedStorage`` (numel then counts bytes and the tensor's dtype comes from
  ``_rebuild_tensor_v3``).
* Legacy format (``_use_new_zipfile_serialization=False`` or torch < 1.6): five
  consecutive pickles -- magic number ``0x1950a86a20f9469cfc6c``, protocol version
  ``1001``, a sys-info dict, the object (persistent ids have a 6th ``view_metadata``
  field), the list of storage keys -- followed, for every key in that list, by an
  8-byte little-endian element count and the raw little-endian storage bytes.
"""

from __future__ import annotations

import io
import json
import math
import os
import pickle
import re
import struct
import tarfile
import zipfile
from typing import Any, Callable

import numpy as np

__all__ = [
    "TorchFileError",
    "UnsafePickleError",
    "load_torch_file",
    "load_state_dict_file",
]


class TorchFileError(ValueError):
    """The file is missing, not a ``torch.save`` file, truncated or corrupted."""


class UnsafePickleError(ValueError):
    """The pickle asks for a global (or an operation) outside the data-only allow-list."""


# Internal exceptions: raised deep inside the unpickler/stand-ins (which do not know the
# file name) and turned into the public ones, with the path, by the entry points.
class _Unsafe(Exception):
    pass


class _Corrupt(Exception):
    pass


_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL = 1001


# --------------------------------------------------------------------------------------
# dtypes
# --------------------------------------------------------------------------------------
# Typed storage classes as they appear in pickles (``torch.FloatStorage`` ...), mapped to
# our dtype names.  ``UntypedStorage`` is raw bytes; the tensor dtype then comes from the
# ``_rebuild_tensor_v3`` argument.
_STORAGE_CLASS_DTYPES = {
    "DoubleStorage": "float64",
    "FloatStorage": "float32",
    "HalfStorage": "float16",
    "BFloat16Storage": "bfloat16",
    "LongStorage": "int64",
    "IntStorage": "int32",
    "ShortStorage": "int16",
    "CharStorage": "int8",
    "ByteStorage": "uint8",
    "BoolStorage": "bool",
    "ComplexFloatStorage": "complex64",
    "ComplexDoubleStorage": "complex128",
    "UntypedStorage": "uint8",
}

# ``torch.<name>`` dtype objects (pickled by name, e.g. ``GLOBAL torch float8_e4m3fn``).
_TORCH_DTYPE_NAMES = {
    "float64": "float64", "double": "float64",
    "float32": "float32", "float": "float32",
    "float16": "float16", "half": "float16",
    "bfloat16": "bfloat16",
    "int64": "int64", "long": "int64",
    "int32": "int32", "int": "int32",
    "int16": "int16", "short": "int16",
    "int8": "int8",
    "uint8": "uint8",
    "uint16": "uint16", "uint32": "uint32", "uint64": "uint64",
    "bool": "bool",
    "complex64": "complex64", "cfloat": "complex64",
    "complex128": "complex128", "cdouble": "complex128",
    "float8_e4m3fn": "float8_e4m3fn", "float8_e5m2": "float8_e5m2",
    "float8_e4m3fnuz": "float8_e4m3fnuz", "float8_e5m2fnuz": "float8_e5m2fnuz",
}

# numpy has no bfloat16/float8; ml_dtypes (a jax dependency) provides them.
_ML_DTYPES = {"bfloat16", "float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz"}


def _np_dtype(name: str) -> np.dtype:
    """Native-byte-order numpy dtype for one of our dtype names."""
    if name in _ML_DTYPES:
        try:
            import ml_dtypes  # noqa: PLC0415 - optional, only needed for these dtypes
        except ImportError as e:  # pragma: no cover - ml_dtypes ships with jax
            raise _Corrupt(
                f"tensor dtype {name} needs the 'ml_dtypes' package (installed with jax), "
                "which is not importable"
            ) from e
        return np.dtype(getattr(ml_dtypes, name))
    return np.dtype(name)


# --------------------------------------------------------------------------------------
# Stand-ins for allowed globals
# --------------------------------------------------------------------------------------
class _Stub:
    """Base of every inert object the unpickler can produce.

    ``BUILD`` calls ``__setstate__`` when it exists; ours refuses, so a pickle cannot
    poke state into our helper objects (e.g. replace the function a stand-in runs).
    """

    __slots__ = ()

    def __setstate__(self, state):
        raise _Unsafe(f"BUILD (setting state) on {type(self).__name__} is not allowed")

    def __reduce__(self):  # never let these leak into a re-pickle by accident
        raise TypeError(f"{type(self).__name__} cannot be pickled")


class _SafeGlobal(_Stub):
    """An allowed global: a name plus our own checked implementation.

    It is both a value (e.g. ``__builtin__.dict`` as OmegaConf's ``object_type``) and a
    callable for ``REDUCE``; calling runs only ``impl``, which validates its arguments.
    """

    __slots__ = ("qualname", "impl")

    def __init__(self, qualname: str, impl: Callable[..., Any] | None):
        object.__setattr__(self, "qualname", qualname)
        object.__setattr__(self, "impl", impl)

    def __setattr__(self, name, value):
        raise _Unsafe(f"cannot modify allowed global {self.qualname}")

    def __call__(self, *args, **kwargs):
        if self.impl is None:
            raise _Unsafe(f"{self.qualname} may appear as a value but must not be called")
        if kwargs:
            raise _Unsafe(f"keyword arguments to {self.qualname} are not allowed")
        return self.impl(*args)

    def __repr__(self):
        return f"<allowed global {self.qualname}>"


class _Frozen(type):
    """Metaclass: a pickle must not be able to set attributes on our stand-in classes."""

    def __setattr__(cls, name, value):
        raise _Unsafe(f"cannot modify stand-in class {cls.__name__}")

    def __delattr__(cls, name):
        raise _Unsafe(f"cannot modify stand-in class {cls.__name__}")


class _StateHolder(metaclass=_Frozen):
    """Stand-in for a class that pickles as ``NEWOBJ`` (no args) + ``BUILD(__dict__)``.

    Used for the OmegaConf classes.  ``__new__`` refuses arguments (so ``REDUCE``/
    ``NEWOBJ`` cannot smuggle data into a constructor) and ``__setstate__`` only stores
    the state dict; interpretation happens later, in :func:`_to_plain`.
    """

    __slots__ = ("state",)
    qualname = "?"

    def __new__(cls, *args, **kwargs):
        if args or kwargs:
            raise _Unsafe(f"{cls.qualname} must be created without arguments")
        self = object.__new__(cls)
        self.state = None
        return self

    def __setstate__(self, state):
        if isinstance(state, tuple) and len(state) == 2 and state[1] is None:
            state = state[0]
        if not isinstance(state, dict):
            raise _Corrupt(f"{self.qualname}: expected a dict as pickled state, got {type(state).__name__}")
        self.state = state

    def __reduce__(self):
        raise TypeError(f"{type(self).__name__} cannot be pickled")


def _holder_class(qualname: str, kind: str) -> type:
    ns = {"__slots__": (), "qualname": qualname, "kind": kind}
    return _Frozen(f"_{qualname.rsplit('.', 1)[-1]}", (_StateHolder,), ns)


class _OrderedDict(dict):
    """Stand-in for ``collections.OrderedDict``/``defaultdict`` while unpickling.

    State dicts are ``OrderedDict`` s with a ``_metadata`` attribute that arrives via
    ``BUILD``; we accept and drop that state (no ``setattr`` on anything).
    """

    __slots__ = ()

    def __setstate__(self, state):
        if isinstance(state, tuple) and len(state) == 2:  # (dict_state, slot_state)
            state = state[0]
        if state is not None and not isinstance(state, dict):
            raise _Corrupt(f"OrderedDict: unexpected pickled state of type {type(state).__name__}")

    def __reduce__(self):
        raise TypeError("_OrderedDict cannot be pickled")


class _Sentinel(_Stub):
    """An allowed global that is only ever a value (``typing.Any``, ``torch.Tensor`` ...)."""

    __slots__ = ("qualname",)

    def __init__(self, qualname: str):
        object.__setattr__(self, "qualname", qualname)

    def __repr__(self):
        return f"<{self.qualname}>"


class _StorageType(_Sentinel):
    """``torch.FloatStorage`` & co. (or a ``torch.<dtype>``): carries the dtype name."""

    __slots__ = ("dtype", "untyped")

    def __init__(self, qualname: str, dtype: str, untyped: bool = False):
        super().__init__(qualname)
        object.__setattr__(self, "dtype", dtype)
        object.__setattr__(self, "untyped", untyped)


class _Storage(_Stub):
    """One storage (a flat buffer) referenced by persistent id.

    ``root`` is the storage whose bytes are in the file; legacy-format *views* (a torch
    < 0.4 feature) point into a root at ``elem_offset``.
    """

    __slots__ = ("key", "dtype", "numel", "root", "elem_offset", "data", "users")

    def __init__(self, key, dtype, numel, root=None, elem_offset=0):
        self.key = key
        self.dtype = dtype
        self.numel = numel
        self.root = root if root is not None else self
        self.elem_offset = elem_offset
        self.data = None  # bytearray once read
        self.users = 0  # number of distinct tensors built on the root

    @property
    def itemsize(self) -> int:
        return _np_dtype(self.dtype).itemsize


class _Tensor(_Stub):
    """A tensor waiting for its storage bytes: ``(storage, offset, size, stride, dtype)``."""

    __slots__ = ("storage", "offset", "size", "stride", "dtype")

    def __init__(self, storage, offset, size, stride, dtype):
        self.storage = storage
        self.offset = offset
        self.size = size
        self.stride = stride
        self.dtype = dtype


class _Value(_Stub):
    """A finished numpy value (scalar or array) kept behind a stub until conversion."""

    __slots__ = ("value",)

    def __init__(self, value):
        self.value = value


class _NumpyDType(_Stub):
    """``numpy.dtype(spec, align, copy)`` + ``BUILD(state)``; only simple dtypes allowed."""

    __slots__ = ("spec", "byteorder")
    _SPEC = re.compile(r"^[biufc][0-9]{1,2}$|^[US][0-9]{1,9}$")

    def __init__(self, spec, align=False, copy=False):
        if isinstance(spec, bytes):
            spec = spec.decode("ascii", "replace")
        if not isinstance(spec, str) or not self._SPEC.match(spec):
            raise _Corrupt(f"unsupported numpy dtype {spec!r} (only bool/int/uint/float/complex/str)")
        self.spec = spec
        self.byteorder = "="

    def __setstate__(self, state):
        # (version, byteorder, subarray, names, fields, elsize, alignment, flags[, metadata])
        if not isinstance(state, tuple) or len(state) < 8:
            raise _Corrupt("numpy.dtype: unexpected pickled state")
        if any(x is not None for x in state[2:5]):
            raise _Corrupt("numpy.dtype: structured/sub-array dtypes are not supported")
        if state[1] not in ("<", ">", "|", "="):
            raise _Corrupt(f"numpy.dtype: bad byte order {state[1]!r}")
        self.byteorder = state[1]

    def to_numpy(self) -> np.dtype:
        order = "" if self.byteorder in ("|", "=") else self.byteorder
        return np.dtype(order + self.spec)


class _NumpyArray(_Stub):
    """``numpy.core.multiarray._reconstruct(ndarray, (0,), b'b')`` + ``BUILD(state)``."""

    __slots__ = ("value",)

    def __init__(self):
        self.value = None

    def __setstate__(self, state):
        # (version, shape, dtype, is_fortran, raw_bytes)
        if not isinstance(state, tuple) or len(state) != 5:
            raise _Corrupt("numpy array: unexpected pickled state")
        _, shape, dtype, fortran, raw = state
        if not isinstance(dtype, _NumpyDType):
            raise _Corrupt("numpy array: dtype is not a numpy.dtype")
        if not isinstance(raw, (bytes, bytearray)):
            raise _Corrupt("numpy array: only raw-byte (non-object) arrays are supported")
        self.value = _array_from_bytes(raw, dtype.to_numpy(), shape, "F" if fortran else "C")


def _check_shape(shape, what="shape") -> tuple[int, ...]:
    if not isinstance(shape, (tuple, list)) or len(shape) > 64:
        raise _Corrupt(f"bad {what} {shape!r}")
    if not all(type(d) is int and d >= 0 for d in shape):
        raise _Corrupt(f"bad {what} {shape!r}")
    return tuple(shape)


def _array_from_bytes(raw, dtype: np.dtype, shape, order="C") -> np.ndarray:
    shape = _check_shape(shape)
    n = math.prod(shape)
    if len(raw) != n * dtype.itemsize:
        raise _Corrupt(f"numpy array data has {len(raw)} bytes, expected {n * dtype.itemsize}")
    return np.frombuffer(raw, dtype=dtype, count=n).reshape(shape, order=order).copy(order="C")


# ---- implementations behind _SafeGlobal ----------------------------------------------
_PLAIN_TYPES = frozenset({type(None), bool, int, float, complex, str, bytes, range, slice})


def _require(cond: bool, what: str):
    if not cond:
        raise _Unsafe(f"disallowed arguments to {what}")


def _impl_ordered_dict(items=()):
    _require(isinstance(items, (list, tuple)), "collections.OrderedDict")
    d = _OrderedDict()
    for kv in items:
        _require(isinstance(kv, (list, tuple)) and len(kv) == 2, "collections.OrderedDict")
        d[kv[0]] = kv[1]
    return d


def _impl_defaultdict(factory=None, *rest):
    # The factory (e.g. ``__builtin__.dict``) is only recorded by a real defaultdict; we
    # never call it and return an ordinary mapping.
    _require(not rest, "collections.defaultdict")
    return _OrderedDict()


def _impl_dict(items=()):
    _require(isinstance(items, (list, tuple, dict)), "builtins.dict")
    return dict(items)


def _impl_seq(kind):
    def impl(items=()):
        _require(isinstance(items, (list, tuple, set, frozenset)), f"builtins.{kind.__name__}")
        return kind(items)

    return impl


def _impl_number(kind):
    def impl(*args):
        ok = len(args) <= 2 and all(isinstance(a, (bool, int, float, str, bytes)) for a in args)
        _require(ok, f"builtins.{kind.__name__}")
        if kind is int and len(args) == 2:
            _require(isinstance(args[0], (str, bytes)) and type(args[1]) is int, "builtins.int")
        return kind(*args)

    return impl


def _impl_str(*args):
    _require(len(args) <= 1 and all(isinstance(a, (str, int, float, bool)) for a in args), "builtins.str")
    return str(*args)


def _latin1(encoding) -> bool:
    return isinstance(encoding, str) and encoding.lower().replace("_", "-") in ("latin1", "latin-1", "iso-8859-1")


def _impl_bytes(*args):
    # ``bytes()`` / ``bytes(b'..')`` / ``bytes([ints])`` / ``bytes(str, 'latin-1')``
    if not args:
        return b""
    if len(args) == 1:
        a = args[0]
        ints = isinstance(a, (list, tuple)) and all(type(b) is int for b in a)
        _require(isinstance(a, bytes) or ints, "builtins.bytes")
        return bytes(a)
    _require(len(args) == 2 and isinstance(args[0], str) and _latin1(args[1]), "builtins.bytes")
    return args[0].encode("latin-1")


def _impl_bytearray(*args):
    return bytearray(_impl_bytes(*args))


def _impl_slice_range(kind):
    def impl(*args):
        _require(1 <= len(args) <= 3 and all(a is None or type(a) is int for a in args), f"builtins.{kind.__name__}")
        return kind(*args)

    return impl


def _impl_codecs_encode(obj, encoding="utf-8", errors="strict"):
    # Protocol-2 pickles store ``bytes`` as ``_codecs.encode(str, 'latin1')``.
    _require(isinstance(obj, str) and _latin1(encoding) and errors == "strict", "_codecs.encode")
    return obj.encode("latin-1")


def _impl_np_scalar(dtype, data=None):
    _require(isinstance(dtype, _NumpyDType) and isinstance(data, (bytes, bytearray)), "numpy.core.multiarray.scalar")
    dt = dtype.to_numpy()
    if len(data) != dt.itemsize:
        raise _Corrupt(f"numpy scalar of dtype {dt} has {len(data)} bytes")
    return _Value(np.frombuffer(bytes(data), dtype=dt, count=1)[0])


def _impl_np_reconstruct(subtype, shape, dtype_char):
    ok = isinstance(subtype, _Sentinel) and subtype.qualname == "numpy.ndarray"
    _require(ok, "numpy.core.multiarray._reconstruct")
    return _NumpyArray()


def _impl_np_frombuffer(buf, dtype, shape, order):
    ok = isinstance(buf, (bytes, bytearray)) and isinstance(dtype, _NumpyDType) and order in ("C", "F")
    _require(ok, "numpy.core.numeric._frombuffer")
    return _Value(_array_from_bytes(buf, dtype.to_numpy(), shape, order))


def _impl_np_dtype(*args):
    _require(1 <= len(args) <= 3, "numpy.dtype")
    return _NumpyDType(*args)


def _tensor(storage, offset, size, stride, dtype_name=None):
    if not isinstance(storage, _Storage):
        raise _Unsafe("tensor rebuild: first argument is not a storage from this file")
    if type(offset) is not int or offset < 0:
        raise _Corrupt(f"tensor rebuild: bad storage offset {offset!r}")
    size = _check_shape(size, "tensor size")
    stride = _check_shape(stride, "tensor stride")
    if len(size) != len(stride):
        raise _Corrupt(f"tensor rebuild: size {size} and stride {stride} differ in length")
    t = _Tensor(storage, offset, size, stride, dtype_name or storage.dtype)
    storage.root.users += 1
    return t


def _impl_rebuild_tensor(storage, offset, size, stride):
    return _tensor(storage, offset, size, stride)


def _impl_rebuild_tensor_v2(storage, offset, size, stride, requires_grad=False, backward_hooks=None, metadata=None):
    return _tensor(storage, offset, size, stride)


def _impl_rebuild_tensor_v3(storage, offset, size, stride, requires_grad, backward_hooks, dtype, metadata=None):
    ok = isinstance(dtype, _StorageType) and dtype.qualname.startswith("torch.")
    _require(ok, "torch._utils._rebuild_tensor_v3")
    return _tensor(storage, offset, size, stride, dtype.dtype)


def _impl_rebuild_parameter(data, requires_grad=True, backward_hooks=None, state=None):
    _require(isinstance(data, _Tensor), "torch._utils._rebuild_parameter")
    return data  # a Parameter is just its data for us


_TENSOR_REBUILDERS: set[str] = set()  # qualnames usable inside _rebuild_from_type_v2


def _impl_rebuild_from_type_v2(func, new_type, args, state):
    # Tensors carrying Python attributes pickle as
    # ``_rebuild_from_type_v2(_rebuild_tensor_v2, torch.Tensor, args, state)``.
    what = "torch._tensor._rebuild_from_type_v2"
    _require(isinstance(func, _SafeGlobal) and func.qualname in _TENSOR_REBUILDERS, what)
    tensor_types = ("torch.Tensor", "torch.nn.parameter.Parameter")
    _require(isinstance(new_type, _Sentinel) and new_type.qualname in tensor_types, what)
    _require(isinstance(args, tuple), what)
    return func(*args)


def _impl_torch_size(dims=()):
    return _check_shape(dims, "torch.Size")


def _impl_torch_device(kind, index=None):
    _require(isinstance(kind, str) and (index is None or type(index) is int), "torch.device")
    return kind if index is None else f"{kind}:{index}"


def _impl_pure_path(flavour):
    import pathlib  # noqa: PLC0415 - pure paths never touch the file system

    cls = pathlib.PureWindowsPath if flavour == "windows" else pathlib.PurePosixPath

    def impl(*parts):
        _require(all(isinstance(p, str) for p in parts), "pathlib path")
        return str(cls(*parts))

    return impl


def _build_allow_list() -> dict[tuple[str, str], Any]:
    allow: dict[tuple[str, str], Any] = {}

    def add(modules, name, obj):
        for m in (modules if isinstance(modules, tuple) else (modules,)):
            allow[(m, name)] = obj

    def g(qualname, impl):
        return _SafeGlobal(qualname, impl)

    add("collections", "OrderedDict", g("collections.OrderedDict", _impl_ordered_dict))
    add("collections", "defaultdict", g("collections.defaultdict", _impl_defaultdict))
    builtins_ = ("builtins", "__builtin__")
    add(builtins_, "dict", g("builtins.dict", _impl_dict))
    add(builtins_, "list", g("builtins.list", _impl_seq(list)))
    add(builtins_, "tuple", g("builtins.tuple", _impl_seq(tuple)))
    add(builtins_, "set", g("builtins.set", _impl_seq(set)))
    add(builtins_, "frozenset", g("builtins.frozenset", _impl_seq(frozenset)))
    add(builtins_, "int", g("builtins.int", _impl_number(int)))
    add(builtins_, "long", g("builtins.int", _impl_number(int)))
    add(builtins_, "float", g("builtins.float", _impl_number(float)))
    add(builtins_, "complex", g("builtins.complex", _impl_number(complex)))
    add(builtins_, "bool", g("builtins.bool", _impl_number(bool)))
    add(builtins_, "str", g("builtins.str", _impl_str))
    add(builtins_, "unicode", g("builtins.str", _impl_str))
    add(builtins_, "bytes", g("builtins.bytes", _impl_bytes))
    add(builtins_, "bytearray", g("builtins.bytearray", _impl_bytearray))
    add(builtins_, "slice", g("builtins.slice", _impl_slice_range(slice)))
    add(builtins_, "range", g("builtins.range", _impl_slice_range(range)))
    add("_codecs", "encode", g("_codecs.encode", _impl_codecs_encode))

    np_mods = ("numpy.core.multiarray", "numpy._core.multiarray")
    add(np_mods, "scalar", g("numpy.core.multiarray.scalar", _impl_np_scalar))
    add(np_mods, "_reconstruct", g("numpy.core.multiarray._reconstruct", _impl_np_reconstruct))
    np_numeric = ("numpy.core.numeric", "numpy._core.numeric")
    add(np_numeric, "_frombuffer", g("numpy.core.numeric._frombuffer", _impl_np_frombuffer))
    add("numpy", "dtype", g("numpy.dtype", _impl_np_dtype))
    add("numpy", "ndarray", _Sentinel("numpy.ndarray"))

    for name in ("_rebuild_tensor", "_rebuild_tensor_v2", "_rebuild_tensor_v3"):
        _TENSOR_REBUILDERS.add(f"torch._utils.{name}")
    for module, name, impl in (
        ("torch._utils", "_rebuild_tensor", _impl_rebuild_tensor),
        ("torch._utils", "_rebuild_tensor_v2", _impl_rebuild_tensor_v2),
        ("torch._utils", "_rebuild_tensor_v3", _impl_rebuild_tensor_v3),
        ("torch._utils", "_rebuild_parameter", _impl_rebuild_parameter),
        ("torch._utils", "_rebuild_parameter_with_state", _impl_rebuild_parameter),
        ("torch._tensor", "_rebuild_from_type_v2", _impl_rebuild_from_type_v2),
    ):
        add(module, name, g(f"{module}.{name}", impl))
    add("torch", "Tensor", _Sentinel("torch.Tensor"))
    add(("torch.nn.parameter", "torch.nn"), "Parameter", _Sentinel("torch.nn.parameter.Parameter"))
    add("torch", "Size", g("torch.Size", _impl_torch_size))
    add("torch", "device", g("torch.device", _impl_torch_device))
    for cls_name, dt in _STORAGE_CLASS_DTYPES.items():
        untyped = cls_name == "UntypedStorage"
        add("torch", cls_name, _StorageType(f"torch.{cls_name}", dt, untyped))
    add("torch.storage", "UntypedStorage", _StorageType("torch.storage.UntypedStorage", "uint8", True))
    for name, dt in _TORCH_DTYPE_NAMES.items():
        add("torch", name, _StorageType(f"torch.{name}", dt))

    # OmegaConf: rebuilt from their pickled __dict__, omegaconf itself is never imported.
    add("omegaconf.dictconfig", "DictConfig", _holder_class("omegaconf.dictconfig.DictConfig", "dict"))
    add("omegaconf.listconfig", "ListConfig", _holder_class("omegaconf.listconfig.ListConfig", "list"))
    for node in ("AnyNode", "StringNode", "IntegerNode", "FloatNode", "BooleanNode", "BytesNode", "PathNode"):
        add("omegaconf.nodes", node, _holder_class(f"omegaconf.nodes.{node}", "node"))
    add("omegaconf.nodes", "ValueNode", _holder_class("omegaconf.nodes.ValueNode", "node"))
    add("omegaconf.base", "ContainerMetadata", _holder_class("omegaconf.base.ContainerMetadata", "meta"))
    add("omegaconf.base", "Metadata", _holder_class("omegaconf.base.Metadata", "meta"))
    for name in ("Any", "Dict", "List", "Tuple"):
        add("typing", name, _Sentinel(f"typing.{name}"))
    for name in ("PosixPath", "PurePosixPath"):
        add("pathlib", name, g(f"pathlib.{name}", _impl_pure_path("posix")))
    for name in ("WindowsPath", "PureWindowsPath"):
        add("pathlib", name, g(f"pathlib.{name}", _impl_pure_path("windows")))
    return allow


_ALLOWED = _build_allow_list()


# --------------------------------------------------------------------------------------
# The unpickler
# --------------------------------------------------------------------------------------
class _Context:
    """What one file's unpickling collects: storages by key, legacy views by key."""

    def __init__(self, legacy: bool):
        self.legacy = legacy
        self.storages: dict[str, _Storage] = {}
        self.views: dict[str, _Storage] = {}


class _RestrictedUnpickler(pickle.Unpickler):
    """``find_class`` = allow-list lookup, ``persistent_load`` = storage references.

    Both are consulted by the C unpickler for every ``GLOBAL``/``STACK_GLOBAL``/``INST``/
    ``OBJ``/``EXT*`` opcode and every ``PERSID``/``BINPERSID``; the default
    ``find_class`` (which imports modules) is never reached.
    """

    def __init__(self, file, ctx: _Context | None):
        super().__init__(file, encoding="utf-8")
        self._ctx = ctx

    def find_class(self, module, name):
        obj = _ALLOWED.get((module, name))
        if obj is None:
            raise _Unsafe(
                f"refusing to unpickle global '{module}.{name}': it is not on the allow-list of "
                "data-only names (the file may be malicious, or uses a type this reader does not support)"
            )
        return obj

    def persistent_load(self, pid):
        ctx = self._ctx
        if ctx is None:
            raise _Corrupt("unexpected persistent id outside the object pickle")
        if not isinstance(pid, tuple) or not pid or pid[0] not in ("storage", b"storage"):
            raise _Corrupt(f"unsupported persistent id {pid!r:.80}")
        expected = 6 if ctx.legacy else 5
        if len(pid) != expected:
            raise _Corrupt(f"persistent id has {len(pid)} fields, expected {expected}")
        stype, key, _location, numel = pid[1:5]
        if isinstance(key, bytes):
            key = key.decode("ascii", "replace")
        if not isinstance(stype, _StorageType):
            raise _Unsafe("persistent id does not name a torch storage type")
        if not isinstance(key, str) or type(numel) is not int or numel < 0:
            raise _Corrupt(f"bad storage reference {pid!r:.80}")
        st = ctx.storages.get(key)
        if st is None:
            st = ctx.storages[key] = _Storage(key, stype.dtype, numel)
        elif st.dtype != stype.dtype or st.numel != numel:
            raise _Corrupt(f"storage {key} referenced with inconsistent dtype/size")
        view = pid[5] if ctx.legacy else None
        if view is None:
            return st
        # Legacy storage views: (view_key, element offset, element count) into root ``st``.
        if not (isinstance(view, tuple) and len(view) == 3):
            raise _Corrupt("bad legacy storage view metadata")
        vkey, voff, vsize = view
        ints = type(voff) is int and type(vsize) is int
        if not (isinstance(vkey, str) and ints and voff >= 0 and vsize >= 0 and voff + vsize <= numel):
            raise _Corrupt("bad legacy storage view metadata")
        v = ctx.views.get(vkey)
        if v is None:
            v = ctx.views[vkey] = _Storage(vkey, st.dtype, vsize, root=st, elem_offset=voff)
        return v


def _unpickle(f, ctx: _Context | None):
    return _RestrictedUnpickler(f, ctx).load()


# --------------------------------------------------------------------------------------
# Storage bytes
# --------------------------------------------------------------------------------------
def _read_exact(f, n: int, what: str) -> bytearray:
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        k = f.readinto(view[got:])
        if not k:
            raise _Corrupt(f"truncated file: {what} has {got} of {n} bytes")
        got += k
    return buf


def _read_zip_storages(zf: zipfile.ZipFile, root: str, ctx: _Context):
    for key, st in ctx.storages.items():
        name = f"{root}data/{key}"
        try:
            info = zf.getinfo(name)
        except KeyError:
            raise _Corrupt(f"storage data/{key} missing from the archive") from None
        nbytes = st.numel * st.itemsize
        if info.file_size != nbytes:
            raise _Corrupt(
                f"storage data/{key} has {info.file_size} bytes, expected {nbytes} ({st.numel} x {st.dtype})"
            )
        with zf.open(info) as f:
            st.data = _read_exact(f, nbytes, f"storage data/{key}")


def _read_legacy_storages(f, ctx: _Context):
    size = os.fstat(f.fileno()).st_size

    def remaining(fh):
        return size - fh.tell()

    keys = _unpickle(f, None)
    if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
        raise _Corrupt("legacy storage key list is not a list of strings")
    for key in keys:
        st = ctx.storages.get(key)
        if st is None:
            raise _Corrupt(f"legacy storage {key} is not referenced by the pickle")
        head = f.read(8)
        if len(head) != 8:
            raise _Corrupt(f"truncated file: storage {key} header missing")
        (count,) = struct.unpack("<q", head)
        if count != st.numel:
            raise _Corrupt(f"storage {key} holds {count} elements, the pickle says {st.numel}")
        if count * st.itemsize > remaining(f):  # check before allocating the buffer
            raise _Corrupt(f"truncated file: storage {key} needs {count * st.itemsize} bytes, {remaining(f)} left")
        st.data = _read_exact(f, count * st.itemsize, f"storage {key}")


# --------------------------------------------------------------------------------------
# Tensors and conversion to plain data
# --------------------------------------------------------------------------------------
def _materialize(t: _Tensor, big_endian: bool) -> np.ndarray:
    st = t.storage
    root = st.root
    if root.data is None:
        raise _Corrupt(f"storage data/{root.key} missing")
    dtype = _np_dtype(t.dtype)
    isz = dtype.itemsize
    base_bytes = st.elem_offset * root.itemsize
    avail = (st.numel * st.itemsize) // isz  # elements of the tensor dtype in this storage
    n = math.prod(t.size)
    if n == 0:
        return np.zeros(t.size, dtype=dtype)
    last = t.offset + sum((d - 1) * s for d, s in zip(t.size, t.stride))
    if last >= avail:
        raise _Corrupt(f"tensor (offset {t.offset}, size {t.size}, stride {t.stride}) exceeds storage {root.key}")
    flat = np.frombuffer(root.data, dtype=dtype, count=avail, offset=base_bytes)
    contiguous = all(s == math.prod(t.size[i + 1:]) for i, (d, s) in enumerate(zip(t.size, t.stride)) if d != 1)
    if root.users == 1 and st is root and t.offset == 0 and contiguous and n * isz == len(root.data):
        # Sole user of a whole storage: hand the freshly read buffer over (no copy; this
        # halves peak memory on the 1 GB official checkpoint).  Nothing else can alias it.
        arr = flat.reshape(t.size)
    else:
        strides = tuple(s * isz for s in t.stride)
        view = np.lib.stride_tricks.as_strided(flat[t.offset:], shape=t.size, strides=strides, writeable=False)
        arr = np.array(view, dtype=dtype, order="C", copy=True)
    if big_endian and isz > 1:
        arr.byteswap(inplace=True)
    return arr


def _to_plain(obj, big_endian: bool):
    memo: dict[int, Any] = {}
    keep: list[Any] = []  # keeps converted sources alive so id() keys stay unique

    def conv(o):
        if type(o) in _PLAIN_TYPES:
            return o
        oid = id(o)
        if oid in memo:
            return memo[oid]
        keep.append(o)
        if isinstance(o, _Tensor):
            r = memo[oid] = _materialize(o, big_endian)
            return r
        if isinstance(o, dict):  # dict, _OrderedDict
            r = memo[oid] = {}
            for k, v in o.items():
                r[conv(k)] = conv(v)
            return r
        if isinstance(o, list):
            r = memo[oid] = []
            r.extend(conv(x) for x in o)
            return r
        if isinstance(o, tuple):
            r = memo[oid] = tuple(conv(x) for x in o)
            return r
        if isinstance(o, (set, frozenset)):
            r = memo[oid] = type(o)(conv(x) for x in o)
            return r
        if isinstance(o, bytearray):
            r = memo[oid] = bytearray(o)
            return r
        if isinstance(o, _StateHolder):
            r = memo[oid] = conv_omegaconf(o)
            return r
        if isinstance(o, (_Value, _NumpyArray)):
            if o.value is None:
                raise _Corrupt("numpy array without data")
            r = memo[oid] = o.value
            return r
        if isinstance(o, _NumpyDType):
            r = memo[oid] = o.to_numpy()
            return r
        if isinstance(o, _Storage):  # a bare storage: its elements as a flat array
            t = _Tensor(o, 0, (o.numel,), (1,), o.dtype)
            o.root.users += 2  # never hand the raw buffer over here
            r = memo[oid] = _materialize(t, big_endian)
            return r
        if isinstance(o, (_SafeGlobal, _Sentinel)):
            return o.qualname  # a global used as a value (e.g. typing.Any)
        if isinstance(o, type) and issubclass(o, _StateHolder):
            return o.qualname
        raise _Corrupt(f"unexpected object of type {type(o).__name__} in pickle")

    def conv_omegaconf(o: _StateHolder):
        state = o.state or {}
        kind = type(o).kind
        if kind == "node":
            return conv(state.get("_val"))
        if kind == "meta":
            return None  # metadata objects only appear inside containers; dropped
        content = state.get("_content")
        # A container's content may be None (null config) or a string: '???' (missing)
        # or an unresolved '${...}' interpolation.  Keep those as the value.
        if content is None or isinstance(content, str):
            return content
        if kind == "dict":
            if not isinstance(content, dict):
                raise _Corrupt("DictConfig content is not a dict")
            return {conv(k): conv(v) for k, v in content.items()}
        if not isinstance(content, list):
            raise _Corrupt("ListConfig content is not a list")
        return [conv(v) for v in content]

    return conv(obj)


# --------------------------------------------------------------------------------------
# Entry points
# --------------------------------------------------------------------------------------
def _zip_root(zf: zipfile.ZipFile) -> str:
    names = zf.namelist()
    pkl = [n for n in names if n.endswith("data.pkl") and n.count("/") == 1 and n.split("/")[1] == "data.pkl"]
    if len(pkl) != 1:
        if any(n.endswith("constants.pkl") for n in names):
            raise _Corrupt("TorchScript archive (torch.jit.save) is not supported; use torch.save files")
        if not pkl:
            raise _Corrupt("zip archive without <root>/data.pkl: not a torch.save file")
        raise _Corrupt(f"zip archive with several data.pkl files: {pkl[:4]}")
    return pkl[0][: -len("data.pkl")]


def _load_zip(path: str):
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, EOFError, OSError) as e:
        raise _Corrupt(f"truncated or corrupted zip archive ({e})") from None
    with zf:
        root = _zip_root(zf)
        big_endian = False
        if f"{root}byteorder" in zf.namelist():
            order = zf.read(f"{root}byteorder").decode("ascii", "replace").strip()
            if order not in ("little", "big"):
                raise _Corrupt(f"unknown byteorder {order!r}")
            big_endian = order == "big"
        ctx = _Context(legacy=False)
        obj = _unpickle(io.BytesIO(zf.read(f"{root}data.pkl")), ctx)
        _read_zip_storages(zf, root, ctx)
    return obj, big_endian


def _load_legacy(path: str):
    with open(path, "rb") as f:
        magic = _unpickle(f, None)
        if magic != _LEGACY_MAGIC:
            raise _Corrupt("not a torch.save file (no torch magic number)")
        proto = _unpickle(f, None)
        if proto != _LEGACY_PROTOCOL:
            raise _Corrupt(f"unsupported legacy torch protocol {proto!r}")
        sys_info = _unpickle(f, None)
        if not isinstance(sys_info, dict):
            raise _Corrupt("legacy header: bad sys info")
        ctx = _Context(legacy=True)
        obj = _unpickle(f, ctx)
        _read_legacy_storages(f, ctx)
    # Legacy storage bytes (and counts) are always written little-endian.
    return obj, False


def load_torch_file(path) -> Any:
    """Load a ``torch.save`` file (zip or legacy format) as plain Python/numpy data.

    Tensors and Parameters become C-contiguous ``numpy.ndarray`` s (bfloat16/float8 via
    ``ml_dtypes``), ``OrderedDict``/``defaultdict``/OmegaConf containers become ``dict``/
    ``list``, numpy scalars stay numpy scalars.  Raises :class:`UnsafePickleError` for any
    global outside the allow-list and :class:`TorchFileError` for missing, foreign,
    truncated or corrupted files.
    """
    path = os.fspath(path)
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except FileNotFoundError:
        raise TorchFileError(f"{path}: no such file") from None
    except OSError as e:
        raise TorchFileError(f"{path}: cannot read ({e.strerror or e})") from None
    try:
        if not head:
            raise _Corrupt("empty file (0 bytes): not a torch.save file")
        if head.startswith(b"PK"):
            obj, big_endian = _load_zip(path)
        elif head[0] == 0x80:  # pickle PROTO opcode: the legacy format starts with a pickle
            obj, big_endian = _load_legacy(path)
        else:
            if tarfile.is_tarfile(path):
                raise _Corrupt("the tar-based torch format (torch < 0.1.10) is not supported")
            raise _Corrupt(f"not a torch.save file (starts with {head!r})")
        return _to_plain(obj, big_endian)
    except _Unsafe as e:
        raise UnsafePickleError(f"{path}: {e}") from None
    except _Corrupt as e:
        raise TorchFileError(f"{path}: {e}") from None
    except (pickle.UnpicklingError, EOFError) as e:
        raise TorchFileError(f"{path}: truncated or corrupted pickle ({type(e).__name__}: {e})") from None
    except RecursionError:
        raise TorchFileError(f"{path}: pickle nested too deeply") from None
    except MemoryError:
        raise TorchFileError(f"{path}: out of memory while reading (a tensor or storage is too large)") from None
    except (zipfile.BadZipFile, OSError) as e:
        raise TorchFileError(f"{path}: truncated or corrupted archive ({e})") from None
    except (TypeError, ValueError, KeyError, IndexError, AttributeError, OverflowError, struct.error) as e:
        # Malformed opcodes/arguments surface as assorted builtin errors.
        raise TorchFileError(f"{path}: corrupted pickle ({type(e).__name__}: {e})") from None


# ---- safetensors ----------------------------------------------------------------------
_SAFETENSORS_DTYPES = {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
    "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8",
    "U64": "uint64", "U32": "uint32", "U16": "uint16", "U8": "uint8", "BOOL": "bool",
    "C64": "complex64", "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2",
}
# What ``safetensors.numpy`` itself can decode (it has no bfloat16/float8).
_SAFETENSORS_NUMPY_OK = {"F64", "F32", "F16", "I64", "I32", "I16", "I8", "U64", "U32", "U16", "U8", "BOOL", "C64"}


def _safetensors_header(path: str) -> tuple[dict, int]:
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) != 8:
            raise _Corrupt("truncated safetensors file")
        (n,) = struct.unpack("<Q", head)
        if n > 100_000_000:
            raise _Corrupt("not a safetensors file (header too large)")
        raw = f.read(n)
    if len(raw) != n:
        raise _Corrupt("truncated safetensors header")
    try:
        header = json.loads(raw)
    except ValueError:
        raise _Corrupt("not a safetensors file (bad JSON header)") from None
    if not isinstance(header, dict):
        raise _Corrupt("not a safetensors file (header is not an object)")
    return header, 8 + n


def _load_safetensors(path: str) -> tuple[dict[str, np.ndarray], dict]:
    header, data_start = _safetensors_header(path)
    metadata = header.get("__metadata__") or {}
    entries = {k: v for k, v in header.items() if k != "__metadata__"}
    dtypes = {v.get("dtype") for v in entries.values() if isinstance(v, dict)}
    try:
        import safetensors.numpy  # noqa: PLC0415 - optional, only for .safetensors
    except ImportError:
        safetensors = None
    if safetensors is not None and dtypes <= _SAFETENSORS_NUMPY_OK:
        try:
            sd = safetensors.numpy.load_file(path)
            with safetensors.safe_open(path, framework="numpy") as f:
                metadata = f.metadata() or {}
        except Exception as e:  # the library raises its own error types
            raise _Corrupt(f"cannot read safetensors file ({type(e).__name__}: {e})") from None
        return dict(sd), {"metadata": dict(metadata)}
    # bfloat16/float8 (or no safetensors package): the format is simple enough to read
    # directly: 8-byte header length, JSON header, then raw little-endian tensor bytes.
    sd = {}
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        for name, info in entries.items():
            try:
                dt = _np_dtype(_SAFETENSORS_DTYPES[info["dtype"]]).newbyteorder("<")
                shape = _check_shape(info["shape"])
                start, end = info["data_offsets"]
            except (KeyError, TypeError, ValueError):
                raise _Corrupt(f"safetensors entry {name!r}: unsupported or malformed header {info!r:.120}") from None
            if not (type(start) is int and type(end) is int and 0 <= start <= end and data_start + end <= size):
                raise _Corrupt(f"safetensors entry {name!r}: data offsets outside the file")
            if end - start != math.prod(shape) * dt.itemsize:
                raise _Corrupt(f"safetensors entry {name!r}: {end - start} bytes for shape {shape}")
            f.seek(data_start + start)
            buf = _read_exact(f, end - start, f"tensor {name}")
            sd[name] = np.frombuffer(buf, dtype=dt).reshape(shape).astype(dt.newbyteorder("="), copy=False)
    return sd, {"metadata": dict(metadata)}


def _looks_like_safetensors(path: str) -> bool:
    try:
        with open(path, "rb") as f:
            head = f.read(9)
    except OSError:
        return False
    return len(head) == 9 and head[8:9] == b"{" and struct.unpack("<Q", head[:8])[0] < 100_000_000


def _is_state_dict(d) -> bool:
    return isinstance(d, dict) and all(isinstance(k, str) and isinstance(v, np.ndarray) for k, v in d.items())


def load_state_dict_file(path) -> tuple[dict[str, np.ndarray], dict]:
    """Return ``(state_dict, extras)`` from a checkpoint (``.pt``/``.pth``/``.ckpt``/``.safetensors``).

    * stage-II / synchronizability checkpoint (dict with ``model``): ``obj['model']`` and
      every other entry (``args`` already a plain dict) as extras;
    * stage-I checkpoint (dict with ``state_dict``): that dict and the rest as extras;
    * bare state dict (every value an array, e.g. MMAudio's ``synchformer_state_dict.pth``):
      the dict itself and ``{}``;
    * ``.safetensors``: the tensors and ``{'metadata': {...}}``.

    Keys are returned exactly as stored (no ``module.`` stripping).
    """
    path = os.fspath(path)
    torch_suffix = path.endswith((".pt", ".pth", ".ckpt"))
    if path.endswith(".safetensors") or (not torch_suffix and _looks_like_safetensors(path)):
        if not os.path.isfile(path):
            raise TorchFileError(f"{path}: no such file")
        try:
            return _load_safetensors(path)
        except _Corrupt as e:
            raise TorchFileError(f"{path}: {e}") from None
        except OSError as e:
            raise TorchFileError(f"{path}: cannot read ({e})") from None
    obj = load_torch_file(path)
    if not isinstance(obj, dict):
        raise TorchFileError(f"{path}: expected a dict at the top level, found {type(obj).__name__}")
    for key in ("model", "state_dict"):
        if key in obj:
            sd = obj[key]
            if not _is_state_dict(sd):
                if isinstance(sd, dict):
                    bad = [k for k, v in sd.items() if not isinstance(v, np.ndarray)][:5]
                else:
                    bad = type(sd).__name__
                raise TorchFileError(f"{path}: '{key}' is not a state dict of tensors (offending entries: {bad})")
            return sd, {k: v for k, v in obj.items() if k != key}
    if obj and _is_state_dict(obj):
        return obj, {}
    raise TorchFileError(
        f"{path}: no state dict found: expected a 'model' or 'state_dict' entry or a dict of tensors; "
        f"top-level keys: {list(obj)[:10]}"
    )
