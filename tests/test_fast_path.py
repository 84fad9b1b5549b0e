"""Guards the CPU fast path of the whole compiled train step, not only the layer.

XLA's grouped convolution is several times slower than the shifted multiply-adds on CPU
(forward and backward); if a refactor of the model, the step or the optimizer let a grouped
convolution back in, training would slow down silently. This checks the program, not a timing.
"""

import re

import jax
import ml_collections
import numpy as np
import pytest

from mnres import config as config_lib
from mnres import models
from mnres.models import params as params_lib
from mnres.training import optim, steps

SIZE, BATCH = 32, 8


def _group_counts(program_text: str) -> list[int]:
    """feature_group_count of every convolution in HLO or StableHLO text (1 is often omitted)."""
    return [int(n) for n in re.findall(r"feature_group_count\s*=\s*(\d+)", program_text)]


def _lowered_train_step(formulation: str):
    """The train step of `mnres.training.steps` for a one-block MobileNet, lowered abstractly."""
    model = models.from_config(
        ml_collections.ConfigDict(
            dict(
                name="mobilenet_v1",
                alpha=0.25,
                num_blocks=1,
                bn_momentum=0.9,
                conv_formulation=formulation,
            )
        )
    )
    shapes = params_lib.abstract_variables(model, (1, SIZE, SIZE, 3))
    optimizer = config_lib.default_config().optimizer
    tx, _ = optim.create_optimizer(optimizer, model, shapes["params"], 10, 1)
    mesh = steps.make_mesh()
    state = jax.eval_shape(lambda: steps.init_state(model, tx, SIZE, 0, mesh))
    data_config = config_lib.default_config().data
    # The augmentation has no convolution; without it the step compiles 3x faster.
    data_config.update(
        dict(flip=False, rot90=False, brightness=0.0, contrast=0.0, saturation=0.0, hue=0.0)
    )
    train_step = steps.make_train_step(model, tx, data_config, mesh)
    batch = {
        "image": jax.ShapeDtypeStruct((BATCH, SIZE, SIZE, 3), np.uint8),
        "label": jax.ShapeDtypeStruct((BATCH,), np.int32),
    }
    return train_step.lower(state, batch)


@pytest.mark.skipif(
    jax.default_backend() != "cpu", reason="'auto' picks the shifted formulation on CPU only"
)
def test_default_compiled_train_step_on_cpu_has_no_grouped_convolution():
    compiled = _lowered_train_step("auto").compile().as_text()
    assert [n for n in _group_counts(compiled) if n > 1] == []


def test_shifted_train_step_has_no_grouped_convolution():
    lowered = _lowered_train_step("shifted").as_text()
    assert [n for n in _group_counts(lowered) if n > 1] == []
    # The 1x1 convs are matmuls on the fast path (XLA's CPU kernel gradient of a 1x1
    # convolution is slow): what remains is the 3x3 stem and its kernel gradient.
    assert lowered.count("stablehlo.convolution") == 2
    assert "stablehlo.dot_general" in lowered
    assert _lowered_train_step("grouped").as_text().count("stablehlo.convolution") > 2


@pytest.mark.parametrize("stage", ["lowered", "compiled"])
def test_grouped_train_step_has_grouped_convolutions(stage):
    # The detector itself: block 1's depthwise conv has 32 * 0.25 = 8 channels, one per group.
    lowered = _lowered_train_step("grouped")
    text = lowered.compile().as_text() if stage == "compiled" else lowered.as_text()
    assert 8 in _group_counts(text)
