"""Write the small torch.save fixtures read by tests/test_torch_pickle.py.

Run with a Python that has real PyTorch, omegaconf and safetensors (NOT needed by the
tests or CI, which only read the committed outputs)::

    python tests/data/make_torch_fixtures.py

For every fixture ``X`` it writes ``X`` itself, ``X.expected.npz`` (every tensor as
``tensor.numpy()``; bfloat16/float8 stored as their bit patterns) and ``X.expected.json``
(the non-tensor data in a small tagged JSON encoding, see ``encode``).  The layouts mirror
what official Synchformer checkpoints contain (docs/official_spec.md §3.3, §3.4, §3.7),
at toy sizes.
"""

from __future__ import annotations

import collections
import json
import pathlib

import numpy as np
import torch
from omegaconf import BooleanNode, DictConfig, FloatNode, IntegerNode, ListConfig, OmegaConf, StringNode
from safetensors.torch import save_file

OUT = pathlib.Path(__file__).resolve().parent / "torch_files"


# dtypes numpy lacks -> same-width integer dtype holding their bits
BIT_VIEWS = {torch.bfloat16: torch.uint16, torch.float8_e4m3fn: torch.uint8}


# ---- expected-value encoding -----------------------------------------------------------
def encode(obj, arrays: dict, path: str):
    """Tagged JSON: tensors -> {"__ndarray__": npz key, dtype, shape}; tuples, bytes, numpy
    scalars, sets and dicts with non-str keys get tags so the test can rebuild exact types."""
    if isinstance(obj, torch.Tensor):
        t = obj.detach()
        key = f"a{len(arrays):03d}"
        if t.dtype in BIT_VIEWS:  # numpy has no such dtype: store the bit pattern
            arrays[key] = t.contiguous().view(BIT_VIEWS[t.dtype]).numpy()
        else:
            arrays[key] = t.numpy().copy()
        dtype = str(t.dtype).removeprefix("torch.")
        return {"__ndarray__": key, "dtype": dtype, "shape": list(t.shape), "path": path}
    if isinstance(obj, np.ndarray):
        key = f"a{len(arrays):03d}"
        arrays[key] = obj
        return {"__ndarray__": key, "dtype": obj.dtype.name, "shape": list(obj.shape), "path": path}
    if isinstance(obj, (torch.device, torch.dtype)):
        return str(obj)  # the reader returns devices as 'cpu'/'cuda:0', dtypes by name
    if isinstance(obj, complex):
        return {"__complex__": [obj.real, obj.imag]}
    if isinstance(obj, np.generic):
        return {"__npscalar__": obj.dtype.str, "value": obj.item()}
    if isinstance(obj, dict):
        if all(isinstance(k, str) for k in obj):
            return {k: encode(v, arrays, f"{path}/{k}") for k, v in obj.items()}
        return {"__dict_items__": [[k, encode(v, arrays, f"{path}/{k}")] for k, v in obj.items()]}
    if isinstance(obj, tuple):
        return {"__tuple__": [encode(v, arrays, f"{path}/{i}") for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [encode(v, arrays, f"{path}/{i}") for i, v in enumerate(obj)]
    if isinstance(obj, bytes):
        return {"__bytes__": obj.hex()}
    if isinstance(obj, (set, frozenset)):
        return {"__set__" if isinstance(obj, set) else "__frozenset__": sorted(obj)}
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"cannot encode {type(obj)} at {path}")


def expected_of(obj):
    """What a torch-free reader must return: OmegaConf -> containers, OrderedDict -> dict."""
    if isinstance(obj, (DictConfig, ListConfig)):
        return OmegaConf.to_container(obj, resolve=False)
    if isinstance(obj, dict):  # OrderedDict/defaultdict -> dict
        return {k: expected_of(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [expected_of(v) for v in obj]
    if isinstance(obj, tuple):  # torch.Size -> tuple
        return tuple(expected_of(v) for v in obj)
    return obj


def write_expected(name: str, obj):
    arrays: dict = {}
    enc = encode(expected_of(obj), arrays, "")
    np.savez(OUT / f"{name}.expected.npz", **arrays)
    (OUT / f"{name}.expected.json").write_text(json.dumps(enc, indent=1) + "\n")


# ---- toy modules with official key names -----------------------------------------------
class Block(torch.nn.Module):
    def __init__(self, d):
        super().__init__()
        self.norm1 = torch.nn.LayerNorm(d)
        self.attn = torch.nn.Module()
        self.attn.qkv = torch.nn.Linear(d, 3 * d)


class VisualExtractor(torch.nn.Module):
    def __init__(self, d):
        super().__init__()
        self.cls_token = torch.nn.Parameter(torch.randn(1, 1, d))
        self.pos_embed = torch.nn.Parameter(torch.randn(1, 5, d))
        self.blocks = torch.nn.ModuleList([Block(d)])


class AudioExtractor(torch.nn.Module):
    def __init__(self, d):
        super().__init__()
        self.ast = torch.nn.Module()
        self.ast.embeddings = torch.nn.Module()
        self.ast.embeddings.cls_token = torch.nn.Parameter(torch.randn(1, 1, d))
        self.ast.layernorm = torch.nn.LayerNorm(d)


class GlobalTransformer(torch.nn.Module):
    def __init__(self, d):
        super().__init__()
        self.OFF_tok = torch.nn.Parameter(torch.randn(1, 1, d))
        self.ln_f = torch.nn.LayerNorm(d)
        self.off_head = torch.nn.Linear(d, 21)


class Synchformer(torch.nn.Module):
    def __init__(self, d=8):
        super().__init__()
        self.vfeat_extractor = VisualExtractor(d)
        self.afeat_extractor = AudioExtractor(d)
        self.vproj = torch.nn.Linear(d, d)
        self.transformer = GlobalTransformer(d)


class AVCLIP(torch.nn.Module):
    def __init__(self, d=8):
        super().__init__()
        self.logit_scale = torch.nn.Parameter(torch.tensor(2.6592))
        self.v_encoder = VisualExtractor(d)
        self.a_encoder = AudioExtractor(d)


class DDP(torch.nn.Module):  # gives the 'module.' prefix, like DistributedDataParallel
    def __init__(self, module):
        super().__init__()
        self.module = module


def one_step(opt, params):
    for p in params:
        if p.requires_grad:
            p.grad = torch.ones_like(p)
    opt.step()


def config(stage: str):
    cfg = OmegaConf.create(
        {
            "action": "train_avsync_model",
            "model": {
                "target": "model.sync_model.Synchformer",
                "params": {
                    "afeat_extractor": {
                        "is_trainable": False,
                        "params": {
                            "ckpt_path": "./logs/sync/sync_models/24-01-02T10-00-53/epoch_best.pt",
                            "max_spec_t": 66,
                        },
                    },
                    "vfeat_extractor": {
                        "is_trainable": False,
                        "params": {"ckpt_path": None, "factorize_space_time": True},
                    },
                    "transformer": {
                        "target": "model.modules.feature_selector.GlobalTransformer",
                        "params": {"n_layer": 3, "n_head": 8, "n_embd": 768, "dropout": 0.0},
                    },
                },
            },
            "training": {
                "base_learning_rate": 2e-6,
                "betas": [0.9, 0.999],
                "num_epochs": 10000,
                "world_size": 1,
                "lr_scheduler": {"name": "constant_with_warmup", "warmup": 1000},
            },
            "data": {
                "vfps": 25,
                "afps": 16000,
                "crop_len_sec": 5.0,
                "offsets": [-2.0, -1.8, 0.0, 1.8, 2.0],
                "dataset": {
                    "target": "dataset.vggsound.VGGSoundSparsePicked",
                    "params": {"load_fixed_offsets_on": ["valid", "test"], "to_filter_bad_examples": True},
                },
            },
            "logging": {
                "logdir": "./logs/sync/sync_models/", "use_wandb": False, "patience": 50, "vis_segment_sim": True,
            },
            "missing_value": "???",
            "empty_list": [],
            "nested_lists": [[1, 2], [3.5, None, "x", True]],
            "interpolated": "${data.vfps}",
            "unicode": "Grüße ✓",
            "ckpt_path": "./logs/sync/sync_models/24-01-04T16-39-21/24-01-04T16-39-21.pt",
            "start_time": "24-01-04T16-39-21",
            "stage": stage,
        }
    )
    # Typed value nodes, a DictConfig whose content is None and one that is '???' missing.
    cfg.typed = {"i": IntegerNode(7), "f": FloatNode(0.25), "b": BooleanNode(False), "s": StringNode("str-node")}
    cfg.null_cfg = DictConfig(None)
    cfg.missing_cfg = DictConfig("???")
    cfg.missing_list = ListConfig("???")
    return cfg


def stage2_checkpoint():
    torch.manual_seed(0)
    model = Synchformer()
    # Adam over *all* params with only some trainable, as in the official stage II (§3.7).
    for p in model.vfeat_extractor.parameters():
        p.requires_grad_(False)
    params = list(model.parameters())
    opt = torch.optim.Adam(params, lr=2e-6, betas=(0.9, 0.999), eps=1e-7)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)
    one_step(opt, params)
    sched.step()
    return {
        "args": config("II"),
        "loss": 2.7182817459106445,
        "metrics": {"accuracy_1": np.float64(0.5), "accuracy_1_tol1": 0.9, "accuracy_5": np.float64(0.875)},
        "epoch": 3,
        "optimizer": opt.state_dict(),
        "model": model.state_dict(),
        "scaler": {"scale": 65536.0, "growth_factor": 2.0, "backoff_factor": 0.5, "growth_interval": 2000,
                   "_growth_tracker": 3},
        "lr_scheduler": sched.state_dict(),
        "model_type": "Synchformer",
    }


def stage1_checkpoint():
    torch.manual_seed(1)
    model = DDP(AVCLIP())
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    groups = [{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": 0.2}]
    opt = torch.optim.AdamW(groups, lr=1e-4, eps=1e-8)
    one_step(opt, list(model.parameters()))
    return {
        "epoch": 12,
        "name": "24-01-02T10-00-53",
        "state_dict": model.state_dict(),
        "optimizer": opt.state_dict(),
        "metrics": {"sync_w_shifts": {"val_v2a_acc": 0.25, "val_a2v_acc": 0.375, "val_loss": 3.0, "epoch": 12}},
        "args": config("I"),
        "scaler": {"scale": 1024.0, "growth_factor": 2.0, "backoff_factor": 0.5, "growth_interval": 2000,
                   "_growth_tracker": 0},
    }


def bare_state_dict():
    torch.manual_seed(2)
    base = torch.arange(24, dtype=torch.float32) / 7
    sd = collections.OrderedDict()
    sd["vfeat_extractor.cls_token"] = torch.randn(1, 1, 8)
    sd["f64"] = torch.randn(3, dtype=torch.float64)
    sd["f16"] = torch.randn(2, 3).half()
    sd["bf16"] = torch.randn(2, 3).bfloat16()
    sd["i64"] = torch.tensor([[-(2**40), 5], [7, 2**62]], dtype=torch.int64)
    sd["i32"] = torch.tensor([-3, 2**31 - 1], dtype=torch.int32)
    sd["i16"] = torch.tensor([-300, 300], dtype=torch.int16)
    sd["i8"] = torch.tensor([-128, 127], dtype=torch.int8)
    sd["u8"] = torch.tensor([0, 255, 3], dtype=torch.uint8)
    sd["bool"] = torch.tensor([[True, False], [False, True]])
    sd["scalar"] = torch.tensor(3.5)
    sd["empty"] = torch.zeros(0, 4)
    sd["transposed"] = torch.randn(3, 5).t()  # non-contiguous view
    sd["view_a"] = base[2:14].view(3, 4)  # two views of one storage, with offsets
    sd["view_b"] = base.view(4, 6)[:, 1::2]  # strided view of the same storage
    sd["expanded"] = torch.tensor([1.0, 2.0, 3.0]).expand(2, 3)  # stride 0
    sd["parameter"] = torch.nn.Parameter(torch.randn(2, 2))
    tied = torch.randn(2, 3)
    sd["tied_a"] = tied.detach()  # distinct tensors, one full storage (tied weights)
    sd["tied_b"] = tied.detach()
    sd["nonfinite"] = torch.tensor([float("nan"), float("inf"), -float("inf"), -0.0])
    return sd


def misc():
    """Everything else the reader supports, at top level of one small file."""
    tagged = torch.ones(2)
    tagged.note = "python attribute"  # -> torch._tensor._rebuild_from_type_v2
    param = torch.nn.Parameter(torch.full((2,), 3.0), requires_grad=False)
    param.note = "param attribute"  # -> torch._utils._rebuild_parameter_with_state
    return {
        # UntypedStorage + _rebuild_tensor_v3: dtypes without a typed storage class
        "f8": torch.tensor([0.5, -2.0, 448.0]).to(torch.float8_e4m3fn),
        "u16": torch.tensor([1, 65535], dtype=torch.uint16),
        "tagged_tensor": tagged,
        "tagged_param": param,
        "size": torch.Size([2, 3]),
        "device": torch.device("cpu"),
        "dtype": torch.float16,
        "bytes": b"\x00\xffab",
        "set": {1, 2},
        "frozenset": frozenset({3}),
        "complex": 1.5 - 2j,
        "big_int": 2**70,
        "tuple": (1, "a", None),
        "int_keys": {0: "zero", 7: [1.0]},
        "defaultdict": collections.defaultdict(list, {"a": [1]}),
        "np_array": np.arange(6, dtype=np.int32).reshape(2, 3),
        "np_f32": np.float32(0.25),
        "np_i64": np.int64(-5),
        "np_bool": np.bool_(True),
    }


def save_with_expected(name: str, obj, **kwargs):
    torch.save(obj, OUT / name, **kwargs)
    write_expected(name, obj)


def main():
    OUT.mkdir(parents=True, exist_ok=True)
    for old in OUT.iterdir():
        old.unlink()
    save_with_expected("24-01-04T16-39-21.pt", stage2_checkpoint())
    save_with_expected("epoch_best.pt", stage1_checkpoint())
    save_with_expected("synchformer_state_dict.pth", bare_state_dict())
    save_with_expected("synchformer_state_dict_legacy.pth", bare_state_dict(), _use_new_zipfile_serialization=False)
    save_with_expected("misc.pt", misc())
    # (torch 2.13's own legacy loader fails on UntypedStorage entries; ours reads them.)
    save_with_expected("misc_legacy.pt", misc(), _use_new_zipfile_serialization=False)

    torch.manual_seed(3)
    st = {
        "transformer.off_head.weight": torch.randn(21, 8),
        "transformer.off_head.bias": torch.randn(21),
        "i64": torch.arange(4),
        "f16": torch.randn(3).half(),
    }
    save_file(st, OUT / "weights.safetensors", metadata={"format": "pt", "source": "make_torch_fixtures"})
    write_expected("weights.safetensors", st)
    stb = {"bf16": torch.randn(2, 3).bfloat16(), "f32": torch.randn(4)}
    save_file(stb, OUT / "weights_bf16.safetensors", metadata={"format": "pt"})
    write_expected("weights_bf16.safetensors", stb)

    total = sum(p.stat().st_size for p in OUT.iterdir())
    print(f"torch {torch.__version__}: wrote {len(list(OUT.iterdir()))} files, {total} bytes, into {OUT.name}/")


if __name__ == "__main__":
    main()
