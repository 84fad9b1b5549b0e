"""mnres worker: the compiled train and eval steps of `mnres.training.steps`, synthetic batches.

The optimizer is the default experiment config's (AdamW, clipping, warmup-cosine schedule,
freeze mask); augmentation is off unless the spec asks for it, because the peers have none.
The allocator is left as the process was started, as in the peers: this worker does not call
`mnres.host_memory.keep_freed_memory()` (see `workload`).
"""

from __future__ import annotations

import jax
import ml_collections
import numpy as np

from experiments.configs import default
from experiments.peers import workload
from mnres import models
from mnres.data.augment import preprocess
from mnres.models import layers
from mnres.models import params as params_lib
from mnres.training import optim, steps

NO_AUGMENTATION = dict(
    flip=False, rot90=False, brightness=0.0, contrast=0.0, saturation=0.0, hue=0.0
)


def build(spec: dict):
    config = default.get_config()
    model_config = ml_collections.ConfigDict(
        dict(
            name=spec["model"],
            alpha=spec["alpha"],
            bn_momentum=config.model.bn_momentum,
            dropout=config.model.dropout,  # 0, as in the peers
            conv_formulation=spec["depthwise"],
            **spec["overrides"],
        )
    )
    model = models.from_config(model_config, num_classes=spec["num_classes"])
    size, batch = spec["image_size"], spec["batch_size"]
    if not spec["augment"]:
        config.data.update(NO_AUGMENTATION)
    mesh = steps.make_mesh()
    shapes = params_lib.abstract_variables(model, (1, size, size, 3))
    # A schedule long enough that every timed step runs at a non-zero learning rate.
    tx, _ = optim.create_optimizer(config.optimizer, model, shapes["params"], 1000, 10)
    box = {"state": steps.init_state(model, tx, size, spec["seed"], mesh)}

    rng = np.random.default_rng(spec["seed"])
    images = rng.integers(0, 256, (batch, size, size, 3), dtype=np.uint8)
    labels = rng.integers(0, spec["num_classes"], batch).astype(np.int32)
    train_batch = steps.shard_batch({"image": images, "label": labels}, mesh)
    eval_batch = steps.shard_batch(
        {"image": images, "label": labels, "mask": np.ones(batch, bool)}, mesh
    )
    one = jax.device_put(images[:1])

    train_step = steps.make_train_step(model, tx, config.data, mesh)
    eval_step = steps.make_eval_step(model, mesh)

    @jax.jit
    def predict(state, images):
        variables = {"params": state.params, "batch_stats": state.batch_stats}
        return model.apply(variables, preprocess(images), train=False)[0]

    def train():
        box["state"], metrics = train_step(box["state"], train_batch)
        jax.block_until_ready(metrics)  # the metrics come last: the whole step is done

    info = {
        "framework": "mnres",
        "version": f"jax {jax.__version__}",
        "platform": jax.devices()[0].platform,
        "depthwise_resolved": layers.resolve_conv_formulation(spec["depthwise"]),
        # XLA's CPU thread pool takes one thread per core this process may run on.
        "threads_used": {"xla_cpu": workload.cores()},
    }
    return info, (
        train,
        lambda: jax.block_until_ready(eval_step(box["state"], eval_batch)),
        lambda: jax.block_until_ready(predict(box["state"], one)),
    )


if __name__ == "__main__":
    workload.run_worker(build)
