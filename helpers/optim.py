"""Optimizers by name, and seed 001's OneCycle schedule (linear up, linear down, no annihilation).

    optimizer = make_optimizer("adam", model.parameters(), lr=2.54e-3)
    scheduler = one_cycle(optimizer, lr_max=2.54e-3, epochs=24, steps_per_epoch=98)   # step it every batch

OPTIMIZERS is the one list of names: Recipe.validate and make_optimizer both read it.
"""
from __future__ import annotations

import torch

from .errors import ConfigError, require_positive, require_whole

OPTIMIZERS = {   # name -> (torch class, how the recipe's momentum enters it)
    "adam": "Adam, momentum as beta1 (seed 001)",
    "sgd": "SGD with momentum, optionally Nesterov (seed 003, Page, the fast net)",
    "nadam": "NAdam, momentum as beta1 (seed 004)",
}


def check_optimizer(name: str, lr: float, weight_decay: float) -> None:
    """Raise ConfigError for an unknown optimizer, a non-positive LR or a negative weight decay."""
    if name not in OPTIMIZERS:
        raise ConfigError(f"unknown optimizer {name!r}: choose {', '.join(OPTIMIZERS)}")
    require_positive("learning rate", lr, " (try the LR finder's suggestion, e.g. 2.5e-3)")
    if not weight_decay >= 0:
        raise ConfigError(f"weight decay must be >= 0, got {weight_decay!r}: try 1e-3")


def check_peak(peak_epoch: int, epochs: int) -> None:
    """OneCycle's peak must fall on one of the epochs, 1..epochs."""
    if not 1 <= peak_epoch <= epochs:
        raise ConfigError(f"peak epoch {peak_epoch} is outside 1..{epochs}: choose a peak epoch no later "
                          "than the last epoch")


def make_optimizer(name: str, params, lr: float, *, momentum: float = 0.9, weight_decay: float = 0.0,
                   nesterov: bool = False) -> torch.optim.Optimizer:
    """One of OPTIMIZERS over `params`; `momentum` is SGD's momentum or Adam's and NAdam's beta1."""
    check_optimizer(name, lr, weight_decay)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, nesterov=nesterov and momentum > 0,
                               weight_decay=weight_decay)
    adam = torch.optim.Adam if name == "adam" else torch.optim.NAdam
    return adam(params, lr=lr, betas=(momentum, 0.999), weight_decay=weight_decay)


def optimizer_for(recipe, params) -> torch.optim.Optimizer:
    """The optimizer a helpers.config.Recipe names, with its LR, momentum and weight decay."""
    return make_optimizer(recipe.optimizer, params, recipe.lr, momentum=recipe.momentum,
                          weight_decay=recipe.weight_decay, nesterov=recipe.nesterov)


def one_cycle(optimizer: torch.optim.Optimizer, lr_max: float, lr_min: float | None = None, *,
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
    check_peak(peak_epoch, epochs)
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
