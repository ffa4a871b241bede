"""Studies: several variants of a recipe, as short runs on a subset that finish in minutes.

"overfitting" is S10's study: its ResNet-9 overfit (98 % train, 93 % test), so it put
dropout in all layers, and tried weight decay 1e-3 (no help) and 1e-2 (hurt); Page's tuned
recipe is compared too. "fast" is the fast recipe's ablation: one ingredient left out per row.
"lr" puts S10's LR_MAX beside notebook 03's range-test suggestion, on a validation split.

    rows = run_study(load_cifar10(), auto_options())["rows"]        # one dict per variant
    rows = run_study(load_cifar10(), auto_options(), study="fast")["rows"]

    python -m helpers.study --out results/overfitting_study.json   # the committed measurements
    python -m helpers.study --study fast --out results/fast_ablation.json
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import sys
import time
from pathlib import Path

from . import config
from .config import Recipe
from .data import CIFAR10Data
from .errors import ConfigError, CourseError, DivergenceError

# ----------------------------------------------------------------------------------------
# Settings: a tenth of the training set for a quarter of the epochs
# ----------------------------------------------------------------------------------------
TRAIN_PER_CLASS = 1000        # 10,000 training images
TEST_PER_CLASS = 200          # 2,000 held-out images (training images kept out: a validation split)
EPOCHS = 6                    # OneCycle peaks at the end of epoch 1 (S10: 5 of 24)
PEAK_EPOCH = 1
SMOKE_TRAIN_PER_CLASS, SMOKE_TEST_PER_CLASS, SMOKE_EPOCHS = 20, 10, 1
TRAIN_ACC_PER_CLASS = 1000    # train accuracy is read on at most this many training images per class

# name -> (recipe, changes). S10 tried weight decay on top of its dropout.
VARIANTS = {
    "no regularisation": ("resnet9", {"dropout": 0.0}),
    "dropout 0.1 (S10's)": ("resnet9", {}),
    "dropout + weight decay 1e-3": ("resnet9", {"weight_decay": 1e-3}),
    "dropout + weight decay 1e-2": ("resnet9", {"weight_decay": 1e-2}),
    "resnet9-tuned (Page)": ("resnet9-tuned", {}),
}


# The first fast recipe's ablation (results/fast_ablation.json, before airbench94's ingredients):
# each row leaves one ingredient out (or changes one setting) of config.FIRST_FAST, so that a row
# added to that record measures the recipe its other rows measured
FAST_VARIANTS = {name: ("fast", {**config.FIRST_FAST, **changes}) for name, changes in {
    "fast recipe": {},
    "no whitening (the 2x2 conv learned)": {"whiten": False},
    "no label smoothing": {"label_smoothing": 0.0},
    "no weight decay": {"weight_decay": 0.0},
    "no augmentation": {"augment": "none"},
    "S10's augmentation (half pad-crop 4, flip, cutout)": {"augment": "crop-flip-cutout"},
}.items()}
# (test-time augmentation changes no training: notebook 06 evaluates one run with and without it)

# airbench94's ingredients in the fast net (issue 24), then airbench94_muon's (the fast recipe): the
# recipe before them, airbench94's training with each ingredient taken out in turn, then Muon, at full
# length (10 epochs on 45,000 images, scored on 5,000 held-out training images)
AIRBENCH94_ROW = "airbench94's training (SGD + Lookahead, the recipe before Muon)"
FAST_INGREDIENT_VARIANTS = {
    AIRBENCH94_ROW: ("fast", config.AIRBENCH94),
    "the first fast recipe (before airbench94's ingredients)": ("fast", config.FIRST_FAST),
    **{name: ("fast", {**config.AIRBENCH94, **changes}) for name, changes in {
        "- lookahead": {"lookahead": False},
        "- alternating flips (random ones)": {"augment": "flip-translate"},
        "- BN biases at 64x the LR": {"bn_bias_lr": 1.0},
        "- frozen BN scales (learned)": {"frozen_bn_scales": False},
        "- BN momentum 0.4 and eps 1e-12 (PyTorch's)": {"bn_momentum": 0.1, "bn_eps": 1e-5},
        "- dirac initialisation": {"dirac_init": False},
        "- whitening bias frozen after 3 epochs (always trained)": {"whiten_bias_epochs": None},
        "- triangle 0.2 -> 1 -> 0.07 (1/50 -> 1 -> 1/50)": {"lr_start": None, "lr_min": 1.5 / 50},
        "- LR 1.5, momentum 0.85, decay 0.0153/11.5 (the first recipe's)": {
            "lr": 0.6, "lr_start": 0.12, "lr_min": 0.042, "momentum": 0.9, "weight_decay": 5e-4},
    }.items()},
    # beyond the anchor: airbench94_muon's training in its own 8 epochs and in 10, whole batches of
    # 2,000, then the fast recipe (the same 10 epochs, 500 images per forward/backward), and the fast
    # recipe one epoch shorter (10 % fewer steps: a margin in time beside the anchor)
    "airbench94_muon's training (Muon on the filters, 8 epochs)": ("fast", {"epochs": 8, "micro_batch": None}),
    "airbench94_muon's training, 10 epochs": ("fast", {"micro_batch": None}),
    "fast recipe": ("fast", {}),
    "fast recipe, 9 epochs": ("fast", {"epochs": 9}),
}

# The VGG exercise's unstated settings, found by measurement. The exercise states 15 epochs, SGD's
# LR 0.001 and momentum 0.9, the VGG with dropout 0.5 and a test batch of 8; it leaves out the
# training batch, the optimizer (its --momentum is "used by SGD/Adam (if used)") and the preprocessing.
# Each row changes one of those from the first reading (batch 64, SGD, normalised input).
VGG_VARIANTS = {
    "batch 64, SGD, normalised (first reading)": ("vgg", {"batch_size": 64}),
    "batch 32": ("vgg", {"batch_size": 32}),
    "batch 16": ("vgg", {"batch_size": 16}),
    "batch 8": ("vgg", {"batch_size": 8}),
    "batch 4 (the PyTorch tutorial's)": ("vgg", {"batch_size": 4}),
    "Adam at LR 0.001 (batch 64)": ("vgg", {"optimizer": "adam", "batch_size": 64}),
    "[0, 1] input, not normalised (batch 64)": ("vgg", {"normalize": False, "batch_size": 64}),
}


# The LR story (notebook 03 -> 04): S10's LR_MAX (= a tenth of the range test's lowest smoothed loss,
# 2.60e-3), LRs 3x above and below it, an earlier version of notebook 03's steepest descent (2.15e-2)
# and fastai's valley on today's test (1.7e-4), each with LR_MIN = LR_MAX / 10
LR_VARIANTS = {
    "LR_MAX 2.54e-3 (S10's)": ("resnet9", {}),
    "LR_MAX 7.39e-3 (the geometric middle)": ("resnet9", {"lr": 7.39e-3, "lr_min": 7.39e-4}),
    "LR_MAX 2.15e-2 (an earlier range test's steepest descent)": ("resnet9", {"lr": 2.15e-2, "lr_min": 2.15e-3}),
    # below S10's: does the validation accuracy peak near 2.54e-3, or keep rising as the LR falls?
    "LR_MAX 1.0e-3": ("resnet9", {"lr": 1e-3, "lr_min": 1e-4}),
    "LR_MAX 1.7e-4 (the valley rule)": ("resnet9", {"lr": 1.7e-4, "lr_min": 1.7e-5}),
}


@dataclasses.dataclass(frozen=True)
class Study:
    """What a study compares, on how much data, for how long, and where its record lives."""

    title: str
    variants: dict                # name -> (recipe name, changes)
    train_per_class: int
    test_per_class: int
    epochs: int
    peak_epoch: int
    results: Path
    batch_size: int | None = None  # None: each recipe's own
    held_out: str = "validation"   # what the rows are scored on: a validation split of the
                                   # training images, or (older records) "test" images
    baseline: str | None = None    # the variant the others differ from (the record's differences table)


STUDIES = {
    "overfitting": Study("S10's overfitting study", VARIANTS, TRAIN_PER_CLASS, TEST_PER_CLASS, EPOCHS,
                         PEAK_EPOCH, config.REPO_ROOT / "results" / "overfitting_study.json"),
    # 20,000 images at batch 512 give 39 steps per epoch; the full recipe runs 49 at batch 1024
    "fast": Study("The first fast recipe's ablation", FAST_VARIANTS, 2000, 500, 8, 2,
                  config.REPO_ROOT / "results" / "fast_ablation.json", batch_size=512, held_out="test",
                  baseline="fast recipe"),
    # 2,000 training images for the stated 15 epochs, scored on 1,000 held-out training images:
    # batch 4 alone costs 20 min here (about 25 images/s against 185 at batch 64)
    "vgg": Study("The VGG exercise's unstated settings", VGG_VARIANTS, 200, 100, 15, 1,
                 config.REPO_ROOT / "results" / "vgg_settings_study.json"),
    # the overfitting study's short setup, scored on 2,000 held-out training images
    "lr": Study("S10's LR_MAX against the range test's suggestion", LR_VARIANTS, TRAIN_PER_CLASS,
                TEST_PER_CLASS, EPOCHS, PEAK_EPOCH, config.REPO_ROOT / "results" / "lr_study.json"),
    # the whole training set less 5,000 held-out images, the recipe's 10 epochs: each row is a full run
    "fast-ingredients": Study("airbench94's ingredients on the fast net", FAST_INGREDIENT_VARIANTS, 4500, 500, 10, 2,
                              config.REPO_ROOT / "results" / "fast_ingredients.json", baseline=AIRBENCH94_ROW),
}


# the recipe settings each row records
ROW_SETTINGS = ("seed", "epochs", "optimizer", "lr", "dropout", "weight_decay", "label_smoothing", "tta_flip", "tta_shift",
                "tta_centre", "augment", "batch_size", "micro_batch", "normalize")


def study_recipes(smoke: bool = False, study: str = "overfitting") -> dict[str, Recipe]:
    """The recipes the study compares, shortened (and shrunk further in smoke mode)."""
    s = STUDIES[study]
    recipes = {}
    for name, (base, changes) in s.variants.items():
        epochs = SMOKE_EPOCHS if smoke else changes.get("epochs", s.epochs)     # a row may set its own length
        batch = s.batch_size or changes.get("batch_size") or config.RECIPES[base].batch_size   # the study's first
        if smoke:
            batch = min(batch, config.SMOKE_BATCH_SIZE)
        variant = config.RECIPES[base].replace(**changes)          # validated below, once whole
        recipes[name] = variant.replace(epochs=epochs, peak_epoch=min(s.peak_epoch, epochs), batch_size=batch,
                                        test_batch_size=256, eval_every=1).validate()   # a curve per row; the
                                        # eval batch and the readings change only the time, not the training
    return recipes


def study_data(data: CIFAR10Data, smoke: bool = False, study: str = "overfitting") -> CIFAR10Data:
    """The stratified subset the study trains and tests on."""
    s = STUDIES[study]
    sizes = (SMOKE_TRAIN_PER_CLASS, SMOKE_TEST_PER_CLASS) if smoke else (s.train_per_class, s.test_per_class)
    return data.validation_subset(*sizes) if s.held_out == "validation" else data.subset(*sizes)


def run_study(data: CIFAR10Data, options=None, *, smoke: bool = False, log=print,
              only: list[str] | None = None, study: str = "overfitting", seeds=(0,)) -> dict:
    """Train every variant on the study's subset, once per seed; return {"settings", "rows"}.

    Each row: the variant, its seed and regularisers, the final train accuracy on the augmented
    batches (what a training log shows), train accuracy measured afterwards in eval mode on up to
    10,000 of the training images, un-augmented, test accuracy, the gap, and seconds.
    """
    from .engine import train
    from .hardware import RunOptions
    from .loaders import build_loaders
    from .loop import evaluate, tta_readings

    if study not in STUDIES:
        raise ConfigError(f"unknown study {study!r}: choose one of {', '.join(STUDIES)}")
    options = dataclasses.replace(options or RunOptions(), progress=False)
    sub = study_data(data, smoke, study)
    recipes = study_recipes(smoke, study)
    rows = []
    runs = [(name, r.replace(seed=seed)) for name, r in recipes.items() for seed in seeds if not only or name in only]
    for name, r in runs:
        t0 = time.perf_counter()
        log(f"{name} (seed {r.seed}): {len(sub.train_labels):,} train images, {r.epochs} epochs ...")
        row = {"variant": name, **{k: getattr(r, k) for k in ROW_SETTINGS}}
        try:
            run = train(r, sub, options, log=lambda *a, **k: None)
        except DivergenceError as e:             # a too-high LR is a result too: NaN accuracies
            rows.append({**row, **dict.fromkeys(("train_acc_augmented", "train_acc", "test_acc", "gap"), float("nan")),
                         "diverged": str(e), "seconds": time.perf_counter() - t0})
            log(f"  diverged: {e}")
            continue
        seen = sub.subset(min(len(sub.train_labels) // 10, TRAIN_ACC_PER_CLASS), 1)   # at most 10,000 of them
        clean = build_loaders(r.replace(augment="none"), seen)[0]               # no augmentation
        held_out = build_loaders(r.replace(augment="none"), sub)[2]
        speed = {"amp": options.amp, "channels_last": options.channels_last}   # as training's readings
        train_acc = evaluate(run["model"], clean, tta=r.tta(), progress=False, **speed)["acc"]
        test_acc = run["test"]["acc"]
        if r.tta_flip and r.tta_shift:           # the TTA choice, made on the held-out images
            row["tta_acc"] = tta_readings(run["model"], held_out, r.tta_shift, **speed)
        rows.append({**row, "train_acc_augmented": run["history"]["train_acc"][-1],
                     "train_acc": train_acc, "test_acc": test_acc, "gap": train_acc - test_acc,
                     "held_out_acc_per_epoch": [round(a, 4) for a in run["history"]["eval_acc"]],
                     "seconds": time.perf_counter() - t0})
        log(f"  train {train_acc:.2%}  {STUDIES[study].held_out} {test_acc:.2%}  gap {train_acc - test_acc:+.2%}")
    settings = {"study": study, "title": STUDIES[study].title, "train_images": len(sub.train_labels),
                "test_images": len(sub.test_labels), "held_out": STUDIES[study].held_out, "epochs": next(iter(recipes.values())).epochs,
                "batch_size": next(iter(recipes.values())).batch_size, "source": sub.source,
                "smoke": bool(smoke)}
    return {"settings": settings, "rows": rows}


RESULTS = STUDIES["overfitting"].results


def load_study(path=RESULTS) -> dict:
    """A committed measurement (written by `python -m helpers.study`): S10's overfitting
    study by default, `STUDIES["fast"].results` for the fast recipe's ablation."""
    import json

    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"cannot read the study's results {Path(path).name} ({type(e).__name__}): "
                          "make it with `python -m helpers.study` (see --help), or run the study live") from None


def format_rows(rows, held_out: str = "test") -> str:
    """The study as a fixed-width table; `held_out` names what the rows are scored on."""
    width = max([30] + [len(r["variant"]) for r in rows])
    head = f"{'variant':<{width}} {'train':>7} {held_out[:5]:>7} {'gap':>7} {'time':>6}"
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['variant']:<{width}} {r['train_acc']:>7.2%} {r['test_acc']:>7.2%} "
                     f"{r['gap']:>+7.2%} {r['seconds']:>5.0f}s")
    return "\n".join(lines)


def main(argv=None) -> int:
    from .data import load_cifar10
    from .hardware import auto_options
    from .files import atomic_write, save_json
    from .runinfo import run_info

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--study", choices=list(STUDIES), default="overfitting", help="which study to run")
    p.add_argument("--out", default=None, help="where to write the record; when not given, the study's file in results/")
    p.add_argument("--device", default=None, help="cpu, cuda, ...; default: the best available")
    p.add_argument("--smoke", action="store_true", help="a tiny version on a real-data subset, 1 epoch")
    p.add_argument("--only", nargs="+", metavar="VARIANT",
                   help="(re-)run these variants and put their rows into --out, keeping the others")
    p.add_argument("--seeds", nargs="+", type=int, default=[0], metavar="SEED", help="run every variant once per seed")
    args = p.parse_args(argv)
    study = STUDIES[args.study]
    out = Path(args.out) if args.out else study.results          # results/ of the checkout, from any folder
    for name in args.only or []:
        if name not in study.variants:
            p.error(f"unknown variant {name!r} of the {args.study} study: choose from {', '.join(study.variants)}")
    options = auto_options(args.device)
    print(options.describe())
    t0 = time.time()
    try:
        result = run_study(load_cifar10(), options, smoke=args.smoke, only=args.only, study=args.study,
                           seeds=tuple(args.seeds))
    except CourseError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2 if isinstance(e, ConfigError) else 1
    result.update(run_info(options.device), options=options.describe(), wall_seconds=time.time() - t0,
                  command=f"python -m helpers.study --study {args.study}" + (f" --out {args.out}" if args.out else ""))
    if args.only and out.is_file():                # keep the other rows (and their provenance)
        old = load_study(out)
        key = lambda r: (r["variant"], r.get("seed", 0))          # noqa: E731
        new = {key(r): {**r, "rerun": {k: result[k] for k in ("git", "date", "versions")}} for r in result["rows"]}
        rows = [new.pop(key(r), r) for r in old["rows"]] + list(new.values())
        order = list(study.variants)
        result = {**old, "rows": sorted(rows, key=lambda r: (order.index(r["variant"]), r.get("seed", 0))),
                  "reruns": old.get("reruns", []) + [{"variants": args.only, "seeds": args.seeds,
                                                      **run_info(options.device)}]}
    save_json(out, result)
    report = out.with_suffix(".md")
    with atomic_write(report, "w") as f:
        f.write(markdown(result))
    print(format_rows(result["rows"], result["settings"].get("held_out", "test")))
    print(f"saved {out} and {report}")
    return 0


def markdown(result: dict) -> str:
    """The record as a page for results/: settings, provenance and the table. Of the recipe
    settings, only those that differ between rows get a column."""
    from .loop import tta_label

    s, git = result["settings"], result["git"]
    held = "validation" if s.get("held_out") == "validation" else "test"
    settings = {"seed": lambda r: r.get("seed", 0), "optimizer": lambda r: r["optimizer"], "LR_MAX": lambda r: f"{r['lr']:.3g}" if "lr" in r else "-",
                "epochs": lambda r: r.get("epochs", s["epochs"]),
                "batch": lambda r: r.get("batch_size", s.get("batch_size")) or "-",
                "micro-batch": lambda r: r.get("micro_batch") or "-",
                "input": lambda r: "normalised" if r.get("normalize", True) else "[0, 1]",
                "augmentation": lambda r: config.current_augment(r.get("augment", "crop-flip-cutout")),
                "dropout": lambda r: f"{r['dropout']:g}",
                "weight decay": lambda r: f"{r['weight_decay']:g}",
                "label smoothing": lambda r: f"{r['label_smoothing']:g}",
                "TTA": lambda r: tta_label(r["tta_flip"], r.get("tta_shift", 0), r.get("tta_centre", config.TTA_ALIKE))}
    shown = {k: f for k, f in settings.items() if len({str(f(r)) for r in result["rows"]}) > 1}
    lines = [
        f"# {s.get('title', STUDIES['overfitting'].title)} (`{result.get('command', 'python -m helpers.study')}`)", "",
        f"{s['train_images']:,} training and {s['test_images']:,} {held} images ({s['source']}), "
        f"{s['epochs']} epochs of each recipe; measured on {result['device']}, torch "
        f"{result['versions']['torch']}, commit {str(git['commit'])[:8]}{'+' if git['dirty'] else ''}, "
        f"{result['date']}, {result['wall_seconds'] / 60:.0f} min in all. Train accuracy: up to 10,000 un-augmented "
        "training images in eval mode; 'augmented': the last epoch's running accuracy.", "",
        "| " + " | ".join(["variant", *shown, "train", "augmented", held, "gap", "time"]) + " |",
        "|---|" + "---|" * len(shown) + "---:|" * 5]
    for r in result["rows"]:
        cells = [r["variant"], *(str(f(r)) for f in shown.values()), f"{r['train_acc']:.2%}",
                 f"{r['train_acc_augmented']:.2%}", f"{r['test_acc']:.2%}", f"{r['gap']:+.2%}", f"{r['seconds']:.0f} s"]
        lines.append("| " + " | ".join(cells) + " |")
    lines += seed_means(result["rows"], held) + differences(result) + tta_table(result["rows"], held)
    lines += [""] + [f"- {note}" for note in result.get("notes", [])]
    return "\n".join(lines).rstrip() + "\n"


def tta_table(rows, held: str = "validation") -> list[str]:
    """Markdown lines: each run's held-out accuracy under each test-time augmentation
    (rows measured with `helpers.loop.tta_readings`), for choosing the TTA on held-out images."""
    rows = [r for r in rows if "tta_acc" in r]
    if not rows:
        return []
    names = list(rows[0]["tta_acc"])
    lines = ["", f"Test-time augmentation, {held} accuracy of each run:", "",
             "| variant | seed | " + " | ".join(names) + " |", "|---|---:|" + "---:|" * len(names)]
    return lines + [f"| {r['variant']} | {r.get('seed', 0)} | " + " | ".join(f"{r['tta_acc'][n]:.2%}" for n in names)
                    + " |" for r in rows]


def plain_acc(row) -> float:
    """A row's held-out accuracy without test-time augmentation: its last epoch's reading."""
    return row["held_out_acc_per_epoch"][-1]


def variant_means(rows, key=lambda r: r["test_acc"]) -> dict[str, tuple[int, float, float]]:
    """{variant: (seeds, mean, standard error of the mean)} of `key` over each variant's runs
    (sample std / sqrt(seeds); NaN for one run), in the rows' order."""
    import statistics

    by_variant: dict[str, list[float]] = {}
    for r in rows:
        by_variant.setdefault(r["variant"], []).append(key(r))
    return {name: (len(v), statistics.mean(v), statistics.stdev(v) / len(v) ** 0.5 if len(v) > 1 else float("nan"))
            for name, v in by_variant.items()}


def format_means(rows, baseline: str, *, key=plain_acc) -> str:
    """A fixed-width table of each variant's mean `key` (default: held-out accuracy without TTA)
    over its seeds, its standard error, and its difference from `baseline`'s mean with the
    standard error of that difference."""
    means = variant_means(rows, key)
    n0, m0, se0 = means[baseline]
    width = max(len(name) for name in means)
    lines = [f"{'variant':<{width}} {'seeds':>5} {'mean':>8} {'± s.e.':>7} {'difference':>11} {'± s.e.':>7}"]
    lines.append("-" * len(lines[0]))
    for name, (n, m, se) in means.items():
        diff = "" if name == baseline else f"{m - m0:>+11.2%} {math.hypot(se, se0):>7.2%}".replace("nan%", "   -")
        lines.append(f"{name:<{width}} {n:>5} {m:>8.2%} {se:>7.2%} {diff}".replace("nan%", "   -").rstrip())
    return "\n".join(lines)


def differences(result: dict) -> list[str]:
    """Markdown lines: format_means' table for a study with a baseline whose rows all read their
    held-out accuracy per epoch (older records do not); else nothing."""
    base, rows = STUDIES[result["settings"].get("study", "overfitting")].baseline, result["rows"]
    if base not in {r["variant"] for r in rows} or not all("held_out_acc_per_epoch" in r for r in rows):
        return []
    return ["", f"Without TTA (each run's last epoch), mean over seeds, and each variant's difference from "
            f"'{base}' with its standard error:", "", "```", format_means(rows, base), "```"]


def seed_means(rows, held: str = "validation") -> list[str]:
    """Markdown lines: each variant's mean held-out accuracy over its seeds with the standard
    error of that mean (sample std / sqrt(seeds)); nothing when every variant ran once."""
    means = variant_means(rows)
    if all(n < 2 for n, _, _ in means.values()):
        return []
    lines = ["", f"Mean over seeds ({held}; standard error of the mean):", "",
             f"| variant | seeds | mean {held} | standard error |", "|---|---:|---:|---:|"]
    return lines + [f"| {name} | {n} | {m:.2%} | " + (f"{se:.2%} |" if n > 1 else "- |")
                    for name, (n, m, se) in means.items()]


if __name__ == "__main__":
    raise SystemExit(main())
