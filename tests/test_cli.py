"""The command line, end to end: `python -m helpers train | test | predict`.

Every run gets SMOKE_TEST=1 and CIFAR10_DIR pointing at the real (JPEG) CIFAR-10 copy:
$CIFAR10_DIR when set (a relative path is taken from the repo root, as CI sets it), else
../shared/data/cifar10-jpg beside the repository. Tests that need the images skip cleanly
when that folder is absent; the --help and error tests do not need it.

Each model trains one smoke epoch (1,000 real training images, 500 test images, one
loader process) in a subprocess, is saved with --serialize, and is then tested and asked for
predictions by `helpers.cli.main` in this process (`run_in_process`: the same code and
environment, without a new interpreter's ~5 s of start-up and torch import each time).
The error cases run in parallel (they are mostly interpreter start-up) and must each end
with exactly one `error: ...` line on stderr, the documented exit status, and no traceback.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from conftest import DATA, REPO, needs_data, smoke_env
MODELS = ("compact", "resnet9", "vgg", "fast")



def cli(*args, cwd=None, env=None, timeout=600) -> subprocess.CompletedProcess:
    """Run `python -m helpers ARGS` in smoke mode on the real data; capture its output."""
    full_env = smoke_env(**(env or {}))
    return subprocess.run([sys.executable, "-m", "helpers", *map(str, args)], cwd=cwd or REPO,
                          env=full_env, capture_output=True, text=True, timeout=timeout)


def error_lines(stderr: str) -> list[str]:
    """The lines of stderr that report an error (progress bars redraw with carriage returns)."""
    return [line.strip() for line in re.split(r"[\r\n]", stderr) if line.strip().startswith("error")]


def assert_fails(proc, status: int, pattern: str) -> str:
    """Exit status `status`, exactly one `error: ...` line matching `pattern`, no traceback."""
    info = f"exit {proc.returncode}\nstdout: {proc.stdout[-1500:]}\nstderr: {proc.stderr[-1500:]}"
    assert proc.returncode == status, info
    assert "Traceback" not in proc.stderr, info
    lines = error_lines(proc.stderr)
    assert len(lines) == 1, info
    assert re.search(pattern, lines[0]), f"{lines[0]!r} does not match {pattern!r}"
    assert lines[0] == re.split(r"[\r\n]", proc.stderr.rstrip())[-1].strip(), "the error line comes last"
    return lines[0]


def assert_png(path) -> None:
    from PIL import Image

    path = Path(path)
    assert path.is_file() and path.stat().st_size > 1000, path
    with Image.open(path) as im:
        assert im.format == "PNG" and im.width > 100 and im.height > 100
        im.verify()


def printed(pattern: str, text: str) -> str:
    m = re.search(pattern, text, re.M)
    assert m, f"{pattern!r} not in:\n{text}"
    return m.group(1)


# ----------------------------------------------------------------------------------------
# train -> test -> predict, for each model
# ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module", params=MODELS)
def trained(request, tmp_path_factory):
    """One smoke epoch of `model` on real images, saved with --serialize."""
    if not DATA.is_dir():
        pytest.skip(f"no CIFAR-10 copy at {DATA}: set CIFAR10_DIR")
    model = request.param
    root = tmp_path_factory.mktemp(f"cli-{model}")
    dropout = ("--dropout", "0.2") if model == "resnet9" else ()       # resnet9 only
    proc = cli("train", "--arch", model, "--epochs", "1", "--workers", "0", "--serialize", "--device", "cpu",
               "--weight-decay", "1e-4", *dropout, "--checkpoints", root / "models")
    assert proc.returncode == 0, proc.stderr[-3000:]
    acc = float(printed(r"^test accuracy: (\d\.\d{4}) \(loss [\d.]+\) on 500 images", proc.stdout))
    return SimpleNamespace(model=model, root=root, dir=root / "models", proc=proc, acc=acc,
                           final=root / "models" / f"{model}.pt", last=root / "models" / f"{model}_last.pt")


def test_train_writes_checkpoints_history_and_curves(trained):
    from helpers.checkpoint import load_checkpoint, load_model
    from helpers.models import MODELS as ARCHS

    m, out = trained.model, trained.proc.stdout
    assert f"training {m} with the {m} recipe" in out and "[smoke]" in out
    assert "1,000 train" in out or "900 train / 100 validation" in out
    assert re.search(r"^epoch +1/1 +train loss [\d.]+ acc [\d.]+", out, re.M)
    assert sorted(os.listdir(trained.dir)) == sorted(
        [f"{m}.pt", f"{m}_last.pt", f"{m}_history.json", f"{m}_curves.png"])   # nothing half-written
    for kind in ("model", "history", "curves"):
        assert re.search(rf"^saved {kind}: .*{re.escape(str(trained.dir))}", out, re.M)

    final = load_checkpoint(trained.final)
    assert final["arch"] == m and final["config"]["model"] == m and final["config"]["epochs"] == 1
    # --weight-decay and --dropout reach the recipe that trained and was saved
    assert final["config"]["weight_decay"] == 1e-4 and "weight decay 0.0001" in out
    assert final["config"]["dropout"] == (0.2 if m == "resnet9" else 0.0)
    assert "optimizer" not in final                                          # weights for test/predict
    assert final["metrics"]["test_acc"] == pytest.approx(trained.acc, abs=5e-5)
    assert len(final["mean"]) == 3 and len(final["std"]) == 3
    assert np.allclose(final["mean"], (0.4914, 0.4822, 0.4465), atol=0.02)  # CIFAR-10's train stats
    assert len(final["classes"]) == 10 and len(final["history"]["train_loss"]) == 1
    assert final["recipe"] == m and final["data_source"].startswith("$CIFAR10_DIR")   # what an export keeps
    model, _ = load_model(trained.final)
    assert isinstance(model, ARCHS[m])

    last = load_checkpoint(trained.last)                                     # resumable training state
    assert last["epoch"] == 0 and "optimizer" in last and "rng" in last
    assert last["history"]["train_loss"] == final["history"]["train_loss"]

    record = json.loads((trained.dir / f"{m}_history.json").read_text())
    assert record["model"] == m and record["config"] == final["config"]
    assert record["history"]["eval_acc"] == final["history"]["eval_acc"]
    assert record["test"]["acc"] == final["metrics"]["test_acc"] and record["test"]["images"] == 500
    from helpers.hardware import get_device
    from helpers.runinfo import device_name

    assert record["device"] == device_name(get_device())           # helpers.runinfo's provenance
    assert {"python", "torch", "numpy", "albumentations"} <= set(record["versions"])
    assert {"commit", "dirty"} <= set(record["git"]) and record["torch_threads"] >= 1
    assert record["data"]["source"].startswith("$CIFAR10_DIR (image folder")
    assert record["data"]["train_images"] + record["data"]["validation_images"] == 1000
    assert record["wall_seconds"] > 0 and record["smoke"] is True and record["world_size"] == 1
    assert_png(trained.dir / f"{m}_curves.png")


def test_test_command_reports_overall_and_per_class_accuracy(trained, tmp_path, capsys, monkeypatch):
    from helpers.data import CLASSES

    proc = run_in_process(["test", "--model", trained.final, "--cm", "--out", tmp_path / "out", "--device", "cpu"],
                          capsys, monkeypatch)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    m = re.search(r"^test accuracy: (\d\.\d{4}) \((\d+)/500 correct\)", out, re.M)
    assert m, out
    acc, n_correct = float(m.group(1)), int(m.group(2))
    assert acc == pytest.approx(n_correct / 500, abs=5e-5)
    # the same 500 smoke test images with the checkpoint's mean/std: what training reported, up to
    # a few near ties of a 2-epoch model: training reads the test set under its bf16 autocast, the
    # test command in fp32 (the Muon recipe's smoke model: 236 of 500 under bf16, 238 in fp32, either
    # way round); a wrong mean/std or TTA moves it by far more
    assert abs(acc - trained.acc) <= 3 / 500 + 1e-4
    # and with the test-time augmentation its recipe tests with (the fast recipe: 6 views)
    tta = ", TTA: flip + 1 px shifts" if trained.model == "fast" else ""
    assert re.search(rf"^model: .*\({trained.model}, {trained.model} recipe\) on cpu{re.escape(tta)};", out, re.M), out
    if trained.model == "fast":
        assert "with TTA: flip + 1 px shifts" in trained.proc.stdout

    per_class = {c: re.search(rf"^{c} +50 +(\d+) +(\d\.\d{{4}})$", out, re.M) for c in CLASSES}
    assert all(per_class.values()), out
    assert sum(int(v.group(1)) for v in per_class.values()) == n_correct
    assert all(float(v.group(2)) == pytest.approx(int(v.group(1)) / 50, abs=5e-5) for v in per_class.values())

    rows = re.findall(r"^(plane|car|bird|cat|deer|dog|frog|horse|ship|truck)((?: +\d+){10})$", out, re.M)
    assert [r[0] for r in rows] == ["plane", "car", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    cm = np.array([[int(v) for v in r[1].split()] for r in rows])
    assert (cm.sum(1) == 50).all() and np.trace(cm) == n_correct
    assert [int(per_class[c].group(1)) for c in CLASSES] == list(np.diag(cm))

    for what, name in (("confusion matrix", "confusion"), ("predictions", "predictions")):
        path = Path(printed(rf"^saved {what}: (.+)$", out))
        assert path == tmp_path / "out" / f"{trained.model}_{name}.png"
        assert_png(path)


def test_test_tta_flag_overrides_the_recipes_test_time_augmentation(trained, small_data, tmp_path, capsys, monkeypatch):
    from helpers.analysis import predict
    from helpers.checkpoint import load_model

    if trained.model not in ("compact", "fast"):           # one recipe without TTA, one with
        pytest.skip("compact and fast cover both kinds of recipe")
    model, ckpt = load_model(trained.final)
    sub = small_data                                       # the smoke subset the CLI tests on
    for tta, label, keywords in (("flip", "flip", (True, 0)), ("none", None, (False, 0))):
        proc = run_in_process(["test", "--model", trained.final, "--tta", tta, "--grid", "0", "--out", tmp_path],
                              capsys, monkeypatch)
        assert proc.returncode == 0, proc.stderr[-3000:]
        head = proc.stdout.splitlines()[0]
        assert (f", TTA: {label};" in head) if label else ("TTA" not in head), head
        acc = float(printed(r"^test accuracy: (\d\.\d{4})", proc.stdout))
        want = predict(model, sub.test_images, sub.test_labels, stats=(ckpt["mean"], ckpt["std"]),
                       tta=dict(zip(("tta_flip", "tta_shift"), keywords))).accuracy
        assert acc == pytest.approx(want, abs=2 / 500)        # the same views, evaluated in-process


def _sample_images(tmp_path):
    """A real CIFAR-10 test JPEG, a 100x60 RGBA PNG and a 32x32 greyscale PNG."""
    from PIL import Image

    real = sorted((DATA / "test" / "cat").iterdir())[0]
    shutil.copy(real, tmp_path / "cat.jpg")
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (60, 100, 4), dtype=np.uint8), "RGBA").save(tmp_path / "wide.png")
    Image.fromarray(rng.integers(0, 256, (32, 32), dtype=np.uint8), "L").save(tmp_path / "grey.png")
    return [tmp_path / "cat.jpg", tmp_path / "wide.png", tmp_path / "grey.png"]


def _top_k(stdout: str, image) -> list[tuple[str, float]]:
    block = re.search(rf"^{re.escape(str(image))}\n((?:  \d\. .+\n?)+)", stdout, re.M)
    assert block, stdout
    lines = re.findall(r"^  (\d)\. (\w+) +(\d+\.\d)%$", block.group(1), re.M)
    return [(name, float(p) / 100) for _, name, p in lines]


def test_predict_prints_top3_for_images_of_any_size(trained, tmp_path, capsys, monkeypatch):
    import torch

    from helpers.augment import test_transforms
    from helpers.checkpoint import load_model
    from helpers.data import CLASSES

    images = _sample_images(tmp_path)
    monkeypatch.setenv("SMOKE_TEST", "maybe")            # predict has no smoke mode: not read
    proc = run_in_process(["predict", "--model", trained.final, *images, "--plot", tmp_path / "probs.png"],
                          capsys, monkeypatch)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"model: {trained.final} ({trained.model})" in proc.stdout
    for image in images:
        top = _top_k(proc.stdout, image)
        assert len(top) == 3 and len({c for c, _ in top}) == 3 and all(c in CLASSES for c, _ in top)
        probs = [p for _, p in top]
        assert probs == sorted(probs, reverse=True) and sum(probs) <= 1.0 + 2e-3
    assert "wide.png: converted RGBA to RGB" in proc.stderr
    assert "wide.png: resized 100x60 to 32x32" in proc.stderr
    assert "grey.png: converted greyscale (L) to RGB" in proc.stderr
    assert "cat.jpg" not in proc.stderr                  # a 32x32 RGB image needs no notice
    assert Path(printed(r"^saved plot: (.+)$", proc.stdout)) == tmp_path / "probs.png"
    assert_png(tmp_path / "probs.png")

    # the printed probabilities are the model's, on the image normalised with the checkpoint's stats,
    # averaged over the test-time augmentation its recipe tests with (the fast net's six views)
    from PIL import Image

    from helpers import loop
    from helpers.checkpoint import inference_settings

    model, ckpt = load_model(trained.final)
    x = test_transforms(ckpt["mean"], ckpt["std"])(image=np.asarray(Image.open(images[0])))["image"]
    tta = inference_settings(ckpt)[0]
    with torch.no_grad():
        views = torch.stack([model(v) for v in loop.tta_views(x[None], tta["tta_flip"], tta["tta_shift"])])
        p = loop.weigh_views(views, **tta).softmax(1)[0].numpy()
    expected = [(CLASSES[i], float(p[i])) for i in np.argsort(-p)[:3]]
    got = _top_k(proc.stdout, images[0])
    assert [c for c, _ in got] == [c for c, _ in expected]
    assert np.allclose([q for _, q in got], [q for _, q in expected], atol=1.5e-3)

    if trained.model == "resnet9":
        # with no --model: the newer of ./models/resnet9.pt and the shipped model
        from helpers.config import SHIPPED_MODEL

        (tmp_path / "models").mkdir()
        shutil.copy(trained.final, tmp_path / "models" / "resnet9.pt")
        proc = run_in_process(["predict", images[0]], capsys, monkeypatch, cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr[-2000:]
        expected_model = "models/resnet9.pt"
        if SHIPPED_MODEL.is_file() and SHIPPED_MODEL.stat().st_mtime > (tmp_path / "models" / "resnet9.pt").stat().st_mtime:
            expected_model = str(SHIPPED_MODEL)
        assert f"model: {expected_model} (resnet9)" in proc.stdout


@needs_data
def test_dry_run_trains_one_epoch_and_saves_nothing(tmp_path):
    proc = cli("train", "--arch", "compact", "--dry-run", "--workers", "0", "--checkpoints", tmp_path / "ck",
               env={"SMOKE_TEST": "0"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "[smoke] [dry run]" in proc.stdout and "1 epoch," in proc.stdout
    assert re.search(r"^epoch +1/1 ", proc.stdout, re.M) and "test accuracy:" in proc.stdout
    assert "dry run: nothing saved" in proc.stdout
    assert not (tmp_path / "ck").exists()


@pytest.mark.parametrize("model", ["resnet9", "compact", "vgg"])
def test_speed_flags_left_out_are_what_auto_options_picks_for_the_device(model):
    """The CLI, like the notebooks, runs bf16 where the device has fast bf16, channels_last on a CPU
    in either precision, and the on-device augmentation where the recipe's augmentation has that twin (not seed 004's)."""
    import torch

    from helpers.cli import build_parser, speed_options
    from helpers.config import recipe
    from helpers import hardware
    from helpers.hardware import auto_options

    auto, r = auto_options("cpu"), recipe(model)
    opts = speed_options(build_parser().parse_args(["train", "--arch", model]), r, torch.device("cpu"))
    twin = r.augment != "flip-shift-rotate"
    assert (opts.amp, opts.channels_last) == (auto.amp, auto.channels_last)
    assert opts.fast_augment is twin and opts.workers == (0 if twin else 2)
    assert opts.channels_last and opts.reasons["amp"].startswith("bf16 + channels_last" if auto.amp else "fp32: this CPU")
    assert ("flip-shift-rotate has no on-device twin" in opts.reasons["fast_augment"]) is (not twin)
    # a flag given wins, and the reason says so
    given = build_parser().parse_args(["train", "--arch", model, "--amp", "off", "--no-channels-last",
                                       "--no-fast-augment", "--workers", "1"])
    opts = speed_options(given, r, torch.device("cpu"))
    assert (opts.amp, opts.channels_last, opts.fast_augment, opts.workers) == (None, False, False, 1)
    assert opts.reasons == {"amp": "fp32: --amp off", "channels_last": "channels_last off: --no-channels-last",
                            "fast_augment": "on-device augmentation off: --no-fast-augment"}
    # one flag alone: its reason says so, the others keep their auto reasons
    opts = speed_options(build_parser().parse_args(["train", "--arch", model, "--no-channels-last"]), r,
                         torch.device("cpu"))
    assert (opts.amp, opts.channels_last) == (auto.amp, False)
    assert opts.reasons["channels_last"] == "channels_last off: --no-channels-last"
    opts = speed_options(build_parser().parse_args(["train", "--arch", model, "--no-fast-augment"]), r,
                         torch.device("cpu"))
    assert not opts.fast_augment and opts.workers == 2 and opts.reasons["fast_augment"] == "on-device augmentation off: --no-fast-augment"
    # --amp alone: on a CPU channels_last stays on (NHWC pays in fp32 there too), for the auto reason
    opts = speed_options(build_parser().parse_args(["train", "--arch", model, "--amp", "off"]), r, torch.device("cpu"))
    assert (opts.amp, opts.channels_last) == (None, True)
    assert (opts.reasons["amp"], opts.reasons["channels_last"]) == ("fp32: --amp off", hardware.CPU_NHWC)


def test_a_resumed_run_keeps_the_speed_settings_its_checkpoint_records():
    import torch

    from helpers.cli import build_parser, speed_options
    from helpers.config import recipe
    from helpers.errors import ConfigError

    saved = {"amp": None, "channels_last": False, "fast_augment": False, "workers": 2}   # e.g. an fp32 run
    argv = ["train", "--arch", "resnet9", "--resume", "resnet9_last.pt"]
    opts = speed_options(build_parser().parse_args(argv), recipe("resnet9"), torch.device("cpu"), {"options": saved})
    assert opts.recorded() == saved and opts.reasons == {"resume": "as the run being resumed (its checkpoint records them)"}
    same = build_parser().parse_args(argv + ["--amp", "off", "--workers", "2"])         # flags that agree: fine
    assert speed_options(same, recipe("resnet9"), torch.device("cpu"), {"options": saved}).recorded() == saved
    with pytest.raises(ConfigError, match=r"^cannot resume with other speed settings than the checkpoint's "
                                          r"\(amp None -> 'bf16'; workers 2 -> 0\): drop those flags"):
        speed_options(build_parser().parse_args(argv + ["--amp", "bf16", "--workers", "0"]), recipe("resnet9"),
                      torch.device("cpu"), {"options": saved})
    # a checkpoint from before the settings were recorded: auto, with a note
    opts = speed_options(build_parser().parse_args(argv), recipe("resnet9"), torch.device("cpu"), {"epoch": 3})
    assert opts.reasons["resume"].startswith("note: the checkpoint predates recorded speed settings")
    # an fp16 run (a T4's) resumed on a CPU: refused, as a new fp16 run there is
    with pytest.raises(ConfigError, match="fp16 on a CPU is emulated"):
        speed_options(build_parser().parse_args(argv), recipe("resnet9"), torch.device("cpu"),
                      {"options": dict(saved, amp="fp16")})


@needs_data
def test_smoke_run_saves_under_artifacts_smoke_not_over_a_full_runs_model(tmp_path):
    proc = cli("train", "--arch", "compact", "--dry-run", "--serialize", "--device", "cpu", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert re.search(r"^device cpu: (bf16|fp32), channels_last (on|off), on-device augmentation off$",
                     proc.stdout, re.M), proc.stdout[:2000]
    assert "  - loader augmentation: flip-shift-rotate has no on-device twin" in proc.stdout
    assert sorted(os.listdir(tmp_path / "artifacts" / "smoke")) == sorted(
        ["compact.pt", "compact_last.pt", "compact_history.json", "compact_curves.png"])
    assert not (tmp_path / "models").exists()
    record = json.loads((tmp_path / "artifacts" / "smoke" / "compact_history.json").read_text())
    assert record["workers"] == 2 and record["fast_augment"] is False and record["amp"] in ("bf16", None)


def _write_tree(root: Path, per_class: int, value: int) -> Path:
    from PIL import Image

    from helpers.data import CLASSES

    for split in ("train", "test"):
        for c in CLASSES:
            (root / split / c).mkdir(parents=True)
            for i in range(per_class):
                Image.fromarray(np.full((32, 32, 3), value, np.uint8)).save(root / split / c / f"{i}.png")
    return root


def test_train_and_test_splits_can_come_from_two_folders(tmp_path, monkeypatch):
    """--train_path A --test_path B: the training split of A, the test split of B."""
    from helpers.cli import load_data

    monkeypatch.setenv("CIFAR10_CACHE", str(tmp_path / "cache"))
    a, b = _write_tree(tmp_path / "a", 2, 10), _write_tree(tmp_path / "b", 3, 200)
    data = load_data(a, b)
    assert len(data.train_labels) == 20 and (data.train_images == 10).all()
    assert len(data.test_labels) == 30 and (data.test_images == 200).all()
    assert data.source == "train: .../a (image folder); test: .../b (image folder)"   # no machine path
    same = load_data(a, tmp_path / "a" / ".." / "a")                  # one folder: loaded once
    assert len(same.test_labels) == 20 and same.source == ".../a (image folder)"
    only_test = load_data(None, b)                                    # both splits from the one given
    assert len(only_test.train_labels) == len(only_test.test_labels) == 30


# ----------------------------------------------------------------------------------------
# --help: every flag, with its default
# ----------------------------------------------------------------------------------------
def _help_entries(text: str) -> dict[str, str]:
    """Option string -> its whole help entry, from argparse's --help output."""
    entries, current = {}, None
    for line in text.splitlines():
        m = re.match(r"^  (-\S.*?)(?:  +(.*))?$", line)
        if m:
            current = [m.group(2) or ""]
            for opt in re.findall(r"(--?[\w-]+)", m.group(1)):
                entries[opt] = current
        elif current is not None and line.startswith("    "):
            current.append(line.strip())
        else:
            current = None
    return {k: " ".join(v) for k, v in entries.items()}


def test_train_takes_the_architecture_as_arch_and_still_as_model():
    """--model names a checkpoint file in test and predict (seed 003's flag); train calls the
    architecture --arch, and still accepts the old --model, unlisted."""
    from helpers.cli import build_parser

    parse = build_parser().parse_args
    assert parse(["train"]).arch == "resnet9"
    assert parse(["train", "--arch", "vgg"]).arch == parse(["train", "--model", "vgg"]).arch == "vgg"
    assert "--model" not in cli("train", "--help").stdout


@pytest.mark.parametrize("command", ["train", "test", "predict"])
def test_help_shows_every_flag_with_its_default(command):
    from helpers.cli import build_parser

    proc = cli(command, "--help")
    assert proc.returncode == 0 and proc.stderr == ""
    entries = _help_entries(proc.stdout)
    sub = next(a for a in build_parser()._actions if a.dest == "command").choices[command]
    flags = [a for a in sub._actions if a.option_strings and a.dest != "help" and a.help != argparse.SUPPRESS]
    assert len(flags) >= (20 if command == "train" else 5)
    for action in flags:
        for opt in action.option_strings:
            assert opt in entries, f"{opt} missing from `{command} --help`"
        assert re.search(r"\((?:[^()]|\([^()]*\))*(default|required)", entries[action.option_strings[0]]), \
            f"{action.option_strings[0]} states no default: {entries[action.option_strings[0]]!r}"
    # the VGG exercise's flags and aliases, and the course's own
    flags_named = {"train": ["--epochs", "--e", "--verbose", "--v", "--train_path", "--test_path", "--checkpoints",
                         "--train_batch", "--test_batch", "--learning_rate", "--lr", "--momentum", "--m",
                         "--serialize", "--s", "--smoke", "--seed", "--device", "--workers", "--resume",
                         "--fast-augment", "--amp", "--channels-last", "--compile", "--dry-run", "--arch",
                         "--recipe"],
               "test": ["--model", "--test_path", "--tp", "--batch", "--confusion", "--cm", "--out"],
               "predict": ["--model", "--plot", "--top"]}[command]
    assert set(flags_named) <= set(entries)
    if command == "train":
        # the recipe flags come from helpers.config.Recipe, each with every recipe's default
        assert {"--peak-epoch", "--patience", "--dropout", "--weight-decay", "--weight_decay"} <= set(entries)
        assert "(default: the recipe's: resnet9 24, resnet9-tuned 24, vgg 15, compact 200, fast 10)" in entries["--epochs"]
        assert "resnet9 0.1, resnet9-tuned 0," in entries["--dropout"]
        assert "resnet9-tuned 0.0005" in entries["--weight-decay"]
        assert "(default: ./models/; smoke runs: ./artifacts/smoke/" in entries["--checkpoints"]
        assert "(default: auto)" in entries["--amp"] and "auto: bf16 on Ampere+ GPUs" in entries["--amp"]
        assert "effective batch is N x --train_batch" in proc.stdout
    if command == "test":
        assert "(default: 256" in entries["--batch"]


# ----------------------------------------------------------------------------------------
# errors: one line, the right exit status, no traceback
# ----------------------------------------------------------------------------------------
def _error_cases(tmp: Path) -> dict[str, tuple[tuple, dict, int, str]]:
    """name -> (argv, subprocess options, exit status, pattern of the error line)."""
    import torch

    from helpers.checkpoint import save_checkpoint
    from helpers.config import recipe
    from helpers.models import get_model

    r = recipe("compact", smoke=True)
    model = get_model("compact")
    opt = torch.optim.NAdam(model.parameters(), lr=r.lr)
    train_state = save_checkpoint(tmp / "compact_last.pt", model, "compact", optimizer=opt.state_dict(),
                                  scheduler=None, epoch=0, history={}, config=r.to_dict())
    weights = save_checkpoint(tmp / "compact.pt", model, "compact", config=r.to_dict(),
                              mean=[0.49, 0.48, 0.45], std=[0.25, 0.24, 0.26])
    (tmp / "trunc.pt").write_bytes(weights.read_bytes()[:2000])
    (tmp / "notes.txt").write_text("not an image\n")
    from PIL import Image

    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(tmp / "img.png")
    (tmp / "file.txt").write_text("a file, so nothing can be created below it\n")
    (tmp / "empty").mkdir()
    (tmp / "cwd").mkdir()
    nope = tmp / "nope"
    cases = {
        # usage errors: exit 2
        "unknown model": (("train", "--arch", "alexnet"), {}, 2, r"^error: argument --arch: invalid choice: 'alexnet'"),
        "zero epochs": (("train", "--epochs", "0"), {}, 2,
                        r"^error: argument --epochs/--e: must be a positive whole number, got 0"),
        "negative epochs alias": (("train", "--e", "-3"), {}, 2, r"argument --epochs/--e: must be a positive whole number, got -3"),
        "negative batch": (("train", "--train_batch", "-1"), {}, 2,
                           r"^error: argument --train_batch: must be a positive whole number, got -1"),
        "zero test batch": (("test", "--model", weights, "--batch", "0"), {}, 2, r"argument --batch/--test_batch: must be a positive"),
        "zero lr": (("train", "--lr", "0"), {}, 2, r"^error: argument --learning_rate/--lr: must be a positive number, got 0"),
        "negative lr": (("train", "--learning_rate", "-1e-3"), {}, 2, r"--learning_rate/--lr: must be a positive number"),
        "lr not a number": (("train", "--lr", "fast"), {}, 2, r"--learning_rate/--lr: must be a number, got 'fast'"),
        "momentum out of range": (("train", "--m", "1.5"), {}, 2, r"--momentum/--m: must be in \[0, 1\)"),
        "no command": ((), {}, 2, r"^error: the following arguments are required: COMMAND"),
        "no images": (("predict",), {}, 2, r"^error: the following arguments are required: IMAGE"),
        "peak beyond epochs": (("train", "--arch", "resnet9", "--epochs", "2", "--peak-epoch", "3"), {}, 2,
                               r"^error: peak epoch 3 is outside 1..2: choose a peak epoch no later than the last"),
        "recipe peak beyond epochs": (("train", "--arch", "resnet9", "--no-smoke", "--epochs", "3"), {}, 2,
                                      r"^error: peak epoch 5 is outside 1..3"),
        "dropout out of range": (("train", "--dropout", "1.5"), {}, 2, r"^error: dropout must be in \[0, 1\), got 1.5"),
        "dropout on vgg": (("train", "--arch", "vgg", "--dropout", "0.2"), {}, 2,
                           r"^error: dropout is an option of resnet9 only"),
        "negative weight decay": (("train", "--weight-decay", "-1e-3"), {}, 2,
                                  r"^error: weight decay must be >= 0, got -0.001"),
        "weight decay not a number": (("train", "--weight_decay", "lots"), {}, 2,
                                      r"^error: argument --weight-decay/--weight_decay: must be a number, got 'lots'"),
        "peak epoch on a constant LR": (("train", "--arch", "vgg", "--peak-epoch", "2"), {}, 2,
                                        r"--peak-epoch shapes the OneCycle schedule, but the vgg recipe"),
        "tuned recipe for vgg": (("train", "--arch", "vgg", "--recipe", "tuned"), {}, 2, r"--recipe tuned is a resnet9 recipe"),
        "unknown device": (("train", "--device", "tpu"), {}, 2, r"^error: unknown device 'tpu'"),
        "fast augment on flip-shift-rotate": (("train", "--arch", "compact", "--fast-augment", "--checkpoints", tmp / "ck9"), {}, 2,
                                    r"not 'flip-shift-rotate': drop --fast-augment"),
        "resume with other settings": (("train", "--arch", "compact", "--resume", train_state, "--lr", "0.1",
                                        "--checkpoints", tmp / "ck1"), {}, 2,
                                       r"cannot resume .*compact_last.pt with other settings \(lr 0.0025 -> 0.1\)"),
        # other problems: exit 1
        "wrong train path": (("train", "--train_path", nope, "--checkpoints", tmp / "ck2"), {}, 1,
                             rf"^error: --train_path {re.escape(str(nope))} does not exist: .*add --download"),
        "wrong test path": (("train", "--test_path", nope, "--checkpoints", tmp / "ck3"), {}, 1,
                            r"^error: --test_path .*nope does not exist"),
        "empty data folder": (("train", "--train_path", tmp / "empty", "--checkpoints", tmp / "ck4"), {}, 1,
                              r"^error: dataset folder .*empty holds neither .* or add --download$"),
        "wrong CIFAR10_DIR": (("train", "--checkpoints", tmp / "ck5"), {"env": {"CIFAR10_DIR": str(nope)}}, 1,
                              r"^error: CIFAR10_DIR=.*nope does not exist"),
        "wrong test --tp": (("test", "--model", weights, "--tp", nope), {}, 1, r"^error: --test_path .*nope does not exist"),
        "resume other arch": (("train", "--arch", "resnet9", "--resume", train_state, "--checkpoints", tmp / "ck6"), {}, 1,
                              r"^error: cannot resume .*compact_last.pt: it holds a compact model, not resnet9; add --arch compact"),
        "resume final weights": (("train", "--arch", "compact", "--resume", weights, "--checkpoints", tmp / "ck7"), {}, 1,
                                 r"holds final weights only, not a training state"),
        "resume missing": (("train", "--arch", "compact", "--resume", tmp / "missing.pt", "--checkpoints", tmp / "ck8"), {}, 1,
                           r"^error: checkpoint .*missing.pt does not exist"),
        "truncated checkpoint (test)": (("test", "--model", tmp / "trunc.pt"), {}, 1,
                                        r"^error: checkpoint .*trunc.pt is truncated or not a PyTorch file"),
        "truncated checkpoint (predict)": (("predict", "--model", tmp / "trunc.pt", tmp / "img.png"), {}, 1,
                                           r"trunc.pt is truncated or not a PyTorch file"),
        "missing checkpoint": (("test", "--model", tmp / "missing.pt"), {}, 1, r"^error: checkpoint .*missing.pt does not exist"),
        "non-image file": (("predict", "--model", weights, tmp / "img.png", tmp / "notes.txt"), {}, 1,
                           r"^error: .*notes.txt is not a readable image"),
        "missing image": (("predict", "--model", weights, tmp / "gone.png"), {}, 1, r"^error: .*gone.png does not exist"),
        "unwritable checkpoints": (("train", "--checkpoints", tmp / "file.txt" / "sub"), {}, 1,
                                   r"^error: cannot write to .*file.txt/sub \(.+\): choose a writable folder with --checkpoints$"),
        "unwritable test --out": (("test", "--model", weights, "--out", tmp / "file.txt" / "sub"), {}, 1,
                                  r"cannot write to .*file.txt/sub .*with --out$"),
        "unwritable predict --plot": (("predict", "--model", weights, tmp / "img.png", "--plot", tmp / "file.txt" / "p.png"), {}, 1,
                                      r"cannot write to .*file.txt \(.+\): choose a writable folder with --plot$"),
    }
    cases["no default model"] = (("predict", tmp / "img.png"), {"cwd": tmp / "cwd", "shipped": tmp / "none.pt"}, 1,
                                 r"^error: no trained model: none of .*pass --model PATH")
    if os.geteuid() != 0:                         # root ignores permissions
        (tmp / "readonly").mkdir()
        (tmp / "readonly").chmod(0o555)
        cases["read-only checkpoints"] = (("train", "--checkpoints", tmp / "readonly" / "models"), {}, 1,
                                          r"^error: cannot write to .*readonly/models")
    return cases


@pytest.fixture(scope="module")
def error_cases(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cli-errors")
    yield _error_cases(tmp)
    if (tmp / "readonly").exists():
        (tmp / "readonly").chmod(0o755)


ERROR_NAMES = ["unknown model", "zero epochs", "negative epochs alias", "negative batch", "zero test batch", "zero lr",
               "negative lr", "lr not a number", "momentum out of range", "no command", "no images",
               "peak beyond epochs", "recipe peak beyond epochs", "dropout out of range", "dropout on vgg",
               "negative weight decay", "weight decay not a number", "peak epoch on a constant LR", "tuned recipe for vgg", "unknown device",
               "fast augment on flip-shift-rotate", "resume with other settings", "wrong train path", "wrong test path",
               "empty data folder", "wrong CIFAR10_DIR", "wrong test --tp", "resume other arch", "resume final weights",
               "resume missing", "truncated checkpoint (test)", "truncated checkpoint (predict)", "missing checkpoint",
               "non-image file", "missing image", "unwritable checkpoints", "unwritable test --out",
               "unwritable predict --plot", "no default model", "read-only checkpoints"]
# These also run as real processes (in parallel), to check what a shell sees: the exit status,
# stderr holding nothing but the error line, and no traceback.
IN_SUBPROCESS = ["unknown model", "zero epochs", "negative lr", "peak beyond epochs", "dropout out of range", "wrong train path",
                 "wrong CIFAR10_DIR", "resume other arch", "truncated checkpoint (test)", "non-image file",
                 "unwritable checkpoints"]


class _Proc:
    def __init__(self, returncode, stdout, stderr):
        self.returncode, self.stdout, self.stderr = returncode, stdout, stderr


def run_in_process(argv, capsys, monkeypatch, env=None, cwd=None, shipped=None) -> _Proc:
    """helpers.cli.main(argv) in this process, with the environment the subprocesses get;
    `shipped` stands in for the shipped model's path (a missing file: no shipped model)."""
    from helpers import config
    from helpers.cli import main

    if shipped is not None:
        monkeypatch.setattr(config, "SHIPPED_MODEL", Path(shipped))

    monkeypatch.setenv("SMOKE_TEST", "1")
    monkeypatch.setenv("CIFAR10_DIR", str(DATA))
    for key, value in (env or {}).items():
        monkeypatch.setenv(key, value)
    if cwd is not None:
        monkeypatch.chdir(cwd)
    capsys.readouterr()
    try:
        status = main([str(a) for a in argv])
    except SystemExit as e:                 # argparse's usage errors
        status = e.code
    out, err = capsys.readouterr()
    return _Proc(status, out, err)


@pytest.mark.parametrize("name", ERROR_NAMES)
def test_errors_are_one_line_without_traceback(error_cases, name, capsys, monkeypatch):
    if name not in error_cases:
        pytest.skip("running as root ignores permissions")
    argv, opts, status, pattern = error_cases[name]
    assert_fails(run_in_process(argv, capsys, monkeypatch, **opts), status, pattern)


def test_errors_in_real_processes(error_cases):
    names = [n for n in IN_SUBPROCESS if n in error_cases]
    with ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 2)) as pool:
        runs = {n: pool.submit(cli, *error_cases[n][0], **error_cases[n][1]) for n in names}
        for name, future in runs.items():
            proc = future.result()
            line = assert_fails(proc, error_cases[name][2], error_cases[name][3])
            assert proc.stderr == line + "\n" and proc.stdout == "", name    # nothing else on stderr


def test_verbose_adds_the_traceback(tmp_path):
    proc = cli("test", "--model", tmp_path / "missing.pt", "--verbose")
    assert proc.returncode == 1
    assert "Traceback" in proc.stderr and "CheckpointError" in proc.stderr
    assert proc.stderr.rstrip().splitlines()[-1].startswith("error: checkpoint ")


def test_a_finished_cli_run_is_recorded_in_results(trained, tmp_path):
    """results/reference_runs.py --record turns train's <model>_history.json into a results
    row and a markdown table (what results/README.md is made from)."""
    from helpers.hardware import get_device
    from helpers.runinfo import device_name

    out = tmp_path / "runs.jsonl"
    proc = subprocess.run([sys.executable, str(REPO / "results" / "reference_runs.py"), "--record",
                           str(trained.dir / f"{trained.model}_history.json"), "--out", str(out)],
                          cwd=REPO, env=smoke_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    row = json.loads(out.read_text().splitlines()[0])
    assert row["test_acc"] == pytest.approx(trained.acc, abs=5e-5) and row["epochs_run"] == 1
    assert row["settings"]["recipe"] == trained.model and row["settings"]["smoke"] is True
    assert row["train_images"] in (1000, 900) and row["images_per_s"] == pytest.approx(
        row["train_images"] / row["wall_seconds"])
    assert row["device"] == device_name(get_device()) and row["versions"]["torch"] and "commit" in row["git"]
    # the command without the machine's paths: train ran with --checkpoints <absolute tmp dir>/models
    assert str(trained.root) not in row["command"] and row["command"].endswith("--checkpoints .../models")
    table = out.with_suffix(".md").read_text()
    assert f"| {row['config']}" in table and f"{100 * row['test_acc']:.2f}" in table


def test_a_cli_run_resumed_with_resume_is_recorded_without_a_wall_time(trained, tmp_path):
    """A run continued with --resume in a later session: its process saw only the last epochs,
    so the row has no wall time and takes images/s from the median epoch."""
    rec = json.loads((trained.dir / f"{trained.model}_history.json").read_text())
    rec.update(resumed_from=str(trained.dir / f"{trained.model}_last.pt"), wall_seconds=1.0)
    rec["history"]["seconds"] = [40.0, 3000.0, 50.0]        # the middle epoch was cut by a session's end
    for key in ("train_loss", "train_acc", "eval_loss", "eval_acc"):
        rec["history"][key] = rec["history"][key] * 3
    rec["history"]["best_epoch"] = 1                         # early stopping kept the second epoch
    path = tmp_path / "compact_history.json"
    path.write_text(json.dumps(rec))
    out = tmp_path / "runs.jsonl"
    proc = subprocess.run([sys.executable, str(REPO / "results" / "reference_runs.py"), "--record", str(path),
                           "--out", str(out)], cwd=REPO, env=smoke_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    row = json.loads(out.read_text().splitlines()[0])
    assert row["wall_seconds"] is None and row["epochs_run"] == 3 and row["epoch_seconds_median"] == 50.0
    assert row["best_epoch"] == 2                            # counted from 1, as the log prints it
    assert row["images_per_s"] == pytest.approx(row["train_images"] / 50.0)
    assert "Wall seconds `-`: a run resumed across sessions" in out.with_suffix(".md").read_text()


def test_public_command_keeps_no_path_of_the_machine():
    from helpers.config import REPO_ROOT
    from helpers.runinfo import public_command, public_path

    argv = ["python", "-m", "helpers", "train", "--checkpoints", "/scratch/me/runs/compact", "--lr", "-1e-3",
            f"--out={REPO_ROOT / 'results' / 'x.json'}", "models/resnet9.pt", str(REPO_ROOT / "models")]
    assert public_command(argv) == ("python -m helpers train --checkpoints .../compact --lr -1e-3 "
                                    "--out=results/x.json models/resnet9.pt models")
    # a home folder, a climb out of the repository, a Windows drive; an argument with a space stays one
    assert public_command(["--train_path", "~/data/cifar10", "../../shared/cifar10-jpg", "C:\\data\\cifar",
                           "/home/me/my data"]) == "--train_path .../cifar10 .../cifar10-jpg .../cifar '.../my data'"
    assert public_path("data") == "data" and public_path(REPO_ROOT / "notebooks" / "..") == "."


def test_a_run_resumed_across_sessions_is_tabled_without_a_wall_time(tmp_path):
    """Notebook 04's full run has no single wall time: its row shows '-' and says why."""
    sys.path.insert(0, str(REPO / "results"))
    import reference_runs

    row = json.loads((REPO / "results" / "reference_runs.jsonl").read_text().splitlines()[0])
    row.update(config="resnet9-fast (notebook 04)", wall_seconds=None, images_per_s=123.0, test_acc=0.8982)
    path = tmp_path / "runs.jsonl"
    path.write_text(json.dumps(row) + "\n")
    text = reference_runs.readme_text(path)
    line = next(x for x in text.splitlines() if x.startswith("| resnet9-fast (notebook 04)"))
    cells = [c.strip() for c in line.strip("|").split("|")]
    assert cells[3:6] == ["89.82", "-", "123"]
    assert "Wall seconds `-`: a run resumed across sessions" in text


def test_notebook_04s_full_run_is_recorded_in_results(tmp_path):
    """results/reference_runs.py --record-notebook turns notebook 04's saved model (and the speed
    settings in the training checkpoint beside it) into a results row: no single wall time (the
    run spans sessions), images/s from the median epoch, the device the epochs were timed on."""
    from helpers.checkpoint import save_checkpoint
    from helpers.config import recipe

    r = recipe("resnet9")
    history = {"train_loss": [1.0, 0.5, 0.4], "train_acc": [0.6, 0.8, 0.9], "eval_loss": [1.1, 0.7, 0.6],
               "eval_acc": [0.6, 0.75, 0.8], "lr": [1e-3] * 3, "seconds": [500.0, 9000.0, 400.0]}
    saved = save_checkpoint(tmp_path / "resnet9_cifar10.pt", {}, "resnet9", history=history, config=r.to_dict(),
                            metrics={"test_acc": 0.8, "test_loss": 0.6}, data_source="$CIFAR10_DIR (image folder)",
                            device="AMD EPYC (CPU, 2 cores, emulated bf16)", smoke=False, torch_threads=2,
                            versions={"torch": "2.99.0"}, git={"commit": "abc1234", "dirty": False},
                            date="2026-12-24T10:00:00+00:00")
    save_checkpoint(tmp_path / "resnet9_last.pt", {}, "resnet9", optimizer={}, epoch=2, history=history,
                    options={"amp": None, "channels_last": True, "fast_augment": True, "workers": 0})
    out = tmp_path / "runs.jsonl"
    proc = subprocess.run([sys.executable, str(REPO / "results" / "reference_runs.py"), "--record-notebook", str(saved),
                           "--out", str(out)], cwd=REPO, env=smoke_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    row = json.loads(out.read_text().splitlines()[0])
    assert row["config"] == "resnet9 (fp32, channels_last, fast_augment) (notebook 04)" and row["wall_seconds"] is None
    assert row["epoch_seconds_median"] == 500.0 and row["images_per_s"] == 50_000 / 500.0    # the paused epoch ignored
    assert (row["test_acc"], row["epochs_run"], row["device"]) == (0.8, 3, "AMD EPYC (CPU, 2 cores, emulated bf16)")
    assert row["settings"]["amp"] is None and row["recipe"]["lr"] == r.lr
    assert (row["git"]["commit"], row["versions"], row["date"]) == ("abc1234", {"torch": "2.99.0"}, "2026-12-24T10:00:00+00:00")
    smoke = save_checkpoint(tmp_path / "smoke" / "resnet9_cifar10.pt", {}, "resnet9", history=history, smoke=True,
                            metrics={"test_acc": 0.2, "test_loss": 2.0})
    proc = subprocess.run([sys.executable, str(REPO / "results" / "reference_runs.py"), "--record-notebook", str(smoke),
                           "--out", str(out)], cwd=REPO, env=smoke_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "not a full run's saved model" in proc.stderr and len(out.read_text().splitlines()) == 1
    alone = tmp_path / "alone" / "resnet9_cifar10.pt"          # no training checkpoint beside it: no speed settings
    alone.parent.mkdir()
    alone.write_bytes(saved.read_bytes())
    proc = subprocess.run([sys.executable, str(REPO / "results" / "reference_runs.py"), "--record-notebook", str(alone),
                           "--out", str(out)], cwd=REPO, env=smoke_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "resnet9_last.pt (the run's training checkpoint" in proc.stderr


def test_the_reference_recipe_is_the_default_and_keeps_its_former_name():
    """--recipe reference (the default) or tuned; 'seed', its name before 'seed' meant only an RNG
    seed, still parses as reference."""
    from helpers.cli import build_parser

    parse = build_parser().parse_args
    assert parse(["train"]).recipe == parse(["train", "--recipe", "seed"]).recipe == "reference"
    assert parse(["train", "--recipe", "tuned"]).recipe == "tuned"
