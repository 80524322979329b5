"""How long does the stage-II sync transformer sit on its loss plateau?  (issue 4 probe)

The CPU demo's stage II stays at the uniform loss log(21) for thousands of examples.
This probe separates the two possible causes: features that do not carry the timing,
or the sync transformer that cannot yet read an offset out of features that do. It
trains only `vproj`, `aproj` and the GlobalTransformer of a model config (the demo's by
default) on *oracle* extractor features, cached per clip on the official segment grid
(video segments every 8 frames, audio segments every 40 ms), so one example costs the
transformer alone:

* every clip gets irregular events (gap uniform in [--gap-min, --gap-max] s);
* a video token (2 frames) / audio token (1/6 of a 0.64 s segment) holding an event gets
  an event vector added to a per-clip background vector plus noise;
* `--identity` gives every event its own random code, shared by both streams (what an
  ideal stage I would produce: same moment -> similar features); otherwise one event
  direction per stream (`--aligned`: the same direction in both streams);
* `--cue onset` replaces the events by the CPU demo's cue: one switch per clip in its
  middle second, after which every token carries the "on" vector; `--cue pulse
  --pulse-sec D`: the same state, on for D seconds only (one isolated event per clip).

`--phases CUE[@D][~J]:STEPS ...` trains a curriculum (same params and Adam state from
phase to phase); `~J` keeps only the video windows whose centre is within J s of the
clip's switch, so the event's place in the video window is (nearly) fixed and the
offset class is a function of its place in the audio window alone; `--keep-centred P`
keeps that centring for a share P of every batch of the wider phases.

Examples are (clip, video start on the 8-frame grid, offset class) with the offset
applied on the 40 ms grid, as the fixed-offset evaluation does. The held-out clips give
Acc@1 and Acc@1 +-1 class. Levers: `--lr`, `--batch`, `--init-scale` (multiplies every
kernel of the transformer blocks; the official 0.02 init is sized for 768 wide layers),
`--pos-init time` (the position table starts as sinusoids of each token's time instead
of N(0, 1)), `--sync-width/--sync-layers/--sync-heads` (a larger sync transformer).

    python bench/stage2_plateau.py --steps 3000 --batch 32            # the demo's setting
    python bench/stage2_plateau.py --steps 3000 --identity --pos-init time --init-scale 5
    python bench/stage2_plateau.py --steps 750 --cue onset                # the demo's cue
    python bench/stage2_plateau.py --clips 1000 --phases "pulse@0.12~0.2:1500"  # centred windows
"""
from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import traverse_util

from synchformer_jax.models import synchformer as sf
from synchformer_jax.models.config import tiny_config

FPS, RATE = 25, 16000
V_HOP, A_HOP = 8, 640  # frames / samples between cached segment starts
SEG_FRAMES, SEG_SAMPLES = 16, 10240


def oracle_features(n_clips, dim, gap, identity, aligned, rng, duration_sec=10.0, cue="events", pulse_sec=0.0):
    n_frames = int(duration_sec * FPS)
    n_v = (n_frames - SEG_FRAMES) // V_HOP + 1
    n_a = (n_frames * A_HOP - SEG_SAMPLES) // A_HOP + 1
    u_v = rng.normal(size=dim)
    u_a = u_v if aligned else rng.normal(size=dim)
    onset_sec = np.full(n_clips, np.nan)  # onset / pulse cues: the switch time of each clip
    V = np.zeros((n_clips, n_v, 8, dim), np.float32)
    A = np.zeros((n_clips, n_a, 6, dim), np.float32)
    # Start time of every token: video token k of entry j holds frames 8 j + 2 k, +1;
    # audio token k of entry j starts at 0.04 j + k * 0.64 / 6 s.
    tv = (V_HOP * np.arange(n_v)[:, None] + 2 * np.arange(8)[None]) / FPS
    ta = (A_HOP * np.arange(n_a)[:, None] / RATE) + np.arange(6)[None] * SEG_SAMPLES / RATE / 6
    for i in range(n_clips):
        V[i] = rng.normal(size=dim) + 0.1 * rng.normal(size=(n_v, 8, dim))
        A[i] = rng.normal(size=dim) + 0.1 * rng.normal(size=(n_a, 6, dim))
        if cue in ("onset", "pulse"):  # the demo's cue: a state that switches on in the middle second
            t0 = round(rng.uniform(duration_sec / 2 - 0.5, duration_sec / 2 + 0.5) * FPS) / FPS
            onset_sec[i] = t0
            if cue == "onset":
                on_v, on_a = tv >= t0, ta >= t0
            else:  # it switches off again after pulse_sec; a token is "on" if its span overlaps the pulse
                t1 = t0 + pulse_sec
                on_v = (tv + 2 / FPS > t0) & (tv < t1)
                on_a = (ta + SEG_SAMPLES / RATE / 6 > t0) & (ta < t1)
            V[i] += on_v[..., None] * u_v
            A[i] += on_a[..., None] * u_a
            continue
        t = rng.uniform(0.3, gap[1])
        while t < duration_sec - 0.3:
            frame = int(round(t * FPS))
            code = rng.normal(size=dim) if identity else None
            cv = code if identity else u_v
            ca = code if identity else u_a
            for j in range(max(0, (frame - SEG_FRAMES) // V_HOP), min(n_v, frame // V_HOP + 1)):
                k = (frame - V_HOP * j) // 2
                if 0 <= k < 8:
                    V[i, j, k] += cv
            s = frame * A_HOP
            for j in range(max(0, (s - SEG_SAMPLES) // A_HOP), min(n_a, s // A_HOP + 1)):
                k = (s - A_HOP * j) * 6 // SEG_SAMPLES
                if 0 <= k < 6:
                    A[i, j, k] += ca
            t += rng.uniform(*gap)
    return V, A, onset_sec


def time_table(dim, n_seg, rng):
    """Sinusoids of each token's centre time (OFF and MOD keep N(0, 1) rows)."""
    tv = np.array([s * 0.32 + (t + 0.5) * 0.08 for s in range(n_seg) for t in range(8)])
    ta = np.array([s * 0.32 + (t + 0.5) * 0.64 / 6 for s in range(n_seg) for t in range(6)])
    k = dim // 2
    freqs = 1.0 / (0.05 * 200.0 ** (np.arange(k) / k))

    def enc(t):
        return np.concatenate([np.sin(t[:, None] * freqs), np.cos(t[:, None] * freqs)], -1)
    rows = [rng.normal(size=(1, dim)), enc(tv), rng.normal(size=(1, dim)), enc(ta)]
    return np.concatenate(rows)[None].astype(np.float32)


CUES = ("events", "onset", "pulse")


def parse_phase(text):
    """'pulse@0.2~0.5:500' -> ('pulse', 0.2, 0.5, 500): cue, pulse length, video-window
    jitter around the switch (None: every window), steps."""
    try:
        head, steps = text.rsplit(":", 1)
        head, _, jitter = head.partition("~")
        cue, _, sec = head.partition("@")
        if cue not in CUES:
            raise ValueError(f"unknown cue {cue!r}")
        return cue, float(sec or 0.2), float(jitter) if jitter else None, int(steps)
    except ValueError as e:
        raise SystemExit(f"--phases: cannot read {text!r} (CUE[@SEC][~JITTER]:STEPS): {e}")


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--clips", type=int, default=200)
    p.add_argument("--eval-clips", type=int, default=20)
    p.add_argument("--gap-min", type=float, default=0.8)
    p.add_argument("--gap-max", type=float, default=2.0)
    p.add_argument("--identity", action="store_true")
    p.add_argument("--aligned", action="store_true")
    p.add_argument("--cue", choices=CUES, default="events",
                   help="events: short irregular events (--gap-*); onset: one state switch per clip that "
                        "stays on (the CPU demo's cue); pulse: the same state on for --pulse-sec only")
    p.add_argument("--pulse-sec", type=float, default=0.2, help="--cue pulse: how long the state stays on")
    p.add_argument("--phases", nargs="+", metavar="CUE[@SEC][~J]:STEPS",
                   help="a curriculum, one phase after another with the same params and optimizer "
                        "(e.g. onset:750 pulse@1:500 pulse@0.2:500); ~J: only video windows whose centre "
                        "is within J s of the switch (pulse@0.2~0:500); overrides --cue/--steps")
    p.add_argument("--keep-centred", type=float, default=0.0,
                   help="in --phases wider than ~0.2 (onset/pulse cues), this share of every training batch "
                        "keeps video windows centred within 0.2 s of the switch (evaluation does not)")
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--init-scale", type=float, default=1.0)
    p.add_argument("--pos-init", choices=("normal", "time"), default="normal")
    p.add_argument("--eval-every", type=int, default=250)
    p.add_argument("--sync-width", type=int, default=64, help="sync transformer n_embd (demo: 64; official: 768)")
    p.add_argument("--sync-layers", type=int, default=2, help="sync transformer n_layer (demo: 2; official: 3)")
    p.add_argument("--sync-heads", type=int, default=4, help="sync transformer n_head (demo: 4; official: 8)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json-out")
    args = p.parse_args()

    cfg = tiny_config(**{"video.img_size": 64, "dtype": "float32", "sync.n_embd": args.sync_width,
                         "sync.n_layer": args.sync_layers, "sync.n_head": args.sync_heads})
    model = sf.Synchformer(cfg)
    rng = np.random.default_rng(args.seed)
    dim = cfg.video.embed_dim
    phases = ([parse_phase(x) for x in args.phases] if args.phases
              else [(args.cue, args.pulse_sec, None, args.steps)])
    params = jax.device_get(sf.init_params(cfg, jax.random.key(args.seed)))
    flat = traverse_util.flatten_dict(params)
    for key in flat:
        if key[0] == "transformer" and "blocks" in key[1] and key[-1] == "kernel":
            flat[key] = flat[key] * args.init_scale
    if args.pos_init == "time":
        flat[("transformer", "pos_emb_cfg", "pos_emb")] = time_table(cfg.sync.n_embd, cfg.n_segments, rng)
    params = traverse_util.unflatten_dict(flat)
    frozen = {k: params[k] for k in ("vfeat_extractor", "afeat_extractor")}
    trained = {k: params[k] for k in ("vproj", "aproj", "transformer")}

    n_seg = cfg.n_segments
    n_frames = int(10.0 * FPS)
    n_v, n_a = (n_frames - SEG_FRAMES) // V_HOP + 1, (n_frames * A_HOP - SEG_SAMPLES) // A_HOP + 1
    grid = np.arange(cfg.sync.num_offset_classes) - cfg.sync.num_offset_classes // 2  # 0.2 s = 5 audio hops
    pairs = np.array([(k, c) for k in range(n_v - n_seg + 1) for c, g in enumerate(grid)
                      if 0 <= V_HOP * k + 5 * g and V_HOP * k + 5 * g + V_HOP * (n_seg - 1) < n_a])

    # Video window k covers [0.32 k, 0.32 k + 4.8) s: its centre is 0.32 k + 2.4.
    centre = (V_HOP * np.arange(n_v - n_seg + 1) + (V_HOP * (n_seg - 1) + SEG_FRAMES) / 2) / FPS

    def sample(V, A, onset_sec, r, lo, hi, n, jitter=None, keep_centred=0.0):
        clip = r.integers(lo, hi, size=n)
        if jitter is None and not keep_centred:
            k, c = pairs[r.integers(len(pairs), size=n)].T
        else:  # only video windows whose centre is within `jitter` s of the clip's switch
            # `keep_centred`: this share of the rows keeps the first phase's centring (0.2 s)
            per_row = [0.2 if b < round(keep_centred * n) else jitter for b in range(n)]
            k, c = np.empty(n, int), np.empty(n, int)
            for b, i in enumerate(clip):
                j = np.inf if per_row[b] is None else per_row[b]
                ok = pairs[np.abs(centre[pairs[:, 0]] - onset_sec[i]) <= j + 1e-6]
                if not len(ok):
                    raise SystemExit(f"no video window centre within {j} s of {onset_sec[i]} s "
                                     "(centres are 0.32 s apart: use ~0.16 or more)")
                k[b], c[b] = ok[r.integers(len(ok))]
        vi = k[:, None] + np.arange(n_seg)
        ai = V_HOP * k[:, None] + 5 * grid[c][:, None] + V_HOP * np.arange(n_seg)
        return V[clip[:, None], vi], A[clip[:, None], ai], c

    tx = optax.chain(optax.clip_by_global_norm(1.0),
                     optax.adam(optax.linear_schedule(args.lr / 100, args.lr, args.warmup), eps=1e-7))
    opt_state = tx.init(trained)

    def logits_fn(trained, v, a, train, rng=None):
        return model.apply({"params": {**frozen, **trained}}, v, a, train, method="compare",
                           rngs={"dropout": rng} if train else {})

    @jax.jit
    def step(trained, opt_state, v, a, y, rng):
        def loss(t):
            lg = logits_fn(t, v, a, True, rng)
            return optax.softmax_cross_entropy_with_integer_labels(lg, y).mean()
        value, grads = jax.value_and_grad(loss)(trained)
        updates, opt_state = tx.update(grads, opt_state, trained)
        return optax.apply_updates(trained, updates), opt_state, value

    predict = jax.jit(lambda t, v, a: jnp.argmax(logits_fn(t, v, a, False), -1))
    curve, losses, t0, s = [], [], time.perf_counter(), 0
    for cue, pulse_sec, jitter, steps in phases:
        if jitter is not None and cue == "events":
            raise SystemExit("--phases: ~JITTER needs the onset or pulse cue (one switch per clip)")
        V, A, onset_sec = oracle_features(args.clips + args.eval_clips, dim, (args.gap_min, args.gap_max),
                                          args.identity, args.aligned, rng, cue=cue, pulse_sec=pulse_sec)
        ve, ae, ye = sample(V, A, onset_sec, np.random.default_rng(args.seed + 1), args.clips,
                            args.clips + args.eval_clips, 512, jitter)
        for phase_step in range(1, steps + 1):
            s += 1
            keep = args.keep_centred if cue != "events" and (jitter is None or jitter > 0.2) else 0.0
            v, a, y = sample(V, A, onset_sec, rng, 0, args.clips, args.batch, jitter, keep)
            trained, opt_state, value = step(trained, opt_state, v, a, y, jax.random.key(s))
            losses.append(float(value))
            if phase_step % args.eval_every == 0 or phase_step == steps:
                pred = np.asarray(predict(trained, ve, ae))
                row = {"cue": (cue if cue != "pulse" else f"pulse@{pulse_sec:g}")
                       + ("" if jitter is None else f"~{jitter:g}"), "step": s,
                       "examples": s * args.batch, "train_loss": float(np.mean(losses[-50:])),
                       "accuracy_1": float(np.mean(pred == ye)),
                       "accuracy_1_tol1": float(np.mean(abs(pred - ye) <= 1)),
                       "wall_sec": time.perf_counter() - t0}
                curve.append(row)
                print(json.dumps(row), flush=True)
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump({"args": vars(args), "curve": curve}, f, indent=1)


if __name__ == "__main__":
    main()
