"""Data: load CIFAR-10 from any source, check it, describe it, and feed it to a model.

Sources, in the order `load_cifar10()` looks for them:
  1. the `root` argument,
  2. the `CIFAR10_DIR` environment variable,
  3. `./data`, downloading torchvision's CIFAR-10 there if needed (what Colab users get).
A root can be torchvision's folder (holding `cifar-10-batches-py/`) or an image-folder tree
`<root>/train/<class>/*.png|jpg` and `<root>/test/<class>/*`. An image-folder tree is
decoded once and cached as arrays under the user's cache folder, so later loads of the
full dataset take about a second.
"""
from __future__ import annotations

import hashlib
import os
import random
import sys
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from . import config
from .errors import ConfigError, DatasetError, require_positive, require_whole
from .files import atomic_write

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

    def split_validation(self, fraction: float, seed: int = 0):
        """Split off a stratified validation set: (train_images, train_labels, val_images, val_labels)."""
        n_per_class = int(round(fraction * len(self.train_labels) / len(self.classes)))
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


def channel_stats(images: np.ndarray, chunk: int = 5000) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of uint8 images (N, H, W, C), scaled to 0..1, in float64."""
    if images.ndim != 4 or len(images) == 0:
        raise ConfigError(f"expected a non-empty (N, H, W, C) image array, got shape {images.shape}")
    total = np.zeros(images.shape[-1])
    total_sq = np.zeros(images.shape[-1])
    for i in range(0, len(images), chunk):
        x = images[i:i + chunk].reshape(-1, images.shape[-1]).astype(np.float64)
        total += x.sum(0)
        total_sq += (x * x).sum(0)
    n = images.shape[0] * images.shape[1] * images.shape[2]
    mean = total / n
    std = np.sqrt(total_sq / n - mean ** 2)
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


def _cache_key(root: Path, listing) -> str:
    h = hashlib.sha256(str(root.resolve()).encode())
    for split, per_class in listing.items():
        for files in per_class:
            for e in files:
                st = e.stat()
                h.update(f"{split}/{e.name}:{st.st_size}:{st.st_mtime_ns};".encode())
    return h.hexdigest()[:20]


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
        key = _cache_key(root, listing)
    except OSError as e:
        raise DatasetError(f"cannot read {e.filename or root} ({e.strerror or e}): fix that entry or "
                           "copy the dataset again") from e
    cache_file = config.cache_dir() / f"imagefolder-{key}.npz"
    if cache and cache_file.exists():
        try:
            with np.load(cache_file) as z:
                return CIFAR10Data(z["train_images"], z["train_labels"], z["test_images"],
                                   z["test_labels"], CLASSES, source)
        except Exception as e:                # any damage to the cache: decode again and rewrite it
            print(f"note: the decode cache {cache_file.name} is unreadable ({type(e).__name__}); "
                  "decoding the images again", file=sys.stderr)
    arrays = {}
    for split, per_class in listing.items():
        paths = [e.path for files in per_class for e in files]
        labels = np.repeat(np.arange(len(CLASSES)), [len(f) for f in per_class]).astype(np.int64)
        images = np.empty((len(paths), *IMAGE_SHAPE), dtype=np.uint8)
        for i, p in enumerate(_progress(paths, f"decoding {split} images")):
            images[i] = _decode(p)
        arrays[f"{split}_images"], arrays[f"{split}_labels"] = images, labels
    if cache:
        _save_cache(cache_file, arrays)
    return CIFAR10Data(arrays["train_images"], arrays["train_labels"], arrays["test_images"],
                       arrays["test_labels"], CLASSES, source)


def _progress(items, desc: str):
    if len(items) < 5000:
        return items
    from tqdm import tqdm
    return tqdm(items, desc=desc, unit="img", leave=False, file=sys.stderr)


def _save_cache(cache_file: Path, arrays: dict) -> None:
    """Write the decoded arrays atomically; a read-only cache folder just means no cache."""
    try:
        with atomic_write(cache_file) as f:
            np.savez(f, **arrays)
    except OSError:
        pass


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


# ----------------------------------------------------------------------------------------
# Feeding a model: a Dataset that augments, and loaders whose every epoch is reproducible
# ----------------------------------------------------------------------------------------
class AugmentedDataset(Dataset):
    """uint8 images + labels; returns (transform(image) as a CHW float tensor, label).

    `transform` is an albumentations Compose ending in ToTensorV2 (see helpers.augment).
    Without one, images are scaled to 0..1. `recipe` optionally names the augmentation
    parameters, so that the training engine can run the same augmentation on the GPU.
    """

    def __init__(self, images: np.ndarray, labels: np.ndarray, transform=None, recipe=None):
        if len(images) != len(labels):
            raise ConfigError(f"{len(images)} images but {len(labels)} labels")
        self.images, self.labels = images, np.asarray(labels, dtype=np.int64)
        self.transform, self.recipe = transform, recipe

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i):
        img = self.images[i]
        if self.transform is None:
            x = torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1).float().div_(255)
        else:
            x = self.transform(image=img)["image"]
        return x, int(self.labels[i])

    def reseed(self, seed: int) -> None:
        """Restart the augmentation's random stream from `seed`."""
        if self.transform is not None and hasattr(self.transform, "set_random_state"):
            from .augment import seed_pipeline
            seed_pipeline(self.transform, seed)


def _base_dataset(ds):
    while hasattr(ds, "dataset") and not hasattr(ds, "reseed"):
        ds = ds.dataset  # unwrap torch.utils.data.Subset
    return ds


def worker_init_fn(worker_id: int) -> None:
    """Give every DataLoader worker its own augmentation stream.

    albumentations keeps its random state inside the Compose, which each worker receives
    as an identical copy; without this every worker would augment in lockstep. torch sets
    each worker's seed to base_seed + worker_id, and base_seed changes every epoch.
    """
    info = torch.utils.data.get_worker_info()
    seed = info.seed % 2**32
    np.random.seed(seed)
    random.seed(seed)
    ds = _base_dataset(info.dataset)
    if hasattr(ds, "reseed"):
        ds.reseed(seed)


def epoch_seed(seed: int, epoch: int, rank: int = 0) -> int:
    """The seed of one epoch's shuffling and augmentation, a pure function of its inputs."""
    return (seed * 1_000_003 + epoch * 7919 + rank * 104_729) % 2**63


class SeededLoader(DataLoader):
    """A DataLoader whose epoch e depends only on (seed, e, rank): call `set_epoch(e)` first.

    That makes runs repeatable with any number of workers, and lets training resume in the
    middle of a run and see exactly the batches it would have seen.
    """

    def __init__(self, dataset, *, seed: int = 0, rank: int = 0, **kwargs):
        kwargs.setdefault("generator", torch.Generator())
        super().__init__(dataset, worker_init_fn=worker_init_fn, **kwargs)
        self.seed, self.rank = seed, rank
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        s = epoch_seed(self.seed, epoch, self.rank)
        self.generator.manual_seed(s)
        if isinstance(self.sampler, DistributedSampler):
            self.sampler.set_epoch(epoch)
        if self.num_workers == 0:
            ds = _base_dataset(self.dataset)
            if hasattr(ds, "reseed"):
                ds.reseed(s)


def make_loader(images: np.ndarray, labels: np.ndarray, transform=None, *, batch_size: int = 512,
                shuffle: bool = False, workers: int = 0, seed: int = 0, drop_last: bool = False,
                distributed: bool = False, recipe=None) -> SeededLoader:
    """A SeededLoader over an AugmentedDataset, pinning memory when a CUDA GPU is present.

    distributed=True splits the data across the ranks of torch.distributed with a
    DistributedSampler; each rank then gets its own augmentation stream. Workers never
    persist across epochs: each epoch's streams restart from (seed, epoch), which is what
    makes a resumed run bit-identical.
    """
    require_whole("batch size", batch_size)
    require_whole("workers", workers, minimum=0)
    ds = AugmentedDataset(images, labels, transform, recipe)
    rank, sampler = 0, None
    if distributed:
        rank = torch.distributed.get_rank()
        sampler = DistributedSampler(ds, shuffle=shuffle, seed=seed, drop_last=drop_last)
        shuffle = False
    return SeededLoader(ds, seed=seed, rank=rank, batch_size=batch_size, shuffle=shuffle,
                        sampler=sampler, num_workers=workers, pin_memory=torch.cuda.is_available(),
                        drop_last=drop_last)


class DeviceLoader:
    """The fast path: the uint8 training set lives on the device, and every batch is indexed,
    augmented (helpers.augment.BatchAugment) and normalised there, with no worker processes.

    Like SeededLoader, epoch e depends only on (seed, e): call `set_epoch(e)` first.
    """

    def __init__(self, images: np.ndarray, labels: np.ndarray, batch_size: int, mean, std,
                 device, augment: str = "seed001", shuffle: bool = True, drop_last: bool = False,
                 seed: int = 0, rank: int = 0, world_size: int = 1, options: dict | None = None):
        from .augment import batch_augment

        require_positive("batch size", batch_size)
        self.augment = batch_augment(augment, mean, std, **(options or {})) if augment != "none" else None
        self.device = torch.device(device)
        self.images = torch.as_tensor(images).to(self.device)              # uint8, moved once
        self.labels = torch.as_tensor(labels, dtype=torch.int64).to(self.device)
        self.batch_size, self.shuffle, self.drop_last = batch_size, shuffle, drop_last
        self.mean, self.std = tuple(mean), tuple(std)
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.generator = torch.Generator(device=self.device)
        self.set_epoch(0)

    @classmethod
    def from_loader(cls, loader, device) -> "DeviceLoader":
        """The fast-path twin of a make_loader() training loader (same data, batch size, seed)."""
        ds = _base_dataset(loader.dataset)
        spec = getattr(ds, "recipe", None)
        if spec is None:
            raise ConfigError("fast_augment needs a loader from make_loader(..., recipe=...) "
                              "(helpers.engine.build_loaders makes one)")
        world = torch.distributed.get_world_size() if isinstance(loader.sampler, DistributedSampler) else 1
        return cls(ds.images, ds.labels, loader.batch_size, spec["mean"], spec["std"], device,
                   spec["name"], shuffle=True, drop_last=loader.drop_last, seed=loader.seed,
                   rank=getattr(loader, "rank", 0), world_size=world)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.generator.manual_seed(epoch_seed(self.seed, epoch, self.rank))

    def _per_rank(self) -> int:
        """Images each rank sees per epoch: the data padded to a multiple of the world size,
        as DistributedSampler does, so every rank runs the same number of steps."""
        return -(-len(self.labels) // self.world_size)

    def _indices(self) -> torch.Tensor:
        n = len(self.labels)
        if self.shuffle:
            g = torch.Generator().manual_seed(epoch_seed(self.seed, self.epoch))  # same on all ranks
            idx = torch.randperm(n, generator=g)
        else:
            idx = torch.arange(n)
        total = self._per_rank() * self.world_size
        idx = torch.cat([idx, idx[:total - n]])                              # pad, as DistributedSampler
        return idx[self.rank::self.world_size].to(self.device)

    def __len__(self) -> int:
        n = self._per_rank()
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __iter__(self):
        from .augment import normalize_batch

        idx = self._indices()
        for i in range(len(self)):
            b = idx[i * self.batch_size:(i + 1) * self.batch_size]
            x = self.images[b]
            if self.augment is not None:
                x = self.augment(x, self.generator)
            else:
                x = normalize_batch(x.permute(0, 3, 1, 2).float(), self.mean, self.std)
            yield x, self.labels[b]


# ----------------------------------------------------------------------------------------
# Your own images: CIFAR-10's standard statistics, and any image file read as 32x32 RGB
# ----------------------------------------------------------------------------------------
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

    from .errors import ImageError

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
