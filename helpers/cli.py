"""The command line: `python -m helpers train | test | predict`.

    python -m helpers train --model resnet9 --serialize        # seed 001's recipe, saves models/resnet9.pt
    python -m helpers train --model vgg --epochs 15 --lr 0.001 # seed 003's flags work as in its README
    python -m helpers test --model models/resnet9.pt --confusion
    python -m helpers predict --model models/resnet9.pt cat.jpg dog.png --plot probs.png
    torchrun --nproc_per_node=2 -m helpers train --model resnet9   # DistributedDataParallel

The CLI only parses, calls the helpers and reports; the training itself is
`helpers.engine.train`. Problems a user can fix (helpers.errors.CourseError) are printed as
one line, `error: ...`, on stderr: exit status 2 for bad settings (argparse errors and
ConfigError), 1 for everything else (missing data, bad checkpoints, divergence, unreadable
images). `--verbose` adds the traceback. Heavy imports (torch) happen only after parsing,
so `--help` and usage errors are instant.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path

from . import config
from .errors import CheckpointError, ConfigError, CourseError, DatasetError, ImageError
from .files import save_json

MODEL_NAMES = tuple(dict.fromkeys(r.model for r in config.RECIPES.values()))   # resnet9, vgg, compact
RECIPE_CHOICES = {"seed": None, "tuned": "resnet9-tuned"}   # --recipe -> key of config.RECIPES
SHORT_NAMES = ("plane", "car", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
# The mean/std of the original CIFAR-10 training set: used by `predict` only when a checkpoint
# records no normalisation statistics (the checkpoints `train` writes always do).
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
TEST_BATCH_DEFAULT = 256
GRID_DEFAULT = 32


# ----------------------------------------------------------------------------------------
# argparse plumbing: one-line errors, checked numbers, defaults in every help line
# ----------------------------------------------------------------------------------------
class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line: `error: ... (see PROG --help)`, exit 2."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # let `--lr -1e-3` reach the type check (Python < 3.13 reads it as an option otherwise)
        self._negative_number_matcher = re.compile(r"^-(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$")

    def error(self, message):
        self.exit(2, f"error: {message} (see `{self.prog} --help`)\n")


class _Formatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the description's line breaks; every help string states its own default."""

    def __init__(self, prog):
        super().__init__(prog, max_help_position=34, width=100)


def _number(kind, check, requirement: str, hint: str = ""):
    """An argparse type: parse `kind` (int or float), then require `check(value)`."""
    noun = "whole number" if kind is int else "number"

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a {noun}, got {text!r}") from None
        if not check(value):
            raise argparse.ArgumentTypeError(f"must be {requirement}, got {text}{hint}")
        return value

    return parse


positive_int = _number(int, lambda v: v > 0, "a positive whole number")
non_negative_int = _number(int, lambda v: v >= 0, "a whole number >= 0")
positive_float = _number(float, lambda v: math.isfinite(v) and v > 0, "a positive number",
                         " (the recipes use 2.54e-3 for Adam, 1e-3 for SGD)")
momentum_value = _number(float, lambda v: 0.0 <= v < 1.0, "in [0, 1)", " (the recipes use 0.9)")


def _per_model(field: str) -> str:
    """'resnet9 24, vgg 15, compact 200': a recipe field's default for every model."""
    return ", ".join(f"{m} {getattr(config.RECIPES[m], field)}" for m in MODEL_NAMES)


def _smoke_help() -> str:
    return (f"tiny real-data run: {config.SMOKE_TRAIN_PER_CLASS * 10:,} train / "
            f"{config.SMOKE_TEST_PER_CLASS * 10} test images, {config.SMOKE_EPOCHS} epochs, batch <= "
            f"{config.SMOKE_BATCH_SIZE} (default: on when SMOKE_TEST=1 is set, else off; "
            "--no-smoke overrides SMOKE_TEST)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="python -m helpers", formatter_class=_Formatter,
                     description="Train, test and use the CIFAR-10 course models "
                                 "(seed 001's ResNet-9, seed 003's VGG, seed 004's compact CNN).",
                     epilog="Run `python -m helpers COMMAND --help` for each command's options.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    # ---------------------------------------------------------------- train
    t = sub.add_parser(
        "train", formatter_class=_Formatter, help="train a model on CIFAR-10",
        description="Train a model on CIFAR-10 with its seed recipe (helpers.config.RECIPES).\n"
                    "Every flag left out takes the chosen recipe's value.\n\n"
                    "Writes into --checkpoints: <model>_last.pt after every epoch (resumable with\n"
                    "--resume), <model>_history.json and <model>_curves.png at the end, and with\n"
                    "--serialize the final model <model>.pt (what `test` and `predict` load).\n\n"
                    "Multi-GPU / multi-process: torchrun --nproc_per_node=N -m helpers train ...\n"
                    "runs DistributedDataParallel; --train_batch is then per process and the\n"
                    "effective batch is N x --train_batch.",
        epilog="examples:\n"
               "  python -m helpers train --model resnet9 --serialize\n"
               "  python -m helpers train --model resnet9 --recipe tuned --amp bf16 --channels-last\n"
               "  python -m helpers train --model compact --resume models/compact_last.pt\n"
               "  python -m helpers train --dry-run\n"
               "  torchrun --nproc_per_node=4 -m helpers train --model resnet9 --train_batch 128")
    t.add_argument("--model", choices=MODEL_NAMES, default=None,
                   help="the architecture; its seed recipe supplies every default below "
                        "(default: resnet9)")
    t.add_argument("--recipe", choices=tuple(RECIPE_CHOICES), default="seed",
                   help="'seed': the model's seed recipe; 'tuned': Page's tuned ResNet-9 recipe "
                        "(SGD Nesterov 0.4, weight decay 5e-4, label smoothing 0.2, flip TTA; "
                        "resnet9 only) (default: seed)")
    t.add_argument("--epochs", "--e", type=positive_int, default=None, metavar="EPOCHS",
                   help=f"number of epochs to train for (default: the recipe's: {_per_model('epochs')}; "
                        f"{config.SMOKE_EPOCHS} in smoke mode)")
    t.add_argument("--peak-epoch", type=positive_int, default=None, metavar="N",
                   help="OneCycle: the epoch at whose end the LR peaks, 1..EPOCHS (default: the "
                        f"recipe's: {config.PEAK_EPOCH} for resnet9; 1 in smoke mode)")
    t.add_argument("--verbose", "--v", action="store_true",
                   help="show Python warnings, the full recipe, and tracebacks on errors (default: off)")
    t.add_argument("--train_path", default=None, metavar="TRAIN_PATH",
                   help="CIFAR-10 to train on: a torchvision folder (holding cifar-10-batches-py/) or an "
                        "image-folder tree train/<class>/*, test/<class>/* (default: $CIFAR10_DIR, "
                        "else ./data/, downloading there if needed)")
    t.add_argument("--test_path", "--tp", default=None, metavar="TEST_PATH",
                   help="where to take the test split from, if not from TRAIN_PATH (default: TRAIN_PATH)")
    t.add_argument("--download", action="store_true",
                   help="download torchvision's CIFAR-10 into TRAIN_PATH/TEST_PATH if it is not there "
                        "(default: off; the default ./data/ is always downloaded into when empty)")
    t.add_argument("--checkpoints", default=str(config.DEFAULT_CHECKPOINT_DIR) + "/", metavar="CHECKPOINTS",
                   help="folder for checkpoints, history and curves (default: ./models/)")
    t.add_argument("--train_batch", type=positive_int, default=None, metavar="TRAIN_BATCH",
                   help="training batch size, per process under torchrun (default: the recipe's: "
                        f"{_per_model('batch_size')}; at most {config.SMOKE_BATCH_SIZE} in smoke mode)")
    t.add_argument("--test_batch", type=positive_int, default=None, metavar="TEST_BATCH",
                   help=f"evaluation batch size (default: the recipe's: {_per_model('test_batch_size')}; "
                        "at least 256 in smoke mode)")
    t.add_argument("--learning_rate", "--lr", type=positive_float, default=None, metavar="LR",
                   help="the LR (the peak LR under OneCycle) (default: the recipe's: "
                        f"{_per_model('lr')}; 0.4 for --recipe tuned)")
    t.add_argument("--momentum", "--m", type=momentum_value, default=None, metavar="MOMENTUM",
                   help="SGD momentum, or beta1 of Adam/NAdam (default: the recipe's: 0.9)")
    t.add_argument("--patience", type=non_negative_int, default=None, metavar="N",
                   help="early stopping: stop after N epochs without a better validation/test accuracy "
                        "and keep the best epoch's weights; 0 turns it off (default: the recipe's: "
                        "compact 35, others off; 1 in smoke mode)")
    t.add_argument("--serialize", "--s", action="store_true",
                   help="save the final model as CHECKPOINTS/<model>.pt (default: off)")
    t.add_argument("--smoke", action=argparse.BooleanOptionalAction, default=None, help=_smoke_help())
    t.add_argument("--dry-run", action="store_true",
                   help="one smoke epoch to check that everything works; saves nothing unless "
                        "--serialize is given (default: off)")
    t.add_argument("--seed", type=int, default=None,
                   help="seed of the weights, shuffling and augmentation (default: the recipe's: 0)")
    t.add_argument("--device", default=None,
                   help="cpu, cuda, cuda:N or mps (default: cuda if available, else mps, else cpu; "
                        "under torchrun cuda:LOCAL_RANK)")
    t.add_argument("--workers", type=non_negative_int, default=2,
                   help="data-loading worker processes; results depend on this number (default: 2)")
    t.add_argument("--resume", default=None, metavar="PATH",
                   help="continue the run saved in PATH (a <model>_last.pt) with the same settings; "
                        "ends exactly as the uninterrupted run would (default: start afresh)")
    t.add_argument("--fast-augment", action="store_true",
                   help="keep the uint8 training set on the device and run the seed-001 augmentation "
                        "there on whole batches (resnet9/vgg recipes; fastest on a GPU) (default: off)")
    t.add_argument("--amp", choices=("bf16", "fp16"), default=None,
                   help="mixed precision for the forward pass on CUDA (default: off, float32)")
    t.add_argument("--channels-last", action="store_true",
                   help="NHWC memory layout, which tensor cores prefer (default: off)")
    t.add_argument("--compile", action="store_true", help="torch.compile the model (default: off)")

    # ---------------------------------------------------------------- test
    s = sub.add_parser(
        "test", formatter_class=_Formatter, help="evaluate a saved model on the test set",
        description="Evaluate a saved model on the CIFAR-10 test set: overall and per-class\n"
                    "accuracy, the most confused pairs, and seed 003's picture of predictions\n"
                    "(green right, red wrong). The checkpoint records its architecture, so any\n"
                    "of the three models loads without naming it.",
        epilog="examples:\n"
               "  python -m helpers test --model models/resnet9.pt\n"
               "  python -m helpers test --model models/vgg.pt --confusion --out results/")
    s.add_argument("--model", required=True, metavar="MODEL",
                   help="the checkpoint to test, e.g. models/resnet9.pt (required)")
    s.add_argument("--test_path", "--tp", default=None, metavar="TP",
                   help="CIFAR-10 folder to take the test images from (default: $CIFAR10_DIR, else ./data/, "
                        "downloading there if needed)")
    s.add_argument("--download", action="store_true",
                   help="download torchvision's CIFAR-10 into TP if it is not there (default: off)")
    s.add_argument("--batch", "--test_batch", type=positive_int, default=TEST_BATCH_DEFAULT,
                   help=f"evaluation batch size; results do not depend on it (default: {TEST_BATCH_DEFAULT}; "
                        "seed 003 used 8, which is only slower)")
    s.add_argument("--confusion", "--cm", action="store_true",
                   help="also print the confusion matrix and save it as a PNG (default: off)")
    s.add_argument("--grid", type=non_negative_int, default=GRID_DEFAULT, metavar="N",
                   help=f"images in the prediction picture, 0 for none (default: {GRID_DEFAULT})")
    s.add_argument("--out", default=None, metavar="DIR",
                   help="folder for the PNGs (default: the checkpoint's folder)")
    s.add_argument("--smoke", action=argparse.BooleanOptionalAction, default=None,
                   help=f"test on {config.SMOKE_TEST_PER_CLASS * 10} images only (default: on when "
                        "SMOKE_TEST=1 is set, else off)")
    s.add_argument("--device", default=None, help="cpu, cuda, cuda:N or mps (default: the best available)")
    s.add_argument("--verbose", "--v", action="store_true",
                   help="show Python warnings and tracebacks on errors (default: off)")

    # ---------------------------------------------------------------- predict
    p = sub.add_parser(
        "predict", formatter_class=_Formatter, help="classify your own images",
        description="Classify image files with a saved model and print the top classes with their\n"
                    "probabilities. Images of any size are resized to 32x32; RGBA and greyscale\n"
                    "images are converted to RGB.",
        epilog="examples:\n"
               "  python -m helpers predict cat.jpg\n"
               "  python -m helpers predict --model models/compact.pt *.png --plot probs.png")
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files: PNG, JPEG, BMP, GIF, ... (required)")
    p.add_argument("--model", default=None, metavar="MODEL",
                   help="the checkpoint to use (default: the newer of ./models/resnet9.pt and the shipped "
                        f"{_rel(config.SHIPPED_MODEL)})")
    p.add_argument("--top", type=positive_int, default=3, metavar="K", help="classes shown per image (default: 3)")
    p.add_argument("--plot", default=None, metavar="PATH",
                   help="save the images with bars of their class probabilities as a PNG (default: no plot)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:N or mps (default: the best available)")
    p.add_argument("--verbose", "--v", action="store_true",
                   help="show Python warnings and tracebacks on errors (default: off)")
    return parser


def _rel(path: Path) -> str:
    try:
        return str(Path(path).relative_to(config.REPO_ROOT))
    except ValueError:
        return str(path)


# ----------------------------------------------------------------------------------------
# main
# ----------------------------------------------------------------------------------------
def main(argv=None) -> int:
    """Run one command; returns the exit status (argparse exits 2 itself on bad flags)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    command = {"train": cmd_train, "test": cmd_test, "predict": cmd_predict}[args.command]
    with warnings.catch_warnings():
        if not args.verbose:
            warnings.simplefilter("ignore")      # seed 003: warnings only with --verbose
        try:
            return command(args) or 0
        except CourseError as e:
            if args.verbose:
                traceback.print_exc()
            rank = os.environ.get("RANK")
            where = f" (rank {rank})" if rank not in (None, "0") else ""
            print(f"error{where}: {e}", file=sys.stderr, flush=True)
            return 2 if isinstance(e, ConfigError) else 1
        except KeyboardInterrupt:
            print("\ninterrupted", file=sys.stderr)
            return 130


def _say(*lines, file=None):
    for line in lines:
        print(line, file=file or sys.stdout, flush=True)


def _note(text: str) -> None:
    print(f"note: {text}", file=sys.stderr, flush=True)


def _smoke(args) -> bool:
    return config.smoke_mode() if args.smoke is None else args.smoke


# ----------------------------------------------------------------------------------------
# data and files
# ----------------------------------------------------------------------------------------
def _check_data_path(path, flag: str, download: bool) -> None:
    p = Path(path).expanduser()
    if not p.exists() and not download:
        raise DatasetError(f"{flag} {p} does not exist: point it at a CIFAR-10 copy (a torchvision "
                           "folder or a train/<class>, test/<class> image tree), or add --download "
                           "to fetch CIFAR-10 there")


def load_data(train_path=None, test_path=None, download: bool = False, smoke: bool = False,
              train_flag: str = "--train_path", test_flag: str = "--test_path"):
    """CIFAR-10 from the given paths (train split from one, test split from the other when
    they differ), else $CIFAR10_DIR, else ./data; the smoke subset in smoke mode."""
    from .data import CIFAR10Data, load_cifar10

    for path, flag in ((train_path, train_flag), (test_path, test_flag)):
        if path is not None:
            _check_data_path(path, flag, download)
    train_root, test_root = train_path or test_path, test_path or train_path
    dl = download or train_root is None          # ./data is downloaded into as data.py does
    try:
        data = load_cifar10(train_root, download=dl)
        if test_root is not None and Path(test_root).expanduser().resolve() != Path(train_root).expanduser().resolve():
            other = load_cifar10(test_root, download=download)
            data = CIFAR10Data(data.train_images, data.train_labels, other.test_images, other.test_labels,
                               data.classes, f"train: {data.source}; test: {other.source}")
    except DatasetError as e:
        raise DatasetError(str(e).replace("or allow download", "or add --download")) from None
    return data.smoke_subset() if smoke else data


def _writable_dir(path: Path, flag: str) -> Path:
    """Create `path` if needed and check that files can be written there."""
    path = Path(path).expanduser()
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write-test-"):
            pass
    except OSError as e:
        raise CheckpointError(f"cannot write to {path} ({e.strerror or type(e).__name__}): "
                              f"choose a writable folder with {flag}") from None
    return path


def write_json(path: Path, obj) -> Path:
    """Write `obj` as JSON atomically, with a one-line error for an unwritable folder."""
    try:
        return save_json(path, obj)
    except OSError as e:
        raise CheckpointError(f"cannot write {path} ({e.strerror}): choose a writable folder") from None


def _save_png(fig, path: Path, flag: str = "--out") -> Path:
    from .plots import close, save_figure

    try:
        return save_figure(fig, path)
    except OSError as e:
        raise CheckpointError(f"cannot write {path} ({e.strerror}): choose a writable folder with {flag}") from None
    finally:
        close(fig)


def package_versions() -> dict:
    import platform
    from importlib import metadata

    versions = {"python": platform.python_version()}
    for name in ("torch", "torchvision", "numpy", "albumentations", "matplotlib", "pillow", "tqdm"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return versions


def _device_name(device) -> str:
    import torch

    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return str(device)


# ----------------------------------------------------------------------------------------
# train
# ----------------------------------------------------------------------------------------
def train_recipe(args, smoke: bool):
    """The recipe the flags ask for: the model's seed recipe (or the tuned one) with every
    given flag applied, shrunk in smoke mode and to one epoch for --dry-run."""
    model = args.model or "resnet9"
    name = RECIPE_CHOICES[args.recipe] or model
    if config.RECIPES[name].model != model:
        raise ConfigError(f"--recipe {args.recipe} is a {config.RECIPES[name].model} recipe, not {model}: "
                          f"drop --recipe or use --model {config.RECIPES[name].model}")
    base = config.recipe(name, smoke=smoke)
    if args.peak_epoch is not None and base.schedule != "onecycle":
        raise ConfigError(f"--peak-epoch shapes the OneCycle schedule, but the {name} recipe keeps a constant "
                          "LR: drop --peak-epoch")
    epochs = 1 if args.dry_run else (args.epochs or base.epochs)
    peak = args.peak_epoch or base.peak_epoch      # smoke recipes (and so --dry-run) peak at epoch 1
    if base.schedule == "onecycle" and peak > epochs:
        if args.peak_epoch is not None:
            raise ConfigError(f"--peak-epoch {peak} is beyond the {epochs} epochs: choose 1..{epochs}")
        raise ConfigError(f"the {name} recipe peaks at epoch {peak} but only {epochs} epochs were asked for: "
                          f"add --peak-epoch N with N in 1..{epochs}")
    r = base.replace(epochs=epochs, peak_epoch=peak, batch_size=args.train_batch,
                     test_batch_size=args.test_batch, lr=args.learning_rate, momentum=args.momentum,
                     seed=args.seed)
    if args.patience is not None:
        r.early_stopping_patience = args.patience or None
    if args.fast_augment and r.augment not in ("seed001", "none"):
        raise ConfigError(f"--fast-augment runs the seed001 augmentation on the device, but the {name} "
                          f"recipe uses {r.augment}: drop --fast-augment")
    return name, r.validate()


# Recipe fields that may differ between a run and its resumption (they do not change training).
RESUME_FREE = {"test_batch_size", "notes"}


def check_resume(path, r) -> dict:
    """Refuse a --resume checkpoint of another architecture, with weights only, or trained with
    other settings (a resumed run must repeat the original command to end identically)."""
    from .checkpoint import load_checkpoint

    ckpt = load_checkpoint(path)
    if ckpt["arch"] != r.model:
        raise CheckpointError(f"cannot resume {path}: it holds a {ckpt['arch']} model, not {r.model}; "
                              f"add --model {ckpt['arch']} (and the run's other settings)")
    if "optimizer" not in ckpt or "epoch" not in ckpt:
        raise CheckpointError(f"{path} holds final weights only, not a training state: resume from "
                              f"{Path(path).parent / (r.model + '_last.pt')} or start a new run")
    saved, now = ckpt.get("config") or {}, r.to_dict()
    diffs = [f"{k} {saved[k]!r} -> {now[k]!r}" for k in now
             if k in saved and k not in RESUME_FREE and saved[k] != now[k]]
    if diffs:
        raise ConfigError(f"cannot resume {path} with other settings ({'; '.join(diffs)}): repeat the "
                          "original run's flags (and SMOKE_TEST), or start a new run without --resume")
    return ckpt


def cmd_train(args) -> int:
    from . import distributed as ddp

    smoke = True if args.dry_run else _smoke(args)
    name, r = train_recipe(args, smoke)
    save = args.serialize or not args.dry_run
    ckpt_dir = Path(args.checkpoints).expanduser()
    last_path, final_path = ckpt_dir / f"{r.model}_last.pt", ckpt_dir / f"{r.model}.pt"
    history_path, curves_path = ckpt_dir / f"{r.model}_history.json", ckpt_dir / f"{r.model}_curves.png"

    # fail fast, before joining a process group or loading anything
    if save and os.environ.get("RANK", "0") == "0":
        _writable_dir(ckpt_dir, "--checkpoints")
    for path, flag in ((args.train_path, "--train_path"), (args.test_path, "--test_path")):
        if path is not None:
            _check_data_path(path, flag, args.download)
    resumed = check_resume(args.resume, r) if args.resume else None

    with ddp.distributed(args.device) as info:
        log = print if info.is_main else (lambda *a, **k: None)

        import torch

        from .engine import train

        data = load_data(args.train_path, args.test_path, args.download, smoke)
        n_train = len(data.train_labels)
        n_val = int(round(r.val_split * n_train / 10)) * 10 if r.val_split else 0
        log(f"training {r.model} with the {name} recipe on {_device_name(info.device)}"
            + (" [smoke]" if smoke else "") + (" [dry run]" if args.dry_run else ""))
        log(f"data: {data.source}: {n_train - n_val:,} train"
            + (f" / {n_val:,} validation" if n_val else "") + f" / {len(data.test_labels):,} test images")
        sched = f"OneCycle (peak at epoch {r.peak_epoch})" if r.schedule == "onecycle" else "constant LR"
        log(f"recipe: {r.optimizer} lr {r.lr:g}, {sched}, {r.epochs} epoch{'s' if r.epochs > 1 else ''}, batch {r.batch_size}, "
            f"augmentation {r.augment}"
            + (f", early stopping patience {r.early_stopping_patience}" if r.early_stopping_patience else "")
            + (f", weight decay {r.weight_decay:g}" if r.weight_decay else "")
            + (f", label smoothing {r.label_smoothing:g}" if r.label_smoothing else ""))
        if args.verbose:
            log(f"full recipe: {json.dumps(r.to_dict())}")
        if info.enabled:
            log(f"distributed: {info.world_size} processes ({info.backend}); batch {r.batch_size} per "
                f"process, effective batch {info.world_size * r.batch_size} "
                f"({info.world_size} x {r.batch_size})")
        if resumed is not None:
            done = resumed["epoch"] + 1
            log(f"resuming {args.resume}: {done} of {r.epochs} epochs done")
        if save:
            log(f"checkpoint after every epoch: {last_path}")

        t0 = time.time()
        result = train(r, data, device=info.device, workers=args.workers,
                       checkpoint_path=last_path if save else None, resume=args.resume, amp=args.amp,
                       channels_last=args.channels_last, fast_augment=args.fast_augment,
                       compile=args.compile, progress=True, log=log)
        wall = time.time() - t0
        if not info.is_main:                     # rank 0 alone reports and saves
            return 0

        history, test = result["history"], result["test"]
        log(f"test accuracy: {test['acc']:.4f} (loss {test['loss']:.4f}) on {len(data.test_labels):,} images"
            + (" with flip TTA" if r.tta_flip else "") + f"; {wall:.1f} s")
        if not save:
            log("dry run: nothing saved (add --serialize to save)")
            return 0
        mean, std = [float(v) for v in data.mean], [float(v) for v in data.std]
        if args.serialize:
            from .checkpoint import save_checkpoint

            save_checkpoint(final_path, result["model"], r.model, config=r.to_dict(), recipe=name,
                            history=history, metrics={"test_acc": test["acc"], "test_loss": test["loss"]},
                            mean=mean, std=std, classes=list(data.classes), data=data.source,
                            epochs_trained=len(history["train_loss"]), device=str(info.device))
            log(f"saved model: {final_path}")
        record = {
            "model": r.model, "recipe": name, "config": r.to_dict(), "history": history,
            "test": {"acc": test["acc"], "loss": test["loss"], "images": len(data.test_labels)},
            "device": _device_name(info.device), "world_size": info.world_size,
            "effective_batch": info.world_size * r.batch_size, "workers": args.workers,
            "amp": args.amp, "channels_last": args.channels_last, "fast_augment": args.fast_augment,
            "compile": args.compile, "smoke": smoke,
            "data": {"source": data.source, "train_images": n_train - n_val, "validation_images": n_val,
                     "test_images": len(data.test_labels), "mean": mean, "std": std},
            "versions": package_versions(), "wall_seconds": wall,
            "resumed_from": str(args.resume) if args.resume else None,
            "checkpoint": str(last_path), "model_file": str(final_path) if args.serialize else None,
            "command": ["python", "-m", "helpers", *args.argv], "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "torch_threads": torch.get_num_threads(),
        }
        write_json(history_path, record)
        log(f"saved history: {history_path}")
        from .plots import training_curves

        _save_png(training_curves(history), curves_path, "--checkpoints")
        log(f"saved curves: {curves_path}")
    return 0


# ----------------------------------------------------------------------------------------
# test
# ----------------------------------------------------------------------------------------
def _load_for_inference(path, device_arg):
    from .checkpoint import load_model
    from .engine import get_device

    device = get_device(device_arg)
    model, ckpt = load_model(path, device)
    cfg = ckpt.get("config") or {}
    return model, ckpt, device, bool(cfg.get("tta_flip", False))


def cmd_test(args) -> int:
    import numpy as np

    from . import analysis
    from .plots import confusion_matrix as cm_figure, prediction_grid

    model, ckpt, device, tta = _load_for_inference(args.model, args.device)
    out = _writable_dir(Path(args.out) if args.out else Path(args.model).expanduser().parent, "--out")
    smoke = _smoke(args)
    data = load_data(args.test_path, None, args.download, smoke, train_flag="--test_path")
    mean, std = ckpt.get("mean"), ckpt.get("std")
    stats = "the checkpoint's"
    if mean is None or std is None:
        mean, std, stats = data.mean, data.std, "the dataset's (the checkpoint records none)"
    _say(f"model: {args.model} ({ckpt['arch']}" + (f", {ckpt['recipe']} recipe" if ckpt.get("recipe") else "")
         + f") on {device}" + (", flip TTA" if tta else ""),
         f"data: {data.source}: {len(data.test_labels):,} test images" + (" [smoke]" if smoke else ""),
         f"normalisation: {stats} mean/std")
    pred = analysis.predict(model, data.test_images, data.test_labels, mean, std, device,
                            batch_size=args.batch, tta_flip=tta, progress=True)
    cm = analysis.confusion_matrix(pred.labels, pred.preds, len(data.classes))
    _say(f"test accuracy: {pred.accuracy:.4f} ({int(pred.correct.sum()):,}/{len(pred.labels):,} correct)",
         "", "per-class accuracy:", analysis.class_report(cm, data.classes))
    pairs = analysis.top_confused_pairs(cm, data.classes)
    if pairs:
        _say("", "most confused:", analysis.format_table(pairs, ("target", "prediction", "images")))
    stem = Path(args.model).stem
    if args.confusion:
        names = SHORT_NAMES if len(data.classes) == 10 else data.classes
        rows = [(names[i], *map(int, cm[i])) for i in range(len(names))]
        _say("", "confusion matrix (rows: true class, columns: predicted class):",
             analysis.format_table(rows, ("true \\ pred", *names)))
        path = _save_png(cm_figure(cm, data.classes, title=f"Confusion matrix: {stem}"),
                         out / f"{stem}_confusion.png")
        _say(f"saved confusion matrix: {path}")
    if args.grid:
        rng = np.random.default_rng(0)
        idx = np.sort(rng.choice(len(pred.labels), min(args.grid, len(pred.labels)), replace=False))
        fig = prediction_grid(data.test_images[idx], pred.labels[idx], pred.preds[idx], data.classes)
        path = _save_png(fig, out / f"{stem}_predictions.png")
        _say(f"saved predictions: {path}")
    return 0


# ----------------------------------------------------------------------------------------
# predict
# ----------------------------------------------------------------------------------------
def default_model() -> Path:
    """The newer of ./models/resnet9.pt (what `train --serialize` writes) and the shipped model."""
    from .checkpoint import freshest_checkpoint

    return freshest_checkpoint((config.DEFAULT_CHECKPOINT_DIR / "resnet9.pt", config.SHIPPED_MODEL),
                               "train one with `python -m helpers train --serialize` or pass --model PATH")


def read_image(path):
    """A file as a 32x32 RGB uint8 array, plus notes on what was changed to get there."""
    import numpy as np
    from PIL import Image, ImageOps, UnidentifiedImageError

    p = Path(path).expanduser()
    if not p.is_file():
        what = "is a folder" if p.is_dir() else "does not exist"
        raise ImageError(f"{p} {what}: pass image files (PNG, JPEG, ...)")
    notes = []
    try:
        with Image.open(p) as im:
            im.load()
            im = ImageOps.exif_transpose(im)
            if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
                rgba = im.convert("RGBA")
                im = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
                notes.append("converted RGBA to RGB on a white background")
            elif im.mode != "RGB":
                kind = {"L": "greyscale", "1": "black-and-white", "I": "greyscale", "I;16": "greyscale",
                        "P": "palette", "CMYK": "CMYK"}.get(im.mode, im.mode)
                notes.append(f"converted {kind} ({im.mode}) to RGB")
                im = im.convert("RGB")
            if im.size != (32, 32):
                notes.append(f"resized {im.size[0]}x{im.size[1]} to 32x32 (the models see 32x32 images)")
                im = im.resize((32, 32), Image.Resampling.LANCZOS)
            return np.asarray(im, dtype=np.uint8), notes
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise ImageError(f"{p} is not a readable image ({type(e).__name__}): pass PNG, JPEG or "
                         "other image files") from None


def cmd_predict(args) -> int:
    images, names = [], []
    for path in args.images:                       # check every file before loading the model
        img, notes = read_image(path)
        for n in notes:
            _note(f"{path}: {n}")
        images.append(img)
        names.append(path)
    model_path = Path(args.model).expanduser() if args.model else default_model()
    plot = Path(args.plot).expanduser() if args.plot else None
    if plot is not None:
        _writable_dir(plot.parent, "--plot")
    import numpy as np

    from . import analysis
    from .data import CLASSES

    model, ckpt, device, tta = _load_for_inference(model_path, args.device)
    mean, std = ckpt.get("mean"), ckpt.get("std")
    if mean is None or std is None:
        mean, std = CIFAR10_MEAN, CIFAR10_STD
        _note(f"{model_path} records no normalisation statistics: using CIFAR-10's standard mean/std")
    classes = tuple(ckpt.get("classes") or CLASSES)
    unknown = np.zeros(len(images), dtype=np.int64)         # predict() wants labels; none are known
    probs = analysis.predict(model, np.stack(images), unknown, mean, std, device, tta_flip=tta).probs
    k = min(args.top, len(classes))
    _say(f"model: {model_path} ({ckpt['arch']})")
    width = max(len(c) for c in classes)
    for name, pr in zip(names, probs):
        _say(name)
        for rank, c in enumerate(np.argsort(-pr, kind="stable")[:k], 1):
            _say(f"  {rank}. {classes[c]:<{width}}  {pr[c]:6.1%}")
    if args.plot:
        from .plots import probability_bars

        path = _save_png(probability_bars(np.stack(images), probs, classes), plot, "--plot")
        _say(f"saved plot: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
