"""Settings: the reference systems' recipes as plain, commented defaults, and smoke mode.

Everything a run can change lives in one `Recipe`. `recipe("resnet9")` returns S10's
recipe; `recipe("resnet9", smoke=True)` shrinks it so that a CPU finishes in seconds (about
1,000 train and 500 test images, few epochs, a short LR range test). Only the entry points
read the SMOKE_TEST variable (`smoke_mode()`): the notebooks' first cells, the command line
and the test suite; everything else takes `smoke` as an argument.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path

from .errors import ConfigError, require_positive, require_whole

# ----------------------------------------------------------------------------------------
# S10 (https://github.com/sayanbanerjee32/TASI_ERAv2_S10): the custom ResNet-9 with the OneCycle policy
# (the heart of the course)
# ----------------------------------------------------------------------------------------
BATCH_SIZE = 512          # 50,000 / 512 -> 98 steps per epoch
EPOCHS = 24               # 98 * 24 = 2,352 steps in all
PEAK_EPOCH = 5            # LR peaks at the end of epoch 5 (0-based step 489 of 0..2,351)
LR_MAX = 2.54e-3          # S10's LR range-test suggestion for Adam at batch 512
LR_MIN = LR_MAX / 10      # the LR at step 0 and at the last step: no annihilation below it
OPTIMIZER = "adam"        # Adam with PyTorch defaults (betas 0.9, 0.999), no weight decay
DROPOUT = 0.1             # S10: "dropout in all layers"; 0.1 is its package's default rate
# loss: CrossEntropyLoss on the logits (the model's "SoftMax" lives inside the loss)

# ----------------------------------------------------------------------------------------
# Smoke mode: a quick real-data check for CI and CPUs (SMOKE_TEST=1 at the entry points)
# ----------------------------------------------------------------------------------------
SMOKE_TRAIN_PER_CLASS = 100   # 1,000 train images
SMOKE_TEST_PER_CLASS = 50     # 500 test images
SMOKE_EPOCHS = 2
SMOKE_LR_FINDER_ITERS = 8     # full runs use 100 iterations
LR_FINDER_ITERS = 100
SMOKE_BATCH_SIZE = 128        # keeps several steps per epoch on the 1,000-image subset


SMOKE_ON, SMOKE_OFF = ("1", "true", "yes", "on"), ("0", "false", "no", "off", "")


def smoke_mode() -> bool:
    """True when the environment variable SMOKE_TEST is 1/true/yes/on, False when it is unset,
    empty or 0/false/no/off (any case); any other value is refused rather than read as "off",
    which on the real data would start an hours-long run."""
    value = os.environ.get("SMOKE_TEST", "").strip().lower()
    if value in SMOKE_ON or value in SMOKE_OFF:
        return value in SMOKE_ON
    raise ConfigError(f"SMOKE_TEST={os.environ['SMOKE_TEST']!r} means neither on nor off: set it to 1 (smoke "
                      "mode: a small subset, few epochs) or 0 (full settings), or unset it")


# The LR schedules a recipe can name, and how a run's log describes them (helpers.optim builds them)
SCHEDULES = {"onecycle": "OneCycle", "constant": "constant LR", "linear": "LR falling linearly to 0"}


# The TTA's weighting with shifted copies (helpers.loop.tta_weights): the unshifted views' (the
# image and its mirror) share of the vote. 1/3 weighs all six views alike; airbench94 gives them
# 1/2 and each shifted pair 1/4 (a shifted copy loses a row and a column to reflection).
TTA_ALIKE = 1 / 3


# Earlier names of two augmentations, by the reference system that used them: a recipe (or a
# checkpoint's, or a record's) that names one means the pipeline now called by the other.
FORMER_AUGMENT_NAMES = {"seed001": "crop-flip-cutout", "seed004": "flip-shift-rotate"}


def current_augment(name: str) -> str:
    """The augmentation's name today: `name`, or the one that replaced it."""
    return FORMER_AUGMENT_NAMES.get(name, name)


@dataclass
class Recipe:
    """One training recipe: the model and every setting that shapes its run."""

    model: str = "resnet9"
    optimizer: str = OPTIMIZER       # "adam", "sgd" or "nadam"
    lr: float = LR_MAX               # the peak LR under OneCycle, the constant LR otherwise
    lr_min: float | None = None      # OneCycle's floor; None means lr / 10
    schedule: str = "onecycle"       # "onecycle", "constant" or "linear" (from lr at step 0 down to 0)
    peak_epoch: int = PEAK_EPOCH
    epochs: int = EPOCHS
    batch_size: int = BATCH_SIZE
    test_batch_size: int = 1024
    micro_batch: int | None = None   # images per forward/backward; the batch's gradients add up (None: all)
    momentum: float = 0.9            # SGD momentum (Adam/NAdam use it as beta1)
    nesterov: bool = False
    weight_decay: float = 0.0
    dropout: float = 0.0             # ResNet-9 only: Dropout after every Conv-BN-ReLU (S10)
    logit_scale: float = 1.0         # ResNet-9 only: multiplies the logits (Page: 0.125)
    label_smoothing: float = 0.0
    augment: str = "crop-flip-cutout"   # S10's; also "flip-shift-rotate" (the Keras CNN's), "flip-translate",
                                        # "altflip-translate" or "none" (helpers.augment.AUGMENTATIONS)
    early_stopping_patience: int | None = None   # epochs without improvement, None = off
    eval_every: int = 1              # read the eval set after every this-many epochs and after the last
                                     # (0: after the last only, as a timed run does; training is the same)
    val_split: float = 0.0           # fraction of train held out for early stopping
    tta_flip: bool = False           # average predictions over the image and its mirror
    tta_shift: int = 0               # ... and over copies shifted by this many pixels (0: none)
    tta_centre: float = TTA_ALIKE    # with shifted copies: the unshifted views' share of the vote
    whiten: bool = True              # fast net only: its first layer computed from the data (False: learned)
    normalize: bool = True           # standardise inputs with the training set's channel mean/std
                                     # (False: pixels scaled to [0, 1] only, as torchvision's ToTensor)
    lr_start: float | None = None    # OneCycle's LR at step 0; None means lr_min (S10's symmetric cycle)
    # the fast net's ingredients from airbench94, off by default (results/fast_attempts.md)
    bn_bias_lr: float = 1.0          # BatchNorm biases train at this multiple of the LR, their weight decay / it
    frozen_bn_scales: bool = False   # BatchNorm scales fixed at 1, not trained
    bn_momentum: float = 0.1         # PyTorch's convention: running = (1 - m) running + m batch (airbench: 0.4)
    bn_eps: float = 1e-5
    dirac_init: bool = False         # every 3x3 conv starts as the identity on its first input-many filters
    lookahead: bool = False          # every 5 steps the weights move to an average of themselves (Lookahead)
    whiten_bias_epochs: int | None = None   # the whitening bias trains this many epochs, then stays (None: always)
    muon_lr: float | None = None     # the conv filters train with Muon at this LR (None: as the rest; airbench94_muon)
    seed: int = 0
    notes: str = ""

    def __post_init__(self):
        self.augment = current_augment(self.augment)

    def validate(self) -> "Recipe":
        """Raise ConfigError for values no run can use. The names come from the registries
        that build the runs: helpers.models.MODELS, helpers.optim.OPTIMIZERS and
        helpers.augment.AUGMENTATIONS."""
        from .augment import AUGMENTATIONS
        from .models import MODELS
        from .optim import check_optimizer, check_peak

        if self.model not in MODELS:
            raise ConfigError(f"unknown model {self.model!r}: choose one of {', '.join(MODELS)}")
        check_optimizer(self.optimizer, self.lr, self.weight_decay)
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"unknown schedule {self.schedule!r}: choose {', '.join(SCHEDULES)}")
        if self.augment not in AUGMENTATIONS:
            raise ConfigError(f"unknown augmentation {self.augment!r}: choose {', '.join(AUGMENTATIONS)}")
        for name in ("epochs", "batch_size", "test_batch_size"):
            require_whole(name, getattr(self, name))
        if self.micro_batch is not None:
            require_whole("micro_batch", self.micro_batch)
        require_whole("eval_every", self.eval_every, minimum=0)
        if self.early_stopping_patience and self.eval_every != 1:
            raise ConfigError(f"early stopping reads the eval set after every epoch, but eval_every is "
                              f"{self.eval_every!r}: set it to 1")
        if self.lr_min is not None:
            require_positive("lr_min", self.lr_min)
        for name, value, hint in (("dropout", self.dropout, f"try {DROPOUT}"),
                                  ("val_split", self.val_split, "try 0.1 (0: no validation split)"),
                                  ("label_smoothing", self.label_smoothing, "try 0 (off) or 0.2 (Page's)"),
                                  ("momentum", self.momentum, "try 0.9")):
            if not 0.0 <= value < 1.0:
                raise ConfigError(f"{name} must be in [0, 1), got {value!r}: {hint}")
        if self.dropout and self.model != "resnet9":
            raise ConfigError(f"dropout is an option of resnet9 only; {self.model} has its reference system's own: "
                              "drop --dropout")
        if not self.logit_scale > 0 or (self.logit_scale != 1.0 and self.model != "resnet9"):
            raise ConfigError(f"logit_scale must be > 0 and is an option of resnet9 only, got "
                              f"{self.logit_scale!r} for {self.model}: leave it at 1 (Page's ResNet-9: 0.125)")
        if not isinstance(self.normalize, bool):
            raise ConfigError(f"normalize must be True or False, got {self.normalize!r}: True normalises with "
                              "the training set's mean/std")
        if not self.whiten and self.model != "fast":
            raise ConfigError(f"whiten=False is an option of the fast net only, not {self.model}: leave whiten on")
        if isinstance(self.tta_shift, bool) or not isinstance(self.tta_shift, int) or not 0 <= self.tta_shift <= 4:
            raise ConfigError(f"tta_shift must be a whole number of pixels in 0..4, got {self.tta_shift!r}: try 1")
        if not 0 < self.tta_centre <= 1:
            raise ConfigError(f"tta_centre must be in (0, 1], got {self.tta_centre!r}: try 1/3 (all views alike)")
        if self.schedule == "onecycle":
            check_peak(self.peak_epoch, self.epochs)
        self._validate_fast_ingredients()
        return self

    def _validate_fast_ingredients(self) -> None:
        if self.lr_start is not None:
            require_positive("lr_start", self.lr_start)
        require_positive("bn_bias_lr", self.bn_bias_lr, " (1 trains BatchNorm biases at the LR; airbench: 64)")
        if not 0 < self.bn_momentum <= 1 or not self.bn_eps > 0:
            raise ConfigError(f"bn_momentum must be in (0, 1] and bn_eps > 0, got {self.bn_momentum!r}, "
                              f"{self.bn_eps!r}: try PyTorch's 0.1 and 1e-5")
        if self.whiten_bias_epochs is not None:
            require_whole("whiten_bias_epochs", self.whiten_bias_epochs, minimum=0)
        off = {f.name: f.default for f in dataclasses.fields(Recipe)}          # the defaults: all off
        changed = [name for name in FAST_ONLY if getattr(self, name) != off[name]]
        if changed and self.model != "fast":
            raise ConfigError(f"{', '.join(changed)}: options of the fast net only, not {self.model}: leave them "
                              "at their defaults")
        if self.muon_lr is not None:
            require_positive("muon_lr", self.muon_lr, " (airbench94_muon: 0.24)")
            if self.optimizer != "sgd":
                raise ConfigError(f"muon_lr trains the conv filters with Muon beside SGD for the rest, not beside "
                                  f"{self.optimizer}: set optimizer to sgd")

    def replace(self, **changes) -> "Recipe":
        """A copy with some fields changed (None is a value: it switches an option off)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def tta(self) -> dict:
        """The test-time augmentation this recipe tests with: predict_logits' keywords."""
        return {"tta_flip": self.tta_flip, "tta_shift": self.tta_shift, "tta_centre": self.tta_centre}


# the fast net's ingredients: Recipe.validate refuses any of them changed from its default on other models
FAST_ONLY = ("bn_bias_lr", "frozen_bn_scales", "bn_momentum", "bn_eps", "dirac_init", "lookahead", "whiten_bias_epochs",
             "muon_lr")


# ----------------------------------------------------------------------------------------
# The recipes of the three reference systems (S10, the VGG exercise, the Keras CNN), a tuned
# ResNet-9 recipe and the fast recipe
# ----------------------------------------------------------------------------------------
# airbench94_muon's head LR on this net in SGD's units (see the fast recipe)
MUON_SGD_LR = 0.67 * 2000 * (9 / 256) ** 2

RECIPES: dict[str, Recipe] = {
    # S10: Adam + OneCycle (24 epochs, peak at 5, no annihilation), batch 512, dropout
    "resnet9": Recipe(dropout=DROPOUT,
                      notes="S10: custom ResNet with dropout, Adam, OneCycle, pad-crop/flip/cutout"),
    # Page's tuned choices. He used weight decay 5e-4 x 512 on a summed loss with the LR
    # divided by 512; on PyTorch's mean loss that is exactly LR 0.4 with weight decay 5e-4.
    # His network also multiplies its logits by 0.125: without that, LR 0.4 makes the loss jump
    # to about 50 within the first steps and the net collapses to little better than chance (measured, 10,000 images).
    "resnet9-tuned": Recipe(
        optimizer="sgd", lr=0.4, nesterov=True, momentum=0.9, weight_decay=5e-4,
        label_smoothing=0.2, tta_flip=True, logit_scale=0.125,
        notes="Page's tuned recipe: SGD Nesterov, weight decay 5e-4, label smoothing 0.2, logits x 0.125, flip TTA"),
    # the VGG exercise: a VGG-style CNN. Stated by the exercise: 15 epochs, LR 0.001, momentum 0.9,
    # dropout 0.5 in the classifier, test batch 8. Not stated, so measured (results/vgg_settings_study.md):
    # the training batch, 16 (at 64 the default-initialised net sits at ln 10 for four epochs and
    # ends at 62.41 %; at 16 the same 15 epochs take 4x the SGD steps and reached 78.82 % on a GPU,
    # results/gpu_runs.md); the optimizer, SGD; the input, normalised with the training set's mean/std;
    # PyTorch's default initialisation; no augmentation, no weight decay.
    "vgg": Recipe(
        model="vgg", optimizer="sgd", lr=1e-3, momentum=0.9, schedule="constant", epochs=15,
        batch_size=16, test_batch_size=8, augment="none",
        notes="the VGG exercise: VGG-style CNN, SGD momentum 0.9, LR 0.001, 15 epochs, batch 16 (measured)"),
    # the Keras CNN: a compact CNN, NAdam 0.0025 at batch 64, flip/shift/rotate, early stopping
    "compact": Recipe(
        model="compact", optimizer="nadam", lr=2.5e-3, schedule="constant", epochs=200,
        batch_size=64, test_batch_size=1024, augment="flip-shift-rotate", early_stopping_patience=35,
        val_split=0.1,
        notes="the Keras CNN: compact CNN, NAdam 0.0025, batch 64, early stopping (patience 35 of 200)"),
    # beyond the three reference systems: the fast net (helpers.models.FastNet) trained as Keller
    # Jordan's airbench94_muon trains it (94.01 % in 8 epochs on the original CIFAR-10), in this
    # course's units, for 10 epochs (results/fast_attempts.md, results/fast_ingredients.md). Muon
    # steps the conv filters at LR 0.24 (momentum 0.6, weights kept at a fixed norm); the rest is
    # Nesterov SGD (momentum 0.85) on a summed loss at batch 2,000, which on PyTorch's mean loss
    # multiplies its LRs by 2,000: the biases' 0.053 -> 106 = 64 x 1.656, and the head's 0.67 -> 1,340
    # on weights of std 1 read x 1/256, which for SGD is LR 1,340 x (9/256)^2 = 1.656 on this net's
    # head (PyTorch's init, read x 1/9: the same starting logits); its weight decay 2e-6 x 2,000 =
    # 0.004 is LR x decay per step. Every LR falls linearly to 0 from the first step (there the
    # whitening bias's reaches 0 at the end of its 3 epochs; here it follows the others' and stops
    # there). Each batch of 2,000 goes forward and backward 500 images at a time (faster per image
    # on a CPU; BatchNorm per 500). The test set is read once, after the last epoch, as a timed run
    # does (per-epoch readings cost ~7 % of the run; --eval-every 1 brings them back). Kept from
    # airbench94: see AIRBENCH94 below.
    "fast": Recipe(
        model="fast", optimizer="sgd", muon_lr=0.24, lr=MUON_SGD_LR, weight_decay=0.004 / MUON_SGD_LR, schedule="linear",
        nesterov=True, momentum=0.85, epochs=10, batch_size=2000, micro_batch=500, test_batch_size=1024, eval_every=0,
        label_smoothing=0.2, augment="altflip-translate", tta_flip=True, tta_shift=1,
        bn_bias_lr=64.0, frozen_bn_scales=True, bn_momentum=0.4, bn_eps=1e-12, dirac_init=True, whiten_bias_epochs=3,
        notes="fast net: airbench94_muon's training (Muon on the conv filters, Nesterov SGD for the rest with BN "
              "biases at 64x the LR, alternating flips + translate, label smoothing 0.2), flip/shift TTA"),
}

# airbench94's training of the fast net (90.71 % on validation, 90.67 % over 3 seeds on the test
# set; the recipe before Muon): the changes that turn the fast recipe back into it. airbench94's LR
# 11.5 and weight decay 0.0153 "per 1,024 examples" on a summed loss with momentum 0.85 are, on
# PyTorch's mean loss at batch 1,024, SGD's LR 11.5 / (1 + 1 / (1 - 0.85)) = 1.5 and weight decay
# 0.0153 / 11.5; its triangular cycle runs 0.2 -> 1 -> 0.07 of the peak, which comes at the end of
# epoch 2 of 10 (there 23 % of 9.9 epochs); a Lookahead pulls the weights toward their average.
AIRBENCH94 = dict(muon_lr=None, lr=1.5, lr_start=0.2 * 1.5, lr_min=0.07 * 1.5, weight_decay=0.0153 / 11.5,
                  schedule="onecycle", peak_epoch=2, batch_size=1024, micro_batch=None, lookahead=True)

# The fast recipe before it took airbench94's ingredients (89.07 % over 3 seeds on the test set):
# the changes that turn today's recipe back into it, for the study that measures them
FIRST_FAST = dict(AIRBENCH94, lr=0.6, lr_start=None, lr_min=0.6 / 50, momentum=0.9, weight_decay=5e-4, bn_bias_lr=1.0,
                  frozen_bn_scales=False, bn_momentum=0.1, bn_eps=1e-5, dirac_init=False, lookahead=False,
                  whiten_bias_epochs=None, augment="flip-translate")


def recipe(name: str = "resnet9", smoke: bool = False, **changes) -> Recipe:
    """The named recipe, shrunk with smoke=True to a few quick epochs, with `changes` applied."""
    if name not in RECIPES:
        raise ConfigError(f"unknown recipe {name!r}: choose one of {', '.join(RECIPES)}")
    r = dataclasses.replace(RECIPES[name])
    if smoke:
        r = r.replace(epochs=SMOKE_EPOCHS, batch_size=min(r.batch_size, SMOKE_BATCH_SIZE),
                      peak_epoch=1, test_batch_size=max(r.test_batch_size, 256))
        if r.early_stopping_patience is not None:
            r.early_stopping_patience = 1
    return r.replace(**changes).validate()


# ----------------------------------------------------------------------------------------
# Paths
# ----------------------------------------------------------------------------------------
REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DATA_DIR = Path("data")                    # torchvision download target (./data)
DEFAULT_CHECKPOINT_DIR = Path("models")            # where `train --serialize` writes
SMOKE_CHECKPOINT_DIR = Path("artifacts") / "smoke"  # ... and where it writes in smoke mode
SHIPPED_MODEL = REPO_ROOT / "models" / "resnet9_cifar10.pt"


def artifacts_dir(smoke: bool) -> Path:
    """Where the notebooks hand files to each other: artifacts/, or artifacts/smoke/ for smoke
    runs (CI, a plain pytest), so that those never overwrite or resume a full run's checkpoints."""
    return REPO_ROOT / "artifacts" / ("smoke" if smoke else "")


def cache_dir() -> Path:
    """Where decoded datasets are cached: $CIFAR10_CACHE, else the user's cache folder."""
    if os.environ.get("CIFAR10_CACHE"):
        return Path(os.environ["CIFAR10_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "cifar10-course"
