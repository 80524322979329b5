"""Torch side of `bench/forward_full.py`: runs in a Python that has torch, never imported
by the package or by the main benchmark process (so the JAX venv never needs torch).

It builds the OFFICIAL Synchformer (`configs/sync.yaml`) from an official checkout given
on the command line (nothing of the official code is copied here), saves its weights with
the official `state_dict()` key names, times its forward pass and stores its logits and
per-modality features for the input the parent process wrote.

Usage (normally spawned by forward_full.py):
    TORCH_PYTHON bench/torch_official_worker.py --official-repo PATH --work-dir DIR \
        --threads N --repeats R [--warmup W] [--seed S] [--rerandomize]
Reads  DIR/video.npy, DIR/audio.npy.
Writes DIR/state_dict.safetensors, DIR/torch_outputs.npz, DIR/torch_result.json.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import random
import resource
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # bench/ also when imported by path
from hostinfo import reset_peak_rss, vm_hwm_bytes  # noqa: E402


def rerandomize_(model, seed: int) -> None:
    """Overwrite every parameter with values of the scale it would have after training.

    The official init leaves many tensors at exactly 0 or 1 (biases, LayerNorms,
    `temp_embed`, the zero-initialised `patch_embed_3d.proj.weight`, which alone makes
    the visual features independent of the input), so a parity check on the official
    init would not notice a converter that swaps or drops them. Same scheme as
    shared/reference/README.md: LN weight 1+0.1N, LN bias 0.05N, Linear/Conv/MHA in_proj
    weights N/sqrt(fan_in), their biases 0.05N, everything else (tokens, embeddings) 0.5N.
    """
    import torch

    kinds = {}
    for mname, mod in model.named_modules():
        for pname, p in mod.named_parameters(recurse=False):
            key = f"{mname}.{pname}" if mname else pname
            if isinstance(mod, torch.nn.LayerNorm):
                kinds[key] = ("ln_w", None) if pname == "weight" else ("ln_b", None)
            elif isinstance(mod, (torch.nn.Linear, torch.nn.Conv2d, torch.nn.Conv3d)):
                kinds[key] = ("w", p[0].numel()) if pname == "weight" else ("b", None)
            elif isinstance(mod, torch.nn.MultiheadAttention) and pname == "in_proj_weight":
                kinds[key] = ("w", p.shape[1])
            elif isinstance(mod, torch.nn.MultiheadAttention) and pname == "in_proj_bias":
                kinds[key] = ("b", None)
            else:
                kinds[key] = ("other", None)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for key, t in model.state_dict(keep_vars=True).items():
            kind, fan_in = kinds[key]
            n = torch.randn(t.shape, generator=gen, dtype=torch.float32)
            if kind == "ln_w":
                v = 1.0 + 0.1 * n
            elif kind in ("ln_b", "b"):
                v = 0.05 * n
            elif kind == "w":
                v = n / fan_in ** 0.5
            else:
                v = 0.5 * n
            t.copy_(v)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--official-repo", required=True, help="checkout of github v-iashin/Synchformer")
    ap.add_argument("--work-dir", required=True)
    ap.add_argument("--threads", type=int, required=True)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--seed", type=int, default=1337, help="official set_seed value before construction")
    ap.add_argument("--rerandomize", action="store_true", help="re-randomise all weights (see rerandomize_)")
    ap.add_argument("--rerandomize-seed", type=int, default=20240101)
    ap.add_argument("--no-save-weights", action="store_true")
    args = ap.parse_args()

    work = os.path.abspath(args.work_dir)
    repo = os.path.abspath(args.official_repo)
    import numpy as np
    import torch
    from omegaconf import OmegaConf

    torch.set_num_threads(args.threads)
    # The official visual package appends a RELATIVE path to sys.path and reads its
    # Motionformer yaml relative to the cwd, so construction must run from the repo root.
    os.chdir(repo)
    sys.path.insert(0, repo)
    from utils.utils import instantiate_from_config  # official helper, used by get_model

    # What the official `set_seed` does (scripts/train_utils.py imports scipy, sklearn and
    # matplotlib at module level, which construction does not need).
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)

    t0 = time.perf_counter()
    cfg = OmegaConf.load(os.path.join(repo, "configs", "sync.yaml"))
    model = instantiate_from_config(cfg.model)
    if args.rerandomize:
        rerandomize_(model, args.rerandomize_seed)
    model.eval()
    build_s = time.perf_counter() - t0
    n_params = sum(p.numel() for p in model.parameters())

    if not args.no_save_weights:
        from safetensors.torch import save_file
        sd = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
        save_file(sd, os.path.join(work, "state_dict.safetensors"))
        del sd

    video = torch.from_numpy(np.load(os.path.join(work, "video.npy")))
    audio = torch.from_numpy(np.load(os.path.join(work, "audio.npy")))
    batch = video.shape[0]

    # Features are read at the inputs of vproj/aproj (= extractor outputs). Hooks sit on
    # these plain Linears, not on modules containing the nn.TransformerEncoderLayers, so
    # PyTorch's fused eval fast path of those layers stays on.
    feats = {}
    hooks = [
        model.vproj.register_forward_pre_hook(lambda m, a: feats.__setitem__("vfeat", a[0].clone())),
        model.aproj.register_forward_pre_hook(lambda m, a: feats.__setitem__("afeat", a[0].clone())),
    ]
    rss_reset = reset_peak_rss()
    times, warm_times, cpu_times = [], [], []
    load_before = os.getloadavg()
    with torch.no_grad():
        for i in range(args.warmup + args.repeats):
            c, t = time.process_time(), time.perf_counter()
            _, logits = model(video, audio)
            dt = time.perf_counter() - t
            if i >= args.warmup:
                cpu_times.append(time.process_time() - c)
            if i == 0:
                first_logits = logits.clone()
                for h in hooks:
                    h.remove()
            (warm_times if i < args.warmup else times).append(dt)
            print(f"[torch] run {i} ({'warm-up' if i < args.warmup else 'timed'}): {dt:.2f} s", flush=True)
    np.savez(os.path.join(work, "torch_outputs.npz"), logits=first_logits.numpy(),
             logits_last=logits.numpy(), vfeat=feats["vfeat"].numpy(), afeat=feats["afeat"].numpy())

    med = statistics.median(times) if times else float("nan")
    import einops, omegaconf, timm, transformers
    result = {
        "implementation": "official PyTorch",
        "device": "cpu",
        "dtype": "float32",
        "threads": torch.get_num_threads(),
        "batch": batch,
        "n_params": n_params,
        "build_s": build_s,
        "warmup_s": warm_times,
        "times_s": times,
        "median_s_per_batch": med,
        "best_s_per_clip": min(times) / batch if times else None,
        "median_s_per_clip": med / batch,
        "clips_per_s": batch / med,
        # CPU seconds / wall seconds of the timed runs: ~threads when the process had the
        # cores to itself, lower when something else ran on the machine.
        "cpu_utilisation": sum(cpu_times) / sum(times) if times else None,
        "cpu_utilisation_per_run": [c / t for c, t in zip(cpu_times, times)],
        # Process CPU seconds per timed run: hardly affected by other load on the machine.
        "cpu_times_s": cpu_times,
        "loadavg_before": load_before,
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "peak_rss_forward_bytes": vm_hwm_bytes() if rss_reset else None,
        "rerandomized": args.rerandomize,
        "seed": args.seed,
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "timm": timm.__version__, "transformers": transformers.__version__,
                     "einops": einops.__version__, "omegaconf": omegaconf.__version__,
                     "numpy": np.__version__},
        "torch_config": torch.__config__.parallel_info(),
    }
    with open(os.path.join(work, "torch_result.json"), "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
