"""Provenance: what every measured run records beside its figures (device, CPU, thread
count, package versions, commit, date), so that a number in results/ can be reproduced."""
from __future__ import annotations

import os
import platform
import re
import shlex
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
    """'NVIDIA H100 80GB HBM3 (cuda)' or 'AMD EPYC (CPU, 2 cores, native bf16)': a CPU's model
    name alone can stand for machines of different speeds, so its bf16 support is named too."""
    import torch

    from .hardware import native_bf16

    device = torch.device(device)
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (cuda)"
    if device.type == "cpu":
        return f"{cpu_name()} (CPU, {os.cpu_count()} cores, {'native' if native_bf16(device) else 'emulated'} bf16)"
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


def public_path(path) -> str:
    """A path as a record may print it, without the machine's folders: inside the repository,
    relative to it; elsewhere (absolute, `~`, climbing out with `..`, a Windows drive)
    `.../<its last part>`. A plain relative path stays as typed."""
    text = str(path)
    drive = re.match(r"^[A-Za-z]:[\\/]", text)
    if not (drive or text.startswith("~") or os.path.isabs(text) or ".." in re.split(r"[\\/]", text)):
        return text
    full = os.path.normpath(os.path.abspath(os.path.expanduser(text)))
    try:
        inside = not drive and os.path.commonpath([full, str(REPO_ROOT)]) == str(REPO_ROOT)
    except ValueError:                                   # another drive
        inside = False
    last = re.split(r"[\\/]", text.rstrip("/\\"))[-1]
    return os.path.relpath(full, REPO_ROOT) if inside else ".../" + last


def public_command(argv) -> str:
    """The command line as a record may print it (shell-quoted): every path argument, alone or
    after `--flag=`, through public_path."""
    def public(arg: str) -> str:
        flag, eq, value = arg.partition("=") if arg.startswith("-") else ("", "", arg)
        return flag + eq + public_path(value)
    return shlex.join(public(str(a)) for a in argv)


def run_info(device) -> dict:
    """Everything a results/ record states about the run that produced it."""
    import torch

    return {"device": device_name(device), "torch_threads": torch.get_num_threads(),
            "versions": package_versions(), "git": git_commit(),
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds")}


def emit(record: dict, out=None) -> None:
    """Print a measured run as one JSON line; with `out`, append it to that .jsonl file
    (rewritten atomically, so a crash never leaves half a line)."""
    import json
    from pathlib import Path

    from .files import atomic_write, jsonable

    line = json.dumps(record, default=jsonable)
    print(line, flush=True)
    if out:
        old = Path(out).read_text() if Path(out).exists() else ""
        with atomic_write(out, "w") as f:
            f.write(old + line + "\n")
