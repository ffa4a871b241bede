"""Checkpoints: save atomically, load with clear errors, rebuild the model they record.

A checkpoint is a dict saved with torch.save:
  arch       the model name for helpers.models.get_model ("resnet9", "vgg", "compact", "fast")
  model_options  get_model's keywords that change the weights' shapes, when any: {"rank": r}
             for a low-rank vgg (export_fp16(..., rank=r)); load_model rebuilds the model with them
  model      the state_dict (unwrapped from DDP and torch.compile)
  optimizer, scheduler, scaler, epoch, history, config, rng   (training checkpoints)
  metrics    optional, e.g. the test accuracy of a shipped model
Only plain types and tensors are stored, so it loads with torch.load(weights_only=True).
"""
from __future__ import annotations

import pickle
import random
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .errors import CheckpointError, ConfigError, NewerCheckpointError
from .files import atomic_write
from .models import MODELS, get_model, low_rank_vgg, set_batchnorm

FORMAT = 1


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module inside DistributedDataParallel and torch.compile wrappers."""
    while True:
        if hasattr(model, "module") and isinstance(model.module, nn.Module):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


def rng_state() -> dict:
    """Every global random state a training run draws from: python, numpy, torch (and CUDA)."""
    np_state = np.random.get_state()
    state = {"python": random.getstate(),
             "numpy": (np_state[0], torch.from_numpy(np_state[1].copy()), *map(_plain, np_state[2:])),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(_tuples(state["python"]))
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _plain(x):
    return x.item() if hasattr(x, "item") else x


def _tuples(x):
    return tuple(_tuples(v) for v in x) if isinstance(x, (list, tuple)) else x


def save_checkpoint(path, model: nn.Module | dict, arch: str, **fields) -> Path:
    """Write {arch, model state, **fields} to `path` atomically (temporary file, then rename).
    `model` is a module or already its state_dict; a module's shape options (a low-rank vgg's
    rank) are recorded as model_options unless `fields` gives them.

    A crash during the write leaves any previous checkpoint at `path` intact.
    """
    if arch not in MODELS:
        raise CheckpointError(f"unknown architecture {arch!r}: choose one of {', '.join(MODELS)}")
    path = Path(path)
    if not isinstance(model, dict):
        model = unwrap(model)
        if getattr(model, "options", None) and "model_options" not in fields:
            fields["model_options"] = dict(model.options)
    weights = model if isinstance(model, dict) else model.state_dict()
    state = {"format": FORMAT, "arch": arch, "model": weights, **fields}
    try:
        with atomic_write(path) as f:
            torch.save(state, f)
    except OSError as e:
        raise CheckpointError(f"cannot write checkpoints to {path.parent} ({e.strerror or e}): "
                              "choose a writable folder with --checkpoints") from e
    except RuntimeError as e:          # torch's own writer fails this way, e.g. on a full disk
        if "PytorchStreamWriter" not in str(e) and "write" not in str(e).lower():
            raise
        raise CheckpointError(f"cannot write the checkpoint {path} (torch.save failed: "
                              f"{str(e).splitlines()[0][:120]}): free disk space there or choose another "
                              "folder with --checkpoints; the previous checkpoint is intact") from e
    return path


def load_checkpoint(path, map_location="cpu") -> dict:
    """Read a checkpoint written by save_checkpoint, with one-line errors for bad files."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist: train one with "
                              "`python -m helpers train --serialize` or check the path")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        if not any(w in str(e).lower() for w in ("unsupported global", "unsupported class", "instantiate")):
            raise CheckpointError(f"checkpoint {path} is truncated or not a PyTorch file "
                                  f"({type(e).__name__}): train again or restore a good copy") from e
        raise CheckpointError(                    # a whole pickled object: loading it would run its code
            f"{path} holds pickled Python objects beyond tensors and plain values, which torch.load "
            "refuses to load with weights_only=True because unpickling them can run arbitrary code: "
            "if you trust the file, load it yourself with torch.load(path, weights_only=False) and "
            "save its state_dict with helpers.checkpoint.save_checkpoint") from e
    except OSError as e:
        raise CheckpointError(f"cannot read the checkpoint {path} ({e.strerror or e}): "
                              "check its permissions") from e
    except Exception as e:
        raise CheckpointError(f"checkpoint {path} is truncated or not a PyTorch file "
                              f"({type(e).__name__}): train again or restore a good copy") from e
    if not isinstance(ckpt, dict) or "arch" not in ckpt or "model" not in ckpt:
        raise CheckpointError(f"{path} is not a checkpoint of this course (no architecture recorded): "
                              "save models with helpers.checkpoint.save_checkpoint")
    if ckpt.get("format", FORMAT) > FORMAT:
        raise NewerCheckpointError(f"{path} was written in checkpoint format {ckpt['format']}, newer than this "
                                   f"code's {FORMAT}: update the course code (git pull)")
    if isinstance(ckpt.get("history"), dict):
        ckpt["history"] = upgrade_history(ckpt["history"])
    return ckpt


LEGACY_HISTORY_KEYS = {"test_loss": "eval_loss", "test_acc": "eval_acc"}   # before 2026-12-06


def upgrade_history(history: dict) -> dict:
    """A training history with today's keys. Histories written before 2026-12-06 called the
    per-epoch evaluation test_loss/test_acc, even when it ran on a validation split; it is
    eval_loss/eval_acc now, and history["eval_set"] says which set it was."""
    upgraded = {}
    for key, value in history.items():
        new = LEGACY_HISTORY_KEYS.get(key)
        upgraded[new if new and new not in history else key] = value
    return upgraded


def load_model(path, device="cpu", expect_arch: str | None = None):
    """Rebuild the recorded architecture, load its weights (as float32) and return (model, checkpoint)."""
    ckpt = load_checkpoint(path)
    if expect_arch is not None and ckpt["arch"] != expect_arch:
        raise CheckpointError(f"checkpoint {path} holds a {ckpt['arch']} model, not {expect_arch}: "
                              f"use --model {ckpt['arch']} or a {expect_arch} checkpoint")
    return model_from_checkpoint(ckpt, path).to(device).eval(), ckpt


def model_from_checkpoint(ckpt: dict, path) -> nn.Module:
    """The model a loaded checkpoint records (its arch and model_options), with its weights as
    float32; `path` names the file in errors."""
    arch, options = ckpt["arch"], ckpt.get("model_options") or {}
    if arch not in MODELS:
        raise CheckpointError(f"checkpoint {path} records unknown architecture {arch!r}")
    if not isinstance(options, dict) or not set(options) <= {"rank"}:
        raise CheckpointError(f"checkpoint {path} records model options {options!r} that this version "
                              "does not know (it knows rank): update the course code or re-export the model")
    try:   # the same outputs as in training (dropout is a no-op in eval mode; the logit scale is not)
        config = ckpt.get("config") or {}
        model = get_model(arch, logit_scale=config.get("logit_scale", 1.0), **options)
    except ConfigError as e:
        raise CheckpointError(f"checkpoint {path} records options its {arch} model cannot take ({e})") from None
    if arch == "fast":                       # its BatchNorm eps shapes the outputs (airbench's 1e-12)
        set_batchnorm(model, eps=config.get("bn_eps", 1e-5))
    weights = {k: v.float() if v.is_floating_point() else v for k, v in ckpt["model"].items()}
    try:
        model.load_state_dict(weights)
    except RuntimeError:
        shape = f" with {options}" if options else ""
        raise CheckpointError(f"the weights in {path} do not fit the {arch} architecture{shape}: "
                              "the file was saved from a different model") from None
    return model


# What an exported (shipped) model keeps of a training checkpoint, besides its weights.
EXPORT_KEYS = ("model_options", "mean", "std", "classes", "config", "recipe", "metrics", "history", "data_source",
               "smoke")


def inference_settings(ckpt: dict) -> tuple[dict, tuple | None]:
    """What a checkpoint says about testing its model: the test-time augmentation its recipe
    tests with (helpers.analysis.predict's `tta`: a recipe's `tta()`; a checkpoint older than
    tta_centre weighed its views alike), and the (mean, std) its inputs are normalised with, or
    None when it records none (a training checkpoint of a recipe that normalises, e.g. *_last.pt)."""
    from .config import TTA_ALIKE

    stats = (ckpt["mean"], ckpt["std"]) if ckpt.get("mean") is not None and ckpt.get("std") is not None else None
    recorded = ckpt.get("config") or {}
    if stats is None and recorded.get("normalize") is False:    # pixels in [0, 1], as it trained
        stats = ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
    return {"tta_flip": bool(recorded.get("tta_flip")), "tta_shift": int(recorded.get("tta_shift") or 0),
            "tta_centre": float(recorded.get("tta_centre", TTA_ALIKE))}, stats


def export_fp16(path, out, *, rank: int | None = None, svds: dict | None = None, **record) -> Path:
    """A small inference copy of the checkpoint at `path`: fp16 weights, the architecture and
    EXPORT_KEYS (mean/std, recipe, metrics, ...), plus `record` (e.g. the commit and the data
    source of the measured accuracy; it wins over a kept key of the same name). It loads with
    weights_only=True; load_model turns the weights back into float32. ResNet-9 shrinks from
    26 MB to 13 MB.

    rank=r (a full vgg only): lin.0 and lin.3 are first replaced by their truncated SVDs at
    rank r (helpers.models.low_rank_vgg, in float32), recorded as model_options={"rank": r}:
    69 MB becomes 2,389,140 + 32,768 r bytes of weights (r = 384: 15.0 MB). `svds` keeps the
    two SVDs between exports of one checkpoint at several ranks (pass the same dict)."""
    ckpt = load_checkpoint(path)
    kept = {k: ckpt[k] for k in EXPORT_KEYS if k in ckpt}
    weights = ckpt["model"]
    if rank is not None:
        if ckpt["arch"] != "vgg" or ckpt.get("model_options"):
            shape = f"{ckpt['arch']} {ckpt.get('model_options') or ''}".strip()
            raise ConfigError(f"rank applies to a full vgg checkpoint, and {path} holds a {shape} model: "
                              "export without rank, or from the full vgg checkpoint")
        weights = low_rank_vgg(model_from_checkpoint(ckpt, path), rank, svds).state_dict()
        kept["model_options"] = {"rank": int(rank)}
    weights = {k: v.half() if v.is_floating_point() else v for k, v in weights.items()}
    return save_checkpoint(out, weights, ckpt["arch"], dtype="float16", **{**kept, **record})


# Recipe fields that may differ between a run and its resumption (they do not change training).
RESUME_FREE = {"test_batch_size", "eval_every", "notes"}


def setting_changes(saved: dict, now: dict, ignore=()) -> list[str]:
    """'name old -> new' for each setting in `now` that differs from the one `saved` (a
    checkpoint's recipe or speed settings) holds: what a resume names when it refuses or warns."""
    return [f"{k} {saved.get(k)!r} -> {v!r}" for k, v in now.items() if k not in ignore and saved.get(k) != v]


def load_training_state(path, arch: str) -> dict:
    """The checkpoint at `path`, if it holds a training state (not final weights only) of an `arch` model."""
    ckpt = load_checkpoint(path)
    if ckpt["arch"] != arch:
        raise CheckpointError(f"cannot resume {path}: it holds a {ckpt['arch']} model, not {arch}; "
                              f"add --arch {ckpt['arch']} (and the run's other settings)")
    if "optimizer" not in ckpt or "epoch" not in ckpt:
        raise CheckpointError(f"{path} holds final weights only, not a training state: resume from "
                              f"{Path(path).parent / (arch + '_last.pt')} or start a new run")
    return ckpt


def check_resume(path, recipe) -> dict:
    """The training state at `path`, if a run of `recipe` may continue from it. Refused with a
    one-line error: another architecture or weights only (CheckpointError), or other settings
    (ConfigError: a resumed run must repeat the original settings to end identically)."""
    from .config import Recipe, current_augment
    from .errors import ConfigError

    ckpt = load_training_state(path, recipe.model)
    # a field the checkpoint predates had its default value then
    saved, now = {**Recipe().to_dict(), **(ckpt.get("config") or {})}, recipe.to_dict()
    saved["augment"] = current_augment(saved["augment"])                  # a checkpoint may use a former name
    diffs = setting_changes(saved, now, RESUME_FREE)
    if diffs:
        raise ConfigError(f"cannot resume {path} with other settings ({'; '.join(diffs)}): repeat the "
                          "original run's flags (and SMOKE_TEST), or start a new run without --resume")
    return ckpt


def resumable(path, recipe, log=print) -> Path | None:
    """`path` when it holds a training state that a run of `recipe` can continue, else None,
    saying why (by the file's name, not its full path) unless there is simply no file yet."""
    from .errors import CourseError

    path = Path(path)
    if not path.is_file():
        return None
    try:
        check_resume(path, recipe)
    except NewerCheckpointError:
        raise                                    # starting afresh would overwrite it
    except CourseError as e:
        log(f"starting afresh: {str(e).replace(str(path), path.name)}")
        return None
    return path


def freshest_checkpoint(candidates, hint: str) -> Path:
    """The most recently written of the `candidates` that exist: a model trained here wins
    over the shipped one unless it is older. `hint` says how to get one when none exists."""
    found = [Path(p) for p in candidates if Path(p).is_file()]
    if not found:
        raise CheckpointError(f"no trained model: none of {', '.join(str(p) for p in candidates)} "
                              f"exists; {hint}")
    return max(found, key=lambda p: p.stat().st_mtime)
