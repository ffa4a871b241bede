"""Models: the three reference systems' networks and the fast net. Each returns logits (the softmax lives in the loss).

  resnet9  S10's custom ResNet (after Page's "How to train your ResNet"),        6,573,120 params
  vgg      the VGG exercise's VGG-style CNN, exactly as its code listing,       34,749,002 params
           (with rank=r its two 4096x4096 layers are low-rank: 1,194,570 + 16,384 r params)
  compact  the Keras CNN (a compact net), ported to PyTorch,                       419,818 params
  fast     a small net for minutes-long CPU runs (ideas of Keller Jordan's airbench94), 1,972,504
           trainable params; its first layer is a frozen whitening filter set from data
"""
from __future__ import annotations

import numbers

import torch
import torch.nn.functional as F
from torch import nn

from .errors import ConfigError


# ----------------------------------------------------------------------------------------
# S10: ResNet-9
# ----------------------------------------------------------------------------------------
def conv_bn(c_in: int, c_out: int, pool: bool = False, dropout: float = 0.0) -> nn.Sequential:
    """Conv 3x3 (s1, p1, no bias) [-> MaxPool 2] -> BN -> ReLU [-> Dropout], as S10 orders them."""
    layers = [nn.Conv2d(c_in, c_out, kernel_size=3, padding=1, bias=False)]
    if pool:
        layers.append(nn.MaxPool2d(2))
    layers += [nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]
    if dropout:
        layers.append(nn.Dropout(dropout))
    return nn.Sequential(*layers)


class Residual(nn.Module):
    """x + ResBlock(x), where ResBlock = (Conv-BN-ReLU) twice at constant width."""

    def __init__(self, channels: int, dropout: float = 0.0):
        super().__init__()
        self.res = nn.Sequential(conv_bn(channels, channels, dropout=dropout),
                                 conv_bn(channels, channels, dropout=dropout))

    def forward(self, x):
        return x + self.res(x)


class ResNet9(nn.Module):
    """S10's ResNet: PrepLayer 64 -> Layer1 128 (+res) -> Layer2 256 -> Layer3 512 (+res)
    -> MaxPool 4 -> FC 10 (no bias). 6,573,120 parameters.

    dropout > 0 puts a Dropout after every Conv-BN-ReLU, as S10 did ("dropout in all
    layers"; its package's default rate is 0.1). logit_scale multiplies the logits, as Page's
    ResNet-9 does (0.125): without it, SGD at Page's LR 0.4 blows the loss up in its first
    steps. Neither has parameters, so checkpoints hold the same weights either way.
    """

    def __init__(self, num_classes: int = 10, dropout: float = 0.0, logit_scale: float = 1.0):
        super().__init__()
        if not 0.0 <= dropout < 1.0:
            raise ConfigError(f"dropout must be in [0, 1), got {dropout!r}: try 0.1")
        if not logit_scale > 0:
            raise ConfigError(f"logit_scale must be > 0, got {logit_scale!r}: try 0.125")
        self.logit_scale = logit_scale
        self.prep = conv_bn(3, 64, dropout=dropout)
        self.layer1 = nn.Sequential(conv_bn(64, 128, pool=True, dropout=dropout), Residual(128, dropout))
        self.layer2 = conv_bn(128, 256, pool=True, dropout=dropout)
        self.layer3 = nn.Sequential(conv_bn(256, 512, pool=True, dropout=dropout), Residual(512, dropout))
        self.pool = nn.MaxPool2d(4)
        self.fc = nn.Linear(512, num_classes, bias=False)

    def forward(self, x):
        x = self.layer3(self.layer2(self.layer1(self.prep(x))))
        logits = self.fc(torch.flatten(self.pool(x), 1))
        return logits * self.logit_scale if self.logit_scale != 1.0 else logits


# ----------------------------------------------------------------------------------------
# The VGG exercise: VGG-style CNN (6 convs with ReLU, 3 max-pools, 3 linear layers with dropout)
# ----------------------------------------------------------------------------------------
VGG_WIDTH = 4096          # the hidden linear layers' width: 256 channels x 4 x 4 pixels
VGG_LOW_RANK_LAYERS = (0, 3)     # lin.0 and lin.3, the two 4096x4096 layers (33.5 M of 34.7 M parameters)


def check_rank(rank) -> int:
    """`rank` as an int, or a one-line ConfigError unless it is a whole number from 1 to 4095."""
    if isinstance(rank, bool) or not isinstance(rank, numbers.Integral) or not 0 < rank < VGG_WIDTH:
        raise ConfigError(f"rank must be a whole number from 1 to {VGG_WIDTH - 1}, got {rank!r}: "
                          "try 384 (the largest whose fp16 vgg file fits 15 MB)")
    return int(rank)


class LowRank(nn.Sequential):
    """A Linear layer in -> out as two: in -> rank (no bias), then rank -> out (the original
    bias). Its weight is B @ A, a matrix of rank at most `rank`, in rank * (in + out) numbers."""

    def __init__(self, in_features: int, out_features: int, rank: int):
        super().__init__(nn.Linear(in_features, rank, bias=False), nn.Linear(rank, out_features))
        self.rank = rank

    @classmethod
    @torch.no_grad()
    def from_linear(cls, linear: nn.Linear, rank: int, svd=None) -> "LowRank":
        """The best rank-`rank` approximation of `linear` (Eckart-Young): the truncated SVD
        W = U S V^T in float32, with sqrt(S) in each factor so both have the same scale (it
        keeps them in fp16's range). At rank min(in, out) it computes the same function.
        `svd`: the layer's (U, S, Vh) from `svd_of`, when already computed."""
        out_features, in_features = linear.weight.shape
        if not 0 < rank <= min(in_features, out_features):
            raise ConfigError(f"rank must be from 1 to {min(in_features, out_features)} for a "
                              f"{in_features} -> {out_features} layer, got {rank!r}")
        u, s, vh = svd if svd is not None else svd_of(linear.weight)
        root = s[:rank].sqrt()
        low = cls(in_features, out_features, rank).to(linear.weight.device)
        low[0].weight.copy_(root[:, None] * vh[:rank])
        low[1].weight.copy_(u[:, :rank] * root)
        if linear.bias is not None:
            low[1].bias.copy_(linear.bias.float())
        else:
            low[1].bias.zero_()
        return low


def svd_of(weight: torch.Tensor):
    """(U, S, Vh) of a weight matrix, in float32 (a 4096x4096 one takes 10-30 s on one CPU core)."""
    return torch.linalg.svd(weight.detach().float(), full_matrices=False)


class VGGNet(nn.Module):
    """The VGG exercise's network, layer for layer as in its listing.

    rank=r makes lin.0 and lin.3 (4096 -> 4096) `LowRank` layers (4096 -> r -> 4096): what
    `low_rank_vgg` turns a trained model into, to ship it small. Without it the network and its
    state_dict are exactly the VGG exercise's."""

    def __init__(self, num_classes: int = 10, rank: int | None = None):
        super().__init__()
        self.rank = None if rank is None else check_rank(rank)
        self.conv = nn.Sequential(
            nn.Conv2d(3, out_channels=64, kernel_size=3, padding=1), nn.ReLU(),
            nn.Conv2d(64, out_channels=64, kernel_size=3, padding=1), nn.ReLU(),
            nn.MaxPool2d(kernel_size=2, stride=2),
            nn.Conv2d(64, out_channels=128, kernel_size=3, padding=1), nn.ReLU(),
            nn.Conv2d(128, out_channels=128, kernel_size=3, padding=1), nn.ReLU(),
            nn.MaxPool2d(kernel_size=2, stride=2),
            nn.Conv2d(128, out_channels=256, kernel_size=3, padding=1), nn.ReLU(),
            nn.Conv2d(256, out_channels=256, kernel_size=3, padding=1), nn.ReLU(),
            nn.MaxPool2d(kernel_size=2, stride=2),
        )

        def hidden():
            w = VGG_WIDTH
            return nn.Linear(w, w) if self.rank is None else LowRank(w, w, self.rank)

        self.lin = nn.Sequential(
            hidden(), nn.ReLU(), nn.Dropout(p=0.5),
            hidden(), nn.ReLU(), nn.Dropout(p=0.5),
            nn.Linear(VGG_WIDTH, num_classes),
        )

    @property
    def options(self) -> dict:
        """What get_model needs besides the name to rebuild this network: {'rank': r} or {}."""
        return {} if self.rank is None else {"rank": self.rank}

    def forward(self, x):
        return self.lin(torch.flatten(self.conv(x), 1))


@torch.no_grad()
def low_rank_vgg(model: VGGNet, rank: int, svds: dict | None = None) -> VGGNet:
    """A copy of a full (trained) VGG whose lin.0 and lin.3 are their truncated SVDs at `rank`
    (`LowRank.from_linear`); the convolutions and the last layer are copied unchanged. Its
    state_dict loads into get_model("vgg", rank=rank). `svds`: a dict that keeps each layer's
    SVD between calls at several ranks (pass the same dict each time)."""
    if not isinstance(model, VGGNet) or model.rank is not None:
        raise ConfigError("low_rank_vgg factorises a full VGGNet (get_model('vgg') without rank)")
    low = VGGNet(model.lin[-1].out_features, rank=rank).to(next(model.parameters()).device)
    low.conv.load_state_dict(model.conv.state_dict())
    low.lin[-1].load_state_dict(model.lin[-1].state_dict())
    for i in VGG_LOW_RANK_LAYERS:
        if svds is not None and i not in svds:
            svds[i] = svd_of(model.lin[i].weight)
        low.lin[i] = LowRank.from_linear(model.lin[i], low.rank, None if svds is None else svds[i])
    return low.train(model.training)


# ----------------------------------------------------------------------------------------
# The Keras CNN: compact CNN (Keras original: Conv -> BN -> ELU, same padding)
# ----------------------------------------------------------------------------------------
def conv_bn_elu(c_in: int, c_out: int) -> list[nn.Module]:
    return [nn.Conv2d(c_in, c_out, kernel_size=3, padding=1), nn.BatchNorm2d(c_out), nn.ELU()]


class CompactCNN(nn.Module):
    """The Keras CNN: three blocks of two convs (32, 64, 128 filters), each block ending in a 2x2
    max-pool and dropout (0.2, 0.2, 0.3); then Dense 64 -> BN -> ELU -> dropout 0.3 -> Dense 10.
    419,818 trainable parameters (Keras counts 420,842 with BatchNorm's 1,024 moving statistics).
    """

    def __init__(self, num_classes: int = 10):
        super().__init__()
        blocks = []
        for c_in, c_out, drop in ((3, 32, 0.2), (32, 64, 0.2), (64, 128, 0.3)):
            blocks += conv_bn_elu(c_in, c_out) + conv_bn_elu(c_out, c_out)
            blocks += [nn.MaxPool2d(2), nn.Dropout(drop)]
        self.features = nn.Sequential(*blocks)
        self.head = nn.Sequential(
            nn.Flatten(), nn.Linear(128 * 4 * 4, 64), nn.BatchNorm1d(64), nn.ELU(),
            nn.Dropout(0.3), nn.Linear(64, num_classes),
        )

    def forward(self, x):
        return self.head(self.features(x))


# ----------------------------------------------------------------------------------------
# Beyond the three reference systems: the fast net (about 1/3 of ResNet-9's arithmetic per image)
# ----------------------------------------------------------------------------------------
WHITEN_SIZE = 2           # the whitening filters see 2x2 patches: 2*2*3 = 12 dimensions
WHITEN_EPS = 5e-4         # added to each eigenvalue: keeps near-empty directions from blowing up


def conv_group(c_in: int, c_out: int) -> nn.Sequential:
    """Conv 3x3 -> MaxPool 2 -> BN -> GELU -> Conv 3x3 -> BN -> GELU (no conv biases)."""
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.MaxPool2d(2), nn.BatchNorm2d(c_out), nn.GELU(),
        nn.Conv2d(c_out, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.GELU())


class FastNet(nn.Module):
    """Whitening 2x2 conv (24 fixed filters, learned biases) -> GELU -> conv groups 64, 256, 256
    -> MaxPool 3 -> linear 256 -> 10 (no bias), outputs x 1/9. 31x31 -> 15 -> 7 -> 3 -> 1 pixels.

    The whitening filters are not learned: `init_whitening` computes them from the covariance
    of 2x2 patches of real training images, so that the first layer hands the next one
    decorrelated inputs of unit variance (12 eigen-directions, each with its negative).
    Training before that is refused: random fixed filters would silently cost accuracy.
    `learn_first_layer()` instead trains the 2x2 conv from its random initialisation, as an
    ordinary layer (the ablation that measures what the whitening is worth).
    """

    def __init__(self, num_classes: int = 10, widths=(64, 256, 256), output_scale: float = 1 / 9):
        super().__init__()
        dims = 3 * WHITEN_SIZE ** 2
        self.whiten = nn.Conv2d(3, 2 * dims, WHITEN_SIZE, bias=True)
        self.whiten.weight.requires_grad_(False)          # set from data, not trained (but see learn_first_layer)
        self.register_buffer("whitened", torch.tensor(False))   # set by init_whitening, saved with the weights
        self.act = nn.GELU()
        c = [2 * dims, *widths]
        self.groups = nn.Sequential(*(conv_group(a, b) for a, b in zip(c, c[1:])))
        self.pool = nn.MaxPool2d(3)
        self.fc = nn.Linear(widths[-1], num_classes, bias=False)
        self.output_scale = output_scale
        self.whiten_bias_epochs: int | None = None     # see set_epoch
        self._ready = False                            # True once a training forward found the filters set

    def learn_first_layer(self) -> "FastNet":
        """No whitening: the first layer's filters are trained like any other weights."""
        self.whiten.weight.requires_grad_(True)
        return self

    def set_epoch(self, epoch: int) -> None:
        """Called by helpers.engine.fit before each epoch: with `whiten_bias_epochs` = n, the
        whitening bias trains in epochs 0..n-1 and is frozen from then on (airbench: n = 3).
        (Under DistributedDataParallel a parameter must not change requires_grad mid-run.)"""
        if self.whiten_bias_epochs is not None:
            self.whiten.bias.requires_grad_(epoch < self.whiten_bias_epochs)

    def forward(self, x):
        if self.training and not self._ready:        # checked once: reading the buffer waits on the device
            if not (self.whitened or self.whiten.weight.requires_grad):
                raise ConfigError("the fast net's whitening filters are not set: call "
                                  "helpers.models.init_whitening(model, training_images) first (engine.train does)")
            self._ready = True
        x = self.groups(self.act(self.whiten(x)))
        return self.fc(torch.flatten(self.pool(x), 1)) * self.output_scale


@torch.no_grad()
def init_whitening(model: FastNet, images: torch.Tensor, eps: float = WHITEN_EPS,
                   chunk: int = 500) -> torch.Tensor:
    """Set the whitening filters from normalised NCHW training images; returns the
    eigenvalues, largest first (the filters' order).

    Every 2x2 patch is a 12-vector. With its covariance C = V diag(lam) V^T, the filters
    V^T / sqrt(lam + eps) map patches to uncorrelated unit-variance outputs (their negatives
    fill the other 12 channels, so GELU keeps both signs), and the bias centres them.
    """
    k, dims = WHITEN_SIZE, 3 * WHITEN_SIZE ** 2
    total, outer, n = torch.zeros(dims, dtype=torch.float64), torch.zeros(dims, dims, dtype=torch.float64), 0
    for start in range(0, len(images), chunk):        # (N*31*31, 12) patches, a chunk at a time
        p = F.unfold(images[start:start + chunk].float(), k).transpose(1, 2).reshape(-1, dims).double()
        total, outer, n = total + p.sum(0), outer + p.T @ p, n + len(p)
    mean = total / n
    cov = (outer - n * torch.outer(mean, mean)) / (n - 1)
    lam, vecs = torch.linalg.eigh(cov)                 # ascending ...
    lam, vecs = lam.flip(0), vecs.flip(1)              # ... made largest first
    w = vecs.T / torch.sqrt(lam.clamp_min(0) + eps)[:, None]                           # (12, 12): rows = filters
    weight = torch.cat([w, -w]).reshape(-1, 3, k, k)                                 # unfold's (c, kh, kw) order
    model.whiten.weight.copy_(weight.float())
    model.whiten.bias.copy_((-weight.reshape(len(weight), -1) @ mean).float())
    model.whitened.fill_(True)
    return lam.float()


def set_batchnorm(model: nn.Module, *, momentum: float = 0.1, eps: float = 1e-5,
                  frozen_scales: bool = False) -> nn.Module:
    """Every BatchNorm layer's momentum (PyTorch's convention: running = (1 - momentum) * running
    + momentum * batch statistic) and eps; frozen_scales=True fixes the scales (weights) at 1.
    airbench94 uses momentum 0.4 (its "0.6" counts the other way), eps 1e-12 and frozen scales."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.momentum, m.eps = momentum, eps
            if frozen_scales and m.weight is not None:
                with torch.no_grad():
                    m.weight.fill_(1.0)
                m.weight.requires_grad_(False)
    return model


@torch.no_grad()
def dirac_init(model: nn.Module) -> nn.Module:
    """Start every 3x3 convolution with c_in inputs as the identity on its first c_in filters
    (torch.nn.init.dirac_), so that at step 0 each conv passes its input through; the other
    filters keep their random initialisation (airbench94)."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3):
            w = m.weight
            nn.init.dirac_(w[:min(w.shape[0], w.shape[1])])
    return model


# ----------------------------------------------------------------------------------------
# Registry
# ----------------------------------------------------------------------------------------
MODELS = {"resnet9": ResNet9, "vgg": VGGNet, "compact": CompactCNN, "fast": FastNet}


def get_model(name: str, *, num_classes: int = 10, dropout: float = 0.0, logit_scale: float = 1.0,
              rank: int | None = None) -> nn.Module:
    """A fresh model by name: 'resnet9', 'vgg', 'compact' or 'fast'. `dropout` (S10) and
    `logit_scale` (Page) are ResNet-9's options; `rank` (1 to 4095) makes vgg's two 4096x4096
    layers low-rank (see low_rank_vgg); vgg and compact are otherwise exactly their reference
    systems', and fast needs `init_whitening` with training images before it trains."""
    if name not in MODELS:
        raise ConfigError(f"unknown model {name!r}: choose one of {', '.join(MODELS)}")
    if rank is not None and name != "vgg":
        raise ConfigError(f"rank is an option of vgg only, not of {name}")
    if name == "resnet9":
        return ResNet9(num_classes, dropout=dropout, logit_scale=logit_scale)
    if dropout or logit_scale != 1.0:
        raise ConfigError(f"dropout and logit_scale are options of resnet9 only, not of {name}")
    return VGGNet(num_classes, rank=rank) if name == "vgg" else MODELS[name](num_classes)


def count_parameters(model: nn.Module) -> int:
    """Trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
