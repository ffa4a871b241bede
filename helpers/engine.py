"""Training engine. Start with `train_one_epoch`: the training loop itself, on one screen.
`fit` runs it epoch after epoch and evaluates after each; `train` runs a whole recipe
from helpers.config.

    history = fit(model, train_loader, test_loader, optimizer, epochs, scheduler)
    history["test_acc"][-1], history["lr"]        # per-epoch metrics, the LR at every step

The sections after `fit` are the pieces around the loop, each on its own: early stopping,
checkpoints with exact resume, DistributedDataParallel, `train`, then how a run uses the
hardware (RunOptions: device, mixed precision, channels_last, torch.compile, the on-device
augmentation), seeding, optimizers and the OneCycle schedule.
"""
from __future__ import annotations

import copy
import math
import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from tqdm import tqdm

from .analysis import autocast, predict_logits, to_device
from .checkpoint import (check_resume, load_checkpoint, rng_state, save_checkpoint, set_rng_state, setting_changes,
                         unwrap)
from .config import Recipe
from .data import CIFAR10Data, DeviceLoader, make_loader
from .errors import CheckpointError, ConfigError, DivergenceError, require_positive, require_whole
from .models import FastNet, get_model, init_whitening


# ----------------------------------------------------------------------------------------
# The training loop: one epoch
# ----------------------------------------------------------------------------------------
FP16_ON_CPU = ("fp16 on a CPU is emulated, dozens of times slower than bf16: use bf16 (--amp bf16) on a CPU with "
               "AVX-512 BF16 or AMX, else fp32 (--amp off)")
GUARD_WINDOW = 20          # the divergence guard reads the losses back once per this many steps
DIVERGENCE_FACTOR = 10.0   # ... and stops a run whose loss climbs past this many times its start


def train_one_epoch(model: nn.Module, loader, optimizer, scheduler=None, loss_fn=None, *,
                    options: RunOptions | None = None, scaler=None, first_step: int = 0,
                    guard: DivergenceGuard | None = None, desc: str = "train") -> dict:
    """One pass over `loader` on the model's device, stepping the scheduler once per batch.

    Returns {"loss", "acc", "lr": [the LR of every step]}. `options` gives the precision,
    memory layout and progress bar; `scaler` is fp16's grad scaler (fit makes one);
    `first_step` numbers the steps for the divergence guard, which `fit` keeps for the whole run.
    """
    opt = options or RunOptions()
    guard = guard or DivergenceGuard()
    device = next(model.parameters()).device                           # the batches go where the model is
    loss_fn = loss_fn or nn.CrossEntropyLoss()
    model.train()
    total_loss = torch.zeros((), device=device, dtype=torch.float64)    # running sums, kept on
    correct = torch.zeros((), device=device, dtype=torch.int64)         # the device: no sync
    seen, lrs = 0, []
    bar = tqdm(loader, desc=desc, leave=False, disable=not (opt.progress and _is_main()), dynamic_ncols=True)
    for step, (x, y) in enumerate(bar):
        x, y = to_device(x, device, opt.channels_last), y.to(device, non_blocking=True)
        lr = optimizer.param_groups[0]["lr"]
        with autocast(device, opt.amp):          # bf16/fp16 where options.amp asks for it
            out = model(x)
            loss = loss_fn(out, y)
        optimizer.zero_grad(set_to_none=True)
        if scaler is None:
            loss.backward()                      # the gradients ...
            optimizer.step()                     # ... and one step down them
        else:                                    # fp16: scale the loss so small gradients survive
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        if scheduler is not None:
            scheduler.step()
        lrs.append(lr)
        total_loss += loss.detach().double() * len(y)
        correct += (out.argmax(1) == y).sum()
        seen += len(y)
        if guard.add(loss, first_step + step, lr, len(y)) and opt.progress:     # the guard read the losses back:
            bar.set_postfix(loss=f"{total_loss.item() / seen:.3f}",      # showing them costs no extra wait
                            acc=f"{correct.item() / seen:.3f}", lr=f"{lr:.2e}")
    guard.check()                                # the epoch's last losses, before anything is saved
    mean_loss, acc = _mean_over_ranks(total_loss, correct, seen)
    return {"loss": mean_loss, "acc": acc, "lr": lrs}


class DivergenceGuard:
    """Stops a run whose loss has diverged: raises DivergenceError, naming the step and the
    LR, when a loss is NaN or infinite, or when the mean loss of a window of steps (weighted by
    their images, so that a short last batch counts for little) exceeds DIVERGENCE_FACTOR times
    the larger of the run's first loss and ln 10 (chance level for ten classes). A run that
    learns never climbs that far above where it started; a too-high LR does, often to 1e10 and
    beyond, before any NaN. The ln 10 floor keeps a resumed run, whose first loss may be tiny,
    from being stopped by an ordinary noisy window.

    The losses stay on the device and are read back once every GUARD_WINDOW steps and at the
    end of each epoch, so the loop never waits for the device step by step. Under DDP every
    process reads the worst of all processes' losses, so they stop together.
    """

    def __init__(self, window: int = GUARD_WINDOW, factor: float = DIVERGENCE_FACTOR, floor: float = math.log(10)):
        self.window, self.factor, self.floor = window, factor, floor
        self.limit: float | None = None            # factor x max(first loss, floor), set by the first check
        self.pending: list = []                    # (loss tensor, images, step, lr) not yet read back
        self.last_lr: float | None = None

    def add(self, loss: torch.Tensor, step: int, lr: float, images: int = 1) -> bool:
        """Keep one step's loss; check when a window is full. True when it checked."""
        self.pending.append((loss.detach(), images, step, lr))
        if len(self.pending) < self.window:
            return False
        self.check()
        return True

    def check(self) -> None:
        """Read the pending losses back (one wait on the device) and raise if they diverged."""
        if not self.pending:
            return
        losses = torch.stack([p[0].float() for p in self.pending])
        if _is_distributed():                      # the worst of every process's (NaN counts as inf)
            losses = torch.nan_to_num(losses, nan=math.inf)
            dist.all_reduce(losses, op=dist.ReduceOp.MAX)
        values, (_, images, steps, lrs) = losses.tolist(), zip(*self.pending)
        self.pending = []
        if self.limit is None and math.isfinite(values[0]):
            self.limit = self.factor * max(values[0], self.floor)
        previous = self.last_lr
        for value, step, lr in zip(values, steps, lrs):
            if not math.isfinite(value):
                before = f", after a step at LR {previous:.3g}" if previous not in (None, lr) else ""
                raise DivergenceError(f"loss became {value} at step {step} (LR {lr:.3g}{before}): "
                                      f"{self._hint(max(lr, previous or lr))}")
            previous = lr
        mean = sum(v * n for v, n in zip(values, images)) / sum(images)
        if self.limit is not None and mean > self.limit:
            raise DivergenceError(f"loss grew to {mean:.3g} over steps {steps[0]}-{steps[-1]} (LR {lrs[-1]:.3g}), "
                                  f"past {self.limit:.3g} ({self.factor:g}x where the run started): "
                                  f"{self._hint(max(lrs + (self.last_lr or 0,)))}")
        self.last_lr = lrs[-1]

    @staticmethod
    def _hint(lr: float) -> str:
        return f"the LR is too high; try a lower one, e.g. {lr / 10:.3g}"


def evaluate(model: nn.Module, loader, loss_fn=None, device="cpu", amp: str | None = None,
             channels_last: bool = False, tta_flip: bool = False, progress: bool = True,
             desc: str = "eval", tta_shift: int = 0) -> dict:
    """{"loss", "acc"} of `model` over `loader` (mean cross-entropy, top-1 accuracy)."""
    loss_fn = loss_fn or nn.CrossEntropyLoss()
    logits, labels = predict_logits(model, loader, device, amp, channels_last, tta_flip,
                                    progress and _is_main(), desc, tta_shift)
    return {"loss": loss_fn(logits, labels).item(), "acc": (logits.argmax(1) == labels).float().mean().item()}


# ----------------------------------------------------------------------------------------
# fit: the loop epoch after epoch, with an evaluation after each
# ----------------------------------------------------------------------------------------
HISTORY_KEYS = ("train_loss", "train_acc", "test_loss", "test_acc", "lr", "seconds")


def new_history() -> dict:
    """Per-epoch train/test loss and accuracy, the LR at every step, and the seconds per
    epoch (the only entry that differs between identical runs)."""
    return {k: [] for k in HISTORY_KEYS}


@dataclass
class FitOptions:
    """What fit does around the loop besides training: all off by default."""

    early_stopping: int | EarlyStopping | None = None   # patience in epochs; restores the best
    checkpoint_path: str | os.PathLike | None = None     # the whole state, after every epoch
    resume: str | os.PathLike | None = None              # continue exactly from such a file
    arch: str | None = None          # the model's name in checkpoints (None: found from the model)
    config: dict | None = None       # the recipe, saved in every checkpoint
    eval_name: str = "test"          # what test_loader holds, for the log ("val": a validation split)


def fit(model: nn.Module, train_loader, test_loader, optimizer, epochs: int, scheduler=None,
        loss_fn=None, options: RunOptions | None = None, extras: FitOptions | None = None,
        log=print) -> dict:
    """Train for `epochs`, evaluating on `test_loader` after each; returns the history
    (see new_history; with early stopping also "best_epoch").

    `options` says how to run (RunOptions: device, precision, torch.compile, the on-device
    augmentation, progress); `extras` what else to do (FitOptions: early stopping, a
    checkpoint after every epoch, resume). A NaN or infinite loss raises
    DivergenceError and leaves the last checkpoint as it was.
    """
    require_whole("epochs", epochs)
    opt, ext = options or RunOptions(), extras or FitOptions()
    device = get_device(opt.device)
    if opt.amp == "fp16" and device.type == "cpu":              # the command line refuses it outright
        warnings.warn(FP16_ON_CPU, stacklevel=2)
    net, train_net = _place_model(model, device, opt)
    if opt.fast_augment:                         # the uint8 images move to the device once
        train_loader = DeviceLoader.from_loader(train_loader, device)
    loss_fn = loss_fn or nn.CrossEntropyLoss()
    state = TrainingState(model, optimizer, scheduler,
                          torch.amp.GradScaler(device.type) if opt.amp == "fp16" else None,
                          EarlyStopping.make(ext.early_stopping), ext.arch or _arch_name(model),
                          ext.config or {}, options=opt.recorded())
    start = 0 if ext.resume is None else state.resume(ext.resume, epochs, log)
    steps, guard = len(train_loader), DivergenceGuard()
    for epoch in range(start, epochs):
        t0 = time.perf_counter()
        if hasattr(train_loader, "set_epoch"):
            train_loader.set_epoch(epoch)        # the epoch's shuffle and augmentation: f(seed, epoch)
        tr = train_one_epoch(train_net, train_loader, optimizer, scheduler, loss_fn, options=opt,
                             scaler=state.scaler, first_step=epoch * steps, guard=guard,
                             desc=f"epoch {epoch + 1}/{epochs}")
        stop, broken = False, None
        if _is_main():                           # under DDP rank 0 alone evaluates, logs and saves
            te = evaluate(net, test_loader, loss_fn, device, opt.amp, opt.channels_last, progress=opt.progress)
            if device.type == "cuda":
                torch.cuda.synchronize()
            if math.isfinite(te["loss"]):
                state.record(tr, te, time.perf_counter() - t0)
                stop = state.stopper is not None and state.stopper.step(te["acc"], model, epoch)
                if opt.progress:
                    log(f"epoch {epoch + 1:>3}/{epochs}  train loss {tr['loss']:.4f} acc {tr['acc']:.4f}  "
                        f"{ext.eval_name} loss {te['loss']:.4f} acc {te['acc']:.4f}  lr {tr['lr'][-1]:.2e}")
                if ext.checkpoint_path is not None:
                    state.save(ext.checkpoint_path, epoch)
            else:                                # the epoch's last steps broke the weights: save nothing
                broken = (f"the {ext.eval_name} loss is {te['loss']} after epoch {epoch + 1}: the weights diverged "
                          f"in its last steps (LR {tr['lr'][-1]:.3g}); try a lower LR")
        if broken := _from_rank0(broken):
            raise DivergenceError(broken)
        if _from_rank0(stop):
            if _is_main() and opt.progress:
                log(state.stopper.stop_message(epoch, ext.eval_name))
            break
    if state.stopper is not None:
        state.restore_best()
    return state.history


# ----------------------------------------------------------------------------------------
# Early stopping (seed 004)
# ----------------------------------------------------------------------------------------
class EarlyStopping:
    """Stop after `patience` epochs without a better monitored accuracy; keep the best weights."""

    def __init__(self, patience: int):
        require_whole("patience", patience)
        self.patience = patience
        self.best, self.best_epoch, self.best_state, self.bad_epochs = -math.inf, -1, None, 0

    @classmethod
    def make(cls, patience) -> EarlyStopping | None:
        """None (off), an EarlyStopping as it is, or a new one with that patience."""
        return patience if patience is None or isinstance(patience, cls) else cls(patience)

    def step(self, metric: float, model: nn.Module, epoch: int) -> bool:
        """Record this epoch; True when training should stop."""
        if metric > self.best:
            self.best, self.best_epoch, self.bad_epochs = metric, epoch, 0
            self.best_state = copy.deepcopy({k: v.detach().cpu() for k, v in unwrap(model).state_dict().items()})
        else:
            self.bad_epochs += 1
        return self.bad_epochs >= self.patience

    def stop_message(self, epoch: int, eval_name: str = "test") -> str:
        n = self.patience
        return (f"early stopping after epoch {epoch + 1}: no better {eval_name} accuracy for "
                f"{n} epoch{'s' if n != 1 else ''}; restoring epoch {self.best_epoch + 1}")

    def restore(self, model: nn.Module) -> None:
        if self.best_state is not None:
            unwrap(model).load_state_dict(self.best_state)

    def state_dict(self) -> dict:
        return {"patience": self.patience, "best": self.best, "best_epoch": self.best_epoch,
                "best_state": self.best_state, "bad_epochs": self.bad_epochs}

    def load_state_dict(self, state: dict) -> None:
        self.patience, self.best, self.best_epoch = state["patience"], state["best"], state["best_epoch"]
        self.best_state, self.bad_epochs = state["best_state"], state["bad_epochs"]


# ----------------------------------------------------------------------------------------
# Checkpoints and exact resume: everything a run carries from one epoch to the next
# ----------------------------------------------------------------------------------------
@dataclass
class TrainingState:
    """What a training checkpoint holds, besides the epoch and the random states."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: object                                # None: a constant LR
    scaler: torch.amp.GradScaler | None              # fp16 only
    stopper: EarlyStopping | None                    # None: no early stopping
    arch: str                                        # the model's name in helpers.models
    config: dict                                     # the recipe
    history: dict = field(default_factory=new_history)
    options: dict = field(default_factory=dict)      # RunOptions.recorded(): precision, layout, augmentation

    def record(self, tr: dict, te: dict, seconds: float) -> None:
        """Append one epoch's train and test results to the history."""
        for key, value in (("train_loss", tr["loss"]), ("train_acc", tr["acc"]),
                           ("test_loss", te["loss"]), ("test_acc", te["acc"])):
            self.history[key].append(value)
        self.history["lr"].extend(tr["lr"])
        self.history["seconds"].append(seconds)

    def save(self, path, epoch: int) -> None:
        """Write the whole state after `epoch` (0-based), with every RNG, atomically."""
        save_checkpoint(path, self.model, self.arch, optimizer=self.optimizer.state_dict(),
                        scheduler=self.scheduler.state_dict() if self.scheduler is not None else None,
                        scaler=self.scaler.state_dict() if self.scaler is not None else None,
                        epoch=epoch, history=self.history, config=self.config, options=self.options,
                        early_stopping=self.stopper.state_dict() if self.stopper is not None else None,
                        rng=rng_state())

    def resume(self, path, epochs: int, log=print) -> int:
        """Load the state saved at `path` (and the RNGs); the epoch to continue with."""
        ckpt = load_checkpoint(path)
        if ckpt["arch"] != self.arch:
            raise CheckpointError(f"cannot resume a {self.arch} from {path}: it holds a {ckpt['arch']}")
        if "optimizer" not in ckpt or "epoch" not in ckpt:
            raise CheckpointError(f"{path} holds weights only, not a training state: start a new run")
        unwrap(self.model).load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        for part, key in ((self.scheduler, "scheduler"), (self.scaler, "scaler"), (self.stopper, "early_stopping")):
            if part is not None and ckpt.get(key) is not None:
                part.load_state_dict(ckpt[key])
        self.history, start = ckpt["history"], ckpt["epoch"] + 1
        set_rng_state(ckpt["rng"])
        if _is_main():
            log(f"resumed after epoch {start} of {epochs} (from {Path(path).name})")
            saved = ckpt.get("options")
            if saved is not None and (changes := setting_changes(saved, self.options)):
                log(f"note: resumed with other settings than the run had ({'; '.join(changes)}): it will not end "
                    "exactly as an uninterrupted run would")
        return start

    def restore_best(self) -> None:
        """Early stopping's end: the best epoch's weights (rank 0's, on every rank)."""
        self.stopper.best_state = _from_rank0(self.stopper.best_state)
        self.stopper.restore(self.model)
        self.history["best_epoch"] = self.stopper.best_epoch


def _arch_name(model: nn.Module) -> str:
    """The helpers.models name of a course model."""
    from .models import MODELS

    for name, cls in MODELS.items():
        if isinstance(unwrap(model), cls):
            return name
    raise ConfigError(f"{type(unwrap(model)).__name__} is not one of the course models: "
                      "name it with FitOptions(arch=...)")


# ----------------------------------------------------------------------------------------
# Placing the model, and DistributedDataParallel under torchrun (helpers.distributed)
# ----------------------------------------------------------------------------------------
def _is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _is_main() -> bool:
    """True in a single process, and on rank 0 of a distributed run."""
    return not _is_distributed() or dist.get_rank() == 0


def _place_model(model: nn.Module, device: torch.device, options: RunOptions):
    """Move `model` to `device` (NHWC with channels_last); return (the model to evaluate,
    compiled if asked, and the model to train: the same, wrapped in DDP under torchrun)."""
    model.to(device)
    if options.channels_last:
        model.to(memory_format=torch.channels_last)
    net = torch.compile(model) if options.compile else model
    if not _is_distributed() or isinstance(net, nn.parallel.DistributedDataParallel):
        return net, net
    return net, nn.parallel.DistributedDataParallel(
        net, device_ids=[device.index] if device.type == "cuda" else None)


def _mean_over_ranks(total_loss: torch.Tensor, correct: torch.Tensor, seen: int) -> tuple[float, float]:
    """Mean loss and accuracy from running sums, over every process under DDP."""
    stats = torch.stack([total_loss, correct.double(),
                         torch.tensor(float(seen), device=total_loss.device, dtype=torch.float64)])
    if _is_distributed():
        dist.all_reduce(stats)
    return (stats[0] / stats[2]).item(), (stats[1] / stats[2]).item()


def _from_rank0(value):
    """Rank 0's `value` on every rank (in a single process: `value`)."""
    if not _is_distributed():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


# ----------------------------------------------------------------------------------------
# train: a whole recipe from helpers.config, as the CLI and notebook 04 run it
# ----------------------------------------------------------------------------------------
def input_stats(recipe: Recipe, data: CIFAR10Data) -> tuple[tuple, tuple]:
    """The (mean, std) a recipe's inputs are normalised with: the training set's channel
    statistics, or (0, 1) per channel for a recipe that feeds pixels in [0, 1] unchanged."""
    return (data.mean, data.std) if recipe.normalize else ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0))


def build_loaders(recipe: Recipe, data: CIFAR10Data, workers: int = 0, distributed: bool = False):
    """(train_loader, eval_loader, test_loader) for a recipe. The eval loader is a stratified
    validation split of the training set when recipe.val_split > 0, else the test set."""
    from . import augment as aug                   # albumentations: imported only when loaders are built

    mean, std = input_stats(recipe, data)
    train_x, train_y = data.train_images, data.train_labels
    val_x, val_y = data.test_images, data.test_labels
    if recipe.val_split > 0:
        train_x, train_y, val_x, val_y = data.split_validation(recipe.val_split, recipe.seed)
    # the same augmentation settings build the albumentations pipeline and, with
    # fast_augment, its on-device twin (DeviceLoader.from_loader reads `spec`)
    spec = {"name": recipe.augment, "mean": mean, "std": std}
    train = make_loader(train_x, train_y, aug.transforms_for(recipe.augment, mean, std),
                        batch_size=recipe.batch_size, shuffle=True, workers=workers, seed=recipe.seed,
                        distributed=distributed, recipe=spec)
    test_tf = aug.test_transforms(mean, std)
    test = make_loader(data.test_images, data.test_labels, test_tf, batch_size=recipe.test_batch_size,
                       workers=workers)
    val = test if recipe.val_split == 0 else make_loader(
        val_x, val_y, test_tf, batch_size=recipe.test_batch_size, workers=workers)
    return train, val, test


def whitening_images(data: CIFAR10Data, recipe: Recipe | None = None, count: int = 5000) -> torch.Tensor:
    """About `count` training images spread evenly over the set (without the recipe's
    validation split), normalised, NCHW: what the fast net's whitening filters are computed
    from (the same images for every seed)."""
    images = data.train_images
    if recipe is not None and recipe.val_split > 0:
        images = data.split_validation(recipe.val_split, recipe.seed)[0]
    images = images[::max(1, len(images) // count)]
    from .augment import normalize_batch

    return normalize_batch(torch.as_tensor(images).permute(0, 3, 1, 2), *input_stats(recipe or Recipe(), data))


def train(recipe: Recipe, data: CIFAR10Data, options: RunOptions | None = None,
          checkpoint_path=None, resume=None, log=print) -> dict:
    """Build the recipe's model, loaders, optimizer and schedule, fit, and test.

    `options` says how to run (device, precision, ...; default: fp32 on the best device).
    With `checkpoint_path` the whole training state is saved there after every epoch;
    `resume` continues from such a file, checked against the recipe first.
    Returns {"model", "history", "test": {"loss", "acc"}, "recipe", "device"}.
    """
    recipe.validate()
    opt = options or RunOptions()
    if resume is not None:
        check_resume(resume, recipe)
    device = get_device(opt.device)
    seed_everything(recipe.seed)
    model = get_model(recipe.model, dropout=recipe.dropout, logit_scale=recipe.logit_scale)
    if isinstance(model, FastNet):               # its first layer is computed, not learned ...
        if recipe.whiten:
            init_whitening(model, whitening_images(data, recipe))
        else:                                    # ... unless the recipe says so (the ablation)
            model.learn_first_layer()
    train_loader, val_loader, test_loader = build_loaders(recipe, data, opt.workers, _is_distributed())
    optimizer = make_optimizer(recipe.optimizer, model.parameters(), recipe.lr, recipe.momentum,
                               recipe.weight_decay, recipe.nesterov)
    scheduler = None
    if recipe.schedule == "onecycle":
        scheduler = one_cycle(optimizer, recipe.lr, recipe.lr_min, recipe.epochs, len(train_loader),
                              recipe.peak_epoch)
    extras = FitOptions(early_stopping=recipe.early_stopping_patience, checkpoint_path=checkpoint_path,
                        resume=resume, arch=recipe.model, config=recipe.to_dict(),
                        eval_name="val" if recipe.val_split > 0 else "test")
    # each epoch's evaluation is a progress signal, without test-time augmentation; the final
    # test below applies the recipe's
    history = fit(model, train_loader, val_loader, optimizer, recipe.epochs, scheduler,
                  nn.CrossEntropyLoss(label_smoothing=recipe.label_smoothing), opt, extras, log)
    history["eval_set"] = "validation" if recipe.val_split > 0 else "test"
    test = evaluate(model, test_loader, device=device, amp=opt.amp, channels_last=opt.channels_last,
                    tta_flip=recipe.tta_flip, progress=False, tta_shift=recipe.tta_shift) if _is_main() else None
    return {"model": model, "history": history, "test": test, "recipe": recipe, "device": str(device)}


# ----------------------------------------------------------------------------------------
# Devices, mixed precision and seeding
# ----------------------------------------------------------------------------------------
def get_device(preferred: str | None = None) -> torch.device:
    """'cuda' if present, else Apple's 'mps', else 'cpu'; or the named device, checked."""
    if preferred in (None, "", "auto"):
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(preferred)
    except RuntimeError:
        raise ConfigError(f"unknown device {preferred!r}: use cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device 'cuda' asked for but no CUDA GPU is visible: use --device cpu")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError("device 'mps' asked for but not available: use --device cpu")
    return device


@dataclass
class RunOptions:
    """How a recipe runs on the hardware (never what it learns): device, mixed precision,
    memory layout, the on-device augmentation, torch.compile and loader processes."""

    device: str | None = None        # None: the best available (cuda, mps, cpu)
    amp: str | None = None           # "bf16", "fp16" (with a grad scaler) or None for fp32
    channels_last: bool = False      # NHWC activations: what tensor cores and oneDNN prefer
    fast_augment: bool = False       # seed 001's augmentation on whole batches on the device
    compile: bool = False            # torch.compile the model
    workers: int = 0                 # data-loading processes for the albumentations path
    progress: bool = True            # progress bars and one line per epoch
    reasons: tuple = ()              # why auto_options chose these, one line each

    def recorded(self) -> dict:
        """What a training checkpoint keeps of these: the settings that change a run's numbers,
        so that a resumed run can repeat them and end exactly as an uninterrupted one."""
        return {"amp": self.amp, "channels_last": self.channels_last, "fast_augment": self.fast_augment,
                "workers": self.workers}

    def describe(self) -> str:
        amp = self.amp or "fp32"
        head = (f"device {self.device}: {amp}, channels_last {'on' if self.channels_last else 'off'}, "
                f"on-device augmentation {'on' if self.fast_augment else 'off'}")
        return "\n".join([head, *(f"  - {r}" for r in self.reasons)])


def _cpu_has_native_bf16() -> bool:
    """True when the CPU has bf16 matrix instructions (AVX-512 BF16 or AMX)."""
    try:
        flags = open("/proc/cpuinfo").read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def auto_options(device=None, workers: int | None = None) -> RunOptions:
    """The fastest safe settings for `device`, each with its reason.

    - CUDA: bf16 autocast on Ampere and newer; fp16 with a grad scaler before (Colab's T4
      has no bf16 tensor cores); channels_last; the augmentation on the GPU (the CPU would
      otherwise feed it too slowly).
    - CPU: bf16 only with AVX-512 BF16 or AMX (elsewhere bf16 is emulated, slower than
      fp32), then channels_last as well; the on-device augmentation, which spares the two
      cores of a laptop or CI machine the loader processes.
    - Apple MPS: fp32, the augmentation on the device.
    """
    device = get_device(str(device) if device is not None else None)
    why = []
    if device.type == "cuda":
        major, _ = torch.cuda.get_device_capability(device)
        amp = "bf16" if major >= 8 else "fp16"
        why.append(f"{amp}: {torch.cuda.get_device_name(device)} has "
                   + ("bf16 tensor cores" if major >= 8 else "fp16 but no bf16 tensor cores (grad scaler on)"))
        channels_last = True
        why.append("channels_last: tensor cores read NHWC without transposes")
        fast, why_fast = True, "on-device augmentation: the GPU augments whole batches, no CPU bottleneck"
    elif device.type == "cpu":
        native = _cpu_has_native_bf16()
        amp = "bf16" if native else None
        channels_last = native
        why.append("bf16 + channels_last: this CPU has AVX-512 BF16/AMX matrix instructions (about 2x fp32)"
                   if native else "fp32: this CPU has no native bf16 (emulated bf16 is slower than fp32)")
        fast, why_fast = True, "on-device augmentation: whole uint8 batches, no loader processes competing for cores"
    else:
        amp, channels_last = None, False
        why.append(f"fp32: mixed precision is not set up for {device.type} here")
        fast, why_fast = True, "on-device augmentation: whole batches on the device"
    why.append(why_fast)
    if workers is None:
        workers = 0 if fast else min(4, os.cpu_count() or 1)
    return RunOptions(str(device), amp, channels_last, fast, workers=workers, reasons=tuple(why))


def seed_everything(seed: int = 0, deterministic: bool = False) -> None:
    """Seed python, numpy and torch. deterministic=True also asks for deterministic kernels
    (what exact resume and bit-identical reruns on CPU rely on; slower on GPU)."""
    import random

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False


# ----------------------------------------------------------------------------------------
# Optimizers, and the OneCycle schedule of seed 001 (linear up, linear down, no annihilation)
# ----------------------------------------------------------------------------------------
def one_cycle(optimizer: torch.optim.Optimizer, lr_max: float, lr_min: float | None = None,
              epochs: int = 24, steps_per_epoch: int = 98, peak_epoch: int = 5):
    """Seed 001's OneCycle policy: torch's OneCycleLR, stepped once per batch.

    The LR rises linearly from lr_min (default lr_max / 10) at step 0 to lr_max on the last
    step of epoch `peak_epoch`, then falls linearly back to lr_min on the very last step.
    Nothing goes below lr_min ("no annihilation"). At batch 512 on 50,000 images:
    98 steps per epoch, 2,352 in all, the peak at step 489 (the end of epoch 5).
    """
    for name, v in (("epochs", epochs), ("steps_per_epoch", steps_per_epoch), ("peak_epoch", peak_epoch)):
        require_whole(name, v)
    require_positive("lr_max", lr_max, " (try the LR finder's suggestion)")
    lr_min = lr_max / 10 if lr_min is None else lr_min
    require_positive("lr_min", lr_min)
    if lr_min > lr_max:
        raise ConfigError(f"lr_min {lr_min:g} is above lr_max {lr_max:g}: swap them")
    if peak_epoch > epochs:
        raise ConfigError(f"peak epoch {peak_epoch} is beyond the {epochs} epochs: choose 1..{epochs}")
    if peak_epoch * steps_per_epoch < 2:         # OneCycleLR divides by the length of the way up
        raise ConfigError(f"OneCycle needs at least 2 steps up to its peak, but {steps_per_epoch} step(s) per epoch "
                          f"with the peak at epoch {peak_epoch} give {peak_epoch * steps_per_epoch}: use a smaller "
                          "batch (--train_batch) or a later peak (--peak-epoch)")
    total = epochs * steps_per_epoch
    # A cycle that peaks on its very last step has no way down; OneCycleLR still needs a
    # second phase, so it gets one extra step that no batch ever uses.
    total_steps = total + (peak_epoch == epochs)
    return torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=lr_max, total_steps=total_steps,
        pct_start=peak_epoch * steps_per_epoch / total_steps,   # the peak: step peak_epoch*steps - 1
        anneal_strategy="linear", three_phase=False,
        div_factor=lr_max / lr_min,   # start at lr_min ...
        final_div_factor=1.0,         # ... and end there: no annihilation
        cycle_momentum=False)         # cycling momentum would change Adam's beta1


def make_optimizer(name: str, params, lr: float, momentum: float = 0.9, weight_decay: float = 0.0,
                   nesterov: bool = False) -> torch.optim.Optimizer:
    """'adam' (seed 001), 'sgd' with momentum and optional Nesterov (seed 003), 'nadam' (seed 004)."""
    require_positive("learning rate", lr, " (try the LR finder's suggestion, e.g. 2.5e-3)")
    if weight_decay < 0:
        raise ConfigError(f"weight decay must be >= 0, got {weight_decay}")
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, betas=(momentum, 0.999), weight_decay=weight_decay)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, nesterov=nesterov and momentum > 0,
                               weight_decay=weight_decay)
    if name == "nadam":
        return torch.optim.NAdam(params, lr=lr, betas=(momentum, 0.999), weight_decay=weight_decay)
    raise ConfigError(f"unknown optimizer {name!r}: choose adam, sgd or nadam")
