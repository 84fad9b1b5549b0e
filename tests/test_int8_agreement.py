"""experiments.int8_agreement finds exactly the crops of the shipped model's unseen slides."""

import json

import pytest

from experiments import int8_agreement


def _folder(tmp_path, names):
    for folder, name in names:
        (tmp_path / "cells" / folder).mkdir(parents=True, exist_ok=True)
        (tmp_path / "cells" / folder / name).write_bytes(b"")
    return str(tmp_path / "cells")


def test_it_reads_the_test_slides_crops_and_refuses_another_folder(tmp_path):
    manifest = tmp_path / "manifest.json"
    split = {"slide_ids": ["C1P1"], "num_examples": 2}
    manifest.write_text(json.dumps({"splits": {"test": split}}))
    data = _folder(tmp_path, [("Parasitized", "C1P1thinF_IMG_1_cell_1.png"),
                              ("Uninfected", "C1P1thinF_IMG_1_cell_2.png"),
                              ("Uninfected", "C2P2thinF_IMG_1_cell_3.png")])  # fmt: skip
    name, paths, labels = int8_agreement.unseen_crops(data, str(manifest))
    assert name == "test" and [p.rsplit("/", 1)[1] for p in paths] == [
        "C1P1thinF_IMG_1_cell_1.png", "C1P1thinF_IMG_1_cell_2.png"]  # fmt: skip
    assert labels.tolist() == [1, 0]
    split["num_examples"] = 3  # a folder that is not the one the split was made from
    manifest.write_text(json.dumps({"splits": {"test": split}}))
    with pytest.raises(SystemExit, match="2 crops of the test slides, the manifest lists 3"):
        int8_agreement.unseen_crops(data, str(manifest))


def test_a_final_run_is_measured_on_its_validation_slides(tmp_path):
    manifest = tmp_path / "manifest.json"
    splits = {"validation": {"slide_ids": ["C2P2"], "num_examples": 1},
              "test": {"slide_ids": [], "num_examples": 0}}  # fmt: skip
    manifest.write_text(json.dumps({"splits": splits}))
    data = _folder(tmp_path, [("Parasitized", "C1P1thinF_IMG_1_cell_1.png"),
                              ("Uninfected", "C2P2thinF_IMG_1_cell_3.png")])  # fmt: skip
    name, paths, labels = int8_agreement.unseen_crops(data, str(manifest))
    assert name == "validation" and [p.rsplit("/", 1)[1] for p in paths] == [
        "C2P2thinF_IMG_1_cell_3.png"]  # fmt: skip
    assert labels.tolist() == [0]
