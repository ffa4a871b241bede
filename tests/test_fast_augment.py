"""The fast path (helpers.augment.BatchAugment, helpers.loaders.DeviceLoader) against seed 001's
albumentations pipeline: the same distributions, the same pixels for the same parameters,
and a DeviceLoader that feeds every image once per epoch, reproducibly. CPU only.

Every random draw here comes from a seeded generator, so each run sees the same numbers;
the statistical bounds are still wide (about 5 sigma) so that a change of seed cannot fail.
"""
import helpers.augment as aug  # first: it sets NO_ALBUMENTATIONS_UPDATE before albumentations loads
import albumentations as A  # noqa: E402
import cv2  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from albumentations.pytorch import ToTensorV2  # noqa: E402

from helpers import engine, hardware, optim  # noqa: E402
from helpers.loaders import DeviceLoader, build_loaders  # noqa: E402
from helpers.models import get_model  # noqa: E402

PAD, HOLE, SIDE, CUTOUT_PAD = aug.PAD, aug.HOLE, 32, aug.CUTOUT_PAD
CENTRE = (PAD, PAD)
HOLE_LO, HOLE_HI = -CUTOUT_PAD, SIDE + CUTOUT_PAD - HOLE   # the hole's corner: -8..32 on each axis
HOLE_POSITIONS = HOLE_HI - HOLE_LO + 1                     # 41


def gen(seed):
    return torch.Generator().manual_seed(seed)


def binomial_ok(count, n, p, sigmas=5.0):
    return abs(count - n * p) <= sigmas * np.sqrt(n * p * (1 - p))


def chi_square(counts):
    expected = counts.sum() / counts.size
    return float(((counts - expected) ** 2 / expected).sum())


def visible(y, x):
    """The part of the HOLE x HOLE square with top-left corner (y, x) inside the image."""
    mask = np.zeros((SIDE, SIDE), bool)
    mask[max(y, 0):max(y + HOLE, 0), max(x, 0):max(x + HOLE, 0)] = True
    return mask


def visible_area(y, x):
    """The same, counted from the clipped extents: 0 when the hole misses the image."""
    rows = min(y + HOLE, SIDE) - max(y, 0)
    cols = min(x + HOLE, SIDE) - max(x, 0)
    return max(rows, 0) * max(cols, 0)


# per axis 25 of the 41 corners keep the hole wholly inside, 2 (-8 and 32) put it wholly outside
P_HOLE_OUTSIDE = 1 - (39 / 41) ** 2
P_HOLE_INSIDE = (25 / 41) ** 2
P_HOLE_CLIPPED = 1 - P_HOLE_OUTSIDE - P_HOLE_INSIDE


def hole_kinds(hole_yx):
    """How many holes lie wholly inside, are clipped by the border, miss the image."""
    areas = np.array([visible_area(int(y), int(x)) for y, x in hole_yx])
    return {"inside": int((areas == HOLE * HOLE).sum()), "outside": int((areas == 0).sum()),
            "clipped": int(((areas > 0) & (areas < HOLE * HOLE)).sum())}


def normalised(images_uint8, mean, std):
    """What A.Normalize + ToTensorV2 make of uint8 HWC images, as an NCHW tensor."""
    x = torch.as_tensor(np.ascontiguousarray(images_uint8)).permute(0, 3, 1, 2).float()
    return aug.normalize_batch(x, mean, std)


# ----------------------------------------------------------------------------------------
# Distributions of BatchAugment's random parameters
# ----------------------------------------------------------------------------------------
def test_crop_offsets_are_uniform_over_the_9x9_positions(real_data):
    ba = aug.BatchAugment(real_data.mean, real_data.std, crop_p=1.0)
    n = 81 * 250
    crop = ba.sample(n, "cpu", gen(0))["crop_yx"]
    assert crop.min() >= 0 and crop.max() <= 2 * PAD
    counts = np.bincount((crop[:, 0] * 9 + crop[:, 1]).numpy(), minlength=81)
    assert counts.size == 81 and counts.min() > 0
    # chi-square with 80 degrees of freedom: mean 80, sd 12.6; 160 is beyond p = 1e-7
    assert chi_square(counts) < 160, counts.reshape(9, 9)
    assert counts.min() > 250 * 0.6 and counts.max() < 250 * 1.4
    # the rows and the columns separately: 9 values each, uniform
    for axis in (0, 1):
        per = np.bincount(crop[:, axis].numpy(), minlength=9)
        assert chi_square(per) < 45, per   # 8 degrees of freedom


def test_flip_crop_and_cutout_happen_to_about_half(real_data):
    ba = aug.BatchAugment(real_data.mean, real_data.std)      # seed 001: every p is 0.5
    n = 20_000
    p = ba.sample(n, "cpu", gen(1))
    assert binomial_ok(int(p["flip"].sum()), n, 0.5)
    assert binomial_ok(int(p["cutout"].sum()), n, 0.5)
    moved = (p["crop_yx"] != torch.tensor(CENTRE)).any(1)   # a crop at the centre is no move
    assert binomial_ok(int(moved.sum()), n, 0.5 * 80 / 81)
    # the three are drawn independently
    both = int((p["flip"] & p["cutout"]).sum())
    assert binomial_ok(both, n, 0.25)
    # never flips / always flips at p = 0 / 1
    assert not aug.BatchAugment(real_data.mean, real_data.std, flip_p=0.0).sample(500, "cpu", gen(2))["flip"].any()
    assert aug.BatchAugment(real_data.mean, real_data.std, flip_p=1.0).sample(500, "cpu", gen(2))["flip"].all()


def test_hole_corners_are_uniform_over_the_padded_image(real_data):
    """Seed 001 cuts the hole in the image padded to 48x48: corner uniform over -8..32."""
    ba = aug.BatchAugment(real_data.mean, real_data.std, cutout_p=1.0)
    n = HOLE_POSITIONS ** 2 * 30
    hole = ba.sample(n, "cpu", gen(12))["hole_yx"].numpy()
    assert hole.min() == HOLE_LO and hole.max() == HOLE_HI            # both extremes reached
    for axis in (0, 1):
        per = np.bincount(hole[:, axis] - HOLE_LO, minlength=HOLE_POSITIONS)
        assert per.size == HOLE_POSITIONS and per.min() > 0, per
        assert chi_square(per) < 100, per                              # 40 degrees of freedom
    joint = np.bincount((hole[:, 0] - HOLE_LO) * HOLE_POSITIONS + hole[:, 1] - HOLE_LO,
                        minlength=HOLE_POSITIONS ** 2)
    # 1,680 degrees of freedom: mean 1680, sd 58
    assert joint.size == HOLE_POSITIONS ** 2 and chi_square(joint) < 1680 + 6 * 58
    kinds = hole_kinds(hole)
    for kind, p in (("inside", P_HOLE_INSIDE), ("clipped", P_HOLE_CLIPPED), ("outside", P_HOLE_OUTSIDE)):
        assert binomial_ok(kinds[kind], n, p), kinds
    # with cutout_pad=0 the hole stays wholly inside, as before seed 001 was matched
    inner = aug.BatchAugment(real_data.mean, real_data.std, cutout_pad=0).sample(4000, "cpu", gen(13))["hole_yx"]
    assert inner.min() == 0 and inner.max() == SIDE - HOLE


def test_one_mean_filled_8x8_hole_clipped_by_the_border_on_real_images(real_data):
    ba = aug.BatchAugment(real_data.mean, real_data.std, crop_p=0.0, flip_p=0.0, cutout_p=1.0)
    images = real_data.train_images[:1024]
    params = ba.sample(len(images), "cpu", gen(3))
    out = ba.apply(torch.as_tensor(images), params)
    raw = aug.denormalize(out, real_data.mean, real_data.std)            # back to uint8 NHWC
    fill = np.array(aug.mean_fill(real_data.mean), dtype=np.uint8)
    assert np.abs(fill - np.array(real_data.mean) * 255).max() <= 0.5       # the mean pixel, rounded
    hole = params["hole_yx"].numpy()
    assert hole.min() == HOLE_LO and hole.max() == HOLE_HI             # reaches both extremes
    kinds = {"inside": 0, "clipped": 0, "outside": 0}
    for i, (y, x) in enumerate(hole):
        mask = visible(y, x)
        area = visible_area(y, x)
        assert mask.sum() == area                                      # clipped to the right size
        assert np.all(raw[i][mask] == fill)                            # the visible part is the mean pixel
        assert np.array_equal(raw[i][~mask], images[i][~mask])         # nothing else changed
        if area == 0:
            assert np.array_equal(raw[i], images[i])                   # a hole off the image: unchanged
        kinds["outside" if area == 0 else "inside" if area == HOLE * HOLE else "clipped"] += 1
    assert min(kinds.values()) > 0, kinds                              # all three kinds occurred
    for kind, p in (("inside", P_HOLE_INSIDE), ("clipped", P_HOLE_CLIPPED), ("outside", P_HOLE_OUTSIDE)):
        assert binomial_ok(kinds[kind], len(images), p), kinds
    changed = np.any(raw != images, axis=-1)                           # (N, 32, 32)
    shown = np.array([visible_area(y, x) > 0 for y, x in hole])
    assert not changed[~shown].any()
    assert changed[shown].any((1, 2)).mean() > 0.99                    # real pixels rarely equal the fill
    spans = [(np.ptp(np.nonzero(changed[i].any(1))[0]), np.ptp(np.nonzero(changed[i].any(0))[0]))
             for i in range(len(images)) if changed[i].any()]
    assert max(max(s) for s in spans) <= HOLE - 1                     # exactly one hole, no larger


# ----------------------------------------------------------------------------------------
# The same pixels as albumentations for the same parameters
# ----------------------------------------------------------------------------------------
def albumentations_equivalent(img, mean, std, crop_yx, flip, hole_yx, cutout):
    """seed 001's pipeline with every random choice fixed, from albumentations' own transforms.

    The hole is cut as seed 001 does: in the image padded by CUTOUT_PAD on every side (so at
    corner hole_yx + CUTOUT_PAD there, always wholly inside), then the centre is cropped back.
    """
    cy, cx = crop_yx
    geometric = [A.PadIfNeeded(min_height=SIDE + 2 * PAD, min_width=SIDE + 2 * PAD,
                               border_mode=cv2.BORDER_REFLECT_101),
                 A.Crop(x_min=cx, y_min=cy, x_max=cx + SIDE, y_max=cy + SIDE)]
    if flip:
        geometric.append(A.HorizontalFlip(p=1.0))
    out = A.Compose(geometric)(image=img)["image"]
    if cutout:
        big = SIDE + 2 * CUTOUT_PAD
        out = A.PadIfNeeded(min_height=big, min_width=big, border_mode=cv2.BORDER_CONSTANT)(image=out)["image"]
        assert out.shape[:2] == (big, big)
        hy, hx = hole_yx[0] + CUTOUT_PAD, hole_yx[1] + CUTOUT_PAD
        assert 0 <= hy <= big - HOLE and 0 <= hx <= big - HOLE
        dropout = A.CoarseDropout(num_holes_range=(1, 1), hole_height_range=(HOLE, HOLE),
                                  hole_width_range=(HOLE, HOLE), fill=aug.mean_fill(mean), p=1.0)
        out = dropout.apply(out, holes=np.array([[hx, hy, hx + HOLE, hy + HOLE]]), seed=0)
        out = A.CenterCrop(height=SIDE, width=SIDE)(image=out)["image"]
    return A.Compose([A.Normalize(mean=mean, std=std), ToTensorV2()])(image=out)["image"]


EXPLICIT = [  # (crop_yx, flip, hole_yx, cutout): corners, centre and the borders of each draw
    ((0, 0), False, (0, 0), True),
    ((8, 8), True, (24, 24), True),
    ((0, 8), True, (24, 0), True),
    ((8, 0), False, (0, 24), True),
    ((4, 4), False, (5, 17), False),
    ((3, 7), True, (11, 2), True),
    ((4, 4), True, (0, 0), False),
    ((6, 1), False, (13, 20), True),
    # cut by the border: negative offsets, and past the far edges
    ((2, 5), False, (-3, 10), True),
    ((7, 3), True, (12, -5), True),
    ((4, 4), False, (-7, -7), True),      # one visible pixel
    ((1, 6), True, (29, 27), True),
    ((5, 2), False, (31, -1), True),
    ((0, 0), True, (-4, 30), True),
    # wholly outside: the image is left as it is
    ((4, 4), False, (-8, -8), True),
    ((2, 6), True, (32, 32), True),
    ((8, 3), False, (-8, 12), True),
    ((3, 0), True, (20, 32), True),
    ((6, 6), False, (32, -8), True),
    ((4, 4), False, (-8, 5), False),
]


def test_identical_output_for_identical_explicit_parameters(real_data):
    mean, std = real_data.mean, real_data.std
    images = real_data.train_images[:len(EXPLICIT)]
    params = {"crop_yx": torch.tensor([e[0] for e in EXPLICIT]), "flip": torch.tensor([e[1] for e in EXPLICIT]),
              "hole_yx": torch.tensor([e[2] for e in EXPLICIT]), "cutout": torch.tensor([e[3] for e in EXPLICIT])}
    ba = aug.BatchAugment(mean, std)
    fast = ba.apply(torch.as_tensor(images), params)
    plain = ba.apply(torch.as_tensor(images), {**params, "cutout": torch.zeros(len(EXPLICIT), dtype=torch.bool)})
    fill = np.array(aug.mean_fill(mean), dtype=np.uint8)
    for i, (crop, flip, hole, cutout) in enumerate(EXPLICIT):
        ref = albumentations_equivalent(images[i], mean, std, crop, flip, hole, cutout)
        assert ref.shape == fast[i].shape == (3, SIDE, SIDE)
        assert torch.allclose(fast[i], ref, atol=1e-5), f"case {i}: max diff {(fast[i] - ref).abs().max():.2e}"
        # the hole shows exactly where it meets the image, and nowhere else
        area = visible_area(*hole) if cutout else 0
        got, base = aug.denormalize(fast[i], mean, std), aug.denormalize(plain[i], mean, std)
        changed = np.any(got != base, axis=-1)
        mask = visible(*hole) if cutout else np.zeros((SIDE, SIDE), bool)
        assert np.all(got[mask] == fill) and np.array_equal(got[~mask], base[~mask]), f"case {i}"
        assert changed.sum() == area, f"case {i}: {changed.sum()} pixels changed, {area} expected"
        if area == 0:
            assert torch.allclose(ref, plain[i], atol=1e-6), f"case {i}"   # wholly outside: no change
    areas = [visible_area(*e[2]) for e in EXPLICIT if e[3]]
    assert 0 in areas and 1 in areas and HOLE * HOLE in areas and any(1 < a < HOLE * HOLE for a in areas)
    # and the cases differ from each other, so the comparison has teeth
    assert not torch.allclose(fast[1], albumentations_equivalent(images[1], mean, std, (8, 8), False, (24, 24), True))
    assert not torch.allclose(fast[8], albumentations_equivalent(images[8], mean, std, (2, 5), False, (-2, 10), True))


def applied_params(result):
    """BatchAugment parameters read back from albumentations' record of what it applied.

    The cutout is a Sequential of PadIfNeeded (to 48x48), CoarseDropout and CenterCrop: the
    recorded hole lies in the padded frame, so its corner in the image is CUTOUT_PAD less.
    """
    applied = result["applied_transforms"]
    names = [name for name, _ in applied]
    seen = dict(applied)                  # the crop's PadIfNeeded is shadowed: only names matter
    crop, hole = CENTRE, (0, 0)
    if "RandomCrop" in seen:
        x1, y1, x2, y2 = seen["RandomCrop"]["crop_coords"]
        assert (x2 - x1, y2 - y1) == (SIDE, SIDE)
        crop = (y1, x1)
    assert names.count("CoarseDropout") <= 1
    if "CoarseDropout" in seen:
        i = names.index("CoarseDropout")
        assert names[i - 1:i + 2] == ["PadIfNeeded", "CoarseDropout", "CenterCrop"]
        pad, drop, centre = applied[i - 1][1], applied[i][1], applied[i + 1][1]
        p, big = CUTOUT_PAD, SIDE + 2 * CUTOUT_PAD
        assert (pad["pad_top"], pad["pad_bottom"], pad["pad_left"], pad["pad_right"]) == (p, p, p, p)
        assert drop["shape"][:2] == (big, big)
        assert centre["crop_coords"] == (p, p, p + SIDE, p + SIDE)
        holes = drop["holes"]
        assert holes.shape == (1, 4)
        x1, y1, x2, y2 = (int(v) for v in holes[0])
        assert (x2 - x1, y2 - y1) == (HOLE, HOLE)
        assert 0 <= x1 <= big - HOLE and 0 <= y1 <= big - HOLE
        hole = (y1 - p, x1 - p)
    else:
        assert "CenterCrop" not in seen   # no cutout, no padding to 48x48 either
    return {"crop": "RandomCrop" in seen, "crop_yx": crop, "flip": "HorizontalFlip" in seen,
            "hole_yx": hole, "cutout": "CoarseDropout" in seen}


def run_albumentations(data, n, seed, **probabilities):
    tf = aug.train_transforms(data.mean, data.std, **probabilities)
    tf.save_applied_params = True
    tf.set_random_seed(seed)
    outs, params = [], []
    for img in data.train_images[:n]:
        r = tf(image=img)
        outs.append(r["image"])
        params.append(applied_params(r))
    return torch.stack(outs), params


def as_batch_params(params):
    return {"crop_yx": torch.tensor([p["crop_yx"] for p in params]), "flip": torch.tensor([p["flip"] for p in params]),
            "hole_yx": torch.tensor([p["hole_yx"] for p in params]), "cutout": torch.tensor([p["cutout"] for p in params])}


def test_albumentations_train_pipeline_output_is_reproduced_from_its_own_draws(real_data):
    """The real train_transforms on real images; its recorded draws fed to BatchAugment.apply."""
    n = 256
    ref, params = run_albumentations(real_data, n, seed=7)
    assert {p["flip"] for p in params} == {True, False} and {p["cutout"] for p in params} == {True, False}
    fast = aug.BatchAugment(real_data.mean, real_data.std).apply(
        torch.as_tensor(real_data.train_images[:n]), as_batch_params(params))
    diff = (fast - ref).abs().amax((1, 2, 3))
    assert diff.max() < 1e-5, f"{int((diff >= 1e-5).sum())} of {n} images differ, worst {diff.max():.2e}"


def test_albumentations_and_batch_augment_draw_with_the_same_probabilities(real_data):
    n = 3000
    _, alb = run_albumentations(real_data, n, seed=11)
    fast = aug.BatchAugment(real_data.mean, real_data.std).sample(n, "cpu", gen(11))
    rates = {
        "flip": (sum(p["flip"] for p in alb), int(fast["flip"].sum())),
        "cutout": (sum(p["cutout"] for p in alb), int(fast["cutout"].sum())),
        "moved": (sum(p["crop_yx"] != CENTRE for p in alb),
                  int((fast["crop_yx"] != torch.tensor(CENTRE)).any(1).sum())),
    }
    expected = {"flip": 0.5, "cutout": 0.5, "moved": 0.5 * 80 / 81}
    for name, (a, b) in rates.items():
        assert binomial_ok(a, n, expected[name]), (name, a / n)
        assert binomial_ok(b, n, expected[name]), (name, b / n)
        # the difference of two such rates has sd sqrt(2 p (1-p) / n)
        p = expected[name]
        assert abs(a - b) / n <= 5 * np.sqrt(2 * p * (1 - p) / n), (name, a / n, b / n)
    assert binomial_ok(sum(p["crop"] for p in alb), n, 0.5)   # albumentations records the crop itself
    # albumentations' own draws have the ranges BatchAugment uses
    crops = np.array([p["crop_yx"] for p in alb if p["crop"]])
    holes = np.array([p["hole_yx"] for p in alb if p["cutout"]])
    assert crops.min() == 0 and crops.max() == 2 * PAD
    assert holes.min() == HOLE_LO and holes.max() == HOLE_HI            # -8 and 32, as BatchAugment
    counts = np.bincount(crops[:, 0] * 9 + crops[:, 1], minlength=81)
    assert chi_square(counts) < 160, counts.reshape(9, 9)   # uniform over 9x9 there too
    fast_holes = fast["hole_yx"][fast["cutout"]].numpy()
    assert fast_holes.min() == HOLE_LO and fast_holes.max() == HOLE_HI
    for axis in (0, 1):   # both uniform over the 41 corners of each axis (40 degrees of freedom)
        per = np.bincount(holes[:, axis] - HOLE_LO, minlength=HOLE_POSITIONS)
        assert per.size == HOLE_POSITIONS and chi_square(per) < 100, per
        # and the same distribution: a two-sample chi-square on the 41 x 2 table, 40 dof
        other = np.bincount(fast_holes[:, axis] - HOLE_LO, minlength=HOLE_POSITIONS)
        table = np.stack([per, other]).astype(float)
        expected = table.sum(1, keepdims=True) * table.sum(0, keepdims=True) / table.sum()
        assert ((table - expected) ** 2 / expected).sum() < 100, table
    # as often wholly inside, clipped by the border, and missing the image
    a_kinds, b_kinds = hole_kinds(holes), hole_kinds(fast_holes)
    na, nb = len(holes), len(fast_holes)
    for kind, p in (("inside", P_HOLE_INSIDE), ("clipped", P_HOLE_CLIPPED), ("outside", P_HOLE_OUTSIDE)):
        assert binomial_ok(a_kinds[kind], na, p), (kind, a_kinds)
        assert binomial_ok(b_kinds[kind], nb, p), (kind, b_kinds)
        assert abs(a_kinds[kind] / na - b_kinds[kind] / nb) <= 5 * np.sqrt(p * (1 - p) * (1 / na + 1 / nb))


# ----------------------------------------------------------------------------------------
# DeviceLoader
# ----------------------------------------------------------------------------------------
def collect(loader, epoch):
    loader.set_epoch(epoch)
    xs, ys = zip(*loader)
    return torch.cat(xs), torch.cat(ys)


def test_device_loader_yields_every_image_once_per_epoch(small_data):
    images = small_data.train_images                     # 1,000 real images
    ids = np.arange(len(images))                         # labels = the image's index
    loader = DeviceLoader(images, ids, 96, stats=(small_data.mean, small_data.std), device="cpu", augment="none",
                          seed=4)
    assert len(loader) == -(-len(images) // 96)
    for epoch in (0, 1):
        x, y = collect(loader, epoch)
        assert sorted(y.tolist()) == ids.tolist()        # each exactly once
        assert torch.allclose(x, normalised(images[y.numpy()], small_data.mean, small_data.std), atol=1e-6)


def test_device_loader_epochs_are_reproducible_and_differ(small_data):
    images, labels = small_data.train_images[:512], np.arange(512)

    def loader(seed=0):
        return DeviceLoader(images, labels, 128, stats=(small_data.mean, small_data.std), device="cpu", seed=seed)

    a_x, a_y = collect(loader(), 2)
    b_x, b_y = collect(loader(), 2)                      # a fresh loader, same seed and epoch
    assert torch.equal(a_y, b_y) and torch.equal(a_x, b_x)
    c_x, c_y = collect(loader(), 3)
    assert not torch.equal(a_y, c_y)                     # another order
    order = torch.argsort(a_y), torch.argsort(c_y)
    assert not torch.allclose(a_x[order[0]], c_x[order[1]])   # and other augmentations
    d_x, d_y = collect(loader(seed=1), 2)
    assert not torch.equal(a_y, d_y)
    again = loader()
    collect(again, 5)
    e_x, e_y = collect(again, 2)                         # back to epoch 2 after another epoch
    assert torch.equal(a_x, e_x) and torch.equal(a_y, e_y)


def test_device_loader_without_augmentation_is_normalised(real_data):
    loader = DeviceLoader(real_data.train_images, real_data.train_labels, 5000,
                          stats=(real_data.mean, real_data.std), device="cpu", augment="none")
    total, total_sq, n = torch.zeros(3, dtype=torch.float64), torch.zeros(3, dtype=torch.float64), 0
    for x, _ in loader:
        total += x.sum((0, 2, 3)).double()
        total_sq += (x * x).sum((0, 2, 3)).double()
        n += x.shape[0] * x.shape[2] * x.shape[3]
    mean, std = total / n, (total_sq / n - (total / n) ** 2).sqrt()
    assert mean.abs().max() < 1e-4, mean
    assert (std - 1).abs().max() < 1e-3, std
    assert n == 50_000 * 32 * 32


def test_build_loaders_makes_the_device_loader_where_the_options_ask_for_it(small_data):
    from helpers.config import recipe

    r = recipe("resnet9", batch_size=100, seed=9)
    fast = build_loaders(r, small_data, hardware.RunOptions(device="cpu", fast_augment=True))[0]
    plain = build_loaders(r, small_data, hardware.RunOptions(device="cpu"))[0]
    assert isinstance(fast, DeviceLoader) and not isinstance(plain, DeviceLoader)
    assert (fast.batch_size, fast.seed, len(fast)) == (100, 9, len(plain))
    x, y = collect(fast, 0)
    assert x.shape == (1000, 3, 32, 32) and sorted(y.tolist()) == sorted(small_data.train_labels.tolist())
    with pytest.raises(Exception, match="crop-flip-cutout"):          # seed 004's pipeline has no twin
        build_loaders(r.replace(augment="flip-shift-rotate"), small_data, hardware.RunOptions(device="cpu", fast_augment=True))


# ----------------------------------------------------------------------------------------
# fit on build_loaders(..., RunOptions(fast_augment=True)) end to end
# ----------------------------------------------------------------------------------------
def test_fit_with_fast_augment_trains_a_small_model(small_data, monkeypatch):
    from helpers.config import recipe

    data = small_data.subset(20, 10)                     # 200 train, 100 test real images
    calls = []
    original = aug.BatchAugment.apply
    monkeypatch.setattr(aug.BatchAugment, "apply", lambda self, x, params: calls.append(len(x)) or original(self, x, params))
    options = hardware.RunOptions(device="cpu", fast_augment=True, progress=False)

    def run():
        hardware.seed_everything(0)
        model = get_model("compact")
        r = recipe("compact", augment="crop-flip-cutout", batch_size=64, test_batch_size=100, val_split=0.0, seed=0)
        train, _, test = build_loaders(r, data, options)
        before = [p.detach().clone() for p in model.parameters()]
        opt = optim.make_optimizer("adam", model.parameters(), 2e-3)
        history = engine.fit(model, train, test, optimizer=opt, epochs=1, options=options)
        moved = any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
        return history, moved

    history, moved = run()
    assert calls == [64, 64, 64, 8]                       # every batch went through BatchAugment
    assert moved
    assert len(history["train_loss"]) == len(history["eval_acc"]) == 1 and len(history["lr"]) == 4
    assert np.isfinite(history["train_loss"][0]) and 0 <= history["eval_acc"][0] <= 1
    again, _ = run()
    assert again["train_loss"] == history["train_loss"] and again["eval_acc"] == history["eval_acc"]


def test_device_loader_pads_ranks_to_equal_length_like_distributed_sampler():
    """With 3 ranks and 10 images every rank must run the same number of steps (DDP would
    hang otherwise), and together they cover every image."""
    images = np.zeros((10, 32, 32, 3), np.uint8)
    labels = np.arange(10)
    ranks = [DeviceLoader(images, labels, 2, stats=((0.5,) * 3, (0.25,) * 3), device="cpu", augment="none", seed=1,
                          shard=(r, 3)) for r in range(3)]
    seen = []
    for loader in ranks:
        loader.set_epoch(4)
        batches = [y for _, y in loader]
        assert len(batches) == len(loader) == 2
        seen += torch.cat(batches).tolist()
    assert len(seen) == 12 and set(seen) == set(range(10))
