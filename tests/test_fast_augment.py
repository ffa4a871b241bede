"""The fast path (helpers.augment.BatchAugment, helpers.data.DeviceLoader) against seed 001's
albumentations pipeline: the same distributions, the same pixels for the same parameters,
and a DeviceLoader that feeds every image once per epoch, reproducibly. CPU only.

Every random draw here comes from a seeded generator, so each run sees the same numbers;
the statistical bounds are still wide (about 5 sigma) so that a change of seed cannot fail.
"""
import os

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import albumentations as A  # noqa: E402
import cv2  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from albumentations.pytorch import ToTensorV2  # noqa: E402

from helpers import augment as aug  # noqa: E402
from helpers import engine  # noqa: E402
from helpers.data import DeviceLoader, make_loader  # noqa: E402
from helpers.models import get_model  # noqa: E402

PAD, HOLE, SIDE = aug.PAD, aug.HOLE, 32
CENTRE = (PAD, PAD)


def gen(seed):
    return torch.Generator().manual_seed(seed)


def binomial_ok(count, n, p, sigmas=5.0):
    return abs(count - n * p) <= sigmas * np.sqrt(n * p * (1 - p))


def chi_square(counts):
    expected = counts.sum() / counts.size
    return float(((counts - expected) ** 2 / expected).sum())


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


def test_one_mean_filled_8x8_hole_wholly_inside_real_images(real_data):
    ba = aug.BatchAugment(real_data.mean, real_data.std, crop_p=0.0, flip_p=0.0, cutout_p=1.0)
    images = real_data.train_images[:1024]
    params = ba.sample(len(images), "cpu", gen(3))
    out = ba.apply(torch.as_tensor(images), params)
    raw = aug.denormalize(out, real_data.mean, real_data.std)            # back to uint8 NHWC
    fill = np.array(aug.mean_fill(real_data.mean), dtype=np.uint8)
    assert np.abs(fill - np.array(real_data.mean) * 255).max() <= 0.5       # the mean pixel, rounded
    hole = params["hole_yx"].numpy()
    assert hole.min() == 0 and hole.max() == SIDE - HOLE               # reaches both borders, never crosses
    for i, (y, x) in enumerate(hole):
        inside = np.zeros((SIDE, SIDE), bool)
        inside[y:y + HOLE, x:x + HOLE] = True
        assert inside.sum() == HOLE * HOLE                            # wholly inside the image
        assert np.all(raw[i][inside] == fill)                         # the whole square is the mean pixel
        assert np.array_equal(raw[i][~inside], images[i][~inside])    # nothing else changed
    changed = np.any(raw != images, axis=-1)                           # (N, 32, 32)
    assert changed.any((1, 2)).mean() > 0.99                          # real pixels rarely equal the fill
    spans = [(np.ptp(np.nonzero(changed[i].any(1))[0]), np.ptp(np.nonzero(changed[i].any(0))[0]))
             for i in range(len(images)) if changed[i].any()]
    assert max(max(s) for s in spans) <= HOLE - 1                     # exactly one hole, no larger


# ----------------------------------------------------------------------------------------
# The same pixels as albumentations for the same parameters
# ----------------------------------------------------------------------------------------
def albumentations_equivalent(img, mean, std, crop_yx, flip, hole_yx, cutout):
    """seed 001's pipeline with every random choice fixed, from albumentations' own transforms."""
    cy, cx = crop_yx
    geometric = [A.PadIfNeeded(min_height=SIDE + 2 * PAD, min_width=SIDE + 2 * PAD,
                               border_mode=cv2.BORDER_REFLECT_101),
                 A.Crop(x_min=cx, y_min=cy, x_max=cx + SIDE, y_max=cy + SIDE)]
    if flip:
        geometric.append(A.HorizontalFlip(p=1.0))
    out = A.Compose(geometric)(image=img)["image"]
    if cutout:
        hy, hx = hole_yx
        dropout = A.CoarseDropout(num_holes_range=(1, 1), hole_height_range=(HOLE, HOLE),
                                  hole_width_range=(HOLE, HOLE), fill=aug.mean_fill(mean), p=1.0)
        out = dropout.apply(out, holes=np.array([[hx, hy, hx + HOLE, hy + HOLE]]), seed=0)
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
]


def test_identical_output_for_identical_explicit_parameters(real_data):
    mean, std = real_data.mean, real_data.std
    images = real_data.train_images[:len(EXPLICIT)]
    params = {"crop_yx": torch.tensor([e[0] for e in EXPLICIT]), "flip": torch.tensor([e[1] for e in EXPLICIT]),
              "hole_yx": torch.tensor([e[2] for e in EXPLICIT]), "cutout": torch.tensor([e[3] for e in EXPLICIT])}
    fast = aug.BatchAugment(mean, std).apply(torch.as_tensor(images), params)
    for i, (crop, flip, hole, cutout) in enumerate(EXPLICIT):
        ref = albumentations_equivalent(images[i], mean, std, crop, flip, hole, cutout)
        assert ref.shape == fast[i].shape == (3, SIDE, SIDE)
        assert torch.allclose(fast[i], ref, atol=1e-5), f"case {i}: max diff {(fast[i] - ref).abs().max():.2e}"
    # and the cases differ from each other, so the comparison has teeth
    assert not torch.allclose(fast[1], albumentations_equivalent(images[1], mean, std, (8, 8), False, (24, 24), True))


def applied_params(result):
    """BatchAugment parameters read back from albumentations' record of what it applied."""
    seen = dict(result["applied_transforms"])
    crop, hole = CENTRE, (0, 0)
    if "RandomCrop" in seen:
        x1, y1, x2, y2 = seen["RandomCrop"]["crop_coords"]
        assert (x2 - x1, y2 - y1) == (SIDE, SIDE)
        crop = (y1, x1)
    if "CoarseDropout" in seen:
        holes = seen["CoarseDropout"]["holes"]
        assert holes.shape == (1, 4)
        x1, y1, x2, y2 = (int(v) for v in holes[0])
        assert (x2 - x1, y2 - y1) == (HOLE, HOLE)
        hole = (y1, x1)
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
    assert holes.min() == 0 and holes.max() == SIDE - HOLE
    counts = np.bincount(crops[:, 0] * 9 + crops[:, 1], minlength=81)
    assert chi_square(counts) < 160, counts.reshape(9, 9)   # uniform over 9x9 there too


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
    loader = DeviceLoader(images, ids, 96, small_data.mean, small_data.std, "cpu", augment="none", seed=4)
    assert len(loader) == -(-len(images) // 96)
    for epoch in (0, 1):
        x, y = collect(loader, epoch)
        assert sorted(y.tolist()) == ids.tolist()        # each exactly once
        assert torch.allclose(x, normalised(images[y.numpy()], small_data.mean, small_data.std), atol=1e-6)
    assert len(DeviceLoader(images, ids, 96, small_data.mean, small_data.std, "cpu", drop_last=True)) == len(images) // 96
    x, y = collect(DeviceLoader(images, ids, 96, small_data.mean, small_data.std, "cpu", drop_last=True), 0)
    assert len(set(y.tolist())) == len(y) == (len(images) // 96) * 96


def test_device_loader_epochs_are_reproducible_and_differ(small_data):
    images, labels = small_data.train_images[:512], np.arange(512)

    def loader(seed=0):
        return DeviceLoader(images, labels, 128, small_data.mean, small_data.std, "cpu", seed=seed)

    a_x, a_y = collect(loader(), 2)
    b_x, b_y = collect(loader(), 2)                      # a fresh loader, same seed and epoch
    assert torch.equal(a_y, b_y) and torch.equal(a_x, b_x)
    c_x, c_y = collect(loader(), 3)
    assert not torch.equal(a_y, c_y)                     # another order
    order = torch.argsort(a_y), torch.argsort(c_y)
    assert not torch.allclose(a_x[order[0]], c_x[order[1]])   # and other augmentations
    fixed = DeviceLoader(images, labels, 128, small_data.mean, small_data.std, "cpu", shuffle=False)
    f2, f3 = collect(fixed, 2), collect(fixed, 3)
    assert torch.equal(f2[1], f3[1]) and not torch.allclose(f2[0], f3[0])  # same order, new augmentations
    d_x, d_y = collect(loader(seed=1), 2)
    assert not torch.equal(a_y, d_y)
    again = loader()
    collect(again, 5)
    e_x, e_y = collect(again, 2)                         # back to epoch 2 after another epoch
    assert torch.equal(a_x, e_x) and torch.equal(a_y, e_y)


def test_device_loader_without_augmentation_is_normalised(real_data):
    loader = DeviceLoader(real_data.train_images, real_data.train_labels, 5000, real_data.mean,
                          real_data.std, "cpu", augment="none", shuffle=False)
    total, total_sq, n = torch.zeros(3, dtype=torch.float64), torch.zeros(3, dtype=torch.float64), 0
    for x, _ in loader:
        total += x.sum((0, 2, 3)).double()
        total_sq += (x * x).sum((0, 2, 3)).double()
        n += x.shape[0] * x.shape[2] * x.shape[3]
    mean, std = total / n, (total_sq / n - (total / n) ** 2).sqrt()
    assert mean.abs().max() < 1e-4, mean
    assert (std - 1).abs().max() < 1e-3, std
    assert n == 50_000 * 32 * 32


def test_device_loader_from_a_training_loader_keeps_its_settings(small_data):
    spec = {"name": "seed001", "mean": small_data.mean, "std": small_data.std}
    train = make_loader(small_data.train_images, small_data.train_labels,
                        aug.train_transforms(small_data.mean, small_data.std), batch_size=100,
                        shuffle=True, seed=9, drop_last=True, recipe=spec)
    fast = DeviceLoader.from_loader(train, "cpu")
    assert (fast.batch_size, fast.seed, fast.drop_last, len(fast)) == (100, 9, True, len(train))
    x, y = collect(fast, 0)
    assert x.shape == (1000, 3, 32, 32) and sorted(y.tolist()) == sorted(small_data.train_labels.tolist())
    spec["name"] = "seed004"
    with pytest.raises(Exception, match="seed001"):
        DeviceLoader.from_loader(make_loader(small_data.train_images, small_data.train_labels,
                                             batch_size=100, recipe=spec), "cpu")


# ----------------------------------------------------------------------------------------
# fit(..., fast_augment=True) end to end
# ----------------------------------------------------------------------------------------
def test_fit_with_fast_augment_trains_a_small_model(small_data, monkeypatch):
    data = small_data.subset(20, 10)                     # 200 train, 100 test real images
    spec = {"name": "seed001", "mean": data.mean, "std": data.std}
    calls = []
    original = aug.BatchAugment.__call__
    monkeypatch.setattr(aug.BatchAugment, "__call__", lambda self, x, g=None: calls.append(len(x)) or original(self, x, g))

    def run():
        engine.seed_everything(0)
        model = get_model("compact")
        train = make_loader(data.train_images, data.train_labels,
                            aug.train_transforms(data.mean, data.std), batch_size=64, shuffle=True, recipe=spec)
        test = make_loader(data.test_images, data.test_labels, aug.test_transforms(data.mean, data.std),
                           batch_size=100)
        before = [p.detach().clone() for p in model.parameters()]
        opt = engine.make_optimizer("adam", model.parameters(), 2e-3)
        history = engine.fit(model, train, test, opt, epochs=1, device="cpu", fast_augment=True, progress=False)
        moved = any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
        return history, moved

    history, moved = run()
    assert calls == [64, 64, 64, 8]                       # every batch went through BatchAugment
    assert moved
    assert len(history["train_loss"]) == len(history["test_acc"]) == 1 and len(history["lr"]) == 4
    assert np.isfinite(history["train_loss"][0]) and 0 <= history["test_acc"][0] <= 1
    again, _ = run()
    assert again["train_loss"] == history["train_loss"] and again["test_acc"] == history["test_acc"]


def test_device_loader_pads_ranks_to_equal_length_like_distributed_sampler():
    """With 3 ranks and 10 images every rank must run the same number of steps (DDP would
    hang otherwise), and together they cover every image."""
    images = np.zeros((10, 32, 32, 3), np.uint8)
    labels = np.arange(10)
    ranks = [DeviceLoader(images, labels, 2, (0.5,) * 3, (0.25,) * 3, "cpu", augment="none", seed=1,
                          rank=r, world_size=3) for r in range(3)]
    seen = []
    for loader in ranks:
        loader.set_epoch(4)
        batches = [y for _, y in loader]
        assert len(batches) == len(loader) == 2
        seen += torch.cat(batches).tolist()
    assert len(seen) == 12 and set(seen) == set(range(10))
