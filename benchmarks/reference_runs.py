"""Reference runs: train a named configuration for several seeds and record what each gave.

    python benchmarks/reference_runs.py --config resnet9-fast --seeds 0 1 2 3 4   # on a GPU
    python benchmarks/reference_runs.py --config resnet9 --seeds 0                 # albumentations + workers
    python benchmarks/reference_runs.py --readme-only                              # redo results/README.md
    python benchmarks/reference_runs.py --dry-run --out /tmp/x.json                # 1 epoch, smoke subset, CPU

Per seed it records the test accuracy, the wall-clock seconds of the whole run (dataset load
from the decode cache, loaders and their workers, training, per-epoch and final evaluation),
training images per second over that wall time, and the peak GPU memory (CUDA only). Each
seed's figures are merged into the JSON (--out) as soon as the seed finishes, under an entry
for this configuration, device, torch version and settings, with mean/std/min/max over the
seeds; the file is replaced atomically. The markdown table (results/README.md) is then
regenerated from the JSON. No figure is ever written that was not measured.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path[:0] = [str(REPO), str(HERE)]

import numpy as np  # noqa: E402
import torch  # noqa: E402

from benchmark import command_line, data_source, device_name, git_commit, write_json  # noqa: E402
from helpers import engine  # noqa: E402
from helpers.config import recipe  # noqa: E402
from helpers.data import load_cifar10  # noqa: E402
from helpers.files import atomic_write  # noqa: E402

# ----------------------------------------------------------------------------------------
# Settings (command-line flags override them)
# ----------------------------------------------------------------------------------------
CONFIGS = {   # name -> the recipe of helpers.config and how engine.train runs it
    "resnet9": dict(recipe="resnet9", fast_augment=False, amp=None, channels_last=False,
                    about="seed 001 ResNet-9, albumentations seed001 loader with worker processes, fp32"),
    "resnet9-fast": dict(recipe="resnet9", fast_augment=True, amp="bf16", channels_last=True,
                         about="seed 001 ResNet-9, on-device augmentation (DeviceLoader), bf16 autocast, channels_last"),
    "resnet9-tuned": dict(recipe="resnet9-tuned", fast_augment=False, amp=None, channels_last=False,
                          about="ResNet-9, SGD Nesterov + weight decay + label smoothing + flip TTA, albumentations, fp32"),
    "vgg": dict(recipe="vgg", fast_augment=False, amp=None, channels_last=False,
                about="seed 003 VGG-style CNN, SGD 0.001, 15 epochs, no augmentation, fp32"),
    "compact": dict(recipe="compact", fast_augment=False, amp=None, channels_last=False,
                    about="seed 004 compact CNN, NAdam, flip/shift/rotate, early stopping on a validation split, fp32"),
}
SEEDS = (0, 1, 2)
WORKERS = min(8, os.cpu_count() or 1)          # DataLoader workers (albumentations path and test loader)
OUT = REPO / "results" / "reference_runs.json"
README = REPO / "results" / "README.md"
SUMMARISED = ("test_acc", "wall_seconds", "images_per_s", "peak_gpu_memory_bytes")


# ----------------------------------------------------------------------------------------
# One seed
# ----------------------------------------------------------------------------------------
def train_images_used(data, r) -> int:
    if r.val_split > 0:
        return len(data.split_validation(r.val_split, r.seed)[1])
    return len(data.train_labels)


def run_seed(args, cfg: dict, seed: int, device: torch.device) -> dict:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    data = load_cifar10(args.data_dir, download=False)                 # from the decode cache
    if args.dry_run:
        data = data.smoke_subset()
    r = recipe(cfg["recipe"], smoke=args.dry_run, seed=seed, epochs=args.epochs)
    if args.dry_run:
        r = r.replace(epochs=1, peak_epoch=1)
    result = engine.train(r, data, device=device, workers=args.workers, amp=cfg["amp"],
                          channels_last=cfg["channels_last"], fast_augment=cfg["fast_augment"],
                          compile=args.compile, progress=args.progress)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    wall = time.perf_counter() - t0
    history = result["history"]
    epochs_run = len(history["test_acc"])
    n_train = train_images_used(data, r)
    return {
        "seed": seed,
        "test_acc": result["test"]["acc"], "test_loss": result["test"]["loss"],
        "epochs_run": epochs_run, "best_epoch": history.get("best_epoch"),
        "final_train_acc": history["train_acc"][-1],
        "wall_seconds": wall, "epoch_seconds_mean": float(np.mean(history["seconds"])),
        "train_images": n_train, "images_per_s": epochs_run * n_train / wall,
        "peak_gpu_memory_bytes": torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None,
        "git": git_commit(), "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "recipe": r.to_dict(),
    }


# ----------------------------------------------------------------------------------------
# The JSON: entries keyed by configuration, device, torch and settings; seeds merged in
# ----------------------------------------------------------------------------------------
def summary(seeds: list[dict]) -> dict:
    out = {}
    for key in SUMMARISED:
        values = [s[key] for s in seeds if s.get(key) is not None]
        if values:
            v = np.array(values, dtype=float)
            out[key] = {"n": len(v), "mean": float(v.mean()), "std": float(v.std(ddof=1)) if len(v) > 1 else None,
                        "min": float(v.min()), "max": float(v.max())}
    return out


def load_results(path: Path) -> dict:
    if not path.exists():
        return {"about": "reference runs made by benchmarks/reference_runs.py; figures are measured, "
                         "never estimated", "entries": []}
    try:
        results = json.loads(path.read_text())
        assert isinstance(results.get("entries"), list)
        return results
    except (ValueError, AssertionError) as e:
        raise SystemExit(f"{path} is not a reference-runs JSON ({type(e).__name__}): move it away, "
                         "nothing was overwritten") from None


def merge(path: Path, entry: dict, seed_result: dict) -> dict:
    """Add one seed's figures to the entry with the same key (replacing a rerun of that seed)."""
    results = load_results(path)
    found = next((e for e in results["entries"] if e["key"] == entry["key"]), None)
    if found is None:
        found = dict(entry, seeds=[])
        results["entries"].append(found)
    found.update({k: v for k, v in entry.items() if k != "seeds"})    # newest run information
    found["seeds"] = sorted([s for s in found["seeds"] if s["seed"] != seed_result["seed"]] + [seed_result],
                            key=lambda s: s["seed"])
    found["summary"] = summary(found["seeds"])
    write_json(path, results)
    return results


# ----------------------------------------------------------------------------------------
# The markdown table
# ----------------------------------------------------------------------------------------
def _stat(s: dict | None, key: str, scale: float = 1.0, digits: int = 0) -> str:
    if not s or key not in s:
        return "-"
    v = s[key]
    mean = f"{v['mean'] * scale:,.{digits}f}"
    spread = f" ± {v['std'] * scale:,.{digits}f}" if v["std"] is not None else ""
    return f"{mean}{spread} ({v['min'] * scale:,.{digits}f}–{v['max'] * scale:,.{digits}f})" if v["n"] > 1 else mean


HOW_TO = """To make one, on a machine with a CUDA GPU and a local CIFAR-10 copy:

```
CIFAR10_DIR=/path/to/cifar10 python benchmarks/reference_runs.py --config resnet9-fast --seeds 0 1 2 3 4
CIFAR10_DIR=/path/to/cifar10 python benchmarks/reference_runs.py --config resnet9 --seeds 0 1 2
```

then commit `results/reference_runs.json` and this file. Each finished seed is saved at once, so
seeds can be run in separate commands (`--seeds 3`). Configurations: {configs}."""


def readme_text(results: dict) -> str:
    entries = [e for e in results.get("entries", []) if not e["settings"].get("dry_run")]
    gpu = [e for e in entries if e["device"].startswith("cuda")]
    other = [e for e in entries if not e["device"].startswith("cuda")]
    lines = ["# Results", "",
             "- `cpu_benchmark.md` / `cpu_benchmark.json`: throughput of the data pipelines, train steps "
             "and evaluation on a CPU (`benchmarks/benchmark.py`).",
             "- `reference_runs.json`: every seed of every reference run (`benchmarks/reference_runs.py`); "
             "this file's tables are generated from it (`python benchmarks/reference_runs.py --readme-only`).",
             "", "## GPU reference runs", ""]
    if not gpu:
        lines += ["No GPU reference run has been made yet: there are no measured GPU figures for "
                  "these configurations.", "", HOW_TO.format(configs=", ".join(f"`{c}`" for c in CONFIGS))]
    for title, group in (("", gpu), ("## Runs on other devices (not GPU references)", other)):
        if not group:
            continue
        if title:
            lines += ["", title]
        lines += ([] if lines[-1] == "" else [""]) + ["| config | device | seeds | test accuracy % mean ± std (min–max) | wall s per run "
                  "| train images/s | peak GPU MiB | epochs | torch | commit | data |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        for e in group:
            s, seeds = e.get("summary", {}), e["seeds"]
            commits = sorted({(x["git"]["commit"] or "?")[:8] + ("+" if x["git"]["dirty"] else "") for x in seeds})
            epochs = sorted({x["epochs_run"] for x in seeds})
            data = "lossy JPEG copy" if "JPEG" in e["data"].get("note", "") else e["data"]["source"]
            lines.append(f"| {e['config']}{' (compiled)' if e['settings'].get('compile') else ''} "
                         f"| {e['device_name']} | {', '.join(str(x['seed']) for x in seeds)} "
                         f"| {_stat(s, 'test_acc', 100, 2)} | {_stat(s, 'wall_seconds', 1, 0)} "
                         f"| {_stat(s, 'images_per_s', 1, 0)} | {_stat(s, 'peak_gpu_memory_bytes', 2**-20, 0)} "
                         f"| {'/'.join(map(str, epochs))} | {e['torch']} | {', '.join(commits)} | {data} |")
    if entries:
        lines += ["", "Wall seconds cover the whole run: the dataset load from its decode cache, building the "
                  "loaders and their workers, training, per-epoch evaluation and the final test evaluation. "
                  "Train images/s = epochs run x training images / wall seconds. "
                  "`+` after a commit: the working tree had uncommitted changes."]
    if any("JPEG" in e["data"].get("note", "") for e in entries):
        lines += ["", "Data: the lossy JPEG copy of CIFAR-10 (an image folder of .jpg files): its pixels differ "
                  "from the original CIFAR-10, so accuracies are not directly comparable with published ones."]
    dry = len(results.get("entries", [])) - len(entries)
    if dry:
        lines += ["", f"({dry} dry-run entr{'y' if dry == 1 else 'ies'} in the JSON not shown.)"]
    return "\n".join(lines) + "\n"


def write_readme(json_path: Path, readme_path: Path) -> None:
    """Regenerate the markdown table from the JSON (no JSON yet: says no run has been made)."""
    results = load_results(json_path)
    with atomic_write(readme_path, "w") as f:
        f.write(readme_text(results))


# ----------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------
class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each default, except where the help text already says what None means."""

    def _get_help_string(self, action):
        return action.help if action.default is None else super()._get_help_string(action)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=HelpFormatter)
    p.add_argument("--config", choices=sorted(CONFIGS), default="resnet9-fast",
                   help="; ".join(f"{k}: {v['about']}" for k, v in CONFIGS.items()))
    p.add_argument("--seeds", type=int, nargs="+", default=None,
                   help=f"seeds to run, one full run each (default: {' '.join(map(str, SEEDS))}; with --dry-run: 0)")
    p.add_argument("--device", default="auto", help="auto (cuda if present), cuda, cuda:N, cpu")
    p.add_argument("--workers", type=int, default=WORKERS, help="DataLoader worker processes")
    p.add_argument("--compile", action="store_true", help="torch.compile the model (its compile time counts)")
    p.add_argument("--epochs", type=int, default=None, help="override the recipe's epochs (not a reference run then)")
    p.add_argument("--data-dir", default=None, help="CIFAR-10 folder (default: $CIFAR10_DIR, else ./data)")
    p.add_argument("--out", default=None, help=f"the JSON to merge into (default: {OUT.relative_to(REPO)}; "
                   "with --dry-run: a file in the temp folder)")
    p.add_argument("--readme", default=None, help=f"the markdown table to regenerate (default: {README.relative_to(REPO)} "
                   "for the default --out, else the --out path with .md)")
    p.add_argument("--readme-only", action="store_true", help="only regenerate the markdown from the JSON")
    p.add_argument("--progress", action="store_true", help="show progress bars and per-epoch lines")
    p.add_argument("--dry-run", action="store_true", help="1 epoch on the smoke subset on CPU, marked dry_run")
    args = p.parse_args(argv)
    if args.out is None:
        args.out = str(Path(tempfile.gettempdir()) / "reference_runs_dry_run.json") if args.dry_run else str(OUT)
    if args.readme is None:
        args.readme = str(README) if Path(args.out).resolve() == OUT else str(Path(args.out).with_suffix(".md"))
    if args.seeds is None:
        args.seeds = [0] if args.dry_run else list(SEEDS)
    if len(set(args.seeds)) != len(args.seeds):
        p.error(f"--seeds repeats a seed: {args.seeds}")
    if args.dry_run:
        args.device = "cpu"
    return args


def main(argv=None) -> dict | None:
    args = parse_args(argv)
    out, readme = Path(args.out), Path(args.readme)
    if args.readme_only:
        write_readme(out, readme)
        print(f"wrote {readme}")
        return None
    device = engine.get_device(None if args.device == "auto" else args.device)
    cfg = CONFIGS[args.config]
    load_cifar10(args.data_dir, download=False)          # decode (and cache) once, untimed
    data = load_cifar10(args.data_dir, download=False)
    settings = {"config": args.config, **{k: cfg[k] for k in ("recipe", "fast_augment", "amp", "channels_last")},
                "compile": args.compile, "workers": args.workers, "epochs_override": args.epochs,
                "dry_run": args.dry_run, "cudnn_benchmark": torch.backends.cudnn.benchmark,
                "float32_matmul_precision": torch.get_float32_matmul_precision()}
    name = device_name(device)
    entry = {"key": json.dumps([args.config, name, torch.__version__, settings], sort_keys=True),
             "config": args.config, "about": cfg["about"], "device": str(device), "device_name": name,
             "torch": torch.__version__, "python": platform.python_version(), "cpu_count": os.cpu_count(),
             "data": data_source(data.smoke_subset() if args.dry_run else data), "settings": settings,
             "command": command_line(), "updated": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    del data
    print(f"{args.config} on {name} ({device}), seeds {args.seeds} -> {out}", flush=True)
    results = None
    for seed in args.seeds:
        r = run_seed(args, cfg, seed, device)
        results = merge(out, entry, r)
        write_readme(out, readme)
        mem = f", peak GPU {r['peak_gpu_memory_bytes'] / 2**20:,.0f} MiB" if r["peak_gpu_memory_bytes"] else ""
        print(f"seed {seed}: test acc {r['test_acc']:.4f}, {r['wall_seconds']:.1f} s, "
              f"{r['images_per_s']:,.0f} train images/s, {r['epochs_run']} epochs{mem}", flush=True)
    found = next(e for e in results["entries"] if e["key"] == entry["key"])
    acc = found["summary"]["test_acc"]
    print(f"{args.config}: {acc['n']} seeds, test acc mean {acc['mean']:.4f}"
          + (f" ± {acc['std']:.4f}" if acc["std"] is not None else "")
          + f" (min {acc['min']:.4f}, max {acc['max']:.4f}); wrote {out} and {readme}")
    return results


if __name__ == "__main__":
    main()
