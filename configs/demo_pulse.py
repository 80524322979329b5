# The CPU demo on sparse events: `synchformer-jax demo --config configs/demo_pulse.py
# --workdir workdir/demo_pulse` (~40 minutes on 2 cores; `--fast`: a smoke run).
#
# Same tiny model, data sizes and stage I as configs/demo.py, but each clip carries one
# short event instead of an onset that stays on: the lamp and its hum for 3 frames
# (0.12 s), once in the middle second of the 10-s clip (`synthetic.make_clip(cue="pulse")`).
# A single event is what evidence attribution (paper §4.1) needs to show something: a
# model trained here reads the event itself, so masking the event's 0.1-s interval in
# either stream breaks its prediction while masking anything else does not
# (`python bench/attribution_check.py workdir/demo_pulse/model --kind pulse --samples 1024`).
# The onset demo's model reads the share of "on" tokens instead, which attribution
# cannot pin to one interval (docs/benchmarks.md "Evidence attribution of the demo model").
#
# Measured (2026-11-24, 2 cores, the official clip / class / start draw after the
# curriculum): 85.9 % Acc@1 / 97.3 % +-1 class / 98.8 % Acc@5 on the 256 held-out clips at
# their official fixed offsets (chance 4.8 %), 2,796 s wall (stage II 2,508 s, the cores
# shared with tests for part of it). Earlier, with the unrestricted draw uniform over
# (clip, start, class) triples (2026-11-23): 82.8 % / 94.1 % in 2,332 s; with
# `--set seed=1 --set data.synthetic_seed=1`: 88.3 % / 98.0 %.
"""Pulse demo configs: `get_config("segment_avclip")` / `get_config("sync")`, as configs/demo.py."""
import pathlib

from synchformer_jax import demo

ARGS = ("segment_avclip", "sync")  # the documented arguments (",fast" as configs/demo.py)
# The onset demo's config file beside this one (config files are not a package).
ONSET_DEMO = pathlib.Path(__file__).with_name("demo.py")


# Stage II's window curriculum (synthetic clips with one event only; feature cache
# required). On a lone event the offset class is a function of the *difference* of the
# event's places in the two windows, so with the official uniform window draw attending
# to either event alone earns nothing and the sync transformer sits at the class prior
# (a parity-like plateau, still there after 77k examples). Centring the video windows on
# the event (+-0.2 s) makes the class follow from the audio event alone, which it learns
# in ~1,000 steps; widening the jitter gently, with half of every batch kept centred,
# then carries it to every window (docs/benchmarks.md "Curriculum and batch-size probes").
# (steps, video-window centre within +-jitter s of the event); the uniform draw follows.
PHASES = ((1000, 0.2), (750, 0.35), (750, 0.5), (750, 0.65), (750, 0.8),
          (750, 1.0), (750, 1.3), (750, 1.6), (750, 2.0))
KEEP_CENTRED = 0.5
# The phases' 7,000 steps, then 1,000 on every window.
SYNC_STEPS = sum(steps for steps, _ in PHASES) + 1000


def get_config(arg: str = "sync"):
    stage, *opts = [a.strip() for a in arg.split(",")]
    c = demo.load_config(ONSET_DEMO, arg)
    c.data.synthetic_clip = dict(c.data.synthetic_clip, cue="pulse")
    if stage == "sync":
        c.data.window_curriculum = dict(phases=PHASES, keep_centred=KEEP_CENTRED)
        if "fast" not in opts:
            c.train.num_steps = SYNC_STEPS
            c.train.checkpoint_every = SYNC_STEPS
            c.train.eval_every = SYNC_STEPS
        # A constant rate, as in the measured run: each widening costs a few points that
        # the next few hundred steps win back at the full rate.
        c.optim.schedule = "constant"
    return c
