"""Where training time goes: the arithmetic a model costs per image, the rate at which this
machine's matrix units do arithmetic, and the rate a real train step reaches.

    flops_per_image(get_model("resnet9"))               # 0.76e9 forward, 2.28e9 per training image
    flops_by_layer(model)                               # [(layer, forward FLOPs), ...]
    matmul_rate(dtype=torch.bfloat16)                   # FLOP/s of a 2048 x 2048 matmul, timed live
    train_rate(model, recipe, options, images, labels)  # training images per second, timed live

FLOPs are counted by torch.utils.flop_counter (a multiply-add counts 2), for the matrix
products and convolutions, which is where nearly all of the time goes.
"""
from __future__ import annotations

import copy
import logging

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from .hardware import RunOptions
from .loop import grad_scaler, to_device, train_one_epoch
from .optim import optimizer_for


def flops_per_image(model: nn.Module, train: bool = False) -> float:
    """FLOPs for one 32x32 image: the forward pass, or with train=True forward + backward
    (about 3x the forward: the backward computes gradients for inputs and for weights).
    Counted on a copy, so the model's weights, statistics and gradients stay as they were."""
    model = copy.deepcopy(model).train(train)
    if hasattr(model, "whitened"):
        model.whitened.fill_(True)           # the fast net: the count does not depend on its filters
    x = torch.zeros(2, 3, 32, 32, device=next(model.parameters()).device)   # 2: BatchNorm needs > 1 in train
    with FlopCounterMode(display=False) as counter:
        out = model(x)
        if train:
            out.float().sum().backward()
    return counter.get_total_flops() / len(x)


def flops_by_layer(model: nn.Module) -> list[tuple[str, float]]:
    """(layer name, forward FLOPs per image) for every layer that does arithmetic, in order."""
    was_training = model.training
    model.eval()
    with FlopCounterMode(display=False) as counter:
        model(torch.zeros(1, 3, 32, 32, device=next(model.parameters()).device))
    model.train(was_training)
    leaves = {name for name, m in model.named_modules() if not list(m.children())}
    rows = []
    for name, ops in counter.get_flop_counts().items():
        key = name.split(".", 1)[1] if "." in name else ""
        if key in leaves:
            rows.append((key, float(sum(ops.values()))))
    return [r for r in rows if r[1] > 0]


def _benchmark():
    """torch.utils.benchmark, imported without the warning it logs on machines without CUDA
    (it names the machine's CUDA_HOME, which has nothing to do with timing)."""
    log = logging.getLogger("torch.utils.cpp_extension")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        from torch.utils import benchmark
    finally:
        log.setLevel(level)
    return benchmark


def matmul_rate(n: int = 2048, dtype=torch.bfloat16, device="cpu", min_run_time: float = 2.0) -> float:
    """FLOP/s of an n x n by n x n matrix product on `device`: the ceiling that a network made
    of matrix products and convolutions can approach on this machine."""
    benchmark = _benchmark()
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    timer = benchmark.Timer("a @ b", globals={"a": a, "b": b}, num_threads=torch.get_num_threads())
    timer.timeit(2)                                                        # warm up
    return 2 * n ** 3 / timer.blocked_autorange(min_run_time=min_run_time).median


def train_rate(model: nn.Module, recipe, options: RunOptions, *, images: torch.Tensor, labels: torch.Tensor,
               min_run_time: float = 5.0) -> float:
    """Training images per second: one real train step (forward, loss, backward, optimizer)
    on the given normalised batch, with the recipe's optimizer and micro-batches and the options'
    precision and layout, timed by torch.utils.benchmark. The model's weights change: pass a throwaway copy."""
    benchmark = _benchmark()
    device = torch.device(options.device or "cpu")
    model.to(device)
    if options.channels_last:
        model.to(memory_format=torch.channels_last)
    x, y = to_device(images, device, options.channels_last), labels.to(device)
    optimizer = optimizer_for(recipe, model)
    loss_fn = nn.CrossEntropyLoss(label_smoothing=recipe.label_smoothing)
    quiet = RunOptions(str(device), options.amp, options.channels_last, progress=False)
    scaler = grad_scaler(device, options.amp)       # one for every step, as in training (fp16 only)

    def step():
        train_one_epoch(model, [(x, y)], optimizer, loss_fn=loss_fn, options=quiet, scaler=scaler,
                        micro_batch=recipe.micro_batch)

    step()                                                                 # warm up (oneDNN picks kernels)
    timer = benchmark.Timer("step()", globals={"step": step}, num_threads=torch.get_num_threads())
    return len(x) / timer.blocked_autorange(min_run_time=min_run_time).median


def resnet9_run_minutes(epochs: int = 24, device: str | None = None) -> dict:
    """S10's whole-run time on this course's runs: its median seconds per epoch (training plus
    the per-epoch test; the median ignores epochs slowed by other work or a pause) times `epochs`.
    From notebook 04's full run in artifacts/ when there is one (on `device`, if its saved model
    names one: older saves count as this machine's), else from the committed results
    (results/reference_runs.jsonl, the CPU runs of the S10 recipe), but only one measured on
    `device` (a runinfo.device_name, e.g. "AMD EPYC (CPU, 2 cores, native bf16)") when it is given: a time
    ratio means something only between runs on one device. Returns {"minutes", "source"};
    minutes is None when no such run exists."""
    import json
    import statistics

    from . import config
    from .checkpoint import load_checkpoint

    full = config.REPO_ROOT / "artifacts" / "resnet9_cifar10.pt"            # notebook 04, full settings
    if full.is_file():
        ckpt = load_checkpoint(full)
        seconds = ckpt.get("history", {}).get("seconds") or []
        ran_on = ckpt.get("device")                               # None: saved before checkpoints named it
        if seconds and not ckpt.get("smoke") and (device is None or ran_on in (None, device)):
            return {"minutes": statistics.median(seconds) * epochs / 60,
                    "source": f"notebook 04's run in artifacts/: median of {len(seconds)} epochs on "
                              f"{ran_on or 'this machine'}"}
    runs = config.REPO_ROOT / "results" / "reference_runs.jsonl"
    rows = [json.loads(line) for line in (runs.read_text().splitlines() if runs.is_file() else [])]
    rows = [r for r in rows if r["settings"]["recipe"] == "resnet9" and r["device_type"] == "cpu"
            and not r["settings"]["smoke"] and r["epochs_run"] == epochs]
    same = [r for r in rows if device is None or r["device"] == device]
    if same:
        r = same[-1]
        return {"minutes": r.get("epoch_seconds_median", r["epoch_seconds_mean"]) * epochs / 60,
                "source": f"the recorded run on {r['device']} (results/reference_runs.jsonl)"}
    if rows:
        return {"minutes": None, "source": f"the committed S10 runs were measured on {rows[-1]['device']}, "
                                           f"not on {device}: run notebook 04 here to compare times"}
    return {"minutes": None, "source": "no full run of the S10 recipe found: run notebook 04"}


__all__ = ["flops_per_image", "flops_by_layer", "matmul_rate", "train_rate", "resnet9_run_minutes"]
