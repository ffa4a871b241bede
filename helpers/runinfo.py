"""Provenance: what every measured run records beside its figures (device, CPU, thread
count, package versions, commit, date), so that a number in results/ can be reproduced."""
from __future__ import annotations

import os
import platform
import subprocess
from datetime import datetime, timezone
from importlib import metadata

from .config import REPO_ROOT

PACKAGES = ("torch", "torchvision", "numpy", "albumentations", "matplotlib", "pillow", "tqdm")


def package_versions() -> dict:
    """Python's and the main packages' versions."""
    versions = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return versions


def cpu_name() -> str:
    """The CPU's model name (Linux /proc/cpuinfo), else what platform knows."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device) -> str:
    """'NVIDIA H100 80GB HBM3 (cuda)' or 'AMD EPYC (CPU, 2 cores)'."""
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (cuda)"
    if device.type == "cpu":
        return f"{cpu_name()} (CPU, {os.cpu_count()} cores)"
    return str(device)


def git_commit() -> dict:
    """{'commit': HEAD or None, 'dirty': uncommitted changes to tracked files}."""
    def git(*args):
        try:
            return subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True,
                                  timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""
    return {"commit": git("rev-parse", "HEAD") or None,
            "dirty": bool(git("status", "--porcelain", "--untracked-files=no"))}


def public_command(argv) -> str:
    """The command line as a record may print it: no path of the machine that ran it. An absolute
    path (alone or after `--flag=`) becomes relative to the repository when inside it, else
    `.../<its last part>`."""
    def public(arg: str) -> str:
        flag, eq, value = arg.partition("=") if arg.startswith("-") else ("", "", arg)
        if not os.path.isabs(value):
            return arg
        path = os.path.normpath(value)
        inside = os.path.commonpath([path, str(REPO_ROOT)]) == str(REPO_ROOT)
        return flag + eq + (os.path.relpath(path, REPO_ROOT) if inside else f".../{os.path.basename(path)}")
    return " ".join(public(str(a)) for a in argv)


def run_info(device) -> dict:
    """Everything a results/ record states about the run that produced it."""
    import torch

    return {"device": device_name(device), "torch_threads": torch.get_num_threads(),
            "versions": package_versions(), "git": git_commit(),
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds")}
