"""The models shipped inside mnres: their package-data folders and files.

Each shipped model is a folder beside this module (mnres/weights/malaria/) holding what
`python -m experiments.package_model` writes from a training run: the float32 weights, the
run's config.json and calibration.json, an int8 TFLite file, the bundled crops' logits and the
model card. The shipped malaria model was trained on the development slides of the NIH set by
the recipe its card names; the card (docs/model_card.md, and model_card.json here) is the
authority on what it is, how it was made, and on what figures.
`mnres.load_pretrained("malaria")` loads it (`mnres.weights.registry` lists it).
"""

from __future__ import annotations

import importlib.resources
import pathlib

from mnres import run_folder
from mnres.config import schema as config_lib

SHIPPED = ("malaria",)  # the package-data folders beside this module
WEIGHTS = "weights.msgpack"  # flax.serialization msgpack: read by the core install
INT8 = "model_int8.tflite"
GOLDEN = "sample_logits.json"  # the bundled crops' log-odds, to catch preprocessing drift
CARD_JSON = "model_card.json"
SHIPPED_FILES = (WEIGHTS, run_folder.CONFIG_JSON, run_folder.CALIBRATION_JSON, INT8, GOLDEN,
                 run_folder.VERDICT_RULE_JSON, CARD_JSON)  # fmt: skip


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


def shipped_config(name: str = "malaria"):
    """The training config (config.json) of a shipped model."""
    return run_folder.read_config(shipped_folder(name))


def shipped_network(name: str = "malaria") -> dict:
    """The model fields of the network the shipped weights fit: the model's, or of a shipped
    ensemble its first member's (the one a new classifier or a fine-tuning run starts from)."""
    model = shipped_config(name).model
    return dict(model.members[0] if model.name == "ensemble" else model)


def shipped_classes(name: str = "malaria") -> tuple[str, ...]:
    """The classes a shipped model was trained on, in output order."""
    return config_lib.class_names(shipped_config(name).data)


def shipped_card(name: str = "malaria") -> dict:
    """The model card (model_card.json) of a shipped model."""
    return run_folder.read_json(shipped_folder(name) / CARD_JSON)


def stored_variables(name: str = "malaria") -> dict:
    """The shipped variables as stored ({'params', 'batch_stats'}; an ensemble's: each member's)."""
    import flax.serialization

    return flax.serialization.msgpack_restore((shipped_folder(name) / WEIGHTS).read_bytes())
