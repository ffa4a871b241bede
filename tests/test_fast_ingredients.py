"""airbench94's training ingredients, each an option of the fast recipe (issue 24): BatchNorm
settings and frozen scales, dirac initialisation, a higher LR for BatchNorm biases, the
triangular cycle, Lookahead, alternating flips and the whitening bias frozen after some
epochs; and airbench94_muon's Muon with its linear decay. Each is checked against its
definition; a smoke run with all of them trains, reloads to the same answers and resumes exactly."""
import copy
import dataclasses

import numpy as np
import pytest
import torch
from torch import nn

from helpers import config, engine, hardware, loaders, loop, optim
from helpers.checkpoint import load_model, save_checkpoint
from helpers.errors import ConfigError
from helpers.models import dirac_init, get_model, init_whitening, set_batchnorm

AIRBENCH = {"whiten_bias_epochs": 1}     # the fast recipe has them all; smoke runs last 2 epochs


def airbench94_smoke(**changes) -> config.Recipe:
    """airbench94's training (config.AIRBENCH94: SGD + Lookahead, no Muon), shrunk to a smoke run."""
    smoke = config.recipe("fast", smoke=True)
    return dataclasses.replace(smoke, **{**config.AIRBENCH94, "batch_size": smoke.batch_size, "peak_epoch": 1,
                                         **changes}).validate()


def learned(run) -> bool:
    """Two epochs on tiny_data's 300 images learned something: the training loss fell, and the
    test loss is below ln 10, a uniform guess's (measured: 2.31 -> 2.28 and 2.27 for airbench94's
    training, 2.39 -> 2.22 and 2.06 with Muon)."""
    losses = run["history"]["train_loss"]
    return all(np.isfinite(losses)) and losses[-1] < losses[0] and run["test"]["loss"] < np.log(10)


def batchnorms(model):
    return [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]


def test_batchnorm_settings_and_frozen_scales():
    torch.manual_seed(0)
    model = set_batchnorm(get_model("fast"), momentum=0.4, eps=1e-12, frozen_scales=True)
    assert len(batchnorms(model)) == 6
    assert all(bn.momentum == 0.4 and bn.eps == 1e-12 and not bn.weight.requires_grad for bn in batchnorms(model))
    bn = model.groups[0][2]
    x = torch.randn(8, 64, 6, 6) * 3 + 2
    bn.train()(x)                                   # running = 0.6 * 0 + 0.4 * the batch mean
    assert torch.allclose(bn.running_mean, 0.4 * x.mean((0, 2, 3)), atol=1e-6)
    init_whitening(model, torch.randn(16, 3, 32, 32))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    biases = bn.bias.clone()
    nn.functional.cross_entropy(model.train()(torch.randn(8, 3, 32, 32)), torch.arange(8)).backward()
    optimizer.step()
    assert torch.equal(bn.weight, torch.ones(64)) and not torch.equal(bn.bias, biases)


def test_dirac_init_passes_each_convs_input_through():
    torch.manual_seed(0)
    before = get_model("fast")
    model = dirac_init(copy.deepcopy(before))
    for conv in (model.groups[1][0], model.groups[2][4]):          # 64 -> 256 and 256 -> 256
        x = torch.randn(2, conv.in_channels, 7, 7)
        out = conv(x)
        assert torch.allclose(out[:, :conv.in_channels], x, atol=1e-6)
    assert not torch.allclose(before.groups[1][0].weight[:64], model.groups[1][0].weight[:64])
    assert torch.equal(model.groups[1][0].weight[64:], before.groups[1][0].weight[64:])   # the other filters keep
    assert torch.equal(model.whiten.weight, before.whiten.weight)   # theirs; the 2x2 whitening conv is left alone


def test_batchnorm_biases_follow_the_cycle_at_k_times_the_lr():
    r = dataclasses.replace(config.recipe("fast"), **{**config.AIRBENCH94, "weight_decay": 1e-3})
    model = get_model("fast")
    optimizer = optim.optimizer_for(r, model)
    others, biases = optimizer.param_groups
    assert {id(p) for p in biases["params"]} == {id(bn.bias) for bn in batchnorms(model)}
    assert len(others["params"]) + len(biases["params"]) == len(list(model.parameters()))
    assert biases["lr"] * biases["weight_decay"] == pytest.approx(others["lr"] * others["weight_decay"])
    scheduler = optim.one_cycle(optimizer, r.lr, r.lr_min, lr_start=r.lr_start, epochs=10, steps_per_epoch=49,
                                peak_epoch=2)
    lrs = []
    for _ in range(490):
        lrs.append((others["lr"], biases["lr"]))
        optimizer.step()
        scheduler.step()
    lr, bias_lr = np.array(lrs).T
    np.testing.assert_allclose(bias_lr, 64 * lr, rtol=1e-9)
    assert lr[0] == pytest.approx(0.3) and lr.max() == pytest.approx(1.5) and lr[-1] == pytest.approx(0.105)
    assert lr.argmax() == 2 * 49 - 1                                 # the peak: the end of epoch 2
    with pytest.raises(ConfigError, match="bn_bias_lr: options of the fast net only"):
        config.recipe("resnet9", bn_bias_lr=64.0)


def test_lookahead_equals_its_definition_and_resumes_exactly():
    def make():
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))
        return model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)

    data = [(torch.randn(16, 4, generator=torch.Generator().manual_seed(i)), torch.arange(16) % 3) for i in range(12)]

    def train(model, optimizer, batches):
        for x, y in batches:
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            optimizer.step()

    model, sgd = make()                     # by hand: every 5 steps, average and weights meet
    average = copy.deepcopy(model.state_dict())
    for step, batch in enumerate(data, 1):
        train(model, sgd, [batch])
        decays = ([0.95 ** 5 * (step / 12) ** 3] if step % 5 == 0 else []) + ([1.0] if step == 12 else [])
        for decay in decays:
            for name, value in model.state_dict().items():
                if value.is_floating_point():
                    average[name] = decay * average[name] + (1 - decay) * value
                    value.copy_(average[name])
    model2, sgd2 = make()
    look = optim.Lookahead(sgd2, model2, total_steps=12)
    train(model2, look, data)
    for name, value in model.state_dict().items():
        torch.testing.assert_close(model2.state_dict()[name], value, rtol=1e-6, atol=1e-7)
    model3, sgd3 = make()                   # stopped after 7 steps, rebuilt, resumed from the state
    look3 = optim.Lookahead(sgd3, model3, total_steps=12)
    train(model3, look3, data[:7])
    state = copy.deepcopy((model3.state_dict(), look3.state_dict()))
    model4, sgd4 = make()
    model4.load_state_dict(state[0])
    look4 = optim.Lookahead(sgd4, model4, total_steps=12)
    look4.load_state_dict(state[1])
    train(model4, look4, data[7:])
    assert all(torch.equal(v, model2.state_dict()[k]) for k, v in model4.state_dict().items())


def test_alternating_flips_mirror_each_image_on_alternate_epochs(small_data):
    images, labels = small_data.train_images[:300], small_data.train_labels[:300]
    loader = loaders.DeviceLoader(images, labels, 64, stats=(small_data.mean, small_data.std), device="cpu",
                                  augment="altflip-translate", seed=3)
    index = {bytes(img): i for i, img in enumerate(images)}
    assert len(index) == len(images)
    seen, apply = {}, loader.augment.apply

    def record(x, params):
        for img, flip in zip(x.numpy(), params["flip"].tolist()):
            seen.setdefault(index[bytes(img)], []).append(flip)
        return apply(x, params)

    loader.augment.apply = record
    for epoch in range(4):
        loader.set_epoch(epoch)
        list(loader)
    flips = np.array([seen[i] for i in range(len(images))])          # (images, epochs)
    assert flips.shape == (300, 4)
    assert (flips[:, 1] != flips[:, 0]).all() and (flips[:, 2] == flips[:, 0]).all() and (flips[:, 3] == flips[:, 1]).all()
    assert 0.4 < flips[:, 0].mean() < 0.6                            # a random half in epoch 0
    r = config.recipe("fast", smoke=True, augment="altflip-translate")
    with pytest.raises(ConfigError, match="only the on-device loader does: add --fast-augment"):
        loaders.build_loaders(r, small_data, hardware.RunOptions("cpu", fast_augment=False))


def test_whitening_bias_trains_for_its_epochs_then_stays(tiny_data):
    r = config.recipe("fast", smoke=True, epochs=3, whiten_bias_epochs=1)
    hardware.seed_everything(r.seed)
    model = engine.build_model(r, tiny_data)
    start, snapshots = model.whiten.bias.clone(), []
    train_loader, eval_loader, _ = loaders.build_loaders(r, tiny_data, hardware.RunOptions("cpu", fast_augment=True))
    optimizer = optim.optimizer_for(r, model)
    extras = engine.FitOptions(log=lambda line: snapshots.append(model.whiten.bias.detach().clone()))
    engine.fit(model, train_loader, eval_loader, optimizer=optimizer, epochs=3, options=hardware.RunOptions("cpu"),
               extras=extras)
    assert len(snapshots) == 3 and not torch.equal(snapshots[0], start)
    assert torch.equal(snapshots[1], snapshots[0]) and torch.equal(snapshots[2], snapshots[0])
    assert not model.whiten.bias.requires_grad


def test_all_ingredients_train_reload_and_resume_exactly(tiny_data, tmp_path):
    r = airbench94_smoke(epochs=2, **AIRBENCH)
    assert r.lookahead and r.muon_lr is None
    options = hardware.RunOptions("cpu", fast_augment=True, progress=True)
    run = engine.train(r, tiny_data, options, checkpoint_path=tmp_path / "full.pt", log=lambda line: None)
    assert learned(run)
    assert [bn.eps for bn in batchnorms(run["model"])] == [1e-12] * 6
    path = save_checkpoint(tmp_path / "fast.pt", run["model"], "fast", config=r.to_dict())
    loaded, _ = load_model(path)
    assert all(bn.eps == 1e-12 for bn in batchnorms(loaded))        # rebuilt with the recipe's eps
    x = torch.as_tensor(tiny_data.test_images[:64]).permute(0, 3, 1, 2).float()
    from helpers.augment import normalize_batch
    x = normalize_batch(x, tiny_data.mean, tiny_data.std)
    assert torch.equal(loaded(x), run["model"].eval()(x))

    _check_resumes_exactly(r, tiny_data, options, run, tmp_path)


def _matrix(rows, cols, spread=10.0, seed=0):
    """A rows x cols matrix with known singular vectors and singular values from 1 down to 1/spread."""
    g = torch.Generator().manual_seed(seed)
    k = min(rows, cols)
    u, v = torch.linalg.qr(torch.randn(rows, k, generator=g))[0], torch.linalg.qr(torch.randn(cols, k, generator=g))[0]
    return u @ torch.diag(torch.logspace(0, -np.log10(spread), k)) @ v.T, u @ v.T


@pytest.mark.parametrize("shape", [(64, 576), (576, 64), (256, 2304)])
def test_orthogonalise_pulls_every_singular_value_toward_one(shape):
    g, polar = _matrix(*shape)
    o = optim.orthogonalise(g * 1e-3)                     # the scale of the update does not matter
    s = torch.linalg.svdvals(o)
    assert o.shape == g.shape and o.dtype == g.dtype
    assert 0.5 < s.min() and s.max() < 1.25                # from 1e-3 .. 1e-4: three steps, not exactly 1
    assert (o - polar).norm() < 0.25 * polar.norm()        # and the directions are g's: U V^T


def test_orthogonalise_runs_in_bf16_only_where_the_hardware_multiplies_it(monkeypatch):
    """bf16 Newton-Schulz steps (airbench94_muon's) with native bf16; fp32 on a CPU without it,
    where emulated bf16 matmuls cost seconds a step. Both land near U V^T."""
    g, polar = _matrix(256, 576)
    out = {}
    for native in (True, False):
        monkeypatch.setattr(hardware, "_cpu_has_native_bf16", lambda n=native: n)
        out[native] = optim.orthogonalise(g)
        a, b, c = optim.NEWTON_SCHULZ
        x = g.to(torch.bfloat16 if native else torch.float32)
        x = x / (x.norm() + 1e-7)
        for _ in range(3):
            s = x @ x.T
            x = a * x + (b * s + c * s @ s) @ x
        assert torch.equal(out[native], x.float())          # the steps written out, in that precision
        assert (out[native] - polar).norm() < 0.3 * polar.norm()
    assert not torch.equal(out[True], out[False])


def test_muon_steps_sgd_groups_as_torch_and_filters_by_its_definition():
    def make():
        torch.manual_seed(0)
        return nn.Sequential(nn.Conv2d(3, 8, 3), nn.Flatten(), nn.Linear(8 * 4 * 4, 3))

    x, y = torch.randn(16, 3, 6, 6), torch.arange(16) % 3
    reference, model = make(), make()
    sgd = torch.optim.SGD(reference.parameters(), lr=0.1, momentum=0.85, nesterov=True, weight_decay=1e-2)
    muon = optim.Muon(model.parameters(), 0.1, momentum=0.85, weight_decay=1e-2, nesterov=True)
    for _ in range(4):                                    # no orthogonal group: exactly torch's SGD
        for net, opt in ((reference, sgd), (model, muon)):
            opt.zero_grad()
            nn.functional.cross_entropy(net(x), y).backward()
            opt.step()
    for a, b in zip(reference.parameters(), model.parameters()):
        torch.testing.assert_close(a, b)

    model = make()
    conv = model[0].weight
    muon = optim.Muon([{"params": [conv], "orthogonal": True, "momentum": 0.6, "lr": 0.24},
                       {"params": list(model[2].parameters())}], 0.5, momentum=0.85)
    buffer = torch.zeros_like(conv)
    for _ in range(3):                                    # by hand: momentum, rescale, orthogonal step
        muon.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        grad, before = conv.grad.clone(), conv.detach().clone()
        muon.step()
        buffer = 0.6 * buffer + grad
        update = grad + 0.6 * buffer
        expected = before * 8 ** 0.5 / before.norm() - 0.24 * optim.orthogonalise(update.reshape(8, -1)).view_as(conv)
        torch.testing.assert_close(conv.detach(), expected, rtol=1e-5, atol=1e-6)
    assert conv.norm().item() == pytest.approx(8 ** 0.5, rel=0.35)   # kept near its fixed size, no weight decay needed


def test_airbench94_muons_groups_and_linear_decay():
    r = config.recipe("fast")
    assert (r.muon_lr, r.lr * 64, r.lr * r.weight_decay) == (0.24, pytest.approx(0.053 * 2000, rel=1e-3),
                                                             pytest.approx(2e-6 * 2000))
    model = set_batchnorm(get_model("fast"), momentum=r.bn_momentum, eps=r.bn_eps, frozen_scales=True)
    optimizer = optim.optimizer_for(r, model)
    head, biases, filters = optimizer.param_groups
    assert {id(p) for p in filters["params"]} == {id(m.weight) for m in model.modules() if isinstance(m, nn.Conv2d)
                                                  and m is not model.whiten}          # the 6 trained convs
    assert {id(p) for p in biases["params"]} == {id(bn.bias) for bn in batchnorms(model)} | {id(model.whiten.bias)}
    assert [id(p) for p in head["params"] if p.requires_grad] == [id(model.fc.weight)]
    assert filters["orthogonal"] and not head["orthogonal"] and filters["momentum"] == 0.6
    assert (filters["lr"], biases["lr"], head["lr"]) == (0.24, pytest.approx(64 * r.lr), r.lr)
    scheduler = optim.linear_decay(optimizer, total_steps=200)
    lrs = []
    for _ in range(200):
        lrs.append([g["lr"] for g in optimizer.param_groups])
        optimizer.step()
        scheduler.step()
    lrs = np.array(lrs)
    np.testing.assert_allclose(lrs[:, 2], 0.24 * (1 - np.arange(200) / 200), rtol=1e-9)
    np.testing.assert_allclose(lrs / lrs[0], np.repeat((lrs[:, 2] / 0.24)[:, None], 3, 1), rtol=1e-9)
    for bad, message in (({"optimizer": "adam"}, "set optimizer to sgd"), ({"muon_lr": -1.0}, "muon_lr")):
        with pytest.raises(ConfigError, match=message):
            config.recipe("fast", **bad)
    with pytest.raises(ConfigError, match="muon_lr: options of the fast net only"):
        config.recipe("resnet9", muon_lr=0.24)


def test_muon_recipe_trains_and_resumes_exactly(tiny_data, tmp_path):
    r = config.recipe("fast", smoke=True, epochs=2, micro_batch=48, **AIRBENCH)      # 128 = 48 + 48 + 32
    options = hardware.RunOptions("cpu", fast_augment=True)
    run = engine.train(r, tiny_data, options, log=lambda line: None)
    assert learned(run) and run["history"]["lr"][-1] == pytest.approx(r.lr / len(run["history"]["lr"]))
    _check_resumes_exactly(r, tiny_data, options, run, tmp_path)


def _check_resumes_exactly(r, data, options, run, tmp_path):
    """Interrupt the recipe's training in its second epoch, resume it from the first epoch's
    checkpoint, and compare with the uninterrupted `run`: the same history and weights."""
    calls = []

    def stop_in_second_epoch(line):             # raised before epoch 2's checkpoint: the file holds epoch 1
        calls.append(line)
        if len(calls) == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        engine.train(r, data, options, checkpoint_path=tmp_path / "cut.pt", log=stop_in_second_epoch)
    resumed = engine.train(r, data, options, checkpoint_path=tmp_path / "cut.pt", resume=tmp_path / "cut.pt",
                           log=lambda line: None)
    assert resumed["history"]["eval_acc"] == run["history"]["eval_acc"]
    assert all(torch.equal(v, run["model"].state_dict()[k]) for k, v in resumed["model"].state_dict().items())


def test_lookahead_counts_the_steps_fp16_skips():
    """Under fp16 the grad scaler skips a step whose gradients overflowed; the Lookahead counts
    it once, as it counts a step taken, so its last batch still ends on the average. Here the
    first steps overflow (a huge loss scale, halved at each) and the later ones step."""
    import warnings

    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 3))
    batches = [(torch.randn(8, 3, 2, 2), torch.arange(8) % 3) for _ in range(8)]
    look = optim.Lookahead(torch.optim.SGD(model.parameters(), lr=0.1), model, total_steps=len(batches), every=2)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 21, growth_interval=1000)   # fp16 overflows at first
    before = copy.deepcopy(model.state_dict())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loop.train_one_epoch(model, batches, look, options=hardware.RunOptions("cpu", "fp16", progress=False),
                             scaler=scaler)
    skipped = 21 - int(np.log2(scaler.get_scale()))
    assert 0 < skipped < len(batches) and look.steps == len(batches)      # some skipped, some taken: each counted once
    assert not all(torch.equal(v, before[k]) for k, v in model.state_dict().items())   # the taken ones moved it
