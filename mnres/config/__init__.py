"""The experiment config: its schema (`mnres.config.schema`: every field, its default and its
kind, written once) and its validation (`mnres.config.validation`).

    from mnres import config

    c = config.default_config()  # the recommended recipe
    c.model.alpha = 0.5
    config.validate(c)  # ConfigError (one line naming the field) for anything wrong

Library modules import `mnres.config.schema` itself: the validation reads the weights registry.
"""

from mnres.config.schema import (
    EVALUATION,
    EXECUTION,
    FIELD_KINDS,
    KINDS,
    MALARIA_CLASSES,
    RECIPE,
    SOURCES,
    SPLIT_BY,
    SPLIT_NAMES,
    ConfigError,
    check_data,
    class_names,
    default_config,
    field_kind,
    fields_of_kind,
    from_overrides,
    leaves,
    recipe_fields,
    with_class_names,
)
from mnres.config.validation import (
    check_batch_size,
    check_train_split,
    validate,
    validate_devices,
)

__all__ = [
    "EVALUATION",
    "EXECUTION",
    "FIELD_KINDS",
    "KINDS",
    "MALARIA_CLASSES",
    "RECIPE",
    "SOURCES",
    "SPLIT_BY",
    "SPLIT_NAMES",
    "ConfigError",
    "check_batch_size",
    "check_data",
    "check_train_split",
    "class_names",
    "default_config",
    "field_kind",
    "fields_of_kind",
    "from_overrides",
    "leaves",
    "recipe_fields",
    "validate",
    "validate_devices",
    "with_class_names",
]
