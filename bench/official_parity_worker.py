"""Torch side of `bench/official_parity.py`: one official model of `parity_variants.py`,
built, run and saved as its trainer would save it. Runs in a Python that has torch and the
official code's construction deps; never imported by the package (no jax needed here).

A worker of its own rather than more options on `torch_official_worker.py`: that one
times the full `configs/sync.yaml` model on inputs its parent wrote. This one injects
sizes into code that hard-codes them, builds all three official configs (stage II,
synchronizability, stage-I Segment-AVCLIP), records intermediate stages with hooks and
writes trainer checkpoints. What they share is imported: `rerandomize_` and the
construction route (official `instantiate_from_config` from the repo root after the
official `set_seed` steps). Nothing of the official code is copied.

Sizes go in the way shared/reference/README.md built the tiny reference model: during
construction only, the name `ASTConfig` in the official AST module is replaced by one with
the variant's sizes, and the Motionformer module's `OmegaConf.load` returns its yaml with
`VIT.EMBED_DIM/DEPTH/NUM_HEADS` overridden; the sync transformer's sizes, the class count
and the offset range go through the official yaml.

Usage (normally spawned by official_parity.py):
    TORCH_PYTHON bench/official_parity_worker.py --official-repo PATH --variant v1 --out DIR [--threads N]
Writes DIR/video.npy, DIR/audio.npy (the seeded inputs), DIR/official_outputs.npz,
DIR/trainer.pt (stages II/III, as utils/logger.py log_model writes it) or
DIR/epoch_best.pt (stage I, as train_clip.py writes it), DIR/worker_result.json.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib.abc
import importlib.machinery
import json
import os
import platform
import random
import sys
import time
import types

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # bench/ also when run by path
from parity_variants import SEGMENT_AVCLIP, VARIANTS, Variant  # noqa: E402
from torch_official_worker import rerandomize_  # noqa: E402


# ---- torchvision -------------------------------------------------------------------------
class _StubbedName(type):
    """A torchvision name that exists but cannot be used: attribute access gives more such
    names (`InterpolationMode.BICUBIC` in timm's module-level tables), calling one raises."""

    def __getattr__(cls, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return _StubbedName(f"{cls.__name__}.{name}", (), {})

    def __call__(cls, *args, **kwargs):
        raise RuntimeError(f"torchvision.{cls.__name__} is a stub (official_parity_worker): "
                           "model construction and the forward pass should not need it")


class _StubModule(types.ModuleType):
    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return _StubbedName(name, (), {})


class _StubFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname, path, target=None):
        if fullname == "torchvision" or fullname.startswith("torchvision."):
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
        return None

    def create_module(self, spec):
        module = _StubModule(spec.name)
        module.__path__ = []
        return module

    def exec_module(self, module):
        pass


def stub_torchvision_if_unusable() -> str:
    """timm 0.6.13 imports torchvision at import time (transforms, FrozenBatchNorm2d) though
    building the models uses none of it, and a CPU torch often has no torchvision that
    imports (a wheel built for another torch fails on its C++ ops). Only then are all
    `torchvision.*` imports answered with unusable names; a working one is left alone."""
    try:
        import torchvision  # noqa: F401
        return f"torchvision {torchvision.__version__}"
    except Exception as e:  # noqa: BLE001 - ImportError, or RuntimeError from a mismatched build
        reason = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
        del sys.modules[name]
    sys.meta_path.insert(0, _StubFinder())
    return f"stubbed ({reason})"


# ---- construction ------------------------------------------------------------------------
@contextlib.contextmanager
def official_extractor_sizes(variant: Variant):
    """Inject the variant's extractor sizes into the official modules during construction."""
    import model.modules.feat_extractors.audio.ast as ast_module
    import model.modules.feat_extractors.visual.motionformer as mf_module

    original_ast_config, original_omegaconf = ast_module.ASTConfig, mf_module.OmegaConf
    if variant.audio:
        a = variant.audio

        def sized_ast_config(*args, **kwargs):
            return original_ast_config(hidden_size=a.hidden, num_hidden_layers=a.layers,
                                       num_attention_heads=a.heads, intermediate_size=a.mlp)
        ast_module.ASTConfig = sized_ast_config
    if variant.video:
        v = variant.video

        class SizedOmegaConf:
            """The module's OmegaConf, except that `load` resizes the ViT."""

            @staticmethod
            def load(path):
                cfg = original_omegaconf.load(path)
                cfg.VIT.EMBED_DIM, cfg.VIT.DEPTH, cfg.VIT.NUM_HEADS = v.dim, v.depth, v.heads
                return cfg

            def __getattr__(self, name):
                return getattr(original_omegaconf, name)
        mf_module.OmegaConf = SizedOmegaConf()
    try:
        yield
    finally:
        ast_module.ASTConfig, mf_module.OmegaConf = original_ast_config, original_omegaconf


def official_config(repo: str, variant: Variant):
    """configs/<name>.yaml with the variant's sizes, resolved as main.py resolves it."""
    from omegaconf import OmegaConf

    cfg = OmegaConf.load(os.path.join(repo, "configs", f"{variant.official_config}.yaml"))
    a, v = variant.audio_size(), variant.video_size()
    p = cfg.model.params
    if variant.official_config == SEGMENT_AVCLIP:
        # The yaml starts stage I from pretrained extractors (a download and a file the
        # checkout lacks); the weights are re-randomised anyway.
        p.afeat_extractor.params.ckpt_path = None
        p.vfeat_extractor.params.ckpt_path = None
        if a.hidden != v.dim:
            raise ValueError(f"{variant.name}: Segment-AVCLIP has one width (n_embd); got {a.hidden} and {v.dim}")
        p.n_embd = a.hidden
    else:
        p.aproj.params.in_features = a.hidden
        p.vproj.params.in_features = v.dim
        s = variant.sync_size()
        p.transformer.params.n_embd, p.transformer.params.n_layer, p.transformer.params.n_head = \
            s.n_embd, s.n_layer, s.n_head
        if variant.num_off_cls is not None:
            cfg.data.num_off_cls = variant.num_off_cls
        if variant.max_off_sec is not None:
            cfg.data.max_off_sec = variant.max_off_sec
    OmegaConf.resolve(cfg)  # main.py also registers an `add` resolver, which these yaml files do not use
    return cfg


def official_heads(model) -> dict[str, int]:
    """The head counts the official modules really got (checked against the table)."""
    audio = model.afeat_extractor if hasattr(model, "afeat_extractor") else model.a_encoder
    video = model.vfeat_extractor if hasattr(model, "vfeat_extractor") else model.v_encoder
    heads = {"ast": audio.ast.encoder.layer[0].attention.attention.num_attention_heads,
             "ast_agg": audio.freq_attn_agg.self_attn.num_heads,
             "mf": video.blocks[0].attn.num_heads, "mf_agg": video.spatial_attn_agg.self_attn.num_heads}
    if hasattr(model, "transformer"):
        heads["sync"] = model.transformer.blocks[0].attn.n_head
    return heads


def make_inputs(variant: Variant):
    """Seeded inputs in the JAX layout (the sync model's): video [B, S, 16, 3, 224, 224]
    uniform in [-1, 1] (the normalised RGB range), audio [B, S, 1, 128, 66] ~ N(0, 0.5^2)
    (normalised log-mel), as bench/forward_full.py makes them."""
    import numpy as np

    rng = np.random.default_rng(variant.input_seed)
    shape = (variant.batch, variant.n_segments)
    video = rng.uniform(-1.0, 1.0, shape + (16, 3, 224, 224)).astype(np.float32)
    audio = (0.5 * rng.standard_normal(shape + (1, 128, 66))).astype(np.float32)
    return video, audio


# ---- forward passes ----------------------------------------------------------------------
def _record(store: dict, name: str):
    return lambda module, args, output: store.__setitem__(name, output.detach().clone())


def _record_input(store: dict, name: str):
    return lambda module, args: store.__setitem__(name, args[0].detach().clone())


def run_sync_model(model, video, audio) -> dict:
    """Logits and every stage the JAX model sows. No hook sits on a module containing the
    aggregators' nn.TransformerEncoderLayers, whose eval fast path must stay as it is."""
    import torch

    out, blocks = {}, []
    t = model.transformer
    hooks = [
        model.afeat_extractor.ast.layernorm.register_forward_hook(_record(out, "ast_last_hidden_state")),
        model.vfeat_extractor.blocks[-1].register_forward_hook(_record(out, "mf_tokens_last_block")),
        model.vproj.register_forward_pre_hook(_record_input(out, "vfeat")),
        model.aproj.register_forward_pre_hook(_record_input(out, "afeat")),
        model.vproj.register_forward_hook(_record(out, "vproj_out")),
        model.aproj.register_forward_hook(_record(out, "aproj_out")),
        t.pos_emb_cfg.register_forward_hook(_record(out, "tokens_after_pos_emb")),
        t.ln_f.register_forward_hook(_record(out, "ln_f_out")),
    ] + [b.register_forward_hook(lambda m, a, o: blocks.append(o.detach().clone())) for b in t.blocks]
    with torch.no_grad():
        _, logits = model(torch.from_numpy(video), torch.from_numpy(audio))
    for h in hooks:
        h.remove()
    out["block_outs"] = torch.stack(blocks)
    out["logits"] = logits
    return {k: v.numpy() for k, v in out.items()}


def run_segment_avclip(model, video, audio) -> dict:
    """Embeddings, temperature and loss of the official stage-I forward, plus the encoder
    outputs (inputs of its DoNothingBridge projections) and the extractors' last tokens."""
    import torch

    b, s = video.shape[:2]
    vis = torch.from_numpy(video).permute(0, 1, 3, 2, 4, 5)  # official (B, S, C, T, H, W)
    aud = torch.from_numpy(audio).view(b, s, 128, 66).permute(0, 1, 3, 2)  # official (B, S, Ta, F)
    out = {"logit_scale": model.logit_scale.detach().clone()}  # before the forward clamps it in place
    hooks = [
        model.a_encoder.ast.layernorm.register_forward_hook(_record(out, "ast_last_hidden_state")),
        model.v_encoder.blocks[-1].register_forward_hook(_record(out, "mf_tokens_last_block")),
        model.vproj.register_forward_pre_hook(_record_input(out, "v_encoder_out")),
        model.aproj.register_forward_pre_hook(_record_input(out, "a_encoder_out")),
    ]
    with torch.no_grad():
        result = model(vis, aud)
    for h in hooks:
        h.remove()
    out["v_encoder_out"] = out["v_encoder_out"].view(b, s, -1)
    out["a_encoder_out"] = out["a_encoder_out"].view(b, s, -1)
    out["v_emb"] = result["rgb_features"][0].view(b, s, -1)
    out["a_emb"] = result["audio_features"][0].view(b, s, -1)
    out["temperature"] = result["logit_scales"][0].detach().clone()  # the clamped value the loss uses
    out["loss"] = result["losses"]["segment_contrastive_loss"]
    return {k: v.numpy() for k, v in out.items()}


# ---- checkpoints -------------------------------------------------------------------------
def _grad_scaler_state() -> dict:
    import torch

    try:
        return torch.amp.GradScaler("cpu").state_dict()
    except (AttributeError, TypeError):  # torch < 2.3 has only the CUDA one
        return torch.cuda.amp.GradScaler(enabled=False).state_dict()


def _fill_optimizer_state(model, optimizer) -> None:
    """One step with zero gradients: the optimizer state holds tensors, as a trained one
    does, and the weights stay as they are (checked)."""
    import torch

    before = {k: v.clone() for k, v in model.state_dict().items()}
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, before[k])]
    if changed:
        raise RuntimeError(f"a zero-gradient optimizer step changed {changed[:3]}")


def save_trainer_checkpoint(model, cfg, state_dict, out: str) -> str:
    """Stages II/III: the dict utils/logger.py `log_model` saves (args as a resolved
    OmegaConf DictConfig, Adam + SequentialLR as scripts/train_utils.py makes them)."""
    import torch

    optimizer = torch.optim.Adam(model.parameters(), lr=float(cfg.training.base_learning_rate))
    scheduler = torch.optim.lr_scheduler.SequentialLR(optimizer, schedulers=[
        torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=1 / 100, total_iters=1000),
        torch.optim.lr_scheduler.ConstantLR(optimizer, factor=1)], milestones=[1000])
    _fill_optimizer_state(model, optimizer)
    scheduler.step()
    checkpoint = {"args": cfg, "loss": 2.1, "metrics": {"accuracy_1": 0.4}, "epoch": 5,
                  "optimizer": optimizer.state_dict(), "model": state_dict, "scaler": _grad_scaler_state(),
                  "lr_scheduler": scheduler.state_dict(), "model_type": type(model).__name__}
    path = os.path.join(out, "trainer.pt")
    torch.save(checkpoint, path)
    return path


def save_stage_one_checkpoint(model, cfg, state_dict, out: str) -> str:
    """Stage I: the dict train_clip.py saves, weights under DistributedDataParallel's `module.`."""
    import torch

    # No weight decay: with it the state-filling step would move the weights.
    optimizer = torch.optim.AdamW(model.parameters(), lr=float(cfg.training.learning_rate), weight_decay=0.0)
    _fill_optimizer_state(model, optimizer)
    checkpoint = {"epoch": 3, "name": "parity", "state_dict": {f"module.{k}": v for k, v in state_dict.items()},
                  "optimizer": optimizer.state_dict(), "metrics": {"sync_w_shifts": {"accuracy": 0.25}},
                  "args": cfg, "scaler": _grad_scaler_state()}
    path = os.path.join(out, "epoch_best.pt")
    torch.save(checkpoint, path)
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--official-repo", required=True, help="checkout of github v-iashin/Synchformer")
    ap.add_argument("--variant", required=True, choices=sorted(VARIANTS))
    ap.add_argument("--out", required=True)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()

    variant = VARIANTS[args.variant]
    out, repo = os.path.abspath(args.out), os.path.abspath(args.official_repo)
    os.makedirs(out, exist_ok=True)
    torchvision_status = stub_torchvision_if_unusable()
    import numpy as np
    import torch

    torch.set_num_threads(args.threads)
    # The official visual package appends a RELATIVE path to sys.path and reads its
    # Motionformer yaml relative to the cwd: construction runs from the repo root.
    os.chdir(repo)
    sys.path.insert(0, repo)
    from utils.utils import instantiate_from_config

    t0 = time.perf_counter()
    cfg = official_config(repo, variant)
    # The official set_seed (scripts/train_utils.py imports sklearn, scipy and matplotlib).
    random.seed(variant.seed)
    np.random.seed(variant.seed)
    torch.manual_seed(variant.seed)
    with official_extractor_sizes(variant):
        model = instantiate_from_config(cfg.model)
    heads = official_heads(model)
    rerandomize_(model, variant.rerandomize_seed)
    model.eval()
    state_dict = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    build_s = time.perf_counter() - t0

    video, audio = make_inputs(variant)
    np.save(os.path.join(out, "video.npy"), video)
    np.save(os.path.join(out, "audio.npy"), audio)
    t0 = time.perf_counter()
    run = run_segment_avclip if variant.is_stage_one else run_sync_model
    outputs = run(model, video, audio)
    forward_s = time.perf_counter() - t0
    np.savez(os.path.join(out, "official_outputs.npz"), **outputs)

    save = save_stage_one_checkpoint if variant.is_stage_one else save_trainer_checkpoint
    checkpoint = save(model, cfg, state_dict, out)

    import omegaconf, timm, transformers
    result = {"variant": variant.to_json(), "checkpoint": os.path.basename(checkpoint),
              "official_heads": heads, "n_params": sum(v.numel() for v in state_dict.values()),
              "model_class": type(model).__name__, "build_s": build_s, "forward_s": forward_s,
              "threads": torch.get_num_threads(), "torchvision": torchvision_status,
              "versions": {"python": platform.python_version(), "torch": torch.__version__,
                           "timm": timm.__version__, "transformers": transformers.__version__,
                           "omegaconf": omegaconf.__version__, "numpy": np.__version__}}
    with open(os.path.join(out, "worker_result.json"), "w") as f:
        json.dump(result, f, indent=1)
    print(f"[torch] {variant.name}: {type(model).__name__}, {result['n_params']:,} params, heads {heads}, "
          f"build {build_s:.1f} s, forward {forward_s:.1f} s -> {checkpoint}", flush=True)


if __name__ == "__main__":
    main()
