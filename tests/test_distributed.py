"""Scale-out: `torchrun --nproc_per_node=2 -m helpers train` trains with DistributedDataParallel.

Two CPU processes (gloo) train ResNet-9 on the smoke subset of the real images, next to a
single process with the same recipe. --train_batch is per process, so the two-process run
uses 64 per process (effective batch 128) against the single run's 128: both take the same
8 optimizer steps per epoch on the same OneCycle schedule (their LR lists are equal).
Rank 0 alone logs, evaluates and saves, so the checkpoint folder holds exactly one file of
each kind. The two final test accuracies (500 images, 2 epochs) must agree within 0.10, and
both be at least 0.18 (chance is 0.10); measured: single 0.26-0.31, DDP 0.25-0.28 over
seeds 0-2. They are not bit-identical, nor expected to be: each process normalises its own
half-batch (BatchNorm statistics are per process) and the data is split differently.
The single process is also the suite's check that seed 001's recipe learns in smoke mode.

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
TOLERANCE = 0.10       # |DDP accuracy - single-process accuracy|
FLOOR = 0.18           # both well above chance (0.10)


_env = smoke_env


@needs_gloo
@pytest.mark.skipif(not DATA.is_dir(), reason=f"no CIFAR-10 copy at {DATA}: set CIFAR10_DIR")
def test_torchrun_trains_with_ddp_and_matches_a_single_process(tmp_path):
    from helpers.checkpoint import load_checkpoint

    train = ("-m", "helpers", "train", "--arch", "resnet9", "--workers", "0", "--device", "cpu", "--serialize",
             "--amp", "off", "--no-fast-augment")      # fp32 and the DistributedSampler + albumentations path
    ddp = subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         *train, "--train_batch", "64", "--checkpoints", tmp_path / "ddp"],
        cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    single = subprocess.run([sys.executable, *train, "--train_batch", "128", "--checkpoints", tmp_path / "single"],
                            cwd=REPO, env=_env(), capture_output=True, text=True, timeout=600)
    out, err = ddp.communicate(timeout=600)
    assert ddp.returncode == 0, err[-4000:]
    assert single.returncode == 0, single.stderr[-4000:]

    assert "distributed: 2 processes (gloo); batch 64 per process, effective batch 128 (2 x 64)" in out
    assert "distributed:" not in single.stdout
    # rank 0 alone logs ...
    assert out.count("training resnet9 with the resnet9 recipe") == 1
    assert len(re.findall(r"^epoch +\d/2 ", out, re.M)) == 2 and out.count("test accuracy:") == 1
    assert "error" not in err.lower()
    # ... and saves: one file of each kind, nothing per rank, nothing half-written
    assert sorted(os.listdir(tmp_path / "ddp")) == sorted(os.listdir(tmp_path / "single")) == \
        ["resnet9.pt", "resnet9_curves.png", "resnet9_history.json", "resnet9_last.pt"]

    ckpt_ddp, ckpt_one = load_checkpoint(tmp_path / "ddp" / "resnet9.pt"), load_checkpoint(tmp_path / "single" / "resnet9.pt")
    assert not any(k.startswith("module.") for k in ckpt_ddp["model"])   # saved unwrapped from DDP
    assert ckpt_ddp["history"]["lr"] == ckpt_one["history"]["lr"] and len(ckpt_one["history"]["lr"]) == 2 * 8
    record = json.loads((tmp_path / "ddp" / "resnet9_history.json").read_text())
    assert record["world_size"] == 2 and record["effective_batch"] == 128 and record["config"]["batch_size"] == 64

    acc_ddp, acc_one = ckpt_ddp["metrics"]["test_acc"], ckpt_one["metrics"]["test_acc"]
    print(f"test accuracy after 2 smoke epochs: 2 processes {acc_ddp:.3f}, 1 process {acc_one:.3f}")
    assert acc_ddp >= FLOOR and acc_one >= FLOOR
    assert abs(acc_ddp - acc_one) <= TOLERANCE


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
