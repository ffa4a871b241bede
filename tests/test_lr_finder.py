"""The LR range test wrapper (helpers.lr_finder) on real CIFAR-10 images, the suggestion,
the restored model and optimizer, and the lr_choice.json round trip."""
from __future__ import annotations

import contextlib
import io
import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from helpers import config, lr_finder, plots
from helpers.errors import ConfigError
from helpers.hardware import RunOptions
from helpers.models import get_model

QUIET = RunOptions("cpu", progress=False)
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10-jpg"


@pytest.fixture(scope="module")
def tiny_real():
    """8 train and 2 test real images per class (CIFAR10_DIR, else the shared copy)."""
    from helpers.data import load_cifar10

    path = Path(os.environ.get("CIFAR10_DIR") or SHARED_DATA)
    if not path.exists():
        pytest.skip("no local CIFAR-10 copy: set CIFAR10_DIR")
    return load_cifar10(path, download=False).subset(8, 2)


def state_copy(module: nn.Module) -> dict:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def fresh(seed: int = 0):
    torch.manual_seed(seed)
    model = get_model("resnet9")
    return model, torch.optim.Adam(model.parameters(), lr=1e-3)


# ----------------------------------------------------------------------------------------
# the range test on real images
# ----------------------------------------------------------------------------------------
def test_range_test_runs_on_real_images_with_geometric_lrs(tiny_real):
    model, opt = fresh()
    loader = lr_finder.range_test_loader(tiny_real, batch_size=16)
    r = lr_finder.range_test(model, loader, opt, start_lr=1e-6, end_lr=1.0, num_iter=12, options=QUIET)
    assert 2 <= len(r.lrs) == len(r.losses) <= 12
    assert r.diverged == (len(r.lrs) < 12)
    assert r.lrs[0] == pytest.approx(1e-6)
    ratios = np.diff(np.log(r.lrs))
    assert np.allclose(ratios, math.log(1.0 / 1e-6) / (12 - 1))      # geometric from start to end
    if not r.diverged:
        assert r.lrs[-1] == pytest.approx(1.0)
    assert all(math.isfinite(v) for v in r.losses)
    assert r.losses[0] > 0                                           # cross-entropy of real batches
    assert min(r.lrs) <= r.suggestion <= max(r.lrs)
    assert r.suggestion == r.lrs[r.suggestion_index]


def test_model_and_optimizer_are_restored(tiny_real):
    model, opt = fresh()
    loader = lr_finder.range_test_loader(tiny_real, batch_size=16)
    # give Adam some state first, so that "restored" means more than "still empty"
    x, y = next(iter(loader))
    nn.functional.cross_entropy(model(x), y).backward()
    opt.step()
    weights, opt_state = state_copy(model), opt.state_dict()
    exp_avg = {k: v["exp_avg"].clone() for k, v in opt_state["state"].items()}

    lr_finder.range_test(model, loader, opt, num_iter=6, options=QUIET)

    after = model.state_dict()
    assert after.keys() == weights.keys()
    for k, v in weights.items():                                     # weights and BN statistics
        assert torch.equal(after[k], v), k
    new_state = opt.state_dict()
    assert opt.param_groups[0]["lr"] == 1e-3
    assert "initial_lr" not in opt.param_groups[0]
    assert new_state["state"].keys() == opt_state["state"].keys()
    for k, v in exp_avg.items():
        assert torch.equal(new_state["state"][k]["exp_avg"], v)
    # and a OneCycle schedule can still be attached to the restored optimizer
    from helpers.optim import one_cycle
    one_cycle(opt, 2.54e-3, epochs=2, steps_per_epoch=3, peak_epoch=1)


def test_the_range_test_equals_torch_lr_finder_loss_for_loss(tiny_real):
    """The course's plain-code range test and torch-lr-finder's LRFinder (the library it is
    written after) give the same LRs and smoothed losses on the same batches, the loader
    running out and starting over included (10 batches of 16 from 80 images, 14 steps)."""
    from torch_lr_finder import LRFinder

    model, opt = fresh()
    torch.manual_seed(1)
    ours = lr_finder.range_test(model, lr_finder.range_test_loader(tiny_real, batch_size=16), opt,
                                start_lr=1e-5, end_lr=1.0, num_iter=14, options=QUIET)
    model, opt = fresh()
    torch.manual_seed(1)
    finder = LRFinder(model, opt, nn.CrossEntropyLoss(), device="cpu")
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        finder.range_test(lr_finder.range_test_loader(tiny_real, batch_size=16), start_lr=1e-5, end_lr=1.0,
                          num_iter=14, step_mode="exp", smooth_f=lr_finder.SMOOTH_F,
                          diverge_th=lr_finder.DIVERGE_TH)
    assert len(ours.lrs) == len(finder.history["lr"]) == 14
    assert ours.lrs == pytest.approx(finder.history["lr"], rel=1e-12)
    assert ours.losses == pytest.approx(finder.history["loss"], rel=1e-5)
    assert ours.raw_losses[0] == ours.losses[0] and ours.raw_losses[1:] != ours.losses[1:]   # smoothed after the first


def test_the_range_test_stops_when_the_smoothed_loss_passes_five_times_its_best(tiny_real):
    model, opt = fresh()
    r = lr_finder.range_test(model, lr_finder.range_test_loader(tiny_real, batch_size=16), opt,
                             start_lr=1e-3, end_lr=1e6, num_iter=40, options=QUIET)
    assert r.diverged and len(r.lrs) < 40
    assert r.losses[-1] > lr_finder.DIVERGE_TH * min(r.losses)                       # the step that stopped it
    assert all(v <= lr_finder.DIVERGE_TH * min(r.losses[:i + 1]) for i, v in enumerate(r.losses[:-1]))


@pytest.mark.parametrize("kwargs, match", [
    ({"start_lr": 0}, "start_lr must be a positive number"),
    ({"start_lr": 1.0, "end_lr": 1e-3}, "must be below end_lr"),
    ({"end_lr": float("inf")}, "end_lr must be finite"),
    ({"num_iter": 1}, "num_iter must be a whole number >= 2"),
])
def test_bad_range_test_settings_are_refused(tiny_real, kwargs, match):
    model, opt = fresh()
    loader = lr_finder.range_test_loader(tiny_real, batch_size=16)
    with pytest.raises(ConfigError, match=match):
        lr_finder.range_test(model, loader, opt, options=QUIET, **kwargs)


def test_smoke_mode_shrinks_the_test(tiny_real):
    assert lr_finder.default_num_iter(smoke=True) == config.SMOKE_LR_FINDER_ITERS
    assert lr_finder.default_batch_size(smoke=True) == config.SMOKE_BATCH_SIZE
    assert lr_finder.default_num_iter(smoke=False) == config.LR_FINDER_ITERS == 100
    assert lr_finder.default_batch_size(smoke=False) == config.BATCH_SIZE == 512
    model, opt = fresh()
    r = lr_finder.range_test(model, lr_finder.range_test_loader(tiny_real, batch_size=16), opt,
                             num_iter=lr_finder.default_num_iter(smoke=True), options=QUIET)
    assert r.num_iter == config.SMOKE_LR_FINDER_ITERS
    assert len(r.lrs) <= config.SMOKE_LR_FINDER_ITERS


def test_the_package_never_reads_smoke_test_itself(monkeypatch):
    """Smoke mode is an argument: SMOKE_TEST is read by the entry points alone (the notebooks'
    first cells, the command line, the test suite), so a recipe asked for is the full one."""
    monkeypatch.setenv("SMOKE_TEST", "1")
    assert config.recipe("resnet9").epochs == config.EPOCHS == 24
    assert config.recipe("resnet9", smoke=True).epochs == config.SMOKE_EPOCHS
    assert lr_finder.lr_choice_file(smoke=False) == config.REPO_ROOT / "artifacts" / "lr_choice.json"


# ----------------------------------------------------------------------------------------
# the suggestion
# ----------------------------------------------------------------------------------------
def torch_lr_finder_suggestion(lrs, losses):
    """What torch-lr-finder's own plot(suggest_lr=True) suggests for a history."""
    import matplotlib.pyplot as plt
    from torch_lr_finder import LRFinder

    model = nn.Linear(2, 2)
    finder = LRFinder(model, torch.optim.SGD(model.parameters(), lr=0.1), nn.MSELoss())
    finder.history = {"lr": list(lrs), "loss": list(losses)}
    fig, ax = plt.subplots()
    with contextlib.redirect_stdout(io.StringIO()):
        _, lr = finder.plot(ax=ax, suggest_lr=True)
    plt.close(fig)
    return lr


@pytest.mark.parametrize("seed", range(5))
def test_suggestion_matches_torch_lr_finder(seed):
    rng = np.random.default_rng(seed)
    lrs = 1e-7 * (1e8 ** (np.arange(100) / 99))
    x = np.log10(lrs)
    losses = 2.3 - 1.5 / (1 + np.exp(-(x + 3) * 2)) + np.where(x > -1, (x + 1) ** 2, 0)
    losses = losses + rng.normal(0, 0.02, 100)
    lr, idx, skip_start, skip_end = lr_finder.steepest_descent(lrs, losses)
    assert (skip_start, skip_end) == (10, 5)
    assert lr == torch_lr_finder_suggestion(lrs, losses)
    assert 10 <= idx < 95


def test_short_tests_still_get_a_suggestion_inside_the_range():
    lrs = 1e-7 * (1e8 ** (np.arange(8) / 7))
    losses = [2.30, 2.30, 2.29, 2.25, 2.10, 1.90, 2.40, 9.0]
    lr, idx, skip_start, skip_end = lr_finder.steepest_descent(lrs, losses)
    assert skip_start + skip_end + 2 <= 8
    assert lrs[0] <= lr <= lrs[-1] and lr == lrs[idx]
    with pytest.raises(ConfigError, match="at least 2"):
        lr_finder.steepest_descent([1e-3], [2.3])


def curve(n=100, seed=0):
    """A range test's shape: flat, a long descent, the lowest loss at LR 1e-2, then divergence."""
    lrs = 1e-7 * (1e8 ** (np.arange(n) / (n - 1)))
    x = np.log10(lrs)
    losses = 2.3 - 1.5 / (1 + np.exp(-(x + 4) * 1.5)) + np.where(x > -2, 3 * (x + 2) ** 2, 0)
    return lrs, losses + np.random.default_rng(seed).normal(0, 0.005, n)


def test_valley_lies_inside_the_longest_descent():
    lrs, losses = curve()
    lowest = int(np.argmin(losses))
    i = lr_finder.valley(list(losses))
    assert 0 < i < lowest                          # on the way down, before the bottom
    assert losses[i] < losses[0] - 0.3             # well into the descent, not on the flat start
    assert lr_finder.valley([3.0 - 0.1 * k for k in range(31)] + [5.0]) == 14   # halfway down: fastai's arithmetic


def test_rules_read_the_same_window():
    lrs, losses = curve()
    r = lr_finder.RangeTestResult(lrs=list(lrs), losses=list(losses), num_iter=100,
                                  suggestion=lr_finder.steepest_descent(lrs, losses)[0])
    found = lr_finder.rules(r)
    assert set(found) == {"steepest descent", "valley", "lowest loss / 10"} and lr_finder.RULE in found
    assert found["lowest loss / 10"] == pytest.approx(lrs[np.argmin(losses)] / 10)
    assert found["steepest descent"] < lrs[np.argmin(losses)]
    lrs_cut = lrs[10:95]                            # every answer lies inside the ignored ends
    assert all(lrs_cut[0] / 10 <= v <= lrs_cut[-1] for v in found.values())


def test_choose_lr():
    lrs, losses = curve()
    r = lr_finder.RangeTestResult(lrs=list(lrs), losses=list(losses), num_iter=100,
                                  suggestion=lr_finder.steepest_descent(lrs, losses)[0])
    full = lr_finder.choose_lr(r, smoke=False)
    assert full["lr_max"] == lr_finder.rules(r)[lr_finder.RULE] and full["lr_min"] == pytest.approx(full["lr_max"] / 10)
    assert full["source"] == "lr_finder" and full["rule"] == lr_finder.RULE
    valley = lr_finder.choose_lr(r, rule="valley")
    assert valley["lr_max"] == full["rules"]["valley"] != full["lr_max"]
    smoke = lr_finder.choose_lr(r, smoke=True)
    assert smoke["lr_max"] == config.LR_MAX and smoke["lr_min"] == config.LR_MIN
    assert smoke["rules"] == full["rules"] and "noise" in smoke["note"]
    with pytest.raises(ConfigError, match="unknown rule"):
        lr_finder.choose_lr(r, rule="median")


def test_plot_range_test():
    import matplotlib.pyplot as plt

    r = lr_finder.RangeTestResult(lrs=list(1e-7 * (1e8 ** (np.arange(20) / 19))),
                                  losses=list(np.linspace(2.3, 1.0, 20)), suggestion=1e-3,
                                  num_iter=30, diverged=True, suggestion_index=11)
    fig = plots.lr_range_test(r, lr_max=2.5e-3, lr_min=2.5e-4, reference=config.LR_MAX)
    ax = fig.axes[0]
    labels = ax.get_legend_handles_labels()[1]
    assert any("ln 10" in t for t in labels) and any("valley" in t for t in labels)
    assert f"S10's LR_MAX {config.LR_MAX:.2e}" in labels and "LR_MAX 2.50e-03" in labels
    chosen, s10 = (next(line for line in ax.get_lines() if line.get_label().startswith(name))
                   for name in ("LR_MAX", "S10's"))
    assert chosen.get_linewidth() > s10.get_linewidth() and s10.get_linestyle() == ":"   # both visible where they meet
    assert ax.get_xscale() == "log"
    assert "learning rate" in ax.get_xlabel() and "loss" in ax.get_ylabel()
    assert "diverged" in ax.get_title()
    plt.close(fig)


# ----------------------------------------------------------------------------------------
# lr_choice.json
# ----------------------------------------------------------------------------------------
def test_save_load_round_trip(tmp_path):
    path = tmp_path / "artifacts" / "lr_choice.json"
    out = lr_finder.save_lr_choice(path, np.float64(2.0e-3), suggestion=np.float32(2.0e-3),
                                   source="lr_finder", note="test", num_iter=100)
    assert out == path
    stored = json.loads(path.read_text())
    assert stored["lr_max"] == 2.0e-3 and stored["lr_min"] == pytest.approx(2.0e-4)   # lr_max / 10
    got = lr_finder.load_lr_choice(path)
    assert got["lr_max"] == 2.0e-3 and got["lr_min"] == pytest.approx(2.0e-4)
    assert got["source"] == "lr_finder" and got["note"] == "test" and got["num_iter"] == 100
    lr_finder.save_lr_choice(path, 3e-3, 1e-4)
    got = lr_finder.load_lr_choice(path)
    assert (got["lr_max"], got["lr_min"], got["source"]) == (3e-3, 1e-4, "manual")
    assert sorted(p.name for p in path.parent.iterdir()) == ["lr_choice.json"]    # no temp files


def test_missing_file_gives_the_documented_defaults(tmp_path):
    got = lr_finder.load_lr_choice(tmp_path / "nothing.json")
    assert got["source"] == "defaults"
    assert got["lr_max"] == config.LR_MAX == 2.54e-3
    assert got["lr_min"] == config.LR_MIN == pytest.approx(2.54e-4)


@pytest.mark.parametrize("lr_max, lr_min, match", [
    (0, None, "lr_max must be a positive number"),
    (-1e-3, None, "lr_max must be a positive number"),
    (float("nan"), None, "lr_max must be a positive number"),
    (float("inf"), 1e-3, "lr_max must be finite"),
    ("2e-3", None, "lr_max must be a positive number"),
    (True, None, "lr_max must be a positive number"),
    (1e-3, 0, "lr_min must be a positive number"),
    (1e-3, 1e-2, "must be below lr_max"),
    (1e-3, 1e-3, "must be below lr_max"),
])
def test_bad_values_are_rejected(tmp_path, lr_max, lr_min, match):
    path = tmp_path / "lr_choice.json"
    with pytest.raises(ConfigError, match=match):
        lr_finder.save_lr_choice(path, lr_max, lr_min)
    assert not path.exists()
    path.write_text(json.dumps({"lr_max": lr_max, "lr_min": lr_min}))
    with pytest.raises(ConfigError, match=match):
        lr_finder.load_lr_choice(path)


@pytest.mark.parametrize("text", ["{not json", "[1, 2]", '{"lr_min": 1e-4}', ""])
def test_unreadable_files_are_reported(tmp_path, text):
    path = tmp_path / "lr_choice.json"
    path.write_text(text)
    with pytest.raises(ConfigError, match="lr_choice.json"):
        lr_finder.load_lr_choice(path)


def test_a_failed_write_leaves_the_old_file_intact(tmp_path, monkeypatch):
    path = lr_finder.save_lr_choice(tmp_path / "lr_choice.json", 2e-3)
    before = path.read_text()

    def broken_replace(src, dst):
        raise OSError("disk full")

    from helpers import files

    monkeypatch.setattr(files.os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk full"):
        lr_finder.save_lr_choice(path, 5e-3)
    assert path.read_text() == before
    assert [p.name for p in tmp_path.iterdir()] == ["lr_choice.json"]


# ----------------------------------------------------------------------------------------
# the planned schedule
# ----------------------------------------------------------------------------------------
def test_planned_schedule_has_seed001_numbers():
    plan = lr_finder.planned_one_cycle()
    assert (plan.steps_per_epoch, plan.total_steps, plan.peak_step) == (98, 2352, 489)
    assert plan.peak_step // plan.steps_per_epoch + 1 == 5
    assert plan.lrs[0] == pytest.approx(config.LR_MIN) and plan.lrs[-1] == pytest.approx(config.LR_MIN)
    assert max(plan.lrs) == pytest.approx(config.LR_MAX)
    assert min(plan.lrs) >= config.LR_MIN * (1 - 1e-9)
    text = plan.describe()
    assert "98" in text and "2,352" in text and "489" in text
    small = lr_finder.planned_one_cycle(1e-2, epochs=2, peak_epoch=1, train_size=1000, batch_size=128)
    assert (small.steps_per_epoch, small.total_steps, small.peak_step) == (8, 16, 7)
