"""Faults a user can meet end in one clear line, with nothing half-written and nothing lost:
file-system faults while listing, reading and writing; kills at any moment (the fault-injection
test); absurd but finite settings; environment values that mean nothing; misleading messages."""
from __future__ import annotations

import math
import os
import random
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from conftest import REPO, smoke_env, write_image_tree
from helpers import config, engine, hardware, loop, optim
from helpers.checkpoint import load_checkpoint, save_checkpoint
from helpers.data import load_cifar10
from helpers.images import read_image
from helpers.errors import CheckpointError, ConfigError, DatasetError, DivergenceError, ImageError
from helpers.models import get_model


# ----------------------------------------------------------------------------------------
# File-system faults: listing, reading, writing
# ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("target", ["itself", "nothing"])
def test_a_bad_link_in_the_image_tree_names_the_entry(tmp_path, target):
    root = write_image_tree(tmp_path / "tree", per_class=1)
    link = root / "train" / "cat" / "link.jpg"
    link.symlink_to(link if target == "itself" else root / "gone.jpg")
    with pytest.raises(DatasetError, match="link.jpg") as info:
        load_cifar10(root, download=False, cache=False)
    assert "\n" not in str(info.value) and "link" in str(info.value)


def test_an_unreadable_image_is_a_permission_problem_not_a_corrupt_one(tmp_path, monkeypatch):
    """The tests may run as root, which ignores file modes: the refusal is injected where PIL
    opens the file, as the operating system raises it."""
    from PIL import Image

    root = write_image_tree(tmp_path / "tree", per_class=1)
    def refuse(path, *a, **k):
        raise PermissionError(13, "Permission denied", str(path))
    monkeypatch.setattr(Image, "open", refuse)
    with pytest.raises(DatasetError) as info:
        load_cifar10(root, download=False, cache=False)
    assert "Permission denied" in str(info.value) and "corrupt" not in str(info.value)
    with pytest.raises(ImageError, match="permissions"):
        read_image(next((root / "test" / "cat").iterdir()))


def test_a_failing_torch_save_leaves_the_old_checkpoint_and_no_debris(tmp_path, monkeypatch):
    """torch's writer reports a full disk as a RuntimeError, after writing part of the file."""
    path = tmp_path / "compact_last.pt"
    model = get_model("compact")
    save_checkpoint(path, model, "compact", epoch=0)
    before = path.read_bytes()

    def full_disk(obj, f, *a, **k):
        f.write(b"x" * 1000)
        raise RuntimeError("[enforce fail at inline_container.cc:664] . PytorchStreamWriter failed writing file")
    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(CheckpointError, match="free disk space") as info:
        save_checkpoint(path, model, "compact", epoch=1)
    assert "\n" not in str(info.value)
    assert path.read_bytes() == before and os.listdir(tmp_path) == [path.name]


def test_stale_temporary_files_are_removed_by_the_next_save(tmp_path):
    import fcntl

    path = tmp_path / "compact_last.pt"
    stale = tmp_path / ".compact_last.pt.k9x2_a7q.tmp"       # what a SIGKILL mid-write leaves
    stale.write_bytes(b"half a checkpoint")
    others = [tmp_path / ".other.pt.k9x2_a7q.tmp",            # another file's: not ours to remove
              tmp_path / ".compact_last.pt.json.k9x2_a7q.tmp"]
    live = tmp_path / ".compact_last.pt.livewrit.tmp"         # a writer still at work holds its lock
    for p in [*others, live]:
        p.write_bytes(b"")
    with open(live, "rb") as held:
        fcntl.flock(held.fileno(), fcntl.LOCK_EX)
        save_checkpoint(path, get_model("compact"), "compact")
    assert sorted(os.listdir(tmp_path)) == sorted([path.name, live.name, *(p.name for p in others)])


def test_written_files_get_the_users_umask(tmp_path):
    old = os.umask(0o027)
    try:
        path = save_checkpoint(tmp_path / "m.pt", get_model("compact"), "compact")
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == 0o640               # 0666 less the umask, not mkstemp's 0600


# ----------------------------------------------------------------------------------------
# Absurd but finite settings
# ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("epochs, steps, peak", [(2, 1, 1), (1, 1, 1)])
def test_a_one_cycle_with_a_single_step_up_is_refused(epochs, steps, peak):
    opt = torch.optim.Adam(torch.nn.Linear(2, 2).parameters())
    with pytest.raises(ConfigError, match="--train_batch"):
        optim.one_cycle(opt, 1e-3, epochs=epochs, steps_per_epoch=steps, peak_epoch=peak)
    optim.one_cycle(opt, 1e-3, epochs=2, steps_per_epoch=2, peak_epoch=1)   # two steps up: fine


def test_fp16_on_a_cpu_is_refused_by_the_cli_and_warned_about_by_fit(tmp_path):
    run = cli("train", "--smoke", "--amp", "fp16", "--device", "cpu", "--checkpoints", str(tmp_path))
    assert run.returncode == 2 and run.stderr.count("\n") == 1 and "--amp bf16" in run.stderr, run.stderr
    model = get_model("compact")
    batches = [(torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,)))]
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with pytest.warns(UserWarning, match="bf16.*fp32"):
        engine.fit(model, batches, batches, optimizer=opt, epochs=1, options=hardware.RunOptions(device="cpu", amp="fp16", progress=False))


def test_the_guard_stops_a_finite_blow_up_and_passes_a_noisy_descent():
    guard = loop.DivergenceGuard(window=4)
    for loss in [2.4, 2.9, 2.1, 1.5, 3.0, 1.2, 0.9, 1.1]:                        # noisy, but learning
        guard.add(torch.tensor(loss), 0.1, images=32)
    guard.check()
    for loss, images in [(0.4, 32), (0.3, 32), (30.0, 1)]:                       # one image, badly wrong:
        guard.add(torch.tensor(loss), 0.1, images)                              # weighted, no alarm
    guard.check()
    guard = loop.DivergenceGuard(window=2)
    with pytest.raises(DivergenceError, match=r"grew to 6\.55e\+03 over steps 2-3 \(LR 0\.5\), past 23"):
        for loss, lr in [(2.3, 0.1), (2.0, 0.1), (3100.0, 0.5), (1e4, 0.5)]:
            guard.add(torch.tensor(loss), lr, images=32)
    guard = loop.DivergenceGuard(window=4)
    with pytest.raises(DivergenceError, match=r"became nan at step 2 \(LR 0\.5, after a step at LR 0\.1\)"):
        for loss, lr in [(2.3, 0.1), (2.0, 0.1), (math.nan, 0.5), (1e9, 0.5)]:
            guard.add(torch.tensor(loss), lr, images=32)


def test_a_real_blow_up_stops_the_run_before_anything_is_saved(tmp_path):
    """Adam at LR 1e4 on the compact net: the loss climbs to about 1e2..1e10, finite at first."""
    hardware.seed_everything(0)
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(32, 3, 32, 32, generator=g), torch.randint(0, 10, (32,), generator=g)) for _ in range(6)]
    model = get_model("compact")
    opt = torch.optim.Adam(model.parameters(), lr=1e4)
    ckpt = tmp_path / "compact_last.pt"
    with pytest.raises(DivergenceError, match="grew to .* the LR is too high"):
        engine.fit(model, batches, batches[:1], optimizer=opt, epochs=3, options=hardware.RunOptions(device="cpu", progress=False),
                   extras=engine.FitOptions(checkpoint_path=ckpt, arch="compact"))
    assert not ckpt.exists()


def cli(*args, **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "helpers", *args], cwd=REPO, env=smoke_env(**env),
                          capture_output=True, text=True, timeout=300)


def test_cli_refuses_an_impossible_schedule_in_one_line(tmp_path):
    run = cli("train", "--smoke", "--train_batch", "100000", "--device", "cpu", "--checkpoints", str(tmp_path))
    assert run.returncode == 2, run.stderr
    assert run.stderr.strip().startswith("error:") and "Traceback" not in run.stderr
    assert not any(p.suffix == ".pt" for p in tmp_path.iterdir())


# ----------------------------------------------------------------------------------------
# Environment values that mean nothing
# ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("value, smoke", [("1", True), ("TRUE", True), (" yes ", True), ("on", True),
                                          ("0", False), ("false", False), ("No", False), ("off", False), ("", False)])
def test_smoke_test_accepts_the_documented_values(monkeypatch, value, smoke):
    monkeypatch.setenv("SMOKE_TEST", value)
    assert config.smoke_mode() is smoke


@pytest.mark.parametrize("value", ["garbage", "2", "y", "1.0"])
def test_smoke_test_refuses_anything_else(monkeypatch, value):
    monkeypatch.setenv("SMOKE_TEST", value)
    with pytest.raises(ConfigError, match="SMOKE_TEST"):
        config.smoke_mode()


def test_cli_refuses_a_meaningless_smoke_test_before_any_work():
    run = cli("train", "--device", "cpu", SMOKE_TEST="garbage")
    assert run.returncode == 2 and run.stdout == ""
    assert run.stderr.count("\n") == 1 and "SMOKE_TEST='garbage'" in run.stderr


# ----------------------------------------------------------------------------------------
# Messages that mislead
# ----------------------------------------------------------------------------------------
def test_a_code_running_checkpoint_is_named_as_such(tmp_path):
    path = tmp_path / "whole_module.pt"
    torch.save(get_model("compact"), path)                    # the whole pickled module
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    assert "run arbitrary code" in str(info.value) and "weights_only=False" in str(info.value)
    junk = tmp_path / "junk.pt"
    junk.write_text("not a checkpoint")
    with pytest.raises(CheckpointError, match="truncated or not a PyTorch file"):
        load_checkpoint(junk)


def test_an_address_given_to_predict_is_named_as_one():
    with pytest.raises(ImageError, match=r"https://example\.com/cat\.jpg is an address"):
        read_image("https://example.com/cat.jpg")


# ----------------------------------------------------------------------------------------
# Fault injection: SIGKILL at random moments, some of them inside the checkpoint write
# ----------------------------------------------------------------------------------------
CHILD = textwrap.dedent("""
    import sys, torch
    torch.set_num_threads(1)
    from pathlib import Path
    from helpers import engine, hardware
    from helpers.checkpoint import save_checkpoint
    from helpers.models import get_model
    folder = Path(sys.argv[1])
    ckpt = folder / "fast_last.pt"
    hardware.seed_everything(0)
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(16, 3, 32, 32, generator=g), torch.randint(0, 10, (16,), generator=g)) for _ in range(2)]
    model = get_model("fast").learn_first_layer()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True)
    print("ready", flush=True)
    engine.fit(model, batches, batches[:1], optimizer=opt, epochs=8, options=hardware.RunOptions(device="cpu", progress=False),
               extras=engine.FitOptions(checkpoint_path=ckpt, arch="fast", resume=ckpt if ckpt.exists() else None))
    save_checkpoint(folder / "final.pt", model, "fast")
""")


def start_child(folder, script):
    return subprocess.Popen([sys.executable, str(script), str(folder)], cwd=REPO, env=smoke_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def temporaries(folder):
    return [p for p in folder.iterdir() if p.name.endswith(".tmp")]


def test_sigkill_at_random_moments_loses_nothing(tmp_path):
    """Ten kills: five after a random delay, five the moment a checkpoint's temporary file
    appears (inside its write). After each, the checkpoint on disk loads or is absent; the next
    run removes any debris; the last run, resumed, ends bit for bit where an uninterrupted run does."""
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    reference, killed = tmp_path / "reference", tmp_path / "killed"
    reference.mkdir(), killed.mkdir()
    assert start_child(reference, script).wait(timeout=120) == 0
    rng, during_write = random.Random(0), 0
    for i in range(10):
        left = set(temporaries(killed))                        # debris of earlier kills is not this one's
        child = start_child(killed, script)
        assert child.stdout.readline().strip() == "ready"      # imports done: the run itself begins
        deadline = time.monotonic() + (rng.uniform(0.0, 1.5) if i % 2 == 0 else 10.0)
        while time.monotonic() < deadline and child.poll() is None:
            if i % 2 and set(temporaries(killed)) - left:
                break
            time.sleep(0.0005)
        during_write += bool(set(temporaries(killed)) - left)
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
        ckpt = killed / "fast_last.pt"
        if ckpt.exists():
            assert load_checkpoint(ckpt)["arch"] == "fast"       # complete, or not there at all
        (killed / "final.pt").unlink(missing_ok=True)          # a child that outran its kill
    assert during_write >= 1, "no kill landed inside a checkpoint write"
    child = start_child(killed, script)
    assert child.wait(timeout=120) == 0, child.stderr.read()
    assert temporaries(killed) == []
    ours, theirs = (load_checkpoint(folder / "final.pt")["model"] for folder in (killed, reference))
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)
