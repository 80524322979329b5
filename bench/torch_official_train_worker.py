"""Torch side of `bench/side_by_side.py`: the OFFICIAL Synchformer under its own recipe.

Runs in a Python that has torch and the official code's deps; never imported by the
package or by the benchmark's parent process. The models are built from an official
checkout given on the command line (nothing of the official code lives in this repo):

* `infer`:  `configs/sync.yaml` Synchformer, `eval()`, `no_grad()`, on CUDA under
  `torch.autocast('cuda')` (fp16) with fp16 video, as `scripts/train_sync.py` evaluates;
* `stage2`: the same model, extractors frozen (`requires_grad=False`, kept in `eval()`
  as `toggle_mode` does), `Adam(lr 2e-6, eps 1e-7)`, autocast fp16 forward +
  `GradScaler` (scale, backward, unscale_, `clip_grad_norm_(1.0)`, step, update):
  `scripts/train_utils.make_backward_and_optim_step`;
* `stage1`: `configs/segment_avclip.yaml` AVCLIP (both extractors trained, drop path on,
  `ckpt_path` null so nothing is downloaded), `AdamW(lr 1e-4, eps 1e-8, wd 0)` with the
  official two parameter groups, autocast fp16 + `GradScaler`, unscale_ + clip 1.0, as
  `train_clip_src/training/train.py`. `--batch-stage1 auto`: doubling from 2 until CUDA
  runs out of memory, then bisection; the step is then timed at the largest batch.

On the CPU everything runs in float32 (no autocast, no scaler): the recipe's fp16 is a
CUDA recipe. The learning-rate schedule is left out (a scalar per step).

`--size tiny` shrinks the official classes the way `shared/reference/README.md`
describes (AST and Motionformer widths injected at construction), keeping 224 px.

Usage (normally spawned by side_by_side.py):
    TORCH_PYTHON bench/torch_official_train_worker.py --official-repo PATH \
        --modes infer,stage2,stage1 --device cuda --json-out OUT.json
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import random
import resource
import statistics
import sys
import time
import traceback

TINY = dict(hidden=96, layers=2, heads=4, mlp=384, sync_embd=64, sync_layers=2, sync_heads=4)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--official-repo", required=True)
    ap.add_argument("--modes", default="infer,stage2,stage1")
    ap.add_argument("--device", default="cuda", choices=["cpu", "cuda"])
    ap.add_argument("--size", default="full", choices=["tiny", "full"])
    ap.add_argument("--batch-infer", type=int, default=16)
    ap.add_argument("--batch-stage2", type=int, default=16)
    ap.add_argument("--batch-stage1", default="auto", help="int, or 'auto' (largest that fits, CUDA only)")
    ap.add_argument("--max-batch", type=int, default=64, help="upper bound of the stage-I search")
    ap.add_argument("--steps", type=int, default=5, help="timed steps / forward passes (median reported)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--seed", type=int, default=1337)
    ap.add_argument("--segments", type=int, default=14)
    ap.add_argument("--json-out", required=True)
    return ap.parse_args(argv)


# ---------------------------------------------------------------- construction -------------
def _compat_shims() -> list[str]:
    """Newer transformers (5.x) dropped `find_pruneable_heads_and_indices`, which the
    official vendored AST imports for head pruning only (never called in a forward or
    backward pass). Returns what was shimmed, for the record."""
    notes = []
    import transformers.pytorch_utils as pu

    if not hasattr(pu, "find_pruneable_heads_and_indices"):
        def _unused(*a, **k):
            raise NotImplementedError("head pruning is not used by the benchmark")
        pu.find_pruneable_heads_and_indices = _unused
        notes.append("transformers.pytorch_utils.find_pruneable_heads_and_indices (absent in "
                     f"transformers {__import__('transformers').__version__}; pruning only) stubbed")
    from transformers.modeling_utils import PreTrainedModel

    if not hasattr(PreTrainedModel, "get_head_mask"):
        def get_head_mask(self, head_mask, num_hidden_layers, is_attention_chunked=False):
            if head_mask is not None:
                raise NotImplementedError("head masks are not used by the benchmark")
            return [None] * num_hidden_layers  # what transformers 4.x returns without a mask
        PreTrainedModel.get_head_mask = get_head_mask
        notes.append("PreTrainedModel.get_head_mask (absent in transformers 5; returns [None]*layers "
                     "without a head mask, as 4.x did) added")
    return notes


@contextlib.contextmanager
def _tiny_sizes(enabled: bool):
    """Inject the reference tiny widths into the official extractors during construction."""
    if not enabled:
        yield
        return
    import model.modules.feat_extractors.audio.ast as ast_mod
    import model.modules.feat_extractors.visual.motionformer as mf_mod

    orig_cfg, orig_oc = ast_mod.ASTConfig, mf_mod.OmegaConf

    def small_ast_config(*a, **k):
        return orig_cfg(*a, hidden_size=TINY["hidden"], num_hidden_layers=TINY["layers"],
                        num_attention_heads=TINY["heads"], intermediate_size=TINY["mlp"], **k)

    class _OC:
        def __getattr__(self, name):
            return getattr(orig_oc, name)

        @staticmethod
        def load(*a, **k):
            cfg = orig_oc.load(*a, **k)
            if "VIT" in cfg:
                cfg.VIT.EMBED_DIM, cfg.VIT.DEPTH, cfg.VIT.NUM_HEADS = TINY["hidden"], TINY["layers"], TINY["heads"]
            return cfg

    ast_mod.ASTConfig, mf_mod.OmegaConf = small_ast_config, _OC()
    try:
        yield
    finally:
        ast_mod.ASTConfig, mf_mod.OmegaConf = orig_cfg, orig_oc


def build(repo: str, which: str, tiny: bool):
    from omegaconf import OmegaConf
    from utils.utils import instantiate_from_config  # official helper

    if which == "sync":
        cfg = OmegaConf.load(os.path.join(repo, "configs", "sync.yaml"))
        if tiny:
            p = cfg.model.params
            p.transformer.params.n_embd = TINY["sync_embd"]
            p.transformer.params.n_layer = TINY["sync_layers"]
            p.transformer.params.n_head = TINY["sync_heads"]
            p.aproj.params.in_features = p.vproj.params.in_features = TINY["hidden"]
    else:
        cfg = OmegaConf.load(os.path.join(repo, "configs", "segment_avclip.yaml"))
        cfg.model.params.afeat_extractor.params.ckpt_path = None  # random init, no download
        cfg.model.params.vfeat_extractor.params.ckpt_path = None
        if tiny:
            cfg.model.params.n_embd = TINY["hidden"]
        # interpolations that point at data/training sections are resolved here
        OmegaConf.resolve(cfg)
    with _tiny_sizes(tiny):
        model = instantiate_from_config(cfg.model)
    if which == "sync":  # scripts/train_utils.get_model: frozen extractors
        for m in (model.vfeat_extractor, model.afeat_extractor):
            for p in m.parameters():
                p.requires_grad = False
    return model, cfg


# ---------------------------------------------------------------- timing helpers ------------
class Timer:
    def __init__(self, device):
        self.device = device

    def sync(self):
        import torch
        if self.device == "cuda":
            torch.cuda.synchronize()

    def __call__(self, fn, warmup, steps):
        for _ in range(warmup):
            fn()
        self.sync()
        times = []
        for _ in range(steps):
            t = time.perf_counter()
            fn()
            self.sync()
            times.append(time.perf_counter() - t)
        return times


def _mem(device):
    import torch
    if device != "cuda":
        return {}
    return {"peak_bytes": torch.cuda.max_memory_allocated(), "peak_reserved_bytes": torch.cuda.max_memory_reserved()}


def _reset_mem(device):
    import gc

    import torch
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def sync_inputs(batch, segments, tiny, device, half):
    import torch
    g = torch.Generator().manual_seed(0)
    vid = torch.rand((batch, segments, 16, 3, 224, 224), generator=g) * 2 - 1
    aud = 0.5 * torch.randn((batch, segments, 1, 128, 66), generator=g)
    tgt = torch.randint(0, 21, (batch,), generator=g)
    vid = vid.half() if half else vid  # the official train/eval video tensor is fp16
    return vid.to(device), aud.to(device), tgt.to(device)


def avclip_inputs(batch, segments, device, half):
    import torch
    g = torch.Generator().manual_seed(0)
    vid = torch.rand((batch, segments, 3, 16, 224, 224), generator=g) * 2 - 1  # (B, S, C, Tv, H, W)
    aud = 0.5 * torch.randn((batch, segments, 66, 128), generator=g)  # (B, S, Ta, F)
    vid = vid.half() if half else vid
    return vid.to(device), aud.to(device)


# ---------------------------------------------------------------- modes -----------------------
def run_infer(args, repo, device, timer):
    import torch
    model, _ = build(repo, "sync", args.size == "tiny")
    model = model.to(device).eval()
    half = device == "cuda"
    vid, aud, _ = sync_inputs(args.batch_infer, args.segments, args.size == "tiny", device, half)

    def fwd():
        with torch.no_grad(), (torch.autocast("cuda") if half else contextlib.nullcontext()):
            model(vid, aud)

    _reset_mem(device)
    cpu0 = time.process_time()
    times = timer(fwd, args.warmup, args.steps)
    res = dict(mode="infer", batch=args.batch_infer, times_s=times, step_s=statistics.median(times),
               cpu_s_per_step=(time.process_time() - cpu0) / (args.warmup + args.steps),
               n_params=sum(p.numel() for p in model.parameters()), **_mem(device))
    return res


def _train_step_fn(model, optimizer, scaler, device, half, loss_of, clip=1.0):
    import torch

    params = [p for p in model.parameters()]

    def step():
        optimizer.zero_grad()
        with (torch.autocast("cuda") if half else contextlib.nullcontext()):
            loss = loss_of()
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(params, clip)
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, clip)
            optimizer.step()
        return loss

    return step


def run_stage2(args, repo, device, timer):
    import torch
    model, _ = build(repo, "sync", args.size == "tiny")
    model = model.to(device)
    model.train()
    model.vfeat_extractor.eval()  # toggle_mode: frozen extractors stay in eval
    model.afeat_extractor.eval()
    half = device == "cuda"
    vid, aud, tgt = sync_inputs(args.batch_stage2, args.segments, args.size == "tiny", device, half)
    optimizer = torch.optim.Adam(model.parameters(), 2e-6, (0.9, 0.999), 1e-7, 0.0)
    scaler = _grad_scaler() if half else None
    holder = {}

    def loss_of():
        loss, _ = model(vid, aud, tgt, loss_fn="cross_entropy")
        holder["loss"] = loss
        return loss

    step = _train_step_fn(model, optimizer, scaler, device, half, loss_of)
    _reset_mem(device)
    cpu0 = time.process_time()
    times = timer(step, args.warmup, args.steps)
    loss = float(holder["loss"].detach())
    res = dict(mode="stage2", batch=args.batch_stage2, times_s=times, step_s=statistics.median(times),
               cpu_s_per_step=(time.process_time() - cpu0) / (args.warmup + args.steps), loss=loss,
               trainable_params=sum(p.numel() for p in model.parameters() if p.requires_grad), **_mem(device))
    return res


def _grad_scaler():
    import torch
    try:
        return torch.amp.GradScaler("cuda")
    except (AttributeError, TypeError):  # older torch
        return torch.cuda.amp.GradScaler()


def _avclip_optimizer(model):
    """train_clip.py: AdamW, gain/bias/logit_scale group without weight decay."""
    import torch

    def exclude(n, p):
        return p.ndim < 2 or "bn" in n or "ln" in n or "bias" in n or "logit_scale" in n

    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    gain_or_bias = [p for n, p in named if exclude(n, p)]
    rest = [p for n, p in named if not exclude(n, p)]
    return torch.optim.AdamW([{"params": gain_or_bias, "weight_decay": 0.0},
                              {"params": rest, "weight_decay": 0.0}], lr=1e-4, betas=(0.9, 0.999), eps=1e-8)


def run_stage1(args, repo, device, timer):
    import torch
    model, _ = build(repo, "avclip", args.size == "tiny")
    model = model.to(device).train()
    half = device == "cuda"
    optimizer = _avclip_optimizer(model)
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)

    def make_step(batch):
        vid, aud = avclip_inputs(batch, args.segments, device, half)
        holder = {}
        scaler = _grad_scaler() if half else None  # fresh: an OOM mid-step can leave one unusable

        def loss_of():
            out = model(vid, aud, 0.0, False, 1)
            holder["loss"] = out["losses"]["segment_contrastive_loss"]
            return holder["loss"]

        return _train_step_fn(model, optimizer, scaler, device, half, loss_of), holder

    def fits(batch):
        try:
            step, _ = make_step(batch)
            step()
            step()
            torch.cuda.synchronize()
            return True
        except torch.cuda.OutOfMemoryError:
            return False
        finally:
            optimizer.zero_grad(set_to_none=True)
            _reset_mem(device)

    search = []
    if args.batch_stage1 == "auto":
        if device != "cuda":
            batch = 1
        else:
            ok, bad, b = 0, None, 2
            while bad is None and b <= args.max_batch:
                f = fits(b)
                search.append((b, f))
                print(f"[torch stage1] batch {b}: {'fits' if f else 'OOM'}", flush=True)
                if f:
                    ok, b = b, b * 2
                else:
                    bad = b
            if bad is not None:
                while bad - ok > 1:
                    mid = (ok + bad) // 2
                    f = fits(mid)
                    search.append((mid, f))
                    print(f"[torch stage1] batch {mid}: {'fits' if f else 'OOM'}", flush=True)
                    ok, bad = (mid, bad) if f else (ok, mid)
            batch = ok
            if batch == 0:
                return dict(mode="stage1", error="batch 2 does not fit", search=search)
    else:
        batch = int(args.batch_stage1)
    step, holder = make_step(batch)
    _reset_mem(device)
    cpu0 = time.process_time()
    times = timer(step, args.warmup, args.steps)
    res = dict(mode="stage1", batch=batch, times_s=times, step_s=statistics.median(times),
               cpu_s_per_step=(time.process_time() - cpu0) / (args.warmup + args.steps),
               loss=float(holder["loss"].detach()), trainable_params=n_trainable, search=search, **_mem(device))
    return res


def matmul_peak(device):
    """Best fp16 TFLOP/s of an 8192^3 matmul (CUDA) / float32 2048^3 (CPU)."""
    import torch
    n, dt = (8192, torch.float16) if device == "cuda" else (2048, torch.float32)
    a = torch.randn(n, n, device=device, dtype=dt)
    b = torch.randn(n, n, device=device, dtype=dt)
    for _ in range(3):
        a @ b
    best = float("inf")
    for _ in range(10):
        if device == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        a @ b
        if device == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t)
    return 2.0 * n ** 3 / best


def main(argv=None):
    args = parse_args(argv)
    repo = os.path.abspath(args.official_repo)
    import numpy as np
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "cuda":
        torch.backends.cudnn.benchmark = True  # scripts/train_sync.py sets it
    os.chdir(repo)  # the official visual package reads its yaml relative to the cwd
    sys.path.insert(0, repo)
    notes = _compat_shims()
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)

    timer = Timer(args.device)
    out = {"implementation": "official PyTorch", "device": args.device, "notes": notes, "results": {}}
    if args.device == "cuda":
        out["device_name"] = torch.cuda.get_device_name(0)
        out["device_total_bytes"] = torch.cuda.get_device_properties(0).total_memory
    out["dtype"] = "fp16 autocast + GradScaler (fp32 weights)" if args.device == "cuda" else "float32"
    try:
        out["matmul_peak_flops"] = matmul_peak(args.device)
    except Exception as e:  # noqa: BLE001
        out["matmul_peak_error"] = repr(e)
    runners = {"infer": run_infer, "stage2": run_stage2, "stage1": run_stage1}
    for mode in [m for m in args.modes.split(",") if m]:
        t0 = time.perf_counter()
        try:
            res = runners[mode](args, repo, args.device, timer)
        except Exception as e:  # noqa: BLE001 - reported, the other modes still run
            traceback.print_exc()
            res = {"mode": mode, "error": f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"}
        res["wall_s"] = time.perf_counter() - t0
        # Process high-water mark so far (the modes share one process; CPU memory column).
        res["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        out["results"][mode] = res
        _reset_mem(args.device)
        print(f"[torch] {mode}: " + json.dumps({k: v for k, v in res.items() if k != 'times_s'}), flush=True)
        with open(args.json_out, "w") as f:  # after every mode: a timeout keeps what was done
            json.dump(out, f, indent=1)

    import timm
    import transformers
    out["versions"] = {"python": platform.python_version(), "torch": torch.__version__,
                       "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version(),
                       "timm": timm.__version__, "transformers": transformers.__version__,
                       "numpy": np.__version__}
    out["threads"] = torch.get_num_threads()
    with open(args.json_out, "w") as f:
        json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
