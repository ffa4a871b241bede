"""Training engine: the OneCycle schedule, overfitting, checkpoints, early stopping,
the divergence guard and run-to-run determinism, on real images."""
import numpy as np
import pytest
import torch
from torch import nn

from helpers import engine
from helpers.augment import test_transforms
from helpers.checkpoint import load_model, save_checkpoint
from helpers.config import recipe
from helpers.data import make_loader
from helpers.errors import CheckpointError, ConfigError, DivergenceError
from helpers.models import get_model


def schedule_lrs(epochs=24, steps=98, peak=5, lr_max=2.54e-3, lr_min=None):
    opt = torch.optim.Adam([nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = engine.one_cycle(opt, lr_max, lr_min, epochs, steps, peak)
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
    ({"peak": 30}, "peak epoch 30 is beyond the 24 epochs"),
    ({"lr_max": 0}, "lr_max must be a positive number"),
    ({"lr_max": -1e-3}, "lr_max must be a positive number"),
    ({"lr_min": 1.0}, "is above lr_max"),
    ({"epochs": 0}, "epochs must be a positive number"),
])
def test_bad_schedules_are_refused(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        schedule_lrs(**kwargs)


def test_bad_recipes_are_refused():
    with pytest.raises(ConfigError, match="peak epoch 9 is outside 1..3"):
        recipe("resnet9", smoke=False, epochs=3, peak_epoch=9)
    with pytest.raises(ConfigError, match="learning rate must be a positive number"):
        recipe("compact", smoke=False, lr=-0.1)
    with pytest.raises(ConfigError, match="batch_size must be a positive number"):
        recipe("vgg", smoke=False, batch_size=0)
    with pytest.raises(ConfigError, match="unknown optimizer"):
        engine.make_optimizer("rmsprop", get_model("compact").parameters(), 1e-3)


def test_device_choice():
    assert engine.get_device("cpu").type == "cpu"
    assert engine.get_device().type in {"cpu", "cuda", "mps"}
    with pytest.raises(ConfigError, match="unknown device"):
        engine.get_device("tpu")


# ----------------------------------------------------------------------------------------
# training on real images
# ----------------------------------------------------------------------------------------
def loaders(data, n_train=256, batch=32, shuffle=True, workers=0):
    tf = test_transforms(data.mean, data.std)
    train = make_loader(data.train_images[:n_train], data.train_labels[:n_train], tf, batch_size=batch,
                        shuffle=shuffle, workers=workers)
    test = make_loader(data.test_images[:200], data.test_labels[:200], tf, batch_size=100)
    return train, test


def test_a_small_model_overfits_256_images(small_data):
    engine.seed_everything(0)
    model = get_model("compact")
    train, test = loaders(small_data)
    opt = engine.make_optimizer("adam", model.parameters(), 2e-3)
    history = engine.fit(model, train, test, opt, epochs=25, progress=False)
    eval_train = make_loader(small_data.train_images[:256], small_data.train_labels[:256],
                             test_transforms(small_data.mean, small_data.std), batch_size=256)
    acc = engine.evaluate(model, eval_train, progress=False)["acc"]
    print(f"train accuracy on 256 real images after 25 epochs: {acc:.3f}")
    assert acc >= 0.95
    assert len(history["train_loss"]) == 25 and len(history["lr"]) == 25 * 8
    assert history["train_loss"][-1] < history["train_loss"][0] / 3


def test_checkpoint_round_trip_restores_identical_outputs(small_data, tmp_path):
    torch.manual_seed(0)
    model = get_model("resnet9")
    train, _ = loaders(small_data, n_train=64)
    opt = engine.make_optimizer("adam", model.parameters(), 1e-3)
    engine.train_one_epoch(model, train, opt, progress=False)   # move the BN statistics too
    path = save_checkpoint(tmp_path / "ckpt" / "resnet9.pt", model, "resnet9", metrics={"acc": 0.5})
    assert not list(path.parent.glob("*.tmp"))                  # nothing half-written left behind
    loaded, ckpt = load_model(path)
    x = torch.randn(8, 3, 32, 32)
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))
    assert ckpt["arch"] == "resnet9" and ckpt["metrics"] == {"acc": 0.5}


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
    blocker = tmp_path / "file.txt"
    blocker.write_text("x")
    with pytest.raises(CheckpointError, match="cannot write checkpoints to"):
        save_checkpoint(blocker / "sub" / "c.pt", get_model("compact"), "compact")


def test_early_stopping_restores_the_best_epochs_weights(small_data, monkeypatch):
    """fit with patience 2 and scripted test accuracies 0.3, 0.6, 0.5, 0.4: it stops after
    epoch 4 and the model ends with the weights it had after epoch 2."""
    accs = iter([0.3, 0.6, 0.5, 0.4, 0.9])
    snapshots = []
    real_evaluate = engine.evaluate

    def scripted(model, *args, **kwargs):
        real_evaluate(model, *args, **kwargs)
        snapshots.append({k: v.clone() for k, v in model.state_dict().items()})
        return {"loss": 1.0, "acc": next(accs)}

    monkeypatch.setattr(engine, "evaluate", scripted)
    torch.manual_seed(0)
    model = get_model("compact")
    train, test = loaders(small_data, n_train=64)
    opt = engine.make_optimizer("nadam", model.parameters(), 2.5e-3)
    history = engine.fit(model, train, test, opt, epochs=10, early_stopping=2, progress=False)
    assert len(snapshots) == 4 and history["best_epoch"] == 1
    final = model.state_dict()
    assert all(torch.equal(final[k], snapshots[1][k]) for k in final)
    assert not all(torch.equal(final[k], snapshots[3][k]) for k in final)


def test_divergence_guard_stops_with_step_and_lr(small_data):
    torch.manual_seed(0)
    model = get_model("compact")
    train, test = loaders(small_data, n_train=128)
    opt = torch.optim.SGD(model.parameters(), lr=1e8)
    with pytest.raises(DivergenceError, match=r"at step \d+ \(LR 1e\+08\).*try a lower one"):
        engine.fit(model, train, test, opt, epochs=3, progress=False)


def test_same_seed_gives_the_same_history_with_workers(small_data):
    """Determinism on CPU: two runs of a recipe with 2 loader workers agree exactly."""
    r = recipe("compact", smoke=True, epochs=2, early_stopping_patience=None)
    runs = [engine.train(r, small_data, device="cpu", workers=2, progress=False) for _ in range(2)]
    h1, h2 = (run["history"] for run in runs)
    for key in ("train_loss", "train_acc", "test_loss", "test_acc", "lr"):
        assert h1[key] == h2[key], key
    w1, w2 = (run["model"].state_dict() for run in runs)
    assert all(torch.equal(w1[k], w2[k]) for k in w1)


def test_short_resnet9_run_on_real_data_reports_test_accuracy(small_data):
    """The seed-001 recipe in smoke mode: 1,000 real training images, 2 epochs, on CPU."""
    result = engine.train(recipe("resnet9", smoke=True), small_data, device="cpu", progress=False)
    acc = result["test"]["acc"]
    print(f"ResNet-9 smoke run (1,000 train / 500 test JPEG-copy images, 2 epochs): test accuracy {acc:.3f}")
    assert acc > 0.2                                     # chance is 0.1
    assert len(result["history"]["lr"]) == 2 * 8         # 1,000 / 128 -> 8 steps per epoch
