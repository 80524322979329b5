"""Tests for synchformer_jax.torch_pickle: the torch-free, code-free checkpoint reader.

Positive fixtures in tests/data/torch_files/ were written by real PyTorch
(tests/data/make_torch_fixtures.py); these tests never need torch.  Malicious and
corrupted files are built here from pickle opcodes and the documented file layouts.
"""

from __future__ import annotations

import ast
import json
import math
import os
import pathlib
import pickle
import pickletools
import struct
import subprocess
import zipfile

import numpy as np
import pytest

from synchformer_jax.torch_pickle import (
    TorchFileError,
    UnsafePickleError,
    load_state_dict_file,
    load_torch_file,
)

DATA = pathlib.Path(__file__).resolve().parent / "data" / "torch_files"
STAGE2 = "24-01-04T16-39-21.pt"
STAGE1 = "epoch_best.pt"
BARE = "synchformer_state_dict.pth"
BARE_LEGACY = "synchformer_state_dict_legacy.pth"
TORCH_FIXTURES = [STAGE2, STAGE1, BARE, BARE_LEGACY, "misc.pt", "misc_legacy.pt"]
SAFETENSORS_FIXTURES = ["weights.safetensors", "weights_bf16.safetensors"]


# ---- expected values ------------------------------------------------------------------
def _dtype(name: str) -> np.dtype:
    if name in ("bfloat16", "float8_e4m3fn"):
        ml_dtypes = pytest.importorskip("ml_dtypes")
        return np.dtype(getattr(ml_dtypes, name))
    return np.dtype(name)


def expected(name: str):
    """Decode the tagged JSON written by make_torch_fixtures.py into exact Python values."""
    arrays = np.load(DATA / f"{name}.expected.npz")
    raw = json.loads((DATA / f"{name}.expected.json").read_text())

    def dec(o):
        if isinstance(o, dict):
            if "__ndarray__" in o:
                a = arrays[o["__ndarray__"]]
                dt = _dtype(o["dtype"])
                if a.dtype != dt:  # bfloat16/float8 were stored as their bit patterns
                    assert a.dtype.itemsize == dt.itemsize
                    a = a.view(dt)
                assert list(a.shape) == o["shape"]
                return a
            if "__npscalar__" in o:
                return np.dtype(o["__npscalar__"]).type(o["value"])
            if "__tuple__" in o:
                return tuple(dec(v) for v in o["__tuple__"])
            if "__dict_items__" in o:
                return {k: dec(v) for k, v in o["__dict_items__"]}
            if "__bytes__" in o:
                return bytes.fromhex(o["__bytes__"])
            if "__set__" in o:
                return set(o["__set__"])
            if "__frozenset__" in o:
                return frozenset(o["__frozenset__"])
            if "__complex__" in o:
                return complex(*o["__complex__"])
            return {k: dec(v) for k, v in o.items()}
        if isinstance(o, list):
            return [dec(v) for v in o]
        return o

    return dec(raw)


def assert_same(actual, exp, path="obj"):
    """Strict equality: same types (dict, not OrderedDict), same order, arrays bitwise."""
    if isinstance(exp, np.ndarray):
        assert isinstance(actual, np.ndarray), f"{path}: {type(actual)} is not an ndarray"
        assert actual.dtype == exp.dtype, f"{path}: dtype {actual.dtype} != {exp.dtype}"
        assert actual.shape == exp.shape, f"{path}: shape {actual.shape} != {exp.shape}"
        assert actual.flags.c_contiguous, f"{path}: not C-contiguous"
        assert actual.tobytes() == np.ascontiguousarray(exp).tobytes(), f"{path}: values differ"
        return
    assert type(actual) is type(exp), f"{path}: type {type(actual).__name__} != {type(exp).__name__}"
    if isinstance(exp, np.generic):
        assert actual.dtype == exp.dtype and actual.tobytes() == exp.tobytes(), f"{path}: {actual!r} != {exp!r}"
    elif isinstance(exp, dict):
        assert list(actual) == list(exp), f"{path}: keys {list(actual)} != {list(exp)}"
        for k in exp:
            assert_same(actual[k], exp[k], f"{path}[{k!r}]")
    elif isinstance(exp, (list, tuple)):
        assert len(actual) == len(exp), f"{path}: length {len(actual)} != {len(exp)}"
        for i, (a, e) in enumerate(zip(actual, exp)):
            assert_same(a, e, f"{path}[{i}]")
    elif isinstance(exp, float):
        assert struct.pack("<d", actual) == struct.pack("<d", exp), f"{path}: {actual!r} != {exp!r}"
    else:
        assert actual == exp, f"{path}: {actual!r} != {exp!r}"


def iter_arrays(o):
    if isinstance(o, np.ndarray):
        yield o
    elif isinstance(o, dict):
        for v in o.values():
            yield from iter_arrays(v)
    elif isinstance(o, (list, tuple)):
        for v in o:
            yield from iter_arrays(v)


# ---- real torch fixtures ------------------------------------------------------------------
def test_fixtures_are_small_and_real():
    total = sum(p.stat().st_size for p in DATA.iterdir())
    assert total < 400_000
    with zipfile.ZipFile(DATA / STAGE2) as zf:  # torch names the archive root after the stem
        assert f"{STAGE2[:-3]}/data.pkl" in zf.namelist()
    assert (DATA / BARE_LEGACY).read_bytes()[:1] == b"\x80"  # legacy = bare pickle stream


@pytest.mark.parametrize("name", TORCH_FIXTURES)
def test_fixture_loads_exactly(name):
    obj = load_torch_file(DATA / name)
    assert_same(obj, expected(name))
    for a in iter_arrays(obj):
        assert a.flags.c_contiguous and a.flags.writeable


def test_legacy_and_zip_formats_agree():
    assert_same(load_torch_file(DATA / BARE_LEGACY), load_torch_file(DATA / BARE))


def test_views_become_independent_contiguous_arrays():
    sd = load_torch_file(DATA / BARE)
    a, b = sd["view_a"], sd["view_b"]  # both views of one 24-element storage
    base = np.arange(24, dtype=np.float32) / np.float32(7)
    np.testing.assert_array_equal(a, base[2:14].reshape(3, 4))
    np.testing.assert_array_equal(b, base.reshape(4, 6)[:, 1::2])
    assert not np.shares_memory(a, b)
    a[...] = 0
    np.testing.assert_array_equal(b, base.reshape(4, 6)[:, 1::2])
    assert sd["transposed"].shape == (5, 3) and sd["transposed"].flags.c_contiguous
    np.testing.assert_array_equal(sd["expanded"], [[1, 2, 3], [1, 2, 3]])
    assert sd["scalar"].shape == () and sd["scalar"] == np.float32(3.5)
    assert sd["empty"].shape == (0, 4)
    assert sd["bf16"].dtype.name == "bfloat16"
    # Tied weights: two tensors over one whole storage must still be independent arrays.
    assert not np.shares_memory(sd["tied_a"], sd["tied_b"])
    np.testing.assert_array_equal(sd["tied_a"], sd["tied_b"])


def test_misc_values():
    obj = load_torch_file(DATA / "misc.pt")
    assert obj["size"] == (2, 3) and type(obj["size"]) is tuple
    assert obj["device"] == "cpu" and obj["dtype"] == "torch.float16"
    assert obj["f8"].dtype.name == "float8_e4m3fn" and obj["u16"].dtype == np.uint16
    assert type(obj["defaultdict"]) is dict and obj["bytes"] == b"\x00\xffab"


def test_stage2_checkpoint_contents():
    obj = load_torch_file(DATA / STAGE2)
    assert type(obj["model"]) is dict  # OrderedDict (with _metadata) -> plain dict
    assert obj["model_type"] == "Synchformer"
    assert isinstance(obj["metrics"]["accuracy_1"], np.float64)
    assert type(obj["metrics"]["accuracy_1_tol1"]) is float
    args = obj["args"]
    assert type(args) is dict
    assert args["model"]["params"]["transformer"]["params"]["n_head"] == 8
    assert args["data"]["offsets"] == [-2.0, -1.8, 0.0, 1.8, 2.0]
    assert args["missing_value"] == "???" and args["missing_cfg"] == "???" and args["null_cfg"] is None
    assert args["interpolated"] == "${data.vfps}"  # kept unresolved, as stored
    assert args["typed"] == {"i": 7, "f": 0.25, "b": False, "s": "str-node"}
    opt = obj["optimizer"]
    assert opt["param_groups"][0]["betas"] == (0.9, 0.999)
    # Adam over all params; frozen (vfeat_extractor) ones have no state.
    n_params = len(opt["param_groups"][0]["params"])
    assert n_params == len(obj["model"]) and 0 not in opt["state"] and n_params - 1 in opt["state"]
    assert opt["state"][n_params - 1]["step"].shape == ()


def test_load_state_dict_file_stage2():
    sd, extras = load_state_dict_file(DATA / STAGE2)
    exp = expected(STAGE2)
    assert_same(sd, exp["model"])
    assert list(extras) == [k for k in exp if k != "model"]
    assert_same(extras, {k: v for k, v in exp.items() if k != "model"})
    assert type(extras["args"]) is dict and extras["args"]["stage"] == "II"
    assert "transformer.off_head.weight" in sd and sd["transformer.off_head.weight"].shape == (21, 8)


def test_load_state_dict_file_stage1_keeps_module_prefix():
    sd, extras = load_state_dict_file(DATA / STAGE1)
    keys = list(sd)
    assert keys[0] == "module.logit_scale" and sd["module.logit_scale"].shape == ()
    assert all(k.startswith(("module.v_encoder.", "module.a_encoder.")) for k in keys[1:])
    assert set(extras) == {"epoch", "name", "optimizer", "metrics", "args", "scaler"}
    assert extras["metrics"]["sync_w_shifts"]["val_loss"] == 3.0
    assert len(extras["optimizer"]["param_groups"]) == 2
    assert_same(sd, expected(STAGE1)["state_dict"])


@pytest.mark.parametrize("name", [BARE, BARE_LEGACY])
def test_load_state_dict_file_bare(name):
    sd, extras = load_state_dict_file(DATA / name)
    assert extras == {}
    assert_same(sd, expected(name))


@pytest.mark.parametrize("name", SAFETENSORS_FIXTURES)
def test_load_state_dict_file_safetensors(name):
    sd, extras = load_state_dict_file(DATA / name)
    exp = expected(name)
    assert sorted(sd) == sorted(exp)
    for k in exp:
        assert_same(sd[k], exp[k], k)
    assert extras["metadata"]["format"] == "pt"


def test_any_archive_root_name(tmp_path):
    out = tmp_path / "renamed.pt"
    with zipfile.ZipFile(DATA / STAGE2) as src, zipfile.ZipFile(out, "w") as dst:
        for info in src.infolist():
            dst.writestr(info.filename.replace(STAGE2[:-3], "some other root", 1), src.read(info))
    assert_same(load_torch_file(out), expected(STAGE2))


def _storage_itemsizes(pkl: bytes) -> dict[str, int]:
    """storage key -> element size, from the persistent ids ('storage', <torch.XStorage>, key, ...)."""
    sizes = {"Float": 4, "Double": 8, "Half": 2, "BFloat16": 2, "Long": 8, "Int": 4, "Short": 2, "Char": 1, "Byte": 1}
    sizes["Bool"] = 1
    memo, out, prev, current = {}, {}, None, None
    for op, arg, _ in pickletools.genops(pkl):
        if op.name == "GLOBAL":
            current = arg
        elif op.name in ("BINPUT", "LONG_BINPUT") and prev == "GLOBAL":
            memo[arg] = current
        elif op.name in ("BINGET", "LONG_BINGET"):
            current = memo.get(arg)
        elif op.name == "BINUNICODE" and prev in ("GLOBAL", "BINGET") and current and current.endswith("Storage"):
            out[arg] = sizes[current.split()[1][: -len("Storage")]]
            current = None
        prev = op.name if op.name != "BINPUT" or prev != "GLOBAL" else "GLOBAL"
    return out


def test_big_endian_zip(tmp_path):
    # Same archive with every storage byte-swapped and byteorder 'big': same values.
    root = BARE[: -len(".pth")] + "/"
    out = tmp_path / "big.pth"
    with zipfile.ZipFile(DATA / BARE) as src, zipfile.ZipFile(out, "w") as dst:
        itemsize = _storage_itemsizes(src.read(root + "data.pkl"))
        assert len(itemsize) == sum(n.startswith(root + "data/") for n in src.namelist())
        for info in src.infolist():
            data = src.read(info)
            if info.filename == root + "byteorder":
                data = b"big"
            elif info.filename.startswith(root + "data/"):
                n = itemsize[info.filename.rsplit("/", 1)[1]]
                data = np.frombuffer(data, f"<u{n}").astype(f">u{n}").tobytes()
            dst.writestr(info, data)
    assert_same(load_torch_file(out), expected(BARE))


# ---- malicious pickles ------------------------------------------------------------------------
def _global_call(module: str, name: str, *args) -> bytes:
    """Protocol-2 pickle: GLOBAL module.name, then REDUCE with ``args``."""
    return b"\x80\x02c" + f"{module}\n{name}\n".encode() + pickle.dumps(args, protocol=2)[2:-1] + b"R."


class _Evil:
    def __init__(self, func, args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


def _torch_zip(path: pathlib.Path, pkl: bytes, root="archive"):
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(f"{root}/data.pkl", pkl)
        zf.writestr(f"{root}/byteorder", "little")
        zf.writestr(f"{root}/version", "3\n")
    return path


def _torch_legacy(path: pathlib.Path, pkl: bytes):
    header = (0x1950A86A20F9469CFC6C, 1001, {"protocol_version": 1001, "little_endian": True})
    head = b"".join(pickle.dumps(x, protocol=2) for x in header)
    path.write_bytes(head + pkl + pickle.dumps([], protocol=2))
    return path


def _payloads(marker: pathlib.Path):
    cmd = f"touch {marker}"
    import os as os_mod
    import subprocess as sp

    return {
        "posix.system": pickle.dumps({"model": _Evil(os_mod.system, (cmd,))}, protocol=2),
        "os.system": _global_call("os", "system", cmd),
        "nt.system": _global_call("nt", "system", cmd),
        "builtins.eval": _global_call("builtins", "eval", f"__import__('os').system({cmd!r})"),
        "__builtin__.exec": _global_call("__builtin__", "exec", f"import os; os.system({cmd!r})"),
        "subprocess.Popen": pickle.dumps(_Evil(sp.Popen, (["touch", str(marker)],)), protocol=2),
        "torch.load": _global_call("torch", "load", str(marker)),
        "copyreg._reconstructor": _global_call("copyreg", "_reconstructor", 1, 2, 3),
        # getattr gadget: getattr(<allowed global>, '__globals__') would reach real modules.
        "builtins.getattr": (
            b"\x80\x02cbuiltins\ngetattr\nccollections\nOrderedDict\nX\x0b\x00\x00\x00__globals__\x86R."
        ),
        # STACK_GLOBAL (protocol 4) goes through find_class too.
        "posix.system(stack)": pickle.dumps(_Evil(os_mod.system, (cmd,)), protocol=4),
    }


@pytest.mark.parametrize("container", ["zip", "legacy", "raw"])
def test_malicious_pickles_are_refused(tmp_path, container):
    marker = tmp_path / "pwned"
    for label, pkl in _payloads(marker).items():
        name = label.split("(")[0]
        if name == "posix.system" and os.name == "nt":  # pragma: no cover
            name = "nt.system"
        path = tmp_path / f"{container}-{label}.pt"
        if container == "zip":
            _torch_zip(path, pkl)
        elif container == "legacy":
            _torch_legacy(path, pkl)
        else:
            path.write_bytes(pkl)  # a bare pickle where the magic number should be
        for loader in (load_torch_file, load_state_dict_file):
            with pytest.raises(UnsafePickleError) as ei:
                loader(path)
            msg = str(ei.value)
            assert name in msg and str(path) in msg, msg
            assert isinstance(ei.value, ValueError)
        assert not marker.exists(), f"{label} ran code!"


def test_build_on_allowed_stand_ins_is_refused(tmp_path):
    # BUILD would overwrite the implementation behind an allowed name.
    pkl = b"\x80\x02ctorch._utils\n_rebuild_tensor_v2\n}X\x04\x00\x00\x00implcposix\nsystem\nsb."
    with pytest.raises(UnsafePickleError, match="posix.system"):
        load_torch_file(_torch_zip(tmp_path / "a.pt", pkl))
    pkl = b"\x80\x02ctorch._utils\n_rebuild_tensor_v2\n}X\x04\x00\x00\x00implK\x01sb."
    with pytest.raises(UnsafePickleError, match="BUILD"):
        load_torch_file(_torch_zip(tmp_path / "b.pt", pkl))
    # Slot-state BUILD on a stand-in class: must not be able to set class attributes.
    pkl = b"\x80\x02comegaconf.dictconfig\nDictConfig\nN}X\x08\x00\x00\x00qualnameK\x01s\x86b."
    with pytest.raises(ValueError):
        load_torch_file(_torch_zip(tmp_path / "c.pt", pkl))
    # NEWOBJ with arguments on an OmegaConf stand-in.
    pkl = b"\x80\x02comegaconf.nodes\nAnyNode\nK\x01\x85\x81."
    with pytest.raises(UnsafePickleError, match="without arguments"):
        load_torch_file(_torch_zip(tmp_path / "d.pt", pkl))
    # Tensor rebuild fed something that is not a storage from the file.
    pkl = _global_call("torch._utils", "_rebuild_tensor_v2", "x", 0, (1,), (1,), False, None)
    with pytest.raises(UnsafePickleError, match="storage"):
        load_torch_file(_torch_zip(tmp_path / "e.pt", pkl))


def test_numpy_object_dtype_is_rejected(tmp_path):
    pkl = pickle.dumps(np.array([1, None], dtype=object), protocol=2)
    with pytest.raises(ValueError):
        load_torch_file(_torch_zip(tmp_path / "obj.pt", pkl))
    # ...whereas plain numpy arrays and scalars pickled by numpy itself are fine.
    arr = np.arange(6, dtype=">i4").reshape(2, 3)
    pkl = pickle.dumps({"a": arr, "s": np.float32(1.5), "b": b"\x00\xff", "set": {1, 2}}, protocol=2)
    obj = load_torch_file(_torch_legacy(tmp_path / "np.pt", pkl))
    assert obj["a"].dtype == arr.dtype and obj["a"].tobytes() == arr.tobytes()
    assert type(obj["s"]) is np.float32 and obj["s"] == 1.5
    assert obj["b"] == b"\x00\xff" and obj["set"] == {1, 2}


# ---- corrupted / foreign files ------------------------------------------------------------------
def assert_file_error(path, *fragments):
    for loader in (load_torch_file, load_state_dict_file):
        with pytest.raises(TorchFileError) as ei:
            loader(path)
        msg = str(ei.value)
        assert str(path) in msg, msg
        for f in fragments:
            assert f in msg, msg
    return msg


def test_empty_text_missing_and_foreign_files(tmp_path):
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    assert_file_error(empty, "empty file")
    text = tmp_path / "notes.pt"
    text.write_text("these are not the weights you are looking for\n")
    assert_file_error(text, "not a torch.save file")
    assert_file_error(tmp_path / "missing.pt", "no such file")
    assert_file_error(tmp_path, "cannot read")
    npz = tmp_path / "arrays.pt"
    with open(npz, "wb") as f:
        np.savez(f, a=np.zeros(2))
    assert_file_error(npz, "data.pkl")
    plain = _torch_legacy(tmp_path / "plain.pt", pickle.dumps([1, 2], protocol=2))
    assert load_torch_file(plain) == [1, 2]
    with pytest.raises(TorchFileError, match="expected a dict"):
        load_state_dict_file(plain)
    no_sd = _torch_legacy(tmp_path / "nosd.pt", pickle.dumps({"epoch": 1, "args": {}}, protocol=2))
    with pytest.raises(TorchFileError, match="no state dict found"):
        load_state_dict_file(no_sd)
    bad_model = _torch_legacy(tmp_path / "badmodel.pt", pickle.dumps({"model": {"w": 1}}, protocol=2))
    with pytest.raises(TorchFileError, match="'model' is not a state dict"):
        load_state_dict_file(bad_model)


@pytest.mark.parametrize("name", [STAGE2, BARE, BARE_LEGACY])
@pytest.mark.parametrize("fraction", [0.05, 0.5, 0.97])
def test_truncated_files(tmp_path, name, fraction):
    data = (DATA / name).read_bytes()
    path = tmp_path / name
    path.write_bytes(data[: int(len(data) * fraction)])
    msg = assert_file_error(path)
    assert "truncated" in msg or "corrupted" in msg, msg


def test_missing_and_short_storage(tmp_path):
    with zipfile.ZipFile(DATA / BARE) as src:
        infos = src.infolist()
        blobs = {i.filename: src.read(i) for i in infos}
    root = BARE[: -len(".pth")]
    missing = tmp_path / "missing_storage.pth"
    with zipfile.ZipFile(missing, "w") as dst:
        for i in infos:
            if i.filename != f"{root}/data/3":
                dst.writestr(i, blobs[i.filename])
    assert_file_error(missing, "storage data/3 missing")
    short = tmp_path / "short_storage.pth"
    with zipfile.ZipFile(short, "w") as dst:
        for i in infos:
            dst.writestr(i, blobs[i.filename][:-1] if i.filename == f"{root}/data/0" else blobs[i.filename])
    assert_file_error(short, "data/0", "bytes")


def test_corrupted_pickle_in_archive(tmp_path):
    assert_file_error(_torch_zip(tmp_path / "garbage.pt", b"\x80\x02\xff\xfe garbage"), "corrupted")
    assert_file_error(_torch_zip(tmp_path / "cut.pt", pickle.dumps({"a": [1, 2, 3]}, protocol=2)[:-5]), "truncated")


def test_corrupted_safetensors(tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes((DATA / "weights.safetensors").read_bytes()[:100])
    assert_file_error(bad)
    bad.write_bytes(b"")
    with pytest.raises(TorchFileError, match="bad.safetensors"):
        load_state_dict_file(bad)


# ---- module hygiene -------------------------------------------------------------------------------
def test_module_is_a_leaf():
    """Only stdlib + numpy at import time (ml_dtypes/safetensors are imported lazily)."""
    import synchformer_jax.torch_pickle as mod

    tree = ast.parse(pathlib.Path(mod.__file__).read_text())
    top = set()
    for node in tree.body:
        if isinstance(node, ast.Import):
            top |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            top.add(node.module.split(".")[0])
    stdlib = {"__future__", "io", "json", "math", "os", "pickle", "re", "struct", "tarfile", "zipfile", "typing"}
    assert top <= stdlib | {"numpy"}, top
    code = (
        "import sys, synchformer_jax.torch_pickle; "
        "assert not {'jax', 'torch', 'omegaconf', 'ml_dtypes'} & set(sys.modules), sorted(sys.modules)"
    )
    subprocess.run([__import__("sys").executable, "-c", code], check=True, cwd=pathlib.Path(mod.__file__).parents[1])


# ---- optional cross-check against torch itself ------------------------------------------------------
try:
    import torch  # noqa: F401

    HAVE_TORCH = True
except ImportError:
    HAVE_TORCH = False


@pytest.mark.skipif(not HAVE_TORCH, reason="torch not installed (the committed expectations are checked instead)")
@pytest.mark.parametrize("name", [BARE, BARE_LEGACY])
def test_matches_torch_load(name):
    ref = torch.load(DATA / name, weights_only=True)
    ours = load_torch_file(DATA / name)
    assert list(ours) == list(ref)
    for k, t in ref.items():
        if t.dtype == torch.bfloat16:
            assert ours[k].view(np.uint16).tobytes() == t.contiguous().view(torch.uint16).numpy().tobytes()
        else:
            assert ours[k].tobytes() == t.contiguous().numpy().tobytes()
    assert math.isnan(ours["nonfinite"][0])
