"""The cross-validation pool packed to travel: what `run` unpacks is what crossval decodes."""

import json

import numpy as np
import pytest
from data_fixtures import write_cell_folder

from experiments.search import packed_pool
from mnres.data import folds as folds_lib


def test_packed_pool_unpacks_to_the_decoded_pool(tmp_path):
    write_cell_folder(tmp_path / "cells", {"C1P1": (3, 4), "C2P2": (0, 5), "C3P3": (2, 2)})
    pool_dir, npy = tmp_path / "pool", tmp_path / "images.npy"
    packed_pool.pack(str(tmp_path / "cells"), str(pool_dir))
    packed_pool.unpack(str(pool_dir), str(npy))
    loaded, manifest, info = packed_pool.load_pool(str(pool_dir), str(npy))

    config = packed_pool.folder_config(str(tmp_path / "cells"), {})
    decoded, decoded_manifest = folds_lib.load_pool(config.data, packed_pool.FOLD_SEED)
    np.testing.assert_array_equal(loaded.images, decoded.images)
    for field in ("labels", "slide_ids", "names"):
        np.testing.assert_array_equal(getattr(loaded, field), getattr(decoded, field))
    assert manifest["skipped"] == decoded_manifest.get("skipped", [])
    assert info["data_dir"] == "PATH/cells"  # no machine path travels with the pool

    # Chunks that are not the packed ones (two swapped in transit) are refused, not trained on.
    chunks = [pool_dir / c for c in json.loads((pool_dir / "pool.json").read_text())["chunks"]]
    first, second = chunks[0].read_bytes(), chunks[1].read_bytes()
    chunks[0].write_bytes(second)
    chunks[1].write_bytes(first)
    with pytest.raises(ValueError, match="not the packed ones"):
        packed_pool.unpack(str(pool_dir), str(tmp_path / "again.npy"))


def test_folder_config_reads_overrides_as_the_fields_kind():
    config = packed_pool.folder_config(
        "PATH/cells",
        {
            "num_epochs": "3",
            "progress_bar": "True",
            "model.input_normalization": "gray_world",
            "data.split_fractions": "(0.9, 0.1, 0.0)",
            "optimizer.learning_rate": "1e-3",
        },
    )
    assert config.num_epochs == 3 and config.progress_bar is True
    assert config.model.input_normalization == "gray_world"
    assert config.data.split_fractions == (0.9, 0.1, 0.0)  # a tuple, not its text
    assert config.optimizer.learning_rate == 1e-3
    assert config.data.source == "folder" and config.data.dir == "PATH/cells"


@pytest.mark.parametrize(
    "key, value, match",
    [
        ("num_epoch", "3", "does not exist"),  # a typo is not added as a new field
        ("num_epochs", "three", "cannot be casted"),
        ("progress_bar", "yes", "cannot be casted"),
    ],
)
def test_folder_config_refuses_unknown_fields_and_wrong_types(key, value, match):
    with pytest.raises(ValueError, match=f"--set {key}={value}: .*{match}"):
        packed_pool.folder_config("PATH/cells", {key: value})


def test_fold_outputs_refuses_a_bad_override_before_it_unpacks(tmp_path, capsys):
    from experiments import fold_outputs

    argv = ["run", f"--pool={tmp_path}/pool", f"--workdir={tmp_path}/runs", f"--out={tmp_path}/out"]
    for bad in ("num_epoch=1", "num_epochs"):
        with pytest.raises(SystemExit):
            fold_outputs.main([*argv, f"--set={bad}"])
        assert "--set" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()
