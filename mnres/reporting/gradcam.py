"""Grad-CAM (Selvaraju et al. 2017) for the mnres models: where does the model see a parasite?

The heat map of a cell is ``relu(sum_k alpha_k A_k)``, upsampled to the crop, where ``A`` is the
output of one layer (a top-level module such as `block_5` or `head`) and ``alpha_k`` the
spatial mean of d score / d A_k. The score is the log-odds of the target class, z1 - z0 for
parasitized: with two softmax classes only the difference of the logits matters. The gradient
is taken through `model.apply` by adding a zero perturbation to the layer's output with
`flax.linen.intercept_methods`, so any model and any layer work without changing the model.

The last feature map of a MobileNet is 1/32 of the crop (2x2 at 64 px), too coarse to point
at a parasite; `default_layer` takes the deepest layer whose map is still at least 7x7 (the
last one at 224 px, as in the Grad-CAM paper; stride 8 at 64 px).
"""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from matplotlib import colormaps
from matplotlib.figure import Figure

from mnres.reporting import plots

GRADCAM_PNG = "gradcam.png"


def _forward(model, variables, images, layer: str, delta=None):
    """(logits, the output of `layer`), with `delta` added to that output when given."""
    captured = {}

    def interceptor(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        if context.method_name == "__call__" and "/".join(context.module.scope.path) == layer:
            captured["activation"] = out
            if delta is not None:
                out = out + delta.astype(out.dtype)
        return out

    with nn.intercept_methods(interceptor):
        logits, _ = model.apply(variables, images, train=False)
    if "activation" not in captured:
        raise ValueError(f"layer {layer!r} is not a module of {type(model).__name__}")
    return logits, captured["activation"]


def layer_shapes(model, image_size: int) -> dict[str, tuple]:
    """Output shape of every top-level module of `model` at `image_size`, in call order."""
    shapes = {}

    def interceptor(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        path = context.module.scope.path if context.module.scope else ()
        if context.method_name == "__call__" and len(path) == 1 and hasattr(out, "shape"):
            shapes[path[0]] = tuple(out.shape)
        return out

    def init_and_apply():
        x = jnp.zeros((1, image_size, image_size, 3), jnp.float32)
        variables = model.init(jax.random.key(0), x, train=False)
        with nn.intercept_methods(interceptor):
            return model.apply(variables, x, train=False)

    shapes.clear()
    jax.eval_shape(init_and_apply)
    return shapes


def default_layer(model, image_size: int, min_size: int = 7) -> str:
    """The deepest layer whose feature map is at least `min_size` on a side (else the largest)."""
    maps = [(name, s) for name, s in layer_shapes(model, image_size).items() if len(s) == 4]
    if not maps:
        raise ValueError(f"{type(model).__name__} has no 4-D feature maps")
    large = [name for name, s in maps if min(s[1:3]) >= min_size]
    if large:
        return large[-1]
    return max(maps, key=lambda item: item[1][1] * item[1][2])[0]


@functools.partial(jax.jit, static_argnames=("model", "layer", "target"))
def _gradcam_batch(model, variables, images, layer: str, target: int):
    from mnres.data.augment import preprocess

    x = preprocess(images)

    def score(delta):
        logits, activation = _forward(model, variables, x, layer, delta)
        if logits.shape[-1] == 2:
            chosen = logits[:, target] - logits[:, 1 - target]  # log-odds of the target
        else:
            chosen = logits[:, target]
        # Examples are independent (BatchNorm on running averages): one grad gives all.
        return jnp.sum(chosen), (activation, logits)

    shape = jax.eval_shape(lambda: _forward(model, variables, x, layer)[1])
    delta = jnp.zeros(shape.shape, jnp.float32)
    grads, (activation, logits) = jax.grad(score, has_aux=True)(delta)
    weights = jnp.mean(grads, axis=(1, 2), keepdims=True)  # alpha_k
    cam = jax.nn.relu(jnp.sum(weights * activation.astype(jnp.float32), axis=-1))
    size = images.shape[1:3]
    cam = jax.image.resize(cam, (cam.shape[0], *size), method="bilinear")
    return jax.nn.relu(cam), jax.nn.softmax(logits)[:, 1]


def gradcam(
    model,
    variables,
    images,
    *,
    layer: str | None = None,
    target: int = 1,
    normalize: str = "image",
    batch_size: int = 64,
):
    """Grad-CAM heat maps of uint8 crops.

    Args:
      model: an mnres model (flax module); an `Ensemble`'s map is the mean of its members' raw
        maps (each at `layer`, or its own `default_layer`), then normalized.
      variables: {'params', 'batch_stats'}.
      images: uint8 [N, S, S, 3] crops (scaled to [-1, 1] inside, as in training).
      layer: a top-level module name ('block_5', 'head', ...) or a '/'-joined path; None:
        `default_layer`.
      target: the class explained, 1 = parasitized.
      normalize: 'image' divides each map by its own maximum (where the model looks, whatever
        the strength); 'shared' divides every map by the 99th percentile of the maps' maxima,
        so a crop with little evidence for the target stays dark; 'none' keeps the raw map.
      batch_size: crops per compiled call (the last batch is padded).

    Returns:
      (heat float32 [N, S, S], in [0, 1] unless normalize='none'; all zeros where the layer
      holds no evidence for the target, P(parasitized) float32 [N] of the crop as shown: one
      view, without the test-time augmentation a run may be evaluated with).
    """
    if normalize not in ("image", "shared", "none"):
        raise ValueError(f"normalize must be 'image', 'shared' or 'none', got {normalize!r}")
    images = np.asarray(images, np.uint8)
    if images.ndim != 4 or len(images) == 0:
        raise ValueError(f"images must be uint8 [N, S, S, 3] with N >= 1, got {images.shape}")
    if hasattr(model, "members"):  # an Ensemble: its members' raw maps, averaged
        from mnres.models.ensemble import member_variables

        maps = [gradcam(member, member_variables(variables, i), images, layer=layer,
                        target=target, normalize="none", batch_size=batch_size)
                for i, member in enumerate(model.members)]  # fmt: skip
        heat = np.mean([m for m, _ in maps], axis=0)
        p = np.clip(np.stack([q for _, q in maps]).astype(np.float64), 1e-7, 1 - 1e-7)
        # The ensemble's P: the members' mean log-odds (its mean logits, for two classes).
        prob = 1.0 / (1.0 + np.exp(-np.mean(np.log(p) - np.log1p(-p), axis=0)))
        return _normalized(heat, normalize), prob.astype(np.float32)
    layer = layer or default_layer(model, images.shape[1])
    heats, probs = [], []
    for start in range(0, len(images), batch_size):
        batch = images[start : start + batch_size]
        pad = batch_size - len(batch) if len(images) > batch_size else 0
        padded = np.concatenate([batch, np.zeros((pad, *batch.shape[1:]), np.uint8)])
        heat, prob = _gradcam_batch(model, variables, padded, layer, target)
        heats.append(np.asarray(heat)[: len(batch)])
        probs.append(np.asarray(prob)[: len(batch)])
    heat = np.concatenate(heats).astype(np.float32)
    return _normalized(heat, normalize), np.concatenate(probs).astype(np.float32)


def _normalized(heat, normalize: str) -> np.ndarray:
    heat = np.asarray(heat, np.float32)
    peaks = heat.max(axis=(1, 2), keepdims=True)
    if normalize == "image":
        heat = np.divide(heat, peaks, out=np.zeros_like(heat), where=peaks > 0)
    elif normalize == "shared":
        scale = float(np.percentile(peaks, 99))
        heat = np.clip(heat / scale, 0.0, 1.0) if scale > 0 else np.zeros_like(heat)
    return heat


def explain_split(
    classifier,
    split,
    path: str,
    *,
    num: int = 8,
    layer: str | None = None,
    normalize: str = "image",
    seed: int = 0,
    batch_size: int = 256,
) -> dict:
    """Writes the Grad-CAM grid of a split: `num` correct and `num` misclassified crops.

    Which crops are correct, their P(parasitized) and the accuracy come from the
    classification the run was evaluated with (`Classifier.logits`: the 8-view test-time
    augmentation when its config has it), so they match the run's report.

    Args:
      classifier: a restored run (`mnres.run_folder.load_run`).
      split: a `mnres.data.Split` at the run's image size (e.g. its test split).
      path: the PNG to write.
      num: examples per side.
      layer, normalize: as `gradcam`.
      seed: which correct examples are drawn.
      batch_size: crops per call when scoring the split.

    Returns:
      {'layer', 'correct', 'misclassified' (indices into the split), 'accuracy',
       'probs' (P(parasitized) float64 [N] of every crop of the split), 'path'}.
    """
    from mnres.metrics import calibration

    model, variables = classifier.model, classifier.variables
    probs = calibration.calibrated_probs(classifier.logits(split.images, batch_size), 1.0)
    correct, wrong = select_examples(split.labels, probs, num, seed=seed)
    chosen = correct + wrong
    if layer is None:  # an ensemble's members each take their own default layer
        members = getattr(model, "members", None) or [model]
        layer = default_layer(members[0], split.images.shape[1])
    heat_of = _heat_maps(model, variables, split.images, chosen, layer, normalize)
    accuracy = float(np.mean((probs >= 0.5) == (np.asarray(split.labels) == 1)))
    plot_gradcam_grid(
        {i: split.images[i] for i in chosen},
        heat_of,
        np.asarray(split.labels),
        probs,
        correct,
        wrong,
        path,
        title=_title(classifier, layer, accuracy, len(probs)),
    )
    return {
        "layer": layer,
        "correct": correct,
        "misclassified": wrong,
        "accuracy": accuracy,
        "probs": probs,
        "path": path,
    }


def _title(classifier, layer: str, accuracy: float, num_crops: int) -> str:
    """The grid's title: the run, the layer and the accuracy on the split."""
    run = os.path.basename(os.path.normpath(classifier.metadata.get("run", ""))) or "model"
    return (
        f"Grad-CAM of {run} at layer {layer}: red = evidence for parasitized "
        f"(accuracy {accuracy:.4f} on {num_crops} crops)"
    )


def _heat_maps(model, variables, images, chosen, layer, normalize) -> dict:
    """The Grad-CAM heat map of each chosen crop, keyed by its index into `images`."""
    heat = np.zeros((0, *images.shape[1:3]), np.float32)
    if chosen:
        # The heat maps stay single-view: a gradient averaged over 8 turned views would blur
        # where the model looks in the crop as shown.
        heat, _ = gradcam(
            model,
            variables,
            images[chosen],
            layer=layer,
            normalize=normalize,
            batch_size=max(8, len(chosen)),
        )
    return dict(zip(chosen, heat, strict=True))


def select_examples(labels, probs, num: int = 8, threshold: float = 0.5, seed: int = 0):
    """Indices of correct and misclassified crops to show, each half parasitized if possible.

    Correct ones are drawn at random (from `seed`); misclassified ones are the most confident
    mistakes first, false negatives and false positives alternating.
    """
    labels = np.asarray(labels)
    predicted = (np.asarray(probs) >= threshold).astype(labels.dtype)
    rng = np.random.default_rng(seed)
    correct = []
    for label in (1, 0):
        idx = np.flatnonzero((labels == label) & (predicted == label))
        correct.append(list(rng.permutation(idx)))
    wrong = []
    for label in (1, 0):  # false negatives, then false positives; most confident first
        idx = np.flatnonzero((labels == label) & (predicted != label))
        confidence = np.abs(np.asarray(probs)[idx] - threshold)
        wrong.append(list(idx[np.argsort(-confidence, kind="stable")]))
    return _interleave(correct, num), _interleave(wrong, num)


def _interleave(groups, num):
    out = []
    while len(out) < num and any(groups):
        for group in groups:
            if group and len(out) < num:
                out.append(int(group.pop(0)))
    return out


def plot_gradcam_grid(
    images,
    heat,
    labels,
    probs,
    correct,
    wrong,
    path,
    *,
    title="",
    columns: int = 2,
    threshold: float = 0.5,
):
    """Crops and their heat-map overlays: correct examples left, misclassified right.

    Each example is a pair of tiles: the crop as the model saw it, and the crop under the
    Grad-CAM heat (jet colours, red = most evidence for the target class), titled with its
    truth (P = parasitized, U = uninfected), the call and P(parasitized).
    """
    rows = max(1, -(-max(len(correct), len(wrong), 1) // columns))
    fig = Figure(figsize=(2.6 * 2 * columns + 0.4, 1.5 * rows + 0.8), layout="constrained")
    cmap = colormaps["jet"]
    for subfig, indices, heading in zip(
        fig.subfigures(1, 2, wspace=0.04),
        (correct, wrong),
        ("correct", "misclassified"),
        strict=True,
    ):
        subfig.suptitle(f"{heading} ({len(indices)})", fontsize=10, weight="bold")
        axes = np.asarray(subfig.subplots(rows, 2 * columns, squeeze=False))
        for ax in axes.flat:
            ax.set_axis_off()
        if not indices:
            axes[0, 0].text(0.0, 0.5, f"no {heading} examples", fontsize=8)
        for slot, i in enumerate(indices[: rows * columns]):
            r, c = divmod(slot, columns)
            crop = np.asarray(images[i], np.float32) / 255.0
            overlay = 0.55 * crop + 0.45 * cmap(np.asarray(heat[i]))[..., :3]
            axes[r, 2 * c].imshow(crop, interpolation="nearest")
            axes[r, 2 * c + 1].imshow(np.clip(overlay, 0, 1), interpolation="bilinear")
            truth = "P" if labels[i] == 1 else "U"
            called = "P" if probs[i] >= threshold else "U"
            color = "black" if truth == called else "C3"
            axes[r, 2 * c].set_title(f"true {truth}, called {called}", fontsize=7, color=color)
            axes[r, 2 * c + 1].set_title(f"p = {probs[i]:.3f}", fontsize=7, color=color)
    if title:
        fig.suptitle(title, fontsize=9)
    plots.save(fig, path, dpi=130)
