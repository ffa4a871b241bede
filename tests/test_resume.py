"""Exact resume after a crash, and what a diverging run leaves behind.

A run of `python -m helpers train` killed with SIGKILL right after its first epoch's
checkpoint appears, then continued with `--resume`, must end with exactly the weights
(torch.equal on every tensor) and history (every key except the wall-clock "seconds") of
the same run left alone. What that needs, and what these tests set:
  - the same command: flags, --seed, and SMOKE_TEST=1 (the resumed run refuses other settings;
    speed flags left out, here --workers, are taken from the checkpoint);
  - the CPU (--device cpu) and the same number of torch threads in every run: the tests set
    OMP_NUM_THREADS=1 (a float sum split over another thread count may round differently);
  - the same --workers: 0, or 2 worker processes (each epoch's shuffling and augmentation
    streams are a pure function of seed and epoch, helpers.loaders.SeededLoader; the loaders
    never use persistent workers, whose streams would run on across epochs);
  - the checkpoint holds model, optimizer, early-stopping state and every RNG, and is
    written atomically, so it is complete as soon as it exists.
Data: $CIFAR10_DIR (relative to the repo root), else ../shared/data/cifar10-jpg; skipped without it.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import DATA, REPO, smoke_env

pytestmark = pytest.mark.skipif(not DATA.is_dir(), reason=f"no CIFAR-10 copy at {DATA}: set CIFAR10_DIR")

RUN = ("train", "--arch", "compact", "--patience", "2", "--seed", "0", "--device", "cpu", "--serialize")


_env = smoke_env


def start(*args, **kwargs) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "helpers", *map(str, args)], cwd=REPO, env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)


def cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "helpers", *map(str, args)], cwd=REPO, env=_env(),
                          capture_output=True, text=True, timeout=600)


def sha256(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def without_seconds(history: dict) -> dict:
    return {k: v for k, v in history.items() if k != "seconds"}


def differences(a, b, where="") -> list[str]:
    """Where two checkpoints (nested dicts, lists, tensors, numbers) are not exactly equal."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        same = isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dtype == b.dtype \
            and a.shape == b.shape and torch.equal(a, b)
        return [] if same else [where]
    if isinstance(a, dict) and isinstance(b, dict):
        if a.keys() != b.keys():
            return [f"{where} keys"]
        return [d for k in a for d in differences(a[k], b[k], f"{where}/{k}")]
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        if len(a) != len(b):
            return [f"{where} length"]
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in differences(x, y, f"{where}[{i}]")]
    return [] if a == b else [where]


@pytest.mark.parametrize("workers, epochs", [(0, 3), (2, 2)])
def test_killed_run_resumes_to_identical_weights_and_history(tmp_path, workers, epochs):
    from helpers.checkpoint import load_checkpoint

    full_dir, crash_dir = tmp_path / "full", tmp_path / "crashed"
    run = (*RUN, "--workers", workers, "--epochs", epochs)
    # the uninterrupted run and the run to be killed go side by side (one thread each)
    full = start(*run, "--checkpoints", full_dir)
    crash = start(*run, "--checkpoints", crash_dir, start_new_session=True)
    last = crash_dir / "compact_last.pt"
    deadline = time.monotonic() + 300
    while not last.exists() and crash.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert last.exists(), crash.communicate()[1][-2000:]
    os.killpg(crash.pid, signal.SIGKILL)            # the run and its loader workers, mid-epoch 2
    crash.communicate()
    assert crash.returncode == -signal.SIGKILL
    assert not (crash_dir / "compact.pt").exists()  # it never finished
    done = load_checkpoint(last)["epoch"] + 1
    assert done < epochs

    # --workers left out: the resumed run takes the speed settings its checkpoint records
    # (auto would pick 2 loader workers for compact, which changes the augmentation streams)
    resume = start(*RUN, "--epochs", epochs, "--checkpoints", crash_dir, "--resume", last)   # while the full run goes on
    out, err = full.communicate(timeout=600)
    assert full.returncode == 0, err[-3000:]
    resumed = subprocess.CompletedProcess(resume.args, None, *resume.communicate(timeout=600))
    resumed.returncode = resume.returncode
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming {last}: {done} of {epochs} epochs done" in resumed.stdout
    assert f"resumed after epoch {done} of {epochs} (from {last.name})" in resumed.stdout
    assert len(re.findall(rf"^epoch +\d/{epochs} ", resumed.stdout, re.M)) == epochs - done   # only the rest
    assert "  - as the run being resumed (its checkpoint records them)" in resumed.stdout

    a, b = load_checkpoint(full_dir / "compact.pt"), load_checkpoint(crash_dir / "compact.pt")
    assert a["model"].keys() == b["model"].keys()
    different = [k for k in a["model"] if not torch.equal(a["model"][k], b["model"][k])]
    assert not different, f"weights differ after resume: {different}"
    assert without_seconds(a["history"]) == without_seconds(b["history"])
    # the final model holds the best epoch's weights (early stopping); the last training states
    # hold the last epoch's weights, optimizer, early-stopping state and every RNG: all equal too
    la, lb = load_checkpoint(full_dir / "compact_last.pt"), load_checkpoint(last)
    assert la["epoch"] == lb["epoch"] == epochs - 1
    assert la["options"]["workers"] == lb["options"]["workers"] == workers and la["options"]["fast_augment"] is False
    la["history"], lb["history"] = without_seconds(la["history"]), without_seconds(lb["history"])
    assert not differences(la, lb), differences(la, lb)[:10]
    assert len(a["history"]["train_loss"]) == epochs and len(a["history"]["lr"]) == epochs * 15
    assert a["metrics"] == b["metrics"]
    ja = json.loads((full_dir / "compact_history.json").read_text())
    jb = json.loads((crash_dir / "compact_history.json").read_text())
    assert without_seconds(ja["history"]) == without_seconds(jb["history"]) and ja["test"] == jb["test"]
    assert ja["resumed_from"] is None and jb["resumed_from"] == str(last)


def _small_loaders(data, n_train=128, n_test=64, batch=32):
    from helpers.augment import test_transforms
    from helpers.loaders import make_loader

    tf = test_transforms(data.mean, data.std)
    return (make_loader(data.train_images[:n_train], data.train_labels[:n_train], tf, batch_size=batch, shuffle=True),
            make_loader(data.test_images[:n_test], data.test_labels[:n_test], tf, batch_size=batch))


def test_divergence_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    """One fit call: epoch 1 at a sane LR is saved, then the LR jumps to 1e6 in epoch 2. The
    DivergenceError names the step and the LR, and the epoch-1 checkpoint is byte for byte
    what was saved then, and still resumes. (VGG: plain SGD with no BatchNorm to absorb a
    huge step, on 128 real images, 4 steps per epoch.)"""
    from torch.optim.lr_scheduler import LambdaLR

    from helpers import engine, hardware
    from helpers.checkpoint import load_checkpoint
    from helpers.data import load_cifar10
    from helpers.errors import DivergenceError
    from helpers.models import get_model

    train_loader, test_loader = _small_loaders(load_cifar10(DATA, download=False).smoke_subset())
    steps = len(train_loader)
    saved = []
    real_save = engine.save_checkpoint

    def recording_save(path, *args, **kwargs):
        out = real_save(path, *args, **kwargs)
        saved.append((kwargs["epoch"], sha256(path), os.stat(path).st_mtime_ns))
        return out

    monkeypatch.setattr(engine, "save_checkpoint", recording_save)
    quiet = hardware.RunOptions(device="cpu", progress=False)
    hardware.seed_everything(0)
    model = get_model("vgg")
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    # LR 1e-3 through epoch 1 and the first step of epoch 2 (so the saved optimizer holds 1e-3), then 1e6
    sched = LambdaLR(opt, lambda step: 1.0 if step <= steps else 1e9)
    ckpt = tmp_path / "vgg_last.pt"
    with pytest.raises(DivergenceError) as info:
        engine.fit(model, train_loader, test_loader, optimizer=opt, epochs=3, scheduler=sched, options=quiet,
                   extras=engine.FitOptions(checkpoint_path=ckpt, arch="vgg"))
    message = str(info.value)
    m = re.match(r"loss (?:became \S+ at step |grew to \S+ over steps \d+-)(\d+) \(LR 1e\+06[^)]*\).* the LR is too "
                 r"high; try a lower one, e\.g\. 1e\+05$", message)
    assert m, message
    assert int(m.group(1)) > steps                                        # in epoch 2
    assert [epoch for epoch, *_ in saved] == [0]
    assert (sha256(ckpt), os.stat(ckpt).st_mtime_ns) == saved[0][1:]      # untouched since epoch 1
    assert sorted(os.listdir(tmp_path)) == ["vgg_last.pt"]                # no half-written file

    good = load_checkpoint(ckpt)
    assert good["epoch"] == 0 and len(good["history"]["train_loss"]) == 1
    assert all(math.isfinite(good["history"][k][0]) for k in ("train_loss", "eval_loss"))
    assert all(torch.isfinite(v).all() for v in good["model"].values() if v.is_floating_point())
    model2 = get_model("vgg")
    opt2 = torch.optim.SGD(model2.parameters(), lr=1e-3, momentum=0.9)
    history = engine.fit(model2, train_loader, test_loader, optimizer=opt2, epochs=2, scheduler=LambdaLR(opt2, lambda s: 1.0),
                         options=quiet, extras=engine.FitOptions(resume=ckpt, arch="vgg"))
    assert len(history["train_loss"]) == 2 and all(map(math.isfinite, history["train_loss"]))


def test_cli_divergence_is_one_line_and_leaves_the_checkpoint_alone(tmp_path):
    """`train --lr 1e6` (VGG: plain SGD, no BatchNorm to absorb it) stops with one line naming
    the step and the LR, exit 1; the checkpoint already in --checkpoints stays as it was."""
    from helpers import engine, hardware, optim
    from helpers.checkpoint import load_checkpoint
    from helpers.config import recipe
    from helpers.data import load_cifar10
    from helpers.models import get_model

    train, test = _small_loaders(load_cifar10(DATA, download=False).smoke_subset(), n_train=16, n_test=16, batch=16)
    hardware.seed_everything(0)
    model = get_model("vgg")
    opt = optim.make_optimizer("sgd", model.parameters(), 1e-3)
    ckpt = tmp_path / "models" / "vgg_last.pt"
    engine.fit(model, train, test, optimizer=opt, epochs=1, options=hardware.RunOptions(device="cpu", progress=False),
               extras=engine.FitOptions(checkpoint_path=ckpt, config=recipe("vgg", smoke=True).to_dict()))
    before = (sha256(ckpt), os.stat(ckpt).st_mtime_ns)

    proc = cli("train", "--arch", "vgg", "--lr", "1e6", "--train_batch", "16", "--workers", "0",
               "--checkpoints", tmp_path / "models")
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    errors = [line.strip() for line in re.split(r"[\r\n]", proc.stderr) if line.strip().startswith("error")]
    assert len(errors) == 1, proc.stderr[-3000:]
    assert re.fullmatch(r"error: loss became (nan|inf|-inf) at step \d+ \(LR 1e\+06\): the LR is too high; "
                        r"try a lower one, e\.g\. 1e\+05", errors[0]), errors[0]
    assert (sha256(ckpt), os.stat(ckpt).st_mtime_ns) == before
    assert sorted(os.listdir(tmp_path / "models")) == ["vgg_last.pt"]    # no history, curves or temp files
    assert load_checkpoint(ckpt)["epoch"] == 0
