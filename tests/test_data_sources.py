"""The three sources: folder (with bad files), synthetic, tfds (mocked and a real offline build)."""

import importlib.util
import os
import re
import shutil
import subprocess
import sys
import textwrap
from unittest import mock

import numpy as np
import pytest
from data_fixtures import MINI_CELL_IMAGES, REPO, SLIDES, write_bad_files, write_cell_folder
from PIL import Image

from mnres import config as config_lib
from mnres import data
from mnres.data import decode, folders, sample, sources

# Tests that mock TFDS' download also skip the check that the download host answers.
NO_NETWORK_PROBE = mock.patch.object(sources, "_check_download_possible")

HAS_TF = importlib.util.find_spec("tensorflow") is not None


def folder_config(directory, **overrides):
    config = config_lib.default_config().data
    config.source = "folder"
    config.dir = str(directory)
    config.image_size = 24
    config.num_workers = 2
    config.update(overrides)
    return config


@pytest.mark.parametrize(
    "file_name, slide",
    [
        ("C100P61ThinF_IMG_20150918_144104_cell_165.png", "C100P61"),
        ("C1_thinF_IMG_20150604_104722_cell_9.png", "C1"),
        ("C12NThinF_IMG_20150614_124212_cell_1.png", "C12N"),
        ("C37BP2_thinF_IMG_20150620_133111a_cell_87.png", "C37BP2"),
        ("C167P128ReThinF_IMG_20151201_105633_cell_1.png", "C167P128Re"),
        ("C3thin_original_IMG_20150608_162835_cell_101.png", "C3"),
        ("C47P8thinOriginalOlympusCX21_IMG_1.png", "C47P8"),
        ("cell_1.png", ""),
    ],
)
def test_slide_id(file_name, slide):
    assert folders.slide_id(file_name) == slide


@pytest.mark.parametrize(
    "path, slide, label",
    [
        ("cell_images/Parasitized/C100P61ThinF_IMG_20150918_144104_cell_165.png", "C100P61", 1),
        ("cells/Uninfected/C1_thinF_IMG_20150604_104722_cell_9.png", "C1", 0),
        ("PARASITIZED/C12NThinF_IMG_20150614_124212_cell_1.png", "C12N", 1),
        ("uninfected/cell_1.png", "", 0),
        ("C3thin_original_IMG_20150608_162835_cell_101.png", "C3", None),
        ("cells/crop_7.png", "", None),
        # Only the folder holding the file names the class, as in the folder source.
        ("Parasitized/more/C37BP2_thinF_IMG_20150620_133111a_cell_87.png", "C37BP2", None),
    ],
)
def test_crop_facts(path, slide, label):
    facts = folders.crop_facts(path)
    assert facts == (slide, label)
    assert (facts.slide_id, facts.label) == (slide, label)
    assert facts.slide_id == folders.slide_id(path)


def test_crop_facts_of_the_bundled_crops():
    paths = sample.sample_cells()
    facts = [folders.crop_facts(p) for p in paths]
    assert [f.label for f in facts] == sample.sample_labels(paths)
    assert all(f.slide_id for f in facts)  # NIH file names


def test_folder_source_reads_nested_layout_and_survives_bad_files(tmp_path):
    labels = write_cell_folder(tmp_path, SLIDES, prefix="cell_images/")
    bad = write_bad_files(tmp_path, prefix="cell_images/")
    dataset = data.load_dataset(folder_config(tmp_path), seed=0)

    everything = {}
    for split in (dataset.train, dataset.validation, dataset.test):
        assert split.images.dtype == np.uint8 and split.images.shape[1:] == (24, 24, 3)
        assert split.labels.dtype == np.int32
        for i, name in enumerate(split.names):
            everything[name] = (split.labels[i], split.slide_ids[i], split.images[i])
    for name, label in labels.items():
        assert everything[name][0] == label
        assert everything[name][1] == re.match(r"(.+?)ThinF", os.path.basename(name)).group(1)
    # Corrupt and truncated files: skipped, counted, named; never a crash.
    manifest = dataset.manifest
    assert manifest["num_skipped"] == 2
    assert sorted(s["name"] for s in manifest["skipped"]) == sorted(bad["corrupt"])
    assert not any(n in everything for n in bad["corrupt"])
    assert "Thumbs.db" not in " ".join(everything)
    # RGBA: transparent corners become black; grayscale: three equal channels.
    rgba = everything[bad["rgba"]][2]
    assert rgba.shape == (24, 24, 3) and rgba[0, 0].tolist() == [0, 0, 0]
    assert rgba[12, 12].max() > 100
    gray = everything[bad["gray"]][2].astype(int)
    assert np.array_equal(gray[..., 0], gray[..., 1]) and np.array_equal(gray[..., 1], gray[..., 2])
    assert len(everything) == len(labels) + 3  # + the fine, RGBA and gray extra files.


def test_folder_source_ignores_kaggle_duplicate_copy(tmp_path):
    write_cell_folder(tmp_path, SLIDES)
    labels = write_cell_folder(tmp_path, SLIDES, prefix="cell_images/")
    dataset = data.load_dataset(folder_config(tmp_path), seed=0)
    total = sum(len(s) for s in (dataset.train, dataset.validation, dataset.test))
    assert total == len(labels)
    assert dataset.manifest["duplicates_ignored"] == len(labels)


def test_folder_source_external_test_dir(tmp_path):
    write_cell_folder(tmp_path / "dev", SLIDES)
    test_labels = write_cell_folder(tmp_path / "external", {"C90P1": (3, 2), "C91N": (0, 4)})
    config = folder_config(tmp_path / "dev", test_dir=str(tmp_path / "external"))
    dataset = data.load_dataset(config, seed=0)
    assert sorted(dataset.test.names) == sorted("test_dir:" + n for n in test_labels)
    assert len(dataset.train) + len(dataset.validation) == sum(map(sum, SLIDES.values()))
    assert dataset.manifest["splits"]["test"]["slide_ids"] == ["C90P1", "C91N"]


def test_decode_cache_skips_decoding_on_second_run(tmp_path):
    write_cell_folder(tmp_path / "cells", SLIDES)
    config = folder_config(tmp_path / "cells", cache_dir=str(tmp_path / "cache"))
    first = data.load_dataset(config, seed=0)
    assert any(f.endswith(".npy") for f in os.listdir(tmp_path / "cache"))
    with mock.patch.object(decode, "decode_image", side_effect=AssertionError("decoded again")):
        second = data.load_dataset(config, seed=0)
    assert np.array_equal(first.train.images, second.train.images)
    assert first.manifest == second.manifest


@pytest.mark.parametrize(
    "setup, overrides, message",
    [
        ("no_uninfected", {}, "No Uninfected/ folder found"),
        ("empty", {}, "hold no images"),
        ("missing", {}, "is not a directory"),
        ("ok", {"source": "imagenet"}, "Unknown config.data.source='imagenet'"),
        ("ok", {"split_fractions": (0.8, 0.1, 0.2)}, "add up to 1"),
        ("ok", {"split_fractions": (0.8, 0.2)}, "three fractions"),
        ("ok", {"split_by": "patient"}, "Unknown config.data.split_by"),
        ("ok", {"split_seed": -1}, "config.data.split_seed=-1 must be None"),
    ],
)
def test_bad_input_raises_one_clear_error(tmp_path, setup, overrides, message):
    if setup == "no_uninfected":
        write_cell_folder(tmp_path, {"C1P1": (3, 0)})
        shutil.rmtree(tmp_path / "Uninfected")
    elif setup == "empty":
        (tmp_path / "Parasitized").mkdir()
        (tmp_path / "Uninfected").mkdir()
    elif setup == "ok":
        write_cell_folder(tmp_path, SLIDES)
    directory = tmp_path / "nowhere" if setup == "missing" else tmp_path
    with pytest.raises((ValueError, FileNotFoundError), match=re.escape(message)):
        data.load_dataset(folder_config(directory, **overrides), seed=0)


def test_all_images_corrupt_is_an_error(tmp_path):
    for folder in ("Parasitized", "Uninfected"):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "C1P1ThinF_x.png").write_bytes(b"junk")
    with pytest.raises(ValueError, match="could be read"):
        data.load_dataset(folder_config(tmp_path), seed=0)


@pytest.mark.skipif(not MINI_CELL_IMAGES.is_dir(), reason="needs ../shared/data/malaria-mini")
def test_real_mini_crops_labels_and_slides():
    listing = folders.list_folder(str(MINI_CELL_IMAGES))
    names, labels, slides = listing["names"], listing["labels"], listing["slide_ids"]
    assert len(names) == 1000
    assert (labels == 1).sum() == 500 and (labels == 0).sum() == 500
    from_folder = np.array([n.startswith("Parasitized/") for n in names])
    assert np.array_equal(from_folder, labels == 1)
    assert all(re.fullmatch(r"C\d+[A-Za-z0-9]*", s) for s in slides), set(slides)
    assert len(set(slides)) == 32
    assert (
        dict(zip(names, slides, strict=True))[
            "Parasitized/C106P67ThinF_IMG_20150924_104044_cell_167.png"
        ]
        == "C106P67"
    )
    dataset = data.load_dataset(folder_config(MINI_CELL_IMAGES, image_size=32), seed=0)
    assert sum(len(s) for s in (dataset.train, dataset.validation, dataset.test)) == 1000
    assert dataset.manifest["slides_in_several_splits"] == []
    for split in ("train", "validation", "test"):
        assert min(dataset.manifest["splits"][split]["counts"].values()) > 0
    # Real crops are pink cells on black: corners dark, centre bright.
    images = dataset.train.images.astype(float)
    assert images[:, 0, 0].mean() < 20 and images[:, 16, 16].mean() > 100


def test_synthetic_is_deterministic_and_learnable():
    config = config_lib.default_config().data
    config.source, config.image_size, config.synthetic_size, config.num_slides = (
        "synthetic",
        32,
        600,
        12,
    )
    a = data.load_dataset(config, seed=3)
    b = data.load_dataset(config, seed=3)
    c = data.load_dataset(config, seed=4)
    assert np.array_equal(a.train.images, b.train.images)
    assert a.manifest == b.manifest
    assert not np.array_equal(a.train.images, c.train.images)
    assert all(s.endswith(("P", "N")) for s in a.train.slide_ids)
    # A one-feature rule (dark purple pixels) already separates most cells, so a small
    # network can learn the task; it is not perfect, so the task is not trivial.
    images = a.train.images.astype(int)
    purple = ((images[..., 2] - images[..., 1] > 25) & (images[..., 0] < 150)).sum((1, 2))
    accuracy = ((purple > 2) == (a.train.labels == 1)).mean()
    assert 0.75 < accuracy < 1.0, accuracy


def _png_bytes(image):
    import io

    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def test_tfds_source_with_mock_data():
    tfds = pytest.importorskip("tensorflow_datasets")
    config = config_lib.default_config().data
    config.source, config.image_size = "tfds", 16
    with tfds.testing.mock_data(num_examples=10), NO_NETWORK_PROBE:
        dataset = data.load_dataset(config, seed=0)
    for split in (dataset.train, dataset.validation, dataset.test):
        assert split.images.shape[1:] == (16, 16, 3) and split.images.dtype == np.uint8
        assert set(split.labels.tolist()) <= {0, 1}
        assert all(s == "" for s in split.slide_ids)
    assert dataset.manifest["source"] == "tfds"
    assert "image-level" in dataset.manifest["warning"]


def test_tfds_label_mapping_and_slices_with_mocked_data_source():
    tfds = pytest.importorskip("tensorflow_datasets")
    rng = np.random.default_rng(0)
    # TFDS label 0 = parasitized: those images are bright, uninfected ones dark.
    examples = [
        {
            "image": _png_bytes(np.full((20, 30, 3), 200 if i % 3 == 0 else 10, np.uint8)),
            "label": 0 if i % 3 == 0 else 1,
        }
        for i in range(30)
    ]
    rng.shuffle(examples)

    def as_data_source(self, split, decoders=None, **kwargs):
        del self, decoders, kwargs
        match = re.fullmatch(r"train(?:\[(\d*):(\d*)\])?", split)
        return examples[int(match.group(1) or 0) : int(match.group(2) or 30)]

    config = config_lib.default_config().data
    config.source, config.image_size = "tfds", 16
    config.split_fractions = (0.6, 0.2, 0.2)
    with tfds.testing.mock_data(as_data_source_fn=as_data_source), NO_NETWORK_PROBE:
        dataset = data.load_dataset(config, seed=0)
    assert [len(dataset.train), len(dataset.validation), len(dataset.test)] == [18, 6, 6]
    assert dataset.manifest["tfds_splits"]["validation"] == "train[18:24]"
    for split, offset in ((dataset.train, 0), (dataset.validation, 18), (dataset.test, 24)):
        expected = [1 - examples[offset + i]["label"] for i in range(len(split))]
        assert split.labels.tolist() == expected
        bright = split.images.reshape(len(split), -1).max(-1) > 100
        assert bright.tolist() == [lab == 1 for lab in expected]


@pytest.mark.parametrize("tensorflow_installed", [True, False])
def test_tfds_offline_error_names_the_alternatives(tmp_path, tensorflow_installed):
    tfds = pytest.importorskip("tensorflow_datasets")
    config = config_lib.default_config().data
    config.source, config.tfds_data_dir = "tfds", str(tmp_path)
    # Offline, the run must fail at once, not after minutes of TFDS download retries.
    download = mock.patch.object(tfds.download.DownloadManager, "download_and_extract")
    offline = mock.patch("socket.create_connection", side_effect=OSError("no internet"))
    has_tf = mock.patch.object(sources, "_tensorflow_installed", return_value=tensorflow_installed)
    with download as downloaded, offline, has_tf, pytest.raises(RuntimeError) as error:
        data.load_dataset(config, seed=0)
    assert not downloaded.called
    text = str(error.value)
    assert ("no internet" in text) == tensorflow_installed
    assert "pip install 'mnres[tfds]'" in text
    assert "--config.data.source=folder --config.data.dir=PATH/cell_images" in text
    assert "experiments/configs/smoke.py" in text
    assert ("TensorFlow is not installed" in text) == (not tensorflow_installed)


@pytest.mark.skipif(not HAS_TF, reason="preparing TFDS malaria needs TensorFlow")
@pytest.mark.skipif(not MINI_CELL_IMAGES.is_dir(), reason="needs ../shared/data/malaria-mini")
def test_real_tfds_builder_prepared_offline_from_real_crops(tmp_path):
    """The real malaria builder, fed a local copy of NIH crops, read back with our mapping."""
    tfds = pytest.importorskip("tensorflow_datasets")
    extracted = tmp_path / "extracted"
    originals = {}
    for folder in ("Parasitized", "Uninfected"):
        (extracted / "cell_images" / folder).mkdir(parents=True)
        for name in sorted(os.listdir(MINI_CELL_IMAGES / folder))[:5]:
            shutil.copy(MINI_CELL_IMAGES / folder / name, extracted / "cell_images" / folder / name)
            pixels = decode.decode_image(str(MINI_CELL_IMAGES / folder / name), 24)
            originals[pixels.tobytes()] = int(folder == "Parasitized")
    config = config_lib.default_config().data
    config.source, config.image_size = "tfds", 24
    config.tfds_data_dir = str(tmp_path / "tfds")
    config.split_fractions = (0.6, 0.2, 0.2)
    with (
        NO_NETWORK_PROBE,
        mock.patch.object(
            tfds.download.DownloadManager, "download_and_extract", return_value=str(extracted)
        ),
    ):
        dataset = data.load_dataset(config, seed=0)
    seen = 0
    for split in (dataset.train, dataset.validation, dataset.test):
        for image, label in zip(split.images, split.labels, strict=True):
            assert originals[image.tobytes()] == label  # parasitized folder -> label 1.
            seen += 1
    assert seen == 10
    assert dataset.train.names[0] == "tfds:train:0"

    # Reading the prepared data back needs neither the network nor TensorFlow.
    script = textwrap.dedent(f"""
      import sys
      from mnres.config import default_config
      from mnres.data import load_dataset
      config = default_config().data
      config.source, config.image_size = 'tfds', 24
      config.tfds_data_dir = {config.tfds_data_dir!r}
      config.split_fractions = (0.6, 0.2, 0.2)
      dataset = load_dataset(config, seed=0)
      print(dataset.manifest['splits']['train']['names_sha256'])
      print('tensorflow' in sys.modules)
  """)
    out = subprocess.run(
        [sys.executable, "-c", script],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout.split()
    assert out[-2] == dataset.manifest["splits"]["train"]["names_sha256"]
    assert out[-1] == "False", "TensorFlow was imported to read a prepared TFDS dataset"


def test_the_split_seed_keeps_a_split_while_the_seed_changes():
    config = config_lib.default_config().data
    config.source, config.synthetic_size, config.num_slides, config.image_size = (
        "synthetic", 200, 20, 8)  # fmt: skip
    slides = lambda ds: [sorted(set(getattr(ds, s).slide_ids)) for s in ("validation", "test")]
    seed_0, seed_1 = data.load_dataset(config, seed=0), data.load_dataset(config, seed=1)
    assert slides(seed_0) != slides(seed_1)
    config.split_seed = 0
    kept = data.load_dataset(config, seed=1)
    assert slides(kept) == slides(seed_0) and kept.manifest == seed_0.manifest


def test_the_folds_come_from_the_fold_seed_else_the_split_seed_else_the_seed():
    from mnres.data import folds

    config = config_lib.default_config()
    config.seed = 3
    assert folds.fold_spec(config, 5, "slide")["seed"] == 3
    config.data.split_seed = 0
    assert folds.fold_spec(config, 5, "slide")["seed"] == 0
    assert folds.fold_spec(config, 5, "slide", fold_seed=0)["seed"] == 0
    with pytest.raises(ValueError, match="fold seed 1 and config.data.split_seed=0 disagree"):
        folds.fold_spec(config, 5, "slide", fold_seed=1)
