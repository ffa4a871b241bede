"""Data loading: image-folder trees, torchvision batches, validation errors, stats, subsets, loaders."""
from __future__ import annotations

import os
import pickle
import time

import numpy as np
import pytest
import torch

from conftest import real_data_dir, write_image_tree
from helpers import data as D, loaders
from helpers.augment import train_transforms
from helpers.errors import ConfigError, DatasetError


SESSION_CACHE = os.environ.get("CIFAR10_CACHE")     # where the session's real_data fixture caches


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    """Generated trees cache into the test's own folder, never the user's cache."""
    monkeypatch.setenv("CIFAR10_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("CIFAR10_DIR", raising=False)


# ----------------------------------------------------------------------------------------
# image-folder trees written with PIL
# ----------------------------------------------------------------------------------------
def test_image_folder_loads_pixels_labels_and_order(tmp_path):
    root = write_image_tree(tmp_path / "tree", per_class=3)
    data = D.load_cifar10(root)
    assert data.train_images.shape == (30, 32, 32, 3) and data.train_images.dtype == np.uint8
    assert data.test_images.shape == (30, 32, 32, 3)
    assert data.classes == D.CLASSES
    assert np.array_equal(np.bincount(data.train_labels), [3] * 10)
    from PIL import Image
    first_cat = np.asarray(Image.open(root / "train" / "cat" / "0000.png"))
    assert np.array_equal(data.train_images[data.train_labels == 3][0], first_cat)


def test_image_folder_is_cached_and_cache_follows_changes(tmp_path):
    root = write_image_tree(tmp_path / "tree", per_class=2)
    first = D.load_cifar10(root)

    def caches():
        return sorted(p.name for p in (tmp_path / "cache").iterdir())

    assert len(caches()) == 1 and caches()[0].startswith("imagefolder-")   # one folder, no temporary left
    again = D.load_cifar10(root)                                          # from the cache: arrays and stats
    assert again.__dict__["stats"] == D.channel_stats(first.train_images)  # read (not yet computed), and exact
    assert np.array_equal(again.train_images, first.train_images) and again.stats == first.stats
    # a changed file must not be served from the stale cache
    before = caches()
    from PIL import Image
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(root / "train" / "dog" / "0000.png")
    data = D.load_cifar10(root)
    assert data.train_images[data.train_labels == 5][0].max() == 0
    assert len(caches()) == 1 and caches() != before       # the new version's cache replaced the old
    write_image_tree(tmp_path / "other", per_class=1)
    D.load_cifar10(tmp_path / "other")
    assert len(caches()) == 2                              # another dataset folder: a cache of its own


def test_a_damaged_cache_is_decoded_again_and_replaced(tmp_path, capsys):
    root = write_image_tree(tmp_path / "tree", per_class=2)
    first = D.load_cifar10(root)
    (folder,) = (tmp_path / "cache").iterdir()
    (folder / "train_images.npy").write_bytes(b"not an array")
    data = D.load_cifar10(root)
    assert "is unreadable (ValueError); decoding the images again" in capsys.readouterr().err
    assert np.array_equal(data.train_images, first.train_images)
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [folder.name]   # rewritten in place
    assert np.array_equal(np.load(folder / "train_images.npy"), first.train_images)


def test_cifar10_dir_environment_variable_is_used(tmp_path, monkeypatch):
    root = write_image_tree(tmp_path / "tree", per_class=1)
    monkeypatch.setenv("CIFAR10_DIR", str(root))
    assert len(D.load_cifar10().train_images) == 10


@pytest.mark.parametrize("case, match", [
    ("missing_tree", "does not exist"),
    ("missing_env_tree", "CIFAR10_DIR="),
    ("empty_folder", "holds neither"),
    ("missing_class", "missing class folder"),
    ("extra_class", "unknown class folder"),
    ("empty_class", "holds no .png/.jpg images"),
    ("partial_class", "partial copy"),
    ("corrupt_file", "corrupt or truncated image"),
    ("truncated_file", "corrupt or truncated image"),
    ("wrong_size", "not a 32x32 RGB image"),
    ("wrong_mode", "not a 32x32 RGB image"),
    ("missing_split", "missing folder"),
])
def test_bad_trees_give_one_line_errors_naming_the_path(tmp_path, monkeypatch, case, match):
    from PIL import Image

    root = tmp_path / "tree"
    kwargs = {"download": False}
    if case == "missing_tree":
        root = tmp_path / "nowhere"
    elif case == "missing_env_tree":
        monkeypatch.setenv("CIFAR10_DIR", str(tmp_path / "nowhere"))
        root, kwargs = None, {}
    elif case == "empty_folder":
        root.mkdir()
    else:
        write_image_tree(root, per_class=2)
    bad = root / "train" / "cat" / "0000.png" if root is not None else None
    if case in ("missing_tree", "empty_folder"):
        bad = root
    if case == "missing_class":
        for f in (root / "test" / "frog").iterdir():
            f.unlink()
        (root / "test" / "frog").rmdir()
        bad = root / "test" / "frog"
    elif case == "extra_class":
        (root / "train" / "unicorn").mkdir()
        bad = root / "train" / "unicorn"
    elif case == "empty_class":
        for f in (root / "train" / "ship").iterdir():
            f.unlink()
        bad = root / "train" / "ship"
    elif case == "partial_class":
        (root / "train" / "truck" / "0001.png").unlink()
        bad = root / "train" / "truck"
    elif case == "corrupt_file":
        bad.write_bytes(b"this is not a png")
    elif case == "truncated_file":
        bad.write_bytes(bad.read_bytes()[:60])
    elif case == "wrong_size":
        Image.new("RGB", (28, 28)).save(bad)
    elif case == "wrong_mode":
        Image.new("L", (32, 32)).save(bad)
    elif case == "missing_split":
        import shutil
        shutil.rmtree(root / "test")
        bad = root / "test"
    with pytest.raises(DatasetError, match=match) as err:
        D.load_cifar10(root, **kwargs)
    message = str(err.value)
    assert "\n" not in message
    if bad is not None:
        assert str(bad) in message
    elif case == "missing_env_tree":
        assert "nowhere" in message


def test_failed_download_when_offline_is_one_clear_line(tmp_path, monkeypatch):
    import torchvision.datasets.utils as tvu

    def offline(*args, **kwargs):
        raise OSError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(tvu, "download_url", offline)
    with pytest.raises(DatasetError, match="could not download CIFAR-10") as err:
        D.load_cifar10(tmp_path / "dl")
    assert "CIFAR10_DIR" in str(err.value) and "\n" not in str(err.value)


# ----------------------------------------------------------------------------------------
# torchvision's batch format
# ----------------------------------------------------------------------------------------
def write_torchvision_batches(root, n=20, seed=0):
    rng = np.random.default_rng(seed)
    batches = root / "cifar-10-batches-py"
    batches.mkdir(parents=True)
    names = ["data_batch_%d" % i for i in range(1, 6)] + ["test_batch"]
    for name in names:
        labels = list(range(10)) * (n // 10)
        flat = rng.integers(0, 256, (len(labels), 3072), dtype=np.uint8)
        with open(batches / name, "wb") as f:
            pickle.dump({"data": flat, "labels": labels}, f)
    with open(batches / "batches.meta", "wb") as f:
        pickle.dump({"label_names": list(D.CLASSES)}, f)
    return batches


def test_torchvision_batches_with_wrong_checksum_are_rejected(tmp_path):
    write_torchvision_batches(tmp_path / "tv")
    with pytest.raises(DatasetError, match="fail their checksum") as err:
        D.load_cifar10(tmp_path / "tv", download=False)
    assert "cifar-10-batches-py" in str(err.value)


def test_torchvision_batches_load_when_verified(tmp_path, monkeypatch):
    import torchvision.datasets.cifar as tv_cifar

    batches = write_torchvision_batches(tmp_path / "tv", n=20)
    # our generated batches cannot match CIFAR-10's md5 sums: accept them, as for the real files
    monkeypatch.setattr(tv_cifar, "check_integrity", lambda *args, **kwargs: True)
    data = D.load_cifar10(batches, download=False)  # the batches folder itself works too
    assert data.train_images.shape == (100, 32, 32, 3) and data.test_images.shape == (20, 32, 32, 3)
    with open(batches / "test_batch", "rb") as f:
        raw = pickle.load(f)
    assert np.array_equal(data.test_images[0], raw["data"][0].reshape(3, 32, 32).transpose(1, 2, 0))
    assert data.classes == D.CLASSES


# ----------------------------------------------------------------------------------------
# the real dataset
# ----------------------------------------------------------------------------------------
@pytest.mark.skipif(real_data_dir() is None, reason="no local CIFAR-10 copy")
def test_real_dataset_has_full_counts_per_class_and_reloads_from_cache(real_data, monkeypatch):
    if SESSION_CACHE is None:              # the session fixture filled the user's cache ...
        monkeypatch.delenv("CIFAR10_CACHE")
    else:                                  # ... or the one $CIFAR10_CACHE named
        monkeypatch.setenv("CIFAR10_CACHE", SESSION_CACHE)
    assert real_data.train_images.shape == (50_000, 32, 32, 3)
    assert real_data.test_images.shape == (10_000, 32, 32, 3)
    assert set(real_data.counts("train").values()) == {5000}
    assert set(real_data.counts("test").values()) == {1000}
    def no_decoding(path):
        raise AssertionError(f"decoded {path}: the cache was not used")

    monkeypatch.setattr(D, "_decode", no_decoding)      # the reload must come from the cache alone
    t0 = time.perf_counter()
    again = D.load_cifar10(real_data_dir(), download=False, expect_full=True)
    print(f"cached load of the full dataset: {time.perf_counter() - t0:.2f} s")
    assert np.array_equal(again.test_labels, real_data.test_labels)
    assert np.array_equal(again.train_images[::997], real_data.train_images[::997])


@pytest.mark.skipif(real_data_dir() is None, reason="no local CIFAR-10 copy")
def test_channel_stats_are_computed_from_training_images(real_data):
    mean, std = real_data.mean, real_data.std
    # the JPEG copy's documented statistics (../shared/data/README.md)
    assert np.allclose(mean, (0.4913, 0.4821, 0.4465), atol=2e-4)
    assert np.allclose(std, (0.2452, 0.2428, 0.2606), atol=2e-4)
    sample = real_data.train_images[:2000].astype(np.float64) / 255
    m, s = D.channel_stats(real_data.train_images[:2000])
    assert np.allclose(m, sample.mean((0, 1, 2))) and np.allclose(s, sample.std((0, 1, 2)))
    with pytest.raises(ConfigError, match="uint8 image array"):       # already scaled: would read 255x too small
        D.channel_stats(sample)


def test_expect_full_rejects_a_small_copy(tmp_path):
    root = write_image_tree(tmp_path / "tree", per_class=1)
    with pytest.raises(DatasetError, match="not the full 50,000"):
        D.load_cifar10(root, expect_full=True)


# ----------------------------------------------------------------------------------------
# subsets
# ----------------------------------------------------------------------------------------
def test_stratified_subset_is_seeded_and_balanced():
    labels = np.repeat(np.arange(10), 30)
    a = D.stratified_indices(labels, 7, seed=1)
    b = D.stratified_indices(labels, 7, seed=1)
    c = D.stratified_indices(labels, 7, seed=2)
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    assert np.array_equal(np.bincount(labels[a]), [7] * 10)
    assert len(set(a)) == 70


def test_subset_larger_than_the_dataset_is_refused():
    with pytest.raises(ConfigError, match="holds only 30"):
        D.stratified_indices(np.repeat(np.arange(10), 30), 31)


def test_subset_keeps_full_training_statistics(tmp_path):
    data = D.load_cifar10(write_image_tree(tmp_path / "tree", per_class=4))
    sub = data.subset(2, 1, seed=0)
    assert len(sub.train_images) == 20 and len(sub.test_images) == 10
    assert sub.mean == data.mean


def test_validation_split_is_stratified_and_disjoint():
    data = D.CIFAR10Data(np.arange(200, dtype=np.uint8).repeat(3072).reshape(200, 32, 32, 3),
                         np.repeat(np.arange(10), 20), np.zeros((10, 32, 32, 3), np.uint8), np.arange(10))
    tx, ty, vx, vy = data.split_validation(0.1)
    assert np.array_equal(np.bincount(vy), [2] * 10) and len(ty) == 180
    assert data.validation_size(0.1) == len(vy) == 20 and data.validation_size(0) == 0
    assert not set(tx[:, 0, 0, 0]) & set(vx[:, 0, 0, 0])


# ----------------------------------------------------------------------------------------
# loaders
# ----------------------------------------------------------------------------------------
def _images(n=64, seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8), np.arange(n) % 10


def _collect(loader, epoch):
    loader.set_epoch(epoch)
    xs, ys = zip(*loader)
    return torch.cat(xs), torch.cat(ys)


def test_loader_epochs_are_reproducible_and_differ(monkeypatch):
    x, y = _images()
    tf = train_transforms((0.5,) * 3, (0.25,) * 3)
    loader = loaders.make_loader(x, y, tf, batch_size=16, shuffle=True, seed=3)
    a, la = _collect(loader, 0)
    b, lb = _collect(loader, 0)
    c, lc = _collect(loader, 1)
    assert torch.equal(a, b) and torch.equal(la, lb)
    assert not torch.equal(la, lc)
    assert sorted(la.tolist()) == sorted(y.tolist())


def test_two_workers_produce_different_augmentations():
    """albumentations would give each worker an identical copy of its random state."""
    img = _images(1)[0]
    x = np.repeat(img, 64, axis=0)  # 64 copies of one image: only augmentation differs
    tf = train_transforms((0.5,) * 3, (0.25,) * 3, crop_p=1.0, flip_p=0.5, cutout_p=1.0)
    loader = loaders.make_loader(x, np.zeros(64, int), tf, batch_size=8, workers=2, seed=0)
    batches = [b[0] for b in loader]
    # batch 0 comes from worker 0 and batch 1 from worker 1: their augmentations must differ
    assert not torch.equal(batches[0], batches[1])
    distinct = {tuple(t.flatten()[::97].tolist()) for b in batches for t in b}
    assert len(distinct) > 40  # 64 draws over 81 crops x 2 flips x 625 holes


def test_workers_give_the_same_epoch_as_each_other_run():
    x, y = _images(48)
    tf = train_transforms((0.5,) * 3, (0.25,) * 3)
    first = loaders.make_loader(x, y, tf, batch_size=8, shuffle=True, workers=2, seed=5)
    second = loaders.make_loader(x, y, train_transforms((0.5,) * 3, (0.25,) * 3), batch_size=8,
                           shuffle=True, workers=2, seed=5)
    a, _ = _collect(first, 2)
    b, _ = _collect(second, 2)
    assert torch.equal(a, b)


def test_loader_rejects_bad_batch_size_and_workers():
    x, y = _images(4)
    for bad in (0, -1, 2.5):
        with pytest.raises(ConfigError, match="batch size"):
            loaders.make_loader(x, y, batch_size=bad)
    with pytest.raises(ConfigError, match="workers"):
        loaders.make_loader(x, y, workers=-1)


def test_source_names_the_data_as_the_user_did_never_the_machine_path(tmp_path, monkeypatch):
    root = write_image_tree(tmp_path / "jpg-copy", per_class=1, suffix=".jpg")
    monkeypatch.setenv("CIFAR10_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("CIFAR10_DIR", str(root))
    from_env = D.load_cifar10()
    assert from_env.source == "$CIFAR10_DIR (image folder, lossy JPEG copy)"
    assert str(tmp_path) not in from_env.source
    png = write_image_tree(tmp_path / "png-copy", per_class=1)
    assert D.load_cifar10(png).source == ".../png-copy (image folder)"     # an absolute root: its last part
    monkeypatch.chdir(tmp_path)
    assert D.load_cifar10("png-copy").source == "png-copy (image folder)"
    assert "subset" in from_env.subset(1, 1).source and from_env.subset(1, 1).source.startswith("$CIFAR10_DIR")
