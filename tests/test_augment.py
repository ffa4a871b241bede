"""Augmentation pipelines (albumentations 2.0.8): shapes, the cutout hole (cut in the image
padded to 48x48, so clipped by the border or missing), flip rate, seed 004."""
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
        aug.flip_shift_rotate_transforms(MEAN, STD)


@pytest.mark.parametrize("make", [aug.train_transforms, aug.test_transforms, aug.flip_shift_rotate_transforms])
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


def recorded_hole(result):
    """The hole's top-left corner in image coordinates, from albumentations' own record: it
    is cut in the image padded by CUTOUT_PAD on every side, then the centre is cropped back."""
    names = [name for name, _ in result["applied_transforms"]]
    i = names.index("CoarseDropout")
    (pad_name, pad), (_, drop), (crop_name, crop) = result["applied_transforms"][i - 1:i + 2]
    p, side = aug.CUTOUT_PAD, 32 + 2 * aug.CUTOUT_PAD
    assert pad_name == "PadIfNeeded" and crop_name == "CenterCrop"
    assert (pad["pad_top"], pad["pad_bottom"], pad["pad_left"], pad["pad_right"]) == (p, p, p, p)
    assert drop["shape"][:2] == (side, side) and crop["crop_coords"] == (p, p, p + 32, p + 32)
    assert drop["holes"].shape == (1, 4)
    x1, y1, x2, y2 = (int(v) for v in drop["holes"][0])
    assert (x2 - x1, y2 - y1) == (aug.HOLE, aug.HOLE)
    return y1 - p, x1 - p


def visible(y, x, hole=aug.HOLE):
    """The part of a hole x hole square at corner (y, x) that lies in the 32x32 image."""
    mask = np.zeros((32, 32), bool)
    mask[max(y, 0):max(y + hole, 0), max(x, 0):max(x + hole, 0)] = True
    return mask


def test_cutout_hole_is_8x8_in_the_padded_image_cut_by_the_border_and_mean_filled():
    """Seed 001: one 8x8 hole anywhere in the image padded to 48x48, then the centre 32x32:
    the corner is uniform over -8..32 on each axis, so the hole may be clipped or missing."""
    tf = aug.train_transforms(MEAN, STD, crop_p=0.0, flip_p=0.0, cutout_p=1.0)
    tf.save_applied_params = True
    tf.set_random_seed(5)
    fill = np.array(aug.mean_fill(MEAN), dtype=np.uint8)
    lo, hi = -aug.CUTOUT_PAD, 32 + aug.CUTOUT_PAD - aug.HOLE          # -8, 32
    corners, kinds = [], {"inside": 0, "clipped": 0, "outside": 0}
    for i in range(2050):
        img = dark_image(i)
        r = tf(image=img)
        out = aug.denormalize(r["image"], MEAN, STD)
        y, x = recorded_hole(r)
        assert lo <= y <= hi and lo <= x <= hi
        corners.append((y, x))
        mask = visible(y, x)
        # the visible part of the hole: each side clipped to the image, independently computed
        rows = min(y + aug.HOLE, 32) - max(y, 0)
        cols = min(x + aug.HOLE, 32) - max(x, 0)
        assert mask.sum() == max(rows, 0) * max(cols, 0)
        changed = np.any(out != img, axis=-1)
        assert np.array_equal(changed, mask), (y, x)                   # exactly the visible part ...
        assert np.all(out[mask] == fill)                               # ... and it is the mean pixel
        assert np.array_equal(out[~mask], img[~mask])                  # nothing else changed
        area = int(mask.sum())
        kinds["outside" if area == 0 else "inside" if area == aug.HOLE ** 2 else "clipped"] += 1
        if area == 0:
            assert np.array_equal(out, img)                            # a hole off the image: unchanged
    corners = np.array(corners)
    n = len(corners)
    assert corners.min(0).tolist() == [lo, lo] and corners.max(0).tolist() == [hi, hi]
    for axis in (0, 1):   # 41 positions, uniform: chi-square with 40 degrees of freedom
        counts = np.bincount(corners[:, axis] - lo, minlength=hi - lo + 1)
        assert counts.size == 41 and counts.min() > 0, counts
        expected = n / 41
        assert ((counts - expected) ** 2 / expected).sum() < 100, counts
    # each axis: 25 of 41 corners wholly inside, 14 clipped, 2 (-8 and 32) wholly outside
    p_outside = 1 - (39 / 41) ** 2
    p_inside = (25 / 41) ** 2
    for kind, p in (("outside", p_outside), ("inside", p_inside), ("clipped", 1 - p_outside - p_inside)):
        assert abs(kinds[kind] - n * p) <= 5 * np.sqrt(n * p * (1 - p)), kinds


def test_cutout_pad_zero_keeps_the_hole_wholly_inside():
    tf = aug.train_transforms(MEAN, STD, crop_p=0.0, flip_p=0.0, cutout_p=1.0, cutout_pad=0)
    tf.save_applied_params = True
    tf.set_random_seed(2)
    fill = np.array(aug.mean_fill(MEAN), dtype=np.uint8)
    corners = []
    for i in range(400):
        img = dark_image(i)
        r = tf(image=img)
        out = aug.denormalize(r["image"], MEAN, STD)
        holes = dict(r["applied_transforms"])["CoarseDropout"]["holes"]
        x1, y1, x2, y2 = (int(v) for v in holes[0])
        corners.append((y1, x1))
        changed = np.any(out != img, axis=-1)
        assert changed.sum() == aug.HOLE ** 2 and np.array_equal(changed, visible(y1, x1))
        assert np.all(out[changed] == fill)
    corners = np.array(corners)
    assert corners.min() == 0 and corners.max() == 32 - aug.HOLE


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


def test_seed004s_pipeline_shifts_and_rotates():
    tf = aug.flip_shift_rotate_transforms(MEAN, STD, flip_p=0.0)
    img = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    outs = [raw(tf, img, s) for s in range(10)]
    assert all(not np.array_equal(o, img) for o in outs)
    assert len({o.tobytes() for o in outs}) == 10


@pytest.mark.parametrize("kwargs, match", [
    ({"flip_p": 1.5}, "flip_p must be a probability"),
    ({"cutout_p": -0.1}, "cutout_p must be a probability"),
    ({"hole": 0}, "hole must be in 1..32"),
    ({"cutout_pad": -1}, "cutout_pad=-1"),
])
def test_bad_augmentation_settings_are_refused(kwargs, match):
    """Both of S10's pipelines refuse them alike: albumentations' and the on-device one."""
    for pipeline in (aug.train_transforms, aug.BatchAugment):
        with pytest.raises(ConfigError, match=match):
            pipeline(MEAN, STD, **kwargs)


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
    a = aug.augment_images(tf, batch, stats=(MEAN, STD), seed=1)
    assert np.array_equal(a, aug.augment_images(tf, batch, stats=(MEAN, STD), seed=1))
    assert not np.array_equal(a, aug.augment_images(tf, batch, stats=(MEAN, STD), seed=2))
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
