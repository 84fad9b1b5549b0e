"""Fixtures shared by the export, predict and inference tests: a tiny saved run and its model.

The run is a MobileNetV2 (alpha 0.35, 32 px) with random weights, saved through
`mnres.training.checkpoint` as a training run would save it; nothing is trained. Its config is the
default experiment's, so it was "evaluated" with the 8-view test-time augmentation.

Test modules import the plain names (`IMAGE_SIZE`, `HAS_TFLITE`, `needs_tflite`, `make_run`)
with `from conftest import ...`: pytest puts this folder on the import path.
"""

import importlib.util
import os

import jax
import jax.numpy as jnp
import pytest

# The command line keeps compiled programs in the user's cache; the tests' own processes do not
# (a test of the cache turns it on in a subprocess with its own folder).
os.environ.setdefault("MNRES_COMPILE_CACHE", "0")

from experiments.configs import default
from mnres import models, run_folder
from mnres.data import synthetic
from mnres.training import checkpoint

IMAGE_SIZE = 32
HAS_TFLITE = all(importlib.util.find_spec(m) is not None for m in ("tensorflow", "ai_edge_litert"))
needs_tflite = pytest.mark.skipif(not HAS_TFLITE, reason="needs tensorflow and ai-edge-litert")


def run_config(**model):
    """The default experiment config, shrunk: a 32 px model on a few synthetic cells."""
    config = default.get_config()
    config.model.name = "mobilenet_v2"
    config.model.alpha = 0.35
    for key, value in model.items():
        setattr(config.model, key, value)
    config.data.source = "synthetic"
    config.data.synthetic_size = 120
    config.data.num_slides = 6
    config.data.image_size = IMAGE_SIZE
    return config


def make_run(workdir, seed: int = 0, **model) -> str:
    """A training workdir (config.json + checkpoints/) holding random weights.

    The BatchNorm statistics are those of a batch of synthetic cells: with the initial
    ones the activations vanish through the depth and every crop gets the same answer.
    """
    config = run_config(**model)
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "config.json"), "w") as f:
        f.write(config.to_json_best_effort(indent=2))
    net = models.from_config(config.model).clone(bn_momentum=0.0, dtype=None)
    cells = synthetic.draw_cells(64, IMAGE_SIZE, 3, seed)[0]

    @jax.jit
    def init(x):
        variables = net.init(jax.random.key(seed), x[:1], train=False)
        _, updates = net.apply(variables, x, train=True, mutable=["batch_stats"])
        return variables["params"], updates["batch_stats"]

    params, batch_stats = init(cells / 127.5 - 1.0)
    state = {
        "params": params,
        "batch_stats": batch_stats,
        "opt_state": {},
        "step": jnp.asarray(7, jnp.int32),
        "rng": jax.random.key_data(jax.random.key(0)),
    }
    with checkpoint.Checkpoints(os.path.join(workdir, "checkpoints"), async_save=False) as c:
        c.save(7, state, best=True)
    return str(workdir)


@pytest.fixture(scope="session")
def run(tmp_path_factory):
    """The tiny run's folder; tests read it and never write into it."""
    return make_run(tmp_path_factory.mktemp("run"))


@pytest.fixture(scope="session")
def classifier(run):
    """The tiny run restored (`mnres.run_folder.load_run`, best checkpoint)."""
    return run_folder.load_run(run)
