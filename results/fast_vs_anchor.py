"""The fast recipe beside its anchor, seed by seed, in one session on one machine.

The anchor is Keller Jordan's airbench94 (PyPI airbench==0.1.8, unmodified) run on the CPU by
../shared/tools/airbench_cpu.py; the fast recipe is `python -m helpers train --arch fast`. Both
train on the same data ($CIFAR10_DIR) and are timed as whole commands (process start to exit:
imports, data load, training, final test), one after the other, nothing else running.

    python -m venv /tmp/abenv --system-site-packages && /tmp/abenv/bin/pip install --no-deps airbench==0.1.8
    CIFAR10_DIR=../shared/data/cifar10-jpg python results/fast_vs_anchor.py --anchor-python /tmp/abenv/bin/python --seeds 0 1 2
    python results/fast_vs_anchor.py --md-only          # redo results/fast_vs_anchor.md from the .jsonl
    python results/fast_vs_anchor.py --dry-run --anchor-python /tmp/abenv/bin/python   # a minute: both run, nothing kept

Each finished command appends one JSON line to results/fast_vs_anchor.jsonl (accuracy with and
without TTA, whole-command and training wall time, images/s, commit, date, device, torch); the
page pairs the two per seed and gives the time ratio. The anchor's code is measured, not copied.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from argparse import ArgumentParser
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from helpers.files import atomic_write  # noqa: E402
from helpers.runinfo import run_info  # noqa: E402

OUT = HERE / "fast_vs_anchor.jsonl"
ANCHOR_TOOL = HERE.parent.parent / "shared" / "tools" / "airbench_cpu.py"
ANCHOR_EPOCHS = 9.9                    # airbench94's own
RESULT = re.compile(r"RESULT run=(\d+) epochs=\S+ tta_acc=([\d.]+) plain_acc=([\d.]+) wall_s=(\d+)")


def prepare_anchor(args) -> None:
    """The anchor's tool decodes the images into its own cache on first use: do that untimed
    (zero runs; it then fails on an empty summary, which is expected)."""
    subprocess.run([args.anchor_python, str(args.anchor), args.data, "1", "0"], capture_output=True)


def run_anchor(args, seed: int) -> dict:
    """One airbench94 run; its own timer covers training and both evaluations, not the load."""
    epochs = 0.05 if args.dry_run else ANCHOR_EPOCHS
    cmd = [args.anchor_python, str(args.anchor), args.data, str(epochs), "1", str(seed)]
    t0 = time.perf_counter()
    out = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    found = RESULT.search(out.stdout)
    if out.returncode or not found:
        raise SystemExit(f"the anchor failed (exit {out.returncode}): {(out.stderr or out.stdout)[-400:]}")
    return {"who": "anchor", "seed": seed, "tta_acc": float(found[2]), "plain_acc": float(found[3]),
            "command_seconds": wall, "train_test_seconds": float(found[4]), "epochs": epochs,
            "images_per_second": epochs * 50_000 / max(float(found[4]), 1),
            "command": f"python ../shared/tools/airbench_cpu.py $CIFAR10_DIR {epochs} 1 {seed}"}   # no machine path


def run_fast(args, seed: int) -> dict:
    """One whole `helpers train --arch fast` run, with the options it picks for this machine."""
    folder = Path(args.checkpoints) / f"seed{seed}"
    cmd = [sys.executable, "-m", "helpers", "train", "--arch", "fast", "--serialize", "--seed", str(seed),
           "--checkpoints", str(folder)] + ["--smoke"] * args.dry_run
    t0 = time.perf_counter()
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=HERE.parent)
    wall = time.perf_counter() - t0
    if out.returncode:
        raise SystemExit(f"the fast recipe failed (exit {out.returncode}): {out.stderr[-400:]}")
    record = json.loads((folder / "fast_history.json").read_text())
    h = record["history"]
    return {"who": "fast", "seed": seed, "tta_acc": record["test"]["acc"], "plain_acc": h["eval_acc"][-1],
            "command_seconds": wall, "train_test_seconds": record["wall_seconds"], "epochs": len(h["eval_acc"]),
            "images_per_second": len(h["eval_acc"]) * record["data"]["train_images"] / record["wall_seconds"],
            "options": {k: record[k] for k in ("amp", "channels_last", "fast_augment", "workers")},
            "training": "airbench94_muon's" if record["config"].get("muon_lr") else "airbench94's",
            "eval_every": record["config"].get("eval_every", 1),
            "command": "python -m helpers train --arch fast --serialize --seed " + str(seed)}


def markdown(rows: list[dict]) -> str:
    """The page: one line per command, then each fast run's time over its anchor run's (the nearest in
    the record of the same seed and day, each anchor run used once), then each side's mean accuracy."""
    lines = ["# The fast recipe beside airbench94, seed by seed (`python results/fast_vs_anchor.py`)", "",
             "Both on the same data and machine, one command at a time, nothing else running; 'command' is the",
             "whole command (imports, data load, training, final test), 'train + test' each one's own timer.",
             "airbench94: PyPI airbench==0.1.8 unmodified, via ../shared/tools/airbench_cpu.py (bf16 autocast "
             "on the CPU, 9.9 epochs).", "",
             "Images/s: training images seen over the run's own timer. The fast recipe's own timer includes its data load",
             "(from its decode cache, seconds); the anchor's starts after its load; the ratio compares whole commands.",
             "The anchor reads the test set after every epoch (its log) and twice at the end; the fast recipe as the",
             "pairs' table says (Recipe.eval_every; the training is the same either way).", "",
             "| seed | who | TTA | no TTA | command | train + test | images/s | commit | date | device | torch |",
             "|---:|---|---:|---:|---:|---:|---:|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['seed']} | {who(r)} | {r['tta_acc']:.2%} | {r['plain_acc']:.2%} | {r['command_seconds']:.0f} s "
                     f"| {r['train_test_seconds']:.0f} s | {r['images_per_second']:.0f} | {r['git']['commit'][:8]}{'+' * bool(r['git']['dirty'])} "
                     f"| {r['date'][:16]} | {r['device']} | {r['versions']['torch']} |")
    pairs, used = [], set()                      # each fast run with the nearest unpaired anchor run: same seed and day
    for i, r in enumerate(rows):
        near = r["who"] == "fast" and sorted((abs(i - j), j) for j, a in enumerate(rows) if a["who"] == "anchor"
                                             and j not in used and (a["seed"], a["date"][:10]) == (r["seed"], r["date"][:10]))
        if near:
            used.add(near[0][1])
            pairs.append((rows[near[0][1]], r))
    if pairs:
        lines += ["", "| date | seed | fast recipe | its test readings during training | fast / anchor, whole command "
                  "| TTA accuracy, fast - anchor |", "|---|---:|---|---|---:|---:|"]
        lines += [f"| {f['date'][:10]} | {f['seed']} | {who(f)} | {readings(f)} | "
                  f"{f['command_seconds'] / a['command_seconds']:.2f} | {f['tta_acc'] - a['tta_acc']:+.2%} |"
                  for a, f in pairs]
    for name in dict.fromkeys(map(who, rows)):
        accs = {r["seed"]: r["tta_acc"] for r in rows if who(r) == name}            # the latest row of each seed
        lines.append(f"\n{name}: mean TTA accuracy over seeds {', '.join(map(str, sorted(accs)))}: "
                     f"{sum(accs.values()) / len(accs):.2%}")
    return "\n".join(lines) + "\n"


def who(row: dict) -> str:
    """'anchor', or the fast recipe with its training (rows before Muon: airbench94's)."""
    training = row.get("training", "airbench94's")
    return row["who"] if row["who"] == "anchor" else f"fast ({training} training)"


def readings(row: dict) -> str:
    """When the fast run read the test set during training (rows from before eval_every: every epoch)."""
    every = row.get("eval_every", 1)
    return "after the last epoch only" if every == 0 else "after every epoch" if every == 1 else f"every {every} epochs"


def main(argv=None) -> int:
    p = ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seeds", nargs="+", type=int, default=[0])
    p.add_argument("--only", choices=["anchor", "fast"], help="run one side only (default: the anchor, then the fast recipe)")
    p.add_argument("--anchor", default=ANCHOR_TOOL, help="airbench_cpu.py")
    p.add_argument("--anchor-python", default=sys.executable, help="a Python that has airbench==0.1.8 (not the course's)")
    p.add_argument("--data", default=os.environ.get("CIFAR10_DIR"), help="the image-folder tree (default: $CIFAR10_DIR)")
    p.add_argument("--checkpoints", default=str(HERE.parent / "artifacts" / "fast_vs_anchor"))
    p.add_argument("--out", default=str(OUT))
    p.add_argument("--md-only", action="store_true", help="only rewrite the page from --out")
    p.add_argument("--dry-run", action="store_true", help="a few anchor steps and a smoke fast run; a scratch record")
    args = p.parse_args(argv)
    if args.dry_run:
        args.out, args.checkpoints = str(Path(args.checkpoints) / "dry_run.jsonl"), str(Path(args.checkpoints) / "dry_run")
        Path(args.checkpoints).mkdir(parents=True, exist_ok=True)
    out = Path(args.out)
    if not args.md_only:
        if not args.data:
            p.error("say where the images are: --data or $CIFAR10_DIR (the anchor reads an image-folder tree)")
        if args.only != "fast":
            prepare_anchor(args)
        for seed in args.seeds:
            for who, run in (("anchor", run_anchor), ("fast", run_fast)):
                if args.only in (None, who):
                    row = {**run(args, seed), **run_info("cpu")}
                    print(json.dumps({k: row[k] for k in ("who", "seed", "tta_acc", "plain_acc", "command_seconds")}),
                          flush=True)
                    with open(out, "a") as f:
                        f.write(json.dumps(row) + "\n")
    rows = [json.loads(line) for line in out.read_text().splitlines() if line.strip()]
    with atomic_write(out.with_suffix(".md"), "w") as f:
        f.write(markdown(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
