"""The one registry of pretrained weights: every name `mnres.load_pretrained` takes.

    mnres.list_pretrained()                    # every entry, as dicts
    registry.get("mobilenet_v2_0.35_96.imagenet").files

Two kinds of weights, one entry a name:

- 'shipped': package data inside mnres (`mnres.weights.shipped`), loaded offline. Its network,
  input size and classes are the ones its config.json and card record.
- 'download': Keras' ImageNet files for MobileNet v1/v2 (`mnres.weights.imagenet`), one entry
  for each network, alpha and input size Keras publishes, named `MODEL_ALPHA_SIZE.imagenet`;
  fetched once into the cache. Each entry has two files: without the 1000-class classifier (for
  fine-tuning) and with it.

Training takes the same weights through `config.model.pretrained` (`mnres.weights.transfer`):
a shipped name, 'imagenet' (the download entry for the model's alpha and input size) or a Keras
file.
"""

from __future__ import annotations

import dataclasses

from mnres.weights import imagenet, shipped

IMAGENET_CLASSES = 1000
_IMAGENET_SUFFIX = ".imagenet"


@dataclasses.dataclass(frozen=True)
class Weights:
    """One entry of the registry: pretrained weights and the network they fix."""

    name: str  # what `mnres.load_pretrained` takes
    kind: str  # 'shipped' (package data, offline) or 'download' (fetched once into the cache)
    model: str  # the network: a name of `mnres.models.MODELS`, or 'ensemble'
    alpha: float  # the width multiplier (an ensemble's: its members')
    image_size: int  # the input side the weights were trained at
    num_classes: int  # the outputs of the weights' classifier
    class_names: tuple[str, ...] | None  # in output order; None: ImageNet's, not listed
    source: str  # the package-data folder, or the URL folder of the downloads
    files: tuple[str, ...]  # the files there
    description: str


def imagenet_name(model: str, alpha: float, image_size: int) -> str:
    """'mobilenet_v2_1.0_224.imagenet': the registry name of Keras' ImageNet weights."""
    return f"{model}_{alpha}_{image_size}{_IMAGENET_SUFFIX}"


def names(kind: str | None = None) -> tuple[str, ...]:
    """The registered names (of one kind: 'shipped' or 'download'), without reading any file."""
    found = {
        "shipped": shipped.SHIPPED,
        "download": tuple(
            imagenet_name(model, alpha, size)
            for model, (alphas, sizes) in imagenet.PUBLISHED.items()
            for alpha in alphas
            for size in sizes
        ),
    }
    return found[kind] if kind else found["shipped"] + found["download"]


def get(name: str) -> Weights:
    """The entry `name`.

    Raises:
      ValueError: no weights of that name (the message says which there are).
      FileNotFoundError: a shipped model whose package data is incomplete.
    """
    if name in shipped.SHIPPED:
        return _shipped_entry(name)
    if name in names("download"):
        return _download_entry(name)
    known = ", ".join(shipped.SHIPPED) + ", or an ImageNet name from mnres.list_pretrained()"
    raise ValueError(f"no pretrained model {name!r}: use {known}")


def entries() -> list[Weights]:
    """Every entry: the shipped weights, then the downloadable ones."""
    return [get(name) for name in names()]


def list_pretrained() -> list[dict]:
    """Every pretrained model, shipped then downloadable: a dict of each `Weights` entry (name,
    kind, model, alpha, image_size, num_classes, class_names, source, files, description)."""
    return [dataclasses.asdict(entry) for entry in entries()]


def imagenet_entry(model_name: str, alpha: float, image_size: int) -> Weights:
    """The download entry `config.model.pretrained='imagenet'` takes: Keras' file for the
    network of `model_name` (e.g. 'paper' takes v1's), `alpha` and `image_size` (the 224 px
    file for a size Keras publishes none for; `imagenet.choose_weights` says why).

    Raises:
      ValueError: an unknown model, or an alpha Keras publishes no weights for.
    """
    choice = imagenet.choose_weights(model_name, alpha, image_size)
    return get(imagenet_name(choice.family, choice.alpha, choice.file_size))


def _headline(card: dict) -> str:
    """The figure an entry advertises, labelled: the independent evaluation of these weights,
    else the cross-validation of their recipe; never the 16 test slides of one split alone."""
    evaluation = card.get("evaluation") or {}
    independent = evaluation.get("independent_evaluation")
    if independent:
        # `mnres predict` as it runs by default: without the slide prior.
        run = next((r for r in independent["runs"] if not r["slide_prior"]), independent["runs"][0])
        patients = independent["patients"]["n"]
        return (
            f"independent evaluation of these weights on {patients} unseen patients: cell "
            f"accuracy {100 * run['accuracy']:.2f}% on {independent['cells']['n']:,} crops "
            f"(`mnres {run['name']}`), {run['patients_right']} of {patients} patients right"
        )
    cv = evaluation.get("cross_validation")
    if cv:
        return (
            f"not yet evaluated independently; its recipe's {cv['folds']}-fold patient "
            f"cross-validation (other models of the same recipe, test folds): cell accuracy "
            f"{100 * cv['accuracy']['mean']:.2f}% +/- {100 * cv['accuracy']['sd']:.2f} (SD)"
        )
    return "no held-out figure in its card"


def _shipped_entry(name: str) -> Weights:
    card = shipped.shipped_card(name)
    classes = shipped.shipped_classes(name)
    return Weights(
        name=name,
        kind="shipped",
        model=card["model"]["name"],
        alpha=card["model"]["alpha"],
        image_size=card["model"]["image_size"],
        num_classes=len(classes),
        class_names=classes,
        source=str(shipped.shipped_folder(name)),
        files=shipped.SHIPPED_FILES,
        description=f"malaria cell crops, parasitized vs uninfected; {_headline(card)}",
    )


def _download_entry(name: str) -> Weights:
    model, alpha, size = name[: -len(_IMAGENET_SUFFIX)].rsplit("_", 2)
    choices = [
        imagenet.choose_weights(model, float(alpha), int(size), include_top=top)
        for top in (False, True)
    ]
    return Weights(
        name=name,
        kind="download",
        model=model,
        alpha=choices[0].alpha,
        image_size=int(size),
        num_classes=IMAGENET_CLASSES,
        class_names=None,
        source=imagenet.BASE_URLS[model],
        files=tuple(choice.file for choice in choices),
        description="Keras' ImageNet weights (1000 classes, or no top for fine-tuning)",
    )
