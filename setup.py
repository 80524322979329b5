"""synchformer-jax: Synchformer audio-visual synchronisation in JAX/Flax."""
from setuptools import find_packages, setup

# Two supported stacks: Python 3.11 with jax 0.10.x (flax <= 0.12.8 is the last release
# for 3.11) and Python 3.12+ with jax 0.11+.
INSTALL_REQUIRES = [
    "numpy>=2.0",  # what jax 0.10 asks for
    "jax>=0.10.0,<0.13",
    "flax>=0.12.0,<0.13",
    "optax>=0.2.4,<0.3",
    "orbax-checkpoint>=0.11,<0.13",
    "grain>=0.2.12,<0.3",
    "array-record>=0.7,<0.9",
    "tensorflow-datasets>=4.9.8,<5",
    # tfds imports it when a builder prepares a dataset (`tfds_clips`) but does not require it.
    "importlib_resources>=5",
    "librosa>=0.10.2,<1.1",
    "ml-collections>=1.0,<2",
    # PyAV 19 bundles an FFmpeg whose mp4/AAC decode trims the encoder priming and end
    # padding: 1,024 fewer samples at the front than the official torchvision decode,
    # so audio would reach the model 64 ms early at 16 kHz (tests/test_media.py).
    # PyAV 14 has no `VideoFrame.duration` (conform reads it): the media tests pass on 15-18.
    "av>=15,<19",
    "safetensors>=0.4,<1",
    "tqdm>=4.60",
    # jax.export serialisation (`synchformer-jax export`) needs it; jax does not require it.
    "flatbuffers>=24",
]

EXTRAS = {
    "test": ["pytest>=8", "pytest-xdist>=3.5"],
    # Plots (ROC curves, attribution figures).
    "plots": ["matplotlib>=3.8"],
    # AudioSet-scale preparation on an Apache Beam runner.
    "beam": ["apache-beam>=2.60"],
    # Side-by-side benchmarks against the official PyTorch model (never needed to convert).
    "torch-bench": ["torch>=2.2", "einops>=0.6", "omegaconf>=2.3", "timm>=0.6.13", "transformers>=4.27"],
}
EXTRAS["all"] = sorted({p for k, v in EXTRAS.items() if k != "torch-bench" for p in v})

setup(
    name="synchformer-jax",
    version="0.1.0",
    description="Synchformer (audio-visual synchronisation with sparse cues) in JAX/Flax",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["synchformer_jax", "synchformer_jax.*"]),
    python_requires=">=3.11",
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS,
    entry_points={"console_scripts": ["synchformer-jax=synchformer_jax.cli:main"]},
    classifiers=[
        "Programming Language :: Python :: 3.11",
        "Programming Language :: Python :: 3.12",
        "License :: OSI Approved :: MIT License",
    ],
)
