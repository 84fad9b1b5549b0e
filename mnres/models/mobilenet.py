"""MobileNetV1, MobileNetV2 and the seed paper's residual MobileNet, declared as tables.

Every model is called as `model.apply(variables, images, train=...)` and returns
`(output, out)`: `output` is the logits (or the features when `include_top=False`), `out` a dict of
named intermediates (`feature_map`, `pre_logits`, `logits`) for feature extraction and Grad-CAM.

`images` are float [B, H, W, 3] RGB scaled to [-1, 1] (x / 127.5 - 1 of uint8 crops,
`mnres.data.augment.preprocess`), H and W at least `MIN_IMAGE_SIZE`. The dtype, rank and
channels are checked when the model is traced (they are static); the range cannot be checked
inside `jit`: images in [0, 1] or [0, 255] give confident wrong answers. uint8 crops go to
`mnres.inference.Classifier.serve`, which resizes and scales them.
"""

from __future__ import annotations

import functools
import math
import numbers
from collections.abc import Sequence

import jax.numpy as jnp
from flax import linen as nn

from mnres.models import stain
from mnres.models.blocks import DepthwiseSeparable, InvertedResidual
from mnres.models.layers import (
    KERAS_V1_STRIDE2_PADDING,
    ConvBN,
    Dtype,
    ModuleDef,
    adopt_depthwise_implementation,
    make_divisible,
)

# MobileNetV1 (Howard et al. 2017, Table 1) as (pointwise filters, stride), blocks 1..13.
MOBILENET_V1_BLOCKS = (
    (64, 1),
    (128, 2), (128, 1),
    (256, 2), (256, 1),
    (512, 2), (512, 1), (512, 1), (512, 1), (512, 1), (512, 1),
    (1024, 2), (1024, 1),
)  # fmt: skip

# MobileNetV2 (Sandler et al. 2018, Table 2) as (expansion t, channels c, repeats n, stride s).
MOBILENET_V2_STAGES = (
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)

# The smallest input side: five stride-2 stages take 32 px to a 1x1 feature map.
MIN_IMAGE_SIZE = 32


def _is_count(value) -> bool:
    """A whole number >= 1 (not a bool)."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool) and value >= 1


def _frozen_prefix(layer_names: Sequence[str], freeze_through: str | None) -> tuple[str, ...]:
    """The layers up to and including `freeze_through`, in network order."""
    if freeze_through is None:
        return ()
    if freeze_through not in layer_names:
        raise ValueError(
            f"freeze_through={freeze_through!r} is not a layer of this model; "
            f"layers are {', '.join(layer_names)}"
        )
    return tuple(layer_names[: layer_names.index(freeze_through) + 1])


class _MobileNet(nn.Module):
    """Fields and the head shared by both MobileNets; subclasses build the trunk."""

    alpha: float = 1.0
    num_classes: int = 1000
    include_top: bool = True
    pooling: str | None = "avg"  # without top: 'avg', 'max' or None (feature map), as Keras
    dropout: float = 0.0
    # Keras layer name; it and every layer before it are frozen: excluded from the optimizer
    # (see params.trainable_mask) and their BatchNorm always runs on running averages.
    freeze_through: str | None = None
    bn_momentum: float = 0.999  # Keras MobileNet; short runs need less (see experiments/configs)
    bn_epsilon: float = 1e-3
    # 'grouped' (XLA's convolutions), 'shifted' (the CPU formulation: depthwise convs as shifted
    # multiply-adds, 1x1 convs as matmuls) or 'auto' (shifted on CPU); see layers.CONV_FORMULATIONS.
    conv_formulation: str = "auto"
    depthwise_implementation: str | None = None  # deprecated alias of conv_formulation
    dtype: Dtype | None = None  # compute dtype, e.g. jnp.bfloat16
    param_dtype: Dtype = jnp.float32
    classifier_name: str = "predictions"
    # Per-crop colour normalisation of the input, inside the model so that exports and predict
    # see it too: 'none', 'gray_world' or 'per_image' (mnres.models.stain).
    input_normalization: str = "none"

    def __post_init__(self):
        adopt_depthwise_implementation(self)
        stain.check_method(self.input_normalization)
        self._check_fields()
        super().__post_init__()

    def _check_fields(self) -> None:
        """Refuses fields no network can have; once per construction, never inside `jit`."""
        alpha = self.alpha
        if not (isinstance(alpha, numbers.Real) and math.isfinite(alpha) and alpha > 0):
            raise ValueError(
                f"alpha={alpha!r}: the width multiplier must be a positive number "
                "(0.25, 0.35, 0.5, 0.75, 1.0, 1.4, ...)"
            )
        classes = self.num_classes
        if not _is_count(classes):
            raise ValueError(f"num_classes={classes!r}: a classifier needs a whole number >= 1")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout={self.dropout!r}: a rate in [0, 1)")

    def layer_names(self) -> tuple[str, ...]:
        """Keras names of the weighted layers (conv, BatchNorm, dense), in network order."""
        raise NotImplementedError

    @property
    def frozen_layers(self) -> tuple[str, ...]:
        return _frozen_prefix(self.layer_names(), self.freeze_through)

    def _conv_bn(self, train: bool) -> ModuleDef:
        """The conv + BN unit of every layer, its choices made once here (Flax's convention)."""
        norm = functools.partial(
            nn.BatchNorm,
            use_running_average=not train,
            momentum=self.bn_momentum,
            epsilon=self.bn_epsilon,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
        )
        return functools.partial(
            ConvBN,
            norm=norm,
            conv_formulation=self.conv_formulation,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
        )

    def _check_input(self, x):
        # Static facts of the traced input: checked once per trace, free at run time.
        if x.ndim != 4 or x.shape[-1] != 3:
            raise ValueError(
                f"expected RGB images as [batch, height, width, 3], got shape {tuple(x.shape)}"
            )
        if not jnp.issubdtype(x.dtype, jnp.floating):
            raise ValueError(
                f"the network takes float images scaled to [-1, 1], got {x.dtype}: scale uint8 "
                "crops by x / 127.5 - 1 (mnres.data.augment.preprocess), or give them as they "
                "are to mnres.inference.Classifier (serve, logits)"
            )
        if min(x.shape[1:3]) < MIN_IMAGE_SIZE:
            raise ValueError(
                f"MobileNets need inputs of at least {MIN_IMAGE_SIZE}x{MIN_IMAGE_SIZE} pixels, "
                f"got {x.shape[1:3]}"
            )
        return stain.normalize(jnp.asarray(x, self.dtype or jnp.float32), self.input_normalization)

    def _head(self, x, train: bool):
        out = {"feature_map": x}
        if not self.include_top:
            if self.pooling is None:
                return x, out
            if self.pooling not in ("avg", "max"):
                raise ValueError(f"pooling must be 'avg', 'max' or None, got {self.pooling!r}")
            reduce = jnp.mean if self.pooling == "avg" else jnp.max
            out["pre_logits"] = reduce(x, axis=(1, 2))
            return out["pre_logits"], out
        x = out["pre_logits"] = jnp.mean(x, axis=(1, 2))
        if self.dropout:
            x = nn.Dropout(self.dropout, deterministic=not train)(x)
        x = nn.Dense(
            self.num_classes,
            kernel_init=nn.initializers.glorot_uniform(),
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name=self.classifier_name,
        )(x)
        # Losses and metrics in float32 whatever the compute dtype.
        out["logits"] = x = x.astype(jnp.float32)
        return x, out


class MobileNetV1(_MobileNet):
    """MobileNetV1 with optional identity skips around its stride-1, same-width blocks."""

    depth_multiplier: int = 1
    # True: a skip around every block with stride 1 and equal channels; or the block ids.
    residual: bool | Sequence[int] = False
    num_blocks: int = 13  # blocks of MOBILENET_V1_BLOCKS to use
    final_pointwise: bool = True  # False: the last block stops after its depthwise conv+BN+ReLU6
    dropout: float = 1e-3  # Keras' default
    classifier_name: str = "conv_preds"  # Keras' V1 classifier is a 1x1 conv of that name

    def _filters(self, filters: int) -> int:
        return int(filters * self.alpha)  # V1 truncates; only V2 rounds to multiples of 8

    def _check_fields(self) -> None:
        super()._check_fields()
        if self._filters(32) < 1:  # the stem, the narrowest layer
            raise ValueError(
                f"alpha={self.alpha!r} leaves MobileNetV1's 32-filter stem with none: use >= 1/32"
            )
        multiplier = self.depth_multiplier
        if not _is_count(multiplier):
            raise ValueError(f"depth_multiplier={multiplier!r}: a whole number >= 1")

    def _residual_blocks(self) -> tuple[int, ...]:
        eligible = []
        channels = self._filters(32)
        for block_id, (filters, stride) in enumerate(MOBILENET_V1_BLOCKS[: self.num_blocks], 1):
            last_cut = block_id == self.num_blocks and not self.final_pointwise
            if stride == 1 and self._filters(filters) == channels and not last_cut:
                eligible.append(block_id)
            channels = self._filters(filters)
        if self.residual is True:
            return tuple(eligible)
        if self.residual is False:
            return ()
        wrong = sorted(set(self.residual) - set(eligible))
        if wrong:
            raise ValueError(
                f"residual blocks {wrong} change stride or width; identity skips fit blocks "
                f"{eligible}"
            )
        return tuple(self.residual)

    def layer_names(self) -> tuple[str, ...]:
        return self.names_of(self)

    @staticmethod
    def names_of(fields) -> tuple[str, ...]:
        """`layer_names` of a model with these fields (attributes), built or not."""
        names = ["conv1", "conv1_bn"]
        for block_id in range(1, fields.num_blocks + 1):
            names += [f"conv_dw_{block_id}", f"conv_dw_{block_id}_bn"]
            if block_id < fields.num_blocks or fields.final_pointwise:
                names += [f"conv_pw_{block_id}", f"conv_pw_{block_id}_bn"]
        return tuple(names + ([fields.classifier_name] if fields.include_top else []))

    @nn.compact
    def __call__(self, x, train: bool = False):
        if not 1 <= self.num_blocks <= len(MOBILENET_V1_BLOCKS):
            raise ValueError(f"num_blocks must be in 1..{len(MOBILENET_V1_BLOCKS)}")
        x = self._check_input(x)
        conv_bn = self._conv_bn(train)
        frozen = self.frozen_layers
        x = conv_bn(
            self._filters(32),
            "conv1",
            "conv1_bn",
            kernel_size=3,
            strides=2,
            frozen="conv1_bn" in frozen,
            name="stem",
        )(x)
        residual = self._residual_blocks()
        for block_id, (filters, stride) in enumerate(MOBILENET_V1_BLOCKS[: self.num_blocks], 1):
            if block_id == self.num_blocks and not self.final_pointwise:
                # The seed network ends halfway through a block: depthwise + BN + ReLU6 only.
                dw = f"conv_dw_{block_id}"
                x = conv_bn(
                    None,
                    dw,
                    f"{dw}_bn",
                    kernel_size=3,
                    strides=stride,
                    padding="SAME" if stride == 1 else KERAS_V1_STRIDE2_PADDING,
                    depthwise=True,
                    depth_multiplier=self.depth_multiplier,
                    frozen=f"{dw}_bn" in frozen,
                    name=f"block_{block_id}",
                )(x)
                continue
            x = DepthwiseSeparable(
                self._filters(filters),
                block_id=block_id,
                strides=stride,
                depth_multiplier=self.depth_multiplier,
                residual=block_id in residual,
                frozen_layers=frozen,
                conv_bn=conv_bn,
                name=f"block_{block_id}",
            )(x)
        return self._head(x, train)


class MobileNetV2(_MobileNet):
    """MobileNetV2: inverted residual blocks with linear bottlenecks, 1280-channel head."""

    def _blocks(self):
        """(block_id, features, expansion, stride) for every block, Keras' numbering."""
        rows, block_id = [], 0
        for expansion, channels, repeats, stride in MOBILENET_V2_STAGES:
            for i in range(repeats):
                features = make_divisible(int(channels * self.alpha), 8)
                rows.append((block_id, features, expansion, stride if i == 0 else 1))
                block_id += 1
        return rows

    def layer_names(self) -> tuple[str, ...]:
        return self.names_of(self)

    @staticmethod
    def names_of(fields) -> tuple[str, ...]:
        """`layer_names` of a model with these fields (attributes), built or not."""
        names, block_id = ["Conv1", "bn_Conv1"], 0
        for expansion, _, repeats, _ in MOBILENET_V2_STAGES:
            for _ in range(repeats):
                prefix = f"block_{block_id}_" if block_id else "expanded_conv_"
                layers = (["expand"] if expansion != 1 else []) + ["depthwise", "project"]
                for layer in layers:
                    names += [prefix + layer, prefix + layer + "_BN"]
                block_id += 1
        names += ["Conv_1", "Conv_1_bn"]
        return tuple(names + ([fields.classifier_name] if fields.include_top else []))

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = self._check_input(x)
        conv_bn = self._conv_bn(train)
        frozen = self.frozen_layers
        x = conv_bn(
            make_divisible(32 * self.alpha, 8),
            "Conv1",
            "bn_Conv1",
            kernel_size=3,
            strides=2,
            frozen="bn_Conv1" in frozen,
            name="stem",
        )(x)
        for block_id, features, expansion, stride in self._blocks():
            x = InvertedResidual(
                features,
                block_id=block_id,
                expansion=expansion,
                strides=stride,
                frozen_layers=frozen,
                conv_bn=conv_bn,
                name=f"block_{block_id}",
            )(x)
        # Keras keeps the head at 1280 channels for narrow models and widens it for alpha > 1.
        head = make_divisible(1280 * self.alpha, 8) if self.alpha > 1.0 else 1280
        x = conv_bn(head, "Conv_1", "Conv_1_bn", frozen="Conv_1_bn" in frozen, name="head")(x)
        return self._head(x, train)


# The seed paper's network ("Image Classification on Human Cell Using MobileNet"): Keras
# MobileNet v1 (alpha 1.0) cut after block 12's depthwise conv + BN + ReLU6, identity skips
# around the five 14x14x512 blocks 7-11, global average pooling, Dense(2); everything up to and
# including the block-9 pointwise kernel frozen. Total 1,635,522 = params 1,619,778 +
# BatchNorm statistics 15,744; trainable 545,282.
SeedNetwork = functools.partial(
    MobileNetV1,
    num_blocks=12,
    final_pointwise=False,
    residual=(7, 8, 9, 10, 11),
    num_classes=2,
    dropout=0.0,
    classifier_name="predictions",
    freeze_through="conv_pw_9",
)

MODELS = {
    "mobilenet_v1": MobileNetV1,
    "mobilenet_v1_residual": functools.partial(MobileNetV1, residual=True),
    "mobilenet_v2": MobileNetV2,
    "paper": SeedNetwork,
}
