"""Shared fixtures: the real CIFAR-10 copy (CIFAR10_DIR, else ../shared/data/cifar10-jpg) and
small generated image-folder trees."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data" / "cifar10-jpg"


def _data_dir() -> Path:
    """$CIFAR10_DIR (a relative one is read from the current folder, else the repo root),
    else ../shared/data/cifar10-jpg beside the checkout."""
    env = os.environ.get("CIFAR10_DIR")
    if not env:
        return SHARED_DATA
    path = Path(env).expanduser()
    if not path.is_absolute() and not path.is_dir():
        path = REPO / path
    return path.resolve()


# Under pytest-xdist (pyproject's `-n auto`) each worker is one process per core: one torch
# thread each, so two workers never fight over a core (set before torch is imported)
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = "1"
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(1)


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(items):
    """Which tests must share an xdist worker (`--dist loadgroup`; the others go to any free
    one): the notebooks, all on one and in order (04 resumes with what 03 chose, 05 reads what
    04 trained), and the tests that share a module-scoped fixture (a CLI training, say), so
    that it is built once: one group per module and per value of its parameters ("test_cli.py/vgg")."""
    for item in items:
        if item.get_closest_marker("xdist_group") is not None:
            continue
        if item.path.suffix == ".ipynb":
            group = "notebooks"
        else:
            fixtures = getattr(item, "_fixtureinfo", None)
            shared = sorted(name for name, defs in (fixtures.name2fixturedefs.items() if fixtures else ())
                            if defs and defs[-1].scope in ("module", "class", "package"))
            if not shared:
                continue
            params = getattr(item, "callspec", None)
            # "<file>/<value>...", never ending in "]": xdist reads a name that does as no group at all
            group = item.path.name + "".join(f"/{params.params[n]}".replace("]", ")") for n in shared
                                             if params is not None and n in params.params)
        item.add_marker(pytest.mark.xdist_group(group))


DATA = _data_dir()
needs_data = pytest.mark.skipif(not DATA.is_dir(), reason=f"no CIFAR-10 copy at {DATA}: set CIFAR10_DIR")


def real_data_dir() -> Path | None:
    """The real dataset folder, or None when this machine has none."""
    return DATA if DATA.is_dir() else None


def smoke_env(**extra: str) -> dict:
    """The environment for a `python -m helpers ...` subprocess: smoke mode on the real data,
    one torch thread (so float sums round the same way in every run), no display."""
    pythonpath = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, "SMOKE_TEST": "1", "CIFAR10_DIR": str(DATA), "OMP_NUM_THREADS": "1",
            "MKL_NUM_THREADS": "1", "MPLBACKEND": "Agg",
            "PYTHONPATH": pythonpath, **extra}


@pytest.fixture(scope="session")
def real_data():
    """The full real CIFAR-10 (50,000 + 10,000 images), loaded once per test session."""
    from helpers.data import load_cifar10

    path = real_data_dir()
    if path is None:
        pytest.skip("no local CIFAR-10 copy: set CIFAR10_DIR")
    return load_cifar10(path, download=False)


@pytest.fixture(scope="session")
def small_data(real_data):
    """A stratified real subset: 100 train and 50 test images per class."""
    return real_data.smoke_subset()


@pytest.fixture(scope="session")
def tiny_data(small_data):
    """A smaller stratified real subset, 30 train and 10 test images per class, for tests of a
    mechanism (exact resumption, equal runs, what a setting switches) rather than of learning."""
    return small_data.subset(30, 10)


def write_image_tree(root: Path, per_class: dict[str, int] | int = 3, classes=None, seed: int = 0,
                     suffix: str = ".png") -> Path:
    """Write a tiny train/<class>/*.png, test/<class>/*.png tree of random 32x32 RGB images."""
    from PIL import Image

    from helpers.data import CLASSES

    rng = np.random.default_rng(seed)
    classes = CLASSES if classes is None else classes
    for split in ("train", "test"):
        for c in classes:
            n = per_class if isinstance(per_class, int) else per_class.get(c, 3)
            d = root / split / c
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(d / f"{i:04d}{suffix}")
    return root
