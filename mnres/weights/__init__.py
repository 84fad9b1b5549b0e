"""Pretrained weights: one registry of the shipped and the downloadable ones, one loader.

- `registry`: every name `load_pretrained` takes, with its kind ('shipped' or 'download'), the
  network it fixes, its classes and where its files are (`list_pretrained`).
- `loader`: `load_pretrained`, the model with its weights and preprocessing.
- `shipped`: the models shipped inside mnres (package data, e.g. mnres/weights/malaria/).
- `imagenet`: Keras' ImageNet files, downloaded once into a cache; `keras`: Keras weight import.
- `transfer`: head surgery, ensemble members, a training run's warm start.

`mnres.config.validate` checks a config's `model.pretrained` against this registry.
"""


def __getattr__(name: str):
    # The public names import the run-folder code on first use, not on `import mnres`.
    if name in ("Weights", "list_pretrained"):
        from mnres.weights import registry

        return getattr(registry, name)
    if name in ("Pretrained", "load_pretrained"):
        from mnres.weights import loader

        return getattr(loader, name)
    raise AttributeError(f"module 'mnres.weights' has no attribute {name!r}")


__all__ = ["Pretrained", "Weights", "list_pretrained", "load_pretrained"]
