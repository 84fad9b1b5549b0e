"""The recommended model for the malaria cells: MobileNetV2 alpha 0.35 at 64 px, 20 epochs.

A narrow V2 at 64 px: a cell crop keeps its parasites, and 20 epochs fit a laptop CPU (the
time is in docs/performance.md). Chosen by a search on the validation slides of one slide split
(docs/results.md, "Choosing the recipe"): 96 px, alpha 0.5, weight EMA, label smoothing 0.1 and
stronger colour jitter validated no better; averaging the 8 symmetries of each crop at test time
raised validation AUC on all five models of the search, so it is on.

  python -m experiments.malaria                        # this config, TFDS `malaria`
  python -m experiments.malaria --config=experiments/configs/default.py \
      --config.data.source=folder --config.data.dir=PATH/cell_images --workdir=runs/default

TFDS `malaria` has no slide ids, so its splits are by image and only cell-level metrics are
reported; the folder source (the NIH/Kaggle `Parasitized/` + `Uninfected/` layout) splits by
slide and adds patient-level metrics.
"""

import ml_collections

from mnres import data
from mnres.training import optim


def get_config(arg=None):
    """`arg` is unused; it exists so every config takes `--config=FILE:ARG`."""
    del arg
    config = ml_collections.ConfigDict()
    config.seed = 0

    config.model = ml_collections.ConfigDict()
    config.model.name = "mobilenet_v2"
    config.model.alpha = 0.35
    # Unset: the training loop picks it from the run's step count, an averaging window 1/(1-m)
    # of 2% of the run clipped to [0.9, 0.99] (mnres.training.bn_momentum): 0.99 for the full
    # development set's 5,560 steps, 0.9 for malaria-mini's 240. Keras' 0.999 averages over
    # ~1000 steps: after a few epochs the running statistics still describe the first steps'
    # network, and validation sits near chance while training accuracy is high (the seed paper's
    # "99.46% train, 55% validation"); 0.99 on 240 steps gives one output for every crop.
    config.model.bn_momentum = ml_collections.config_dict.placeholder(float)
    config.model.dropout = 0.0
    config.model.dtype = "float32"  # 'bfloat16': bfloat16 compute, float32 params and BatchNorm
    # Keras layer name: it and the layers before it are frozen, if pretrained weights are given.
    config.model.freeze_through = ml_collections.config_dict.placeholder(str)
    # 'imagenet' (Keras' published file, downloaded once into $MNRES_CACHE) or a Keras .h5 path.
    config.model.pretrained = ml_collections.config_dict.placeholder(str)
    # Per-crop colour normalisation inside the model ('none', 'gray_world', 'per_image'):
    # mnres.models.stain; exports and predict apply it too.
    config.model.input_normalization = "none"

    config.data = data.default_config()
    config.data.source = "tfds"
    config.data.split_by = "slide"  # folder source; TFDS has no slide ids and splits by image
    config.data.image_size = 64

    config.optimizer = optim.default_config()
    config.optimizer.name = "adamw"
    config.optimizer.learning_rate = 2e-3
    config.optimizer.warmup_epochs = 1.0
    config.optimizer.weight_decay = 1e-2
    config.optimizer.grad_clip_norm = 1.0
    config.label_smoothing = 0.0
    # > 0: train on the generalized cross-entropy (mnres.training.optim.cross_entropy), which a
    # mislabelled crop pulls less; 0 is the cross-entropy.
    config.generalized_ce_q = 0.0
    # Mixup / CutMix Beta parameters (mnres.data.augment.mix); 0 is off.
    config.mixup_alpha = 0.0
    config.cutmix_alpha = 0.0
    # Evaluate (and export) a moving average of the weights with this decay; None: the weights.
    config.ema_decay = ml_collections.config_dict.placeholder(float)
    # Final evaluation (and export) averages the logits over the 8 symmetries of each crop: it
    # raised validation AUC on all five models of the search, for 8x the inference cost.
    config.test_time_augmentation = True

    config.batch_size = 64  # a multiple of 8, so it shards over 1, 2, 4 or 8 devices
    config.eval_batch_size = 256
    config.num_epochs = 20

    # CPU: glibc keeps freed memory for reuse (mnres.host_memory), so XLA's steps stop
    # page-faulting their buffers in: faster training, for a higher peak memory.
    config.keep_freed_memory = True

    config.log_every_steps = 50  # how often losses are fetched to the host and checked for NaN
    config.checkpoint_every_epochs = 1
    config.keep_checkpoints = 2
    config.async_checkpointing = True
    config.eval_checkpoint = "best"  # 'best' (by validation accuracy) or 'last'
    config.progress_bar = True  # shown only on a terminal
    # TensorBoard event files in WORKDIR/tensorboard/ (per-step loss, learning rate, images/s;
    # validation per epoch), written without TensorFlow: needs pip install 'mnres[tensorboard]'.
    config.tensorboard = False

    # Several processes (TPU pod slice, GPU hosts): see docs/training.md, "Several hosts".
    config.distributed = ml_collections.ConfigDict()
    config.distributed.enabled = False
    config.distributed.coordinator_address = ml_collections.config_dict.placeholder(str)
    config.distributed.num_processes = ml_collections.config_dict.placeholder(int)
    config.distributed.process_id = ml_collections.config_dict.placeholder(int)
    config.distributed.cpu_collectives = ml_collections.config_dict.placeholder(str)  # 'gloo'
    return config
