"""Your own images: any image file read as a 32x32 RGB array, with a note for every change,
and CIFAR-10's standard statistics for checkpoints that record none. `python -m helpers predict`
reads its files with these.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .errors import ImageError

# The mean/std of the original CIFAR-10 training set: what `predict` normalises with when a
# checkpoint records no statistics (the checkpoints `python -m helpers train` writes always do).
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
MODE_NAMES = {"L": "greyscale", "1": "black-and-white", "I": "greyscale", "I;16": "greyscale",
              "P": "palette", "CMYK": "CMYK"}


def read_image(path) -> tuple[np.ndarray, list[str]]:
    """A file as a 32x32 RGB uint8 array, plus notes on what was changed to get there.
    A missing, folder or unreadable file raises ImageError."""
    from PIL import Image, ImageOps

    if "://" in str(path):
        raise ImageError(f"{path} is an address, not a file: download it first (e.g. curl -O {path}) "
                         "and pass the file")
    p = Path(path).expanduser()
    if not p.is_file():
        what = "is a folder" if p.is_dir() else "does not exist"
        raise ImageError(f"{p} {what}: pass image files (PNG, JPEG, ...)")
    try:
        with Image.open(p) as im:
            im.load()
            return _to_rgb32(ImageOps.exif_transpose(im))
    except OSError as e:
        if e.errno is not None:               # the file system refused, not the image format
            raise ImageError(f"cannot read {p} ({e.strerror}): check its permissions") from e
        raise ImageError(f"{p} is not a readable image ({type(e).__name__}): pass PNG, JPEG or "
                         "other image files") from e
    except (SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise ImageError(f"{p} is not a readable image ({type(e).__name__}): pass PNG, JPEG or "
                         "other image files") from e


def read_images(paths) -> tuple[np.ndarray, list[str]]:
    """Every file as 32x32 RGB, stacked (N, 32, 32, 3), and the notes as 'path: note' lines;
    the first file that cannot be read raises ImageError."""
    images, notes = [], []
    for path in paths:
        image, changes = read_image(path)
        images.append(image)
        notes += [f"{path}: {change}" for change in changes]
    return np.stack(images), notes


def _to_rgb32(im) -> tuple[np.ndarray, list[str]]:
    """A PIL image as 32x32 RGB (transparency on white), with a note for every change."""
    from PIL import Image

    notes = []
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        im = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
        notes.append("converted RGBA to RGB on a white background")
    elif im.mode != "RGB":
        notes.append(f"converted {MODE_NAMES.get(im.mode, im.mode)} ({im.mode}) to RGB")
        im = im.convert("RGB")
    if im.size != (32, 32):
        notes.append(f"resized {im.size[0]}x{im.size[1]} to 32x32 (the models see 32x32 images)")
        im = im.resize((32, 32), Image.Resampling.LANCZOS)
    return np.asarray(im, dtype=np.uint8), notes
