"""Inference, defined once: crops -> logits, with or without the 8-view test-time augmentation.

`classify` is the forward pass of every consumer: evaluation (`mnres.training.steps`), the
exported serving function (`Classifier.serve`, which `mnres.deploy.export` exports and
`mnres.deploy.predict` runs), and the logits of a restored run (`Classifier.logits`) that
calibration and Grad-CAM read. A run evaluated with test-time augmentation therefore answers
the same way wherever it is used.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mnres.config.schema import MALARIA_CLASSES
from mnres.data.augment import dihedral_views, preprocess


def classify(model, variables, images, *, tta: bool = False) -> jnp.ndarray:
    """Logits [B, C] of preprocessed images [B, S, S, 3] in inference mode.

    With `tta` (test-time augmentation) the logits are averaged over the 8 symmetries of the
    square (`dihedral_views`): cells have no orientation, so each view is an equally valid
    look, and averaging them removes some of the model's orientation-dependent noise for 8x
    the inference cost. Averaging logits (not probabilities) keeps the log-odds exact.

    Args:
      model: an mnres flax module.
      variables: {'params', 'batch_stats'}.
      images: float [B, S, S, 3] scaled to [-1, 1] (`mnres.data.augment.preprocess`). The
        model refuses uint8 and other shapes when traced; the range cannot be checked inside
        `jit`: floats in [0, 1] or [0, 255] give confident wrong answers.
      tta: average over the 8 views of each crop.

    Returns:
      Logits [B, C] in the model's compute dtype.
    """
    if not tta:
        return model.apply(variables, images, train=False)[0]
    logits, _ = model.apply(variables, dihedral_views(images), train=False)
    return jnp.mean(logits.reshape(8, images.shape[0], logits.shape[-1]), axis=0)


def check_crops(images, where: str) -> None:
    """ValueError unless `images` are uint8 RGB crops [B, H, W, 3]: static facts, so the check
    costs nothing inside `jit` (floats are refused: in [0, 1] they would be read as near-black)."""
    dtype, shape = np.dtype(images.dtype), tuple(images.shape)
    if dtype != np.uint8:
        raise ValueError(
            f"{where} takes uint8 RGB crops (0-255), got {dtype}: give the crops as decoded "
            "(floats in [0, 1]: np.round(x * 255).astype(np.uint8)); images already scaled to "
            "[-1, 1] go to Classifier.classify"
        )
    if len(shape) != 4 or shape[-1] != 3:
        raise ValueError(f"{where} takes RGB crops as [batch, height, width, 3], got {shape}")


def resize_like_training(images, image_size: int) -> jnp.ndarray:
    """uint8 [B, H, W, 3] -> float32 [B, S, S, 3] in [0, 255], as `mnres.data` decodes crops.

    Training decodes with Pillow's `ImageOps.pad`: the longer side becomes S (bilinear,
    antialiased), the aspect ratio is kept, and the crop is centred on a black S x S square.
    Here the same sizes and offsets (Pillow's rounding) drive `jax.image.scale_and_translate`,
    whose samples outside the crop are exactly 0 (black). Pillow rounds to uint8 (also between
    its two passes), this stays in float: within a level or two of the decode. Rounding here
    would make the exports flip levels where their float arithmetic differs from XLA's by an
    ulp. H and W may be symbolic (shape-polymorphic export); an S x S input passes through.

    Args:
      images: uint8 [B, H, W, 3] crops of any height and width.
      image_size: S, the model's input size.

    Returns:
      float32 [B, S, S, 3], not yet scaled to [-1, 1].
    """
    h, w = images.shape[1], images.shape[2]
    if isinstance(h, int) and isinstance(w, int) and h == w == image_size:
        return images.astype(jnp.float32)  # keeps the fixed-size graphs free of resize ops
    s = float(image_size)
    hf = jnp.asarray(h, jnp.float32)
    wf = jnp.asarray(w, jnp.float32)
    wide = wf > hf
    new_h = jnp.where(wide, jnp.round(hf / wf * s), s)
    new_w = jnp.where(wide, s, jnp.round(wf / hf * s))
    scale = jnp.stack([new_h / hf, new_w / wf])
    translation = jnp.stack([jnp.round((s - new_h) * 0.5), jnp.round((s - new_w) * 0.5)])
    # Bilinear weights are non-negative and sum to one: the result stays in [0, 255].
    return jax.image.scale_and_translate(
        images.astype(jnp.float32),
        (images.shape[0], image_size, image_size, 3),
        (1, 2),
        scale,
        translation,
        method="linear",
        antialias=True,
    )


@dataclasses.dataclass(frozen=True)
class Classifier:
    """A model with its variables and input size: what every export and consumer starts from."""

    model: Any  # an mnres flax module
    variables: dict  # {'params', 'batch_stats'}
    image_size: int
    metadata: dict = dataclasses.field(default_factory=dict)  # source run, step, model
    config: Any = None  # the run's resolved config, when loaded from a run

    @property
    def class_names(self) -> tuple[str, ...]:
        """The name of each output, in order: `metadata['class_names']`, else the run config's
        `data.class_names`, else the malaria pair for two outputs ('class_0', ... for more)."""
        names = self.metadata.get("class_names")
        if not names and self.config is not None and "data" in self.config:
            names = self.config.data.class_names
        if names:
            return tuple(str(n) for n in names)
        k = getattr(self.model, "num_classes", 2)
        return MALARIA_CLASSES if k == 2 else tuple(f"class_{c}" for c in range(k))

    @property
    def test_time_augmentation(self) -> bool:
        """Whether the run was evaluated averaging the 8 symmetries of each crop."""
        return bool(self.config is not None and self.config.test_time_augmentation)

    def for_export(self) -> Classifier:
        """The same weights with grouped depthwise convs and float32 compute."""
        overrides = {"conv_formulation": "grouped", "dtype": None}
        model = (
            self.model.clone_members(**overrides)
            if hasattr(self.model, "clone_members")  # an ensemble: every member
            else self.model.clone(**overrides)
        )
        return dataclasses.replace(self, model=model)

    def classify(self, images) -> jnp.ndarray:
        """Logits [B, C] of preprocessed images [B, S, S, 3], as the run was evaluated.

        `classify` with this model and variables, with test-time augmentation iff the run's
        config has it. Traceable: call it inside `jax.jit` or an export.
        """
        return classify(self.model, self.variables, images, tta=self.test_time_augmentation)

    def serve(self, images) -> jnp.ndarray:
        """The serving function: uint8 crops [B, H, W, 3] of any size -> float32 probs [B, C].

        Each crop is resized as training decoded it (`resize_like_training`), scaled by
        x / 127.5 - 1 and classified (`Classifier.classify`). Other dtypes and shapes are
        refused when traced (`check_crops`). Inside a trace (`jax.jit`, an export) the
        variables are closed over, so an export holds them as constants; called on arrays it
        runs compiled, once per input shape (the variables an argument), not op by op.
        `mnres.deploy.export` exports it from `for_export()`.
        """
        if isinstance(images, jax.core.Tracer):
            return _serve(self.model, self.image_size, self.test_time_augmentation,
                          self.variables, images)  # fmt: skip
        compiled = self.__dict__.get("_compiled_serve")
        if compiled is None:  # per classifier: `dataclasses.replace` gives a new one its own
            compiled = jax.jit(functools.partial(
                _serve, self.model, self.image_size, self.test_time_augmentation))  # fmt: skip
            self.__dict__["_compiled_serve"] = compiled
        return compiled(self.variables, images)

    def logits(self, images, batch_size: int = 256) -> np.ndarray:
        """Logits float32 [N, C] of uint8 crops [N, S, S, 3] at the model's image size.

        Classified as the run was evaluated (`Classifier.classify`), in compiled batches.

        Args:
          images: uint8 crops at the model's image size.
          batch_size: crops per compiled call; the last batch is padded, so one shape compiles.

        Returns:
          float32 [N, C] on the host, in the order of `images`.

        Raises:
          ValueError: no images, or not uint8 RGB crops (`check_crops`).
        """
        forward = self.__dict__.get("_compiled_logits")
        if forward is None:  # compiled once per classifier and shape, not once per call
            model, tta = self.model, self.test_time_augmentation
            # The variables are an argument, not constants baked into the compiled function.
            forward = jax.jit(lambda v, x: classify(model, v, preprocess(x), tta=tta))
            self.__dict__["_compiled_logits"] = forward
        images = np.asarray(images)
        check_crops(images, "Classifier.logits")
        if len(images) == 0:
            raise ValueError("no images to classify")
        out = []
        for start in range(0, len(images), batch_size):
            batch = images[start : start + batch_size]
            pad = batch_size - len(batch) if len(images) > batch_size else 0
            padded = np.concatenate([batch, np.zeros((pad, *batch.shape[1:]), batch.dtype)])
            out.append(np.asarray(forward(self.variables, padded))[: len(batch)])
        return np.concatenate(out).astype(np.float32)


def _serve(model, image_size: int, tta: bool, variables, images) -> jnp.ndarray:
    check_crops(images, "Classifier.serve")
    x = resize_like_training(images, image_size) / 127.5 - 1.0
    return jax.nn.softmax(classify(model, variables, x, tta=tta).astype(jnp.float32), axis=-1)


# The functional spelling: `inference.logits(classifier, images, batch_size)`.
logits = Classifier.logits
