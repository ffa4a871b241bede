"""Training engine: device and seeding, the OneCycle schedule, optimizers, train/evaluate
loops with progress bars, early stopping, exact resume, a divergence guard, DDP, and
`train()`, which runs a whole recipe from helpers.config.

    history = fit(model, train_loader, test_loader, optimizer, epochs, scheduler=sched)
    history["test_acc"][-1], history["lr"]        # per-epoch metrics, the LR at every step
"""
from __future__ import annotations

import copy
import math
import os
import time
from contextlib import nullcontext

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from tqdm import tqdm

from . import augment as aug
from .checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state, unwrap
from .config import Recipe
from .data import CIFAR10Data, make_loader
from .errors import CheckpointError, ConfigError, DivergenceError, require_positive
from .models import get_model


# ----------------------------------------------------------------------------------------
# Device and seeding
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
# The OneCycle schedule of seed 001 (linear up, linear down, no annihilation)
# ----------------------------------------------------------------------------------------
def one_cycle_lr(step: int, lr_max: float, lr_min: float, total_steps: int, peak_step: int) -> float:
    """The LR at `step` (0-based): lr_min at step 0, lr_max at peak_step, lr_min at the last step."""
    if step <= peak_step:
        return lr_min + (lr_max - lr_min) * (step / peak_step if peak_step else 1.0)
    last = total_steps - 1
    return lr_max - (lr_max - lr_min) * (step - peak_step) / (last - peak_step)


def one_cycle(optimizer: torch.optim.Optimizer, lr_max: float, lr_min: float | None = None,
              epochs: int = 24, steps_per_epoch: int = 98, peak_epoch: int = 5):
    """Seed 001's OneCycle policy as a LambdaLR stepped once per batch.

    The LR rises linearly from lr_min (default lr_max / 10) at step 0 to lr_max on the last
    step of epoch `peak_epoch`, then falls linearly back to lr_min on the very last step.
    Nothing goes below lr_min ("no annihilation"). At batch 512 on 50,000 images:
    98 steps per epoch, 2,352 in all, the peak at step 489 (the end of epoch 5).
    """
    for name, v in (("epochs", epochs), ("steps_per_epoch", steps_per_epoch), ("peak_epoch", peak_epoch)):
        if isinstance(v, bool) or not isinstance(v, int):
            raise ConfigError(f"{name} must be a whole number, got {v!r}")
        require_positive(name, v)
    require_positive("lr_max", lr_max, " (try the LR finder's suggestion)")
    lr_min = lr_max / 10 if lr_min is None else lr_min
    require_positive("lr_min", lr_min)
    if lr_min > lr_max:
        raise ConfigError(f"lr_min {lr_min:g} is above lr_max {lr_max:g}: swap them")
    if peak_epoch > epochs:
        raise ConfigError(f"peak epoch {peak_epoch} is beyond the {epochs} epochs: choose 1..{epochs}")
    total = epochs * steps_per_epoch
    peak = peak_epoch * steps_per_epoch - 1
    if peak == total - 1 and total > 1:
        peak = total - 1
    for group in optimizer.param_groups:
        group["lr"] = lr_max
        group.pop("initial_lr", None)

    def factor(step: int) -> float:
        step = min(step, total - 1)
        if peak == total - 1:
            return (lr_min + (lr_max - lr_min) * step / max(peak, 1)) / lr_max
        return one_cycle_lr(step, lr_max, lr_min, total, peak) / lr_max

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


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


# ----------------------------------------------------------------------------------------
# One epoch of training, one pass of evaluation
# ----------------------------------------------------------------------------------------
def _autocast(device: torch.device, amp: str | None):
    if amp is None:
        return nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if amp == "bf16" else torch.float16)


def _to(x: torch.Tensor, device, channels_last: bool) -> torch.Tensor:
    x = x.to(device, non_blocking=True)
    return x.contiguous(memory_format=torch.channels_last) if channels_last and x.dim() == 4 else x


def _is_main() -> bool:
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def train_one_epoch(model: nn.Module, loader, optimizer, loss_fn=None, device="cpu", scheduler=None,
                    amp: str | None = None, channels_last: bool = False, scaler=None,
                    progress: bool = True, desc: str = "train", step_offset: int = 0) -> dict:
    """One pass over `loader`, stepping the scheduler once per batch.

    Returns {"loss", "acc", "lr": [LR used at each step]}. A NaN or infinite loss raises
    DivergenceError at once, naming the step and the LR.
    """
    device = torch.device(device)
    loss_fn = loss_fn or nn.CrossEntropyLoss()
    model.train()
    total_loss = torch.zeros((), device=device, dtype=torch.float64)
    correct = torch.zeros((), device=device, dtype=torch.int64)
    seen, lrs = 0, []
    bar = tqdm(loader, desc=desc, leave=False, disable=not (progress and _is_main()), dynamic_ncols=True)
    for i, (x, y) in enumerate(bar):
        x, y = _to(x, device, channels_last), y.to(device, non_blocking=True)
        lr = optimizer.param_groups[0]["lr"]
        with _autocast(device, amp):
            out = model(x)
            loss = loss_fn(out, y)
        if not torch.isfinite(loss):
            before = f", after a step at LR {lrs[-1]:.3g}" if lrs and lrs[-1] != lr else ""
            raise DivergenceError(
                f"loss became {loss.item()} at step {step_offset + i} (LR {lr:.3g}{before}): "
                f"the LR is too high; try a lower one, e.g. {max([lr] + lrs[-1:]) / 10:.3g}")
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()
        if scheduler is not None:
            scheduler.step()
        lrs.append(lr)
        total_loss += loss.detach().double() * len(y)
        correct += (out.argmax(1) == y).sum()
        seen += len(y)
        if progress and (i % 10 == 0 or i == len(loader) - 1):
            bar.set_postfix(loss=f"{total_loss.item() / seen:.3f}", acc=f"{correct.item() / seen:.3f}",
                            lr=f"{lr:.2e}")
    stats = torch.stack([total_loss, correct.double(), torch.tensor(float(seen), device=device, dtype=torch.float64)])
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(stats)
    return {"loss": (stats[0] / stats[2]).item(), "acc": (stats[1] / stats[2]).item(), "lr": lrs}


@torch.no_grad()
def predict_logits(model: nn.Module, loader, device="cpu", amp: str | None = None,
                   channels_last: bool = False, tta_flip: bool = False, progress: bool = False,
                   desc: str = "predict") -> tuple[torch.Tensor, torch.Tensor]:
    """(logits, labels) for every batch of `loader`, on the CPU, in loader order.

    tta_flip=True averages the logits of each image and its mirror image.
    """
    device = torch.device(device)
    model.eval()
    logits, labels = [], []
    for x, y in tqdm(loader, desc=desc, leave=False, disable=not progress, dynamic_ncols=True):
        x = _to(x, device, channels_last)
        with _autocast(device, amp):
            out = model(x).float()
            if tta_flip:
                out = (out + model(x.flip(3)).float()) / 2
        logits.append(out.cpu())
        labels.append(torch.as_tensor(y))
    return torch.cat(logits), torch.cat(labels)


def evaluate(model: nn.Module, loader, loss_fn=None, device="cpu", amp: str | None = None,
             channels_last: bool = False, tta_flip: bool = False, progress: bool = True,
             desc: str = "eval") -> dict:
    """{"loss", "acc"} of `model` over `loader` (mean cross-entropy, top-1 accuracy)."""
    loss_fn = loss_fn or nn.CrossEntropyLoss()
    logits, labels = predict_logits(model, loader, device, amp, channels_last, tta_flip,
                                    progress and _is_main(), desc)
    return {"loss": loss_fn(logits, labels).item(), "acc": (logits.argmax(1) == labels).float().mean().item()}


# ----------------------------------------------------------------------------------------
# Early stopping (seed 004)
# ----------------------------------------------------------------------------------------
class EarlyStopping:
    """Stop after `patience` epochs without a better monitored accuracy; keep the best weights."""

    def __init__(self, patience: int):
        if isinstance(patience, bool) or not isinstance(patience, int) or patience < 1:
            raise ConfigError(f"patience must be a whole number >= 1, got {patience!r}")
        self.patience = patience
        self.best, self.best_epoch, self.best_state, self.bad_epochs = -math.inf, -1, None, 0

    def step(self, metric: float, model: nn.Module, epoch: int) -> bool:
        """Record this epoch; True when training should stop."""
        if metric > self.best:
            self.best, self.best_epoch, self.bad_epochs = metric, epoch, 0
            self.best_state = copy.deepcopy({k: v.detach().cpu() for k, v in unwrap(model).state_dict().items()})
        else:
            self.bad_epochs += 1
        return self.bad_epochs >= self.patience

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
# fit: the whole training loop
# ----------------------------------------------------------------------------------------
HISTORY_KEYS = ("train_loss", "train_acc", "test_loss", "test_acc", "lr", "seconds")


def new_history() -> dict:
    """Per-epoch train/test loss and accuracy, the LR at every step, and the seconds per
    epoch (the only entry that differs between identical runs)."""
    return {k: [] for k in HISTORY_KEYS}


def fit(model: nn.Module, train_loader, test_loader, optimizer, epochs: int, scheduler=None,
        loss_fn=None, device=None, amp: str | None = None, channels_last: bool = False,
        early_stopping: int | EarlyStopping | None = None, checkpoint_path=None, resume=None,
        arch: str | None = None, config: dict | None = None, fast_augment: bool = False,
        tta_flip: bool = False, eval_name: str = "test", progress: bool = True, log=print) -> dict:
    """Train for `epochs`, evaluating on `test_loader` after each; returns the history.

    `eval_name` says what `test_loader` holds ("test", or "val" for a validation split) in
    the log lines; the history keys stay test_loss/test_acc either way.

    - The scheduler steps once per batch (OneCycle).
    - amp="bf16" (or "fp16", with a grad scaler) runs the forward pass under autocast on CUDA;
      channels_last=True stores activations NHWC, which tensor cores prefer.
    - early_stopping=N stops after N epochs without a better test accuracy, and restores
      the best epoch's weights.
    - checkpoint_path: after every epoch the whole state (model, optimizer, scheduler, grad
      scaler, epoch, history, early stopping and every RNG) is saved there atomically.
      resume=PATH continues from such a checkpoint and, with the same settings, ends with
      the same weights and history as an uninterrupted run.
    - fast_augment=True moves the uint8 training set to the device once and runs the
      seed-001 augmentation there on whole batches (helpers.augment.BatchAugment).
    - Under torchrun (torch.distributed initialised) the model is wrapped in
      DistributedDataParallel; rank 0 alone evaluates, logs and saves.
    - A NaN or infinite loss raises DivergenceError; the last checkpoint stays as it was.
    """
    if isinstance(epochs, bool) or not isinstance(epochs, int):
        raise ConfigError(f"epochs must be a whole number, got {epochs!r}")
    require_positive("epochs", epochs)
    device = get_device(str(device) if device is not None else None)
    distributed = dist.is_available() and dist.is_initialized()
    main = _is_main()
    loss_fn = loss_fn or nn.CrossEntropyLoss()
    model.to(device)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    if fast_augment:
        from .data import DeviceLoader
        train_loader = DeviceLoader.from_loader(train_loader, device)
    train_model = model
    if distributed and not isinstance(model, nn.parallel.DistributedDataParallel):
        train_model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    scaler = torch.amp.GradScaler(device.type) if amp == "fp16" else None
    if isinstance(early_stopping, int) and not isinstance(early_stopping, bool):
        early_stopping = EarlyStopping(early_stopping)
    arch = arch or _arch_name(model)

    history, start = new_history(), 0
    if resume is not None:
        ckpt = load_checkpoint(resume)
        if ckpt["arch"] != arch:
            raise CheckpointError(f"cannot resume a {arch} from {resume}: it holds a {ckpt['arch']}")
        if "optimizer" not in ckpt or "epoch" not in ckpt:
            raise CheckpointError(f"{resume} holds weights only, not a training state: start a new run")
        unwrap(model).load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        if scheduler is not None and ckpt.get("scheduler") is not None:
            scheduler.load_state_dict(ckpt["scheduler"])
        if scaler is not None and ckpt.get("scaler") is not None:
            scaler.load_state_dict(ckpt["scaler"])
        if early_stopping is not None and ckpt.get("early_stopping") is not None:
            early_stopping.load_state_dict(ckpt["early_stopping"])
        history, start = ckpt["history"], ckpt["epoch"] + 1
        set_rng_state(ckpt["rng"])
        if main:
            log(f"resumed from {resume} after epoch {start} of {epochs}")

    steps = len(train_loader)
    for epoch in range(start, epochs):
        t0 = time.perf_counter()
        if hasattr(train_loader, "set_epoch"):
            train_loader.set_epoch(epoch)
        tr = train_one_epoch(train_model, train_loader, optimizer, loss_fn, device, scheduler, amp,
                             channels_last, scaler, progress, f"epoch {epoch + 1}/{epochs}", epoch * steps)
        stop = False
        if main:
            te = evaluate(model, test_loader, loss_fn, device, amp, channels_last, tta_flip, progress)
            if device.type == "cuda":
                torch.cuda.synchronize()
            for key, value in (("train_loss", tr["loss"]), ("train_acc", tr["acc"]),
                               ("test_loss", te["loss"]), ("test_acc", te["acc"])):
                history[key].append(value)
            history["lr"].extend(tr["lr"])
            history["seconds"].append(time.perf_counter() - t0)
            if early_stopping is not None:
                stop = early_stopping.step(te["acc"], model, epoch)
            if progress:
                log(f"epoch {epoch + 1:>3}/{epochs}  train loss {tr['loss']:.4f} acc {tr['acc']:.4f}  "
                    f"{eval_name} loss {te['loss']:.4f} acc {te['acc']:.4f}  lr {tr['lr'][-1]:.2e}")
            if checkpoint_path is not None:
                save_checkpoint(checkpoint_path, model, arch, optimizer=optimizer.state_dict(),
                                scheduler=scheduler.state_dict() if scheduler is not None else None,
                                scaler=scaler.state_dict() if scaler is not None else None,
                                epoch=epoch, history=history, config=config or {},
                                early_stopping=early_stopping.state_dict() if early_stopping else None,
                                rng=rng_state())
        if distributed:
            flag = [stop]
            dist.broadcast_object_list(flag, src=0)
            stop = flag[0]
        if stop:
            if main and progress:
                n = early_stopping.patience
                log(f"early stopping after epoch {epoch + 1}: no better {eval_name} accuracy for "
                    f"{n} epoch{'s' if n != 1 else ''}; restoring epoch {early_stopping.best_epoch + 1}")
            break
    if early_stopping is not None:
        if distributed:
            state = [early_stopping.best_state]
            dist.broadcast_object_list(state, src=0)
            early_stopping.best_state = state[0]
        early_stopping.restore(model)
        history["best_epoch"] = early_stopping.best_epoch
    return history


def _arch_name(model: nn.Module) -> str:
    from .models import MODELS

    for name, cls in MODELS.items():
        if isinstance(unwrap(model), cls):
            return name
    raise ConfigError(f"{type(unwrap(model)).__name__} is not one of the course models: pass arch=")


# ----------------------------------------------------------------------------------------
# train: a whole recipe from helpers.config, as the CLI and notebook 04 run it
# ----------------------------------------------------------------------------------------
def build_loaders(recipe: Recipe, data: CIFAR10Data, workers: int = 0, distributed: bool = False,
                  persistent_workers: bool = False):
    """(train_loader, eval_loader, test_loader) for a recipe. The eval loader is a stratified
    validation split of the training set when recipe.val_split > 0, else the test set."""
    mean, std = data.mean, data.std
    train_x, train_y = data.train_images, data.train_labels
    val_x, val_y = data.test_images, data.test_labels
    if recipe.val_split > 0:
        train_x, train_y, val_x, val_y = data.split_validation(recipe.val_split, recipe.seed)
    # the same augmentation settings build the albumentations pipeline and, with
    # fast_augment, its on-device twin (DeviceLoader.from_loader reads `spec`)
    spec = {"name": recipe.augment, "mean": mean, "std": std, "options": {}}
    train = make_loader(train_x, train_y, aug.transforms_for(recipe.augment, mean, std, **spec["options"]),
                        batch_size=recipe.batch_size, shuffle=True, workers=workers, seed=recipe.seed,
                        distributed=distributed, persistent_workers=persistent_workers, recipe=spec)
    test_tf = aug.test_transforms(mean, std)
    test = make_loader(data.test_images, data.test_labels, test_tf, batch_size=recipe.test_batch_size,
                       workers=workers)
    val = test if recipe.val_split == 0 else make_loader(
        val_x, val_y, test_tf, batch_size=recipe.test_batch_size, workers=workers)
    return train, val, test


def train(recipe: Recipe, data: CIFAR10Data, device=None, workers: int = 0, checkpoint_path=None,
          resume=None, amp: str | None = None, channels_last: bool = False, fast_augment: bool = False,
          compile: bool = False, progress: bool = True, log=print) -> dict:
    """Build the recipe's model, loaders, optimizer and schedule, fit, and test.

    Returns {"model", "history", "test": {"loss", "acc"}, "recipe", "device"}.
    """
    recipe.validate()
    distributed = dist.is_available() and dist.is_initialized()
    device = get_device(str(device) if device is not None else None)
    seed_everything(recipe.seed)
    model = get_model(recipe.model)
    train_loader, val_loader, test_loader = build_loaders(recipe, data, workers, distributed)
    optimizer = make_optimizer(recipe.optimizer, model.parameters(), recipe.lr, recipe.momentum,
                               recipe.weight_decay, recipe.nesterov)
    scheduler = None
    if recipe.schedule == "onecycle":
        scheduler = one_cycle(optimizer, recipe.lr, recipe.lr_min, recipe.epochs, len(train_loader),
                              recipe.peak_epoch)
    run_model = torch.compile(model) if compile else model
    history = fit(run_model, train_loader, val_loader, optimizer, recipe.epochs, scheduler,
                  nn.CrossEntropyLoss(label_smoothing=recipe.label_smoothing), device, amp,
                  channels_last, recipe.early_stopping_patience, checkpoint_path, resume,
                  arch=recipe.model, config=recipe.to_dict(), fast_augment=fast_augment,
                  tta_flip=recipe.tta_flip, eval_name="val" if recipe.val_split > 0 else "test",
                  progress=progress, log=log)
    history["eval_set"] = "validation" if recipe.val_split > 0 else "test"
    test = evaluate(model, test_loader, device=device, amp=amp, channels_last=channels_last,
                    tta_flip=recipe.tta_flip, progress=False) if _is_main() else None
    return {"model": model, "history": history, "test": test, "recipe": recipe, "device": str(device)}
