"""The VGG exercise's VGG shipped small (issue 25): its two 4096x4096 layers as truncated SVDs, in fp16.

    python results/vgg_low_rank.py CHECKPOINT --ranks 128 256 384
    python results/vgg_low_rank.py CHECKPOINT --ranks 128 256 384 --ship 384 --out models/vgg_cifar10.pt

CHECKPOINT is a full vgg checkpoint (`python -m helpers train --arch vgg --serialize` writes
one). The script exports it, as `helpers.checkpoint.export_fp16` does, into a temporary folder:
the fp32 weights, plain fp16 (69 MB) and fp16 with lin.0 and lin.3 as rank-r factorisations
(2,389,140 + 32,768 r bytes of weights). It loads each file back with `load_model`, evaluates it
on the CIFAR-10 test images ($CIFAR10_DIR, else --test_path) as `python -m helpers test` does
(the checkpoint's mean/std and its recipe's test-time augmentation) and prints a markdown table:
form, parameters, file bytes, test accuracy, and how often its prediction is the full fp32
model's. It names the largest rank whose file fits --budget (15,000,000 bytes: the size grows by
32,768 bytes per unit of rank, give or take torch's 64-byte alignment). Only --ship RANK --out PATH writes a file outside the
temporary folder: the rank-RANK export, recording the accuracy measured here.

The exports keep the training history with one LR per epoch (each epoch's last) instead of the
LR at every step: 15 epochs of batch 16 are 46,875 steps, about 400 kB pickled, more than the
room that rank 384 leaves under 15 MB. history_table and training_curves read either form.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))      # run from anywhere in the checkout

from helpers import analysis, checkpoint, data, hardware  # noqa: E402
from helpers.errors import CheckpointError, ConfigError, CourseError  # noqa: E402
from helpers.files import atomic_write  # noqa: E402
from helpers.models import check_rank, count_parameters  # noqa: E402

BUDGET = 15_000_000                 # bytes: issue 25's limit for models/vgg_cifar10.pt
BYTES_PER_RANK = 2 * 2 * 2 * 4096   # two layers x two factors x 4096 numbers x 2 bytes (fp16)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("checkpoint", help="a full vgg checkpoint, e.g. runs/vgg16/vgg.pt")
    p.add_argument("--ranks", type=int, nargs="+", default=[128, 256, 384], metavar="R",
                   help="ranks to measure (default: 128 256 384)")
    p.add_argument("--limit", type=int, metavar="N",
                   help="evaluate on N test images (N/10 of each class, seeded) instead of all 10,000: a quick check")
    p.add_argument("--test_path", "--tp", metavar="TP", help="CIFAR-10 folder (default: $CIFAR10_DIR, else ./data/)")
    p.add_argument("--batch", type=int, default=256, help="evaluation batch size (default: 256)")
    p.add_argument("--device", help="cpu, cuda, mps (default: the fastest present)")
    p.add_argument("--budget", type=int, default=BUDGET, help=f"file size limit in bytes (default: {BUDGET:,})")
    p.add_argument("--ship", type=int, metavar="RANK", help="write the rank-RANK file to --out (measured with the rest)")
    p.add_argument("--out", help="where --ship writes, e.g. models/vgg_cifar10.pt")
    args = p.parse_args(argv)
    if (args.ship is None) != (args.out is None):
        p.error("--ship RANK and --out PATH go together")
    for r in args.ranks + ([args.ship] if args.ship is not None else []):
        check_rank(r)
    if args.limit is not None and not 10 <= args.limit <= 10_000:
        p.error(f"--limit must be from 10 to 10000, got {args.limit}")
    args.ranks = sorted(set(args.ranks) | ({args.ship} if args.ship is not None else set()))
    return args


def per_epoch_lr(history: dict | None) -> dict | None:
    """`history` with its per-step "lr" list cut to each epoch's last LR."""
    epochs, lr = len((history or {}).get("train_loss") or []), (history or {}).get("lr") or []
    if not epochs or len(lr) <= epochs:
        return history
    steps = len(lr) // epochs
    return {**history, "lr": [lr[(e + 1) * steps - 1] for e in range(epochs)]}


def test_images(args):
    """(images, labels, source) of the test split, the --limit subset if asked for."""
    d = data.load_data(None, args.test_path)
    images, labels = d.test_images, d.test_labels
    if args.limit is not None:
        keep = data.stratified_indices(labels, args.limit // len(d.classes))
        images, labels = images[keep], labels[keep]
    return images, labels, d


def main(argv=None) -> int:
    args = parse_args(argv)
    device = hardware.get_device(args.device)
    full, ckpt = checkpoint.load_model(args.checkpoint, device, expect_arch="vgg")
    if full.rank is not None:
        raise CheckpointError(f"{args.checkpoint} is already low-rank (rank {full.rank}): pass the full vgg checkpoint")
    tta, stats = checkpoint.inference_settings(ckpt)
    images, labels, d = test_images(args)
    mean, std = stats or (d.mean, d.std)
    say = lambda *a: print(*a, file=sys.stderr, flush=True)     # noqa: E731  progress, apart from the table
    say(f"model: {args.checkpoint} on {device}; {len(labels):,} test images from {d.source}; "
        + ("normalised with its mean/std" if stats else "normalised with the data's (the checkpoint has none)")
        + (f"; TTA {tta}" if tta["tta_flip"] or tta["tta_shift"] else ""))

    def evaluate(model):
        return analysis.predict(model.to(device), images, labels, stats=(mean, std), batch_size=args.batch, tta=tta)

    rows, svds, sizes = [], {}, {}
    slim = {"history": per_epoch_lr(ckpt["history"])} if "history" in ckpt else {}   # for every export
    with tempfile.TemporaryDirectory(prefix="vgg_low_rank_") as tmp:
        tmp = Path(tmp)
        forms = [("full, fp32", checkpoint.save_checkpoint(tmp / "fp32.pt", full, "vgg"), None)]
        start = time.time()
        reference = evaluate(full)
        say(f"full, fp32: {reference.accuracy:.4f} ({time.time() - start:.0f} s)")
        forms.append(("full, fp16", checkpoint.export_fp16(args.checkpoint, tmp / "fp16.pt", **slim), None))
        for rank in args.ranks:
            start = time.time()
            forms.append((f"rank {rank}, fp16", checkpoint.export_fp16(args.checkpoint, tmp / f"rank{rank}.pt",
                                                                      rank=rank, svds=svds, **slim), rank))
            say(f"rank {rank}: exported in {time.time() - start:.0f} s (the first one computes the two SVDs)")
        for name, path, rank in forms:
            start = time.time()
            model = checkpoint.load_model(path, device)[0]
            pred = reference if name == "full, fp32" else evaluate(model)
            size = path.stat().st_size
            if rank is not None:
                sizes[rank] = size
            rows.append((name, count_parameters(model), size, pred, float((pred.preds == reference.preds).mean())))
            say(f"{name}: {pred.accuracy:.4f}, {size:,} bytes ({time.time() - start:.0f} s)")

        largest = report(rows, sizes, args, f"{len(labels):,} test images ({d.source})", say)
        if args.ship is not None:
            ship(args, tmp, rows, svds, reference, ckpt, d, largest, len(labels), slim)
    return 0


def report(rows, sizes: dict, args, what: str, say) -> int:
    """Print the table of forms and the largest rank within args.budget bytes; return that rank."""
    print(f"\n{what}{'' if args.limit is None else ', a stratified subset'}; "
          f"agreement: the share of images where the form predicts what the full fp32 model predicts\n")
    print("| form | parameters | file bytes | test accuracy | agreement with full fp32 |")
    print("|---|---:|---:|---:|---:|")
    for name, params, size, pred, agree in rows:
        print(f"| {name} | {params:,} | {size:,} | {100 * pred.accuracy:.2f} % | {100 * agree:.2f} % |")
    # the size is linear in the rank with slope BYTES_PER_RANK (checked here on the measured ranks)
    offsets = {size - BYTES_PER_RANK * rank for rank, size in sizes.items()}   # equal to 64 bytes
    if max(offsets) - min(offsets) > 128:
        say(f"note: the file sizes are not {BYTES_PER_RANK:,} bytes per rank apart: {sizes}")
    largest = min(4095, (args.budget - max(offsets)) // BYTES_PER_RANK)
    print(f"\nlargest rank within {args.budget:,} bytes: {largest} "
          f"({max(offsets) + BYTES_PER_RANK * largest:,} bytes; {BYTES_PER_RANK:,} bytes per unit of rank)")
    return largest


def ship(args, tmp: Path, rows, svds, reference, ckpt, d, largest, images, slim: dict) -> None:
    """Export rank args.ship with what was measured here into the folder `tmp`, check its
    size against the budget, then copy it to --out atomically (an over-budget file is never written)."""
    name, params, size, pred, agree = next(r for r in rows if r[0] == f"rank {args.ship}, fp16")
    measured = {"test_acc": pred.accuracy, "test_loss": float(pred.losses.mean()), "test_images": images}
    staged = checkpoint.export_fp16(
        args.checkpoint, tmp / "ship.pt", rank=args.ship, svds=svds,
        metrics=measured, full_model_metrics={"test_acc": reference.accuracy, "test_images": images,
                                              "recorded": ckpt.get("metrics")},
        agreement_with_full=agree, data_source=d.source,
        compression=f"fp16; lin.0 and lin.3 as rank-{args.ship} truncated SVDs (results/vgg_low_rank.py); "
                    "history: each epoch's last LR", **slim)
    size = staged.stat().st_size
    if size > args.budget:
        raise ConfigError(f"rank {args.ship} makes a {size:,}-byte file, over the {args.budget:,}-byte budget: "
                          f"ship rank {largest} or less")
    out = Path(args.out).expanduser()
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(out) as f:
        f.write(staged.read_bytes())
    print(f"\nshipped: {out} ({out.stat().st_size:,} bytes), rank {args.ship}, "
          f"test accuracy {pred.accuracy:.4f} on {images:,} images")
    if args.limit is not None:
        print(f"note: the accuracy recorded in {out} was measured on {images:,} images, not all 10,000", file=sys.stderr)


if __name__ == "__main__":
    try:
        sys.exit(main())
    except CourseError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2 if isinstance(e, ConfigError) else 1)
