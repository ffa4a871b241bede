"""Throughput of the data pipelines, train steps and evaluation, on CPU or CUDA (torch.utils.benchmark).

    python benchmarks/benchmark.py                                 # CUDA if present, else CPU
    python benchmarks/benchmark.py --device cpu --threads 1,2 --out results/benchmark.jsonl
    python benchmarks/benchmark.py --dry-run                       # tiny sizes, smoke subset

Per --threads count, a Timer times one batch of each data pipeline (albumentations loader per worker count,
DeviceLoader), one train step and one eval batch per model, precision (fp32, bf16) and layout (nchw,
channels_last). Each measurement prints one JSON line (also appended to --out); a Compare table ends the run.
"""
from __future__ import annotations

import itertools
import os
import sys
from argparse import ArgumentParser
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from torch.utils import benchmark  # noqa: E402

from helpers import augment, engine, hardware, loop, optim  # noqa: E402
from helpers.config import recipe  # noqa: E402
from helpers.data import load_cifar10  # noqa: E402
from helpers.loaders import DeviceLoader, make_loader  # noqa: E402
from helpers.models import MODELS  # noqa: E402
from helpers.runinfo import emit, public_command, run_info  # noqa: E402

DEFAULTS = dict(data_batch=512, workers=[0, 1, 2, 4, 8, 16])   # then AUTO by device, then DRY_RUN; flags win
AUTO = {"cuda": dict(train_batch=512, eval_batch=1024, min_run_time=1.0, warmup=10),
        "cpu": dict(train_batch=128, eval_batch=256, min_run_time=3.0, warmup=2)}
DRY_RUN = dict(data_batch=32, workers=[0, 1], train_batch=16, eval_batch=32, min_run_time=0.05, warmup=1)
CHOICES = {"models": tuple(MODELS), "precisions": ("fp32", "bf16"), "layouts": ("nchw", "channels_last"),
           "skip": ("data", "train", "eval")}


def endless(loader, device):
    """A function returning the loader's next batch, moved to the device, epoch after epoch."""
    def batches():
        for epoch in itertools.count():
            loader.set_epoch(epoch)
            yield from loader
    it = batches()
    return lambda: [t.to(device, non_blocking=True) for t in next(it)]


def data_cases(args, data, device):
    """(kind, row, column, fn, images per call, fields) of each data pipeline."""
    tf, b = augment.train_transforms(data.mean, data.std), args.data_batch
    n = len(data.train_images) // b * b               # whole batches only, as DeviceLoader's drop_last
    for w in args.workers:
        loader = make_loader(data.train_images[:n], data.train_labels[:n], tf, batch_size=b, shuffle=True,
                             workers=w, seed=0)
        yield "data", f"albumentations, {w} workers", f"batch {b}", endless(loader, device), b, {"workers": w}
    loader = DeviceLoader(data.train_images[:n], data.train_labels[:n], b, stats=(data.mean, data.std), device=device)
    yield "data", "DeviceLoader + BatchAugment", f"batch {b}", endless(loader, device), b, {}


def model_cases(args, data, device, kind):
    """The train (or eval) step of each model, precision and layout, on one real batch."""
    b = args.train_batch if kind == "train" else args.eval_batch
    x, y = next(iter(DeviceLoader(data.train_images[:b], data.train_labels[:b], b, stats=(data.mean, data.std),
                                  device=device, augment="crop-flip-cutout" if kind == "train" else "none")))
    for name, precision, layout in itertools.product(args.models, args.precisions, args.layouts):
        r, cl, amp = recipe(name, smoke=False), layout == "channels_last", "bf16" if precision == "bf16" else None
        torch.manual_seed(0)
        model = engine.build_model(r, data).to(device)    # the fast net whitened from the data, as in training
        model = model.to(memory_format=torch.channels_last) if cl else model
        if kind == "train":
            optimizer = optim.optimizer_for(r, model)
            loss = torch.nn.CrossEntropyLoss(label_smoothing=r.label_smoothing)
            run = hardware.RunOptions(str(device), amp=amp, channels_last=cl, progress=False)
            fn = lambda m=model, o=optimizer, lf=loss, ro=run: loop.train_one_epoch(m, [(x, y)], o, loss_fn=lf,
                                                                              options=ro)
        else:
            fn = lambda m=model, a=amp, c=cl: loop.evaluate(m, [(x, y)], amp=a, channels_last=c, progress=False)
        yield kind, f"{name} {layout}", precision, fn, b, {"model": name, "precision": precision, "layout": layout}


def measure(args, case, threads: int, *, device, base: dict):
    """Time one case and emit its JSON line; returns the Measurement (None on an error)."""
    kind, row, column, fn, images, fields = case
    rec = {"kind": kind, "name": row, "setting": column, "threads": threads, "batch_size": images, **fields}
    try:
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        for _ in range(args.warmup):
            fn()
        timer = benchmark.Timer("fn()", globals={"fn": fn}, label=kind, sub_label=row, description=column,
                                num_threads=threads)
        m = (timer.adaptive_autorange(min_run_time=args.min_run_time, max_run_time=10 * args.min_run_time)
             if args.adaptive else timer.blocked_autorange(min_run_time=args.min_run_time))
    except (RuntimeError, NotImplementedError) as e:   # an unsupported kernel: say so, go on
        return emit({**rec, "error": f"{type(e).__name__}: {str(e).splitlines()[0][:160]}", **base}, args.out)
    emit({**rec, "images_per_s": images / m.median, "median_s": m.median, "mean_s": m.mean, "iqr_s": m.iqr,
          "times_s": m.times, "number_per_run": m.number_per_run, "load_average": list(os.getloadavg()),
          "peak_gpu_memory_bytes": torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None,
          **base}, args.out)
    print(f"  {kind:5} {row:<30} {column:<9} {threads} threads: {images / m.median:>9,.0f} images/s",
          file=sys.stderr, flush=True)
    return m


def parse_args(argv=None):
    def listed(kind):
        return lambda s: [kind(v.strip()) for v in s.split(",") if v.strip()]
    p = ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="auto", help="auto (the default: cuda if present, else cpu), cpu, cuda, cuda:N")
    p.add_argument("--data-dir", default=None, help="CIFAR-10 folder (default: $CIFAR10_DIR, else ./data)")
    p.add_argument("--threads", type=listed(int), default=[torch.get_num_threads()], help="torch CPU thread "
                   f"counts to compare, comma-separated (default: {torch.get_num_threads()})")
    for name, values in CHOICES.items():
        p.add_argument(f"--{name}", type=listed(str), default=[] if name == "skip" else list(values), help="comma-"
                       f"separated, from {', '.join(values)} (default: {'none' if name == 'skip' else 'all'})")
    p.add_argument("--data-batch", type=int, help=f"data pipeline batch size (default: {DEFAULTS['data_batch']})")
    p.add_argument("--workers", type=listed(int), help=f"loader worker counts, comma-separated (default: "
                   f"{','.join(map(str, DEFAULTS['workers']))}); those above the CPU count are dropped")
    for name, kind, text in (("train-batch", int, "train-step batch size"), ("eval-batch", int, "eval batch size"),
                             ("min-run-time", float, "seconds of timed calls per measurement"),
                             ("warmup", int, "untimed calls before each measurement")):
        cuda, cpu = (AUTO[d][name.replace("-", "_")] for d in AUTO)
        p.add_argument(f"--{name}", type=kind, help=f"{text} (default: {cuda} on CUDA, {cpu} on CPU)")
    p.add_argument("--adaptive", action="store_true", help="adaptive_autorange (until the IQR is within 10%% of "
                   "the median, at most 10x --min-run-time) instead of blocked_autorange")
    p.add_argument("--out", default=None, help="also append the JSON lines to this .jsonl file")
    p.add_argument("--dry-run", action="store_true", help=f"the smoke subset and these sizes: {DRY_RUN}")
    args = p.parse_args(argv)
    for name, values in CHOICES.items():
        for bad in set(getattr(args, name)) - set(values):
            p.error(f"unknown {name} {bad!r}: use {', '.join(values)}")
    return args


def main(argv=None) -> list:
    args = parse_args(argv)
    device = hardware.get_device(None if args.device == "auto" else args.device)
    fill = {**DEFAULTS, **AUTO["cuda" if device.type == "cuda" else "cpu"], **(DRY_RUN if args.dry_run else {})}
    for k, v in fill.items():
        setattr(args, k, v if getattr(args, k) is None else getattr(args, k))
    args.workers = [w for w in args.workers if w <= (os.cpu_count() or 1)]
    data = load_cifar10(args.data_dir, download=False)
    data = data.smoke_subset() if args.dry_run else data
    base = {**run_info(device), "data": data.source, "command": public_command(["python", *sys.argv]),
            "timer": "adaptive_autorange" if args.adaptive else "blocked_autorange",
            "min_run_time": args.min_run_time, "warmup": args.warmup, "dry_run": args.dry_run}
    measurements = []
    for threads in args.threads:
        torch.set_num_threads(threads)
        cases = itertools.chain([] if "data" in args.skip else data_cases(args, data, device),
                                *(model_cases(args, data, device, k) for k in ("train", "eval") if k not in args.skip))
        # one case at a time: a finished case's loader (and its worker processes) ends with it
        measurements += [m for case in cases if (m := measure(args, case, threads, device=device, base=base))]
    compare = benchmark.Compare(measurements)
    compare.trim_significant_figures()
    compare.print()
    return measurements


if __name__ == "__main__":
    main()
