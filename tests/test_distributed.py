"""Scale-out: `torchrun --nproc_per_node=2 -m helpers train` trains with DistributedDataParallel.

Two CPU processes (gloo) train ResNet-9 on the smoke subset of the real images with
--train_batch 64 per process: an effective batch of 128, so they take the 8 optimizer steps per
epoch a single process takes at batch 128, on the same OneCycle schedule (the run's LR list is
exactly the one `planned_one_cycle` gives a single process at batch 128). Rank 0 alone logs,
evaluates and saves, so the checkpoint folder holds exactly one file of each kind. The final
test accuracy (500 images, 2 epochs) must be at least 0.18 (chance is 0.10). Measured in stop 44
(commit 9ce1b89, AMD EPYC Zen 3, torch 2.14.1): 2 processes 0.194 / 0.238 / 0.270 on seeds 0-2
(`python -m torch.distributed.run --standalone --nproc_per_node=2 -m helpers train --arch resnet9
--seed S --workers 0 --device cpu --serialize --amp off --no-fast-augment --train_batch 64` with
SMOKE_TEST=1), one process at batch 128 (the same flags, `--train_batch 128`) 0.254 on seed 0.
The two are not bit-identical, nor expected to be: each process normalises its own half-batch
(BatchNorm statistics are per process) and the data is split differently. This run is also the suite's check that seed
001's recipe learns in smoke mode.

Settings: OMP_NUM_THREADS=1 per process (torchrun sets it too), --workers 0, --device cpu, fp32
and the albumentations loader (--amp off --no-fast-augment: the DistributedSampler path).
`python -m torch.distributed.run` stands for torchrun (no PATH lookup).
Data: $CIFAR10_DIR (relative to the repo root), else ../shared/data/cifar10-jpg; skipped without it.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
import torch.distributed as dist

from conftest import DATA, REPO, smoke_env

needs_gloo = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason="this PyTorch build has no torch.distributed with gloo")
FLOOR = 0.18           # well above chance (0.10)


_env = smoke_env


@needs_gloo
@pytest.mark.skipif(not DATA.is_dir(), reason=f"no CIFAR-10 copy at {DATA}: set CIFAR10_DIR")
def test_torchrun_trains_with_ddp_like_a_single_process_at_the_effective_batch(tmp_path):
    from helpers.checkpoint import load_checkpoint
    from helpers.lr_finder import planned_one_cycle

    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         "-m", "helpers", "train", "--arch", "resnet9", "--workers", "0", "--device", "cpu", "--serialize",
         "--amp", "off", "--no-fast-augment",        # fp32 and the DistributedSampler + albumentations path
         "--train_batch", "64", "--checkpoints", tmp_path],
        cwd=REPO, env=_env(), capture_output=True, text=True, timeout=600)
    out, err = proc.stdout, proc.stderr
    assert proc.returncode == 0, err[-4000:]

    assert "distributed: 2 processes (gloo); batch 64 per process, effective batch 128 (2 x 64)" in out
    # rank 0 alone logs ...
    assert out.count("training resnet9 with the resnet9 recipe") == 1
    assert len(re.findall(r"^epoch +\d/2 ", out, re.M)) == 2 and out.count("test accuracy:") == 1
    assert "error" not in err.lower()
    # ... and saves: one file of each kind, nothing per rank, nothing half-written
    assert sorted(os.listdir(tmp_path)) == ["resnet9.pt", "resnet9_curves.png", "resnet9_history.json",
                                            "resnet9_last.pt"]

    ckpt = load_checkpoint(tmp_path / "resnet9.pt")
    assert not any(k.startswith("module.") for k in ckpt["model"])   # saved unwrapped from DDP
    r = ckpt["config"]
    single = planned_one_cycle(r["lr"], r["lr_min"], epochs=2, peak_epoch=r["peak_epoch"], train_size=1000,
                               batch_size=128)                      # one process at the effective batch
    assert ckpt["history"]["lr"] == single.lrs and single.steps_per_epoch == 8
    record = json.loads((tmp_path / "resnet9_history.json").read_text())
    assert record["world_size"] == 2 and record["effective_batch"] == 128 and r["batch_size"] == 64

    acc = ckpt["metrics"]["test_acc"]
    print(f"test accuracy after 2 smoke epochs on 2 processes: {acc:.3f}")
    assert acc >= FLOOR


def test_torchrun_environment_is_read_and_checked():
    from helpers.distributed import DistributedError, setup, torchrun_env

    assert torchrun_env({}) is None                                        # a plain process
    assert torchrun_env({"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1"}) is None   # one process: no DDP
    assert torchrun_env({"RANK": "1", "LOCAL_RANK": "1", "WORLD_SIZE": "4"}) == \
        {"rank": 1, "local_rank": 1, "world_size": 4}
    with pytest.raises(DistributedError, match="WORLD_SIZE missing"):
        torchrun_env({"RANK": "0", "LOCAL_RANK": "0"})
    with pytest.raises(DistributedError, match="outside 0..WORLD_SIZE-1"):
        torchrun_env({"RANK": "2", "LOCAL_RANK": "0", "WORLD_SIZE": "2"})
    with pytest.raises(DistributedError, match="whole numbers"):
        torchrun_env({"RANK": "x", "LOCAL_RANK": "0", "WORLD_SIZE": "2"})
    info = setup("cpu")                                                    # not under torchrun here
    assert not info.enabled and info.is_main and info.world_size == 1 and str(info.device) == "cpu"
