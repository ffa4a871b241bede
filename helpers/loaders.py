"""Feeding a model: a Dataset that augments with albumentations, loaders whose every epoch is
a pure function of (seed, epoch), the on-device loader that augments whole batches where the
model trains, and `build_loaders`, which makes all of a recipe's loaders in one place.

    train_loader, eval_loader, test_loader = build_loaders(recipe, data, options)
"""
from __future__ import annotations

import random

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from .config import Recipe
from .data import CIFAR10Data
from .errors import ConfigError, require_positive, require_whole
from .hardware import RunOptions, get_device


class AugmentedDataset(Dataset):
    """uint8 images + labels; returns (transform(image) as a CHW float tensor, label).

    `transform` is an albumentations Compose ending in ToTensorV2 (see helpers.augment).
    Without one, images are scaled to 0..1.
    """

    def __init__(self, images: np.ndarray, labels: np.ndarray, transform=None):
        if len(images) != len(labels):
            raise ConfigError(f"{len(images)} images but {len(labels)} labels")
        self.images, self.labels = images, np.asarray(labels, dtype=np.int64)
        self.transform = transform

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
                shuffle: bool = False, workers: int = 0, seed: int = 0, distributed: bool = False) -> SeededLoader:
    """A SeededLoader over an AugmentedDataset, pinning memory when a CUDA GPU is present.

    distributed=True splits the data across the ranks of torch.distributed with a
    DistributedSampler; each rank then gets its own augmentation stream. Workers never
    persist across epochs: each epoch's streams restart from (seed, epoch), which is what
    makes a resumed run bit-identical.
    """
    require_whole("batch size", batch_size)
    require_whole("workers", workers, minimum=0)
    ds = AugmentedDataset(images, labels, transform)
    rank, sampler = 0, None
    if distributed:
        rank = torch.distributed.get_rank()
        sampler = DistributedSampler(ds, shuffle=shuffle, seed=seed)
        shuffle = False
    return SeededLoader(ds, seed=seed, rank=rank, batch_size=batch_size, shuffle=shuffle,
                        sampler=sampler, num_workers=workers, pin_memory=torch.cuda.is_available())


class DeviceLoader:
    """The fast path: the uint8 training set lives on the device, and every batch is indexed,
    augmented (helpers.augment.BatchAugment) and normalised there, with no worker processes.

    Like SeededLoader, epoch e depends only on (seed, e): call `set_epoch(e)` first. Every
    epoch is shuffled; the last batch may be short. `stats` = (mean, std) normalises;
    `shard` = (rank, world_size) gives each DDP process its share, as DistributedSampler does.
    """

    def __init__(self, images: np.ndarray, labels: np.ndarray, batch_size: int, *, stats: tuple, device,
                 augment: str = "crop-flip-cutout", seed: int = 0, shard: tuple[int, int] = (0, 1)):
        from .augment import batch_augment

        require_positive("batch size", batch_size)
        self.augment = batch_augment(augment, *stats) if augment != "none" else None
        self.device = torch.device(device)
        self.images = torch.as_tensor(images).to(self.device)              # uint8, moved once
        self.labels = torch.as_tensor(labels, dtype=torch.int64).to(self.device)
        self.batch_size = batch_size
        self.mean, self.std = tuple(stats[0]), tuple(stats[1])
        self.seed, (self.rank, self.world_size) = seed, shard
        self.generator = torch.Generator(device=self.device)
        if self.augment is not None and self.augment.alternate_flips:   # which images epoch 0 mirrors
            g = torch.Generator().manual_seed(epoch_seed(seed, -1))
            self.mirrored = (torch.rand(len(self.labels), generator=g) < 0.5).to(self.device)
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.generator.manual_seed(epoch_seed(self.seed, epoch, self.rank))

    def _per_rank(self) -> int:
        """Images each rank sees per epoch: the data padded to a multiple of the world size,
        as DistributedSampler does, so every rank runs the same number of steps."""
        return -(-len(self.labels) // self.world_size)

    def _indices(self) -> torch.Tensor:
        n = len(self.labels)
        g = torch.Generator().manual_seed(epoch_seed(self.seed, self.epoch))  # the same on all ranks
        idx = torch.randperm(n, generator=g)
        total = self._per_rank() * self.world_size
        idx = torch.cat([idx, idx[:total - n]])                              # pad, as DistributedSampler
        return idx[self.rank::self.world_size].to(self.device)

    def __len__(self) -> int:
        return -(-self._per_rank() // self.batch_size)

    def __iter__(self):
        from .augment import normalize_batch

        idx = self._indices()
        for i in range(len(self)):
            b = idx[i * self.batch_size:(i + 1) * self.batch_size]
            x = self.images[b]
            if self.augment is not None:
                params = self.augment.sample(len(b), self.device, self.generator)
                if self.augment.alternate_flips:          # the same half in even epochs, the other in odd
                    params["flip"] = self.mirrored[b] ^ bool(self.epoch % 2)
                x = self.augment.apply(x, params)
            else:
                x = normalize_batch(x.permute(0, 3, 1, 2).float(), self.mean, self.std)
            yield x, self.labels[b]



# ----------------------------------------------------------------------------------------
# All of a recipe's loaders
# ----------------------------------------------------------------------------------------
def input_stats(recipe: Recipe, data: CIFAR10Data) -> tuple[tuple, tuple]:
    """The (mean, std) a recipe's inputs are normalised with: the training set's channel
    statistics, or (0, 1) per channel for a recipe that feeds pixels in [0, 1] unchanged."""
    return (data.mean, data.std) if recipe.normalize else ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0))


def build_loaders(recipe: Recipe, data: CIFAR10Data, options: RunOptions | None = None, *,
                  distributed: bool = False):
    """(train_loader, eval_loader, test_loader) for a recipe. The eval loader is a stratified
    validation split of the training set when recipe.val_split > 0, else the test set. With
    options.fast_augment the training loader is a DeviceLoader on options.device, augmenting
    there; otherwise an albumentations loader with options.workers processes."""
    from . import augment as aug                   # albumentations: imported only when loaders are built

    options = options or RunOptions()
    mean, std = input_stats(recipe, data)
    train_x, train_y = data.train_images, data.train_labels
    val_x, val_y = data.test_images, data.test_labels
    if recipe.val_split > 0:
        train_x, train_y, val_x, val_y = data.split_validation(recipe.val_split, recipe.seed)
    if options.fast_augment:                           # batch_augment refuses an augmentation without a twin
        shard = (torch.distributed.get_rank(), torch.distributed.get_world_size()) if distributed else (0, 1)
        train = DeviceLoader(train_x, train_y, recipe.batch_size, stats=(mean, std), device=get_device(options.device),
                             augment=recipe.augment, seed=recipe.seed, shard=shard)
    else:
        train = make_loader(train_x, train_y, aug.transforms_for(recipe.augment, mean, std),
                            batch_size=recipe.batch_size, shuffle=True, workers=options.workers, seed=recipe.seed,
                            distributed=distributed)
    test_tf = aug.test_transforms(mean, std)
    test = make_loader(data.test_images, data.test_labels, test_tf, batch_size=recipe.test_batch_size,
                       workers=options.workers)
    val = test if recipe.val_split == 0 else make_loader(
        val_x, val_y, test_tf, batch_size=recipe.test_batch_size, workers=options.workers)
    return train, val, test
