"""Augmentation: the reference systems' pipelines in albumentations 2.0.8, and S10's on GPU batches.

S10 (train):       pad to 40x40 (reflect) -> RandomCrop 32x32 -> HorizontalFlip
                   -> pad to 48x48 -> CoarseDropout, one 8x8 hole filled with the dataset
                      mean -> CentreCrop 32x32 (so the hole may be cut by the border,
                      or fall wholly outside the image)
                   -> Normalize(mean, std) -> ToTensorV2
Keras CNN (train): HorizontalFlip + slight shift + rotation up to 17 degrees -> Normalize
flip-translate:    S10's pad-crop (pad 2, every image) and flip, no cutout (the fast recipe)
altflip-translate: the same, but each image mirrored on alternate epochs (airbench94): a random
                   half in epoch 0, the other half in epoch 1, and so on; on the device only
Test:              Normalize -> ToTensorV2

Default probabilities follow S10: the pad-and-crop, the flip and the cutout each
happen to half of the images. `BatchAugment` does S10's transforms (and so also
flip-translate) on whole uint8 batches already on the training device, drawing the same
distributions.
"""
from __future__ import annotations

import functools
import os
import random

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # no network check, nothing on stderr

import albumentations as A  # noqa: E402
import cv2  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from albumentations.pytorch import ToTensorV2  # noqa: E402

from .errors import ConfigError, require_probability  # noqa: E402

# ----------------------------------------------------------------------------------------
# Defaults (S10)
# ----------------------------------------------------------------------------------------
PAD = 4            # 32 + 2*4 = 40, then a random 32x32 crop: 9x9 possible offsets
HOLE = 8           # one 8x8 cutout hole ...
CUTOUT_PAD = 8     # ... cut in the image padded to 48x48, then centre-cropped back to 32x32:
                   # its top-left corner is uniform over -8..32, so it can overlap the border
CROP_P = 0.5       # S10: "RandomCrop is applied on half of the images"
FLIP_P = 0.5
CUTOUT_P = 0.5     # S10: "CoarseDropout is applied on half of the images"
SHIFT = 0.1        # the Keras CNN: "slight" width/height shift, as a fraction of the side
ROTATE = 17        # the Keras CNN: rotation range in degrees


def _check_stats(mean, std) -> None:
    if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
        raise ConfigError(f"mean and std need 3 channel values with std > 0, got {mean}, {std}")


def mean_fill(mean) -> tuple[int, int, int]:
    """The dataset mean as a uint8 pixel: what the cutout hole is filled with."""
    return tuple(int(round(m * 255)) for m in mean)


# ----------------------------------------------------------------------------------------
# albumentations pipelines (2.x argument names: wrong names are only warned about)
# ----------------------------------------------------------------------------------------
def _check_settings(mean, std, crop_p, flip_p, cutout_p, pad, hole, cutout_pad) -> None:
    """S10's pipeline's settings, as train_transforms and BatchAugment take them, checked."""
    _check_stats(mean, std)
    for name, p in (("crop_p", crop_p), ("flip_p", flip_p), ("cutout_p", cutout_p)):
        require_probability(name, p)
    if not 0 < hole <= 32 or pad < 0 or cutout_pad < 0:
        raise ConfigError(f"hole must be in 1..32, pad and cutout_pad >= 0, got hole={hole}, "
                          f"pad={pad}, cutout_pad={cutout_pad}: S10's are {HOLE}, {PAD} and {CUTOUT_PAD}")


def train_transforms(mean, std, *, crop_p: float = CROP_P, flip_p: float = FLIP_P,
                     cutout_p: float = CUTOUT_P, pad: int = PAD, hole: int = HOLE,
                     cutout_pad: int = CUTOUT_PAD) -> A.Compose:
    """S10's training pipeline; returns a CHW float tensor."""
    _check_settings(mean, std, crop_p, flip_p, cutout_p, pad, hole, cutout_pad)
    side = 32 + 2 * cutout_pad
    return A.Compose([
        A.Sequential([
            A.PadIfNeeded(min_height=32 + 2 * pad, min_width=32 + 2 * pad,
                          border_mode=cv2.BORDER_REFLECT_101),
            A.RandomCrop(height=32, width=32),
        ], p=crop_p),
        A.HorizontalFlip(p=flip_p),
        A.Sequential([   # the padding's value never matters: the centre crop removes it again
            A.PadIfNeeded(min_height=side, min_width=side, border_mode=cv2.BORDER_CONSTANT),
            A.CoarseDropout(num_holes_range=(1, 1), hole_height_range=(hole, hole),
                            hole_width_range=(hole, hole), fill=mean_fill(mean), p=1.0),
            A.CenterCrop(height=32, width=32),
        ], p=cutout_p),
        A.Normalize(mean=mean, std=std),
        ToTensorV2(),
    ])


def test_transforms(mean, std) -> A.Compose:
    """Normalize with the training set's statistics, then a CHW float tensor."""
    _check_stats(mean, std)
    return A.Compose([A.Normalize(mean=mean, std=std), ToTensorV2()])


test_transforms.__test__ = False  # a pipeline for the test split, not a pytest test


def flip_shift_rotate_transforms(mean, std, *, flip_p: float = FLIP_P, shift: float = SHIFT,
                                 rotate: float = ROTATE, affine_p: float = 1.0) -> A.Compose:
    """The Keras CNN's ImageDataGenerator: flip, slight shift, rotation up to 17 degrees.

    Keras fills uncovered pixels with the nearest edge pixel ('nearest'), here BORDER_REPLICATE.
    """
    _check_stats(mean, std)
    require_probability("flip_p", flip_p)
    require_probability("affine_p", affine_p)
    if not 0 <= shift < 0.5 or not 0 <= rotate <= 180:
        raise ConfigError(f"shift must be in [0, 0.5) and rotate in [0, 180], got {shift}, {rotate}")
    return A.Compose([
        A.HorizontalFlip(p=flip_p),
        A.Affine(translate_percent={"x": (-shift, shift), "y": (-shift, shift)},
                 rotate=(-rotate, rotate), border_mode=cv2.BORDER_REPLICATE, p=affine_p),
        A.Normalize(mean=mean, std=std),
        ToTensorV2(),
    ])


# The pipelines made of S10's transforms, by name, with their settings: what
# train_transforms and, on the device, BatchAugment run. flip-translate (the fast recipe): a
# flip, and a shift of up to 2 pixels on every image (reflect-padded to 36x36, then a random
# 32x32 crop); no cutout.
# altflip-translate: the same shifts; which images are mirrored alternates epoch by epoch, which
# only helpers.loaders.DeviceLoader (it knows each image and the epoch) can do.
PRESETS = {"crop-flip-cutout": {}, "flip-translate": {"crop_p": 1.0, "pad": 2, "cutout_p": 0.0},
           "altflip-translate": {"crop_p": 1.0, "pad": 2, "cutout_p": 0.0, "alternate_flips": True}}


def _device_only(mean, std, **options):
    raise ConfigError("altflip-translate mirrors each image on alternate epochs, which only the on-device "
                      "loader does: add --fast-augment (or use flip-translate)")


AUGMENTATIONS = {"crop-flip-cutout": train_transforms, "flip-shift-rotate": flip_shift_rotate_transforms,
                 "none": test_transforms, "flip-translate": functools.partial(train_transforms, **PRESETS["flip-translate"]),
                 "altflip-translate": _device_only}


def transforms_for(name: str, mean, std, **options) -> A.Compose:
    """The training pipeline called `name` ('crop-flip-cutout', 'flip-shift-rotate', 'flip-translate' or 'none')."""
    if name not in AUGMENTATIONS:
        raise ConfigError(f"unknown augmentation {name!r}: choose {', '.join(AUGMENTATIONS)}")
    return AUGMENTATIONS[name](mean, std, **options)


def batch_augment(name: str, mean, std, **options) -> "BatchAugment":
    """The on-device twin of the pipeline called `name` (one of PRESETS)."""
    if name not in PRESETS:
        raise ConfigError(f"the on-device fast path implements {', '.join(PRESETS)} (or none), not {name!r}: "
                          "drop --fast-augment for this recipe")
    return BatchAugment(mean, std, **{**PRESETS[name], **options})


def denormalize(x, mean, std) -> np.ndarray:
    """Undo Normalize for display: a CHW (or NCHW) tensor -> HWC (or NHWC) uint8 array."""
    t = torch.as_tensor(x).detach().float().cpu()
    m = torch.tensor(mean).view(-1, 1, 1)
    s = torch.tensor(std).view(-1, 1, 1)
    t = (t * s + m).clamp(0, 1).mul(255).round().to(torch.uint8)
    return t.movedim(-3, -1).numpy()


def seed_pipeline(transform: A.Compose, seed: int) -> None:
    """Restart a pipeline's random stream: one generator pair shared by all its transforms.

    (Compose.set_random_seed would give every transform its own generator with the same
    seed, so, for example, the flip and the crop would make their choices in step.)
    """
    seed = int(seed) % 2**32
    transform.set_random_state(np.random.default_rng(seed), random.Random(seed))


def augment_images(transform: A.Compose, images, *, stats: tuple, seed: int = 0) -> np.ndarray:
    """Run a pipeline (ending in Normalize + ToTensorV2 with stats = (mean, std)) over uint8 HWC
    images, reproducibly, and return the results as uint8 HWC images for display."""
    seed_pipeline(transform, seed)
    out = [transform(image=np.ascontiguousarray(img))["image"] for img in images]
    return denormalize(torch.stack([torch.as_tensor(x) for x in out]), *stats)


# ----------------------------------------------------------------------------------------
# The fast path: S10's transforms on whole batches, on the training device
# ----------------------------------------------------------------------------------------
class BatchAugment:
    """Pad-and-crop, flip and one cutout hole for a uint8 batch (N, 32, 32, 3) on any device.

    Each image draws, like the albumentations pipeline: a crop offset uniform over the
    (2*pad+1)^2 positions with probability crop_p (else the centre, i.e. no crop); a flip
    with probability flip_p; with probability cutout_p one hole x hole square filled with
    the mean pixel, its top-left corner uniform over -cutout_pad..32+cutout_pad-hole (image
    coordinates), so that it may be cut by the border or miss the image, as in S10.
    Returns normalised float NCHW. `sample` and `apply` are separate so that tests can
    feed identical parameters to both implementations. With alternate_flips the loader sets
    each batch's flips itself (helpers.loaders.DeviceLoader: image by image, epoch by epoch).
    """

    def __init__(self, mean, std, *, crop_p: float = CROP_P, flip_p: float = FLIP_P,
                 cutout_p: float = CUTOUT_P, pad: int = PAD, hole: int = HOLE,
                 cutout_pad: int = CUTOUT_PAD, alternate_flips: bool = False):
        _check_settings(mean, std, crop_p, flip_p, cutout_p, pad, hole, cutout_pad)
        self.mean, self.std = tuple(mean), tuple(std)
        self.crop_p, self.flip_p, self.cutout_p, self.pad, self.hole = crop_p, flip_p, cutout_p, pad, hole
        self.cutout_pad, self.alternate_flips = cutout_pad, alternate_flips

    def sample(self, n: int, device, generator: torch.Generator | None = None) -> dict:
        def rand(*shape):
            return torch.rand(*shape, device=device, generator=generator)

        def randint(high, *shape):
            return torch.randint(0, high, shape, device=device, generator=generator)

        crop = torch.where((rand(n) < self.crop_p)[:, None], randint(2 * self.pad + 1, n, 2),
                           torch.full((n, 2), self.pad, device=device))
        flip = rand(n) < self.flip_p
        hole_yx = randint(32 + 2 * self.cutout_pad - self.hole + 1, n, 2) - self.cutout_pad
        cutout = rand(n) < self.cutout_p
        return {"crop_yx": crop, "flip": flip, "hole_yx": hole_yx, "cutout": cutout}

    def apply(self, images: torch.Tensor, params: dict) -> torch.Tensor:
        n, dev, p = images.shape[0], images.device, self.pad
        x = images.permute(0, 3, 1, 2).float()                        # N, 3, 32, 32 in 0..255
        if p:
            x = F.pad(x, (p, p, p, p), mode="reflect")                 # == cv2.BORDER_REFLECT_101
        ar = torch.arange(32, device=dev)
        rows = (params["crop_yx"][:, 0:1] + ar)[:, None, :, None]      # N, 1, 32, 1
        cols = (params["crop_yx"][:, 1:2] + ar)[:, None, None, :]      # N, 1, 1, 32
        x = x[torch.arange(n, device=dev)[:, None, None, None],
              torch.arange(3, device=dev)[None, :, None, None], rows, cols]
        x = torch.where(params["flip"][:, None, None, None], x.flip(3), x)
        hy, hx = params["hole_yx"][:, 0:1], params["hole_yx"][:, 1:2]
        in_rows = (ar >= hy) & (ar < hy + self.hole)                   # N, 32
        in_cols = (ar >= hx) & (ar < hx + self.hole)
        hole = in_rows[:, :, None] & in_cols[:, None, :] & params["cutout"][:, None, None]
        fill = torch.tensor(mean_fill(self.mean), device=dev, dtype=x.dtype).view(1, 3, 1, 1)
        x = torch.where(hole[:, None], fill, x)
        return normalize_batch(x, self.mean, self.std)

    def describe(self, params: dict) -> list[str]:
        """One short label per image saying which transforms it received, e.g.
        'crop -3,+1 / flip / hole -5,+20' (offsets in pixels; 'untouched' when none)."""
        labels = []
        for i in range(len(params["flip"])):
            dy, dx = (int(v) - self.pad for v in params["crop_yx"][i])
            hy, hx = (int(v) for v in params["hole_yx"][i])
            visible = -self.hole < hy < 32 and -self.hole < hx < 32
            parts = [f"crop {dy:+d},{dx:+d}" if (dy, dx) != (0, 0) else "",
                     "flip" if params["flip"][i] else "",
                     (f"hole {hy:+d},{hx:+d}" if visible else "hole outside") if params["cutout"][i] else ""]
            labels.append(" / ".join(p for p in parts if p) or "untouched")
        return labels

    def __call__(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        return self.apply(images, self.sample(images.shape[0], images.device, generator))


def normalize_batch(x: torch.Tensor, mean, std) -> torch.Tensor:
    """(x / 255 - mean) / std for a float NCHW batch in 0..255, as A.Normalize does."""
    m = torch.tensor(mean, device=x.device, dtype=torch.float32).view(1, 3, 1, 1)
    s = torch.tensor(std, device=x.device, dtype=torch.float32).view(1, 3, 1, 1)
    return (x.float() / 255 - m) / s
