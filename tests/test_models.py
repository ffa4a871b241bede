"""Models: parameter counts from the seeds, output shapes, a forward and backward pass."""
import numpy as np
import pytest
import torch
from torch import nn

from helpers.errors import ConfigError
from helpers.models import MODELS, ResNet9, count_parameters, get_model, init_whitening


def vgg_count_from_listing() -> int:
    """Seed 003's listing, counted by hand: 6 convs (3x3, with bias) and 3 linear layers."""
    convs = [(3, 64), (64, 64), (64, 128), (128, 128), (128, 256), (256, 256)]
    linears = [(4096, 4096), (4096, 4096), (4096, 10)]
    return sum(9 * i * o + o for i, o in convs) + sum(i * o + o for i, o in linears)


@pytest.mark.parametrize("name, expected", [
    ("resnet9", 6_573_120),          # seed 001's figure, with a bias-free final Linear
    ("compact", 420_842 - 1_024),    # seed 004's Keras total minus BatchNorm's moving statistics
    ("vgg", vgg_count_from_listing()),
])
def test_parameter_counts_match_the_seeds(name, expected):
    assert count_parameters(get_model(name)) == expected


def test_resnet9_final_layer_has_no_bias_and_model_returns_logits():
    model = ResNet9()
    assert model.fc.bias is None
    out = model.eval()(torch.randn(4, 3, 32, 32))
    assert not torch.allclose(out.softmax(1).sum(1), out.sum(1))  # logits, not probabilities


@pytest.mark.parametrize("name", list(MODELS))
def test_forward_and_backward(name):
    torch.manual_seed(0)
    model = get_model(name)
    x = torch.randn(4, 3, 32, 32)
    if name == "fast":
        init_whitening(model, x)                                   # its first layer is computed, not learned
    out = model(x)
    assert out.shape == (4, 10)
    nn.CrossEntropyLoss()(out, torch.tensor([0, 1, 2, 3])).backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]   # fast: whitening is frozen
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert sum(g.abs().sum().item() for g in grads) > 0


def test_unknown_model_name_is_a_clear_error():
    with pytest.raises(ConfigError, match="unknown model 'resnet50': choose one of resnet9, vgg, compact, fast"):
        get_model("resnet50")


def test_resnet9_dropout_follows_every_conv_bn_relu_and_keeps_the_weights():
    plain, dropped = ResNet9(), ResNet9(dropout=0.1)
    convs = sum(isinstance(m, nn.Conv2d) for m in dropped.modules())
    drops = [m for m in dropped.modules() if isinstance(m, nn.Dropout)]
    assert convs == 8 and len(drops) == 8 and all(m.p == 0.1 for m in drops)   # seed 001: all layers
    assert not any(isinstance(m, nn.Dropout) for m in plain.modules())
    # no parameters: the same state_dict keys, so checkpoints load either way
    assert plain.state_dict().keys() == dropped.state_dict().keys()
    dropped.load_state_dict(plain.state_dict())
    x = torch.randn(8, 3, 32, 32)
    plain.eval(), dropped.eval()
    assert torch.equal(plain(x), dropped(x))                 # eval mode: dropout is the identity
    dropped.train()
    torch.manual_seed(0)
    a = dropped(x)
    torch.manual_seed(1)
    assert not torch.equal(a, dropped(x))                    # training mode: random units dropped


def test_dropout_is_checked_and_resnet9_only():
    assert get_model("resnet9", dropout=0.2).layer2[-1].p == 0.2
    for bad in (-0.1, 1.0):
        with pytest.raises(ConfigError, match="dropout must be in"):
            get_model("resnet9", dropout=bad)
    with pytest.raises(ConfigError, match="resnet9 only"):
        get_model("compact", dropout=0.1)


def test_logit_scale_multiplies_the_logits_and_is_rebuilt_from_the_checkpoint(tmp_path):
    from helpers.checkpoint import load_model, save_checkpoint
    from helpers.config import recipe

    torch.manual_seed(0)
    plain, scaled = ResNet9().eval(), ResNet9(logit_scale=0.125).eval()
    scaled.load_state_dict(plain.state_dict())
    x = torch.randn(4, 3, 32, 32)
    assert torch.allclose(scaled(x), plain(x) * 0.125)
    # the tuned recipe (Page) scales its logits; a checkpoint of it predicts the same probabilities
    tuned = recipe("resnet9-tuned", smoke=False)
    assert tuned.logit_scale == 0.125 and recipe("resnet9", smoke=False).logit_scale == 1.0
    path = save_checkpoint(tmp_path / "tuned.pt", scaled, "resnet9", config=tuned.to_dict())
    restored, _ = load_model(path)
    assert torch.allclose(restored(x), scaled(x))
    with pytest.raises(ConfigError, match="logit_scale must be > 0"):
        ResNet9(logit_scale=0)
    with pytest.raises(ConfigError, match="resnet9 only"):
        get_model("vgg", logit_scale=0.125)


# ----------------------------------------------------------------------------------------
# The low-rank vgg (issue 25): lin.0 and lin.3 as truncated SVDs, shipped in fp16
# ----------------------------------------------------------------------------------------
def vgg_count_at_rank(rank: int) -> int:
    """The listing's count with each 4096x4096 layer (weights and bias) as 4096 -> rank -> 4096."""
    return vgg_count_from_listing() - 2 * 4096 * 4096 + 2 * (2 * 4096 * rank)


def test_low_rank_layer_at_full_rank_computes_the_same_function_and_truncation_is_optimal():
    from helpers.models import LowRank, svd_of

    torch.manual_seed(0)
    linear = nn.Linear(48, 64)
    x = torch.randn(16, 48)
    full = LowRank.from_linear(linear, 48)                          # rank min(in, out): exact
    assert [tuple(p.shape) for p in full.parameters()] == [(48, 48), (64, 48), (64,)]
    assert full[0].bias is None and torch.equal(full[1].bias, linear.bias)
    assert torch.allclose(full(x), linear(x), atol=1e-5)
    # below full rank: the error is the dropped singular values (Eckart-Young), nothing more
    s = svd_of(linear.weight)[1]
    low = LowRank.from_linear(linear, 10)
    error = torch.linalg.matrix_norm(low[1].weight @ low[0].weight - linear.weight)
    assert torch.allclose(error, s[10:].square().sum().sqrt(), rtol=1e-4)
    with pytest.raises(ConfigError, match="rank must be from 1 to 48"):
        LowRank.from_linear(linear, 49)


def test_vgg_rank_option_changes_only_the_two_big_layers_and_is_checked():
    full, low = get_model("vgg"), get_model("vgg", rank=384)
    # without rank: seed 003's layers and state_dict keys, so the old checkpoints load as before
    assert full.rank is None and full.options == {} and tuple(full.lin[0].weight.shape) == (4096, 4096)
    assert [k for k in full.state_dict() if k.startswith("lin")] == [
        "lin.0.weight", "lin.0.bias", "lin.3.weight", "lin.3.bias", "lin.6.weight", "lin.6.bias"]
    assert [k for k in low.state_dict() if k.startswith("lin")] == [
        "lin.0.0.weight", "lin.0.1.weight", "lin.0.1.bias", "lin.3.0.weight", "lin.3.1.weight",
        "lin.3.1.bias", "lin.6.weight", "lin.6.bias"]
    assert low.options == {"rank": 384} and get_model("vgg", rank=np.int64(384)).rank == 384
    for rank in (1, 128, 384):
        assert count_parameters(get_model("vgg", rank=rank)) == vgg_count_at_rank(rank) == 1_194_570 + 16_384 * rank
    assert get_model("vgg", rank=384).eval()(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    for bad in (0, -1, 4096, 10_000, 2.5, 384.0, True, "384"):
        with pytest.raises(ConfigError, match="rank must be a whole number from 1 to 4095") as caught:
            get_model("vgg", rank=bad)
        assert "\n" not in str(caught.value)
    with pytest.raises(ConfigError, match="rank is an option of vgg only, not of resnet9"):
        get_model("resnet9", rank=384)


def exact_low_rank_svds(model, k: int, seed: int = 0) -> dict:
    """Make lin.0 and lin.3 of `model` exactly rank k, W = U diag(S) Vh, and return those
    (U, S, Vh) as low_rank_vgg's SVD cache: what svd_of would compute (up to signs), without
    two 4096x4096 SVDs (tens of seconds on a CPU). Descending S, orthonormal U and V."""
    g = torch.Generator().manual_seed(seed)
    svds = {}
    for i in (0, 3):
        u = torch.linalg.qr(torch.randn(4096, k, generator=g))[0]
        v = torch.linalg.qr(torch.randn(4096, k, generator=g))[0]
        s = torch.linspace(2.0, 0.1, k)
        with torch.no_grad():
            model.lin[i].weight.copy_((u * s) @ v.T)
        svds[i] = (u, s, v.T)
    return svds


@pytest.fixture(scope="module")
def vgg_exports(tmp_path_factory):
    """A full fp32 vgg checkpoint whose big layers are exactly rank 40, exported at ranks 8 and 40."""
    from helpers.checkpoint import export_fp16, save_checkpoint

    folder = tmp_path_factory.mktemp("vgg")
    torch.manual_seed(0)
    model = get_model("vgg").eval()
    svds = exact_low_rank_svds(model, 40)
    full = save_checkpoint(folder / "vgg.pt", model, "vgg", mean=[0.5] * 3, std=[0.25] * 3,
                           metrics={"test_acc": 0.79}, optimizer={"big": 1})
    files = {r: export_fp16(full, folder / f"vgg_rank{r}.pt", rank=r, svds=svds, commit="abc123") for r in (8, 40)}
    return model, full, files, svds


def test_low_rank_vgg_export_loads_through_load_model_at_its_rank(vgg_exports):
    from helpers.checkpoint import load_model
    from helpers.models import VGGNet, low_rank_vgg

    model, full, files, svds = vgg_exports
    for rank, path in files.items():
        saved = torch.load(path, weights_only=True)
        assert saved["model_options"] == {"rank": rank} and saved["dtype"] == "float16"
        assert (saved["commit"], saved["metrics"], saved["mean"]) == ("abc123", {"test_acc": 0.79}, [0.5] * 3)
        assert "optimizer" not in saved
        assert all(v.dtype == torch.float16 for v in saved["model"].values() if v.is_floating_point())
        restored, ckpt = load_model(path)
        assert isinstance(restored, VGGNet) and restored.rank == rank and not restored.training
        assert count_parameters(restored) == vgg_count_at_rank(rank)
        assert all(p.dtype == torch.float32 for p in restored.parameters())
        # what was shipped is the in-memory factorisation, rounded to fp16
        assert relative_difference(restored, low_rank_vgg(model, rank, svds).eval()) < 1e-3
    # the big layers are exactly rank 40: at rank 40 the shipped model computes the full model's
    # function (to fp16 rounding, as the plain fp16 export does); rank 8 drops most of it
    assert relative_difference(load_model(files[40])[0], model) < 1e-3
    assert relative_difference(load_model(files[8])[0], model) > 0.01            # 0.023


@torch.no_grad()
def relative_difference(a, b) -> float:
    """|a(x) - b(x)| / |b(x)| of the logits, on random images."""
    x = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    return ((a(x) - b(x)).norm() / b(x).norm()).item()


def test_low_rank_vgg_file_size_is_the_arithmetic(vgg_exports):
    """fp16 weights: 2 bytes x (1,194,570 + 16,384 r) parameters; torch's zip adds a few kB."""
    _, full, files, _ = vgg_exports
    size = {rank: path.stat().st_size for rank, path in files.items()}
    assert size[40] - size[8] == 2 * 16_384 * (40 - 8)               # 32,768 bytes per unit of rank
    overhead = size[8] - 2 * vgg_count_at_rank(8)
    assert 0 < overhead < 20_000
    assert 2 * vgg_count_at_rank(384) + overhead <= 15_000_000 < 2 * vgg_count_at_rank(385) + overhead
    assert full.stat().st_size > 4 * vgg_count_from_listing()        # fp32, 139 MB


def test_low_rank_checkpoints_record_their_rank_and_bad_ranks_are_refused(vgg_exports, tmp_path):
    from helpers.checkpoint import export_fp16, load_model, save_checkpoint
    from helpers.errors import CheckpointError

    model, full, files, _ = vgg_exports
    # a low-rank module saved as it is records its rank itself, and re-exporting keeps it
    low = get_model("vgg", rank=8)
    assert torch.load(save_checkpoint(tmp_path / "m.pt", low, "vgg"), weights_only=True)["model_options"] == {"rank": 8}
    assert load_model(tmp_path / "m.pt")[0].rank == 8
    assert load_model(export_fp16(files[8], tmp_path / "again.pt"))[0].rank == 8
    # rank is for a full vgg only, and checked before any SVD
    for path, bad in ((full, 0), (full, 4096), (full, 2.5), (files[8], 4), (full, None)):
        source = save_checkpoint(tmp_path / "c.pt", get_model("compact"), "compact") if bad is None else path
        with pytest.raises(ConfigError) as caught:
            export_fp16(source, tmp_path / "bad.pt", rank=bad if bad is not None else 8)
        assert "\n" not in str(caught.value) and not (tmp_path / "bad.pt").exists()
    # weights without their rank, or a rank the weights do not have: one-line CheckpointErrors
    saved = torch.load(files[8], weights_only=True)
    for options, match in (({}, r"do not fit the vgg architecture: "), ({"rank": 9}, r"architecture with \{'rank': 9\}"),
                           ({"rank": 0}, "records options its vgg model cannot take"),
                           ({"width": 2}, "records model options")):
        save_checkpoint(tmp_path / "wrong.pt", saved["model"], "vgg", model_options=options)
        with pytest.raises(CheckpointError, match=match):
            load_model(tmp_path / "wrong.pt")
