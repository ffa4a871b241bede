"""Reference runs: train a named configuration for several seeds and record what each gave.

    python results/reference_runs.py --config resnet9-fast --seeds 0 1 2 3 4   # on a GPU
    python results/reference_runs.py --config resnet9 --seeds 0                 # albumentations + workers
    python results/reference_runs.py --readme-only                              # redo results/README.md
    python results/reference_runs.py --dry-run                                  # smoke recipe + subset, CPU
    python results/reference_runs.py --record models/compact_history.json       # a finished CLI run
    python results/reference_runs.py --record-notebook artifacts/resnet9_cifar10.pt  # notebook 04's full run

Each seed (one helpers.engine.train run) prints one JSON line, appended to --out, and the README table is
regenerated from that file: accuracy, wall time, images/s, peak GPU memory, settings, provenance.
"""
from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from argparse import ArgumentParser
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from helpers import engine, hardware  # noqa: E402
from helpers.config import FIRST_FAST, Recipe, recipe, smoke_mode  # noqa: E402
from helpers.data import load_cifar10  # noqa: E402
from helpers.files import atomic_write  # noqa: E402
from helpers.runinfo import emit, public_command, run_info  # noqa: E402

FP32 = dict(fast_augment=False, amp=None, channels_last=False)
FAST = dict(fast_augment=True, amp="bf16", channels_last=True)
CONFIGS = {   # name -> (recipe of helpers.config, RunOptions fields, what it is)
    "resnet9": ("resnet9", FP32, "S10 ResNet-9, albumentations crop-flip-cutout loader with worker processes, fp32"),
    "resnet9-fast": ("resnet9", FAST, "S10 ResNet-9, on-device augmentation (DeviceLoader), bf16, channels_last"),
    "resnet9-tuned": ("resnet9-tuned", FP32, "ResNet-9, SGD Nesterov, weight decay, label smoothing, flip TTA, fp32"),
    "vgg": ("vgg", FP32, "the VGG exercise's VGG-style CNN, SGD 0.001, 15 epochs, no augmentation, fp32"),
    "compact": ("compact", FP32, "the Keras CNN's compact CNN, NAdam, flip/shift/rotate, early stopping on a val split, fp32"),
    "fast": ("fast", FAST, "the fast net (whitening, SGD Nesterov, label smoothing, flip/shift TTA), bf16, "
                           "channels_last, on-device augmentation"),
}
OUT, README = HERE.parent / "results" / "reference_runs.jsonl", HERE.parent / "results" / "README.md"
HOW_TO = """To make one, on a machine with a CUDA GPU and a local CIFAR-10 copy:

```
CIFAR10_DIR=/path/to/cifar10 python results/reference_runs.py --config resnet9-fast --seeds 0 1 2 3 4
CIFAR10_DIR=/path/to/cifar10 python results/reference_runs.py --config resnet9 --seeds 0 1 2
```

then commit `results/reference_runs.jsonl` and this file. Each finished seed is saved at once, so
seeds can be run in separate commands (`--seeds 3`). Configurations: """ + ", ".join(f"`{c}`" for c in CONFIGS) + "."


def run_seed(args, seed: int, device: torch.device) -> dict:
    name, options, about = CONFIGS[args.config]
    settings = {"recipe": name, **options, "compile": args.compile, "workers": args.workers, "smoke": args.smoke,
                "epochs_override": args.epochs, "cudnn_benchmark": torch.backends.cudnn.benchmark,
                "float32_matmul_precision": torch.get_float32_matmul_precision()}
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    data = load_cifar10(args.data_dir, download=False)                 # from the decode cache
    data = data.smoke_subset() if args.smoke else data
    r = recipe(name, smoke=args.smoke, seed=seed, **({"epochs": args.epochs} if args.epochs else {}))
    run = engine.train(r, data, hardware.RunOptions(str(device), compile=args.compile, workers=args.workers,
                                                  progress=args.progress, **options))
    wall, h = time.perf_counter() - t0, run["history"]   # evaluate's .item() has synchronised the device
    n_train = len(data.split_validation(r.val_split, r.seed)[1] if r.val_split > 0 else data.train_labels)
    return {"config": args.config, "about": about, "seed": seed, "device_type": device.type, "settings": settings,
            "test_acc": run["test"]["acc"], "test_loss": run["test"]["loss"], "epochs_run": len(h["train_loss"]),
            "best_epoch": best_epoch(h), "final_train_acc": h["train_acc"][-1], "wall_seconds": wall,
            "epoch_seconds_mean": float(np.mean(h["seconds"])), "train_images": n_train,
            "images_per_s": len(h["train_loss"]) * n_train / wall, "data": data.source,
            "peak_gpu_memory_bytes": torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None,
            "recipe": r.to_dict(), "command": public_command(["python", *sys.argv]), **run_info(device)}


def config_label(recipe_name: str, settings: dict) -> str:
    """The CONFIGS name whose recipe and run options match `settings`, else 'recipe (options)'."""
    for name, (rec, options, _) in CONFIGS.items():
        if rec == recipe_name and all((settings.get(k) or None) == (v or None) for k, v in options.items()):
            return name
    on = [settings.get("amp") or "fp32"] + [k for k in ("channels_last", "fast_augment") if settings.get(k)]
    return f"{recipe_name} ({', '.join(on)})"


def best_epoch(history: dict) -> int | None:
    """The epoch whose weights early stopping kept, counted from 1 as the log prints it
    (the history counts from 0); None without early stopping."""
    best = history.get("best_epoch", -1)
    return best + 1 if best is not None and best >= 0 else None


def record_row(path: Path) -> dict:
    """A results row for a finished run made outside this script, from the record that
    `python -m helpers train` writes beside its checkpoints (<model>_history.json): its
    history, test result, recipe, run options, wall time, device, versions and commit.
    A run resumed with --resume has no single wall time (its process ran only the last part):
    its wall seconds are None and its images/s come from the median epoch (training plus the
    per-epoch test), so epochs slowed or cut by a session's end do not count."""
    rec = json.loads(Path(path).read_text())
    resumed = bool(rec.get("resumed_from"))
    settings = {k: rec.get(k) for k in ("amp", "channels_last", "fast_augment", "compile", "workers", "smoke")}
    h, r, wall, n_train = rec["history"], rec["config"], rec["wall_seconds"], rec["data"]["train_images"]
    epochs, median = len(h["train_loss"]), float(np.median(h["seconds"]))
    standard = recipe(rec["recipe"], smoke=bool(rec.get("smoke"))).to_dict()
    overrides = {k: v for k, v in r.items() if k not in ("seed", "notes") and v != standard.get(k)}
    label = config_label(rec["recipe"], settings)
    label += "".join(f", {k} {v}" for k, v in overrides.items())
    return {"config": label, "about": r.get("notes", ""), "seed": r["seed"],
            "device_type": rec["device"].rsplit("(", 1)[-1].split(",")[0].rstrip(")").lower(),
            "settings": {"recipe": rec["recipe"], **settings, "overrides": overrides,
                         "world_size": rec.get("world_size", 1),
                         "epochs_override": r["epochs"] if "epochs" in overrides else None},
            "test_acc": rec["test"]["acc"], "test_loss": rec["test"]["loss"], "epochs_run": epochs,
            "best_epoch": best_epoch(h), "final_train_acc": h["train_acc"][-1],
            "wall_seconds": None if resumed else wall, "epoch_seconds_mean": float(np.mean(h["seconds"])),
            "epoch_seconds_median": median, "train_images": n_train,
            "images_per_s": n_train / median if resumed else epochs * n_train / wall,
            "data": rec["data"]["source"], "peak_gpu_memory_bytes": None,
            "recipe": r, "command": public_command(rec["command"]),
            **{k: rec[k] for k in ("device", "torch_threads", "versions", "git", "date")}}


def notebook_row(path: Path) -> dict:
    """A results row for notebook 04's full run, from the model it saved (artifacts/resnet9_cifar10.pt:
    history, recipe, test result, data source and the run's provenance: device, versions, commit,
    date) and the training checkpoint beside it (<arch>_last.pt: the speed settings it ran with).
    Such a run is resumed across sessions, so it has no single wall time: images/s come from the
    median epoch."""
    from helpers.checkpoint import load_checkpoint
    from helpers.data import FULL_COUNTS

    ckpt = load_checkpoint(path)
    if ckpt.get("smoke") or "history" not in ckpt or "metrics" not in ckpt:
        raise SystemExit(f"error: {path} is not a full run's saved model (smoke, or no history): "
                         "execute notebook 04 with SMOKE_TEST=0 first")
    last = Path(path).with_name(f"{ckpt['arch']}_last.pt")
    options = load_checkpoint(last).get("options") if last.is_file() else None
    if not options:
        raise SystemExit(f"error: {last} (the run's training checkpoint, with its speed settings) is missing "
                         "or predates them: record the run from the artifacts/ folder it trained in")
    h, r = ckpt["history"], ckpt["config"]
    settings = {"amp": options.get("amp"), "channels_last": options.get("channels_last"),
                "fast_augment": options.get("fast_augment"), "compile": False, "workers": options.get("workers"),
                "smoke": False}
    n_train, median, info = FULL_COUNTS["train"], float(np.median(h["seconds"])), run_info("cpu")
    return {"config": config_label("resnet9", settings) + " (notebook 04)", "about": r.get("notes", ""),
            "seed": r["seed"], "device_type": "cuda" if "(cuda)" in str(ckpt.get("device")) else "cpu",
            "settings": {"recipe": "resnet9", **settings, "overrides": {}, "world_size": 1, "epochs_override": None},
            "test_acc": ckpt["metrics"]["test_acc"], "test_loss": ckpt["metrics"]["test_loss"],
            "epochs_run": len(h["train_loss"]), "best_epoch": None, "final_train_acc": h["train_acc"][-1],
            "wall_seconds": None, "epoch_seconds_mean": float(np.mean(h["seconds"])), "epoch_seconds_median": median,
            "train_images": n_train, "images_per_s": n_train / median, "data": ckpt.get("data_source"),
            "peak_gpu_memory_bytes": None, "recipe": r,
            "command": "SMOKE_TEST=0 CIFAR10_DIR=... jupyter nbconvert --to notebook --execute --inplace "
                       "notebooks/04_training.ipynb",
            **{k: ckpt.get(k) or info[k] for k in info}}     # the run's provenance; older saves: today's


# Records written before results/gpu_run.py saved each run's recipe (commit e43803e and earlier)
# ran the fast recipe as it was then: the first one, which config.FIRST_FAST restores.
FORMER = {"fast": FIRST_FAST}


def gpu_rows(path: Path) -> list[dict]:
    """Results rows for the runs of one `results/gpu_run.py` record (results/gpu_runs.json):
    its wall seconds are the whole run, the data load included; images/s from the median epoch."""
    rec = json.loads(Path(path).read_text())
    rows = []
    for part in rec["parts"].values():
        if "recipe" not in part or "acc" not in part or part.get("epochs") is None:
            continue                                   # the profiles, the anchor, skipped parts
        r = Recipe(**part["config"]) if "config" in part else recipe(
            part["recipe"], smoke=rec["smoke"]).replace(**FORMER.get(part["recipe"], {})).replace(**part["changes"])
        overrides = {k: v for k, v in part["changes"].items() if k != "seed"}
        options = {k: part.get(k, v) for k, v in FAST.items()}      # older records: what auto_options chose
        label = config_label(part["recipe"], options) + "".join(f", {k} {v}" for k, v in overrides.items())
        rows.append({"config": label, "about": r.notes, "seed": r.seed,
                     "device_type": rec["device"].rsplit("(", 1)[-1].split(",")[0].rstrip(")").lower(),
                     "settings": {"recipe": part["recipe"], **options, "compile": False, "workers": 0,
                                  "smoke": rec["smoke"], "overrides": overrides, "epochs_override": None},
                     "test_acc": part["acc_in_run"], "epochs_run": part["epochs"], "best_epoch": None,
                     "wall_seconds": part["whole_s"], "epoch_seconds_median": float(np.median(part["epoch_s"])),
                     "train_images": part["train_images"], "images_per_s": part["img_per_s_median_epoch"],
                     "data": rec["data"]["source"], "peak_gpu_memory_bytes": part["peak_memory_gib"] and part["peak_memory_gib"] * 2**30,
                     "recipe": r.to_dict(), "command": "bash results/gpu_run.sh",
                     **{k: rec[k] for k in ("device", "torch_threads", "versions", "git", "date")}})
    return rows


def groups(path: Path) -> list[list[dict]]:
    """The JSON lines grouped by configuration, device, torch and settings; one run per seed (the latest)."""
    out = {}
    for run in map(json.loads, path.read_text().splitlines() if path.exists() else []):
        key = json.dumps([run["config"], run["device"], run["versions"]["torch"], run["settings"]], sort_keys=True)
        out.setdefault(key, {})[run["seed"]] = run
    return [[seeds[s] for s in sorted(seeds)] for seeds in out.values()]


def stat(runs: list[dict], key: str, scale: float = 1.0, digits: int = 0) -> str:
    """'mean ± std (min–max)' over the seeds, the value alone for one seed, '-' for none."""
    v, f = np.array([r[key] for r in runs if r[key] is not None], dtype=float) * scale, f"{{:,.{digits}f}}".format
    if len(v) < 2:
        return f(v[0]) if len(v) else "-"
    return f"{f(v.mean())} ± {f(v.std(ddof=1))} ({f(v.min())}–{f(v.max())})"


def first_fast(run: dict) -> bool:
    """Whether the run trained the first fast recipe (config.FIRST_FAST, before airbench94's
    ingredients), apart from the settings its row names; a field its record predates had its default."""
    r, overrides = {**Recipe().to_dict(), **run["recipe"]}, run["settings"].get("overrides") or {}
    return r["model"] == "fast" and all(r[k] == v for k, v in FIRST_FAST.items() if k not in overrides)


def row(g: list[dict]) -> str:
    e, commits = g[-1], sorted({(r["git"]["commit"] or "?")[:8] + "+" * r["git"]["dirty"] for r in g})
    return "| " + " | ".join([
        e["config"] + " (first recipe)" * first_fast(e) + " (compiled)" * e["settings"]["compile"] + " (smoke)" * e["settings"]["smoke"], e["device"],
        ", ".join(str(r["seed"]) for r in g), stat(g, "test_acc", 100, 2), stat(g, "wall_seconds"),
        stat(g, "images_per_s"), stat(g, "peak_gpu_memory_bytes", 2**-20),
        "/".join(map(str, sorted({r["epochs_run"] for r in g}))), e["versions"]["torch"], ", ".join(commits),
        e["data"]]) + " |"


def readme_text(path: Path) -> str:
    runs = groups(path)
    gpu = [g for g in runs if g[-1]["device_type"] == "cuda" and not g[-1]["settings"]["smoke"]]
    other = [g for g in runs if g not in gpu]
    table = ["| config | device | seeds | test accuracy % mean ± std (min–max) | wall s per run | train images/s "
             "| peak GPU MiB | epochs | torch | commit | data |", "|" + " --- |" * 11]
    lines = ["# Results", "", "- `cpu_benchmark.md`/`.json`: CPU throughput of data pipelines, train and eval steps (an "
             "earlier `benchmarks/benchmark.py`); `cpu_benchmark_avx2.jsonl`: today's `benchmark.py` on a CPU without AVX-512 "
             "(fp32, both layouts; its section in `cpu_benchmark.md`).", "- `overfitting_study.md`/`.json`: S10's overfitting study "
             "(`python -m helpers.study`).", "- `fast_attempts.md`: the fast recipe's attempts, at a 93.5 % target "
             "first and then against airbench94 on the same data (91.0 %), and what each showed.", "- `fast_ablation.md`/`.json`: the first fast recipe's ablation (before airbench94's "
             "ingredients: `config.FIRST_FAST`), one ingredient left out per short run (`python -m helpers.study --study fast`).",
             "- `fast_ingredients.md`/`.json`: airbench94's ingredients on the fast net, each left out in turn, full-length "
             "runs scored on a validation split (`python -m helpers.study --study fast-ingredients`).",
             "- `fast_vs_anchor.md`/`.jsonl`: the fast recipe beside airbench94 (the anchor), seed by seed, in one session "
             "on one machine (`python results/fast_vs_anchor.py`).", "- `resnet9_notebook04.md`: S10's recipe run by notebook 04 at full "
             "settings on a CPU (the shipped model), epoch by epoch.", "- `compact_keras_cnn.md` (+ `_curves.png`): the Keras CNN's "
             "recipe run by the command line at full settings on a CPU (the shipped compact model).", "- `vgg_exercise.md` (+ `_curves.png`): the VGG exercise's "
             "recipe: the first reading (batch 64) and the measured reading (batch 16, 78.88 %, shipped at rank 384), "
             "each run by the command line on a CPU.",
             "- `vgg_settings_study.md`/`.json`: the VGG exercise's unstated settings (training batch, optimizer, input "
             "scaling) in short runs scored on a validation split (`python -m helpers.study --study vgg`).",
             "- `lr_study.md`/`.json`: S10's LR_MAX against the rules of notebook 03's range test, short runs "
             "scored on a validation split (`python -m helpers.study --study lr`).",
             "- `gpu_runs.md`/`.json` "
             "(+ `gpu_run_log.txt`): the recipes and the airbench94 anchor on one H200, with a profile of the train step "
             "(`results/gpu_run.sh`).", "- `reference_runs.jsonl`: one JSON line per seed of every reference run"
             " (`results/reference_runs.py`), from which `--readme-only` regenerates this file.", "", "## GPU reference runs", ""]
    no_gpu = "No GPU reference run has been made yet: there are no measured GPU figures for these configurations."
    lines += [*table, *map(row, gpu)] if gpu else [no_gpu, "", HOW_TO]
    if other:
        lines += ["", "## Runs on other devices or in smoke mode (not GPU references)", "", *table, *map(row, other)]
    if runs:
        lines += ["", "Wall seconds cover the whole run: the dataset load from its decode cache, building the loaders "
                  "and their workers, training, per-epoch evaluation and the final test evaluation. Train images/s = "
                  "epochs run x training images / wall seconds. `+` after a commit: the working tree had uncommitted "
                  "changes."]
    if any(r["wall_seconds"] is None for g in runs for r in g):
        lines += ["", "Wall seconds `-`: a run resumed across sessions, with no single wall time (notebook 04's full "
                  "run, see `resnet9_notebook04.md`, or a command-line run continued with `--resume`); its images/s = training images / median epoch seconds "
                  "(training plus the per-epoch test)."]
    if any("JPEG" in g[-1]["data"] for g in runs):
        lines += ["", "Data: the lossy JPEG copy of CIFAR-10 (an image folder of .jpg files): its pixels differ from "
                  "the original CIFAR-10, so accuracies are not directly comparable with published ones."]
    return "\n".join(lines) + "\n"


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", choices=sorted(CONFIGS), default="resnet9-fast",
                   help="; ".join(f"{k}: {v[2]}" for k, v in CONFIGS.items()) + " (default: %(default)s)")
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="seeds, one run each (default: 0 1 2; smoke: 0)")
    p.add_argument("--device", default="auto", help="auto (the default: cuda if present, else cpu), cuda, cuda:N, cpu")
    p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1),
                   help="DataLoader worker processes (default: %(default)s)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model (its compile time counts)")
    p.add_argument("--epochs", type=int, default=None, help="override the recipe's epochs (not a reference run then)")
    p.add_argument("--data-dir", default=None, help="CIFAR-10 folder (default: $CIFAR10_DIR, else ./data)")
    p.add_argument("--out", default=None, help=f"the .jsonl to append to (default: {OUT.relative_to(HERE.parent)}, "
                   "smoke runs: one in the temp folder); the table goes to results/README.md, else to --out's .md")
    p.add_argument("--readme-only", action="store_true", help="only regenerate the markdown from --out")
    p.add_argument("--record", metavar="JSON", nargs="+", help="add finished `python -m helpers train` runs to --out "
                   "from the <model>_history.json each wrote, then regenerate the markdown")
    p.add_argument("--record-gpu", metavar="JSON", help="add the runs of a `results/gpu_run.py` record "
                   "(results/gpu_runs.json) to --out, then regenerate the markdown")
    p.add_argument("--record-notebook", metavar="CHECKPOINT", help="add notebook 04's full run to --out from "
                   "the model it saved (artifacts/resnet9_cifar10.pt), then regenerate the markdown")
    p.add_argument("--progress", action="store_true", help="show progress bars and per-epoch lines")
    p.add_argument("--dry-run", action="store_true", help="smoke mode (as SMOKE_TEST=1) on the CPU")
    args = p.parse_args(argv)
    args.smoke = (args.dry_run or smoke_mode()) and not (args.record or args.record_gpu or args.record_notebook)
    args.out = Path(args.out or (Path(tempfile.gettempdir()) / "reference_runs_smoke.jsonl" if args.smoke else OUT))
    args.readme = README if args.out.resolve() == OUT else args.out.with_suffix(".md")
    args.seeds = list(dict.fromkeys(args.seeds or ([0] if args.smoke else [0, 1, 2])))   # each seed once
    args.device = "cpu" if args.dry_run else args.device
    return args


def write_readme(args) -> None:
    with atomic_write(args.readme, "w") as f:
        f.write(readme_text(args.out))
    print(f"wrote {args.readme}", file=sys.stderr)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.record or args.record_gpu or args.record_notebook:
        for row in ([record_row(path) for path in args.record or []] + (gpu_rows(args.record_gpu) if args.record_gpu else [])
                    + ([notebook_row(args.record_notebook)] if args.record_notebook else [])):
            emit(row, args.out)
        write_readme(args)
        return
    if not args.readme_only:
        device = hardware.get_device(None if args.device == "auto" else args.device)
        load_cifar10(args.data_dir, download=False)          # decode (and cache) once, untimed
        print(f"{args.config} on {device}, seeds {args.seeds} -> {args.out}", file=sys.stderr, flush=True)
    for seed in [] if args.readme_only else args.seeds:
        emit(run_seed(args, seed, device), args.out)
        write_readme(args)                                   # after every seed: a stopped run keeps its table
    if args.readme_only:
        write_readme(args)


if __name__ == "__main__":
    main()
