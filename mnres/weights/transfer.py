"""How pretrained weights go into a model: head surgery, ensemble members and warm starts.

The shipped weights fit a model of the shipped network's parameter fields (`check_fields`); of
a shipped ensemble, a single network takes the member it is (`shipped_member`). A model for
other classes keeps a classifier of its own at its initial values (`initial_classifier`) on the
shipped backbone (`with_shipped_weights`, `shipped_variables`).

A training run starts from `config.model.pretrained` (`warm_start`): a shipped name of the
registry ('malaria'), 'imagenet' (Keras' published file for config.model.name and alpha and the
input size, `mnres.weights.imagenet`) or a Keras `.h5` file (`mnres.config.validate` refuses,
before any work, a setting that cannot load); `model_config` unfreezes a model that has no
pretrained weights to keep.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from absl import logging
from flax import linen as nn

from mnres import models, run_folder
from mnres.models import ensemble
from mnres.training.steps import TrainState
from mnres.weights import imagenet, registry, shipped

# -- head surgery and ensemble members ---------------------------------------------------------


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


def shipped_member(name: str, model=None) -> int | None:
    """Which member of a shipped ensemble `model` is (None: not an ensemble, or the whole one).

    A shipped ensemble (`mnres.models.Ensemble`) is loaded whole; a single network, e.g. one to
    fine-tune, gets the weights of the first member with its parameter fields (member 0 when
    no model is given). `model=None` with the shipped classes loads the whole ensemble.

    Raises:
      ValueError: `model` is none of the members (each member's differing fields named).
    """
    config = shipped.shipped_config(name)
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


def needs_new_head(name: str, model, class_names: tuple[str, ...] | None = None) -> bool:
    """Whether `model` keeps a classifier of its own on the shipped weights `name`: when
    `class_names` (the data's) are not the shipped classes; None: when the class counts differ."""
    classes = shipped.shipped_classes(name)
    if class_names:
        return tuple(class_names) != classes
    return model.num_classes != len(classes)


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
    config = shipped.shipped_config(name)
    classes = len(shipped.shipped_classes(name))
    what = f"the shipped {name!r} weights"
    member = shipped_member(name, model)
    model_config = config.model if member is None else config.model.members[member]
    expected = models.from_config(model_config, num_classes=model.num_classes)
    check_fields(model, expected, what)
    if not new_head and model.num_classes != classes:
        raise ValueError(f"{what} have {classes} classes, this model {model.num_classes}")
    stored = shipped.stored_variables(name)
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
    weights_file = f"{shipped.shipped_folder(name) / shipped.WEIGHTS}"
    run_folder.check_fits(merged, shapes, weights_file, model_config["name"])
    return merged


def shipped_variables(name: str, model, image_size: int, *, new_head: bool) -> dict:
    """The variables of `model` from the shipped weights `name`, without running its init; with
    `new_head`, its classifier at initial values (`initial_classifier`)."""
    shapes = jax.eval_shape(lambda: model.init(
        jax.random.key(0), jnp.zeros((1, image_size, image_size, 3)), train=False
    ))  # fmt: skip
    variables = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
    if new_head:
        head = model.classifier_name
        variables["params"][head] = initial_classifier(variables["params"][head])
    return with_shipped_weights(name, model, variables, new_head=new_head)


# -- a training run's start --------------------------------------------------------------------


def model_config(model_config):
    """`config.model`, unfrozen when there are no pretrained weights to keep (logged)."""
    if model_config.freeze_through and not model_config.pretrained:
        logging.warning(
            "Training every layer: config.model.freeze_through=%r keeps layers at their "
            "pretrained values, but config.model.pretrained ('malaria', 'imagenet' or a Keras "
            "weights file) is not set, so they would stay at their random initialisation.",
            model_config.freeze_through,
        )
        model_config = model_config.copy_and_resolve_references()
        with model_config.unlocked():
            model_config.freeze_through = None
    return model_config


def warm_start(
    model_config,
    model,
    state: TrainState,
    image_size: int | None = None,
    class_names: tuple[str, ...] | None = None,
) -> TrainState:
    """`config.model.pretrained` loaded into a fresh state: a shipped name, 'imagenet' or a
    Keras `.h5` path.

    'malaria' takes the weights shipped with mnres (`mnres.weights.shipped`); its classifier
    too when the data's `class_names` are its classes (None: when the class counts agree), else the
    classifier keeps its initial values. 'imagenet' takes Keras' published file for
    config.model.name/alpha and `image_size` (`mnres.weights.imagenet.choose_weights`;
    None: the 224 px file), downloaded once into `$MNRES_CACHE` (default ~/.cache/mnres), with
    no classifier. The log names the weights, and a classifier that starts from its
    initialisation.
    """
    pretrained = model_config.pretrained
    if not pretrained:
        return state
    variables = {"params": state.params, "batch_stats": state.batch_stats}
    head = f"The classifier ({model.classifier_name}, {model.num_classes} classes) starts from its"
    if pretrained in registry.names("shipped"):
        classes = registry.get(pretrained).class_names
        new_head = needs_new_head(pretrained, model, class_names)
        variables = with_shipped_weights(pretrained, model, variables, new_head=new_head)
        logging.info(
            "Pretrained weights: the %r model shipped with mnres (%s).",
            pretrained, ", ".join(classes),
        )  # fmt: skip
        if new_head:
            logging.info(
                "%s initialisation: the shipped %r classifier is for %s, this data's classes "
                "are %s.", head, pretrained, ", ".join(classes), ", ".join(class_names or ()),
            )  # fmt: skip
    else:
        variables = _load_keras_file(model_config, model, variables, image_size, head)
    shardings = jax.tree.map(lambda x: x.sharding, (state.params, state.batch_stats))
    params, batch_stats = jax.device_put((variables["params"], variables["batch_stats"]), shardings)
    ema_params = jax.tree.map(jnp.copy, params) if state.ema_params else {}
    return state.replace(params=params, batch_stats=batch_stats, ema_params=ema_params)


def _load_keras_file(model_config, model, variables, image_size, head: str) -> dict:
    """Keras weights ('imagenet', or a `.h5` path) in `variables`; logs the file and the head."""
    pretrained = model_config.pretrained
    path, sha256 = imagenet.resolve(
        pretrained, model_config.name, model.alpha, image_size or imagenet.DEFAULT_SIZE
    )
    variables, loaded = imagenet.load_checked(model, variables, path)
    logging.info("Pretrained weights (%s): %s, sha256 %s. %s", pretrained, path, sha256, loaded)
    if model.classifier_name not in loaded.loaded:
        logging.info("%s initialisation: %s holds no classifier for it.", head, path)
    return variables
