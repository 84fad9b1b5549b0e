"""How a run starts from what it is given: the classes of its data and pretrained weights.

`with_class_names` records the data's classes in the run's config (its config.json), so the run
reloads into a model of as many outputs; `model_config` unfreezes a model that has no pretrained
weights to keep; `load_pretrained` puts `config.model.pretrained` ('malaria', the weights
shipped with mnres; 'imagenet', Keras' published weights; or a Keras `.h5` file) into a fresh
train state, with a classifier at its initial values where the weights have none for the
data's classes.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from absl import logging

from mnres import config as config_lib
from mnres import data
from mnres.data.splits import class_names_of
from mnres.training.steps import TrainState
from mnres.weights import shipped as pretrained_lib


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


def with_class_names(config, ds: data.Dataset):
    """`config` with `data.class_names` the data's classes, where they are not the malaria pair
    or the config has the field; malaria configs stay as they were (unset means that pair).

    Raises:
      ConfigError: `config.data.class_names` names other classes than the data's.
    """
    names, given = class_names_of(ds), config.data.class_names
    if given is not None and tuple(given) != names:
        raise config_lib.ConfigError(
            f"config.data.class_names={tuple(given)!r}, but the data's classes are {names!r}."
        )
    if names == config_lib.MALARIA_CLASSES and given is None:
        return config
    config = config.copy_and_resolve_references()
    with config.unlocked():
        config.data.class_names = names
    return config


def load_pretrained(
    model_config,
    model,
    state: TrainState,
    image_size: int | None = None,
    class_names: tuple[str, ...] | None = None,
) -> TrainState:
    """`config.model.pretrained` loaded into a fresh state: 'malaria', 'imagenet' or a Keras
    `.h5` path.

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
    if pretrained in pretrained_lib.SHIPPED:
        shipped = pretrained_lib.shipped_classes(pretrained)
        new_head = (
            tuple(class_names) != shipped if class_names else model.num_classes != len(shipped)
        )
        variables = pretrained_lib.with_shipped_weights(
            pretrained, model, variables, new_head=new_head
        )
        logging.info(
            "Pretrained weights: the %r model shipped with mnres (%s).",
            pretrained, ", ".join(shipped),
        )  # fmt: skip
        if new_head:
            logging.info(
                "%s initialisation: the shipped %r classifier is for %s, this data's classes "
                "are %s.", head, pretrained, ", ".join(shipped), ", ".join(class_names or ()),
            )  # fmt: skip
    else:
        variables = _load_keras_file(model_config, model, variables, image_size, head)
    shardings = jax.tree.map(lambda x: x.sharding, (state.params, state.batch_stats))
    params, batch_stats = jax.device_put((variables["params"], variables["batch_stats"]), shardings)
    ema_params = jax.tree.map(jnp.copy, params) if state.ema_params else {}
    return state.replace(params=params, batch_stats=batch_stats, ema_params=ema_params)


def _load_keras_file(model_config, model, variables, image_size, head: str) -> dict:
    """Keras weights ('imagenet', or a `.h5` path) in `variables`; logs the file and the head."""
    from mnres.weights import imagenet as imagenet_weights  # reads .h5 with h5py; only needed here

    pretrained = model_config.pretrained
    path, sha256 = imagenet_weights.resolve(
        pretrained, model_config.name, model_config.alpha,
        image_size or imagenet_weights.DEFAULT_SIZE,
    )  # fmt: skip
    variables, loaded = imagenet_weights.load_checked(model, variables, path)
    logging.info("Pretrained weights (%s): %s, sha256 %s. %s", pretrained, path, sha256, loaded)
    if model.classifier_name not in loaded.loaded:
        logging.info("%s initialisation: %s holds no classifier for it.", head, path)
    return variables
