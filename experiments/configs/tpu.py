"""default.py sized for a TPU (Colab's single-chip v5e-1 / v6e-1 or an 8-core v2-8): bigger
batches, bfloat16 compute (float32 parameters and BatchNorm), more epochs at 96 px.

  pip install -e ".[tfds]"    # in a clone of this repository; Colab TPU runtimes ship jax[tpu]
  python -m experiments.malaria --config=experiments/configs/tpu.py --workdir=runs/tpu

The same program as on a CPU: one jit-compiled step, the batch sharded over every TPU core.
"""

from mnres import config as config_lib


def get_config(arg=None):
    """`arg` is unused."""
    del arg
    config = config_lib.default_config()
    # Sized for a TPU: experiments.malaria and experiments.crossval refuse it on another JAX
    # backend (30 epochs at 96 px would take days on a CPU); --config.platform=cpu runs it
    # anyway. The library does not check, so the program can still be lowered for a TPU from
    # a CPU.
    config.platform = "tpu"
    config.model.dtype = "bfloat16"
    config.data.image_size = 96
    config.batch_size = 256  # 32 per core on 8 cores
    config.eval_batch_size = 1024
    config.optimizer.learning_rate = 4e-3  # sqrt-scaled from 2e-3 at batch 64
    config.num_epochs = 30
    config.log_every_steps = 20
    return config
