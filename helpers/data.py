"""Data: load CIFAR-10 from any source, check it and describe it (helpers.loaders feeds it to a model).

Sources, in the order `load_cifar10()` looks for them:
  1. the `root` argument,
  2. the `CIFAR10_DIR` environment variable,
  3. `./data`, downloading torchvision's CIFAR-10 there if needed (what Colab users get).
A root can be torchvision's folder (holding `cifar-10-batches-py/`) or an image-folder tree
`<root>/train/<class>/*.png|jpg` and `<root>/test/<class>/*`. An image-folder tree is
decoded once and cached as arrays (and its mean and std) under the user's cache folder, so
later loads of the full dataset take about a second, most of it checking the files.
"""
from __future__ import annotations

import hashlib
import os
import sys
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np

from . import config
from .errors import ConfigError, DatasetError, require_whole
from .files import _umask

# ----------------------------------------------------------------------------------------
# What CIFAR-10 is
# ----------------------------------------------------------------------------------------
CLASSES = ("airplane", "automobile", "bird", "cat", "deer",
           "dog", "frog", "horse", "ship", "truck")          # label order 0..9
FULL_COUNTS = {"train": 50_000, "test": 10_000}
IMAGE_SHAPE = (32, 32, 3)
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp"}
HINT = "set CIFAR10_DIR to a local copy (a torchvision CIFAR-10 folder or a train/<class>, test/<class> image tree)"


@dataclass
class CIFAR10Data:
    """The images as uint8 arrays (N, 32, 32, 3), integer labels, and the class names."""

    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    classes: tuple = CLASSES
    source: str = ""

    @cached_property
    def stats(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """Per-channel (mean, std) of the training images, on the 0..1 scale."""
        return channel_stats(self.train_images)

    @property
    def mean(self) -> tuple[float, ...]:
        return self.stats[0]

    @property
    def std(self) -> tuple[float, ...]:
        return self.stats[1]

    def subset(self, train_per_class: int, test_per_class: int, seed: int = 0) -> "CIFAR10Data":
        """A seeded, stratified subset: `train_per_class` and `test_per_class` images per class.

        The mean and std stay those of the full training set.
        """
        tr = stratified_indices(self.train_labels, train_per_class, seed)
        te = stratified_indices(self.test_labels, test_per_class, seed)
        sub = CIFAR10Data(self.train_images[tr], self.train_labels[tr],
                          self.test_images[te], self.test_labels[te], self.classes,
                          f"{self.source} (subset {train_per_class}+{test_per_class} per class, seed {seed})")
        sub.__dict__["stats"] = self.stats
        return sub

    def validation_subset(self, train_per_class: int, val_per_class: int, seed: int = 0) -> "CIFAR10Data":
        """Two disjoint, seeded, stratified samples of the *training* images: `train_per_class`
        to train on and `val_per_class` to score on, in the test slots. The test images are
        left out entirely, so that a choice made on this subset never sees them."""
        picked = stratified_indices(self.train_labels, train_per_class + val_per_class, seed)
        rng = np.random.default_rng(seed + 1)
        val = np.sort(np.concatenate([rng.choice(picked[self.train_labels[picked] == c], val_per_class, replace=False)
                                      for c in np.unique(self.train_labels)]))
        tr = np.setdiff1d(picked, val)
        sub = CIFAR10Data(self.train_images[tr], self.train_labels[tr], self.train_images[val],
                          self.train_labels[val], self.classes,
                          f"{self.source} (training images: {train_per_class} per class to train, "
                          f"{val_per_class} per class held out for validation, seed {seed})")
        sub.__dict__["stats"] = self.stats
        return sub

    def smoke_subset(self, seed: int = 0) -> "CIFAR10Data":
        """The small real-data subset that smoke mode (SMOKE_TEST=1) trains on."""
        return self.subset(config.SMOKE_TRAIN_PER_CLASS, config.SMOKE_TEST_PER_CLASS, seed)

    def validation_size(self, fraction: float) -> int:
        """How many images split_validation(fraction) holds out: the same number from every class."""
        return int(round(fraction * len(self.train_labels) / len(self.classes))) * len(self.classes)

    def split_validation(self, fraction: float, seed: int = 0):
        """Split off a stratified validation set: (train_images, train_labels, val_images, val_labels)."""
        n_per_class = self.validation_size(fraction) // len(self.classes)
        if not 0 < n_per_class < len(self.train_labels) // len(self.classes):
            raise ConfigError(f"validation fraction {fraction} leaves no train or no validation images")
        val = stratified_indices(self.train_labels, n_per_class, seed)
        keep = np.setdiff1d(np.arange(len(self.train_labels)), val)
        return (self.train_images[keep], self.train_labels[keep],
                self.train_images[val], self.train_labels[val])

    def counts(self, split: str = "train") -> dict[str, int]:
        """Images per class name in 'train' or 'test'."""
        labels = self.train_labels if split == "train" else self.test_labels
        return {c: int(n) for c, n in zip(self.classes, np.bincount(labels, minlength=len(self.classes)))}


def channel_stats(images: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of uint8 images (N, H, W, C), scaled to 0..1, in float64.
    Read off each channel's histogram of the 256 values: exact, and faster than summing floats."""
    if images.ndim != 4 or len(images) == 0 or images.dtype != np.uint8:
        raise ConfigError(f"expected a non-empty (N, H, W, C) uint8 image array, got shape {images.shape} "
                          f"of {images.dtype}")
    pixels = images.reshape(-1, images.shape[-1])        # one channel at a time, copied contiguous first:
    counts = np.stack([np.bincount(np.ascontiguousarray(pixels[:, c]), minlength=256)   # 2x faster counting
                       for c in range(pixels.shape[1])])
    values = np.arange(256, dtype=np.float64)
    n = images.shape[0] * images.shape[1] * images.shape[2]
    mean = counts @ values / n
    std = np.sqrt(counts @ values ** 2 / n - mean ** 2)
    return tuple(float(m) / 255 for m in mean), tuple(float(s) / 255 for s in std)


def stratified_indices(labels: np.ndarray, n_per_class: int, seed: int = 0) -> np.ndarray:
    """Sorted indices of a seeded random sample of `n_per_class` items from every class."""
    labels = np.asarray(labels)
    require_whole("images per class", int(n_per_class) if isinstance(n_per_class, np.integer) else n_per_class)
    rng = np.random.default_rng(seed)
    picked = []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        if n_per_class > len(idx):
            raise ConfigError(f"asked for {n_per_class} images of class {int(c)} but the data holds "
                              f"only {len(idx)}: ask for at most {len(idx)} per class")
        picked.append(rng.choice(idx, n_per_class, replace=False))
    return np.sort(np.concatenate(picked))


# ----------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------
def load_cifar10(root: str | os.PathLike | None = None, download: bool = True,
                 expect_full: bool = False, cache: bool = True) -> CIFAR10Data:
    """Load CIFAR-10 as uint8 arrays, from `root`, else $CIFAR10_DIR, else ./data (downloading).

    `expect_full=True` also requires the full 50,000 + 10,000 images. Any problem raises
    DatasetError with a one-line message naming the path and how to fix it.
    """
    kind, path = _resolve_source(root, download)
    if kind == "imagefolder":
        data = _load_image_folder(path, cache=cache)
    else:
        data = _load_torchvision(path, download=download)
    _validate(data, path, expect_full)
    data.source = describe_source(root, kind, path)
    return data


def load_data(train_path=None, test_path=None, *, download: bool = False, smoke: bool = False) -> CIFAR10Data:
    """CIFAR-10 for the command line: the train split from `train_path` and the test split from
    `test_path` (each defaulting to the other), else $CIFAR10_DIR, else ./data; the smoke
    subset with smoke=True."""
    for path, flag in ((train_path, "--train_path"), (test_path, "--test_path")):
        if path is not None and not download and not Path(path).expanduser().exists():
            raise DatasetError(f"{flag} {Path(path).expanduser()} does not exist: fix the path or add --download")
    train_root, test_root = train_path or test_path, test_path or train_path
    try:
        data = load_cifar10(train_root, download=download or train_root is None)   # ./data: as load_cifar10 does
        if test_root is not None and Path(test_root).expanduser().resolve() != Path(train_root).expanduser().resolve():
            other = load_cifar10(test_root, download=download)
            data = CIFAR10Data(data.train_images, data.train_labels, other.test_images, other.test_labels,
                               data.classes, f"train: {data.source}; test: {other.source}")
    except DatasetError as e:
        raise DatasetError(str(e).replace("or allow download", "or add --download")) from e
    return data.smoke_subset() if smoke else data


def describe_source(root, kind: str, path: Path) -> str:
    """Where the data came from, as the user named it but never with this machine's folders
    (runinfo.public_path: '/home/me/cifar' is '.../cifar'): '$CIFAR10_DIR (image folder, lossy
    JPEG copy)', 'data (torchvision CIFAR-10)', ..."""
    from .runinfo import public_path

    if root is not None:
        name = public_path(root)
    elif os.environ.get("CIFAR10_DIR"):
        name = "$CIFAR10_DIR"
    else:
        name = str(config.DEFAULT_DATA_DIR)
    if kind == "torchvision":
        return f"{name} (torchvision CIFAR-10)"
    first = next((path / "train").glob("*/*"), None) or next((path / "test").glob("*/*"), None)
    jpeg = first is not None and first.suffix.lower() in {".jpg", ".jpeg"}
    return f"{name} (image folder{', lossy JPEG copy' if jpeg else ''})"


def _resolve_source(root, download: bool) -> tuple[str, Path]:
    from_env = root is None and bool(os.environ.get("CIFAR10_DIR"))
    if root is None:
        root = os.environ.get("CIFAR10_DIR") or config.DEFAULT_DATA_DIR
    path = Path(root).expanduser()
    if (path / "train").is_dir() or (path / "test").is_dir():
        return "imagefolder", path
    if path.name == "cifar-10-batches-py" and path.is_dir():
        return "torchvision", path.parent
    if (path / "cifar-10-batches-py").is_dir():
        return "torchvision", path
    if from_env and not path.exists():
        raise DatasetError(f"CIFAR10_DIR={path} does not exist: point it at a local CIFAR-10 copy")
    if not download:
        what = "does not exist" if not path.exists() else "holds neither train/ and test/ image folders nor cifar-10-batches-py/"
        raise DatasetError(f"dataset folder {path} {what}: {HINT}, or allow download")
    if from_env:
        raise DatasetError(f"CIFAR10_DIR={path} holds neither train/ and test/ image folders "
                           f"nor cifar-10-batches-py/: {HINT}")
    return "torchvision", path


def _load_torchvision(root: Path, download: bool) -> CIFAR10Data:
    from torchvision.datasets import CIFAR10

    batches = root / "cifar-10-batches-py"
    splits = {}
    for split in ("train", "test"):
        try:
            ds = CIFAR10(str(root), train=split == "train", download=False)
        except RuntimeError:
            if not download or batches.exists():
                raise DatasetError(f"CIFAR-10 batches in {batches} are missing or fail their checksum: "
                                   f"delete that folder and download again, or {HINT}") from None
            try:
                ds = CIFAR10(str(root), train=split == "train", download=True)
            except Exception as e:  # URLError, HTTPError, socket errors, checksum after download
                raise DatasetError(f"could not download CIFAR-10 into {root} ({type(e).__name__}: "
                                   f"{str(e)[:80]}); if you are offline, {HINT}") from None
        except Exception as e:  # unreadable pickles
            raise DatasetError(f"cannot read CIFAR-10 batches in {batches} ({type(e).__name__}): "
                               f"delete that folder and download again, or {HINT}") from None
        splits[split] = (np.ascontiguousarray(ds.data, dtype=np.uint8), np.asarray(ds.targets, dtype=np.int64))
        classes = tuple(ds.classes)
    if classes != CLASSES:
        raise DatasetError(f"{batches} names classes {classes}, not CIFAR-10's: {HINT}")
    return CIFAR10Data(*splits["train"], *splits["test"], CLASSES, f"torchvision CIFAR-10 at {root}")


def _list_image_folder(root: Path) -> dict[str, list[list[os.DirEntry]]]:
    """Per split, per class (CIFAR-10 order), the image files, checked for layout. A file-system
    fault on the way (a link that loops or points nowhere, a folder it may not read) is a
    DatasetError naming the entry."""
    try:
        return _scan_image_folder(root)
    except OSError as e:
        raise DatasetError(f"cannot read {e.filename or root} ({e.strerror or e}): fix that entry (a broken or "
                           f"looping link, missing read permission) or copy the dataset again") from e


def _scan_image_folder(root: Path) -> dict[str, list[list[os.DirEntry]]]:
    listing = {}
    for split in ("train", "test"):
        split_dir = root / split
        if not split_dir.is_dir():
            raise DatasetError(f"missing folder {split_dir}: an image-folder copy needs train/ and test/; {HINT}")
        found = sorted(e.name for e in os.scandir(split_dir) if e.is_dir() and not e.name.startswith("."))
        extra = sorted(set(found) - set(CLASSES))
        if extra:
            raise DatasetError(f"unknown class folder {split_dir / extra[0]}: CIFAR-10 has only "
                               f"{', '.join(CLASSES)}; move it out of {split_dir}")
        per_class = []
        for c in CLASSES:
            cdir = split_dir / c
            if not cdir.is_dir():
                raise DatasetError(f"missing class folder {cdir}: the copy is incomplete; copy it again or {HINT}")
            entries = [e for e in os.scandir(cdir)
                       if Path(e.name).suffix.lower() in IMAGE_SUFFIXES and not e.name.startswith(".")]
            dangling = [e for e in entries if e.is_symlink() and not e.is_file()]
            if dangling:
                raise DatasetError(f"{dangling[0].path} is a link to nothing: restore what it points to, remove "
                                   "it, or copy the dataset again")
            files = sorted((e for e in entries if e.is_file()), key=lambda e: e.name)
            if not files:
                raise DatasetError(f"class folder {cdir} holds no .png/.jpg images: copy it again or {HINT}")
            per_class.append(files)
        counts = [len(f) for f in per_class]
        if len(set(counts)) > 1:
            lo = int(np.argmin(counts))
            raise DatasetError(f"partial copy: {split_dir / CLASSES[lo]} has {counts[lo]} images but other "
                               f"classes have up to {max(counts)}; copy the dataset again")
        listing[split] = per_class
    return listing


def _cache_name(root: Path, listing) -> str:
    """imagefolder-<the folder>-<its files' names, sizes and times>: a new version of a dataset
    folder gets a new name, and its cache replaces the old one (the same first part)."""
    h = hashlib.sha256()
    for split, per_class in listing.items():
        for files in per_class:
            for e in files:
                st = e.stat()
                h.update(f"{split}/{e.name}:{st.st_size}:{st.st_mtime_ns};".encode())
    return f"imagefolder-{hashlib.sha256(str(root.resolve()).encode()).hexdigest()[:8]}-{h.hexdigest()[:20]}"


def _decode(path: str) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im.load()
            if im.size != (32, 32) or im.mode != "RGB":
                raise DatasetError(f"{path} is {im.size[0]}x{im.size[1]} {im.mode}, not a 32x32 RGB image: "
                                   "replace it with the original or remove it from every class equally")
            return np.asarray(im, dtype=np.uint8)
    except OSError as e:
        if e.errno is not None:               # the file system refused (permissions, I/O), not the image
            raise DatasetError(f"cannot read image {path} ({e.strerror}): make it readable "
                               "(its permissions, the disk) or copy the dataset again") from e
        raise DatasetError(f"corrupt or truncated image {path} ({type(e).__name__}): "
                           "copy the dataset again") from e
    except (UnidentifiedImageError, SyntaxError, ValueError) as e:
        raise DatasetError(f"corrupt or truncated image {path} ({type(e).__name__}): "
                           "copy the dataset again") from e


def _load_image_folder(root: Path, cache: bool = True) -> CIFAR10Data:
    listing = _list_image_folder(root)
    source = f"image folder {root}"
    try:
        name = _cache_name(root, listing)
    except OSError as e:
        raise DatasetError(f"cannot read {e.filename or root} ({e.strerror or e}): fix that entry or "
                           "copy the dataset again") from e
    folder = config.cache_dir() / name
    if cache and folder.is_dir():
        try:
            return _read_cache(folder, source)
        except Exception as e:                # any damage to the cache: decode again and rewrite it
            print(f"note: the decode cache {folder.name} is unreadable ({type(e).__name__}); "
                  "decoding the images again", file=sys.stderr)
    arrays = {}
    for split, per_class in listing.items():
        paths = [e.path for files in per_class for e in files]
        labels = np.repeat(np.arange(len(CLASSES)), [len(f) for f in per_class]).astype(np.int64)
        images = np.empty((len(paths), *IMAGE_SHAPE), dtype=np.uint8)
        for i, p in enumerate(_progress(paths, f"decoding {split} images")):
            images[i] = _decode(p)
        arrays[f"{split}_images"], arrays[f"{split}_labels"] = images, labels
    data = CIFAR10Data(arrays["train_images"], arrays["train_labels"], arrays["test_images"],
                       arrays["test_labels"], CLASSES, source)
    if cache:
        _save_cache(folder, {**arrays, "stats": np.array(data.stats)})
    return data


def _progress(items, desc: str):
    if len(items) < 5000:
        return items
    from tqdm import tqdm
    return tqdm(items, desc=desc, unit="img", leave=False, file=sys.stderr)


# The decode cache: a folder of .npy files (read in a few hundredths of a second) that holds the
# arrays and the training set's mean and std, written into a temporary folder and renamed into
# place in one step, so that a reader finds a complete cache or none
CACHE_ARRAYS = ("train_images", "train_labels", "test_images", "test_labels", "stats")


def _read_cache(folder: Path, source: str) -> CIFAR10Data:
    a = {name: np.load(folder / f"{name}.npy") for name in CACHE_ARRAYS}
    data = CIFAR10Data(a["train_images"], a["train_labels"], a["test_images"], a["test_labels"], CLASSES, source)
    mean, std = a["stats"]
    data.__dict__["stats"] = (tuple(map(float, mean)), tuple(map(float, std)))   # computed when it was decoded
    return data


def _save_cache(folder: Path, arrays: dict) -> None:
    """Write the arrays into a new folder beside `folder` and rename it into place; a read-only
    cache folder just means no cache. Leftovers of writers killed over 10 minutes ago go first, the
    caches of earlier versions of the same dataset folder (and the old format's .npz files) last."""
    import shutil
    import tempfile
    import time

    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        for old in folder.parent.glob(".imagefolder-*.tmp"):
            if time.time() - old.stat().st_mtime > 600:
                shutil.rmtree(old, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=".tmp", dir=folder.parent))
        os.chmod(tmp, 0o777 & ~_umask())          # what mkdir would give it, not mkdtemp's 0700
    except OSError:
        return
    try:
        for name, array in arrays.items():
            np.save(tmp / f"{name}.npy", array)
        if folder.exists():                   # a damaged cache, being replaced
            shutil.rmtree(folder, ignore_errors=True)
        os.rename(tmp, folder)
    except OSError:                           # the disk is full, or another process got there first
        return
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    for old in folder.parent.glob(folder.name.rsplit("-", 1)[0] + "-*"):     # the same dataset folder
        if old != folder:
            shutil.rmtree(old, ignore_errors=True)
    for old in folder.parent.glob("imagefolder-*.npz"):
        old.unlink(missing_ok=True)


def _validate(data: CIFAR10Data, path: Path, expect_full: bool) -> None:
    for split in ("train", "test"):
        images, labels = getattr(data, f"{split}_images"), getattr(data, f"{split}_labels")
        if images.dtype != np.uint8 or images.shape[1:] != IMAGE_SHAPE:
            raise DatasetError(f"{split} images in {path} have shape {images.shape[1:]} {images.dtype}, "
                               f"not 32x32x3 uint8: {HINT}")
        if len(images) != len(labels) or len(images) == 0:
            raise DatasetError(f"{split} split in {path} has {len(images)} images and {len(labels)} labels: {HINT}")
        if labels.min() < 0 or labels.max() >= len(CLASSES):
            raise DatasetError(f"{split} labels in {path} fall outside 0..9: {HINT}")
        if expect_full and len(images) != FULL_COUNTS[split]:
            raise DatasetError(f"{path} holds {len(images):,} {split} images, not the full "
                               f"{FULL_COUNTS[split]:,}: copy the dataset again or {HINT}")
