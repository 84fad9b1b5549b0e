"""Malaria cell images: three sources, slide-level splits with a manifest, batches, augmentation.

Labels: 1 = parasitized (the positive class), 0 = uninfected, for every source (TFDS
`malaria` uses 0 = parasitized; it is mapped). A folder of other classes, one subfolder per
class (`mnres.data.folders`), labels each image with its class's index, classes sorted by name;
`Dataset.class_names` names them.
"""

from mnres.data.pipeline import eval_batches, prefetch, steps_per_epoch, train_batches
from mnres.data.sample import sample_cells
from mnres.data.sources import load_dataset
from mnres.data.splits import Dataset, Split, write_manifest

__all__ = [
    "Dataset",
    "Split",
    "eval_batches",
    "load_dataset",
    "prefetch",
    "sample_cells",
    "steps_per_epoch",
    "train_batches",
    "write_manifest",
]
