"""The LR range test (torch-lr-finder's rules, written out), the choice of LR_MAX and LR_MIN,
and the small JSON file that carries that choice from notebook 03 to notebook 04.

    result = range_test(model, train_loader, optimizer)      # model and optimizer restored after
    plots.lr_range_test(result)                              # loss against LR, suggestion marked (helpers.plots)
    save_lr_choice(lr_choice_file(smoke), result.suggestion) # LR_MIN defaults to LR_MAX / 10
    load_lr_choice(lr_choice_file(smoke))                    # -> {"lr_max", "lr_min", "source", ...}

The range test trains for `num_iter` batches while the LR grows geometrically from
`start_lr` to `end_lr` (it stops early only if the smoothed loss exceeds DIVERGE_TH times its
lowest value so far, or at a NaN). The suggestion is the LR where the smoothed loss falls
fastest: the steepest descent, as torch-lr-finder's own plot suggests. torch-lr-finder itself
is the reference the tests compare this code with, loss for loss.
"""
from __future__ import annotations

import copy
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from . import config
from .errors import ConfigError, require_positive, require_whole
from .files import save_json
from .hardware import RunOptions
from .loop import autocast, to_device

LR_CHOICE_NAME = "lr_choice.json"     # in config.artifacts_dir(): written by notebook 03, read by 04
SKIP_START = 10   # torch-lr-finder's plot ignores the first 10 points (the loss barely moves there)
SKIP_END = 5      # ... and the last 5 (where the loss turns up, or explodes)
SMOOTH_F = 0.05   # torch-lr-finder's defaults: the loss curve's exponential smoothing ...
DIVERGE_TH = 5    # ... and the test stops once the loss exceeds 5x its best
RULE = "lowest loss / 10"   # how choose_lr reads LR_MAX off the test (see rules; results/lr_study.md)


# ----------------------------------------------------------------------------------------
# The range test
# ----------------------------------------------------------------------------------------
@dataclass(kw_only=True)
class RangeTestResult:
    """What a range test found: the LR and the smoothed training loss at every iteration."""

    lrs: list[float]              # geometric, from start_lr towards end_lr
    losses: list[float]           # exponentially smoothed training loss (as torch-lr-finder's history)
    suggestion: float             # the LR of steepest descent of the smoothed loss
    num_iter: int                 # iterations asked for (fewer ran when the loss diverged)
    diverged: bool = False        # True when the test stopped early because the loss exploded
    skip_start: int = SKIP_START  # points ignored at each end when looking for the suggestion
    skip_end: int = SKIP_END
    start_lr: float = 1e-7
    end_lr: float = 10.0
    suggestion_index: int = 0     # where the suggestion lies in lrs / losses
    raw_losses: list[float] = field(default_factory=list)   # each batch's loss, before smoothing


def steepest_descent(lrs, losses, skip_start: int = SKIP_START, skip_end: int = SKIP_END):
    """(lr, index, skip_start, skip_end): the point where the loss falls fastest.

    Exactly torch-lr-finder's `plot(suggest_lr=True)`: drop `skip_start` points at the start
    and `skip_end` at the end, then take the minimum of numpy's gradient of the loss (per
    point, on the log-spaced LR grid). A test too short for those margins (smoke mode runs 8
    iterations) keeps 10% and 5% of its points as margins instead, and at least 2 points.
    """
    lrs, losses = list(lrs), list(losses)
    n = len(losses)
    if n != len(lrs) or n < 2:
        raise ConfigError(f"a range test needs at least 2 (LR, loss) points, got {n}: run more iterations")
    if n < skip_start + skip_end + 2:
        skip_start, skip_end = int(n * 0.10), int(n * 0.05)
    lo, hi = skip_start, n - skip_end
    idx = lo + int(np.gradient(np.asarray(losses[lo:hi], dtype=np.float64)).argmin())
    return float(lrs[idx]), idx, skip_start, skip_end


def valley(losses) -> int:
    """fastai's "valley" rule: the index about two-thirds of the way down the longest descent.

    The longest descent is the longest run of points, left to right, each lower than the one
    before it (not necessarily adjacent: a longest decreasing subsequence); the suggestion lies
    at its start + 1/3 + 1/6 of its length. Written as fastai's `valley` computes it.
    """
    longest, start, end = [1] * len(losses), 0, 0
    for i in range(1, len(losses)):
        for j in range(i):
            if losses[i] < losses[j] and longest[i] < longest[j] + 1:
                longest[i] = longest[j] + 1
            if longest[end] < longest[i]:
                end, start = i, i - longest[i]
    third = (end - start) / 3
    return start + int(third) + int(third / 2)


def rules(result) -> dict[str, float]:
    """The LR_MAX each rule reads off one range test's smoothed loss, all ignoring the same ends:
    the steepest descent (torch-lr-finder's plot), fastai's valley, and a tenth of the LR of the
    lowest loss (fastai's `minimum`: the lowest loss is the edge of divergence, a tenth of it a safe peak)."""
    lo, hi = result.skip_start, len(result.losses) - result.skip_end
    lrs, losses = result.lrs[lo:hi], result.losses[lo:hi]
    return {"steepest descent": float(result.suggestion),
            "valley": float(lrs[valley(losses)]),
            "lowest loss / 10": float(lrs[int(np.argmin(losses))]) / 10}


def _check_ordered(low_name: str, low, high_name: str, high, hint: str) -> None:
    """Both LRs positive and finite, and low < high; else a ConfigError saying which."""
    for name, value in ((high_name, high), (low_name, low)):
        require_positive(name, value, " (learning rates are numbers like 2.5e-3)")
        if not math.isfinite(value):
            raise ConfigError(f"{name} must be finite, got {value!r}")
    if not low < high:
        raise ConfigError(f"{low_name} {low:g} must be below {high_name} {high:g}{hint}")


def lr_choice_file(smoke: bool) -> Path:
    """Where notebook 03 leaves its LR choice for notebook 04 (artifacts/, or artifacts/smoke/)."""
    return config.artifacts_dir(smoke) / LR_CHOICE_NAME


def default_num_iter(smoke: bool) -> int:
    """100 iterations, or config.SMOKE_LR_FINDER_ITERS in smoke mode."""
    return config.SMOKE_LR_FINDER_ITERS if smoke else config.LR_FINDER_ITERS


def default_batch_size(smoke: bool) -> int:
    """S10's batch size (512), or config.SMOKE_BATCH_SIZE in smoke mode."""
    return config.SMOKE_BATCH_SIZE if smoke else config.BATCH_SIZE


def range_test_loader(data, batch_size: int = config.BATCH_SIZE, seed: int = 0):
    """The shuffled, augmented (S10's) training loader a range test draws its batches from."""
    from .augment import train_transforms
    from .loaders import make_loader

    return make_loader(data.train_images, data.train_labels, train_transforms(data.mean, data.std),
                       batch_size=batch_size, shuffle=True, seed=seed)


def range_test(model: nn.Module, train_loader, optimizer: torch.optim.Optimizer, *, loss_fn=None,
               start_lr: float = 1e-7, end_lr: float = 10, num_iter: int = config.LR_FINDER_ITERS,
               options: RunOptions | None = None) -> RangeTestResult:
    """Leslie Smith's LR range test, on the model's device; the model and optimizer are restored after.

    Step i trains one batch at LR start_lr * (end_lr / start_lr) ** (i / (num_iter - 1)) and
    records its loss; the smoothed loss is an exponential moving average (each new batch weighted
    SMOOTH_F). The test stops early when the smoothed loss exceeds DIVERGE_TH times its lowest
    value so far, or at the first NaN or infinite loss. These are torch-lr-finder's `range_test`
    rules (step_mode="exp"; it goes on past a NaN), and the losses equal its, batch for batch
    (tests/test_lr_finder.py). `options` gives the progress bar and the precision: bf16 autocast
    for amp="bf16", as training will run; fp32 otherwise (fp16 would need a loss scale).
    """
    _check_ordered("start_lr", start_lr, "end_lr", end_lr, ": swap them")
    require_whole("num_iter", num_iter, minimum=2)
    options = options or RunOptions()
    device, loss_fn = next(model.parameters()).device, loss_fn or nn.CrossEntropyLoss()
    saved = copy.deepcopy(model.state_dict()), copy.deepcopy(optimizer.state_dict())
    batches, lrs, raw, smoothed = _endless(train_loader), [], [], []
    try:
        model.train()
        for i in tqdm(range(num_iter), desc="LR range test", leave=False, disable=not options.progress,
                      dynamic_ncols=True):
            lr = start_lr * (end_lr / start_lr) ** (i / (num_iter - 1))
            for group in optimizer.param_groups:
                group["lr"] = lr
            x, y = next(batches)
            x, y = to_device(x, device, options.channels_last), y.to(device)
            with autocast(device, "bf16" if options.amp == "bf16" else None):
                loss = loss_fn(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            value = loss.item()
            if not math.isfinite(value):                 # NaN never trips the divergence rule
                break
            lrs.append(lr)
            raw.append(value)
            smoothed.append(value if i == 0 else SMOOTH_F * value + (1 - SMOOTH_F) * smoothed[-1])
            if smoothed[-1] > DIVERGE_TH * min(smoothed):
                break
    finally:
        model.load_state_dict(saved[0])                  # the weights and BN statistics as they were
        optimizer.load_state_dict(saved[1])              # ... and the optimizer's state and LR
    if len(lrs) < 2:
        raise ConfigError(f"the range test diverged at once (LR {start_lr:g}): lower start_lr")
    suggestion, index, skip_start, skip_end = steepest_descent(lrs, smoothed)
    return RangeTestResult(lrs=lrs, losses=smoothed, raw_losses=raw, suggestion=suggestion, suggestion_index=index,
                           num_iter=num_iter, diverged=len(lrs) < num_iter, skip_start=skip_start, skip_end=skip_end,
                           start_lr=float(start_lr), end_lr=float(end_lr))


def _endless(loader):
    """The loader's batches, starting over whenever it runs out (a short loader, a long test)."""
    while True:
        yield from loader


# ----------------------------------------------------------------------------------------
# Choosing LR_MAX and LR_MIN
# ----------------------------------------------------------------------------------------
def choose_lr(result: RangeTestResult, smoke: bool = False, rule: str = RULE) -> dict:
    """The LRs to train with: LR_MAX = what `rule` (a key of `rules`) reads off the range test,
    LR_MIN = LR_MAX / 10 (S10's ratio). RULE is the rule the validation runs of
    results/lr_study.md back.

    In smoke mode a few iterations on 1,000 images make every rule's answer noise, so S10's
    LR_MAX (config.LR_MAX) is chosen instead; the rules' answers are still recorded.
    Returns keyword arguments for save_lr_choice.
    """
    found = rules(result)
    if rule not in found:
        raise ConfigError(f"unknown rule {rule!r}: choose one of {', '.join(found)}")
    info = {"rule": rule, "rules": found, "num_iter": len(result.lrs), "smoke": bool(smoke)}
    if smoke:
        return {"lr_max": config.LR_MAX, "lr_min": config.LR_MIN, "source": "S10's LR_MAX (smoke mode)",
                "note": f"smoke mode: a {len(result.lrs)}-iteration range test reads noise, so S10's LR_MAX is used",
                **info}
    return {"lr_max": found[rule], "lr_min": found[rule] / 10, "source": "lr_finder",
            "note": f"LR_MAX = the range test's {rule}, LR_MIN = LR_MAX / 10", **info}


def save_lr_choice(path, lr_max: float, lr_min: float | None = None, **info) -> Path:
    """Write {"lr_max", "lr_min", "source", **info} as JSON, atomically (temporary file + rename).

    `path`: e.g. lr_choice_file(smoke). lr_min defaults to lr_max / 10.
    Raises ConfigError unless both LRs are positive and finite and lr_min < lr_max.
    """
    path = Path(path)
    if isinstance(lr_max, (np.floating, np.integer)):
        lr_max = lr_max.item()
    lr_min = lr_max / 10 if lr_min is None and isinstance(lr_max, (int, float)) else lr_min
    if isinstance(lr_min, (np.floating, np.integer)):
        lr_min = lr_min.item()
    _check_ordered("lr_min", lr_min, "lr_max", lr_max, " (S10 uses lr_max / 10)")
    record = {"lr_max": float(lr_max), "lr_min": float(lr_min), "source": info.pop("source", "manual"),
              **info}
    try:
        save_json(path, record, indent=2)
    except ValueError as e:
        raise ConfigError(f"cannot write the LR choice as JSON: {e}") from None
    return path


def load_lr_choice(path) -> dict:
    """The saved LR choice, or S10's documented values when there is no file.

    Missing file: {"lr_max": config.LR_MAX (2.54e-3), "lr_min": config.LR_MIN (LR_MAX / 10),
    "source": "defaults", "note": ...}. A file that is not valid JSON or holds bad values
    raises ConfigError naming the file (run notebook 03 again, or delete it).
    """
    path = Path(path)
    if not path.is_file():
        return {"lr_max": config.LR_MAX, "lr_min": config.LR_MIN, "source": "defaults",
                "note": f"no {path.name} found: S10's LR_MAX and LR_MIN from helpers.config "
                        "(run 03_lr_finder.ipynb to choose your own)"}
    try:
        record = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise ConfigError(f"{path} is not a readable LR choice ({type(e).__name__}): "
                          "run 03_lr_finder.ipynb again or delete the file") from None
    if not isinstance(record, dict) or "lr_max" not in record:
        raise ConfigError(f"{path} holds no lr_max: run 03_lr_finder.ipynb again or delete the file")
    lr_max = record["lr_max"]
    lr_min = record.get("lr_min")
    if lr_min is None and isinstance(lr_max, (int, float)) and not isinstance(lr_max, bool):
        lr_min = lr_max / 10
    try:
        _check_ordered("lr_min", lr_min, "lr_max", lr_max, " (S10 uses lr_max / 10)")
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
    record.update(lr_max=float(lr_max), lr_min=float(lr_min))
    record.setdefault("source", "saved")
    return record


# ----------------------------------------------------------------------------------------
# The planned OneCycle schedule (S10's), computed with the training engine's own scheduler
# ----------------------------------------------------------------------------------------
@dataclass(kw_only=True)
class SchedulePlan:
    """The LR at every optimizer step of a OneCycle run, and the numbers that describe it."""

    lrs: list[float] = field(repr=False)
    train_size: int
    batch_size: int
    epochs: int
    peak_epoch: int
    steps_per_epoch: int
    total_steps: int
    peak_step: int        # 0-based step with the highest LR
    lr_max: float
    lr_min: float

    def describe(self) -> str:
        """The schedule's shape in words and numbers (no LR values, which depend on the run)."""
        lrs = np.asarray(self.lrs)
        return "\n".join([
            f"training images:     {self.train_size:,}",
            f"batch size:          {self.batch_size}",
            f"iterations / epoch:  {self.steps_per_epoch}  (ceil({self.train_size:,} / {self.batch_size}))",
            f"epochs:              {self.epochs}",
            f"iterations in all:   {self.total_steps:,}  ({self.steps_per_epoch} x {self.epochs})",
            f"peak LR at step:     {self.peak_step}  (0-based; the last step of epoch "
            f"{self.peak_step // self.steps_per_epoch + 1})",
            f"LR at step 0:        LR_MAX x {lrs[0] / self.lr_max:.2f}  (= LR_MIN)",
            f"LR at the last step: LR_MAX x {lrs[-1] / self.lr_max:.2f}  (= LR_MIN)",
            f"lowest LR:           LR_MIN x {lrs.min() / self.lr_min:.2f}  "
            f"(never below LR_MIN: no annihilation)",
        ])


def planned_one_cycle(lr_max: float = config.LR_MAX, lr_min: float | None = None, *,
                      epochs: int = config.EPOCHS, peak_epoch: int = config.PEAK_EPOCH,
                      train_size: int = 50_000, batch_size: int = config.BATCH_SIZE) -> SchedulePlan:
    """Step helpers.optim.one_cycle on a dummy optimizer and record the LR of every step.

    The defaults are S10's full run: 50,000 images at batch 512 -> 98 steps per epoch,
    24 epochs -> 2,352 steps, the peak on the last step of epoch 5 (step 489).
    """
    from .optim import one_cycle

    for name, value in (("train_size", train_size), ("batch_size", batch_size)):
        require_whole(name, value)
    lr_min = lr_max / 10 if lr_min is None else lr_min
    steps_per_epoch = -(-train_size // batch_size)    # the last, smaller batch is kept
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=lr_max)
    scheduler = one_cycle(optimizer, lr_max, lr_min, epochs=epochs, steps_per_epoch=steps_per_epoch,
                          peak_epoch=peak_epoch)
    lrs = []
    for _ in range(epochs * steps_per_epoch):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()      # no gradients: changes nothing, but keeps the scheduler's order check quiet
        scheduler.step()
    return SchedulePlan(lrs=lrs, train_size=train_size, batch_size=batch_size, epochs=epochs, peak_epoch=peak_epoch,
                        steps_per_epoch=steps_per_epoch, total_steps=len(lrs), peak_step=int(np.argmax(lrs)),
                        lr_max=float(lr_max), lr_min=float(lr_min))


__all__ = ["lr_choice_file", "RangeTestResult", "steepest_descent", "range_test", "range_test_loader",
           "valley", "rules", "RULE", "choose_lr", "save_lr_choice", "load_lr_choice", "SchedulePlan",
           "planned_one_cycle", "default_num_iter", "default_batch_size"]
