"""Inference, defined once: crops -> logits, with or without the 8-view test-time augmentation.

Evaluation (`mnres.training.steps`), the exported serving function (`mnres.deploy.export`),
`predict`, calibration and Grad-CAM all classify through `classify`, so a run evaluated with
test-time augmentation answers the same way wherever it is used.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mnres.data.augment import dihedral_views, preprocess


def classify(model, variables, images, *, tta: bool = False) -> jnp.ndarray:
    """Logits [B, C] of preprocessed images [B, S, S, 3] in inference mode.

    With `tta` (test-time augmentation) the logits are averaged over the 8 symmetries of the
    square (`dihedral_views`): cells have no orientation, so each view is an equally valid
    look, and averaging them removes some of the model's orientation-dependent noise for 8x
    the inference cost. Averaging logits (not probabilities) keeps the log-odds exact.
    """
    if not tta:
        return model.apply(variables, images, train=False)[0]
    logits, _ = model.apply(variables, dihedral_views(images), train=False)
    return jnp.mean(logits.reshape(8, images.shape[0], logits.shape[-1]), axis=0)


@dataclasses.dataclass(frozen=True)
class Classifier:
    """A model with its variables and input size: what every export starts from."""

    model: Any  # an mnres flax module
    variables: dict  # {'params', 'batch_stats'}
    image_size: int
    metadata: dict = dataclasses.field(default_factory=dict)  # source run, step, model
    config: Any = None  # the run's resolved config, when loaded from a run

    @property
    def test_time_augmentation(self) -> bool:
        """Whether the run was evaluated averaging the 8 symmetries of each crop."""
        return bool(self.config is not None and self.config.get("test_time_augmentation"))

    def for_export(self) -> Classifier:
        """The same weights with grouped depthwise convs and float32 compute."""
        model = self.model.clone(depthwise_implementation="grouped", dtype=None)
        return dataclasses.replace(self, model=model)


def logits(classifier: Classifier, images, batch_size: int = 256) -> np.ndarray:
    """Logits float32 [N, C] of uint8 crops [N, S, S, 3] at the model's image size.

    Classified as the run was evaluated (with test-time augmentation if it used it). The last
    batch is padded, so one shape compiles.
    """
    model, tta = classifier.model, classifier.test_time_augmentation
    forward = jax.jit(lambda v, x: classify(model, v, preprocess(x), tta=tta))
    variables = classifier.variables
    images = np.asarray(images)
    if len(images) == 0:
        raise ValueError("no images to classify")
    out = []
    for start in range(0, len(images), batch_size):
        batch = images[start : start + batch_size]
        pad = batch_size - len(batch) if len(images) > batch_size else 0
        padded = np.concatenate([batch, np.zeros((pad, *batch.shape[1:]), batch.dtype)])
        out.append(np.asarray(forward(variables, padded))[: len(batch)])
    return np.concatenate(out).astype(np.float32)
