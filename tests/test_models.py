"""Models: parameter counts from the seeds, output shapes, a forward and backward pass."""
import pytest
import torch
from torch import nn

from helpers.errors import ConfigError
from helpers.models import MODELS, ResNet9, count_parameters, get_model


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
    out = model(x)
    assert out.shape == (4, 10)
    nn.CrossEntropyLoss()(out, torch.tensor([0, 1, 2, 3])).backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert sum(g.abs().sum().item() for g in grads) > 0


def test_unknown_model_name_is_a_clear_error():
    with pytest.raises(ConfigError, match="unknown model 'resnet50': choose one of resnet9, vgg, compact"):
        get_model("resnet50")
