"""A run folder as predict and export load it: its files checked against each other first.

A run folder is anyone's to edit or to hand over: `load_run` refuses, in one line, a config.json
whose data.image_size is not the one the run trained at (its manifest.json), which would feed
the model crops of another size and give wrong answers with no other sign.
"""

from __future__ import annotations

import os

from mnres import run_folder
from mnres.inference import Classifier


def check_image_size(workdir: str) -> None:
    """Raises ValueError unless config.json's data.image_size is manifest.json's (when both are
    there: a run of mnres 0.1 may lack a manifest)."""
    has = lambda name: os.path.isfile(os.path.join(workdir, name))
    if not (has(run_folder.CONFIG_JSON) and has(run_folder.MANIFEST_JSON)):
        return
    trained = run_folder.read_manifest(workdir).get("image_size")
    said = run_folder.read_config(workdir).data.image_size
    if trained is not None and int(trained) != int(said):
        raise ValueError(
            f"{workdir}: config.json says data.image_size={said}, but the run trained at "
            f"{trained} ({run_folder.MANIFEST_JSON}); set it back to {trained} in config.json"
        )


def load_run(workdir: str, *, which: str = "best") -> Classifier:
    """`mnres.run_folder.load_run` of a run whose files agree (`check_image_size`)."""
    check_image_size(workdir)
    return run_folder.load_run(workdir, which=which)
