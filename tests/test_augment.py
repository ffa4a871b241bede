"""Augmentation pipelines (albumentations 2.0.8): shapes, the cutout hole, flip rate, seed 004."""
import warnings

import numpy as np
import pytest
import torch

from helpers import augment as aug
from helpers.errors import ConfigError

MEAN, STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)


def dark_image(seed=0):
    """Values 0..60, far from the mean fill (~115..125), so a hole is unmistakable."""
    return np.random.default_rng(seed).integers(0, 61, (32, 32, 3), dtype=np.uint8)


def raw(tf, img, seed):
    """Apply `tf` and undo the normalisation: back to uint8 HWC."""
    tf.set_random_seed(seed)
    return aug.denormalize(tf(image=img)["image"], MEAN, STD)


def test_pipelines_build_without_warnings():
    """albumentations only *warns* about wrong argument names and then ignores them."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        aug.train_transforms(MEAN, STD)
        aug.test_transforms(MEAN, STD)
        aug.seed004_transforms(MEAN, STD)


@pytest.mark.parametrize("make", [aug.train_transforms, aug.test_transforms, aug.seed004_transforms])
def test_output_is_a_normalised_float_chw_tensor(make):
    out = make(MEAN, STD)(image=dark_image())["image"]
    assert isinstance(out, torch.Tensor) and out.dtype == torch.float32 and out.shape == (3, 32, 32)


def test_test_pipeline_normalises_with_the_given_statistics():
    img = dark_image()
    out = aug.test_transforms(MEAN, STD)(image=img)["image"]
    expected = (torch.from_numpy(img).permute(2, 0, 1).float() / 255 - torch.tensor(MEAN)[:, None, None]) \
        / torch.tensor(STD)[:, None, None]
    assert torch.allclose(out, expected, atol=1e-5)
    assert np.array_equal(aug.denormalize(out, MEAN, STD), img)


def test_cutout_hole_is_exactly_8x8_and_filled_with_the_mean():
    tf = aug.train_transforms(MEAN, STD, crop_p=0.0, flip_p=0.0, cutout_p=1.0)
    fill = np.array(aug.mean_fill(MEAN))
    for seed in range(30):
        img = dark_image(seed)
        out = raw(tf, img, seed)
        changed = np.any(out != img, axis=-1)
        ys, xs = np.nonzero(changed)
        assert changed.sum() == 64, "exactly one 8x8 hole"
        assert ys.max() - ys.min() == 7 and xs.max() - xs.min() == 7
        assert np.all(np.abs(out[changed].astype(int) - fill) <= 1)  # the mean, up to rounding


def test_about_half_of_the_images_are_flipped():
    tf = aug.train_transforms(MEAN, STD, crop_p=0.0, flip_p=0.5, cutout_p=0.0)
    img = dark_image()
    tf.set_random_seed(123)
    n = 400
    flipped = sum(np.array_equal(aug.denormalize(tf(image=img)["image"], MEAN, STD), img[:, ::-1])
                  for _ in range(n))
    assert 0.40 * n < flipped < 0.60 * n   # binomial(400, 0.5): +-4 sigma


def test_random_crop_shifts_by_at_most_four_pixels():
    tf = aug.train_transforms(MEAN, STD, crop_p=1.0, flip_p=0.0, cutout_p=0.0)
    img = dark_image()
    padded = np.pad(img, ((4, 4), (4, 4), (0, 0)), mode="reflect")
    offsets = set()
    tf.set_random_seed(0)
    for _ in range(300):
        out = aug.denormalize(tf(image=img)["image"], MEAN, STD)
        match = [(y, x) for y in range(9) for x in range(9) if np.array_equal(padded[y:y + 32, x:x + 32], out)]
        assert len(match) == 1
        offsets.add(match[0])
    assert len(offsets) > 70  # of the 81 possible offsets


def test_probabilities_are_parameters_with_seed_defaults():
    assert (aug.CROP_P, aug.FLIP_P, aug.CUTOUT_P) == (0.5, 0.5, 0.5)
    tf = aug.train_transforms(MEAN, STD, crop_p=0.0, flip_p=0.0, cutout_p=0.0)
    img = dark_image()
    assert np.array_equal(raw(tf, img, 0), img)   # all off: the identity


def test_seed004_pipeline_shifts_and_rotates():
    tf = aug.seed004_transforms(MEAN, STD, flip_p=0.0)
    img = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    outs = [raw(tf, img, s) for s in range(10)]
    assert all(not np.array_equal(o, img) for o in outs)
    assert len({o.tobytes() for o in outs}) == 10


@pytest.mark.parametrize("kwargs, match", [
    ({"flip_p": 1.5}, "flip_p must be a probability"),
    ({"cutout_p": -0.1}, "cutout_p must be a probability"),
    ({"hole": 0}, "hole must be in 1..32"),
])
def test_bad_augmentation_settings_are_refused(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        aug.train_transforms(MEAN, STD, **kwargs)


def test_bad_statistics_and_names_are_refused():
    with pytest.raises(ConfigError, match="std > 0"):
        aug.test_transforms(MEAN, (0.2, 0.0, 0.2))
    with pytest.raises(ConfigError, match="unknown augmentation"):
        aug.transforms_for("mixup", MEAN, STD)


def test_denormalize_handles_batches():
    batch = torch.zeros(5, 3, 32, 32)
    out = aug.denormalize(batch, MEAN, STD)
    assert out.shape == (5, 32, 32, 3) and out.dtype == np.uint8
    assert np.all(np.abs(out[0, 0, 0].astype(int) - np.array(aug.mean_fill(MEAN))) <= 1)


def test_augment_images_is_reproducible_and_transforms_draw_independently():
    img = dark_image()
    tf = aug.train_transforms(MEAN, STD, crop_p=0.5, flip_p=0.5, cutout_p=0.0)
    batch = np.repeat(img[None], 200, axis=0)
    a = aug.augment_images(tf, batch, MEAN, STD, seed=1)
    assert np.array_equal(a, aug.augment_images(tf, batch, MEAN, STD, seed=1))
    assert not np.array_equal(a, aug.augment_images(tf, batch, MEAN, STD, seed=2))
    # one shared stream: crop and flip decisions are independent, so all four combinations
    # occur (with Compose.set_random_seed both would draw the same numbers: cropped iff flipped)
    padded = np.pad(img, ((4, 4), (4, 4), (0, 0)), mode="reflect")
    combos = set()
    for out in a:
        for flipped in (False, True):
            seen = out[:, ::-1] if flipped else out
            offsets = [(y, x) for y in range(9) for x in range(9)
                       if np.array_equal(padded[y:y + 32, x:x + 32], seen)]
            if offsets:
                combos.add((flipped, offsets[0] != (4, 4)))
    assert combos == {(False, False), (False, True), (True, False), (True, True)}
