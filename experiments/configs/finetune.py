"""Fine-tuning on your own images: any class folders, starting from the shipped malaria model.

  python -m experiments.malaria --config=experiments/configs/finetune.py \
      --config.data.source=folder --config.data.dir=PATH --workdir=runs/mine

PATH holds one subfolder per class, any classes (the ImageFolder layout of torchvision and
keras: PATH/CLASS_A/*.png, PATH/CLASS_B/*.png, ...; classes sorted by name, label = index), or
the NIH Parasitized/ + Uninfected/ layout. The split is by slide when the file names carry NIH
slide ids (`C100P61ThinF_...`), else by image, stratified by class; the log says which and
`manifest.json` records it (`split_by`, `split_by_requested: auto`). The classes go into the
run's config.json and report.json; `python -m mnres predict runs/mine IMAGES...` names them.

The network is `default.py`'s (MobileNetV2 alpha 0.35 at 64 px), started from the malaria
model shipped with mnres (`mnres.load_pretrained('malaria')`): every layer comes from it but the
classifier, which starts at its initial values for your classes (the log says so; it is kept
when the classes are the malaria pair). A short schedule at a quarter of `default.py`'s
learning rate, so the pretrained features are refined rather than overwritten.

Other starting points and choices, each one flag:

- Keras' ImageNet weights instead (downloaded once; needs network access; Keras publishes
  them for 96 px and up): --config.model.pretrained=imagenet --config.data.image_size=96
- No pretrained weights: --config.model.pretrained=""
- Freeze the early layers (they keep their pretrained values and BatchNorm statistics; only
  the later ones and the classifier train): --config.model.freeze_through=block_12_project_BN
  (any layer name of `python -m mnres summary mobilenet_v2 --alpha 0.35`)
- The classes and their order fixed, as keras' `class_names`:
  --config.data.class_names="('negative', 'positive')" (the folders must be exactly these)
- Training augmentation and test-time augmentation assume images with no up or down (cell
  crops: flips, 90-degree rotations); for photographs turn them off:
  --config.data.rot90=False --config.data.flip=False --config.test_time_augmentation=False
"""

from mnres import config as config_lib


def get_config(arg=None):
    """`arg` is unused."""
    del arg
    config = config_lib.default_config()
    config.model.pretrained = "malaria"  # the shipped weights: default.py's network

    config.data.source = "folder"
    # 'slide' when the file names carry NIH slide ids, else 'image' (stratified by class).
    config.data.split_by = "auto"

    config.optimizer.learning_rate = 5e-4
    config.optimizer.warmup_epochs = 0.5
    config.batch_size = 32  # small folders still give several steps an epoch
    config.num_epochs = 10
    return config
