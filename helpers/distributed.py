"""Scale-out: run `python -m helpers train` under torchrun with DistributedDataParallel.

    torchrun --nproc_per_node=2 -m helpers train --arch resnet9          # 2 GPUs (or 2 CPU processes)
    python -m torch.distributed.run --standalone --nproc_per_node=2 -m helpers train ...

torchrun starts one process per GPU and sets RANK, LOCAL_RANK and WORLD_SIZE (plus
MASTER_ADDR/MASTER_PORT) in each one's environment. `distributed()` reads them, joins
the process group (NCCL on CUDA, with process i on cuda:LOCAL_RANK; gloo on CPU), and
leaves it at the end. Everything else is already in the engine: `engine.train` splits the
training set across the processes (DistributedSampler), `engine.fit` wraps the model in
DistributedDataParallel, and rank 0 alone evaluates, logs and saves.

The batch size is per process: the effective batch of one optimizer step is
WORLD_SIZE x batch size. The learning rate is not rescaled.
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Iterator

from .errors import CourseError

TORCHRUN_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE")


class DistributedError(CourseError):
    """The torchrun environment is incomplete or the process group cannot be joined."""


@dataclass
class DistInfo:
    """Where this process stands: its rank, its local rank, the world size and its device."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: object = None          # a torch.device
    backend: str | None = None     # "nccl", "gloo", or None when not distributed

    @property
    def enabled(self) -> bool:
        return self.backend is not None

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def torchrun_env(environ=None) -> dict[str, int] | None:
    """{"rank", "local_rank", "world_size"} when torchrun launched this process with more than
    one process, else None. A partial or malformed torchrun environment raises DistributedError."""
    environ = os.environ if environ is None else environ
    present = [v for v in TORCHRUN_VARS if v in environ]
    if not present:
        return None
    if len(present) != len(TORCHRUN_VARS):
        missing = sorted(set(TORCHRUN_VARS) - set(present))
        raise DistributedError(f"{', '.join(present)} set but {', '.join(missing)} missing: "
                               "launch with torchrun (or unset them for a single process)")
    try:
        values = {v.lower(): int(environ[v]) for v in TORCHRUN_VARS}
    except ValueError:
        raise DistributedError("RANK, LOCAL_RANK and WORLD_SIZE must be whole numbers: "
                               "launch with torchrun") from None
    if values["world_size"] < 1 or not 0 <= values["rank"] < values["world_size"]:
        raise DistributedError(f"RANK {values['rank']} is outside 0..WORLD_SIZE-1 "
                               f"(WORLD_SIZE {values['world_size']}): launch with torchrun")
    return values if values["world_size"] > 1 else None


def setup(device: str | None = None, timeout_s: float = 1800) -> DistInfo:
    """Join the process group when torchrun launched us; else a single-process DistInfo.

    `device`: None/"auto" picks cuda:LOCAL_RANK when CUDA is available, else the CPU;
    "cuda" means cuda:LOCAL_RANK; "cpu" forces gloo on the CPU.
    """
    import torch
    import torch.distributed as dist

    from .hardware import get_device

    env = torchrun_env()
    if env is None:
        return DistInfo(device=get_device(device))
    if not dist.is_available():
        raise DistributedError("this PyTorch build has no torch.distributed: run a single process")
    rank, local_rank, world = env["rank"], env["local_rank"], env["world_size"]
    if device in (None, "", "auto"):
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = get_device(device)
    if dev.type == "cuda":
        if dev.index is None:
            if local_rank >= torch.cuda.device_count():
                raise DistributedError(f"local rank {local_rank} has no GPU: this machine shows "
                                       f"{torch.cuda.device_count()}; use --nproc_per_node="
                                       f"{torch.cuda.device_count()} or fewer")
            dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
        backend = "nccl"
    elif dev.type == "cpu":
        backend = "gloo"
    else:
        raise DistributedError(f"distributed training runs on CUDA (NCCL) or the CPU (gloo), "
                               f"not {dev.type}: add --device cpu")
    if not dist.is_initialized():
        try:
            dist.init_process_group(backend, init_method="env://", rank=rank, world_size=world,
                                    timeout=timedelta(seconds=timeout_s))
        except (RuntimeError, ValueError) as e:
            raise DistributedError(f"cannot join the {backend} process group as rank {rank} of "
                                   f"{world} ({str(e).splitlines()[0][:120]}): launch with torchrun") from None
    return DistInfo(rank, local_rank, world, dev, backend)


def cleanup() -> None:
    """Leave the process group, if one was joined."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


@contextmanager
def distributed(device: str | None = None) -> Iterator[DistInfo]:
    """`with distributed(args.device) as info:` joins the group under torchrun and always leaves it."""
    info = setup(device)
    try:
        yield info
    finally:
        if info.enabled:
            cleanup()


# ----------------------------------------------------------------------------------------
# What the training loop asks of a process group (each a no-op in a single process)
# ----------------------------------------------------------------------------------------
def is_distributed() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def is_main() -> bool:
    """True in a single process, and on rank 0 of a distributed run."""
    import torch.distributed as dist

    return not is_distributed() or dist.get_rank() == 0


def all_reduce(tensor, op: str = "sum"):
    """`tensor` summed ("sum") or maximised ("max") over every process, in place; returns it."""
    if is_distributed():
        import torch.distributed as dist

        dist.all_reduce(tensor, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
    return tensor


def from_rank0(value):
    """Rank 0's `value` on every rank (in a single process: `value`)."""
    if not is_distributed():
        return value
    import torch.distributed as dist

    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]
