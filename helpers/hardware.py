"""How a run uses the hardware, never what it learns: the device, mixed precision, memory
layout, where augmentation runs, loader processes, and the seeding of every random stream.

    options = auto_options()          # the fastest safe settings here, each with its reason
    print(options.describe())
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field

import numpy as np
import torch

from .errors import ConfigError

CPU_NHWC = "channels_last: oneDNN's CPU convolutions run NHWC faster, in fp32 as in bf16"   # results/cpu_benchmark.md
FP16_ON_CPU = ("fp16 on a CPU is emulated, dozens of times slower than bf16: use bf16 (--amp bf16) on a CPU with "
               "AVX-512 BF16 or AMX, else fp32 (--amp off)")


def get_device(preferred: str | None = None) -> torch.device:
    """'cuda' if present, else Apple's 'mps', else 'cpu'; or the named device, checked."""
    if preferred in (None, "", "auto"):
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(preferred)
    except RuntimeError as err:
        raise ConfigError(f"unknown device {preferred!r}: use cpu, cuda, cuda:N or mps") from err
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device 'cuda' asked for but no CUDA GPU is visible: use --device cpu")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise ConfigError(f"device {preferred!r} asked for but only {torch.cuda.device_count()} CUDA GPU(s) are "
                          f"visible: use cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError("device 'mps' asked for but not available: use --device cpu")
    return device


def loader_workers(fast_augment: bool) -> int:
    """Data-loading processes: none when batches are augmented on the device, else two (a
    laptop's or CI machine's cores; more rarely pays for 32x32 images). Results depend on the
    count, so it does not follow the machine."""
    return 0 if fast_augment else 2


@dataclass
class RunOptions:
    """How a recipe runs on the hardware (never what it learns): device, mixed precision,
    memory layout, the on-device augmentation, torch.compile and loader processes."""

    device: str | None = None        # None: the best available (cuda, mps, cpu)
    amp: str | None = None           # "bf16", "fp16" (with a grad scaler) or None for fp32
    channels_last: bool = False      # NHWC activations: what tensor cores and oneDNN prefer
    fast_augment: bool = False       # the recipe's augmentation on whole batches on the device
    compile: bool = False            # torch.compile the model
    workers: int = 0                 # data-loading processes for the albumentations path
    progress: bool = True            # progress bars and one line per epoch
    reasons: dict = field(default_factory=dict)   # why each setting was chosen: {"amp": "bf16: ...", ...}

    def recorded(self) -> dict:
        """What a training checkpoint keeps of these: the settings that change a run's numbers,
        so that a resumed run can repeat them and end exactly as an uninterrupted one."""
        return {"amp": self.amp, "channels_last": self.channels_last, "fast_augment": self.fast_augment,
                "workers": self.workers}

    def describe(self) -> str:
        head = (f"device {self.device}: {self.amp or 'fp32'}, channels_last {'on' if self.channels_last else 'off'}, "
                f"on-device augmentation {'on' if self.fast_augment else 'off'}")
        return "\n".join([head, *(f"  - {r}" for r in self.reasons.values())])


def native_bf16(device) -> bool:
    """True where bf16 matrix products run on matrix units: CUDA GPUs of compute capability 8
    (Ampere) or newer, CPUs with AVX-512 BF16 or AMX. Elsewhere bf16 is emulated: on a 2-core
    AVX2 CPU a bf16 matmul ran 30x slower than fp32 (results/cpu_benchmark.md)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_capability(device)[0] >= 8
    return device.type == "cpu" and _cpu_has_native_bf16()


@functools.cache
def _cpu_has_native_bf16() -> bool:
    """True when the CPU has bf16 matrix instructions (AVX-512 BF16 or AMX)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def auto_options(device=None) -> RunOptions:
    """The fastest safe settings for `device`, each with its reason (options.reasons[setting]).

    - CUDA: bf16 autocast on Ampere and newer; fp16 with a grad scaler before (Colab's T4
      has no bf16 tensor cores); channels_last; the augmentation on the GPU (the CPU would
      otherwise feed it too slowly).
    - CPU: bf16 only with AVX-512 BF16 or AMX (elsewhere bf16 is emulated, over 10x slower than
      fp32); channels_last in either precision (oneDNN's convolutions run NHWC faster in fp32
      too: results/cpu_benchmark.md); the on-device augmentation, which spares the two cores of
      a laptop or CI machine the loader processes.
    - Apple MPS: fp32, the augmentation on the device.
    """
    device = get_device(str(device) if device is not None else None)
    if device.type == "cuda":
        amp = "bf16" if native_bf16(device) else "fp16"
        why = {"amp": f"{amp}: {torch.cuda.get_device_name(device)} has "
                      + ("bf16 tensor cores" if amp == "bf16" else "fp16 but no bf16 tensor cores (grad scaler on)"),
               "channels_last": "channels_last: tensor cores read NHWC without transposes",
               "fast_augment": "on-device augmentation: the GPU augments whole batches, no CPU bottleneck"}
        channels_last = True
    elif device.type == "cpu":
        native = native_bf16(device)
        amp, channels_last = ("bf16" if native else None), True
        why = {"amp": "bf16 + channels_last: this CPU has AVX-512 BF16/AMX matrix instructions (about 2x fp32)"} \
            if native else {"amp": "fp32: this CPU has no native bf16 (emulated bf16 is over 10x slower than fp32)",
                            "channels_last": CPU_NHWC}
        why["fast_augment"] = "on-device augmentation: whole uint8 batches, no loader processes competing for cores"
    else:
        amp, channels_last = None, False
        why = {"amp": f"fp32: mixed precision is not set up for {device.type} here",
               "fast_augment": "on-device augmentation: whole batches on the device"}
    return RunOptions(str(device), amp, channels_last, fast_augment=True, workers=loader_workers(True), reasons=why)


def choose_options(device, given: dict, *, augment: str, resumed: dict | None = None,
                   compile: bool = False) -> RunOptions:
    """The RunOptions of a run from the settings a user gave (`given`: any of amp, channels_last,
    fast_augment, workers, as the command line's flags set them), each with its reason.

    A resumed run keeps the settings its checkpoint `resumed` records, so that it ends exactly
    as an uninterrupted run; a given setting that contradicts them is refused. Otherwise each
    setting not given is auto_options' choice, the on-device augmentation only where the
    recipe's `augment` has that twin (helpers.augment.PRESETS)."""
    from .augment import PRESETS
    from .checkpoint import setting_changes

    saved = (resumed or {}).get("options")
    if saved is not None:
        if diffs := setting_changes(saved, given):
            raise ConfigError(f"cannot resume with other speed settings than the checkpoint's ({'; '.join(diffs)}): drop "
                              "those flags (a resumed run keeps its own) or start a new run without --resume")
        if saved["amp"] == "fp16" and torch.device(device).type == "cpu":
            raise ConfigError(FP16_ON_CPU)
        why = {"resume": "as the run being resumed (its checkpoint records them)"}
        return RunOptions(str(device), saved["amp"], saved["channels_last"], saved["fast_augment"], compile,
                          saved["workers"], reasons=why)
    auto = auto_options(device)
    said = lambda name, on, flag: f"{name} {'on' if on else 'off'}: --{'' if on else 'no-'}{flag}"   # noqa: E731
    amp = given.get("amp", auto.amp)
    why = {"amp": f"{amp or 'fp32'}: --amp {amp or 'off'}" if "amp" in given else auto.reasons["amp"]}
    if "channels_last" in given:
        layout = given["channels_last"]
        why["channels_last"] = said("channels_last", layout, "channels-last")
    else:          # on a GPU NHWC pays with the bf16/fp16 matrix units only; on a CPU in fp32 as well
        follows_amp = torch.device(device).type != "cpu"
        layout = auto.channels_last and (amp is not None or not follows_amp)
        if "amp" in given and follows_amp:
            why["channels_last"] = f"channels_last {'on' if layout else 'off'}: follows --amp {amp or 'off'}"
        elif layout or "channels_last" in auto.reasons:
            why["channels_last"] = auto.reasons.get("channels_last", CPU_NHWC)
    if "fast_augment" in given:
        fast = given["fast_augment"]
        why["fast_augment"] = said("on-device augmentation", fast, "fast-augment")
    else:
        fast = auto.fast_augment and augment in (*PRESETS, "none")
        why["fast_augment"] = auto.reasons["fast_augment"] if fast else \
            f"loader augmentation: {augment} has no on-device twin (it has {', '.join(PRESETS)})"
    if resumed is not None:
        why["resume"] = ("note: the checkpoint predates recorded speed settings; the run ends exactly as an "
                         "uninterrupted one only if these are the original run's")
    if amp == "fp16" and torch.device(device).type == "cpu":
        raise ConfigError(FP16_ON_CPU)
    return RunOptions(str(device), amp, layout, fast, compile, given.get("workers", loader_workers(fast)), reasons=why)


def seed_everything(seed: int = 0) -> None:
    """Seed python, numpy and torch: a run's weights, shuffles and augmentations then repeat
    (bit for bit on a CPU; a GPU's fastest kernels may still differ in the last bits)."""
    import random

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
