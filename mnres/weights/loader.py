"""`load_pretrained`: a model of the registry with its weights and what its inputs must look like.

  pretrained = mnres.load_pretrained("malaria")      # offline: package data
  pretrained.model, pretrained.variables, pretrained.preprocessing
  probs = pretrained.classifier.serve(uint8_crops)  # [B, 2]; class 1 = parasitized
  backbone = mnres.load_pretrained("malaria", num_classes=5)  # a new 5-class head, to fine-tune
  mnres.list_pretrained()                            # what there is, shipped or downloadable

The names are the registry's (`mnres.weights.registry`): the shipped models
(`mnres.weights.shipped`) and Keras' ImageNet weights, downloaded once into a cache
(`mnres.weights.imagenet`). A new classifier and a member of a shipped ensemble are
`mnres.weights.transfer`'s.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from mnres import models, run_folder
from mnres.inference import Classifier
from mnres.weights import imagenet, registry, shipped, transfer


@dataclasses.dataclass(frozen=True)
class Pretrained:
    """A model with its weights and what its inputs must look like."""

    name: str
    model: Any  # an mnres flax module
    variables: dict  # {'params', 'batch_stats'}
    image_size: int
    # How crops are prepared: uint8 RGB, resized as training decoded them, x / 127.5 - 1, and
    # whether the 8-view test-time augmentation is part of the model's evaluation.
    preprocessing: dict
    calibration: dict | None = None  # temperature and operating points (shipped models)
    card: dict | None = None  # the model card (shipped models)
    folder: str | None = None  # where the shipped files are
    config: Any = None  # the training config (shipped models)

    @property
    def classifier(self) -> Classifier:
        """A `mnres.inference.Classifier`: `serve` (uint8 crops -> probabilities), `logits`."""
        return Classifier(self.model, self.variables, self.image_size,
                          {"pretrained": self.name}, self.config)  # fmt: skip


def load_pretrained(
    name: str = "malaria", *, model=None, num_classes: int | None = None, cache_dir=None
) -> Pretrained:
    """A pretrained model, its variables and its preprocessing facts.

    Args:
      name: a `mnres.list_pretrained()` name: 'malaria' (shipped, offline), or an ImageNet name
        such as 'mobilenet_v1_1.0_224.imagenet' (downloaded once into `cache_dir`).
      model: a model to load the weights into instead of the one they were trained as; it may
        differ only in fields that change no parameter (formulation, dtype, dropout, ...).
      num_classes: None keeps the weights' own classifier (ImageNet's 1000 classes, malaria's
        2); another number gives a new classifier of that size at its initial values on the
        pretrained backbone (for fine-tuning). A `model` with another class count gets one too.
      cache_dir: ImageNet weights only: the download cache (default: `$MNRES_CACHE`, else
        ~/.cache/mnres).

    Raises:
      ValueError: an unknown name, `num_classes` < 1 (the model refuses it), or a `model`
        whose fields differ (the error names them).
    """
    entry = registry.get(name)
    if entry.kind == "shipped":
        if model is not None and num_classes is not None and model.num_classes != num_classes:
            raise ValueError(
                f"num_classes={num_classes} but the model given has {model.num_classes} classes"
            )
        return _load_shipped(entry, model, num_classes)
    return _load_imagenet(entry, model, num_classes, cache_dir)


def preprocessing_facts(image_size: int, tta: bool) -> dict:
    """What a crop goes through before the network, as a dict a user can print or follow."""
    return {
        "image_size": image_size,
        "input": "uint8 RGB crops of any size",
        "resize": "longer side to image_size (antialiased), centred on black to a square "
        "(mnres.inference.resize_like_training; mnres.data.decode.decode_image for files)",
        "scale": "x / 127.5 - 1",
        "test_time_augmentation": tta,  # average the logits over the 8 symmetries
    }


def _load_shipped(entry: registry.Weights, model, num_classes: int | None) -> Pretrained:
    name = entry.name
    config = shipped.shipped_config(name)
    if num_classes is None:
        num_classes = model.num_classes if model is not None else entry.num_classes
    # An ensemble is loaded whole, unless a single network (or a new classifier) is asked for.
    whole = model is None and num_classes == entry.num_classes
    member = None if whole else transfer.shipped_member(name, model)
    model_config = config.model if member is None else config.model.members[member]
    expected = models.from_config(model_config, num_classes=num_classes)
    if model is not None:  # before any tracing: a field that differs is named at once
        transfer.check_fields(model, expected, f"the shipped {name!r} weights")
    model = model or expected
    size = int(config.data.image_size)
    new_head = num_classes != entry.num_classes
    variables = transfer.shipped_variables(name, model, size, new_head=new_head)
    folder = shipped.shipped_folder(name)
    return Pretrained(
        name=name,
        model=model,
        variables=variables,
        image_size=size,
        preprocessing=preprocessing_facts(size, bool(config.test_time_augmentation)),
        # The temperature and operating points are the shipped classifier's (a member has none).
        calibration=None if new_head or member is not None else run_folder.read_calibration(folder),
        card=shipped.shipped_card(name),
        folder=str(folder),
        config=config,
    )


def _load_imagenet(entry: registry.Weights, model, num_classes, cache_dir) -> Pretrained:
    expected = models.create_model(
        entry.model,
        alpha=entry.alpha,
        num_classes=entry.num_classes if num_classes is None else num_classes,
    )
    if model is not None:
        transfer.check_fields(model, expected, f"the {entry.name!r} weights")
    model = model or expected
    size = entry.image_size
    variables = model.init(jax.random.key(0), jnp.zeros((1, size, size, 3)), train=False)
    variables, _ = imagenet.load_imagenet(
        model,
        variables,
        image_size=size,
        include_top=num_classes is None,
        cache_dir=cache_dir,
    )
    return Pretrained(entry.name, model, variables, size, preprocessing_facts(size, False))
