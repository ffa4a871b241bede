"""Throughput of the course's data pipelines, train steps and evaluation, on CPU or CUDA.

    python benchmarks/benchmark.py                           # this machine's GPU, else its CPU
    python benchmarks/benchmark.py --device cpu --out results/cpu_benchmark.json --md results/cpu_benchmark.md
    python benchmarks/benchmark.py --dry-run                 # a tiny version, in seconds

Prints three tables in images per second:
  1. the data pipeline alone: seed 001's albumentations training loader (make_loader +
     helpers.augment.train_transforms) for several worker counts, and the fast path
     (helpers.data.DeviceLoader + BatchAugment), each batch moved to the device;
  2. the train step of each model, in fp32 and under bf16 autocast, NCHW and channels_last:
     helpers.engine.train_one_epoch over copies of one real augmented batch, with the
     model's recipe optimizer and loss (the engine's per-step loss check included);
  3. evaluation of each model: helpers.engine.evaluate over copies of one real batch.
Untimed warm-up batches come first; on CUDA the device is synchronised before each timer read.
Data figures are (timed batches x batch size) / their total seconds. Train and eval steps are
timed one by one: batch size / the median step (robust to other processes' bursts on a shared
machine), the mean-based figure beside it, with the share of the CPU that other processes used
meanwhile (on Linux); a measurement disturbed by them is taken again (--retries) and the least
disturbed try kept. It asserts nothing about speed.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from helpers import augment as aug  # noqa: E402
from helpers import engine  # noqa: E402
from helpers.config import recipe  # noqa: E402
from helpers.data import DeviceLoader, load_cifar10, make_loader  # noqa: E402
from helpers.files import atomic_write, save_json  # noqa: E402
from helpers.models import get_model  # noqa: E402

# ----------------------------------------------------------------------------------------
# Settings (every one is a command-line flag; "auto" picks the CUDA or the CPU value)
# ----------------------------------------------------------------------------------------
DATA_BATCH = 512                    # batch size of the data-pipeline measurements (seed 001's)
DATA_BATCHES = 20                   # timed batches per data-pipeline measurement
WORKERS = (0, 1, 2, 4, 8, 16)       # loader worker counts tried, those above the CPU count dropped
TRAIN_BATCH = {"cuda": 512, "cpu": 128}   # train-step batch size
EVAL_BATCH = {"cuda": 1024, "cpu": 256}   # evaluation batch size
STEPS = {"cuda": 50, "cpu": 5}      # timed train steps / eval batches per measurement
WARMUP = {"cuda": 10, "cpu": 2}     # untimed batches before every measurement
MODELS = ("resnet9", "vgg", "compact")
PRECISIONS = ("fp32", "bf16")       # bf16 = torch.autocast(dtype=torch.bfloat16)
LAYOUTS = ("nchw", "channels_last")
RETRIES = 2                         # measure a train/eval step again while others use the CPU...
MAX_OTHERS = 0.1                    # ...more than this share of it (0.5 = one of 2 cores)
DRY_RUN = dict(data_batch=32, data_batches=2, workers=(0, 1), train_batch=16, eval_batch=32,
               steps=1, warmup=1, retries=0)   # --dry-run: the smoke subset and these sizes


# ----------------------------------------------------------------------------------------
# Run information: device, versions, commit, data source
# ----------------------------------------------------------------------------------------
def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip() + " (CPU)"
    except OSError:
        pass
    return (platform.processor() or platform.machine()) + " (CPU)"


def git_commit() -> dict:
    def git(*args):
        try:
            return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True,
                                  timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""
    return {"commit": git("rev-parse", "HEAD") or None,
            "dirty": bool(git("status", "--porcelain", "--untracked-files=no"))}


def data_source(data) -> dict:
    """Where the images came from; says so plainly when they are a lossy JPEG copy."""
    src = {"source": data.source, "train_images": int(len(data.train_labels)),
           "test_images": int(len(data.test_labels))}
    if data.source.startswith("image folder "):
        root = Path(data.source[len("image folder "):].split(" (subset")[0])
        first = next((p for p in sorted((root / "train" / "airplane").iterdir())[:20]
                      if p.suffix.lower() in {".jpg", ".jpeg", ".png", ".bmp"}), None) \
            if (root / "train" / "airplane").is_dir() else None
        if first is not None and first.suffix.lower() in {".jpg", ".jpeg"}:
            src["note"] = ("lossy JPEG copy of CIFAR-10 (image folder): pixels differ from the "
                           "original CIFAR-10 batches, so accuracies are not the published ones")
        elif first is not None:
            src["note"] = f"image-folder copy of CIFAR-10 ({first.suffix} files)"
    return src


def load_average():
    """The machine's 1/5/15-minute load averages: other processes slow a CPU benchmark down."""
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except (OSError, AttributeError):
        return None


def run_info(device: torch.device, data) -> dict:
    import albumentations
    import torchvision

    return {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "device": str(device), "device_name": device_name(device),
            "torch": torch.__version__, "torchvision": torchvision.__version__,
            "albumentations": albumentations.__version__, "torch_cuda_build": torch.version.cuda,
            "python": platform.python_version(), "platform": platform.platform(),
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "load_average_at_start": load_average(),
            "git": git_commit(), "data": data_source(data),
            "command": command_line()}


def command_line() -> str:
    """How this run was started, with the CIFAR10_DIR it read."""
    env = f"CIFAR10_DIR={os.environ['CIFAR10_DIR']} " if os.environ.get("CIFAR10_DIR") else ""
    return env + " ".join(["python", *sys.argv])


# ----------------------------------------------------------------------------------------
# Timing
# ----------------------------------------------------------------------------------------
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device) -> float:
    """Seconds that fn() takes, the device synchronised before and after."""
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def cpu_ticks():
    """(busy ticks of the whole machine, this process's ticks) from /proc/stat; None off Linux."""
    try:
        with open("/proc/stat") as f:
            v = [int(t) for t in f.readline().split()[1:9]]
    except (OSError, ValueError):
        return None
    own = os.times()
    return sum(v) - v[3] - v[4], (own.user + own.system) * os.sysconf("SC_CLK_TCK"), sum(v)


def others_cpu(before, after) -> float | None:
    """The share of the machine's CPU that other processes used between two cpu_ticks():
    0.5 on 2 cores = one core kept busy by someone else, which slows every figure down."""
    if before is None or after is None or after[2] == before[2]:
        return None
    busy, own, total = (a - b for a, b in zip(after, before))
    return round(min(max((busy - own) / total, 0.0), 1.0), 2)


def endless(loader):
    """The loader's batches, epoch after epoch (a measurement may outlast one epoch)."""
    epoch = 0
    while True:
        loader.set_epoch(epoch)
        yield from loader
        epoch += 1


def consume(batches, n: int, device: torch.device) -> int:
    """Take n batches from an iterator, moving each to the device; returns the images seen."""
    seen = 0
    for _ in range(n):
        x, y = next(batches)
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        seen += len(y)
    return seen


def row(kind: str, name: str, setting: str, images: int, seconds: float | None, **extra) -> dict:
    r = {"kind": kind, "name": name, "setting": setting, "images": images, "seconds": seconds,
         "images_per_s": images / seconds if seconds else None}
    r.update(extra)
    return r


def step_row(kind: str, name: str, setting: str, batch: int, step_seconds: list, **extra) -> dict:
    """Per-step timings: images/s from the median step (robust to other processes' bursts),
    the mean-based figure kept beside it."""
    median = statistics.median(step_seconds)
    return row(kind, name, setting, batch * len(step_seconds), sum(step_seconds), batch_size=batch,
               step_seconds=step_seconds, median_step_seconds=median,
               images_per_s_mean=batch * len(step_seconds) / sum(step_seconds), **extra) | {
        "images_per_s": batch / median}


# ----------------------------------------------------------------------------------------
# 1. The data pipeline alone
# ----------------------------------------------------------------------------------------
def bench_albumentations(data, device, workers: int, batch: int, n: int, warmup: int) -> dict:
    tf = aug.train_transforms(data.mean, data.std)
    loader = make_loader(data.train_images, data.train_labels, tf, batch_size=batch, shuffle=True,
                         workers=workers, seed=0, drop_last=True)
    it = endless(loader)
    consume(it, warmup, device)          # worker start-up happens here, untimed
    seen = [0]
    seconds = timed(lambda: seen.__setitem__(0, consume(it, n, device)), device)
    del it
    return row("data", "albumentations seed001 (make_loader)", f"workers={workers}", seen[0], seconds,
               workers=workers, batch_size=batch)


def bench_device_loader(data, device, batch: int, n: int, warmup: int) -> dict:
    setup = time.perf_counter()
    loader = DeviceLoader(data.train_images, data.train_labels, batch, data.mean, data.std, device,
                          "seed001", drop_last=True, seed=0)
    sync(device)
    setup = time.perf_counter() - setup
    it = endless(loader)
    consume(it, warmup, device)
    seen = [0]
    seconds = timed(lambda: seen.__setitem__(0, consume(it, n, device)), device)
    return row("data", "fast path seed001 (DeviceLoader + BatchAugment)", "on device", seen[0], seconds,
               batch_size=batch, setup_seconds=setup)


# ----------------------------------------------------------------------------------------
# 2. Train step and 3. evaluation, per model
# ----------------------------------------------------------------------------------------
def real_batch(data, device, batch: int, augment: str = "seed001"):
    loader = DeviceLoader(data.train_images[:batch * 2], data.train_labels[:batch * 2], batch,
                          data.mean, data.std, device, augment, seed=0)
    return next(iter(loader))


def bf16_unsupported(device: torch.device) -> str | None:
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        return f"{device_name(device)} does not support bf16"
    return None


def measure(step, n: int, warmup: int, device, retries: int):
    """Seconds of n single steps after `warmup` untimed ones. While other processes take more
    than MAX_OTHERS of the machine's CPU, measure again (at most `retries` times) and keep the
    least disturbed try. Returns (step seconds, others' CPU share, tries)."""
    for _ in range(warmup):
        timed(step, device)
    best = None
    for attempt in range(1, retries + 2):
        t0 = cpu_ticks()
        seconds = [timed(step, device) for _ in range(n)]
        others = others_cpu(t0, cpu_ticks())
        if best is None or (others or 0) < (best[1] or 0):
            best = (seconds, others)
        if others is None or others <= MAX_OTHERS:
            break
    return best[0], best[1], attempt


def bench_train(name, data, device, precision, layout, batch, n, warmup, retries) -> dict:
    setting = f"{precision}, {layout}"
    if precision == "bf16" and bf16_unsupported(device):
        return row("train", name, setting, 0, None, precision=precision, layout=layout,
                   batch_size=batch, na=bf16_unsupported(device))
    r = recipe(name, smoke=False)
    torch.manual_seed(0)
    model = get_model(name).to(device)
    if layout == "channels_last":
        model = model.to(memory_format=torch.channels_last)
    opt = engine.make_optimizer(r.optimizer, model.parameters(), r.lr, r.momentum, r.weight_decay, r.nesterov)
    loss_fn = torch.nn.CrossEntropyLoss(label_smoothing=r.label_smoothing)
    x, y = real_batch(data, device, batch)
    amp = "bf16" if precision == "bf16" else None

    def steps(k):
        engine.train_one_epoch(model, [(x, y)] * k, opt, loss_fn, device, amp=amp,
                               channels_last=layout == "channels_last", progress=False)
    try:
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        seconds, others, tries = measure(lambda: steps(1), n, warmup, device, retries)
    except (RuntimeError, NotImplementedError) as e:   # an unsupported kernel: say so, go on
        return row("train", name, setting, 0, None, precision=precision, layout=layout,
                   batch_size=batch, na=f"{type(e).__name__}: {str(e).splitlines()[0][:120]}")
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    return step_row("train", name, setting, batch, seconds, precision=precision, layout=layout,
                    optimizer=r.optimizer, peak_memory_bytes=peak, others_cpu=others, tries=tries)


def bench_eval(name, data, device, precision, batch, n, warmup, retries) -> dict:
    if precision == "bf16" and bf16_unsupported(device):
        return row("eval", name, precision, 0, None, precision=precision, batch_size=batch,
                   na=bf16_unsupported(device))
    torch.manual_seed(0)
    model = get_model(name).to(device)
    x, y = real_batch(data, device, batch, augment="none")
    amp = "bf16" if precision == "bf16" else None
    try:
        seconds, others, tries = measure(lambda: engine.evaluate(model, [(x, y)], device=device, amp=amp,
                                                                 progress=False), n, warmup, device, retries)
    except (RuntimeError, NotImplementedError) as e:
        return row("eval", name, precision, 0, None, precision=precision, batch_size=batch,
                   na=f"{type(e).__name__}: {str(e).splitlines()[0][:120]}")
    return step_row("eval", name, precision, batch, seconds, precision=precision, others_cpu=others, tries=tries)


# ----------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------
def fmt(r: dict) -> str:
    return f"{r['images_per_s']:,.0f}" if r["images_per_s"] else f"n/a ({r.get('na', 'not measured')})"


def mean_fmt(r: dict) -> str:
    return f"{r['images_per_s_mean']:,.0f}" if r.get("images_per_s_mean") else "-"


def others(r: dict) -> str:
    return f"{100 * r['others_cpu']:.0f}%" if r.get("others_cpu") is not None else "-"


def ms(r: dict) -> str:
    return f"{1000 * r['median_step_seconds']:,.1f}" if r.get("median_step_seconds") else "-"


def tables(results: dict) -> str:
    info, s = results["info"], results["settings"]
    out = [f"device: {info['device_name']} ({info['device']}), torch {info['torch']}, "
           f"torchvision {info['torchvision']}, albumentations {info['albumentations']}, "
           f"python {info['python']}, {info['cpu_count']} CPUs ({info['torch_threads']} torch threads)",
           f"commit: {info['git']['commit']}{' (with uncommitted changes)' if info['git']['dirty'] else ''}",
           f"data: {info['data']['source']}" + (f" -- {info['data']['note']}" if info['data'].get('note') else ""),
           f"load average (1/5/15 min) at start {info['load_average_at_start']}, at end "
           f"{info.get('load_average_at_end')} (other processes on the machine slow CPU figures down)"]
    rows = {k: [r for r in results["rows"] if r["kind"] == k] for k in ("data", "train", "eval")}
    cuda = info["device"].startswith("cuda")
    if rows["data"]:
        out += ["", f"### Data pipeline alone (batch {s['data_batch']}, {s['data_batches']} timed batches "
                    f"after {s['warmup']} warm-up, each batch moved to {info['device']})", "",
                "| pipeline | setting | images/s |", "| --- | --- | ---: |"]
        out += [f"| {r['name']} | {r['setting']} | {fmt(r)} |" for r in rows["data"]]
    if rows["train"]:
        out += ["", f"### Train step (batch {s['train_batch']}, {s['steps']} timed steps after {s['warmup']} "
                    f"warm-up; engine.train_one_epoch on one real batch)", "",
                "| model | precision | layout | images/s (median step) | images/s (mean) | median ms/step "
                "| others' CPU |" + (" peak MiB |" if cuda else ""),
                "| --- | --- | --- | ---: | ---: | ---: | ---: |" + (" ---: |" if cuda else "")]
        for r in rows["train"]:
            mem = (f" {r['peak_memory_bytes'] / 2**20:,.0f} |" if r.get("peak_memory_bytes") else " - |") if cuda else ""
            out.append(f"| {r['name']} | {r['precision']} | {r['layout']} | {fmt(r)} | {mean_fmt(r)} | {ms(r)} "
                       f"| {others(r)} |{mem}")
    if rows["eval"]:
        out += ["", f"### Evaluation (batch {s['eval_batch']}, {s['steps']} timed batches after {s['warmup']} "
                    f"warm-up; engine.evaluate, NCHW)", "",
                "| model | precision | images/s (median batch) | images/s (mean) | median ms/batch | others' CPU |",
                "| --- | --- | ---: | ---: | ---: | ---: |"]
        out += [f"| {r['name']} | {r['precision']} | {fmt(r)} | {mean_fmt(r)} | {ms(r)} | {others(r)} |"
                for r in rows["eval"]]
    if rows["train"] or rows["eval"]:
        out += ["", "others' CPU: the share of the machine's CPU time that other processes used while the "
                    "steps were timed (0.5 on 2 cores = one core busy elsewhere); figures taken beside such "
                    "load are low." + (f" Above {s['max_others']:.0%}, a measurement was taken again, up to "
                                       f"{s['retries']} times, and the least disturbed try is shown (its tries "
                                       "are in the JSON)." if s["retries"] else "")]
    return "\n".join(out)


def write_json(path: Path, obj) -> None:
    save_json(path, obj, indent=2)


# ----------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------
class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each default, except where the help text already says what None means."""

    def _get_help_string(self, action):
        return action.help if action.default is None else super()._get_help_string(action)


def parse_args(argv=None):
    def ints(s):
        return tuple(int(v) for v in s.split(",") if v.strip())

    def names(s):
        return tuple(v.strip() for v in s.split(",") if v.strip())

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=HelpFormatter)
    p.add_argument("--device", default="auto", help="auto (cuda if present, else cpu), cpu, cuda, cuda:N")
    p.add_argument("--data-dir", default=None, help="CIFAR-10 folder (default: $CIFAR10_DIR, else ./data)")
    p.add_argument("--data-batch", type=int, default=DATA_BATCH, help="batch size of the data-pipeline measurements")
    p.add_argument("--data-batches", type=int, default=DATA_BATCHES, help="timed batches per data-pipeline measurement")
    p.add_argument("--workers", type=ints, default=",".join(map(str, WORKERS)),
                   help="loader worker counts, comma-separated; counts above the CPU count are dropped")
    p.add_argument("--train-batch", type=int, default=None, help=f"train-step batch size (auto: {TRAIN_BATCH})")
    p.add_argument("--eval-batch", type=int, default=None, help=f"evaluation batch size (auto: {EVAL_BATCH})")
    p.add_argument("--steps", type=int, default=None, help=f"timed train steps / eval batches (auto: {STEPS})")
    p.add_argument("--warmup", type=int, default=None, help=f"untimed batches before each measurement (auto: {WARMUP})")
    p.add_argument("--models", type=names, default=",".join(map(str, MODELS)), help="models, comma-separated")
    p.add_argument("--precisions", type=names, default=",".join(map(str, PRECISIONS)), help="fp32 and/or bf16 (autocast)")
    p.add_argument("--layouts", type=names, default=",".join(map(str, LAYOUTS)), help="nchw and/or channels_last (train step)")
    p.add_argument("--skip", type=names, default=None, help="sections to skip, comma-separated: data, train, eval")
    p.add_argument("--retries", type=int, default=RETRIES,
                   help=f"measure a train/eval step again (this many times at most) while other processes "
                        f"use more than {MAX_OTHERS:.0%} of the CPU; the least disturbed try is kept")
    p.add_argument("--threads", type=int, default=None,
                   help=f"torch CPU threads (default: torch's choice, {torch.get_num_threads()} here)")
    p.add_argument("--out", default=None, help="write every figure and the run information to this JSON file")
    p.add_argument("--md", default=None, help="write the printed tables and the command to this markdown file")
    p.add_argument("--dry-run", action="store_true",
                   help=f"a tiny version in seconds on the smoke subset: {DRY_RUN}")
    args = p.parse_args(argv)
    args.skip = args.skip or ()
    from helpers.models import MODELS as KNOWN
    for bad in set(args.models) - set(KNOWN):
        p.error(f"unknown model {bad!r}: use {', '.join(KNOWN)}")
    for bad in set(args.skip) - {"data", "train", "eval"}:
        p.error(f"unknown section {bad!r}: use data, train, eval")
    for bad in set(args.precisions) - {"fp32", "bf16"}:
        p.error(f"unknown precision {bad!r}: use fp32, bf16")
    for bad in set(args.layouts) - {"nchw", "channels_last"}:
        p.error(f"unknown layout {bad!r}: use nchw, channels_last")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = engine.get_device(None if args.device == "auto" else args.device)
    kind = "cuda" if device.type == "cuda" else "cpu"
    settings = dict(data_batch=args.data_batch, data_batches=args.data_batches,
                    workers=tuple(w for w in args.workers if w == 0 or w <= (os.cpu_count() or 1)),
                    train_batch=args.train_batch or TRAIN_BATCH[kind],
                    eval_batch=args.eval_batch or EVAL_BATCH[kind],
                    steps=args.steps or STEPS[kind], warmup=args.warmup if args.warmup is not None else WARMUP[kind],
                    retries=args.retries, max_others=MAX_OTHERS)
    if args.dry_run:
        settings.update(DRY_RUN)
    settings.update(models=args.models, precisions=args.precisions, layouts=args.layouts,
                    dry_run=args.dry_run, cudnn_benchmark=torch.backends.cudnn.benchmark)

    data = load_cifar10(args.data_dir, download=False)
    if args.dry_run:
        data = data.smoke_subset()
    results = {"info": run_info(device, data), "settings": settings, "rows": []}
    s = settings

    def add(r):
        results["rows"].append(r)
        print(f"  {r['kind']:5} {r['name']:<48} {r['setting']:<20} {fmt(r):>10} images/s", file=sys.stderr, flush=True)

    print(f"benchmarking on {results['info']['device_name']} ({device})", file=sys.stderr, flush=True)
    if "data" not in args.skip:
        for w in s["workers"]:
            add(bench_albumentations(data, device, w, s["data_batch"], s["data_batches"], s["warmup"]))
        add(bench_device_loader(data, device, s["data_batch"], s["data_batches"], s["warmup"]))
    if "train" not in args.skip:
        for name in s["models"]:
            for precision in s["precisions"]:
                for layout in s["layouts"]:
                    add(bench_train(name, data, device, precision, layout, s["train_batch"], s["steps"], s["warmup"],
                                    s["retries"]))
    if "eval" not in args.skip:
        for name in s["models"]:
            for precision in s["precisions"]:
                add(bench_eval(name, data, device, precision, s["eval_batch"], s["steps"], s["warmup"], s["retries"]))

    results["info"]["load_average_at_end"] = load_average()
    report = tables(results)
    print(report)
    if args.out:
        write_json(Path(args.out), results)
        print(f"\nwrote {args.out}", file=sys.stderr)
    if args.md:
        md = (f"# Benchmark on {results['info']['device_name']}\n\n"
              f"Made with:\n\n```\n{results['info']['command']}\n```\n\n{report}\n")
        with atomic_write(args.md, "w") as f:
            f.write(md)
        print(f"wrote {args.md}", file=sys.stderr)
    return results


if __name__ == "__main__":
    main()
