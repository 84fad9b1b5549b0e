"""Batches (resumable, sharded, exact eval), decoding and the jitted augmentation."""

import io

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from mnres import config as config_lib
from mnres import data
from mnres.data import augment, decode


def toy_split(n=50, size=8):
    rng = np.random.default_rng(0)
    return data.Split(
        images=rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8),
        labels=(np.arange(n) % 2).astype(np.int32),
        slide_ids=np.array([f"S{i // 5}" for i in range(n)]),
        names=np.array([f"img{i:03d}" for i in range(n)]),
    )


def ids(batch, split):
    """Recovers example indices from pixel content (the toy images are all distinct)."""
    lookup = {img.tobytes(): i for i, img in enumerate(split.images)}
    return [lookup.get(img.tobytes(), -1) for img in batch["image"]]  # -1: padding.


def test_train_batches_are_a_function_of_seed_and_step_and_resume_exactly():
    split = toy_split()
    assert data.steps_per_epoch(split, 16) == 3
    stream = data.train_batches(split, 16, seed=1)
    run = [ids(next(stream), split) for _ in range(9)]
    for epoch in range(3):
        seen = sum(run[3 * epoch : 3 * epoch + 3], [])
        assert len(set(seen)) == 48  # no repeat inside an epoch; the tail of 2 is dropped.
    assert run[0:3] != run[3:6]  # each epoch has its own order.
    resumed = data.train_batches(split, 16, seed=1, start_step=4)
    assert [ids(next(resumed), split) for _ in range(5)] == run[4:9]
    other = data.train_batches(split, 16, seed=2)
    assert [ids(next(other), split) for _ in range(3)] != run[:3]
    batch = next(data.train_batches(split, 16, seed=1))
    assert batch["image"].dtype == np.uint8 and batch["label"].dtype == np.int32
    assert batch["image"].shape == (16, 8, 8, 3)


def test_train_batches_split_over_processes():
    split = toy_split()
    whole = next(data.train_batches(split, 16, seed=3, start_step=2))
    parts = [
        next(data.train_batches(split, 16, seed=3, start_step=2, process_index=p, process_count=4))
        for p in range(4)
    ]
    assert all(p["image"].shape[0] == 4 for p in parts)
    assert np.array_equal(np.concatenate([p["image"] for p in parts]), whole["image"])
    with pytest.raises(ValueError, match="multiple"):
        next(data.train_batches(split, 18, seed=0, process_count=4))
    with pytest.raises(ValueError, match="fewer than one global batch"):
        next(data.train_batches(split, 64, seed=0))


@pytest.mark.parametrize("process_count", [1, 2])
def test_eval_batches_count_every_example_exactly_once(process_count):
    split = toy_split(n=37)
    seen = []
    for p in range(process_count):
        for batch in data.eval_batches(split, 16, process_index=p, process_count=process_count):
            assert batch["image"].shape[0] == 16 // process_count
            assert batch["mask"].dtype == bool
            seen += [i for i, m in zip(ids(batch, split), batch["mask"], strict=True) if m]
            assert (batch["label"][~batch["mask"]] == 0).all()
    assert sorted(seen) == list(range(37))


def test_prefetch_yields_the_same_batches_and_reraises():
    split = toy_split()
    plain = [
        b["label"] for _, b in zip(range(7), data.train_batches(split, 8, seed=0), strict=False)
    ]
    fetched = data.prefetch(data.train_batches(split, 8, seed=0))
    assert all(np.array_equal(a, next(fetched)["label"]) for a in plain)
    passthrough = data.prefetch(data.train_batches(split, 8, seed=0), size=0)
    assert all(np.array_equal(a, next(passthrough)["label"]) for a in plain)

    def broken():
        yield {"label": np.zeros(1)}
        raise OSError("disk gone")

    stream = data.prefetch(broken())
    next(stream)
    with pytest.raises(OSError, match="disk gone"):
        next(stream)


def test_decode_converts_modes_and_keeps_aspect_ratio():
    wide = np.zeros((10, 40, 3), np.uint8)
    wide[:, :, 0] = 200
    out = decode.decode_image(wide, 20)
    assert out.shape == (20, 20, 3)
    assert out[10, 10, 0] > 150 and out[0, 10].max() == 0  # padded above/below, not stretched.
    for mode in ("L", "P", "I;16", "LA", "CMYK"):
        buffer = io.BytesIO()
        image = (
            Image.fromarray(np.full((12, 12, 3), 120, np.uint8)).convert(mode)
            if mode != "I;16"
            else Image.fromarray(np.full((12, 12), 30000, np.uint16))
        )
        image.save(buffer, format="TIFF" if mode in ("I;16", "CMYK") else "PNG")
        out = decode.decode_image(buffer.getvalue(), 6)
        assert out.shape == (6, 6, 3) and out.dtype == np.uint8, mode
    with pytest.raises(OSError):
        decode.decode_image(b"not an image", 6)


def test_decode_files_keeps_order_and_raises_on_an_unreadable_file(tmp_path):
    paths = []
    for i, level in enumerate((10, 200)):
        paths.append(tmp_path / f"{i}.png")
        Image.fromarray(np.full((8, 8, 3), level, np.uint8)).save(paths[-1])
    images = decode.decode_files(paths, 4)
    assert images.shape == (2, 4, 4, 3) and images[0].max() == 10 and images[1].min() == 200
    assert decode.decode_files([], 4).shape == (0, 4, 4, 3)
    (tmp_path / "bad.png").write_bytes(b"not an image")
    with pytest.raises(OSError):  # not skipped: the images would no longer match the names
        decode.decode_files([paths[0], tmp_path / "bad.png"], 4)


def test_mixup_blends_a_batch_with_its_reverse():
    x = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (4, 8, 8, 3)), jnp.float32)
    mixed, lam = augment.mix(x, jax.random.key(0), mixup_alpha=0.4)
    assert 0.0 <= float(lam) <= 1.0
    np.testing.assert_allclose(mixed, lam * x + (1 - lam) * x[::-1], rtol=1e-6, atol=1e-6)


def test_cutmix_pastes_one_box_whose_share_is_one_minus_lam():
    # Distinct values: every pixel tells which image it came from.
    x = jnp.arange(2 * 16 * 16 * 1, dtype=jnp.float32).reshape(2, 16, 16, 1)
    for seed in range(5):
        mixed, lam = augment.mix(x, jax.random.key(seed), cutmix_alpha=1.0)
        from_other = np.asarray(mixed[0] == x[1])[..., 0]
        assert np.all(from_other | np.asarray(mixed[0] == x[0])[..., 0])
        assert float(lam) == pytest.approx(1 - from_other.mean())
        rows, cols = np.nonzero(from_other)
        if len(rows):  # one axis-aligned box
            assert from_other[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1].all()


def test_mix_with_both_picks_one_and_refuses_neither():
    x = jnp.asarray(np.random.default_rng(1).uniform(-1, 1, (2, 8, 8, 3)), jnp.float32)
    kinds = set()
    for seed in range(12):
        mixed, lam = augment.mix(x, jax.random.key(seed), mixup_alpha=0.4, cutmix_alpha=1.0)
        blended = np.allclose(mixed, lam * x + (1 - lam) * x[::-1], atol=1e-6)
        pasted = np.all((mixed == x) | (mixed == x[::-1]))
        assert blended or pasted
        kinds.add("mixup" if not pasted else "cutmix")
    assert kinds == {"mixup", "cutmix"}
    with pytest.raises(ValueError, match="one or both > 0"):
        augment.mix(x, jax.random.key(0))


def test_preprocess_matches_keras_scaling():
    x = np.array([0, 127, 255], np.uint8).reshape(1, 1, 3, 1).repeat(3, -1)
    np.testing.assert_allclose(
        augment.preprocess(x)[0, 0, :, 0], [-1.0, 127 / 127.5 - 1, 1.0], atol=1e-6
    )


def dihedral(image):
    rotations = [np.rot90(image, k) for k in range(4)]
    return rotations + [r[:, ::-1] for r in rotations]


def test_augment_geometry_is_a_symmetry_of_the_square_and_deterministic():
    config = config_lib.default_config().data
    config.brightness = config.contrast = config.saturation = config.hue = 0.0
    images = toy_split(n=24).images
    fn = jax.jit(lambda x, rng: augment.augment(x, rng, config))
    out = np.asarray(fn(images, jax.random.key(0)))
    assert out.dtype == np.float32 and out.shape == images.shape
    expected = augment.preprocess(images)
    kinds = set()
    for i in range(len(images)):
        matches = [
            k
            for k, t in enumerate(dihedral(np.asarray(expected[i])))
            if np.allclose(t, out[i], atol=1e-6)
        ]
        assert matches, i
        kinds.add(matches[0])
    assert len(kinds) >= 5  # transforms vary per image.
    np.testing.assert_array_equal(out, fn(images, jax.random.key(0)))
    assert not np.array_equal(out, fn(images, jax.random.key(1)))
    config.flip = config.rot90 = False
    np.testing.assert_allclose(
        augment.augment(images, jax.random.key(0), config), expected, atol=1e-6
    )


def test_dihedral_views_are_the_8_distinct_symmetries_view_major():
    images = toy_split(n=3).images.astype(np.float32)
    views = np.asarray(augment.dihedral_views(images))
    assert views.shape == (8 * 3, *images.shape[1:])
    for i, image in enumerate(images):
        expected = dihedral(image)
        for v in range(8):
            np.testing.assert_array_equal(views[v * 3 + i], expected[v])
    assert len({views[v * 3].tobytes() for v in range(8)}) == 8
    with pytest.raises(ValueError, match="square"):
        augment.dihedral_views(np.zeros((1, 4, 6, 3)))


def test_augment_colour_jitter_is_mild_and_in_range():
    config = config_lib.default_config().data
    config.flip = config.rot90 = False
    images = np.asarray(data.load_dataset(_synthetic(), seed=0).train.images[:32])
    out = np.asarray(
        jax.jit(lambda x, rng: augment.augment(x, rng, config))(images, jax.random.key(3))
    )
    base = np.asarray(augment.preprocess(images))
    assert out.min() >= -1.0 and out.max() <= 1.0
    difference = np.abs(out - base).mean((1, 2, 3))
    assert (difference > 0).all() and difference.max() < 0.2  # [-1, 1] units
    # Any batch size, including one.
    assert augment.augment(images[:1], jax.random.key(0), config).shape == (1, 16, 16, 3)
    assert jnp.isfinite(augment.augment(images[:3], jax.random.key(0), config)).all()


def _synthetic():
    config = config_lib.default_config().data
    config.source, config.image_size, config.synthetic_size, config.num_slides = (
        "synthetic",
        16,
        200,
        10,
    )
    return config
