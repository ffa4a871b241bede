"""Training engine: the OneCycle schedule, overfitting, checkpoints, early stopping,
the divergence guard and run-to-run determinism, on real images."""
import contextlib

import numpy as np
import pytest
import torch
from torch import nn

from conftest import REPO
from helpers import analysis, engine, hardware, loop, optim, plots
from helpers.augment import test_transforms
from helpers import config
from helpers.checkpoint import inference_settings, load_checkpoint, load_model, resumable, save_checkpoint
from helpers.config import recipe
from helpers.loaders import build_loaders, make_loader
from helpers.errors import CheckpointError, ConfigError, DivergenceError
from helpers.models import get_model


QUIET = hardware.RunOptions(device="cpu", progress=False)


def schedule_lrs(epochs=24, steps=98, peak=5, lr_max=2.54e-3, lr_min=None):
    opt = torch.optim.Adam([nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = optim.one_cycle(opt, lr_max, lr_min, epochs=epochs, steps_per_epoch=steps, peak_epoch=peak)
    lrs = []
    for _ in range(epochs * steps):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return np.array(lrs)


# ----------------------------------------------------------------------------------------
# schedule
# ----------------------------------------------------------------------------------------
def test_seed001_schedule_numbers():
    steps = len(range(0, 50_000, 512))
    assert steps == 98
    lrs = schedule_lrs(steps=steps)
    assert len(lrs) == 2352
    assert lrs[0] == pytest.approx(2.54e-4)            # lr_min = lr_max / 10
    assert int(np.argmax(lrs)) == 5 * 98 - 1           # the last step of epoch 5
    assert lrs.max() == pytest.approx(2.54e-3)
    assert lrs[-1] == pytest.approx(2.54e-4)           # back to lr_min: no annihilation
    assert lrs.min() >= 2.54e-4 * (1 - 1e-9)
    assert np.all(np.diff(lrs[:490]) > 0) and np.all(np.diff(lrs[489:]) < 0)   # linear up, linear down
    assert np.allclose(np.diff(lrs[:490]), np.diff(lrs[:490])[0])


@pytest.mark.parametrize("kwargs, match", [
    ({"peak": 30}, "peak epoch 30 is outside 1..24"),
    ({"lr_max": 0}, "lr_max must be a positive number"),
    ({"lr_max": -1e-3}, "lr_max must be a positive number"),
    ({"lr_min": 1.0}, "is above lr_max"),
    ({"epochs": 0}, "epochs must be a whole number >= 1"),
    ({"steps": 2.5}, "steps_per_epoch must be a whole number >= 1, got 2.5"),
])
def test_bad_schedules_are_refused(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        schedule_lrs(**kwargs)


def test_bad_recipes_are_refused():
    with pytest.raises(ConfigError, match="peak epoch 9 is outside 1..3"):
        recipe("resnet9", smoke=False, epochs=3, peak_epoch=9)
    with pytest.raises(ConfigError, match="learning rate must be a positive number"):
        recipe("compact", smoke=False, lr=-0.1)
    with pytest.raises(ConfigError, match="batch_size must be a whole number >= 1, got 0"):
        recipe("vgg", smoke=False, batch_size=0)
    with pytest.raises(ConfigError, match="epochs must be a whole number >= 1, got True"):
        recipe("vgg", smoke=False, epochs=True)
    with pytest.raises(ConfigError, match=r"label_smoothing must be in \[0, 1\), got 1.5: try 0"):
        recipe("resnet9", label_smoothing=1.5)
    with pytest.raises(ConfigError, match=r"momentum must be in \[0, 1\), got 1.0: try 0.9"):
        recipe("vgg", momentum=1.0)             # SGD would take it, then diverge
    with pytest.raises(ConfigError, match="unknown optimizer"):
        optim.make_optimizer("rmsprop", get_model("compact").parameters(), 1e-3)


def test_none_switches_an_option_off():
    """A change to None is a value (off), not 'keep the recipe's': the Keras CNN without early
    stopping, the fast net without Muon, a smoke recipe too."""
    assert recipe("compact", smoke=True, early_stopping_patience=None).early_stopping_patience is None
    assert recipe("compact", smoke=True).early_stopping_patience == 1
    assert recipe("fast", muon_lr=None).muon_lr is None and recipe("fast").muon_lr == 0.24
    assert config.RECIPES["fast"].replace(micro_batch=None).micro_batch is None


def test_device_choice(monkeypatch):
    assert hardware.get_device("cpu").type == "cpu"
    assert hardware.get_device().type in {"cpu", "cuda", "mps"}
    with pytest.raises(ConfigError, match="unknown device"):
        hardware.get_device("tpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)      # a machine with two GPUs
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert hardware.get_device("cuda:1") == torch.device("cuda:1")
    with pytest.raises(ConfigError, match="only 2 CUDA GPU.* visible: use cuda:0 to cuda:1"):
        hardware.get_device("cuda:2")


# ----------------------------------------------------------------------------------------
# training on real images
# ----------------------------------------------------------------------------------------
def loaders(data, n_train=256, batch=32, shuffle=True, workers=0):
    tf = test_transforms(data.mean, data.std)
    train = make_loader(data.train_images[:n_train], data.train_labels[:n_train], tf, batch_size=batch,
                        shuffle=shuffle, workers=workers)
    test = make_loader(data.test_images[:200], data.test_labels[:200], tf, batch_size=100)
    return train, test


def test_a_small_model_overfits_128_images(small_data):
    hardware.seed_everything(0)
    model = get_model("compact")
    train, test = loaders(small_data, n_train=128)
    opt = optim.make_optimizer("adam", model.parameters(), 2e-3)
    history = engine.fit(model, train, test, optimizer=opt, epochs=25, options=QUIET,
                         extras=engine.FitOptions(eval_every=0, log=lambda line: None))   # one reading, at the end
    eval_train = make_loader(small_data.train_images[:128], small_data.train_labels[:128],
                             test_transforms(small_data.mean, small_data.std), batch_size=128)
    acc = loop.evaluate(model, eval_train, progress=False)["acc"]
    print(f"train accuracy on 128 real images after 25 epochs: {acc:.3f}")    # measured: 1.000
    assert acc >= 0.95
    assert len(history["train_loss"]) == 25 and len(history["lr"]) == 25 * 4
    assert history["train_loss"][-1] < history["train_loss"][0] / 3


def test_micro_batches_add_up_to_the_whole_batchs_step(small_data):
    """Gradient accumulation: slices of 4, 4 and 2 images give the step of the batch of 10, and the
    same loss and accuracy (no BatchNorm here, whose statistics would be per slice)."""
    images = torch.as_tensor(small_data.train_images[:30]).permute(0, 3, 1, 2).float() / 255
    labels = torch.as_tensor(small_data.train_labels[:30])
    batches = list(zip(images.split(10), labels.split(10)))
    runs = []
    for micro_batch in (None, 4):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10))
        start = model[0].weight.detach().clone()
        opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
        stats = loop.train_one_epoch(model, batches, opt, options=QUIET, micro_batch=micro_batch)
        runs.append((stats, [p.detach().clone() for p in model.parameters()]))
    (whole, w1), (sliced, w2) = runs
    assert not torch.equal(w1[0], start)                                                 # it did train
    for a, b in zip(w1, w2):                                   # float sums in another order
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    assert sliced["loss"] == pytest.approx(whole["loss"], rel=1e-5) and sliced["acc"] == whole["acc"]
    assert sliced["lr"] == whole["lr"] == [0.5] * 3                                      # one step per batch


def test_reading_the_test_set_only_after_the_last_epoch_trains_the_same_weights(tiny_data):
    """eval_every 0 (the fast recipe's timed run) skips the readings between epochs, records None
    for them, and changes nothing else: the same losses, final reading and weights as every epoch."""
    runs = []
    for every in (1, 0):
        r = recipe("compact", smoke=True, epochs=3, early_stopping_patience=None, eval_every=every)
        lines = []
        runs.append((engine.train(r, tiny_data, hardware.RunOptions(device="cpu"), log=lines.append), lines))
    (each, each_log), (last, last_log) = runs
    h1, h0 = each["history"], last["history"]
    assert all(v is not None for v in h1["eval_acc"]) and h0["eval_acc"][:2] == h0["eval_loss"][:2] == [None, None]
    assert h0["eval_acc"][-1] == h1["eval_acc"][-1] and h0["eval_loss"][-1] == h1["eval_loss"][-1]
    assert h0["train_loss"] == h1["train_loss"] and each["test"] == last["test"]
    w1, w0 = each["model"].state_dict(), last["model"].state_dict()
    assert all(torch.equal(w1[k], w0[k]) for k in w1)
    assert ["validation loss" in line for line in last_log if line.startswith("epoch")] == [False, False, True]
    table = analysis.history_table(h0).splitlines()
    assert table[2].split()[3:5] == ["-", "-"] and "%" in table[4].split()[4]      # epoch 1: not read; 3: read
    plots.training_curves(h0)                                                      # draws the one reading
    with pytest.raises(ConfigError, match="early stopping reads the eval set after every epoch"):
        recipe("compact", smoke=True, eval_every=0)
    with pytest.raises(ConfigError, match="eval_every must be a whole number >= 0, got -1"):
        recipe("fast", smoke=True, eval_every=-1)


def test_a_run_read_on_the_test_set_passes_over_it_once_at_its_end(tiny_data, monkeypatch):
    """With the test set as its eval set (val_split 0, no early stopping), the last epoch's pass
    gives both the epoch's plain reading (view 0) and the run's final test with the recipe's TTA:
    one pass, equal to separate evaluations of the final weights. A validation split costs two."""
    passes, runs = [], {}
    view_logits = loop.view_logits
    monkeypatch.setattr(loop, "view_logits", lambda *a, **k: passes.append(k) or view_logits(*a, **k))
    for val_split, expected_passes in ((0.0, 1), (0.1, 2)):
        passes.clear()
        r = recipe("compact", smoke=True, epochs=2, early_stopping_patience=None, eval_every=0, val_split=val_split,
                   tta_flip=True, tta_shift=1)
        runs[val_split] = run = engine.train(r, tiny_data, QUIET)
        assert len(passes) == expected_passes and passes[-1]["tta_flip"] and passes[-1]["tta_shift"] == 1
    monkeypatch.undo()
    test_loader = build_loaders(r, tiny_data)[2]
    for val_split, run in runs.items():
        plain, with_tta = (loop.evaluate(run["model"], test_loader, tta=tta, progress=False) for tta in (None, r.tta()))
        assert run["test"]["acc"] == with_tta["acc"] and run["test"]["loss"] == pytest.approx(with_tta["loss"], abs=1e-6)
        if val_split == 0:                     # its last reading was on the test set: view 0 of that pass
            h = run["history"]
            assert h["eval_acc"][-1] == plain["acc"] and h["eval_loss"][-1] == pytest.approx(plain["loss"], abs=1e-6)


def test_checkpoint_round_trip_restores_identical_outputs(small_data, tmp_path):
    torch.manual_seed(0)
    model = get_model("resnet9")
    train, _ = loaders(small_data, n_train=64)
    opt = optim.make_optimizer("adam", model.parameters(), 1e-3)
    loop.train_one_epoch(model, train, opt, options=QUIET)    # move the BN statistics too
    path = save_checkpoint(tmp_path / "ckpt" / "resnet9.pt", model, "resnet9", metrics={"acc": 0.5})
    assert not list(path.parent.glob("*.tmp"))                  # nothing half-written left behind
    loaded, ckpt = load_model(path)
    x = torch.randn(8, 3, 32, 32)
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))
    assert ckpt["arch"] == "resnet9" and ckpt["metrics"] == {"acc": 0.5}


def test_training_checkpoint_holds_the_whole_state(small_data, tmp_path):
    """What a run in progress is resumed from, key for key: the history with an LR for every
    step, early stopping, every RNG, and a grad-scaler state with fp16 only (None without)."""
    tf = test_transforms(small_data.mean, small_data.std)
    train = make_loader(small_data.train_images[:16], small_data.train_labels[:16], tf, batch_size=8, shuffle=True)
    test = make_loader(small_data.test_images[:8], small_data.test_labels[:8], tf, batch_size=8)
    for amp in (None, "fp16"):
        torch.manual_seed(0)
        model = get_model("compact")
        opt = optim.make_optimizer("adam", model.parameters(), 1e-3)
        path = tmp_path / f"{amp}.pt"
        warns = pytest.warns(UserWarning, match="fp16 on a CPU is emulated") if amp else contextlib.nullcontext()
        with warns:                               # fp16 on a CPU runs, saying what to use instead
            engine.fit(model, train, test, optimizer=opt, epochs=1,
                       options=hardware.RunOptions("cpu", amp, progress=False),
                       extras=engine.FitOptions(early_stopping=3, checkpoint_path=path, config={"seed": 0}))
        ckpt = torch.load(path, weights_only=True)
        assert list(ckpt) == ["format", "arch", "model", "optimizer", "scheduler", "scaler", "epoch", "history",
                              "config", "options", "early_stopping", "rng"]
        assert list(ckpt["history"]) == ["train_loss", "train_acc", "eval_loss", "eval_acc", "lr", "seconds"]
        assert len(ckpt["history"]["lr"]) == 2 and len(ckpt["history"]["eval_acc"]) == 1
        assert (ckpt["arch"], ckpt["epoch"], ckpt["config"], ckpt["scheduler"]) == ("compact", 0, {"seed": 0}, None)
        assert ckpt["early_stopping"]["patience"] == 3 and ckpt["early_stopping"]["best_epoch"] == 0
        assert {"python", "numpy", "torch"} <= set(ckpt["rng"])
        assert (ckpt["scaler"] is None) == (amp is None), amp
        assert ckpt["options"] == {"amp": amp, "channels_last": False, "fast_augment": False, "workers": 0}


def test_resume_under_other_speed_settings_says_it_will_not_end_identically(small_data, tmp_path):
    """The checkpoint records RunOptions.recorded(); resuming with others trains on, with a note."""
    tf = test_transforms(small_data.mean, small_data.std)
    train = make_loader(small_data.train_images[:16], small_data.train_labels[:16], tf, batch_size=8, shuffle=True)
    test = make_loader(small_data.test_images[:8], small_data.test_labels[:8], tf, batch_size=8)
    path, lines = tmp_path / "compact_last.pt", []

    def run(epochs, workers, resume=None):
        torch.manual_seed(0)
        model = get_model("compact")
        opt = optim.make_optimizer("adam", model.parameters(), 1e-3)
        engine.fit(model, train, test, optimizer=opt, epochs=epochs,
                   options=hardware.RunOptions("cpu", workers=workers, progress=False),
                   extras=engine.FitOptions(checkpoint_path=path, resume=resume, log=lines.append))

    run(1, workers=0)
    run(2, workers=0, resume=path)                       # the same settings: no note
    assert not [line for line in lines if line.startswith("note:")]
    assert torch.load(path, weights_only=True)["options"]["workers"] == 0
    run(3, workers=3, resume=path)
    assert ("note: resumed with other settings than the run had (workers 0 -> 3): it will not end "
                         "exactly as an uninterrupted run would") in lines
    assert torch.load(path, weights_only=True)["epoch"] == 2   # and it trained on


def test_resumable_accepts_the_same_recipe_and_refuses_another_saying_why(small_data, tmp_path):
    """What notebooks 04 and 06 resume from: the same recipe (a test batch size may differ), else
    a fresh start with one line that names the difference."""
    r = recipe("compact", smoke=True)
    tf = test_transforms(small_data.mean, small_data.std)
    train = make_loader(small_data.train_images[:16], small_data.train_labels[:16], tf, batch_size=8, shuffle=True)
    path, said = tmp_path / "compact_last.pt", []
    assert resumable(path, r, said.append) is None and said == []            # no file yet: nothing to say
    model = get_model("compact")
    engine.fit(model, train, train, optimizer=optim.make_optimizer("nadam", model.parameters(), r.lr), epochs=1,
               options=hardware.RunOptions("cpu", progress=False),
               extras=engine.FitOptions(checkpoint_path=path, config=r.to_dict()))
    assert resumable(path, r, said.append) == path
    assert resumable(path, r.replace(test_batch_size=r.test_batch_size * 2), said.append) == path   # RESUME_FREE
    assert said == []
    assert resumable(path, r.replace(lr=0.1), said.append) is None
    assert said == ["starting afresh: cannot resume compact_last.pt with other settings (lr 0.0025 -> 0.1): "
                    "repeat the original run's flags (and SMOKE_TEST), or start a new run without --resume"]
    assert resumable(path, recipe("vgg", smoke=True), said.append) is None and "holds a compact model" in said[-1]
    # a checkpoint that names its augmentation as the course once did ("seed004") resumes under today's name
    former = tmp_path / "former" / "compact_last.pt"
    engine.fit(model, train, train, optimizer=optim.make_optimizer("nadam", model.parameters(), r.lr), epochs=1,
               options=hardware.RunOptions("cpu", progress=False),
               extras=engine.FitOptions(checkpoint_path=former, config={**r.to_dict(), "augment": "seed004"}))
    assert r.augment == "flip-shift-rotate" and resumable(former, r, said.append) == former
    assert recipe("resnet9", augment="seed001").augment == "crop-flip-cutout"


def test_early_stopping_takes_a_patience_or_an_instance():
    assert engine.EarlyStopping.make(None) is None
    stopper = engine.EarlyStopping(3)
    assert engine.EarlyStopping.make(stopper) is stopper and engine.EarlyStopping.make(2).patience == 2
    for bad in (0, True, 1.5):
        with pytest.raises(ConfigError, match="patience must be a whole number >= 1"):
            engine.EarlyStopping.make(bad)


def test_inference_does_not_need_the_training_engine():
    """helpers.analysis (predictions, and the logits that evaluation uses) imports without
    helpers.engine, so error analysis never pulls in the training loop."""
    import subprocess
    import sys

    code = "import sys, helpers.analysis; assert 'helpers.engine' not in sys.modules, sorted(sys.modules)"
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True)


def test_checkpoint_errors(tmp_path):
    path = save_checkpoint(tmp_path / "c.pt", get_model("compact"), "compact")
    with pytest.raises(CheckpointError, match="holds a compact model, not resnet9"):
        load_model(path, expect_arch="resnet9")
    truncated = tmp_path / "t.pt"
    truncated.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="truncated or not a PyTorch file"):
        load_model(truncated)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_model(tmp_path / "missing.pt")
    newer = tmp_path / "newer.pt"
    torch.save({**torch.load(path, weights_only=True), "format": 2}, newer)
    with pytest.raises(CheckpointError, match="format 2, newer than this code's 1: update the course code"):
        load_model(newer)
    with pytest.raises(CheckpointError, match="newer than this code's"):    # not 'starting afresh' over it
        resumable(newer, recipe("compact"))
    blocker = tmp_path / "file.txt"
    blocker.write_text("x")
    with pytest.raises(CheckpointError, match="cannot write checkpoints to"):
        save_checkpoint(blocker / "sub" / "c.pt", get_model("compact"), "compact")


def test_early_stopping_restores_the_best_epochs_weights(small_data, monkeypatch, tmp_path):
    """fit with patience 2 and scripted test accuracies 0.3, 0.6, 0.5, 0.4: it stops after
    epoch 4 and the model ends with the weights it had after epoch 2. Resumed from its last
    checkpoint, the stopped run trains no further and ends the same."""
    accs = iter([0.3, 0.6, 0.5, 0.4, 0.9])
    snapshots = []
    real_evaluate = loop.evaluate

    def scripted(model, *args, **kwargs):
        real_evaluate(model, *args, **kwargs)
        snapshots.append({k: v.clone() for k, v in model.state_dict().items()})
        return {"loss": 1.0, "acc": next(accs)}

    monkeypatch.setattr(engine, "evaluate", scripted)
    torch.manual_seed(0)
    model = get_model("compact")
    train, test = loaders(small_data, n_train=64)
    opt = optim.make_optimizer("nadam", model.parameters(), 2.5e-3)
    path = tmp_path / "last.pt"
    history = engine.fit(model, train, test, optimizer=opt, epochs=10, options=QUIET,
                         extras=engine.FitOptions(early_stopping=2, checkpoint_path=path))
    assert len(snapshots) == 4 and history["best_epoch"] == 1
    final = model.state_dict()
    assert all(torch.equal(final[k], snapshots[1][k]) for k in final)
    assert not all(torch.equal(final[k], snapshots[3][k]) for k in final)

    again, said = get_model("compact"), []
    opt = optim.make_optimizer("nadam", again.parameters(), 2.5e-3)
    resumed = engine.fit(again, train, test, optimizer=opt, epochs=10, options=QUIET,
                         extras=engine.FitOptions(early_stopping=2, resume=path, log=said.append))
    assert len(snapshots) == 4 and resumed == history               # no epoch trained or read again
    assert all(torch.equal(again.state_dict()[k], final[k]) for k in final)
    assert "stopped early" in said[0]


def test_divergence_guard_stops_with_step_and_lr(small_data):
    torch.manual_seed(0)
    model = get_model("compact")
    train, test = loaders(small_data, n_train=128)
    opt = torch.optim.SGD(model.parameters(), lr=1e8)
    with pytest.raises(DivergenceError, match=r"at step \d+ \(LR 1e\+08\).*try a lower one"):
        engine.fit(model, train, test, optimizer=opt, epochs=3, options=QUIET)


def test_same_seed_gives_the_same_history_with_workers(tiny_data):
    """Determinism on CPU: two runs of a recipe with 2 loader workers agree exactly."""
    r = recipe("compact", smoke=True, epochs=2, early_stopping_patience=None)
    options = hardware.RunOptions(device="cpu", workers=2, progress=False)
    runs = [engine.train(r, tiny_data, options) for _ in range(2)]
    h1, h2 = (run["history"] for run in runs)
    for key in ("train_loss", "train_acc", "eval_loss", "eval_acc", "lr"):
        assert h1[key] == h2[key], key
    w1, w2 = (run["model"].state_dict() for run in runs)
    assert all(torch.equal(w1[k], w2[k]) for k in w1)


def test_auto_options_pick_bf16_only_where_the_hardware_has_it(monkeypatch):
    for native in (True, False):
        monkeypatch.setattr(hardware, "_cpu_has_native_bf16", lambda: native)
        opts = hardware.auto_options("cpu")
        assert (opts.amp, opts.channels_last) == ("bf16" if native else None, True)   # NHWC in fp32 too
        assert opts.fast_augment and opts.workers == 0 and opts.device == "cpu"
        text = opts.describe()
        assert text.startswith(f"device cpu: {'bf16' if native else 'fp32'}") and len(text.splitlines()) == (3 if native else 4)
        assert ("AVX-512 BF16" in text) == native and ("slower than fp32" in text) == (not native)


def test_auto_options_on_cuda_follow_the_compute_capability(monkeypatch):
    monkeypatch.setattr(hardware, "get_device", lambda preferred=None: torch.device("cuda"))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla T4")
    for capability, amp in (((7, 5), "fp16"), ((8, 0), "bf16"), ((9, 0), "bf16")):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None, c=capability: c)
        opts = hardware.auto_options()
        assert (opts.amp, opts.channels_last, opts.fast_augment) == (amp, True, True)
        assert ("grad scaler" in opts.describe()) == (amp == "fp16")


def test_channels_last_follows_amp_on_a_gpu_and_stays_on_a_cpu(monkeypatch):
    """NHWC pays with a GPU's 16-bit matrix units only, so --amp off turns it off there; on a CPU
    it pays in fp32 as well and stays on, whatever the CPU's bf16."""
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    real = hardware.get_device
    monkeypatch.setattr(hardware, "get_device", lambda preferred=None: torch.device("cuda") if preferred == "cuda"
                        else real(preferred))
    gpu = hardware.choose_options("cuda", {"amp": None}, augment="seed001")
    assert (gpu.amp, gpu.channels_last) == (None, False) and "follows --amp off" in gpu.reasons["channels_last"]
    assert hardware.choose_options("cuda", {}, augment="seed001").channels_last
    for native in (True, False):
        monkeypatch.setattr(hardware, "_cpu_has_native_bf16", lambda n=native: n)
        for given in ({}, {"amp": None}, {"amp": "bf16"}):
            cpu = hardware.choose_options("cpu", given, augment="seed001")
            assert cpu.channels_last and "channels_last" in cpu.describe().split("\n", 1)[1], (native, given)


def test_exported_fp16_model_is_half_the_size_and_predicts_like_the_original(tmp_path, small_data):
    from helpers.analysis import predict
    from helpers.checkpoint import export_fp16

    torch.manual_seed(0)
    model = get_model("resnet9").eval()
    full = save_checkpoint(tmp_path / "full.pt", model, "resnet9", mean=list(small_data.mean), recipe="resnet9",
                           std=list(small_data.std), metrics={"test_acc": 0.5}, optimizer={"big": 1},
                           data_source="$CIFAR10_DIR (image folder)")
    small = export_fp16(full, tmp_path / "models" / "small.pt", commit="abc123")
    saved = torch.load(small, weights_only=True)
    assert saved["dtype"] == "float16" and "optimizer" not in saved
    assert (saved["recipe"], saved["data_source"]) == ("resnet9", "$CIFAR10_DIR (image folder)")   # kept
    assert all(v.dtype == torch.float16 for v in saved["model"].values() if v.is_floating_point())
    assert (saved["commit"], saved["metrics"], saved["mean"]) == ("abc123", {"test_acc": 0.5}, list(small_data.mean))
    assert small.stat().st_size < 0.55 * full.stat().st_size
    restored, ckpt = load_model(small)
    x = small_data.test_images[:200]
    a = predict(model, x, small_data.test_labels[:200], stats=(ckpt["mean"], ckpt["std"]))
    b = predict(restored, x, small_data.test_labels[:200], stats=(ckpt["mean"], ckpt["std"]))
    assert np.abs(a.probs - b.probs).max() < 0.02 and (a.preds == b.preds).mean() >= 0.98


def test_histories_saved_before_the_eval_keys_load_with_them():
    """Checkpoints saved before 2026-12-06 (the shipped models among them) called the per-epoch
    evaluation test_loss/test_acc; they load with eval_loss/eval_acc, values unchanged."""
    from helpers.checkpoint import upgrade_history

    raw = torch.load(config.SHIPPED_MODEL, weights_only=True)["history"]
    history = load_checkpoint(config.SHIPPED_MODEL)["history"]
    assert "test_acc" in raw and "test_acc" not in history and history["eval_acc"] == raw["test_acc"]
    assert history["eval_loss"] == raw["test_loss"] and history["train_acc"] == raw["train_acc"]
    new = engine.new_history()
    assert upgrade_history(new) == new


SHIPPED = {   # file -> (architecture, size limit in MB, least accuracy on the stratified 1,000 test images)
    "resnet9_cifar10.pt": ("resnet9", 14, 0.88),     # seed 001's recipe, notebook 04's full run
    "fast_cifar10.pt": ("fast", 5, 0.88),            # the fast recipe (Muon, 10 epochs), seed 0: 91.16 %
    "compact_cifar10.pt": ("compact", 3, 0.84),      # seed 004's recipe, its CLI run
    "vgg_cifar10.pt": ("vgg", 15, 0.74),             # seed 003's recipe (batch 16), rank-384 fp16 export
}


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_model_keeps_its_recorded_accuracy_on_a_stratified_1000_image_test_subset(name, real_data):
    """Each shipped fp16 model, evaluated as its recipe says (with its test-time augmentation)."""
    from helpers.analysis import predict

    path, (arch, megabytes, least) = REPO / "models" / name, SHIPPED[name]
    if not path.exists():
        pytest.skip(f"models/{name} is shipped by a full run (not yet made)")
    model, ckpt = load_model(path)
    assert ckpt["arch"] == arch and ckpt["dtype"] == "float16" and path.stat().st_size <= megabytes * 2**20
    sub = real_data.subset(1, 100)                                  # 100 test images per class
    acc = predict(model, sub.test_images, sub.test_labels, stats=(ckpt["mean"], ckpt["std"]),
                  tta=inference_settings(ckpt)[0]).accuracy
    assert acc >= least and abs(acc - ckpt["metrics"]["test_acc"]) < 0.03
