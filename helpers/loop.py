"""The training step and the loops around it, on any device: one epoch of training
(`train_one_epoch`), one pass of evaluation (`evaluate`, `predict_logits`; `evaluate_views` reads with
and without test-time augmentation at once), and what the step
needs on the way: batches moved to the device (`to_device`), mixed precision (`autocast` and a
grad scaler that is on only for fp16), test-time augmentation, and a divergence guard that
reads the losses back only once in a while. `helpers.engine.fit` runs these epoch after epoch.

    stats = train_one_epoch(model, loader, optimizer, scheduler=scheduler)   # {"loss", "acc", "lr": [...]}
    evaluate(model, test_loader)                                  # {"loss", "acc"}
"""
from __future__ import annotations

import math
from contextlib import nullcontext

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from .config import TTA_ALIKE
from .distributed import all_reduce, is_distributed, is_main
from .errors import DivergenceError
from .hardware import RunOptions

GUARD_WINDOW = 20          # the divergence guard reads the losses back once per this many steps
DIVERGENCE_FACTOR = 10.0   # ... and stops a run whose loss climbs past this many times its start


# ----------------------------------------------------------------------------------------
# The device and the precision of a step
# ----------------------------------------------------------------------------------------
def autocast(device, amp: str | None):
    """Autocast to bf16 or fp16 on `device` for amp="bf16"/"fp16"; nothing for None (fp32)."""
    if amp is None:
        return nullcontext()
    return torch.autocast(torch.device(device).type, dtype=torch.bfloat16 if amp == "bf16" else torch.float16)


def grad_scaler(device, amp: str | None) -> torch.amp.GradScaler:
    """fp16's loss scaling (small gradients would round to zero without it); for bf16 and fp32
    a disabled scaler, whose scale/step/update are the plain backward and step."""
    return torch.amp.GradScaler(torch.device(device).type, enabled=amp == "fp16")


def to_device(x: torch.Tensor, device, channels_last: bool = False) -> torch.Tensor:
    """`x` on `device`; an image batch stored NHWC with channels_last."""
    x = x.to(device, non_blocking=True)
    return x.contiguous(memory_format=torch.channels_last) if channels_last and x.dim() == 4 else x


# ----------------------------------------------------------------------------------------
# One epoch of training
# ----------------------------------------------------------------------------------------
def train_one_epoch(model: nn.Module, loader, optimizer, *, scheduler=None, loss_fn=None,
                    options: RunOptions | None = None, scaler: torch.amp.GradScaler | None = None,
                    guard: DivergenceGuard | None = None, micro_batch: int | None = None) -> dict:
    """One pass over `loader` on the model's device, stepping the optimizer and the scheduler
    once per batch.

    Returns {"loss", "acc", "lr": [the LR of every step]}. `options` gives the precision,
    memory layout and progress bar; `scaler` carries fp16's loss scale from epoch to epoch
    (default: grad_scaler for options.amp); `guard`, the divergence guard, counts the steps and
    is kept by `fit` for the whole run. `micro_batch`: the forward and backward passes take the
    batch this many images at a time and add up their gradients (gradient accumulation; see
    backward); None: the whole batch at once.
    """
    options = options or RunOptions()
    device = next(model.parameters()).device                           # the batches go where the model is
    guard, loss_fn = guard or DivergenceGuard(), loss_fn or nn.CrossEntropyLoss()
    scaler = scaler or grad_scaler(device, options.amp)
    model.train()
    total_loss = torch.zeros((), device=device, dtype=torch.float64)    # running sums, kept on
    correct = torch.zeros((), device=device, dtype=torch.int64)         # the device: no sync
    seen, lrs = 0, []
    bar = tqdm(loader, desc="train", leave=False, disable=not (options.progress and is_main()), dynamic_ncols=True)
    for x, y in bar:
        x, y = to_device(x, device, options.channels_last), y.to(device, non_blocking=True)
        lr = optimizer.param_groups[0]["lr"]
        optimizer.zero_grad(set_to_none=True)
        loss, right = backward(model, x, y, loss_fn, scaler, options.amp, micro_batch)   # the gradients ...
        scale = scaler.get_scale() if scaler.is_enabled() and hasattr(optimizer, "skipped") else None
        scaler.step(optimizer)                   # ... one step down them (skipped if fp16 overflowed)
        scaler.update()
        if scale is not None and scaler.get_scale() < scale:       # skipped: a Lookahead still counts it
            optimizer.skipped()
        if scheduler is not None:
            scheduler.step()
        lrs.append(lr)
        total_loss += loss.double() * len(y)
        correct += right
        seen += len(y)
        if guard.add(loss, lr, len(y)) and options.progress:     # the guard read the losses back:
            bar.set_postfix(loss=f"{total_loss.item() / seen:.3f}",      # showing them costs no extra wait
                            acc=f"{correct.item() / seen:.3f}", lr=f"{lr:.2e}")
    guard.check()                                # the epoch's last losses, before anything is saved
    stats = all_reduce(torch.stack([total_loss, correct.double(),       # over every process under DDP
                                    torch.tensor(float(seen), device=device, dtype=torch.float64)]))
    return {"loss": (stats[0] / stats[2]).item(), "acc": (stats[1] / stats[2]).item(), "lr": lrs}


def backward(model: nn.Module, x: torch.Tensor, y: torch.Tensor, loss_fn, scaler: torch.amp.GradScaler,
             amp: str | None = None, micro_batch: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The batch's loss (detached) and count of right answers, leaving the gradient of its mean
    loss in the parameters (of the scaled loss under fp16). With `micro_batch` the batch goes
    through in slices of that many images, each slice's mean loss weighted by its share of the
    batch, so the gradients add up to the whole batch's; BatchNorm then normalises each slice by
    its own statistics. Smaller slices can run faster per image on a CPU (the fast recipe's
    500 against 2,000: results/fast_attempts.md)."""
    loss_sum, right = torch.zeros((), device=x.device), torch.zeros((), device=x.device, dtype=torch.int64)
    for xs, ys in zip(x.split(micro_batch or len(y)), y.split(micro_batch or len(y))):
        with autocast(x.device, amp):            # bf16/fp16 where amp asks for it
            out = model(xs)
            loss = loss_fn(out, ys) * (len(ys) / len(y))
        scaler.scale(loss).backward()
        loss_sum += loss.detach().float()
        right += (out.argmax(1) == ys).sum()
    return loss_sum, right


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

    def __init__(self, window: int = GUARD_WINDOW, factor: float = DIVERGENCE_FACTOR, floor: float = math.log(10),
                 first_step: int = 0):
        self.window, self.factor, self.floor = window, factor, floor
        self.step = first_step                     # the number of the next step added (a resumed run's start)
        self.limit: float | None = None            # factor x max(first loss, floor), set by the first check
        self.pending: list = []                    # (loss tensor, images, step, lr) not yet read back
        self.last_lr: float | None = None

    def add(self, loss: torch.Tensor, lr: float, images: int = 1) -> bool:
        """Keep the next step's loss; check when a window is full. True when it checked."""
        self.pending.append((loss.detach(), images, self.step, lr))
        self.step += 1
        if len(self.pending) < self.window:
            return False
        self.check()
        return True

    def check(self) -> None:
        """Read the pending losses back (one wait on the device) and raise if they diverged."""
        if not self.pending:
            return
        losses = torch.stack([p[0].float() for p in self.pending])
        if is_distributed():                       # the worst of every process's (NaN counts as inf)
            losses = all_reduce(torch.nan_to_num(losses, nan=math.inf), op="max")
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


# ----------------------------------------------------------------------------------------
# Evaluation: the logits over a loader, with optional test-time augmentation
# ----------------------------------------------------------------------------------------
def shifted(x: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """An NCHW batch translated by (dy, dx) pixels (content moves down/right for positive
    values), the uncovered border filled by reflection, as the augmentation's padding is."""
    s = max(abs(dy), abs(dx))
    if s == 0:
        return x
    padded = F.pad(x, (s, s, s, s), mode="reflect")
    h, w = x.shape[-2:]
    out = padded[..., s - dy:s - dy + h, s - dx:s - dx + w]
    return out.contiguous(memory_format=torch.channels_last) if x.is_contiguous(
        memory_format=torch.channels_last) and not x.is_contiguous() else out


def tta_views(x: torch.Tensor, flip: bool = False, shift: int = 0) -> list[torch.Tensor]:
    """Test-time augmentation: the batch, shifted by (-shift, -shift) and (+shift, +shift) when
    shift > 0, and the mirror image of each of these when flip is set (1 to 6 views)."""
    views = [x] + ([shifted(x, -shift, -shift), shifted(x, shift, shift)] if shift else [])
    return views + [v.flip(3) for v in views] if flip else views


def tta_weights(flip: bool = False, shift: int = 0, centre: float = TTA_ALIKE) -> torch.Tensor:
    """The weight of each view of `tta_views`, in its order; they sum to 1. `centre`: the
    unshifted views' share when there are shifted ones (1/3: all alike)."""
    w = torch.tensor([centre, (1 - centre) / 2, (1 - centre) / 2] if shift else [1.0])
    return torch.cat([w, w]) / 2 if flip else w


def tta_label(tta_flip: bool, tta_shift: int, tta_centre: float = TTA_ALIKE) -> str:
    """'flip', 'flip + 1 px shifts', '1 px shifts' or 'none', and the unshifted views' share
    when it is not all views alike ('flip + 1 px shifts, centre 0.5')."""
    centre = f", centre {tta_centre:.3g}" if tta_shift and not math.isclose(tta_centre, TTA_ALIKE) else ""
    return " + ".join(["flip"] * bool(tta_flip) + [f"{tta_shift} px shifts"] * bool(tta_shift)) + centre or "none"


@torch.no_grad()
def view_logits(model: nn.Module, loader, *, amp: str | None = None, channels_last: bool = False,
                tta_flip: bool = False, tta_shift: int = 0, progress: bool = False,
                desc: str = "predict") -> tuple[torch.Tensor, torch.Tensor]:
    """(logits of every view of `tta_views`, stacked: views x images x classes; labels) over
    `loader`, run on the model's device, returned on the CPU in loader order."""
    device = next(model.parameters()).device
    model.eval()
    logits, labels = [], []
    for x, y in tqdm(loader, desc=desc, leave=False, disable=not progress, dynamic_ncols=True):
        x = to_device(x, device, channels_last)
        with autocast(device, amp):
            logits.append(torch.stack([model(v).float() for v in tta_views(x, tta_flip, tta_shift)]).cpu())
        labels.append(torch.as_tensor(y))
    return torch.cat(logits, 1), torch.cat(labels)


def predict_logits(model: nn.Module, loader, *, amp: str | None = None, channels_last: bool = False,
                   tta_flip: bool = False, tta_shift: int = 0, tta_centre: float = TTA_ALIKE,
                   progress: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits, labels) for every image of `loader`, in loader order, on the CPU. tta_flip /
    tta_shift average the logits over the views of `tta_views` (the mirror image, copies shifted
    by a few pixels), weighted by `tta_weights` (tta_centre: the unshifted views' share)."""
    views, labels = view_logits(model, loader, amp=amp, channels_last=channels_last, tta_flip=tta_flip,
                                tta_shift=tta_shift, progress=progress)
    return weigh_views(views, tta_flip, tta_shift, tta_centre), labels


def weigh_views(views: torch.Tensor, tta_flip: bool = False, tta_shift: int = 0,
                tta_centre: float = TTA_ALIKE) -> torch.Tensor:
    """view_logits' views (views x images x classes) averaged with the weights of `tta_weights`."""
    return torch.einsum("v,vnc->nc", tta_weights(tta_flip, tta_shift, tta_centre), views)


def tta_readings(model, loader, shift: int = 1, *, amp: str | None = None, channels_last: bool = False) -> dict:
    """The accuracy of one trained model on `loader`'s images under each test-time augmentation,
    read off one pass of view_logits: none, the mirror image, and the mirror with copies shifted
    by `shift` pixels, weighted alike or with 1/2 on the unshifted pair (airbench94's weighting)."""
    views, labels = view_logits(model, loader, amp=amp, channels_last=channels_last, tta_flip=True,
                                tta_shift=shift)                                  # x, -s, +s, then mirrored
    weights = {"none": torch.eye(6)[0], "flip": tta_weights(True, shift, centre=1.0),   # the unshifted pair only
               "6 views alike": tta_weights(True, shift, TTA_ALIKE), "6 views, centre 1/2": tta_weights(True, shift, 1 / 2)}
    return {name: (torch.einsum("v,vnc->nc", w, views).argmax(1) == labels).float().mean().item()
            for name, w in weights.items()}


def evaluate(model: nn.Module, loader, *, loss_fn=None, amp: str | None = None, channels_last: bool = False,
             tta: dict | None = None, progress: bool = True) -> dict:
    """{"loss", "acc"} of `model` over `loader` (mean cross-entropy, top-1 accuracy), on the
    model's device. `tta`: predict_logits' tta_flip, tta_shift and tta_centre (default: none;
    a recipe's: `recipe.tta()`)."""
    logits, labels = predict_logits(model, loader, amp=amp, channels_last=channels_last, **(tta or {}),
                                    progress=progress and is_main())
    return score(logits, labels, loss_fn)


def evaluate_views(model: nn.Module, loader, tta: dict, *, loss_fn=None, amp: str | None = None,
                   channels_last: bool = False, progress: bool = True) -> tuple[dict, dict]:
    """Two readings of `model` over `loader` from one pass, at the cost of the second alone:
    evaluate's without test-time augmentation (scored with `loss_fn`) and evaluate's with `tta`
    (scored with cross-entropy). The first is view 0 of tta_views, each image as it is."""
    views, labels = view_logits(model, loader, amp=amp, channels_last=channels_last, tta_flip=tta["tta_flip"],
                                tta_shift=tta["tta_shift"], progress=progress and is_main())
    return score(views[0], labels, loss_fn), score(weigh_views(views, **tta), labels)


def score(logits: torch.Tensor, labels: torch.Tensor, loss_fn=None) -> dict:
    """{"loss", "acc"}: the mean of `loss_fn` (default cross-entropy) and the top-1 accuracy."""
    loss_fn = loss_fn or nn.CrossEntropyLoss()
    return {"loss": loss_fn(logits, labels).item(), "acc": (logits.argmax(1) == labels).float().mean().item()}
