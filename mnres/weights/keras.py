"""Keras -> mnres weight import, by layer name.

Every mnres variable sits in a module named like the Keras layer it corresponds to (`conv_dw_7`,
`block_3_expand_BN`, `predictions`), so importing `keras.applications` weights (ImageNet
pretrained, or your own) is a lookup by name plus three layout changes:

- depthwise kernels: Keras (kh, kw, C, multiplier) -> mnres (kh, kw, 1, C * multiplier);
- BatchNorm: gamma/beta -> params scale/bias, moving_mean/moving_variance -> batch_stats mean/var;
- MobileNetV1's classifier, a 1x1 conv `conv_preds` (1, 1, C, K) -> Dense kernel (C, K).

Sources: a Keras model object; a `.keras` file; a legacy HDF5 file (the weights-only files
shipped for `keras.applications`, e.g. `mobilenet_1_0_224_tf.h5`, or a full model saved with
`model.save('m.h5')`); or a Keras 3 `.weights.h5` file. The HDF5 files and `.keras` archives
are read with h5py alone; only a `.keras` archive without an HDF5 weights store needs Keras.

    model = mnres.create_model('paper')
    variables = model.init(rng, jnp.zeros((1, 224, 224, 3)), train=False)
    variables, report = load_keras_weights(model, variables, 'mobilenet_1_0_224_tf.h5')
    print(report)  # blocks 12-13 pointwise and conv_preds skipped, the new head left at init
"""

from __future__ import annotations

import dataclasses
import io
import os
import re
import textwrap
import zipfile

import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from flax.core import FrozenDict, freeze, unfreeze

from mnres.models.params import layer_name

_BN_WEIGHTS = ("gamma", "beta", "moving_mean", "moving_variance")
# mnres BatchNorm leaves and the Keras weights they come from.
_BN_LEAVES = {
    ("params", "scale"): "gamma",
    ("params", "bias"): "beta",
    ("batch_stats", "mean"): "moving_mean",
    ("batch_stats", "var"): "moving_variance",
}


@dataclasses.dataclass(frozen=True)
class KerasLayer:
    """The weights of one Keras layer, by weight name ('kernel', 'bias', 'gamma', ...)."""

    name: str
    weights: dict[str, np.ndarray]
    depthwise: bool | None = None  # None: the source does not say (judged from the shapes)


@dataclasses.dataclass(frozen=True)
class LoadReport:
    """What `load_keras_weights` did: layers loaded, mnres layers left as they were, Keras
    layers without an mnres counterpart."""

    loaded: tuple[str, ...]
    left_at_init: dict[str, str]  # mnres layer -> why it was not loaded
    skipped: tuple[str, ...]  # Keras layers with weights that the mnres model does not have

    def __str__(self) -> str:
        def names(items):
            return textwrap.indent(textwrap.fill(", ".join(items), 96), "  ")

        lines = [f"Loaded {len(self.loaded)} layers from Keras:", names(self.loaded)]
        if self.left_at_init:
            lines.append(f"Left at initialisation ({len(self.left_at_init)}):")
            lines += [f"  {name}: {why}" for name, why in self.left_at_init.items()]
        if self.skipped:
            lines += [f"Keras layers skipped ({len(self.skipped)}):", names(self.skipped)]
        return "\n".join(lines)


def _import_h5py():
    """h5py, which reads Keras weight files; an extra, not a core dependency."""
    try:
        import h5py
    except ImportError as e:
        raise ImportError(
            f"reading Keras weight files needs h5py ({e}): pip install 'mnres[keras]'"
        ) from e
    return h5py


def load_keras_weights(model, variables, source, *, strict: bool | None = None):
    """Copies the weights of a Keras MobileNet (or any model with the same layer names) into mnres.

    Args:
      model: the mnres module; its classifier (`model.classifier_name`) may be left at init.
      variables: `{'params', 'batch_stats'}` from `model.init`; not modified.
      source: a Keras model, or the path of a `.keras`, legacy `.h5` or `.weights.h5` file.
      strict: None (default): every mnres layer except the classifier must be in `source` with
        the same shape; a classifier that is missing or of another shape (another number of
        classes) stays at init. True: the classifier too. False: mnres layers missing from
        `source` stay at init. A shape mismatch outside the classifier always raises: it means
        another alpha, depth_multiplier or architecture.

    Returns:
      `(variables, report)`: new variables with the Keras weights, and a `LoadReport`.
    """
    keras_layers = read_keras_layers(source)
    frozen_input = isinstance(variables, FrozenDict)
    flat = traverse_util.flatten_dict(unfreeze(variables) if frozen_input else dict(variables))
    classifier = (
        getattr(model, "classifier_name", None) if getattr(model, "include_top", True) else None
    )

    layers = _leaves_by_layer(flat)
    # Network order (the mnres model's, else the source's): the first mismatch is reported.
    order = {name: i for i, name in enumerate(keras_layers)}
    if hasattr(model, "layer_names"):
        order = {name: i for i, name in enumerate(model.layer_names())}
    loaded, left_at_init = [], {}
    for name in sorted(layers, key=lambda name: order.get(name, len(order))):
        leaves = layers[name]
        optional = strict is False or (strict is None and name == classifier)
        if name not in keras_layers:
            if not optional:
                raise ValueError(
                    f"mnres layer {name!r} is not in the Keras source; pass strict=False to "
                    "leave such layers at their initial values"
                )
            left_at_init[name] = "not in the Keras source"
            continue
        shapes = {key: tuple(flat[path].shape) for key, path in leaves.items()}
        try:
            arrays = _convert(name, keras_layers[name], shapes)
        except ValueError as error:
            if name != classifier or strict:
                raise
            left_at_init[name] = str(error).split(": ", 1)[-1]
            continue
        for key, array in arrays.items():
            flat[leaves[key]] = jnp.asarray(array, dtype=flat[leaves[key]].dtype)
        loaded.append(name)

    skipped = tuple(
        name for name, layer in keras_layers.items() if name not in layers and layer.weights
    )
    result = traverse_util.unflatten_dict(flat)
    return (freeze(result) if frozen_input else result), LoadReport(
        tuple(loaded), left_at_init, skipped
    )


def _leaves_by_layer(flat: dict) -> dict[str, dict[tuple[str, str], tuple]]:
    """The mnres leaves grouped by layer: {name: {(collection, leaf): path}}."""
    layers: dict[str, dict[tuple[str, str], tuple]] = {}
    for path in flat:
        if path[0] in ("params", "batch_stats"):
            layers.setdefault(layer_name(path), {})[(path[0], path[-1])] = path
    return layers


def _convert(name: str, layer: KerasLayer, shapes: dict[tuple[str, str], tuple]):
    """Keras weights of one layer in mnres layout, keyed like `shapes`; raises on any mismatch."""

    def mismatch(what, keras_shape, mnres_shape):
        return ValueError(
            f"layer {name!r}: Keras {what} has shape {tuple(keras_shape)}, mnres expects "
            f"{tuple(mnres_shape)} (different alpha, depth_multiplier, classes or architecture?)"
        )

    weights = layer.weights
    if ("params", "scale") in shapes or ("batch_stats", "mean") in shapes:  # BatchNorm
        missing = [w for w in _BN_WEIGHTS if w not in weights]
        if missing:
            raise ValueError(f"layer {name!r}: Keras layer has no BatchNorm weights {missing}")
        arrays = {key: weights[_BN_LEAVES[key]] for key in shapes}
    else:  # conv, depthwise conv or dense
        if "kernel" not in weights:
            raise ValueError(f"layer {name!r}: Keras layer has no kernel (has {list(weights)})")
        kernel, target = weights["kernel"], shapes[("params", "kernel")]
        depthwise = layer.depthwise
        if depthwise is None:  # the source does not say: a (k, k, C, m) kernel where mnres has 1
            depthwise = kernel.ndim == 4 and len(target) == 4 and target[2] == 1 != kernel.shape[2]
        if depthwise:
            kernel = kernel.reshape(*kernel.shape[:2], 1, -1)
        elif len(target) == 2 and kernel.ndim == 4 and kernel.shape[:2] == (1, 1):
            kernel = kernel[0, 0]  # MobileNetV1's conv_preds: a 1x1 conv used as a dense layer
        if kernel.shape != target:
            raise mismatch("kernel", weights["kernel"].shape, target)
        arrays = {("params", "kernel"): kernel}
        if ("params", "bias") in shapes:
            if "bias" not in weights:
                raise ValueError(f"layer {name!r}: mnres has a bias, the Keras layer has none")
            arrays[("params", "bias")] = weights["bias"]
        elif "bias" in weights:
            raise ValueError(f"layer {name!r}: the Keras layer has a bias, mnres has none")
    for key, array in arrays.items():
        if array.shape != shapes[key]:
            raise mismatch(_BN_LEAVES.get(key, key[1]), array.shape, shapes[key])
    unused = set(shapes) - set(arrays)
    if unused:
        raise ValueError(f"layer {name!r}: no Keras weights for mnres leaves {sorted(unused)}")
    return arrays


# --------------------------------------------------------------------------------------------
# Sources: each reader returns {layer name: KerasLayer}, in the source's order.


def read_keras_layers(source) -> dict[str, KerasLayer]:
    """The weighted layers of a Keras model or weights file, by layer name."""
    if isinstance(source, str | os.PathLike):
        path = os.fspath(source)
        if path.endswith(".keras"):
            return _read_keras_archive(path)
        if path.endswith((".h5", ".hdf5")):
            return read_h5_file(path)
        raise ValueError(f"expected a .keras, .h5 or .weights.h5 file, got {path!r}")
    if hasattr(source, "layers"):
        return _read_model(source)
    raise TypeError(f"source must be a Keras model or a file path, got {type(source).__name__}")


def read_h5_file(path: str | os.PathLike) -> dict[str, KerasLayer]:
    """The weighted layers of a Keras HDF5 file, every array read.

    Raises:
      ValueError: h5py cannot read the file (not HDF5, truncated, a damaged object), or it
        holds no Keras weights; one line that names the file.
    """
    h5py = _import_h5py()
    path = os.fspath(path)
    try:
        with h5py.File(path, "r") as f:
            layers = _read_h5(f, path)
    except FileNotFoundError:
        raise
    except (OSError, KeyError, RuntimeError) as e:  # h5py's errors for damaged files
        reason = " ".join(str(e).split())
        raise ValueError(f"{path}: not a readable HDF5 file ({reason})") from e
    if not layers:
        raise ValueError(f"{path}: holds no Keras weights")
    return layers


def _add(layers: dict[str, KerasLayer], layer: KerasLayer, where: str):
    if layer.name in layers:
        raise ValueError(
            f"layer name {layer.name!r} appears twice in {where}; names must be unique"
        )
    layers[layer.name] = layer


def _weight_name(name: str) -> str:
    """'conv_dw_1/depthwise_kernel:0' -> 'depthwise_kernel'."""
    return re.sub(r":\d+$", "", str(name)).split("/")[-1]


def _read_model(model) -> dict[str, KerasLayer]:
    layers: dict[str, KerasLayer] = {}

    def visit(layer):
        if getattr(layer, "layers", None):  # a nested model: its layers keep their own names
            for sub in layer.layers:
                visit(sub)
            return
        weights = {
            _weight_name(w.name): np.asarray(value)
            for w, value in zip(layer.weights, layer.get_weights(), strict=True)
        }
        if weights:
            depthwise = type(layer).__name__ == "DepthwiseConv2D" or "depthwise_kernel" in weights
            _add(layers, _normalise(layer.name, weights, depthwise), "the Keras model")

    visit(model)
    return layers


def _normalise(name: str, weights: dict[str, np.ndarray], depthwise: bool | None) -> KerasLayer:
    if "depthwise_kernel" in weights:  # tf.keras 2 name; Keras 3 calls it 'kernel'
        weights["kernel"] = weights.pop("depthwise_kernel")
        depthwise = True
    return KerasLayer(name, weights, depthwise)


def _read_h5(f, where: str) -> dict[str, KerasLayer]:
    if "layer_names" in f.attrs:  # legacy weights-only file (the keras.applications downloads)
        return _read_legacy_h5(f, where)
    if "model_weights" in f:  # legacy full model, `model.save('m.h5')`
        return _read_legacy_h5(f["model_weights"], where)
    if "layers" in f or "vars" in f:  # Keras 3 weights store (.weights.h5, inside .keras)
        return _read_keras3_h5(f, where)
    raise ValueError(
        f"{where}: not a Keras weights file (no 'layer_names', 'layers' or 'model_weights' in it)"
    )


def _read_legacy_h5(group, where: str) -> dict[str, KerasLayer]:
    """Keras 2 HDF5 layout: a group per layer, its attribute `weight_names` lists the datasets.

    Weight names are 'layer/weight[:0]'. A nested model's group holds the weights of several
    layers, told apart by that prefix; otherwise the group names the layer (the prefix may
    carry a TensorFlow name-scope suffix such as 'conv1_1').
    """
    layers: dict[str, dict[str, np.ndarray]] = {}
    for group_name in _decode(group.attrs["layer_names"]):
        layer_group = group[group_name]
        weight_names = _decode(layer_group.attrs.get("weight_names", []))
        split = [re.sub(r":\d+$", "", weight).split("/") for weight in weight_names]
        nested = len({tuple(parts[:-1]) for parts in split}) > 1
        for weight, parts in zip(weight_names, split, strict=True):
            owner = parts[-2] if nested and len(parts) > 1 else group_name
            layers.setdefault(owner, {})[parts[-1]] = np.asarray(layer_group[weight])
    result: dict[str, KerasLayer] = {}
    for name, weights in layers.items():
        _add(result, _normalise(name, weights, None), where)
    return result


def _read_keras3_h5(f, where: str) -> dict[str, KerasLayer]:
    """Keras 3 layout: `layers/<key>/vars/<i>`, with the layer name as the `name` attribute of
    `vars` (recent Keras 3) and the layer class in `<key>` (`depthwise_conv2d_3`)."""
    h5py = _import_h5py()

    found: list[tuple[str, str, list[np.ndarray]]] = []

    def visit(path, item):
        if isinstance(item, h5py.Group) and path.split("/")[-1] == "vars" and len(item):
            key = path.split("/")[-2] if "/" in path else ""
            arrays = [np.asarray(item[str(i)]) for i in range(len(item))]
            found.append((key, _decode([item.attrs.get("name", "")])[0], arrays))

    f.visititems(visit)
    layers: dict[str, KerasLayer] = {}
    for key, name, arrays in found:
        if not name:
            raise _NoLayerNames(
                f"{where} does not record layer names (an older Keras 3?); load it into the "
                "Keras model with `model.load_weights` and pass the model instead"
            )
        kind = re.sub(r"_\d+$", "", key)
        if kind == "batch_normalization" or (kind not in _KERAS3_KERNEL_KINDS and len(arrays) == 4):
            weights = dict(zip(_BN_WEIGHTS, arrays, strict=True))
        elif len(arrays) <= 2:
            weights = dict(zip(("kernel", "bias"), arrays, strict=False))
        else:
            raise ValueError(
                f"{where}: layer {name!r} ({key}) has {len(arrays)} weights; "
                "expected a conv, dense or BatchNorm layer"
            )
        depthwise = kind == "depthwise_conv2d" if kind in _KERAS3_KERNEL_KINDS else None
        _add(layers, KerasLayer(name, weights, depthwise), where)
    return layers


_KERAS3_KERNEL_KINDS = ("conv2d", "depthwise_conv2d", "dense")


class _NoLayerNames(ValueError):
    pass


def _read_keras_archive(path: str) -> dict[str, KerasLayer]:
    """A `.keras` zip holds `model.weights.h5` (read directly) next to the model config."""
    h5py = _import_h5py()

    with zipfile.ZipFile(path) as archive:
        if "model.weights.h5" in archive.namelist():
            try:
                with h5py.File(io.BytesIO(archive.read("model.weights.h5")), "r") as f:
                    return _read_keras3_h5(f, path)
            except _NoLayerNames:
                pass
    # Another weights store (or no layer names recorded): let Keras rebuild the model.
    os.environ.setdefault("KERAS_BACKEND", "jax")
    import keras

    return _read_model(keras.saving.load_model(path, compile=False))


def _decode(values) -> list[str]:
    return [v.decode("utf8") if isinstance(v, bytes) else str(v) for v in values]


def keras_layer_names(source) -> tuple[str, ...]:
    """Names of the weighted layers of a Keras model or file (to see what a file holds)."""
    return tuple(read_keras_layers(source))


__all__ = [
    "KerasLayer",
    "LoadReport",
    "keras_layer_names",
    "load_keras_weights",
    "read_h5_file",
    "read_keras_layers",
]
