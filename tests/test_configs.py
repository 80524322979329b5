"""Every config file loads for every documented argument, describes a buildable model,
and the command-line override path (`--config.x.y=value`) type-checks; launch scripts
parse. No training here (tests of the trainer train `configs/tiny.py`)."""
from __future__ import annotations

import importlib.util
import pathlib
import shutil
import subprocess

import pytest

from synchformer_jax import cli, experiment
from synchformer_jax.models.config import HEAD_OFFSET, HEAD_SYNCHRONIZABILITY, KIND_AVCLIP, KIND_SYNC

REPO = pathlib.Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"


def _module(path: pathlib.Path):
    spec = importlib.util.spec_from_file_location(f"config_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _config_specs() -> list[str]:
    """`file[:arg]` for every config file and every argument it documents in `ARGS`."""
    specs = []
    for path in sorted(CONFIGS.glob("*.py")):
        module = _module(path)
        specs.append(path.name)  # the default argument
        specs.extend(f"{path.name}:{arg}" for arg in getattr(module, "ARGS", ()))
    return specs


def _spec(spec: str) -> str:
    """Absolute path, so that the tests do not depend on the working directory."""
    return str(CONFIGS / spec)


def _get_config(name: str, arg: str = ""):
    module = _module(CONFIGS / name)
    return module.get_config(arg) if arg else module.get_config()


def test_every_config_file_opens_with_its_command():
    for path in sorted(CONFIGS.glob("*.py")):
        header = path.read_text().split("\nimport", 1)[0]
        assert header.startswith("#") or header.startswith('"""'), f"{path.name} must open with its command"
        assert "synchformer-jax" in header or "python" in header, f"{path.name}: no command in the header"


@pytest.mark.parametrize("spec", _config_specs())
def test_config_loads_and_builds_a_model_config(spec):
    name, _, arg = spec.partition(":")
    config = _get_config(name, arg)
    assert config.stage in experiment.STAGES
    model = experiment.model_config(config)  # raises on unknown or missing fields
    kind, head = {experiment.STAGE_AVCLIP: (KIND_AVCLIP, HEAD_OFFSET),
                  experiment.STAGE_SYNC: (KIND_SYNC, HEAD_OFFSET),
                  experiment.STAGE_SYNCHRONIZABILITY: (KIND_SYNC, HEAD_SYNCHRONIZABILITY)}[config.stage]
    assert model.kind == kind and model.sync.head == head
    assert model.dtype == config.train.compute_dtype
    assert config.data.batch_size >= 1 and config.data.eval_batch_size >= 1
    assert config.train.num_steps >= 1 and config.train.eval_every >= 1
    # Every field the defaults have is still there (files change values, never drop fields).
    default = experiment.default_config(config.stage).to_dict()

    def keys(d, prefix=""):
        return {prefix + k for k in d} | {x for k, v in d.items() if isinstance(v, dict)
                                          for x in keys(v, prefix + k + ".")}

    assert keys(default) <= keys(config.to_dict())
    # The same file through the command-line loader: same values, and locked (a new
    # field cannot appear by a typo in code either).
    loaded = cli.load_config(_spec(spec))
    assert loaded.to_dict() == config.to_dict()
    with pytest.raises(AttributeError):
        loaded.optim.lrr = 1.0


def test_official_recipes():
    avclip = {arg: _get_config("segment_avclip.py", arg) for arg in ("lrs3", "vggsound", "audioset")}
    assert avclip["lrs3"].optim.lr == 5e-5 and not avclip["lrs3"].data.augment
    assert avclip["vggsound"].optim.lr == 1e-4 and avclip["vggsound"].data.augment
    assert all(not c.optim.lr_per_device and c.optim.name == "adamw" for c in avclip.values())

    rounds = {arg: _get_config("sync.py", arg).test.rounds for arg in ("lrs3", "vggsound", "audioset")}
    assert rounds == {"lrs3": 2, "vggsound": 25, "audioset": 25}
    c = _get_config("sync.py", "vggsound")
    assert c.data.fixed_offsets and not c.test.fixed_offsets
    assert c.optim.lr == 2e-6 and c.optim.lr_per_device and c.optim.eps == 1e-7
    assert c.init_from  # stage II always starts from a stage-I run

    s3 = _get_config("synchronizability.py")
    assert experiment.model_config(s3).n_segments == 13 and s3.test.rounds == 25


def test_override_changes_the_field():
    config = cli.load_config(_spec("sync.py:vggsound"), ["--config.optim.lr=1e-5", "--config.data.batch_size", "32",
                                                          "--config.mesh.data=-1", "--config.data.augment=true",
                                                          "--config.model.sync.n_layer=2"])
    assert config.optim.lr == 1e-5 and config.data.batch_size == 32 and config.data.augment is True
    assert config.mesh.data == -1
    assert experiment.model_config(config).sync.n_layer == 2  # reaches the architecture
    assert isinstance(config.optim.lr, float)


@pytest.mark.parametrize("override, names", [
    ("--config.optim.lrr=1e-5", ["config.optim.lrr", "lr"]),  # typo: named, with a suggestion
    ("--config.nothere.x=1", ["config.nothere.x"]),
    ("--config.optim.lr=fast", ["config.optim.lr"]),  # wrong type
    ("--config.data.batch_size=1.5", ["config.data.batch_size"]),
    ("--config.data.augment=maybe", ["config.data.augment"]),
    ("--epochs=3", ["--epochs"]),
])
def test_bad_override_is_an_error_naming_the_field(override, names):
    with pytest.raises(cli.ConfigError) as e:
        cli.load_config(_spec("sync.py:lrs3"), [override])
    for name in names:
        assert name in str(e.value)


@pytest.mark.parametrize("override, message", [
    ("--config.train.negatives=globl", "train.negatives='globl': choose one of device, global"),
    ("--config.optim.name=adamx", "optim.name='adamx': choose one of adam, adamw"),
    ("--config.data.format=arrayrecord", "data.format='arrayrecord': choose one of array_record, tfrecord"),
    ("--config.data.tfrecord_access=streem", "data.tfrecord_access='streem'"),
    ("--config.stage=sync2", "stage='sync2'"),
    ("--config.optim.frozen=^(vfeat", "optim.frozen='^(vfeat' is not a regular expression"),
])
def test_values_outside_their_choices_are_errors(override, message):
    # Well-typed but misspelt: "globl" used to mean global negatives without a word.
    with pytest.raises(cli.ConfigError) as e:
        cli.load_config(_spec("sync.py:lrs3"), [override])
    assert message in str(e.value)


def test_bad_config_argument_and_path():
    with pytest.raises(cli.ConfigError, match="unknown dataset 'kinetics'"):
        cli.load_config(_spec("sync.py:kinetics"))
    with pytest.raises(cli.ConfigError, match="no such config file"):
        cli.load_config(_spec("nope.py"))


def test_cli_reports_override_errors_with_exit_code(capsys):
    assert cli.main(["train", "--config", _spec("tiny.py:sync"), "--workdir", "unused",
                     "--config.train.num_stepz=3"]) == 2
    assert "config.train.num_stepz" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # other subcommands do not take config overrides
        cli.main(["info", "x", "--config.optim.lr=1"])


def test_eval_split_test_takes_the_test_group():
    config = cli._apply_split(cli.load_config(_spec("sync.py:vggsound")), "test")
    assert config.data.eval_rounds == 25 and not config.data.fixed_offsets
    assert "vggsound_sparse" in config.data.eval_shards
    with pytest.raises(cli.ConfigError, match="no `test` group"):
        cli._apply_split(cli.load_config(_spec("tiny.py")), "test")


def test_distributed_is_detected_from_the_environment(monkeypatch):
    for var in ("JAX_COORDINATOR_ADDRESS", "SLURM_NTASKS", "SLURM_PROCID", "OMPI_COMM_WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    assert cli._distributed_reason() is None
    monkeypatch.setenv("SLURM_NTASKS", "1")
    monkeypatch.setenv("SLURM_PROCID", "0")
    assert cli._distributed_reason() is None  # a one-task allocation is a single host
    monkeypatch.setenv("SLURM_NTASKS", "4")
    assert cli._distributed_reason() == "SLURM"
    monkeypatch.delenv("SLURM_NTASKS")
    monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "10.0.0.1:1234")
    assert cli._distributed_reason() == "JAX_COORDINATOR_ADDRESS"


LAUNCHERS = sorted(p.name for p in (REPO / "launch").glob("*") if p.suffix in (".sh", ".sbatch"))


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
@pytest.mark.parametrize("script", LAUNCHERS)
def test_launch_script_is_valid_bash(script):
    path = REPO / "launch" / script
    result = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    text = path.read_text()
    assert "synchformer-jax" in text and "train" in text
