"""The fast net and recipe (issue 13): parameter count, the whitening filters computed from
real patches, the flip-translate augmentation against its definition, test-time
augmentation, and a smoke run through train / checkpoint / load_model."""
import numpy as np
import pytest
import torch
from torch import nn

from conftest import REPO
from helpers import analysis, augment as aug, config, engine, hardware, loop, runinfo, speed
from helpers.checkpoint import inference_settings, load_model, save_checkpoint
from helpers.models import FastNet, count_parameters, get_model, init_whitening


# ----------------------------------------------------------------------------------------
# The network
# ----------------------------------------------------------------------------------------
def fast_count_by_hand() -> int:
    """Trainable parameters, layer by layer: whitening biases (its 24 filters are frozen),
    three conv groups (two bias-free 3x3 convs, two BatchNorms of weight + bias each) and a
    bias-free 256 -> 10 linear layer."""
    whiten_bias = 24
    groups = sum(9 * a * b + 9 * b * b + 2 * (2 * b) for a, b in ((24, 64), (64, 256), (256, 256)))
    return whiten_bias + groups + 256 * 10


def test_parameter_count_and_frozen_whitening():
    model = get_model("fast")
    assert count_parameters(model) == fast_count_by_hand() == 1_972_504
    assert not model.whiten.weight.requires_grad and model.whiten.weight.shape == (24, 3, 2, 2)
    assert model.fc.bias is None


def test_training_before_the_whitening_is_set_is_refused():
    from helpers.errors import ConfigError

    model, x = get_model("fast"), torch.randn(4, 3, 32, 32)
    assert model.eval()(x).shape == (4, 10)                        # evaluating is allowed (e.g. counting FLOPs)
    with pytest.raises(ConfigError, match=r"whitening filters are not set: call helpers.models.init_whitening"):
        model.train()(x)
    init_whitening(model, x)
    assert model.whitened and model.train()(x).shape == (4, 10)
    assert "whitened" in model.state_dict()                        # saved, so a loaded model may train on


def test_without_whitening_the_first_layer_is_learned_from_its_random_init(tiny_data):
    from helpers.errors import ConfigError

    r = config.recipe("fast", smoke=True, epochs=1, whiten=False)
    hardware.seed_everything(r.seed)
    untouched = get_model("fast").whiten.weight.clone()            # train() seeds, then builds this net
    run = engine.train(r, tiny_data, hardware.RunOptions("cpu", fast_augment=True, progress=False))
    stem = run["model"].whiten.weight
    assert stem.requires_grad and not run["model"].whitened
    assert stem.shape == untouched.shape and not torch.equal(stem, untouched)   # trained, not computed
    assert np.isfinite(run["history"]["train_loss"]).all()
    with pytest.raises(ConfigError, match="whiten=False is an option of the fast net only"):
        config.recipe("resnet9", whiten=False).validate()


def test_flop_accounting_fast_net_against_resnet9():
    flops = {name: speed.flops_per_image(get_model(name)) for name in ("fast", "resnet9")}
    assert 0.23e9 < flops["fast"] < 0.245e9          # issue 13: about 0.24 GFLOP forward
    assert 0.75e9 < flops["resnet9"] < 0.77e9        # issue 13: 0.76 GFLOP forward
    assert 3.0 < flops["resnet9"] / flops["fast"] < 3.4
    net = get_model("resnet9")
    state = {k: v.clone() for k, v in net.state_dict().items()}
    train = speed.flops_per_image(net, train=True)
    assert all(torch.equal(state[k], v) for k, v in net.state_dict().items())   # counted on a copy
    assert 2.9 < train / flops["resnet9"] < 3.05      # backward = 2x forward: 2.28 GFLOP per training image
    layers = speed.flops_by_layer(get_model("fast"))
    assert [name for name, _ in layers][:2] == ["whiten", "groups.0.0"] and layers[-1][0] == "fc"
    assert abs(sum(f for _, f in layers) - flops["fast"]) < 1e-3 * flops["fast"]
    # the costliest layers are the 256-wide convolutions of groups 2 and 3
    assert max(layers, key=lambda r: r[1])[0] in ("groups.1.0", "groups.1.4", "groups.2.0")


def test_matmul_and_train_rates_are_measured_live():
    rate = speed.matmul_rate(n=256, dtype=torch.float32, min_run_time=0.2)
    assert 1e8 < rate < 1e14                          # any CPU: between 0.1 GFLOP/s and 100 TFLOP/s
    x, y = torch.randn(8, 3, 32, 32), torch.arange(8) % 10
    model = get_model("fast")
    init_whitening(model, x)
    before = model.fc.weight.clone()
    r = speed.train_rate(model, config.recipe("fast", smoke=True), hardware.RunOptions("cpu"), images=x, labels=y, min_run_time=0.2)
    assert r > 1 and not torch.equal(before, model.fc.weight)     # real steps ran


def test_resnet9_run_minutes_prefers_notebook_04s_run_and_takes_the_median_epoch(tmp_path, monkeypatch):
    import json

    monkeypatch.setattr(config, "REPO_ROOT", tmp_path)
    assert speed.resnet9_run_minutes()["minutes"] is None                          # nothing measured yet
    row = {"config": "resnet9-fast", "settings": {"recipe": "resnet9", "smoke": False}, "device_type": "cpu",
           "epochs_run": 24, "epoch_seconds_mean": 500.0, "device": "a CPU", "git": {"commit": "abc"}}
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "reference_runs.jsonl").write_text(
        json.dumps(row) + "\n" + json.dumps(dict(row, config="fast", settings={"recipe": "fast", "smoke": False})) + "\n")
    assert speed.resnet9_run_minutes() == {"minutes": 500.0 * 24 / 60, "source":
                                        "the recorded run on a CPU (results/reference_runs.jsonl)"}
    assert speed.resnet9_run_minutes(device="a CPU")["minutes"] == 500.0 * 24 / 60          # the same device
    other = speed.resnet9_run_minutes(device="Tesla T4 (cuda)")                               # no ratio across devices
    assert other["minutes"] is None and "a CPU" in other["source"]
    # a row with the median epoch (a resumed run) is read by its median, not its mean
    (tmp_path / "results" / "reference_runs.jsonl").write_text(json.dumps(dict(row, epoch_seconds_median=410.0)) + "\n")
    assert speed.resnet9_run_minutes()["minutes"] == pytest.approx(410.0 * 24 / 60)
    # a smoke run of notebook 04 in artifacts/ is no measurement
    save_checkpoint(tmp_path / "artifacts" / "resnet9_cifar10.pt", {}, "resnet9", smoke=True,
                    history={"seconds": [2.0, 2.0]})
    assert speed.resnet9_run_minutes()["minutes"] == pytest.approx(410.0 * 24 / 60)
    # notebook 04's own run wins; an epoch slowed by a pause (3,000 s) does not count
    save_checkpoint(tmp_path / "artifacts" / "resnet9_cifar10.pt", {}, "resnet9", smoke=False,
                    history={"seconds": [400.0, 3000.0, 410.0, 405.0]})
    assert speed.resnet9_run_minutes()["minutes"] == pytest.approx(407.5 * 24 / 60)
    assert speed.resnet9_run_minutes(epochs=10)["minutes"] == pytest.approx(407.5 * 10 / 60)
    # ... when it ran on the device asked about, if its checkpoint names one
    save_checkpoint(tmp_path / "artifacts" / "resnet9_cifar10.pt", {}, "resnet9", smoke=False, device="a CPU",
                    history={"seconds": [400.0, 3000.0, 410.0, 405.0]})
    assert speed.resnet9_run_minutes(device="a CPU")["minutes"] == pytest.approx(407.5 * 24 / 60)
    assert speed.resnet9_run_minutes(device="another CPU")["minutes"] is None
    name = runinfo.device_name("cpu")                     # a CPU's name says whether bf16 is native
    assert name.endswith(f"{'native' if hardware.native_bf16('cpu') else 'emulated'} bf16)")


def whitened(model: FastNet, x: torch.Tensor) -> torch.Tensor:
    """The whitening layer's outputs as (patches, 24) rows."""
    with torch.no_grad():
        return model.whiten(x).permute(0, 2, 3, 1).reshape(-1, 24).double()


def test_whitening_decorrelates_real_patches(small_data):
    fit = engine.whitening_images(small_data)                       # 1,000 real training images
    assert fit.shape == (1000, 3, 32, 32)
    model = get_model("fast")
    lam = init_whitening(model, fit)
    assert lam.shape == (12,) and (lam > 0).all() and torch.all(lam[:-1] >= lam[1:])   # largest first
    assert lam.max() / lam.min() > 100                              # real patches are far from white
    # computed in chunks: the same filters as in one piece
    one_piece = get_model("fast")
    init_whitening(one_piece, fit, chunk=len(fit))
    assert torch.allclose(one_piece.whiten.weight, model.whiten.weight, rtol=1e-4, atol=1e-4)
    out = whitened(model, fit)
    # on the patches it was computed from: zero mean and covariance diag(lam / (lam + eps)), exactly
    first = out[:, :12]
    assert first.mean(0).abs().max() < 1e-4
    expected = torch.diag((lam / (lam + 5e-4)).double())
    assert torch.allclose(torch.cov(first.T), expected, atol=2e-3)
    assert torch.allclose(out[:, 12:], -first, atol=1e-5)           # the other 12 are the negatives
    # on other real images (the test split) it still nearly whitens
    held_out = aug.normalize_batch(torch.as_tensor(small_data.test_images).permute(0, 3, 1, 2),
                                   small_data.mean, small_data.std)
    cov = torch.cov(whitened(model, held_out)[:, :12].T)
    assert ((cov.diagonal() / expected.diagonal()) - 1).abs().max() < 0.2
    assert (expected.diagonal() > 0.9).sum() >= 6        # eps damps only the faintest directions
    off = cov - torch.diag(cov.diagonal())
    assert off.abs().max() < 0.05
    # whereas the raw 12-d patches are strongly correlated (neighbouring pixels, colour channels)
    raw = torch.nn.functional.unfold(held_out, 2).transpose(1, 2).reshape(-1, 12).double()
    corr = torch.corrcoef(raw.T)
    assert (corr - torch.eye(12, dtype=corr.dtype)).abs().max() > 0.8


# ----------------------------------------------------------------------------------------
# flip-translate: a flip and a shift of up to 2 pixels (reflect padding), by definition
# ----------------------------------------------------------------------------------------
def translate_flip_by_definition(img: np.ndarray, dy: int, dx: int, flip: bool) -> np.ndarray:
    """The image content moved by (dy, dx) in -2..2 (reflect padding, as cv2.BORDER_REFLECT_101),
    then mirrored left-right when flip is set."""
    padded = np.pad(img, ((2, 2), (2, 2), (0, 0)), mode="reflect")
    out = padded[2 - dy:34 - dy, 2 - dx:34 - dx]
    return out[:, ::-1] if flip else out


def test_flip_translate_batches_equal_their_definition_for_every_offset(small_data):
    mean, std = small_data.mean, small_data.std
    ba = aug.BatchAugment(mean, std, **aug.PRESETS["flip-translate"])
    cases = [(dy, dx, flip) for dy in range(-2, 3) for dx in range(-2, 3) for flip in (False, True)]   # all 50
    images = small_data.train_images[:len(cases)]
    params = {"crop_yx": torch.tensor([(2 - dy, 2 - dx) for dy, dx, _ in cases]),   # crop corner = pad - shift
              "flip": torch.tensor([f for *_, f in cases]),
              "hole_yx": torch.zeros(len(cases), 2, dtype=torch.int64),
              "cutout": torch.zeros(len(cases), dtype=torch.bool)}
    out = ba.apply(torch.as_tensor(images), params)
    for i, (dy, dx, flip) in enumerate(cases):
        ref = aug.normalize_batch(torch.as_tensor(translate_flip_by_definition(images[i], dy, dx, flip).copy())
                                  .permute(2, 0, 1)[None].float(), mean, std)[0]
        assert torch.allclose(out[i], ref, atol=1e-6), f"shift {dy},{dx} flip {flip}"
    assert len({tuple(out[i].flatten()[:64].tolist()) for i in range(len(cases))}) == len(cases)   # all differ
    # its draws: every image shifted (uniformly over 5 x 5 offsets), half flipped, never cut out
    drawn = ba.sample(20_000, "cpu", torch.Generator().manual_seed(0))
    assert not drawn["cutout"].any()
    counts = np.bincount((drawn["crop_yx"][:, 0] * 5 + drawn["crop_yx"][:, 1]).numpy(), minlength=25)
    assert counts.size == 25 and counts.min() > 20_000 / 25 * 0.8
    assert abs(drawn["flip"].float().mean().item() - 0.5) < 0.02


def test_flip_translate_albumentations_pipeline_draws_the_same_shifts(small_data):
    """The loader path (albumentations) shifts every image by -2..2 and flips about half:
    recovered here by matching each output against the 50 possible results."""
    tf = aug.transforms_for("flip-translate", small_data.mean, small_data.std)
    images = small_data.train_images[:200]
    out = aug.augment_images(tf, images, stats=(small_data.mean, small_data.std), seed=3)
    seen, flips, unshifted = set(), 0, 0
    for img, got in zip(images, out):
        matches = [(dy, dx, f) for dy in range(-2, 3) for dx in range(-2, 3) for f in (False, True)
                   if np.array_equal(translate_flip_by_definition(img, dy, dx, f), got)]
        assert matches, "an output that no shift and flip of its image explains"
        seen.add(matches[0][:2])
        flips += matches[0][2]
        unshifted += matches[0][:2] == (0, 0)
    assert len(seen) >= 20 and 60 < flips < 140
    assert unshifted < 25      # every image is shifted (1 in 25 by zero): seed 001's half-the-time crop gives ~100
    # the same preset when the pipeline or its on-device twin is asked for by name alone
    assert aug.AUGMENTATIONS["flip-translate"](small_data.mean, small_data.std).transforms[0].transforms[0].min_height == 36
    ba = aug.batch_augment("flip-translate", small_data.mean, small_data.std)
    assert (ba.pad, ba.crop_p, ba.cutout_p) == (2, 1.0, 0.0)


# ----------------------------------------------------------------------------------------
# Test-time augmentation: the mirror image and 1-pixel shifts
# ----------------------------------------------------------------------------------------
def test_tta_views_and_averaged_logits():
    x = torch.arange(2 * 3 * 32 * 32, dtype=torch.float32).reshape(2, 3, 32, 32)
    assert len(loop.tta_views(x)) == 1 and len(loop.tta_views(x, flip=True)) == 2
    views = loop.tta_views(x, flip=True, shift=1)
    assert len(views) == 6
    down = loop.shifted(x, 1, 1)                        # content moves down-right by one pixel
    assert torch.equal(down[..., 1:, 1:], x[..., :-1, :-1])
    assert torch.equal(down[..., 0, 1:], x[..., 1, :-1])    # the new top row reflects row 1
    assert torch.equal(loop.shifted(x, -1, -1)[..., :-1, :-1], x[..., 1:, 1:])
    assert torch.equal(views[1], loop.shifted(x, -1, -1)) and torch.equal(views[2], down)
    assert torch.equal(views[3], x.flip(3)) and torch.equal(views[4], loop.shifted(x, -1, -1).flip(3))
    assert loop.tta_label(True, 1) == "flip + 1 px shifts" and loop.tta_label(False, 0) == "none"
    assert loop.tta_label(True, 1, 0.5) == "flip + 1 px shifts, centre 0.5" and loop.tta_label(True, 0, 0.5) == "flip"
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.LazyLinear(10)).eval()
    model(x)
    data = torch.utils.data.TensorDataset(x, torch.tensor([0, 1]))
    loader = torch.utils.data.DataLoader(data, batch_size=2)
    logits, _ = loop.predict_logits(model, loader, tta_flip=True, tta_shift=1)
    with torch.no_grad():
        expected = sum(model(v) for v in views) / 6
        plain = model(x)
    assert torch.allclose(logits, expected, atol=1e-4) and not torch.allclose(logits, plain, atol=1e-3)
    weights = loop.tta_weights(True, 1, centre=1 / 2)   # airbench94's: 1/4 each unshifted view, 1/8 each shifted
    assert weights.tolist() == [1 / 4, 1 / 8, 1 / 8, 1 / 4, 1 / 8, 1 / 8]
    assert loop.tta_weights(True, 0).tolist() == [1 / 2, 1 / 2] and loop.tta_weights().tolist() == [1.0]
    views_logits, _ = loop.view_logits(model, loader, tta_flip=True, tta_shift=1)
    with torch.no_grad():
        assert torch.allclose(views_logits[3], model(x.flip(3)), atol=1e-5)
    assert torch.allclose(torch.einsum("v,vnc->nc", loop.tta_weights(True, 1), views_logits), logits, atol=1e-5)
    centred, _ = loop.predict_logits(model, loader, tta_flip=True, tta_shift=1, tta_centre=1 / 2)
    assert torch.allclose(torch.einsum("v,vnc->nc", weights, views_logits), centred, atol=1e-5)
    tta = {"tta_flip": True, "tta_shift": 1, "tta_centre": 1 / 2}      # both readings from one pass: view 0 is plain
    plain, with_tta = loop.evaluate_views(model, loader, tta, loss_fn=nn.CrossEntropyLoss(label_smoothing=0.2))
    assert plain == loop.evaluate(model, loader, loss_fn=nn.CrossEntropyLoss(label_smoothing=0.2))
    assert with_tta == loop.evaluate(model, loader, tta=tta)


def test_a_checkpoint_tests_with_its_recipes_tta_weights():
    """inference_settings gives predict the recipe's TTA, its weighting included; a checkpoint
    saved before recipes had tta_centre weighed its views alike, and still does."""
    r = config.recipe("fast", smoke=False, tta_centre=0.5)
    assert inference_settings({"config": r.to_dict()})[0] == r.tta() == {"tta_flip": True, "tta_shift": 1, "tta_centre": 0.5}
    older = {k: v for k, v in r.to_dict().items() if k != "tta_centre"}
    assert inference_settings({"config": older})[0]["tta_centre"] == config.TTA_ALIKE == 1 / 3


def test_a_checkpoint_says_how_its_inputs_were_normalised():
    """Its mean/std when recorded; [0, 1] pixels unchanged for a recipe that does not normalise,
    even from a training checkpoint (which records no mean/std); else None: the caller's choice."""
    assert inference_settings({"mean": [0.5] * 3, "std": [0.2] * 3})[1] == ([0.5] * 3, [0.2] * 3)
    raw = config.recipe("vgg", normalize=False).to_dict()
    assert inference_settings({"config": raw})[1] == ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
    assert inference_settings({"config": config.recipe("vgg").to_dict()})[1] is None


def test_fast_recipe_settings_and_checks():
    r = config.recipe("fast", smoke=False)
    assert (r.model, r.optimizer, r.nesterov, r.batch_size, r.label_smoothing) == ("fast", "sgd", True, 2000, 0.2)
    assert (r.augment, r.tta_flip, r.tta_shift) == ("altflip-translate", True, 1)
    assert (r.muon_lr, r.schedule, r.epochs, r.micro_batch, r.lookahead) == (0.24, "linear", 10, 500, False)
    assert (r.momentum, r.bn_bias_lr, r.frozen_bn_scales, r.dirac_init) == (0.85, 64.0, True, True)
    with pytest.raises(Exception, match="tta_shift must be a whole number of pixels in 0..4"):
        config.recipe("fast", smoke=False, tta_shift=7)
    with pytest.raises(Exception, match="tta_centre must be in"):
        config.recipe("fast", smoke=False, tta_centre=0.0)
    assert r.tta() == {"tta_flip": True, "tta_shift": 1, "tta_centre": r.tta_centre}


# ----------------------------------------------------------------------------------------
# A smoke run: train (on-device augmentation), checkpoint, load, predict with TTA
# ----------------------------------------------------------------------------------------
def test_smoke_training_learns_keeps_whitening_frozen_and_reloads(small_data, tmp_path):
    r = config.recipe("fast", smoke=True, epochs=3)
    run = engine.train(r, small_data, hardware.RunOptions("cpu", fast_augment=True, progress=False))
    model, history = run["model"], run["history"]
    assert len(history["train_loss"]) == 3 and all(np.isfinite(history["train_loss"]))
    assert history["train_loss"][-1] < history["train_loss"][0]
    assert run["test"]["acc"] > 0.2                                  # chance is 0.1 (500 real test images)
    # the whitening filters are the ones init_whitening computes from these images: untouched by training
    fresh = get_model("fast")
    init_whitening(fresh, engine.whitening_images(small_data))
    assert torch.equal(model.whiten.weight, fresh.whiten.weight)
    assert not torch.equal(model.whiten.bias, fresh.whiten.bias)       # the biases do learn
    path = save_checkpoint(tmp_path / "fast.pt", model, "fast", config=r.to_dict())
    loaded, ckpt = load_model(path)
    assert isinstance(loaded, FastNet) and ckpt["config"]["tta_shift"] == 1
    pred = analysis.predict(loaded, small_data.test_images, small_data.test_labels,
                            stats=(small_data.mean, small_data.std), tta=inference_settings(ckpt)[0])
    assert abs(pred.accuracy - run["test"]["acc"]) < 1e-6               # the same 500 answers



def test_fast_vs_anchor_pairs_each_seed_by_date_and_names_the_training():
    """results/fast_vs_anchor.py's page: each fast run's time over the nearest anchor run of its seed and day, the fast recipe named
    by its training (rows from before Muon carry none: airbench94's), a mean per recipe."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("fast_vs_anchor", REPO / "results" / "fast_vs_anchor.py")
    page_of = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(page_of)

    def row(who, date, seconds, acc, **extra):
        return {"who": who, "seed": 0, "tta_acc": acc, "plain_acc": acc - 0.01, "command_seconds": seconds,
                "train_test_seconds": seconds - 5, "images_per_second": 400.0, "git": {"commit": "a" * 40, "dirty": False},
                "date": date + "T10:00:00", "device": "a CPU", "versions": {"torch": "2"}, **extra}

    page = page_of.markdown([row("anchor", "2026-12-06", 1000, 0.9077), row("fast", "2026-12-06", 950, 0.9076),
                             row("anchor", "2026-12-07", 1200, 0.9070),
                             row("fast", "2026-12-07", 1080, 0.9120, training="airbench94_muon's"),
                             row("anchor", "2026-12-07", 1250, 0.9070),                 # the same seed again
                             row("fast", "2026-12-07", 1000, 0.9120, training="airbench94_muon's", eval_every=0)])
    assert "| 2026-12-06 | 0 | fast (airbench94's training) | after every epoch | 0.95 | -0.01% |" in page
    assert "| 2026-12-07 | 0 | fast (airbench94_muon's training) | after every epoch | 0.90 | +0.50% |" in page
    assert "| 2026-12-07 | 0 | fast (airbench94_muon's training) | after the last epoch only | 0.80 | +0.50% |" in page
    assert "fast (airbench94_muon's training): mean TTA accuracy over seeds 0: 91.20%" in page
    assert "anchor: mean TTA accuracy over seeds 0: 90.70%" in page                  # the latest run of the seed


def test_tta_readings_equal_an_evaluation_under_each_weighting():
    """loop.tta_readings (the studies' TTA table) reads four weightings off one pass: each equals
    evaluate's accuracy under that test-time augmentation."""
    torch.manual_seed(0)
    x, y = torch.randn(200, 3, 8, 8), torch.randint(0, 10, (200,))
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Flatten(), nn.LazyLinear(10)).eval()
    model(x[:1])
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=100)
    readings = loop.tta_readings(model, loader, shift=1)
    assert len(set(readings.values())) == 4                  # the four weightings tell these images apart
    for name, tta in (("none", None), ("flip", {"tta_flip": True, "tta_shift": 0}),
                      ("6 views alike", {"tta_flip": True, "tta_shift": 1}),
                      ("6 views, centre 1/2", {"tta_flip": True, "tta_shift": 1, "tta_centre": 0.5})):
        assert readings[name] == loop.evaluate(model, loader, tta=tta, progress=False)["acc"], name
