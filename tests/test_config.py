"""The config schema, and one validation of the config before any work: each bad field is one
line and exit code 2.

Most cases call `mnres.config` in-process and end the way the experiment commands end
(`experiments._cli.exit_with_error`); a few run `python -m experiments.malaria` (and crossval)
for real.
"""

import json
import os
import subprocess
import sys
import types
from pathlib import Path

import ml_collections
import pytest

from experiments import _cli
from experiments.configs import default, paper, smoke, tpu
from mnres import config as config_lib
from mnres import run_folder
from mnres.config import ConfigError
from mnres.training import steps

REPO = Path(__file__).resolve().parents[1]
RUN_V0_1_0 = REPO / "tests" / "testdata" / "run_v0.1.0"
SMOKE = "experiments/configs/smoke.py"


def _smoke():
    """The smoke config, not type-safe: a case can set a field to a value of any type."""
    return ml_collections.ConfigDict(smoke.get_config().to_dict(), type_safe=False)


def _set(path: str, value):
    def mutate(config):
        *parents, field = path.split(".")
        node = config
        for parent in parents:
            node = node[parent]
        node[field] = value

    return mutate


def _refusal(capsys, check, *args) -> str:
    """Runs `check` as the commands do; returns the one stderr line after asserting exit 2."""
    with pytest.raises(SystemExit) as exited:
        try:
            check(*args)
        except ConfigError as e:
            _cli.exit_with_error(e)
    err = capsys.readouterr().err
    assert exited.value.code == 2
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert "Traceback" not in err
    return err


# (case, change to the smoke config, what the line must name: field, value, what is allowed)
CASES = [
    ("batch_size_zero", _set("batch_size", 0), ["config.batch_size=0", ">= 1"]),
    ("eval_batch_size", _set("eval_batch_size", -4), ["config.eval_batch_size=-4", ">= 1"]),
    ("num_epochs_zero", _set("num_epochs", 0), ["config.num_epochs=0", ">= 1"]),
    ("num_epochs_float", _set("num_epochs", 1.5), ["config.num_epochs=1.5", "integer"]),
    ("batch_size_text", _set("batch_size", "64"), ["config.batch_size='64'", "integer"]),
    (
        "negative_learning_rate",
        _set("optimizer.learning_rate", -0.001),
        ["config.optimizer.learning_rate=-0.001", "> 0"],
    ),
    ("zero_learning_rate", _set("optimizer.learning_rate", 0.0), ["learning_rate=0.0", "> 0"]),
    (
        "optimizer_name",
        _set("optimizer.name", "adam"),
        ["config.optimizer.name='adam'", "adamw, sgd, rmsprop"],
    ),
    (
        "optimizer_field",
        _set("optimizer.learningrate", 0.1),
        ["config.optimizer.learningrate", "did you mean config.optimizer.learning_rate"],
    ),
    ("weight_decay", _set("optimizer.weight_decay", -1e-4), ["weight_decay=-0.0001", ">= 0"]),
    (
        "split_fractions",
        _set("data.split_fractions", (0.5, 0.1, 0.1)),
        ["config.data.split_fractions=(0.5, 0.1, 0.1)", "add up to 1"],
    ),
    (
        "image_size_below_strides",
        _set("data.image_size", 16),
        ["config.data.image_size=16", ">= 32"],
    ),
    (
        "data_field",
        _set("data.imagesize", 64),
        ["config.data.imagesize", "did you mean config.data.image_size"],
    ),
    (
        "data_source",
        _set("data.source", "kaggle"),
        ["config.data.source='kaggle'", "tfds, folder, synthetic"],
    ),
    ("split_by", _set("data.split_by", "patient"), ["config.data.split_by='patient'", '"slide"']),
    (
        "model_name",
        _set("model.name", "mobilenet_v3"),
        ["config.model.name='mobilenet_v3'", "did you mean 'mobilenet_v2'", "paper"],
    ),
    ("model_field", _set("model.width", 2), ["config.model", "['width']", "alpha"]),
    ("dtype", _set("model.dtype", "float16"), ["config.model.dtype='float16'", "bfloat16"]),
    ("bn_momentum_one", _set("model.bn_momentum", 1.0), ["bn_momentum=1.0", "(0, 1)"]),
    ("bn_momentum_zero", _set("model.bn_momentum", 0), ["bn_momentum=0", "(0, 1)"]),
    ("alpha", _set("model.alpha", 0.0), ["config.model.alpha=0.0", "> 0"]),
    ("dropout", _set("model.dropout", 1.0), ["config.model.dropout=1.0", "[0, 1)"]),
    ("ema_decay", _set("ema_decay", 1.5), ["config.ema_decay=1.5", "(0, 1)"]),
    ("label_smoothing", _set("label_smoothing", 1.0), ["config.label_smoothing=1.0", "[0, 1)"]),
    ("mixup_alpha", _set("mixup_alpha", -0.2), ["config.mixup_alpha=-0.2", ">= 0"]),
    ("generalized_ce_q", _set("generalized_ce_q", 1.5), ["config.generalized_ce_q=1.5", "[0, 1]"]),
    ("cutmix_alpha", _set("cutmix_alpha", "1"), ["config.cutmix_alpha='1'", ">= 0"]),
    (
        "eval_checkpoint",
        _set("eval_checkpoint", "latest"),
        ["config.eval_checkpoint='latest'", "'best'", "'last'"],
    ),
    (
        "pretrained_missing",
        _set("model.pretrained", "/nonexistent/mobilenet.h5"),
        ["config.model.pretrained='/nonexistent/mobilenet.h5'", "does not exist", ".h5"],
    ),
    (
        "freeze_through",
        _set("model.freeze_through", "conv_pw_99"),
        ["config.model.freeze_through='conv_pw_99'", "not a layer", "'conv_pw_3'"],
    ),
    ("platform", _set("platform", "TPU"), ["config.platform='TPU'", "cpu, gpu, tpu"]),
]


@pytest.mark.parametrize("mutate, expected", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_validate_refuses_with_one_line(capsys, mutate, expected):
    config = _smoke()
    mutate(config)
    line = _refusal(capsys, config_lib.validate, config)
    for part in expected:
        assert part in line, (part, line)


@pytest.mark.parametrize(
    "config",
    [default.get_config(), smoke.get_config(), paper.get_config(), paper.get_config("keras_bn"),
     tpu.get_config(), _smoke()],
    ids=["default", "smoke", "paper", "paper_keras_bn", "tpu", "smoke_untyped"],
)  # fmt: skip
def test_shipped_configs_validate(config):
    config_lib.validate(config)


def test_tpu_config_refused_on_another_backend_only_by_the_commands(capsys):
    config = tpu.get_config()
    config_lib.validate(config)  # the library part: lowering for a TPU stays possible
    line = _refusal(capsys, config_lib.validate_devices, config)
    for part in ("config.platform='tpu'", "'cpu'", "--config.platform=cpu"):
        assert part in line, line
    with config.unlocked():
        config.platform = "cpu"
        config.batch_size = config.eval_batch_size = 8
    config_lib.validate_devices(config)


def test_batch_size_must_divide_over_the_devices(capsys, monkeypatch):
    monkeypatch.setattr(steps.jax, "device_count", lambda: 8)
    config = _smoke()
    config.batch_size = 36
    line = _refusal(capsys, config_lib.validate_devices, config)
    assert "config.batch_size=36" in line and "multiple of the 8 devices" in line, line


def test_batch_size_above_the_training_split(capsys):
    config = _smoke()
    config.batch_size = 4096
    ds = types.SimpleNamespace(train=range(1584), validation=range(198), test=range(0))
    line = _refusal(capsys, config_lib.check_train_split, config, ds)
    assert "config.batch_size=4096" in line and "1584" in line, line
    assert "--config.batch_size=1024" in line, line
    config.batch_size = 1584
    config_lib.check_train_split(config, ds)


@pytest.mark.parametrize(
    "overrides, expected",
    [
        ({"nonexistent": "1"}, ["--config.nonexistent=1", "no field 'nonexistent'", "batch_size"]),
        ({"model.nam": "x"}, ["--config.model.nam=x", "did you mean --config.model.name"]),
        ({"image_size": "16"}, ["did you mean --config.data.image_size"]),
        ({"model.freeze_through.x": "1"}, ["config.model.freeze_through is a value"]),
    ],
    ids=["unknown", "misspelt", "wrong_block", "below_a_value"],
)
def test_unknown_override_keys(capsys, overrides, expected):
    config = smoke.get_config()
    line = _refusal(capsys, _cli.check_override_keys, config, overrides)
    for part in expected:
        assert part in line, (part, line)
    _cli.check_override_keys(config, {"model.alpha": "0.5", "data.image_size": "64"})


# (case, module, flag, what the one error line must say); all run at once, in parallel.
COMMAND_CASES = [
    ("unknown_key", "experiments.malaria", "--config.nonexistent=1",
     ["--config.nonexistent=1", "no field"]),
    ("wrong_type", "experiments.malaria", "--config.num_epochs=1.5",
     ["'1.5'", "num_epochs", "integer"]),
    ("negative_learning_rate", "experiments.malaria", "--config.optimizer.learning_rate=-0.001",
     ["config.optimizer.learning_rate=-0.001", "> 0"]),
    ("batch_above_split", "experiments.malaria", "--config.batch_size=4096",
     ["config.batch_size=4096", "1584 images of the training split", "at most 1584"]),
    ("crossval", "experiments.crossval", "--config.model.nam=x",
     ["did you mean --config.model.name"]),
    ("config_file", "experiments.malaria", "--config=experiments/configs/paper.py:bad",
     ["--config=experiments/configs/paper.py:bad", "cannot load", "'keras_bn'"]),
]  # fmt: skip


@pytest.fixture(scope="module")
def command_runs(tmp_path_factory):
    """{case: (workdir, finished process)} of every COMMAND_CASES command, run in parallel."""
    environ = {**os.environ, "JAX_PLATFORMS": "cpu"}
    started = {}
    for case, module, flag, _ in COMMAND_CASES:
        workdir = tmp_path_factory.mktemp(case) / "run"
        command = [sys.executable, "-m", module, f"--config={SMOKE}", f"--workdir={workdir}", flag]
        started[case] = workdir, subprocess.Popen(
            command, cwd=REPO, env=environ, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
    finished = {}
    for case, (workdir, proc) in started.items():
        stderr = proc.communicate(timeout=300)[1]
        finished[case] = workdir, proc.returncode, stderr
    return finished


@pytest.mark.parametrize(
    "case, expected", [(c[0], c[3]) for c in COMMAND_CASES], ids=[c[0] for c in COMMAND_CASES]
)
def test_command_line_exits_2_with_one_line(command_runs, case, expected):
    workdir, returncode, stderr = command_runs[case]
    assert returncode == 2, stderr[-3000:]
    assert "Traceback" not in stderr
    errors = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, stderr[-3000:]
    for part in expected:
        assert part in errors[0], (part, errors[0])
    assert not (workdir / "config.json").exists()  # refused before any work


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["summary", "mobilenet_v2", "--alpha", "0"], "argument --alpha: 0 must be > 0"),
        (["summary", "mobilenet_v2", "--classes", "0"], "argument --classes: 0 must be > 0"),
        (["summary", "mobilenet_v2", "--alpha", "wide"], "invalid float value: 'wide'"),
        (
            ["predict", "run", "cell.png", "--threshold", "1.5"],
            "argument --threshold: 1.5 must be a probability in [0, 1]",
        ),
        (
            ["export", "run", "--calibration-images", "0"],
            "argument --calibration-images: 0 must be > 0",
        ),
    ],
    ids=["alpha", "classes", "alpha_type", "threshold", "calibration_images"],
)
def test_mnres_command_refuses_bad_arguments(capsys, argv, expected):
    from mnres.__main__ import main

    with pytest.raises(SystemExit) as exited:
        main(argv)
    err = capsys.readouterr().err
    assert exited.value.code == 2 and "Traceback" not in err
    assert expected in err.splitlines()[-1], err


@pytest.mark.parametrize(
    "module",
    ["experiments.malaria", "experiments.crossval", "experiments.gradcam",
     "experiments.benchmark", "experiments.ablation", "experiments.data_speed"],
)  # fmt: skip
def test_help_exits_0(module):
    out = subprocess.run(
        [sys.executable, "-m", module, "--help"], capture_output=True, text=True, cwd=REPO
    )
    assert out.returncode == 0 and "Traceback" not in out.stderr, out.stderr[-2000:]
    assert out.stdout.strip()


def test_help_lists_the_config_fields_with_their_values():
    out = subprocess.run(
        [sys.executable, "-m", "experiments.malaria", "--config=experiments/configs/smoke.py",
         "--help"],
        capture_output=True, text=True, cwd=REPO,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    assert "  config.model.name = 'mobilenet_v1_residual'" in out.stdout  # smoke.py's value
    assert "  config.batch_size = 32" in out.stdout
    assert "--workdir" in out.stdout
    # The docstring's line continuations survive (a raw docstring).
    assert "default.py \\\n" in out.stdout


def test_every_field_of_the_default_config_has_exactly_one_kind():
    paths = [path for path, _ in config_lib.leaves(config_lib.default_config())]
    assert len(paths) == len(set(paths)) and set(config_lib.FIELD_KINDS) == set(paths)
    for path in paths:
        kind = config_lib.field_kind(path)
        assert kind in config_lib.KINDS, (path, kind)
        claimed = [k for k in config_lib.KINDS if path in config_lib.fields_of_kind(k)]
        assert claimed == [kind], (path, claimed)
    # Where the data lie and how the run is shown are not the recipe; TTA is evaluation's.
    assert config_lib.field_kind("data.dir") == config_lib.EXECUTION
    assert config_lib.field_kind("progress_bar") == config_lib.EXECUTION
    assert config_lib.field_kind("test_time_augmentation") == config_lib.EVALUATION
    assert config_lib.field_kind("model.alpha") == config_lib.RECIPE
    assert config_lib.field_kind("model.num_blocks") == config_lib.RECIPE  # a class's own field
    recipe = config_lib.recipe_fields(smoke.get_config())
    assert recipe["model.num_blocks"] == 3 and "data.dir" not in recipe and "seed" in recipe


def test_a_0_1_0_config_json_reads_as_overrides_of_the_schema():
    written = run_folder.read_json(RUN_V0_1_0 / "config.json")
    assert "mixup_alpha" not in written and "input_normalization" not in written["model"]
    config = run_folder.read_config(RUN_V0_1_0)
    default = config_lib.default_config()
    # The fields 0.1.0 did not have take their defaults ...
    assert config.mixup_alpha == default.mixup_alpha == 0.0
    assert config.model.input_normalization == default.model.input_normalization
    assert config.data.class_names is None and config.platform is None
    # ... the ones it wrote keep their values, a model class's own field included.
    assert config.data.synthetic_size == 400 and config.num_epochs == 1
    assert config.model.num_blocks == 3 and config.model.alpha == 0.25
    flat = dict(config_lib.leaves(config))
    assert set(flat) == set(config_lib.FIELD_KINDS) | {"model.num_blocks"}
    for path, value in config_lib.leaves(written):
        assert flat[path] == value, path
    config_lib.validate(config)


# The command's own training function, in a fresh interpreter: importing experiments.malaria
# defines its absl flags, which another command's module imported by an earlier test defines too.
COUNT_CONSTRUCTIONS = """
import json, sys
import flax
from experiments import malaria
from experiments.configs import smoke
from mnres import config as config_lib
from mnres.models import mobilenet

built, validated = [], []
post_init = mobilenet._MobileNet.__post_init__

def counting_post_init(module):
    if not isinstance(module.parent, flax.core.scope.Scope):
        built.append(type(module).__name__)
    post_init(module)

validate = config_lib.validate
mobilenet._MobileNet.__post_init__ = counting_post_init
config_lib.validate = lambda c: validated.append(1) or validate(c)
config = smoke.get_config()
config.data.synthetic_size, config.batch_size, config.num_epochs = 400, 64, 1
config.progress_bar = config.keep_freed_memory = False
malaria._train(config, "smoke", sys.argv[1])
print(json.dumps({"built": built, "validated": validated}))
"""


def test_a_smoke_run_validates_once_and_builds_its_model_once(tmp_path):
    """From the command's start to report.json, one top-level model is constructed (the
    clones Flax makes inside `init`/`apply`, bound to a scope, are not constructions)."""
    workdir = tmp_path / "run"
    out = subprocess.run(
        [sys.executable, "-c", COUNT_CONSTRUCTIONS, str(workdir)],
        cwd=REPO, capture_output=True, text=True, check=True,
    )  # fmt: skip
    counts = json.loads(out.stdout.strip().splitlines()[-1])
    built, validated = counts["built"], counts["validated"]
    assert (workdir / "report.json").is_file()
    assert built == ["MobileNetV1"] and validated == [1], (built, validated)
