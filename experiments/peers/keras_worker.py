"""Keras (TensorFlow backend) worker: `keras.applications` MobileNet/MobileNetV2, untrained.

`keras.applications` is the architecture mnres mirrors layer for layer (mnres imports its
weights by layer name), so this peer needs no hand-written network. Training is Keras' own
compiled train function (`train_on_batch`); without a GPU Keras does not use XLA by default,
so TensorFlow's native depthwise kernels run.
"""

from __future__ import annotations

import os

os.environ["KERAS_BACKEND"] = "tensorflow"  # before keras is imported
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402

from experiments.peers import workload  # noqa: E402


def build(spec: dict):
    import keras
    import tensorflow as tf

    constructors = {
        "mobilenet_v1": keras.applications.MobileNet,
        "mobilenet_v2": keras.applications.MobileNetV2,
    }
    if spec["model"] not in constructors:
        raise NotImplementedError(f"no Keras peer for {spec['model']!r}")
    if spec["overrides"]:
        raise NotImplementedError(f"no Keras peer for a model with overrides {spec['overrides']}")
    tf.config.threading.set_intra_op_parallelism_threads(spec["threads"])
    tf.config.threading.set_inter_op_parallelism_threads(spec["threads"])
    keras.utils.set_random_seed(spec["seed"])
    size, batch = spec["image_size"], spec["batch_size"]
    extra = {"dropout": 0.0} if spec["model"] == "mobilenet_v1" else {}
    model = constructors[spec["model"]](
        weights=None,
        alpha=spec["alpha"],
        classes=spec["num_classes"],
        input_shape=(size, size, 3),
        classifier_activation=None,
        **extra,
    )
    # mnres' default experiment config: AdamW, decay 1e-2, global-norm clipping at 1.
    model.compile(
        optimizer=keras.optimizers.AdamW(2e-3, weight_decay=1e-2, global_clipnorm=1.0),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )

    rng = np.random.default_rng(spec["seed"])
    images = tf.constant(rng.integers(0, 256, (batch, size, size, 3), dtype=np.uint8))
    labels = tf.constant(rng.integers(0, spec["num_classes"], batch).astype(np.int32))
    inputs = lambda x: tf.cast(x, tf.float32) / 127.5 - 1.0  # uint8 -> [-1, 1], as in mnres

    @tf.function
    def predict(x):
        return tf.nn.softmax(model(inputs(x), training=False))[:, 1]

    def train_step():
        return float(model.train_on_batch(inputs(images), labels))

    info = {
        "framework": "keras",
        "version": f"keras {keras.__version__}, tensorflow {tf.__version__}",
        "platform": "cpu",
        "jit_compile": bool(model.jit_compile),
        "threads_used": {
            "intra_op": tf.config.threading.get_intra_op_parallelism_threads(),
            "inter_op": tf.config.threading.get_inter_op_parallelism_threads(),
        },
    }
    return info, (
        train_step,
        lambda: predict(images).numpy(),
        lambda: predict(images[:1]).numpy(),
    )


if __name__ == "__main__":
    workload.run_worker(build)
