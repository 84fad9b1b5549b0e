"""Synthetic cells, a tiny network, under a minute on a CPU: the whole pipeline, offline.

  python -m experiments.malaria --config=experiments/configs/smoke.py --workdir=/tmp/smoke

Expect >= 90% test accuracy (cell and patient level) and every output file: config.json,
manifest.json, metrics.jsonl, checkpoints/, report.json, report.md and the plots. The tests
run this config end to end.
"""

from mnres import config as config_lib


def get_config(arg=None):
    """`arg` is unused."""
    del arg
    config = config_lib.default_config()
    # The first three blocks of MobileNetV1 with identity skips: compiles in seconds on a CPU
    # (a whole MobileNet takes 15-40 s) and still learns the synthetic cells.
    config.model.name = "mobilenet_v1_residual"
    config.model.alpha = 0.25
    config.model.num_blocks = 3
    # 294 steps in all: the running averages must follow fast (0.9 is also what the loop picks).
    config.model.bn_momentum = 0.9

    config.data.source = "synthetic"
    config.data.synthetic_size = 2000
    config.data.num_slides = 30
    config.data.image_size = 32

    config.optimizer.learning_rate = 3e-3
    config.optimizer.warmup_epochs = 0.5
    config.batch_size = 32
    config.eval_batch_size = 128
    config.num_epochs = 6
    config.log_every_steps = 25
    return config
