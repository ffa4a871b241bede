"""Optimizers by name, S10's OneCycle schedule (linear up, linear down, no annihilation),
airbench94's Lookahead, and Muon with airbench94_muon's linear decay.

    optimizer = make_optimizer("adam", model.parameters(), lr=2.54e-3)
    scheduler = one_cycle(optimizer, lr_max=2.54e-3, epochs=24, steps_per_epoch=98)   # step it every batch
    optimizer = optimizer_for(recipe, model)        # the recipe's, BatchNorm biases in their own group
                                                    # (and the conv filters in Muon's, with recipe.muon_lr)

OPTIMIZERS is the one list of names: Recipe.validate and make_optimizer both read it.
"""
from __future__ import annotations

import torch
from torch import nn

from .errors import ConfigError, require_positive, require_whole
from .hardware import native_bf16

OPTIMIZERS = {   # name -> (torch class, how the recipe's momentum enters it)
    "adam": "Adam, momentum as beta1 (S10)",
    "sgd": "SGD with momentum, optionally Nesterov (the VGG exercise, Page, the fast net)",
    "nadam": "NAdam, momentum as beta1 (the Keras CNN)",
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


def optimizer_for(recipe, model: nn.Module) -> torch.optim.Optimizer:
    """The optimizer a helpers.config.Recipe names for `model`, with its LR, momentum and weight
    decay; with recipe.bn_bias_lr = k != 1 the BatchNorm biases form a second parameter group at
    k x the LR and 1/k x the weight decay, so that their decay per step (LR x weight decay) stays
    the others' (airbench94: k = 64). With recipe.muon_lr the trained conv filters form a third
    group that Muon steps at that LR (and the whitening bias joins the biases, as in
    airbench94_muon); the other groups stay SGD. Each group's "lr_scale" tells one_cycle its share."""
    params = list(model.parameters())
    if recipe.bn_bias_lr == 1.0 and recipe.muon_lr is None:
        return make_optimizer(recipe.optimizer, params, recipe.lr, momentum=recipe.momentum,
                              weight_decay=recipe.weight_decay, nesterov=recipe.nesterov)
    biases = {id(m.bias) for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
              and m.bias is not None}
    filters = set()
    if recipe.muon_lr is not None:
        biases |= {id(model.whiten.bias)} if hasattr(model, "whiten") else set()
        filters = {id(p) for p in params if p.ndim == 4 and p.requires_grad}
    k = recipe.bn_bias_lr
    groups = [{"params": [p for p in params if id(p) not in biases | filters], "lr_scale": 1.0},
              {"params": [p for p in params if id(p) in biases], "lr": recipe.lr * k,
               "weight_decay": recipe.weight_decay / k, "lr_scale": k}]
    if recipe.muon_lr is None:
        return make_optimizer(recipe.optimizer, groups, recipe.lr, momentum=recipe.momentum,
                              weight_decay=recipe.weight_decay, nesterov=recipe.nesterov)
    groups.append({"params": [p for p in params if id(p) in filters], "lr": recipe.muon_lr, "weight_decay": 0.0,
                   "momentum": MUON_MOMENTUM, "nesterov": True, "orthogonal": True,
                   "lr_scale": recipe.muon_lr / recipe.lr})
    return Muon(groups, recipe.lr, momentum=recipe.momentum, weight_decay=recipe.weight_decay,
                nesterov=recipe.nesterov)


# ----------------------------------------------------------------------------------------
# Muon (Keller Jordan, 2024; airbench94_muon): SGD's momentum, but each conv's update replaced by
# the nearest (semi-)orthogonal matrix, so that every direction of the filter bank moves alike
# ----------------------------------------------------------------------------------------
MUON_MOMENTUM = 0.6                        # airbench94_muon's, Nesterov, for the filters
NEWTON_SCHULZ = (3.4445, -4.7750, 2.0315)  # the quintic's coefficients: steep at 0, so 3 steps do


def orthogonalise(g: torch.Tensor, steps: int = 3, eps: float = 1e-7) -> torch.Tensor:
    """Roughly U V^T for the SVD g = U S V^T of a 2-D g, by Newton-Schulz steps:
    x <- a x + (b x x^T + c (x x^T)^2) x moves every singular value of x (scaled to at most 1)
    toward 1. Three steps leave all but the faintest in a band around 1 (0.46 to 1.2 on notebook
    06's real gradient; up to about 1.5 in Keller Jordan's account), not at 1, which costs nothing
    in training and much less than an SVD. In bfloat16, as airbench94_muon, where the device
    multiplies it natively; in fp32 elsewhere (emulated bf16 would cost seconds a step). So a
    run resumed on hardware of the other kind takes these steps in the other precision."""
    a, b, c = NEWTON_SCHULZ
    x = g.to(torch.bfloat16 if native_bf16(g.device) else torch.float32)
    x = x / (x.norm() + eps)
    wide = x.size(0) <= x.size(1)
    x = x if wide else x.T                     # x x^T is the smaller square
    for _ in range(steps):
        s = x @ x.T
        x = a * x + (b * s + c * s @ s) @ x
    return (x if wide else x.T).to(g.dtype)


class Muon(torch.optim.Optimizer):
    """Nesterov SGD for every parameter group, except that in groups with "orthogonal": True
    (optimizer_for: the conv filters) the step is orthogonalise(update) for each filter bank
    reshaped to (out channels, in channels x kernel), taken from weights first rescaled to the
    norm sqrt(out channels): the weights' size stays fixed and only their direction learns, so
    those groups need no weight decay. The SGD groups step exactly as torch.optim.SGD."""

    def __init__(self, params, lr: float, *, momentum: float = 0.9, weight_decay: float = 0.0,
                 nesterov: bool = True):
        require_positive("learning rate", lr)
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=nesterov,
                                      orthogonal=False))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None if closure is None else torch.enable_grad()(closure)()
        for group in self.param_groups:
            m, orthogonal = group["momentum"], group["orthogonal"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad.add(p, alpha=group["weight_decay"]) if group["weight_decay"] else p.grad
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = g.clone()
                else:
                    state["momentum_buffer"].mul_(m).add_(g)
                update = g.add(state["momentum_buffer"], alpha=m) if group["nesterov"] else state["momentum_buffer"]
                if orthogonal:
                    p.mul_(len(p) ** 0.5 / p.norm())
                    update = orthogonalise(update.reshape(len(p), -1)).view_as(p)
                p.add_(update, alpha=-group["lr"])
        return loss


def linear_decay(optimizer: torch.optim.Optimizer, total_steps: int):
    """airbench94_muon's schedule, stepped once per batch: every group's LR falls in a straight
    line from its own value at step 0 to 0 after the last step (step s of T: lr x (1 - s / T))."""
    require_whole("total_steps", total_steps)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 - step / total_steps)


class Lookahead:
    """airbench94's lookahead around an optimizer: it keeps an exponential moving average (EMA)
    of the model's weights and BatchNorm statistics, and every `every` steps moves the average
    toward the weights and then the weights onto the average. The average's memory starts at 0
    and grows with the step t of T as decay = 0.95^every x (t / T)^3, so early steps follow the
    raw weights and late ones average over many steps; after step T the weights are the average.

        optimizer = Lookahead(optimizer_for(recipe, model), model, total_steps=epochs * len(loader))

    It steps, zeroes and checkpoints like the optimizer it wraps (state_dict includes the average).
    """

    def __init__(self, optimizer: torch.optim.Optimizer, model: nn.Module, *, total_steps: int, every: int = 5,
                 decay: float = 0.95):
        require_whole("total_steps", total_steps)
        self.optimizer, self.model, self.total, self.every, self.decay = optimizer, model, total_steps, every, decay
        self.average = {k: v.detach().clone() for k, v in model.state_dict().items() if v.is_floating_point()}
        self.steps = 0

    @property
    def param_groups(self) -> list[dict]:
        return self.optimizer.param_groups

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def step(self) -> None:
        self.optimizer.step()
        self.skipped()

    def skipped(self) -> None:
        """Count a step (train_one_epoch calls this alone for one that fp16's grad scaler skipped),
        so that the average's schedule follows the batches and the last one still ends on it."""
        self.steps += 1
        if self.steps % self.every == 0:
            self.pull(self.decay ** self.every * (self.steps / self.total) ** 3)
        if self.steps == self.total:
            self.pull(1.0)                       # the end: the weights become the average

    @torch.no_grad()
    def pull(self, decay: float) -> None:
        """average <- decay * average + (1 - decay) * weights; then weights <- average."""
        state = self.model.state_dict()
        for name, average in self.average.items():
            if average.device != state[name].device:      # the model moved (fit places it) since __init__
                average = self.average[name] = average.to(state[name].device)
            average.lerp_(state[name], 1 - decay)
            state[name].copy_(average)

    def state_dict(self) -> dict:
        return {"optimizer": self.optimizer.state_dict(), "average": self.average, "steps": self.steps}

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        for name, value in state["average"].items():
            self.average[name].copy_(value)
        self.steps = state["steps"]


def one_cycle(optimizer: torch.optim.Optimizer, lr_max: float, lr_min: float | None = None, *,
              epochs: int = 24, steps_per_epoch: int = 98, peak_epoch: int = 5, lr_start: float | None = None):
    """S10's OneCycle policy: torch's OneCycleLR, stepped once per batch.

    The LR rises linearly from lr_min (default lr_max / 10) at step 0 to lr_max on the last
    step of epoch `peak_epoch`, then falls linearly back to lr_min on the very last step.
    Nothing goes below lr_min ("no annihilation"). At batch 512 on 50,000 images:
    98 steps per epoch, 2,352 in all, the peak at step 489 (the end of epoch 5).
    `lr_start` starts the cycle elsewhere (airbench94's triangle: 0.2 x lr_max up, 0.07 x down).
    A parameter group with an "lr_scale" (optimizer_for) follows the same cycle at that multiple.
    """
    for name, v in (("epochs", epochs), ("steps_per_epoch", steps_per_epoch), ("peak_epoch", peak_epoch)):
        require_whole(name, v)
    require_positive("lr_max", lr_max, " (try the LR finder's suggestion)")
    lr_min = lr_max / 10 if lr_min is None else lr_min
    lr_start = lr_min if lr_start is None else lr_start
    for name, lr in (("lr_min", lr_min), ("lr_start", lr_start)):
        require_positive(name, lr)
        if lr > lr_max:
            raise ConfigError(f"{name} {lr:g} is above lr_max {lr_max:g}: lower it")
    check_peak(peak_epoch, epochs)
    if peak_epoch * steps_per_epoch < 2:         # OneCycleLR divides by the length of the way up
        raise ConfigError(f"OneCycle needs at least 2 steps up to its peak, but {steps_per_epoch} step(s) per epoch "
                          f"with the peak at epoch {peak_epoch} give {peak_epoch * steps_per_epoch}: use a smaller "
                          "batch (--train_batch) or a later peak (--peak-epoch)")
    total = epochs * steps_per_epoch
    # A cycle that peaks on its very last step has no way down; OneCycleLR still needs a
    # second phase, so it gets one extra step that no batch ever uses.
    total_steps = total + (peak_epoch == epochs)
    scales = [group.get("lr_scale", 1.0) for group in optimizer.param_groups]
    return torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=lr_max if scales == [1.0] else [lr_max * k for k in scales], total_steps=total_steps,
        pct_start=peak_epoch * steps_per_epoch / total_steps,   # the peak: step peak_epoch*steps - 1
        anneal_strategy="linear", three_phase=False,
        div_factor=lr_max / lr_start,         # start at lr_start ...
        final_div_factor=lr_start / lr_min,   # ... and end at lr_min: no annihilation below it
        cycle_momentum=False)         # cycling momentum would change Adam's beta1
