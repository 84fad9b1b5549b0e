"""Pretrained weights: the malaria model shipped inside mnres, and Keras' ImageNet weights.

  pretrained = mnres.load_pretrained("malaria")      # offline: package data
  pretrained.model, pretrained.variables, pretrained.preprocessing
  probs = pretrained.classifier.serve(uint8_crops)  # [B, 2]; class 1 = parasitized
  backbone = mnres.load_pretrained("malaria", num_classes=5)  # a new 5-class head, to fine-tune
  mnres.list_pretrained()                            # what there is, shipped or downloadable

The shipped model is `experiments/configs/default.py` trained on the development slides of the
NIH set; its card (docs/model_card.md, `pretrained.card`) says how, and on what figures.
ImageNet weights are Keras' published files, downloaded once into a cache
(`mnres.weights.imagenet`).
"""

from __future__ import annotations

import dataclasses
import importlib.resources
import pathlib
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from mnres import config as config_lib
from mnres import run_folder
from mnres.inference import Classifier
from mnres.models import ensemble

SHIPPED = ("malaria",)
WEIGHTS = "weights.msgpack"  # flax.serialization msgpack: read by the core install
INT8 = "model_int8.tflite"
GOLDEN = "sample_logits.json"  # the bundled crops' log-odds, to catch preprocessing drift
CARD_JSON = "model_card.json"
SHIPPED_FILES = (WEIGHTS, run_folder.CONFIG_JSON, run_folder.CALIBRATION_JSON, INT8, GOLDEN,
                 CARD_JSON)  # fmt: skip


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


def shipped_folder(name: str = "malaria") -> pathlib.Path:
    """The package-data folder of a shipped model.

    Raises:
      FileNotFoundError: a shipped file is missing (an install without its package data).
    """
    if name not in SHIPPED:
        raise ValueError(f"no shipped model {name!r}: mnres ships {', '.join(SHIPPED)}")
    folder = importlib.resources.files("mnres.weights") / name
    missing = [f for f in SHIPPED_FILES if not (folder / f).is_file()]
    if missing or not isinstance(folder, pathlib.Path):
        raise FileNotFoundError(
            f"the shipped {name!r} model is incomplete in {folder} (missing {', '.join(missing)}):"
            " reinstall mnres from a wheel or a full clone"
        )
    return folder


def list_pretrained() -> list[dict]:
    """Every pretrained model: the shipped ones, then the downloadable ImageNet weights.

    Each entry: name (for `load_pretrained`), kind ('shipped' or 'download'), model, alpha,
    image_size, and a description.
    """
    from mnres.weights import imagenet as imagenet_weights

    entries = []
    for name in SHIPPED:
        card = run_folder.read_json(shipped_folder(name) / CARD_JSON)
        test = card["evaluation"]["test_cells"]
        entries.append(
            {
                "name": name,
                "kind": "shipped",
                "model": card["model"]["name"],
                "alpha": card["model"]["alpha"],
                "image_size": card["model"]["image_size"],
                "description": f"malaria cell crops, parasitized vs uninfected; test accuracy "
                f"{100 * test['accuracy']:.2f}% on {test['n']:,} crops of held-out slides",
            }
        )
    for entry in imagenet_weights.available():
        entries.append(
            {
                "name": imagenet_name(entry["model"], entry["alpha"], entry["image_size"]),
                "kind": "download",
                "model": entry["model"],
                "alpha": entry["alpha"],
                "image_size": entry["image_size"],
                "description": "Keras' ImageNet weights (1000 classes, or no top for "
                "fine-tuning): " + entry["url"],
            }
        )
    return entries


def imagenet_name(model: str, alpha: float, image_size: int) -> str:
    """'mobilenet_v2_1.0_224.imagenet': the `load_pretrained` name of Keras' weights."""
    return f"{model}_{alpha}_{image_size}.imagenet"


def load_pretrained(
    name: str = "malaria", *, model=None, num_classes: int | None = None, cache_dir=None
) -> Pretrained:
    """A pretrained model, its variables and its preprocessing facts.

    Args:
      name: 'malaria' (shipped, offline), or a `list_pretrained()` ImageNet name such as
        'mobilenet_v1_1.0_224.imagenet' (downloaded once into `cache_dir`).
      model: a model to load the weights into instead of the one they were trained as; it may
        differ only in fields that change no parameter (formulation, dtype, dropout, ...).
      num_classes: None keeps the weights' own classifier (ImageNet's 1000 classes, malaria's
        2); another number gives a new classifier of that size at its initial values on the
        pretrained backbone (for fine-tuning). A `model` with another class count gets one too.
      cache_dir: ImageNet weights only: the download cache (default: `$MNRES_CACHE`, else
        ~/.cache/mnres).

    Raises:
      ValueError: an unknown name, or a `model` whose fields differ (the error names them).
    """
    if name in SHIPPED:
        if model is not None and num_classes is not None and model.num_classes != num_classes:
            raise ValueError(
                f"num_classes={num_classes} but the model given has {model.num_classes} classes"
            )
        return _load_shipped(name, model, num_classes)
    if name.endswith(".imagenet"):
        return _load_imagenet(name, model, num_classes, cache_dir)
    known = ", ".join(SHIPPED) + ", or an ImageNet name from mnres.list_pretrained()"
    raise ValueError(f"no pretrained model {name!r}: use {known}")


def check_fields(model, expected, what: str) -> None:
    """ValueError naming each field of `model` that differs from `expected`'s.

    Fields that change no parameter (the conv formulation, dtype, dropout, ...) may differ.
    """
    from mnres.models.params import PARAMETER_FREE_FIELDS

    if type(model) is not type(expected):
        raise ValueError(
            f"{what} are for a {type(expected).__name__}; this model is a {type(model).__name__}"
        )
    differ = [
        f"{f.name}={getattr(expected, f.name)!r} (this model has {getattr(model, f.name)!r})"
        for f in dataclasses.fields(expected)
        if f.name not in PARAMETER_FREE_FIELDS
        and getattr(model, f.name) != getattr(expected, f.name)
    ]
    if differ:
        raise ValueError(f"{what} need {'; '.join(differ)}")


def shipped_config(name: str = "malaria"):
    """The training config (config.json) of a shipped model."""
    return run_folder.read_config(shipped_folder(name))


def shipped_classes(name: str = "malaria") -> tuple[str, ...]:
    """The classes a shipped model was trained on, in output order."""
    return config_lib.class_names(shipped_config(name).data)


def with_shipped_weights(name: str, model, variables: dict, *, new_head: bool) -> dict:
    """`variables` of `model` with the shipped weights `name` put in.

    Args:
      name: a shipped model ('malaria').
      model: the model `variables` are of: the shipped one's fields, but for those that change
        no parameter and, with `new_head`, the number of classes.
      variables: {'params', 'batch_stats'} of `model`, e.g. a fresh `model.init`.
      new_head: keep the classifier of `variables` (for other classes) instead of the shipped
        one; every other layer comes from the shipped weights.

    Returns:
      The new variables (plain dicts).

    Raises:
      ValueError: a field of `model` differs from the shipped model's (the error names it), or
        the classifier does not fit without `new_head`.
    """
    import flax.serialization

    from mnres import models

    folder = shipped_folder(name)
    config = run_folder.read_config(folder)
    classes = len(config_lib.class_names(config.data))
    what = f"the shipped {name!r} weights"
    member = shipped_member(name, model)
    model_config = config.model if member is None else config.model.members[member]
    expected = models.from_config(model_config, num_classes=model.num_classes)
    check_fields(model, expected, what)
    if not new_head and model.num_classes != classes:
        raise ValueError(f"{what} have {classes} classes, this model {model.num_classes}")
    stored = flax.serialization.msgpack_restore((folder / WEIGHTS).read_bytes())
    if member is not None:
        stored = ensemble.member_variables(stored, member)
    head = model.classifier_name if new_head else None  # an ensemble has no one classifier
    merged = {
        collection: {
            layer: value if new_head and layer == head else stored.get(collection, {}).get(layer)
            for layer, value in layers.items()
        }
        for collection, layers in variables.items()
    }
    shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(jnp.shape(x), x.dtype), variables)
    run_folder.check_fits(merged, shapes, f"{folder / WEIGHTS}", model_config["name"])
    return merged


def shipped_member(name: str, model=None) -> int | None:
    """Which member of a shipped ensemble `model` is (None: not an ensemble, or the whole one).

    A shipped ensemble (`mnres.models.Ensemble`) is loaded whole; a single network, e.g. one to
    fine-tune, gets the weights of the first member with its parameter fields (member 0 when
    no model is given). `model=None` with the shipped classes loads the whole ensemble.

    Raises:
      ValueError: `model` is none of the members (each member's differing fields named).
    """
    from mnres import models

    config = shipped_config(name)
    if config.model.name != "ensemble" or isinstance(model, ensemble.Ensemble):
        return None
    if model is None:
        return 0
    found = []
    for index, member in enumerate(config.model.members):
        expected = models.from_config(member, num_classes=model.num_classes)
        try:
            check_fields(model, expected, f"member {index} of the shipped {name!r} ensemble")
            return index
        except ValueError as e:
            found.append(str(e))
    raise ValueError("; ".join(found))


def initial_classifier(classifier: dict, seed: int = 0) -> dict:
    """A classifier's {'kernel', 'bias'} at initial values like those `model.init` gives an
    mnres model's (`mobilenet._MobileNet._head`: Glorot-uniform kernel, zero bias), without
    compiling the whole model's init."""
    kernel, bias = classifier["kernel"], classifier["bias"]
    init = nn.initializers.glorot_uniform()
    return {
        "kernel": init(jax.random.key(seed), kernel.shape, kernel.dtype),
        "bias": jnp.zeros(bias.shape, bias.dtype),
    }


def _load_shipped(name: str, model, num_classes: int | None) -> Pretrained:
    from mnres import models

    folder = shipped_folder(name)
    config = run_folder.read_config(folder)
    classes = config_lib.class_names(config.data)
    num_classes = num_classes or (model.num_classes if model is not None else len(classes))
    # An ensemble is loaded whole, unless a single network (or a new classifier) is asked for.
    whole = model is None and num_classes == len(classes)
    member = None if whole else shipped_member(name, model)
    model_config = config.model if member is None else config.model.members[member]
    expected = models.from_config(model_config, num_classes=num_classes)
    if model is not None:  # before any tracing: a field that differs is named at once
        check_fields(model, expected, f"the shipped {name!r} weights")
    model = model or expected
    size = int(config.data.image_size)
    new_head = num_classes != len(classes)
    shapes = jax.eval_shape(
        lambda: model.init(jax.random.key(0), jnp.zeros((1, size, size, 3)), train=False)
    )
    variables = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
    if new_head:  # the classifier at initial values, the rest shipped (below)
        head = model.classifier_name
        variables["params"][head] = initial_classifier(variables["params"][head])
    variables = with_shipped_weights(name, model, variables, new_head=new_head)
    tta = bool(config.test_time_augmentation)
    return Pretrained(
        name=name,
        model=model,
        variables=variables,
        image_size=size,
        preprocessing=preprocessing_facts(size, tta),
        # The temperature and operating points are the shipped classifier's (a member has none).
        calibration=None if new_head or member is not None else run_folder.read_calibration(folder),
        card=run_folder.read_json(folder / CARD_JSON),
        folder=str(folder),
        config=config,
    )


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


def _load_imagenet(name: str, model, num_classes, cache_dir) -> Pretrained:
    from mnres import models
    from mnres.weights import imagenet as imagenet_weights

    stem = name[: -len(".imagenet")]
    try:
        arch, alpha, size = stem.rsplit("_", 2)
        alpha, size = float(alpha), int(size)
    except ValueError:
        raise ValueError(
            f"{name!r} is not an ImageNet name: use MODEL_ALPHA_SIZE.imagenet, e.g. "
            "'mobilenet_v2_1.0_224.imagenet' (mnres.list_pretrained() lists them)"
        ) from None
    top = {"num_classes": num_classes} if num_classes else {"num_classes": 1000}
    expected = models.create_model(arch, alpha=alpha, **top)
    if model is not None:
        check_fields(model, expected, f"the {name!r} weights")
    model = model or expected
    variables = model.init(jax.random.key(0), jnp.zeros((1, size, size, 3)), train=False)
    variables, _ = imagenet_weights.load_imagenet(
        model,
        variables,
        image_size=size,
        include_top=num_classes is None,
        cache_dir=cache_dir,
    )
    return Pretrained(name, model, variables, size, preprocessing_facts(size, False))
