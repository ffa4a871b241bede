"""One GPU session, prepared and tested on the CPU: what the course's recipes cost on a GPU.

Parts, in order, each written to --out as soon as it ends (a run cut short keeps what it
finished); a part that would not fit the time budget is recorded as skipped:
  1. the machine: device, versions, a live bf16 matmul rate (the ceiling for the fractions below);
  2. S10's recipe (ResNet-9, 24 epochs), RNG seed 0, with the automatic settings;
  3. the fast recipe, RNG seeds 0, 1, 2;
  4. torch.profiler over 20 steps of each: the top kernels and the fraction of the bf16 peak;
  5. the anchor, airbench94 (PyPI airbench==0.1.8, run as published), RNG seeds 0, 1, 2;
  6. the VGG exercise's VGG with each --vgg's changes for its 15 epochs, where the budget still allows the whole run.
For every run: accuracy without TTA, with flip TTA and with the recipe's own TTA; the whole wall
time (data load, training with its per-epoch evaluation, final test), img/s and peak memory.

    bash results/gpu_run.sh                                       # on the GPU machine (see there)
    SMOKE_TEST=1 python results/gpu_run.py --out /tmp/gpu.json    # the same, tiny, on a CPU
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from helpers import config, engine, hardware, loop, speed  # noqa: E402
from helpers.data import load_cifar10  # noqa: E402
from helpers.loaders import build_loaders  # noqa: E402
from helpers.optim import optimizer_for  # noqa: E402
from helpers.files import save_json  # noqa: E402
from helpers.models import FastNet, get_model, init_whitening  # noqa: E402
from helpers.runinfo import run_info  # noqa: E402

# ----------------------------------------------------------------------------------------
# Settings
# ----------------------------------------------------------------------------------------
BUDGET_S = 500              # no part starts that would end after this (the call's limit is 600 s)
FAST_SEEDS = (0, 1, 2)
PROFILE_STEPS = 20
BF16_PEAK = 989e12          # H100/H200 SXM dense bf16, datasheet; the live matmul rate is the other ceiling
ESTIMATE_S = {"resnet9": 150, "fast": 30, "profile": 40, "airbench": 25}   # guesses, before anything ran


def now(t0: float) -> float:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def run_recipe(name: str, data, load_s: float, smoke: bool, **changes) -> dict:
    """One whole run of a recipe, measured; the model is evaluated three ways afterwards."""
    r = config.recipe(name, smoke=smoke, **changes)
    opts = dataclasses.replace(hardware.auto_options(), progress=False)
    cuda = opts.device.startswith("cuda")
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    run = engine.train(r, data, opts)
    train_s = now(t0)
    test = build_loaders(r, data, opts)[2]
    acc = {label: loop.evaluate(run["model"], test, amp=opts.amp, channels_last=opts.channels_last,
                                tta={**r.tta(), "tta_flip": flip, "tta_shift": shift}, progress=False)["acc"]
           for label, flip, shift in (("plain", False, 0), ("flip", True, 0), ("recipe_tta", r.tta_flip, r.tta_shift))}
    seconds = run["history"]["seconds"]
    out = {"recipe": name, "changes": changes, "config": r.to_dict(), "options": opts.describe().splitlines()[0],
           **{k: getattr(opts, k) for k in ("amp", "channels_last", "fast_augment")},
           "epochs": len(seconds), "batch": r.batch_size, "train_images": len(data.train_labels),
           "acc": acc, "acc_in_run": run["test"]["acc"], "data_load_s": load_s, "train_and_test_s": train_s,
           "whole_s": load_s + train_s, "epoch_s": seconds, "first_epoch_s": seconds[0],
           "img_per_s_median_epoch": len(data.train_labels) / statistics.median(seconds),
           "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None}
    print(f"{name} {changes}: {acc} in {train_s:.1f} s (+{load_s:.1f} s data load), "
          f"{out['img_per_s_median_epoch']:.0f} img/s", flush=True)
    return out


def timed_steps(r, data, n: int):
    """A fresh model of recipe `r` with its optimizer, 5 warm-up steps, then `n` real train steps
    timed; returns (seconds per step, the model, a function that runs those n steps again)."""
    opts = dataclasses.replace(hardware.auto_options(), progress=False)
    device = torch.device(opts.device)
    hardware.seed_everything(0)
    model = get_model(r.model, dropout=r.dropout, logit_scale=r.logit_scale)
    if isinstance(model, FastNet):
        init_whitening(model, engine.whitening_images(data, r))
    model.to(device)
    if opts.channels_last:
        model.to(memory_format=torch.channels_last)
    loader = build_loaders(r, data, opts)[0]                  # on the device: opts.fast_augment
    batches = []
    while len(batches) < n + 5:
        batches += list(loader)
    optimizer = optimizer_for(r, model.parameters())
    loss_fn = torch.nn.CrossEntropyLoss(label_smoothing=r.label_smoothing)
    scaler = loop.grad_scaler(device, opts.amp)                      # one for every step (fp16 only)
    again = lambda: loop.train_one_epoch(model, batches[5:5 + n], optimizer, loss_fn=loss_fn, options=opts,  # noqa: E731
                                         scaler=scaler)
    loop.train_one_epoch(model, batches[:5], optimizer, loss_fn=loss_fn, options=opts, scaler=scaler)
    t0 = time.perf_counter()
    again()
    return now(t0) / n, model, again


def profile(name: str, data, smoke: bool, matmul: float) -> dict:
    """Time PROFILE_STEPS real train steps of a recipe (after 5 warm-up steps), then profile as
    many: the top kernels, and the FLOP rate reached against the bf16 peak and the live matmul."""
    r = config.recipe(name, smoke=smoke)
    dt, model, again = timed_steps(r, data, PROFILE_STEPS)
    cuda = torch.cuda.is_available()
    acts = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])
    with torch.profiler.profile(activities=acts) as prof:
        again()
        now(0)
    events = prof.key_averages()
    def device_us(e):  # noqa: E306
        return getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0)
    key = device_us if cuda else (lambda e: e.self_cpu_time_total)
    total = sum(key(e) for e in events) or 1
    top = sorted(events, key=key, reverse=True)[:12]
    flops = speed.flops_per_image(model, train=True) * r.batch_size
    out = {"recipe": name, "batch": r.batch_size, "step_s": dt, "img_per_s": r.batch_size / dt,
           "train_flops_per_step": flops, "flop_rate": flops / dt, "fraction_of_bf16_peak": flops / dt / BF16_PEAK,
           "fraction_of_live_matmul": flops / dt / matmul,
           "top_kernels": [{"name": e.key[:90], "self_us_per_step": key(e) / PROFILE_STEPS, "calls": e.count,
                            "share": key(e) / total} for e in top]}
    print(f"profile {name}: {dt * 1e3:.1f} ms/step, {out['flop_rate'] / 1e12:.1f} TFLOP/s "
          f"({out['fraction_of_bf16_peak']:.1%} of the bf16 peak); top: {out['top_kernels'][0]['name']}", flush=True)
    return out


def airbench(data, seeds) -> dict:
    """The anchor, Keller Jordan's airbench94, as published (its own loader, net, schedule and
    TTA), on the same JPEG copy: the package reads cifar10/{train,test}.pt from the working folder."""
    if not torch.cuda.is_available():
        return {"skipped": "the package runs on a CUDA GPU only (on a CPU: ../shared/tools/airbench_cpu.py)"}
    try:
        from airbench import lib_airbench94 as A, utils as U
    except ImportError:
        return {"skipped": "airbench is not installed: carry its wheel (pip wheel --no-deps airbench==0.1.8)"}
    work = Path(tempfile.mkdtemp()) / "cifar10"
    work.mkdir()
    for split, x, y in (("train", data.train_images, data.train_labels), ("test", data.test_images, data.test_labels)):
        torch.save({"images": torch.as_tensor(x), "labels": torch.as_tensor(y, dtype=torch.long),
                    "classes": list(data.classes)}, work / f"{split}.pt")
    here = os.getcwd()
    os.chdir(work.parent)
    try:
        A.train94(run=-1, verbose=True)                                     # its own warm-up
        runs = []
        for seed in seeds:
            torch.manual_seed(seed)
            torch.cuda.reset_peak_memory_stats()
            t0 = time.perf_counter()
            loader = U.CifarLoader("cifar10", train=True, batch_size=A.hyp["opt"]["batch_size"],
                                   aug=A.hyp["aug"], altflip=True)
            model = A.train94(loader, run=seed, verbose=False)
            test = U.CifarLoader("cifar10", train=False, batch_size=2000)
            tta = U.evaluate(model, test, tta_level=A.hyp["net"]["tta_level"])
            wall = now(t0)
            runs.append({"seed": seed, "acc": {"plain": U.evaluate(model, test, tta_level=0), "recipe_tta": tta},
                         "train_and_test_s": wall, "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30})
            print(f"airbench94 seed {seed}: {runs[-1]['acc']} in {wall:.1f} s", flush=True)
    finally:
        os.chdir(here)
    return {"package": "airbench==0.1.8", "epochs": A.hyp["opt"]["train_epochs"], "runs": runs,
            "note": "its own fp16 loader and net; trained without per-epoch evaluation (verbose=False)"}


def vgg(data, load_s: float, smoke: bool, changes: dict, left: float) -> dict:
    """The VGG exercise's VGG with `changes` for its 15 epochs, if 30 timed steps say the run fits in `left` s
    (with its evaluation after every epoch, at the seed's test batch of 8, counted as a fifth more)."""
    r = config.recipe("vgg", smoke=smoke, **changes)
    step_s = timed_steps(r, data, 30)[0]
    estimate = 1.2 * step_s * r.epochs * -(-len(data.train_labels) // r.batch_size) + 10
    if estimate > left - 15:
        return {"skipped": f"about {estimate:.0f} s at {step_s * 1e3:.1f} ms/step, {left:.0f} s left",
                "changes": changes, "step_s": step_s}
    return {**run_recipe("vgg", data, load_s, smoke, **changes), "step_s": step_s, "estimate_s": estimate}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="the JSON record to write")
    p.add_argument("--budget", type=float, default=BUDGET_S, help="seconds after which no part starts")
    p.add_argument("--vgg", nargs="*", default=[], metavar="CHANGES",
                   help="the VGG exercise's VGG runs for part 6, each as recipe changes, e.g. batch_size=16 or "
                        "batch_size=64,optimizer=adam; each run if it still fits (none: skip)")
    p.add_argument("--only", nargs="*", default=None, metavar="PART",
                   help="run only these parts (resnet9, fast, profile, airbench94, vgg); default: all")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    smoke = config.smoke_mode()
    t0 = time.perf_counter()
    record = {**run_info(hardware.get_device()), "smoke": smoke, "budget_s": args.budget, "parts": {}}
    record["git"]["commit"] = os.environ.get("GIT_COMMIT") or record["git"]["commit"]

    def part(name: str, estimate: float, fn):
        left = args.budget - (time.perf_counter() - t0)
        if estimate > left:
            record["parts"][name] = {"skipped": f"needs about {estimate:.0f} s, {left:.0f} s left"}
            print(f"{name}: skipped ({record['parts'][name]['skipped']})", flush=True)
        else:
            try:
                record["parts"][name] = fn()
            except Exception as e:                   # one broken part must not lose the others
                record["parts"][name] = {"error": f"{type(e).__name__}: {e}"}
                print(f"{name}: {type(e).__name__}: {e}", flush=True)
        record["elapsed_s"] = time.perf_counter() - t0
        save_json(args.out, record)

    t = time.perf_counter()
    data = load_cifar10()
    if smoke:
        data = data.smoke_subset()
    load_s = time.perf_counter() - t
    record["data"] = {"source": data.source, "load_s": load_s, "train": len(data.train_labels), "test": len(data.test_labels)}
    device = str(hardware.get_device())
    matmul = speed.matmul_rate(512 if smoke else 8192, device=device, min_run_time=0.2 if smoke else 1.0)
    record["matmul_bf16_flop_per_s"] = matmul
    print(f"{record['device']}: data in {load_s:.1f} s, bf16 matmul {matmul / 1e12:.1f} TFLOP/s", flush=True)
    wanted = lambda name: args.only is None or name in args.only                     # noqa: E731
    if wanted("resnet9"):
        part("resnet9", ESTIMATE_S["resnet9"], lambda: run_recipe("resnet9", data, load_s, smoke))
    for seed in FAST_SEEDS if wanted("fast") else ():
        part(f"fast_seed{seed}", ESTIMATE_S["fast"], lambda s=seed: run_recipe("fast", data, load_s, smoke, seed=s))
    for name in ("resnet9", "fast") if wanted("profile") else ():
        part(f"profile_{name}", ESTIMATE_S["profile"] / 2, lambda n=name: profile(n, data, smoke, matmul))
    if wanted("airbench94"):
        part("airbench94", ESTIMATE_S["airbench"] * len(FAST_SEEDS), lambda: airbench(data, FAST_SEEDS))
    for spec in args.vgg if wanted("vgg") else ():
        changes = {k: int(v) if v.isdigit() else v for k, v in (kv.split("=") for kv in spec.split(","))}
        name = "vgg_" + "_".join(f"{k}{v}" for k, v in changes.items())
        part(name, 30, lambda c=changes: vgg(data, load_s, smoke, c, args.budget - (time.perf_counter() - t0)))
    print(f"done in {time.perf_counter() - t0:.0f} s: {args.out}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
