"""Models: parameter counts from the seeds, output shapes, a forward and backward pass."""
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
