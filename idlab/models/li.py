"""The networks of Li et al. 2018 (MNIST FC, LeNet) and a plain MLP.

Parameter counts match the paper's Table 1 exactly:
``mnist_fc()`` D = 199,210, ``lenet()`` D = 44,426, ``lenet(in_channels=3, image_size=32)``
D = 62,006 (CIFAR-10).
"""

from __future__ import annotations

from torch import Tensor, nn


class MLP(nn.Module):
    """Fully connected ReLU network, input flattened: (B, *) -> (B, sizes[-1])."""

    def __init__(self, sizes: tuple[int, ...] = (784, 200, 200, 10)) -> None:
        super().__init__()
        if len(sizes) < 2:
            raise ValueError(f"MLP needs at least an input and an output size, got sizes={sizes}")
        layers: list[nn.Module] = []
        for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):  # noqa: RUF007
            layers.append(nn.Linear(a, b))
            if i < len(sizes) - 2:
                layers.append(nn.ReLU())
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x.flatten(1))  # (B, in) -> (B, out)


def mnist_fc(hidden: tuple[int, ...] = (200, 200), num_classes: int = 10) -> MLP:
    """Li et al.'s MNIST FC network 784-200-200-10 (D = 199,210 by default)."""
    return MLP((784, *hidden, num_classes))


class LeNet(nn.Module):
    """LeNet-5 as in Li et al.: conv6-pool-conv16-pool-fc120-fc84-fc10, ReLU.

    Input (B, C, H, W) with H = W = image_size; output logits (B, num_classes).
    """

    def __init__(self, in_channels: int = 1, image_size: int = 28, num_classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 6, 5), nn.ReLU(), nn.MaxPool2d(2),  # (B, 6, (H-4)/2, .)
            nn.Conv2d(6, 16, 5), nn.ReLU(), nn.MaxPool2d(2),  # (B, 16, s, s)
        )
        s = ((image_size - 4) // 2 - 4) // 2
        self.classifier = nn.Sequential(
            nn.Linear(16 * s * s, 120), nn.ReLU(),
            nn.Linear(120, 84), nn.ReLU(),
            nn.Linear(84, num_classes),
        )
        self.in_channels, self.image_size = in_channels, image_size

    def forward(self, x: Tensor) -> Tensor:
        if x.ndim == 2:  # flat pixels (B, C*H*W) -> images
            x = x.view(x.shape[0], self.in_channels, self.image_size, self.image_size)
        return self.classifier(self.features(x).flatten(1))


def lenet(in_channels: int = 1, image_size: int = 28, num_classes: int = 10) -> LeNet:
    """Li et al.'s LeNet (D = 44,426 on MNIST; 62,006 with in_channels=3, image_size=32)."""
    return LeNet(in_channels, image_size, num_classes)


def num_parameters(model: nn.Module) -> int:
    """Total number of parameter entries of ``model``."""
    return sum(p.numel() for p in model.parameters())
