"""synchformer-jax: Synchformer audio-visual synchronisation in JAX/Flax."""

__version__ = "0.1.0"
