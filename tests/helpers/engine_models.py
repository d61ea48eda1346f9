"""Small models and data shared by the engine's tests (models, explain, gradcamo)."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn


def lively(model: nn.Module, seed: int = 0) -> nn.Module:
    """Re-draw weights and batch-norm statistics so that signals neither vanish nor explode.

    A freshly initialised EfficientNet's activations shrink ~30x per stage (logits
    ~1e-15), which would make every comparison trivially true. Returns ``model``
    in eval mode.
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (nn.Conv3d, nn.Linear)):
                fan_in = module.weight[0].numel()
                module.weight.copy_(torch.randn(module.weight.shape, generator=gen) * (3.0 / fan_in) ** 0.5)
                if module.bias is not None:
                    module.bias.copy_(torch.randn(module.bias.shape, generator=gen) * 0.05)
            elif isinstance(module, nn.modules.batchnorm._BatchNorm):
                n = module.num_features
                module.weight.copy_(1 + 0.2 * torch.randn(n, generator=gen))
                module.bias.copy_(0.05 * torch.randn(n, generator=gen))
                module.running_mean.copy_(0.1 * torch.randn(n, generator=gen))
                module.running_var.copy_(0.5 + torch.rand(n, generator=gen))
    return model.eval()


class TinyCNN(nn.Module):
    """The tests' small generic 3D CNN (not an EfficientNet): conv-act-conv-act-pool-linear.

    Parameters
    ----------
    in_channels, num_classes : int
        Input channels and logits.
    width : int
        Channels of the first convolution (and of the second unless ``width2``).
    width2 : int, optional
        Channels of the second convolution.
    stride : int or (int, int, int)
        Stride of the second convolution.
    activation : type
        Activation module class (``nn.ReLU``; ``nn.Tanh`` for smooth gradient checks).
    bias : bool
        Biases in the convolutions and the linear layer.
    """

    def __init__(self, in_channels: int = 2, num_classes: int = 3, width: int = 4, *, width2: int | None = None,
                 stride: int | tuple[int, int, int] = 2, activation: type = nn.ReLU, bias: bool = True) -> None:
        super().__init__()
        width2 = width if width2 is None else width2
        self.conv1 = nn.Conv3d(in_channels, width, 3, padding=1, bias=bias)
        self.act1 = activation()
        self.conv2 = nn.Conv3d(width, width2, 3, stride=stride, padding=1, bias=bias)
        self.act2 = activation()
        self.pool = nn.AdaptiveAvgPool3d(1)
        self.fc = nn.Linear(width2, num_classes, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act2(self.conv2(self.act1(self.conv1(x))))
        return self.fc(self.pool(x).flatten(1))


def seeded_tiny_cnn(in_channels: int = 2, num_classes: int = 3, seed: int = 0, **options) -> TinyCNN:
    """A :class:`TinyCNN` with weights drawn after ``torch.manual_seed(seed)``, in eval mode."""
    torch.manual_seed(seed)
    return TinyCNN(in_channels, num_classes, **options).eval()


class SharedActivationCNN(TinyCNN):
    """Calls one activation module twice per forward pass (like MONAI's stock EfficientNet)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act1(self.conv2(self.act1(self.conv1(x))))
        return self.fc(self.pool(x).flatten(1))


def crops_and_masks(n: int, channels: int, grid: tuple[int, int, int], seed: int = 0):
    """Cell-like float32 crops ``(n, c, z, y, x)`` and bool masks ``(n, z, y, x)``.

    Each crop is noise plus a per-cell, per-channel offset plus a bright ellipsoid
    (the central cell, also the mask) with a per-cell, per-channel intensity, so
    that different cells give different logits and CAMs.
    """
    rng = np.random.default_rng(seed)
    zz, yy, xx = np.meshgrid(*(np.linspace(-1, 1, s) for s in grid), indexing="ij")
    crops = np.empty((n, channels, *grid), dtype=np.float32)
    masks = np.empty((n, *grid), dtype=bool)
    for i in range(n):
        centre = rng.uniform(-0.5, 0.5, size=3)
        radius = rng.uniform(0.3, 0.7)
        masks[i] = (zz - centre[0]) ** 2 + (yy - centre[1]) ** 2 + (xx - centre[2]) ** 2 < radius**2
        offset = rng.normal(size=(channels, 1, 1, 1))
        amplitude = rng.normal(scale=2.0, size=(channels, 1, 1, 1))
        crops[i] = 0.5 * rng.normal(size=(channels, *grid)) + offset + amplitude * masks[i]
    return crops, masks
