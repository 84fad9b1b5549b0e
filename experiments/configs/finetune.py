"""Fine-tuning on your own images: any class folders, starting from the shipped malaria model.

  python -m experiments.malaria --config=experiments/configs/finetune.py \
      --config.data.source=folder --config.data.dir=PATH --workdir=runs/mine

PATH holds one subfolder per class, any classes (the ImageFolder layout of torchvision and
keras: PATH/CLASS_A/*.png, PATH/CLASS_B/*.png, ...; classes sorted by name, label = index), or
the NIH Parasitized/ + Uninfected/ layout. The split is by slide when the file names carry NIH
slide ids (`C100P61ThinF_...`), else by image, stratified by class; the log says which and
`manifest.json` records it (`split_by`, `split_by_requested: auto`). The classes go into the
run's config.json and report.json; `python -m mnres predict runs/mine IMAGES...` names them.

The network is the malaria model shipped with mnres (`mnres.load_pretrained('malaria')`; an
ensemble's first member): its architecture, width, input size and normalisation, read from its
config.json, and every layer's weights but the classifier, which starts at its initial values
for your classes (the log says so; it is kept when the classes are the malaria pair). The rest
is `default.py`'s, with a short schedule at a quarter of its learning rate, so the pretrained
features are refined rather than overwritten.

Other starting points and choices, each one flag:

- Keras' ImageNet weights instead (downloaded once; needs network access; Keras publishes
  them for 96 px and up): --config.model.pretrained=imagenet --config.data.image_size=96
- No pretrained weights: --config.model.pretrained=""
- Freeze the early layers (they keep their pretrained values and BatchNorm statistics; only
  the later ones and the classifier train): --config.model.freeze_through=block_12_project_BN
  (any layer name of `python -m mnres summary mobilenet_v2 --alpha ALPHA`, the shipped alpha)
- The classes and their order fixed, as keras' `class_names`:
  --config.data.class_names="('negative', 'positive')" (the folders must be exactly these)
- Training augmentation and test-time augmentation assume images with no up or down (cell
  crops: flips, 90-degree rotations); for photographs turn them off:
  --config.data.rot90=False --config.data.flip=False --config.test_time_augmentation=False
"""

from mnres import config as config_lib
from mnres.weights import shipped


def get_config(arg=None):
    """`arg` is unused."""
    del arg
    config = config_lib.default_config()
    # The shipped weights fit only the shipped network (an ensemble's: its first member's); its
    # training choices (BatchNorm momentum, dropout, frozen layers) stay default.py's.
    keep = ("bn_momentum", "dropout", "freeze_through", "pretrained")
    network = shipped.shipped_network("malaria")
    config.model.update({k: v for k, v in network.items() if k not in keep})
    config.model.pretrained = "malaria"
    config.data.image_size = shipped.shipped_config("malaria").data.image_size

    config.data.source = "folder"
    # 'slide' when the file names carry NIH slide ids, else 'image' (stratified by class).
    config.data.split_by = "auto"

    config.optimizer.learning_rate = 5e-4
    config.optimizer.warmup_epochs = 0.5
    config.batch_size = 32  # small folders still give several steps an epoch
    config.num_epochs = 10
    return config
