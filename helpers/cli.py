"""The command line, `python -m helpers train | test | predict`: it parses, calls the helpers and reports.
A problem a user can fix (helpers.errors.CourseError) is one line on stderr, `error: ...`: exit status 2 for bad
settings (argparse, ConfigError), else 1; `--verbose` adds the traceback. Torch loads only after parsing."""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
import sys
import time
import traceback
import warnings
from pathlib import Path

import numpy as np

from . import config, distributed as ddp
from .errors import ConfigError, CourseError, OutputError
from .data import load_data
from .files import save_json, writable_dir
from .runinfo import run_info

MODEL_NAMES = tuple(dict.fromkeys(r.model for r in config.RECIPES.values()))   # resnet9, vgg, compact, fast
RECIPE_CHOICES = {"reference": None, "tuned": "resnet9-tuned"}   # --recipe -> key of config.RECIPES
TTA_CHOICES = {"recipe": None, "none": (False, 0), "flip": (True, 0), "flip-shift": (True, 1)}  # test --tta
SHORT_NAMES = ("plane", "car", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


# ----------------------------------------------------------------------------------------
# the parser: one-line errors, checked numbers, every default in --help (the recipes' generated)
# ----------------------------------------------------------------------------------------
class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line: `error: ... (see PROG --help)`, exit 2."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # let `--lr -1e-3` reach the type check (Python < 3.13 reads it as an option otherwise)
        self._negative_number_matcher = re.compile(r"^-(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$")

    def error(self, message):
        self.exit(2, f"error: {message} (see `{self.prog} --help`)\n")


class _Formatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Keeps line breaks; ends every help with its default: the recipes', the one it states, or argparse's."""

    def _get_help_string(self, action):
        if action.dest in RECIPE_FLAGS and action.default is argparse.SUPPRESS:
            return f"{action.help} (default: the recipe's: {recipe_defaults(action.dest)})"
        if "(default" in action.help or action.required:
            return action.help
        return f"{action.help} (default: off)" if action.default is False else super()._get_help_string(action)


def recipe_defaults(field: str) -> str:
    """'resnet9 24, resnet9-tuned 24, vgg 15, compact 200', or the one value all recipes share."""
    shown = {name: "off" if v is None else f"{v:g}" if isinstance(v, float) else str(v)
             for name, v in ((name, getattr(r, field)) for name, r in config.RECIPES.items())}
    return shown["resnet9"] if len(set(shown.values())) == 1 else ", ".join(f"{k} {v}" for k, v in shown.items())


def _number(kind, check, requirement: str, hint: str = ""):
    """An argparse type: parse `kind` (int or float), then require `check(value)`."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a {'whole ' * (kind is int)}number, got {text!r}") from None
        if not check(value):
            raise argparse.ArgumentTypeError(f"must be {requirement}, got {text}{hint}")
        return value
    return parse


positive_int = _number(int, lambda v: v > 0, "a positive whole number")
non_negative_int = _number(int, lambda v: v >= 0, "a whole number >= 0")
finite_float = _number(float, math.isfinite, "a finite number")      # its range: Recipe.validate
positive_float = _number(float, lambda v: math.isfinite(v) and v > 0, "a positive number", " (e.g. 2.54e-3 for Adam)")
momentum_value = _number(float, lambda v: 0.0 <= v < 1.0, "in [0, 1)", " (the recipes use 0.9)")

# Recipe fields train sets: field -> (flags, type, help); a flag left out keeps the recipe's value
RECIPE_FLAGS = {
    "lr": (("--learning_rate", "--lr"), positive_float, "the LR (the peak LR under OneCycle)"),
    "peak_epoch": (("--peak-epoch",), positive_int, "OneCycle: the epoch at whose end the LR peaks, 1..EPOCHS"),
    "epochs": (("--epochs", "--e"), positive_int, "number of epochs to train for"),
    "batch_size": (("--train_batch",), positive_int, "training batch size, per process under torchrun"),
    "test_batch_size": (("--test_batch",), positive_int, "evaluation batch size"),
    "momentum": (("--momentum", "--m"), momentum_value, "SGD momentum, or beta1 of Adam/NAdam"),
    "weight_decay": (("--weight-decay", "--weight_decay"), finite_float, "weight decay, >= 0"),
    "dropout": (("--dropout",), finite_float, "resnet9 only: dropout after every Conv-BN-ReLU, in [0, 1)"),
    "logit_scale": (("--logit-scale",), positive_float, "resnet9 only: multiply the logits (Page: 0.125)"),
    "early_stopping_patience": (("--patience",), non_negative_int, "early stopping patience in epochs; 0: off"),
    "eval_every": (("--eval-every",), non_negative_int, "read the eval set every N epochs and the last; 0: the last only"),
    "seed": (("--seed",), int, "seed of the weights, shuffling and augmentation"),
}
TRAIN_DOC = """Train a model on CIFAR-10 with its reference recipe (helpers.config.RECIPES); each recipe flag overrides one
setting. Writes into --checkpoints <arch>_last.pt every epoch (for --resume), <arch>_history.json, <arch>_curves.png
and with --serialize <arch>.pt. Under torchrun --nproc_per_node=N the effective batch is N x --train_batch."""
SMOKE_HELP = (f"the smoke subset: {config.SMOKE_TRAIN_PER_CLASS * 10:,} train / {config.SMOKE_TEST_PER_CLASS * 10} test "
              f"images, {config.SMOKE_EPOCHS} epochs (default: on when SMOKE_TEST=1 is set, else off)")


def _command(sub, name: str, summary: str, description: str, *examples: str):
    """A subcommand with --device and --verbose; returns its add_argument."""
    p = sub.add_parser(name, formatter_class=_Formatter, help=summary, description=description,
                       epilog="examples:\n" + "\n".join(f"  python -m helpers {name} {e}" for e in examples))
    p.add_argument("--device", help="cpu, cuda, cuda:N or mps (default: the best available)")
    p.add_argument("--verbose", "--v", action="store_true", help="show warnings and tracebacks (train: the recipe)")
    return p.add_argument


def _add_train(sub) -> None:
    a = _command(sub, "train", "train a model on CIFAR-10", TRAIN_DOC, "--arch resnet9 --serialize",
                 "--arch resnet9 --recipe tuned --amp bf16 --channels-last", "--arch vgg --e 15 --lr 0.001")
    a("--arch", choices=MODEL_NAMES, default="resnet9", help="the architecture, with its reference recipe")
    a("--model", dest="arch", choices=MODEL_NAMES, default=argparse.SUPPRESS, help=argparse.SUPPRESS)  # --arch's old name
    a("--recipe", choices=tuple(RECIPE_CHOICES), default="reference", type=lambda v: "reference" if v == "seed" else v,
      help="reference: the architecture's reference recipe; tuned: Page's ResNet-9 recipe (resnet9 only)")
    a("--train_path", help="a torchvision CIFAR-10 folder or a train/<class>, test/<class> image tree "
      "(default: $CIFAR10_DIR, else ./data/, downloading there if needed)")
    a("--test_path", "--tp", help="where the test split comes from (default: TRAIN_PATH)")
    a("--download", action="store_true", help="download CIFAR-10 into TRAIN_PATH/TEST_PATH if it is missing")
    a("--checkpoints", help=f"folder for checkpoints, history, curves (default: ./{config.DEFAULT_CHECKPOINT_DIR}/; "
      f"smoke runs: ./{config.SMOKE_CHECKPOINT_DIR}/, so they never overwrite a full run's model)")
    a("--serialize", "--s", action="store_true", help="save the final model as CHECKPOINTS/<arch>.pt")
    a("--smoke", action=argparse.BooleanOptionalAction, help=SMOKE_HELP)
    a("--dry-run", action="store_true", help="one smoke epoch; saves nothing unless --serialize")
    a("--workers", type=non_negative_int, help="data-loading processes; results depend on it "
      "(default: 0 with the on-device augmentation, else 2)")
    a("--resume", metavar="PATH", help="continue the run saved in PATH, a <arch>_last.pt (default: start afresh)")
    # speed settings: what a flag says, else what helpers.hardware.auto_options picks for the device
    a("--fast-augment", action=argparse.BooleanOptionalAction, help="the recipe's augmentation on whole uint8 "
      "batches on the device (default: on where the recipe's has that twin: helpers.augment.PRESETS)")
    a("--amp", choices=("auto", "bf16", "fp16", "off"), default="auto", help="mixed precision. auto: bf16 on "
      "Ampere+ GPUs and on CPUs with AVX-512 BF16/AMX, fp16 with a grad scaler on older GPUs, else off (float32)")
    a("--channels-last", action=argparse.BooleanOptionalAction,
      help="NHWC memory layout (default: as auto picks: on with GPU tensor cores and on any CPU)")
    a("--compile", action="store_true", help="torch.compile the model")
    for field in dataclasses.fields(config.Recipe):       # the recipe flags, generated in the Recipe's order
        if field.name in RECIPE_FLAGS:
            flags, kind, text = RECIPE_FLAGS[field.name]
            a(*flags, dest=field.name, type=kind, default=argparse.SUPPRESS, help=text,
              metavar=min((f.lstrip("-") for f in flags if len(f) > 3), key=len).upper().replace("-", "_"))


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="python -m helpers", formatter_class=_Formatter,
                     description="Train, test and use the CIFAR-10 course models "
                                 "(S10's ResNet-9, the VGG exercise's network, the Keras CNN, the fast net).",
                     epilog="Run `python -m helpers COMMAND --help` for each command's options.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    _add_train(sub)
    a = _command(sub, "test", "evaluate a saved model on the test set", "Evaluate a saved model on the CIFAR-10 "
                 "test set: overall and per-class accuracy, the most\nconfused pairs and the VGG exercise's picture of "
                 "predictions (green right, red wrong).", "--model models/resnet9.pt", "--model models/vgg.pt --cm",
                 "--model models/resnet9_cifar10.pt --tta flip")
    a("--model", required=True, help="the checkpoint to test, e.g. models/resnet9.pt (required)")
    a("--test_path", "--tp", metavar="TP", help="CIFAR-10 folder (default: $CIFAR10_DIR, else ./data/)")
    a("--download", action="store_true", help="download CIFAR-10 into TP if it is missing")
    a("--batch", "--test_batch", type=positive_int, default=256, help="evaluation batch size (the VGG exercise used 8)")
    a("--tta", choices=tuple(TTA_CHOICES), default="recipe", help="test-time augmentation: the one the model's "
      "recipe tests with, none, the mirror image (2 views), or the mirror and 1-pixel shifts (6 views)")
    a("--confusion", "--cm", action="store_true", help="also print and save the confusion matrix")
    a("--grid", type=non_negative_int, default=32, metavar="N", help="images in the prediction picture")
    a("--out", metavar="DIR", help="folder for the PNGs (default: the checkpoint's folder)")
    a("--smoke", action=argparse.BooleanOptionalAction, help=SMOKE_HELP)
    a = _command(sub, "predict", "classify your own images", "Classify image files with a saved model. Images "
                 "of any size are resized to 32x32;\nRGBA and greyscale images are converted to RGB.", "cat.jpg",
                 "--model models/compact.pt *.png --plot probs.png")
    a("images", nargs="+", metavar="IMAGE", help="image files: PNG, JPEG, BMP, GIF, ...")
    a("--model", help="the checkpoint (default: the newer of ./models/resnet9.pt and the shipped model)")
    a("--top", type=positive_int, default=3, metavar="K", help="classes shown per image")
    a("--plot", metavar="PATH", help="save the images beside their probability bars (default: no plot)")
    return parser


# ----------------------------------------------------------------------------------------
# main, and the files every command writes
# ----------------------------------------------------------------------------------------
def main(argv=None) -> int:
    """Run one command; returns the exit status (argparse exits 2 itself on bad flags)."""
    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    with warnings.catch_warnings():
        if not args.verbose:
            warnings.simplefilter("ignore")      # the VGG exercise: warnings only with --verbose
        try:
            if hasattr(args, "smoke") and args.smoke is None:      # predict has no smoke mode
                args.smoke = config.smoke_mode()             # the flag, else SMOKE_TEST (an entry point)
            return {"train": cmd_train, "test": cmd_test, "predict": cmd_predict}[args.command](args) or 0
        except CourseError as e:
            if args.verbose:
                traceback.print_exc()
            rank = os.environ.get("RANK", "0")
            print(f"error{f' (rank {rank})' if rank != '0' else ''}: {e}", file=sys.stderr, flush=True)
            return 2 if isinstance(e, ConfigError) else 1
        except KeyboardInterrupt:
            print("\ninterrupted", file=sys.stderr)
            return 130


def _say(*lines, file=None) -> None:
    print(*lines, sep="\n", file=file or sys.stdout, flush=True)


def _save(what: str, path: Path, obj, flag: str = "--out") -> None:
    """Write a JSON record (a dict) or a matplotlib figure atomically and say so; one-line errors."""
    from .plots import close, save_figure

    try:
        _say(f"saved {what}: {save_json(path, obj) if isinstance(obj, dict) else save_figure(obj, path)}")
    except OSError as e:
        raise OutputError(f"cannot write {path} ({e.strerror or e}): choose a writable folder with {flag}") from e
    finally:
        if not isinstance(obj, dict):
            close(obj)


# ----------------------------------------------------------------------------------------
# the commands: train, test and predict
# ----------------------------------------------------------------------------------------
def train_recipe(args):
    """(name, recipe): the reference or tuned recipe (smoke-shrunk) with the flags given, checked by Recipe.validate."""
    name = RECIPE_CHOICES[args.recipe] or args.arch
    if config.RECIPES[name].model != args.arch:
        raise ConfigError(f"--recipe {args.recipe} is a {config.RECIPES[name].model} recipe, not {args.arch}: "
                          f"drop --recipe or use --arch {config.RECIPES[name].model}")
    base = config.recipe(name, smoke=args.smoke)
    given = {field: getattr(args, field) for field in RECIPE_FLAGS if hasattr(args, field)}
    given.update({"epochs": 1} if args.dry_run else {})
    if "peak_epoch" in given and base.schedule != "onecycle":
        raise ConfigError(f"--peak-epoch shapes the OneCycle schedule, but the {name} recipe's schedule is "
                          f"{base.schedule}: drop --peak-epoch")
    if "early_stopping_patience" in given:
        given["early_stopping_patience"] = given["early_stopping_patience"] or None    # 0: off
    return name, dataclasses.replace(base, **given).validate()


def _start(args, name, r, data, info, resumed, last) -> tuple[dict, list[str]]:
    """The record <model>_history.json keeps of a run (results to come), and what the run says as it starts."""
    from .loaders import input_stats

    n, n_val = info.world_size, data.validation_size(r.val_split)
    mean, std = input_stats(r, data)                  # what the saved model's inputs are normalised with
    d = {"source": data.source, "train_images": len(data.train_labels) - n_val, "validation_images": n_val,
         "test_images": len(data.test_labels), "mean": list(map(float, mean)), "std": list(map(float, std))}
    folder = Path(args.checkpoints).expanduser()
    rec = {"model": r.model, "recipe": name, "config": r.to_dict(), **run_info(info.device), "world_size": n,
           "effective_batch": n * r.batch_size, "data": d, "resumed_from": str(args.resume) if args.resume else None,
           **{k: getattr(args, k) for k in ("workers", "amp", "channels_last", "fast_augment", "compile", "smoke")},
           "checkpoint": str(folder / f"{r.model}_last.pt"), "command": ["python", "-m", "helpers", *args.argv],
           "model_file": str(folder / f"{r.model}.pt") if args.serialize else None}
    val = f" / {n_val:,} validation" if n_val else ""
    sched = config.SCHEDULES[r.schedule] + (f" (peak at epoch {r.peak_epoch})" if r.schedule == "onecycle" else "")
    extras = "".join(f", {k} {v:g}" for k, v in {"early stopping patience": r.early_stopping_patience, "weight decay":
                     r.weight_decay, "dropout": r.dropout, "label smoothing": r.label_smoothing}.items() if v)
    lines = [f"training {r.model} with the {name} recipe on {rec['device']}"
             + (" [smoke]" if args.smoke else "") + (" [dry run]" if args.dry_run else ""),
             f"data: {data.source}: {d['train_images']:,} train{val} / {d['test_images']:,} test images",
             f"recipe: {r.optimizer} lr {r.lr:g}, {sched}, {r.epochs} epoch{'s' if r.epochs > 1 else ''}, "
             f"batch {r.batch_size}, augmentation {r.augment}{extras}"]
    if args.verbose:
        lines.append(f"full recipe: {json.dumps(r.to_dict())}")
    if info.enabled:
        lines.append(f"distributed: {n} processes ({info.backend}); batch {r.batch_size} per process, "
                     f"effective batch {n * r.batch_size} ({n} x {r.batch_size})")
    if resumed is not None:
        lines.append(f"resuming {args.resume}: {resumed['epoch'] + 1} of {r.epochs} epochs done")
    return rec, lines + ([f"checkpoint after every epoch: {last}"] if last else [])


def cmd_train(args) -> int:
    from . import checkpoint, engine

    args.smoke = args.smoke or args.dry_run
    args.checkpoints = args.checkpoints or f"./{config.SMOKE_CHECKPOINT_DIR if args.smoke else config.DEFAULT_CHECKPOINT_DIR}/"
    name, r = train_recipe(args)
    save = args.serialize or not args.dry_run
    last = Path(args.checkpoints).expanduser() / f"{r.model}_last.pt" if save else None
    if save and os.environ.get("RANK", "0") == "0":
        writable_dir(last.parent, "--checkpoints")     # fail fast, before joining a process group
    resumed = checkpoint.check_resume(args.resume, r) if args.resume else None
    with ddp.distributed(args.device) as info:
        log = print if info.is_main else (lambda *a, **k: None)
        t0 = time.time()                             # the whole run: data load, training, evaluation
        data = load_data(args.train_path, args.test_path, download=args.download, smoke=args.smoke)
        options = speed_options(args, r, info.device, resumed)
        rec, lines = _start(args, name, r, data, info, resumed, last)
        log(*lines, options.describe(), sep="\n")
        result = engine.train(r, data, options, checkpoint_path=last, resume=args.resume, log=log)
        if info.is_main:                             # rank 0 alone reports and saves
            _finish(args, r, dict(rec, wall_seconds=time.time() - t0), result, data.classes, info.device)
    return 0


def speed_options(args, r, device, resumed: dict | None = None):
    """hardware.RunOptions from the speed flags (hardware.choose_options: a flag, else the checkpoint
    being resumed, else auto_options). args gets the resolved values, which the history records."""
    from . import hardware

    given = {} if args.amp == "auto" else {"amp": None if args.amp == "off" else args.amp}
    given.update({k: getattr(args, k) for k in ("channels_last", "fast_augment", "workers")
                  if getattr(args, k) is not None})
    options = hardware.choose_options(device, given, augment=r.augment, resumed=resumed, compile=args.compile)
    args.amp, args.channels_last, args.fast_augment, args.workers = (
        options.amp, options.channels_last, options.fast_augment, options.workers)
    return options


def _finish(args, r, rec, result, classes, device) -> None:
    """The test accuracy; CHECKPOINTS/<model>.pt with --serialize; history and curves unless a dry run."""
    from . import checkpoint, plots

    folder, history, test, d = Path(args.checkpoints).expanduser(), result["history"], result["test"], rec["data"]
    _say(f"test accuracy: {test['acc']:.4f} (loss {test['loss']:.4f}) on {d['test_images']:,} images"
         + _tta_text(r.tta()).replace(", TTA:", " with TTA:", 1) + f"; {rec['wall_seconds']:.1f} s")
    if args.serialize:
        checkpoint.save_checkpoint(rec["model_file"], result["model"], r.model, config=rec["config"],
                                   recipe=rec["recipe"], history=history, mean=d["mean"], std=d["std"],
                                   metrics={"test_acc": test["acc"], "test_loss": test["loss"]}, data_source=d["source"],
                                   classes=list(classes), epochs_trained=len(history["train_loss"]), device=str(device))
        _say(f"saved model: {rec['model_file']}")
    if args.dry_run and not args.serialize:
        _say("dry run: nothing saved (add --serialize to save)")
        return
    rec.update(history=history, test={"acc": test["acc"], "loss": test["loss"], "images": d["test_images"]},
               finished=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    _save("history", folder / f"{r.model}_history.json", rec, "--checkpoints")
    _save("curves", folder / f"{r.model}_curves.png", plots.training_curves(history), "--checkpoints")


def _tta_text(tta: dict) -> str:
    """', TTA: flip', ', TTA: flip + 1 px shifts' or '' without test-time augmentation."""
    from .loop import tta_label

    return f", TTA: {tta_label(**tta)}" if tta["tta_flip"] or tta["tta_shift"] else ""


def cmd_test(args) -> int:
    from . import analysis, checkpoint, hardware, plots

    model, ckpt = checkpoint.load_model(args.model, device := hardware.get_device(args.device))
    tta, stats = checkpoint.inference_settings(ckpt)
    if TTA_CHOICES[args.tta]:                      # --tta instead of the recipe's
        tta = {**tta, **dict(zip(("tta_flip", "tta_shift"), TTA_CHOICES[args.tta]))}
    out = writable_dir(Path(args.out) if args.out else Path(args.model).expanduser().parent, "--out")
    data = load_data(None, args.test_path, download=args.download, smoke=args.smoke)
    recipe = f", {ckpt['recipe']} recipe" if ckpt.get("recipe") else ""
    _say(f"model: {args.model} ({ckpt['arch']}{recipe}) on {device}" + _tta_text(tta)
         + ("; normalised with its mean/std" if stats else "; normalised with the data's (the checkpoint has none)"),
         f"data: {data.source}: {len(data.test_labels):,} test images" + (" [smoke]" if args.smoke else ""))
    pred = analysis.predict(model, data.test_images, data.test_labels, stats=stats or (data.mean, data.std),
                            batch_size=args.batch, tta=tta, progress=True)
    cm = analysis.confusion_matrix(pred.labels, pred.preds, len(data.classes))
    _say(f"test accuracy: {pred.accuracy:.4f} ({int(pred.correct.sum()):,}/{len(pred.labels):,} correct)",
         "", "per-class accuracy:", analysis.class_report(cm, data.classes))
    if pairs := analysis.top_confused_pairs(cm, data.classes):
        _say("", "most confused:", analysis.format_table(pairs, ("target", "prediction", "images")))
    stem = Path(args.model).stem
    if args.confusion:                             # CIFAR-10: always SHORT_NAMES' 10 classes
        _say("", "confusion matrix (rows: true class, columns: predicted class):", analysis.format_table(
            [(n, *map(int, row)) for n, row in zip(SHORT_NAMES, cm)], ("true \\ pred", *SHORT_NAMES)))
        _save("confusion matrix", out / f"{stem}_confusion.png",
              plots.confusion_matrix(cm, data.classes, title=f"Confusion matrix: {stem}"))
    if args.grid:
        idx = np.sort(np.random.default_rng(0).choice(len(pred.labels), min(args.grid, len(pred.labels)), False))
        _save("predictions", out / f"{stem}_predictions.png",
              plots.prediction_grid(data.test_images[idx], pred.labels[idx], pred.preds[idx], classes=data.classes))
    return 0


def cmd_predict(args) -> int:
    from . import analysis, checkpoint, data, hardware, images as own

    images, notes = own.read_images(args.images)         # every file checked before the model loads
    for note in notes:
        _say(f"note: {note}", file=sys.stderr)
    model_path = Path(args.model).expanduser() if args.model else checkpoint.freshest_checkpoint(
        (config.DEFAULT_CHECKPOINT_DIR / "resnet9.pt", config.SHIPPED_MODEL),
        "train one with `python -m helpers train --serialize` or pass --model PATH")
    plot = writable_dir(Path(args.plot).expanduser().parent, "--plot") / Path(args.plot).name if args.plot else None
    model, ckpt = checkpoint.load_model(model_path, hardware.get_device(args.device))
    tta, stats = checkpoint.inference_settings(ckpt)
    if stats is None:
        _say(f"note: {model_path} records no mean/std: using CIFAR-10's standard ones", file=sys.stderr)
    classes, unknown = tuple(ckpt.get("classes") or data.CLASSES), np.zeros(len(images), dtype=np.int64)  # no labels
    probs = analysis.predict(model, images, unknown, stats=stats or (own.CIFAR10_MEAN, own.CIFAR10_STD), tta=tta).probs
    _say(f"model: {model_path} ({ckpt['arch']})")
    width = max(len(c) for c in classes)
    for name, pr in zip(args.images, probs):
        top = np.argsort(-pr, kind="stable")[:args.top]
        _say(name, *(f"  {rank}. {classes[c]:<{width}}  {pr[c]:6.1%}" for rank, c in enumerate(top, 1)))
    if plot is not None:
        from .plots import probability_bars       # matplotlib: only when asked for

        _save("plot", plot, probability_bars(images, probs, classes), "--plot")
    return 0
