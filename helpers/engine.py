"""Training engine: `fit` runs helpers.loop's `train_one_epoch` epoch after epoch and
evaluates after each; `train` runs a whole recipe from helpers.config.

    history = fit(model, train_loader, eval_loader, optimizer=optimizer, epochs=epochs, scheduler=scheduler)
    history["eval_acc"][-1], history["lr"]        # per-epoch metrics, the LR at every step

Around the loop, each on its own: early stopping (the Keras CNN's), checkpoints with exact resume,
and the placing of the model (device, channels_last, torch.compile, DistributedDataParallel).
The step itself, with its device handling and mixed precision, is in helpers.loop; the
loaders in helpers.loaders; how a run uses the hardware (RunOptions) in helpers.hardware.
"""
from __future__ import annotations

import copy
import math
import os
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .checkpoint import (check_resume, load_training_state, rng_state, save_checkpoint, set_rng_state, setting_changes,
                         unwrap)
from .config import Recipe
from .data import CIFAR10Data
from .distributed import from_rank0, is_distributed, is_main
from .errors import ConfigError, DivergenceError, require_whole
from .hardware import FP16_ON_CPU, RunOptions, get_device, seed_everything
from .loaders import build_loaders, input_stats
from .loop import DivergenceGuard, evaluate, evaluate_views, grad_scaler, train_one_epoch, tta_weights
from .models import FastNet, dirac_init, get_model, init_whitening, set_batchnorm
from .optim import Lookahead, linear_decay, one_cycle, optimizer_for


# ----------------------------------------------------------------------------------------
# fit: the loop epoch after epoch, with an evaluation after each
# ----------------------------------------------------------------------------------------
HISTORY_KEYS = ("train_loss", "train_acc", "eval_loss", "eval_acc", "lr", "seconds")


def new_history() -> dict:
    """Per-epoch loss and accuracy on the training batches and on eval_loader (the test set or a
    validation split: train() records which as "eval_set"; None for an epoch not evaluated), the
    LR at every step, and the seconds per epoch (the only entry that differs between identical runs)."""
    return {k: [] for k in HISTORY_KEYS}


@dataclass
class FitOptions:
    """What fit does around the loop, and the loss it trains: off, and cross-entropy, by default."""

    early_stopping: int | EarlyStopping | None = None   # patience in epochs; restores the best
    checkpoint_path: str | os.PathLike | None = None     # the whole state, after every epoch
    resume: str | os.PathLike | None = None              # continue exactly from such a file
    arch: str | None = None          # the model's name in checkpoints (None: found from the model)
    config: dict | None = None       # the recipe, saved in every checkpoint
    eval_name: str = "test"          # what eval_loader holds, for the log ("validation": a validation split)
    loss_fn: nn.Module | None = None     # the training and evaluation loss (None: cross-entropy)
    micro_batch: int | None = None   # images per forward/backward pass (None: the whole batch)
    eval_every: int = 1              # read eval_loader after every this-many epochs and the last (0: the last only)
    test_tta: dict | None = None     # eval_loader is the test set and the last epoch's weights are final: that
    #                                  epoch's pass also gives the run's test reading, under these test-time
    #                                  augmentations (recipe.tta()), into history["test"] (evaluate_views); a
    #                                  run resumed after its last epoch keeps that reading as it was taken
    log: Callable[[str], object] = print  # where the per-epoch lines go


def fit(model: nn.Module, train_loader, eval_loader, *, optimizer, epochs: int, scheduler=None,
        options: RunOptions | None = None, extras: FitOptions | None = None) -> dict:
    """Train for `epochs`, evaluating on `eval_loader` (the test set or a validation split) after
    each; returns the history (see new_history; with early stopping also "best_epoch").
    `options`: how to run (RunOptions); the loaders are used as given. `extras`: what else to do
    (FitOptions: the loss, early stopping, a checkpoint after every epoch, resume, the log). A
    NaN or infinite loss raises DivergenceError and leaves the last checkpoint as it was."""
    require_whole("epochs", epochs)
    options, extras = options or RunOptions(), extras or FitOptions()
    if extras.early_stopping and extras.eval_every != 1:
        raise ConfigError(f"early stopping reads the eval set after every epoch: eval_every must be 1, "
                          f"not {extras.eval_every}")
    device = get_device(options.device)
    if options.amp == "fp16" and device.type == "cpu":              # the command line refuses it outright
        warnings.warn(FP16_ON_CPU, stacklevel=2)
    net, train_net = _place_model(model, device, options)
    loss_fn = extras.loss_fn or nn.CrossEntropyLoss()
    state = TrainingState(model=model, optimizer=optimizer, scheduler=scheduler,
                          scaler=grad_scaler(device, options.amp), stopper=EarlyStopping.make(extras.early_stopping),
                          arch=extras.arch or _arch_name(model), config=extras.config or {},
                          options=options.recorded())
    start = 0 if extras.resume is None else state.resume(extras.resume, epochs, extras.log)

    guard = DivergenceGuard(first_step=start * len(train_loader))   # numbers the steps for its messages
    for epoch in range(start, epochs):
        t0 = time.perf_counter()
        for part in (train_loader, unwrap(model)):    # the epoch's shuffle and augmentation: f(seed, epoch);
            if hasattr(part, "set_epoch"):             # the fast net's whitening bias: trained or frozen
                part.set_epoch(epoch)
        tr = train_one_epoch(train_net, train_loader, optimizer, scheduler=scheduler, loss_fn=loss_fn, options=options,
                             scaler=state.scaler, guard=guard, micro_batch=extras.micro_batch)
        # under DDP rank 0 alone evaluates, logs and saves; every rank then acts on its verdict
        verdict = from_rank0(_end_of_epoch(state, net, eval_loader, tr, epoch, epochs, t0=t0, loss_fn=loss_fn,
                                           options=options, extras=extras) if is_main() else None)
        if verdict == "stop":
            if is_main() and options.progress:
                extras.log(state.stopper.stop_message(epoch, extras.eval_name))
            break
        if verdict is not None:
            raise DivergenceError(verdict)
    if state.stopper is not None:
        state.restore_best()
    return state.history


def _end_of_epoch(state: TrainingState, net, eval_loader, tr: dict, epoch: int, epochs: int, *, t0: float,
                  loss_fn, options: RunOptions, extras: FitOptions) -> str | None:
    """fit's hook after each epoch (rank 0 only): evaluate (on the epochs extras.eval_every names),
    record, log and save. Returns "stop" when early stopping says so, a message when the weights
    broke (then nothing is saved), else None."""
    te = None                                    # an epoch not read: None in the history's eval entries
    reading = dict(loss_fn=loss_fn, amp=options.amp, channels_last=options.channels_last, progress=options.progress)
    if epoch + 1 == epochs and extras.test_tta is not None:
        t1 = time.perf_counter()
        te, state.history["test"] = evaluate_views(net, eval_loader, extras.test_tta, **reading)
        # the epoch's seconds keep what its own plain reading costs: one view's share of the pass
        t0 += (time.perf_counter() - t1) * (1 - 1 / len(tta_weights(extras.test_tta["tta_flip"],
                                                                   extras.test_tta["tta_shift"])))
    elif epoch + 1 == epochs or (extras.eval_every and (epoch + 1) % extras.eval_every == 0):
        te = evaluate(net, eval_loader, **reading)
    if te is not None and not math.isfinite(te["loss"]):
        return (f"the {extras.eval_name} loss is {te['loss']} after epoch {epoch + 1}: the weights diverged "
                f"in its last steps (LR {tr['lr'][-1]:.3g}); try a lower LR")
    if next(net.parameters()).device.type == "cuda":
        torch.cuda.synchronize()
    state.record(tr, te, time.perf_counter() - t0)
    stop = state.stopper is not None and state.stopper.step(te["acc"], state.model, epoch)
    if options.progress:
        read = "" if te is None else f"{extras.eval_name} loss {te['loss']:.4f} acc {te['acc']:.4f}  "
        extras.log(f"epoch {epoch + 1:>3}/{epochs}  train loss {tr['loss']:.4f} acc {tr['acc']:.4f}  "
                   f"{read}lr {tr['lr'][-1]:.2e}")
    if extras.checkpoint_path is not None:
        state.save(extras.checkpoint_path, epoch)
    return "stop" if stop else None


# ----------------------------------------------------------------------------------------
# Early stopping (the Keras CNN's)
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
        return self.stopped

    @property
    def stopped(self) -> bool:
        """True once `patience` epochs in a row brought no better metric."""
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
@dataclass(kw_only=True)
class TrainingState:
    """What a training checkpoint holds, besides the epoch and the random states."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: object                                # None: a constant LR
    scaler: torch.amp.GradScaler                     # enabled for fp16 only
    stopper: EarlyStopping | None                    # None: no early stopping
    arch: str                                        # the model's name in helpers.models
    config: dict                                     # the recipe
    history: dict = field(default_factory=new_history)
    options: dict = field(default_factory=dict)      # RunOptions.recorded(): precision, layout, augmentation

    def record(self, tr: dict, te: dict | None, seconds: float) -> None:
        """Append one epoch's training and evaluation results to the history (te None: not evaluated)."""
        te = te or {"loss": None, "acc": None}
        for key, value in (("train_loss", tr["loss"]), ("train_acc", tr["acc"]),
                           ("eval_loss", te["loss"]), ("eval_acc", te["acc"])):
            self.history[key].append(value)
        self.history["lr"].extend(tr["lr"])
        self.history["seconds"].append(seconds)

    def save(self, path, epoch: int) -> None:
        """Write the whole state after `epoch` (0-based), with every RNG, atomically."""
        save_checkpoint(path, self.model, self.arch, optimizer=self.optimizer.state_dict(),
                        scheduler=self.scheduler.state_dict() if self.scheduler is not None else None,
                        scaler=self.scaler.state_dict() if self.scaler.is_enabled() else None,
                        epoch=epoch, history=self.history, config=self.config, options=self.options,
                        early_stopping=self.stopper.state_dict() if self.stopper is not None else None,
                        rng=rng_state())

    def resume(self, path, epochs: int, log=print) -> int:
        """Load the state saved at `path` (and the RNGs); the epoch to continue with."""
        ckpt = load_training_state(path, self.arch)
        unwrap(self.model).load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        for part, key in ((self.scheduler, "scheduler"), (self.scaler, "scaler"), (self.stopper, "early_stopping")):
            if part is not None and ckpt.get(key) is not None:
                part.load_state_dict(ckpt[key])
        self.history, start = ckpt["history"], ckpt["epoch"] + 1
        set_rng_state(ckpt["rng"])
        stopped = self.stopper is not None and self.stopper.stopped
        if is_main():
            log(f"resumed after epoch {start} of {epochs} (from {Path(path).name})"
                + (": the run had stopped early there" if stopped else ""))
            saved = ckpt.get("options")
            if saved is not None and (changes := setting_changes(saved, self.options)):
                log(f"note: resumed with other settings than the run had ({'; '.join(changes)}): it will not end "
                    "exactly as an uninterrupted run would")
        return epochs if stopped else start

    def restore_best(self) -> None:
        """Early stopping's end: the best epoch's weights (rank 0's, on every rank)."""
        self.stopper.best_state = from_rank0(self.stopper.best_state)
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
def _place_model(model: nn.Module, device: torch.device, options: RunOptions):
    """Move `model` to `device` (NHWC with channels_last); return (the model to evaluate,
    compiled if asked, and the model to train: the same, wrapped in DDP under torchrun)."""
    model.to(device)
    if options.channels_last:
        model.to(memory_format=torch.channels_last)
    net = torch.compile(model) if options.compile else model
    if not is_distributed() or isinstance(net, nn.parallel.DistributedDataParallel):
        return net, net
    return net, nn.parallel.DistributedDataParallel(
        net, device_ids=[device.index] if device.type == "cuda" else None)


# ----------------------------------------------------------------------------------------
# train: a whole recipe from helpers.config, as the CLI and notebook 04 run it
# ----------------------------------------------------------------------------------------
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


def build_model(recipe: Recipe, data: CIFAR10Data) -> nn.Module:
    """The recipe's fresh model (call seed_everything first). The fast net gets its whitening
    filters from `data` (or, with whiten=False, learns them) and the recipe's ingredients: its
    BatchNorm settings, dirac initialisation and how long the whitening bias trains."""
    model = get_model(recipe.model, dropout=recipe.dropout, logit_scale=recipe.logit_scale)
    if not isinstance(model, FastNet):
        return model
    set_batchnorm(model, momentum=recipe.bn_momentum, eps=recipe.bn_eps, frozen_scales=recipe.frozen_bn_scales)
    if recipe.dirac_init:
        dirac_init(model)
    model.whiten_bias_epochs = recipe.whiten_bias_epochs
    if recipe.whiten:                            # its first layer is computed, not learned ...
        init_whitening(model, whitening_images(data, recipe))
    else:                                        # ... unless the recipe says so (the ablation)
        model.learn_first_layer()
    return model


def train(recipe: Recipe, data: CIFAR10Data, options: RunOptions | None = None, *,
          checkpoint_path=None, resume=None, log=print) -> dict:
    """Build the recipe's model, loaders, optimizer and schedule, fit, and test.

    `options` says how to run (device, precision, ...; default: fp32 on the best device).
    With `checkpoint_path` the whole training state is saved there after every epoch;
    `resume` continues from such a file, checked against the recipe first.
    Returns {"model", "history", "test": {"loss", "acc"}, "recipe", "device"}; the history also
    holds "eval_set" ("test" or "validation") and the final "test" reading.
    """
    recipe.validate()
    options = options or RunOptions()
    if resume is not None:
        check_resume(resume, recipe)
    device = get_device(options.device)
    seed_everything(recipe.seed)
    model = build_model(recipe, data)
    train_loader, val_loader, test_loader = build_loaders(recipe, data, options, distributed=is_distributed())
    optimizer = optimizer_for(recipe, model)
    scheduler = None
    if recipe.schedule == "onecycle":
        scheduler = one_cycle(optimizer, recipe.lr, recipe.lr_min, epochs=recipe.epochs, lr_start=recipe.lr_start,
                              steps_per_epoch=len(train_loader), peak_epoch=recipe.peak_epoch)
    elif recipe.schedule == "linear":
        scheduler = linear_decay(optimizer, recipe.epochs * len(train_loader))
    if recipe.lookahead:                         # wraps the optimizer: after its last step the weights are the average
        optimizer = Lookahead(optimizer, model, total_steps=recipe.epochs * len(train_loader))
    eval_set = "validation" if recipe.val_split > 0 else "test"
    extras = FitOptions(early_stopping=recipe.early_stopping_patience, checkpoint_path=checkpoint_path,
                        resume=resume, arch=recipe.model, config=recipe.to_dict(),
                        eval_name=eval_set,
                        loss_fn=nn.CrossEntropyLoss(label_smoothing=recipe.label_smoothing),
                        micro_batch=recipe.micro_batch, eval_every=recipe.eval_every, log=log,
                        test_tta=recipe.tta() if val_loader is test_loader and not recipe.early_stopping_patience
                        and not options.compile else None)     # compiled: the final test stays uncompiled
    # the readings during training (recipe.eval_every) are a progress signal, without test-time
    # augmentation; the final test applies the recipe's: read off the last epoch's pass when that
    # pass was over the test set (test_tta), else (or for a run resumed from a history without it) below
    history = fit(model, train_loader, val_loader, optimizer=optimizer, epochs=recipe.epochs, scheduler=scheduler,
                  options=options, extras=extras)
    history["eval_set"] = eval_set
    test = history.get("test")
    if test is None and is_main():
        test = history["test"] = evaluate(model, test_loader, amp=options.amp, channels_last=options.channels_last,
                                          tta=recipe.tta(), progress=False)
    return {"model": model, "history": history, "test": test, "recipe": recipe, "device": str(device)}


