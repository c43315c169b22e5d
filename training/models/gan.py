"""DCGAN-style networks shared by the GAN, WGAN and CGAN families.

Generator: [dense ->] dense -> reshape to 7x7 -> two stride-2 transposed convolutions with LeakyReLU -> tanh.
Discriminator: two (or three) stride-2 convolutions with LeakyReLU -> one dense logit. For a WGAN the same
network is the critic: its output is a raw score, with no sigmoid anywhere.
Conditional when num_classes > 0: the generator reads z next to a float class vector (a one-hot or
any blend of them); the discriminator reads the class as constant planes beside the image.
With `info_codes` (InfoGAN's categorical code, Chen et al. 2016; no labels) an unconditional generator reads
a one-hot code beside z, and the discriminator has a second head that names the code from the image.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class GANConfig:
    latent_dim: int = 64
    g_channels: int = 64   # generator width at 14x14; 2x this at 7x7
    d_channels: int = 64   # discriminator width at 14x14; 2x this at 7x7
    d_norm: str = "layer"  # "layer" or "none"; never batch norm: it breaks the gradient penalty
    d_spectral: bool = False  # spectral normalisation of every discriminator weight (Miyato et al. 2018)
    mbstd_group: int = 0   # discriminator: minibatch standard deviation over groups of this many (0: off)
    g_refine: int = 0      # generator: extra 3x3 conv blocks (stride 1) at 7x7 and at 14x14 each
    g_hidden: int = 0      # generator: a dense layer of this many units before the 7x7 projection (InfoGAN's
                           # MNIST generator has 1024; 0: none)
    d_layers: int = 2      # discriminator: stride-2 convolutions; 3 adds one to 4x4 with 4x the width (the
                           # WGAN-GP authors' MNIST critic has three)
    info_codes: int = 0    # InfoGAN's categorical code of this many values (0: none); see `info_code`
    info_weight: float = 1.0  # lambda of the code's cross-entropy in both networks' losses (InfoGAN's 1)


def info_code(z: torch.Tensor, values: int) -> torch.Tensor:
    """The categorical code a generator draws: the one-hot argmax of z's first `values` entries.

    z's entries are iid N(0, 1), so each value is equally likely, and the code is a function of z: the
    exported graph keeps its one input, the same z draws the same image, and a truncated z (psi * z)
    keeps its code. Ties (z = 0, say) go to the first of the largest entries, as argmax's do. Written
    with the maximum and a running count rather than argmax and one_hot, so that it exports to ONNX as
    ReduceMax, Equal, CumSum and Cast."""
    head = z[:, :values]
    leading = (head == head.amax(dim=1, keepdim=True)).to(z.dtype)
    return leading * (leading.cumsum(dim=1) == 1).to(z.dtype)


class Generator(nn.Module):
    def __init__(self, config: GANConfig, num_classes: int = 0):
        super().__init__()
        self.latent_dim, self.num_classes = config.latent_dim, num_classes
        self.info_codes = 0 if num_classes else config.info_codes  # a conditional model has its class
        c, width = config.g_channels, config.latent_dim + num_classes + self.info_codes
        hidden = [nn.Linear(width, config.g_hidden, bias=False), nn.BatchNorm1d(config.g_hidden),
                  nn.LeakyReLU(0.2)] if config.g_hidden else []                 # [N, g_hidden]
        self.project = nn.Sequential(
            *hidden,
            nn.Linear(config.g_hidden or width, 2 * c * 49, bias=False),
            nn.BatchNorm1d(2 * c * 49), nn.LeakyReLU(0.2),
            nn.Unflatten(1, (2 * c, 7, 7)),                                     # [N, 2c, 7, 7]
        )
        self.upsample = nn.Sequential(
            *_refine(2 * c, config.g_refine),                                   # [N, 2c, 7, 7]
            nn.ConvTranspose2d(2 * c, c, 4, stride=2, padding=1, bias=False),  # [N, c, 14, 14]
            nn.BatchNorm2d(c), nn.LeakyReLU(0.2),
            *_refine(c, config.g_refine),                                       # [N, c, 14, 14]
            nn.ConvTranspose2d(c, 1, 4, stride=2, padding=1),                   # [N, 1, 28, 28]
            nn.Tanh(),
        )

    def inputs(self, z: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """What the first layer reads: z, then the class vector or the categorical code."""
        if self.num_classes:
            assert y is not None, "a conditional generator needs the class vector y"
            return torch.cat([z, y], dim=1)
        if self.info_codes:
            return torch.cat([z, info_code(z, self.info_codes)], dim=1)
        return z

    def forward(self, z: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """Images in [-1, 1], the scale the discriminator sees."""
        return self.upsample(self.project(self.inputs(z, y)))

    def generate(self, z: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """The exported interface: intensities in [0, 1] (clamped: float rounding of tanh can land a hair outside)."""
        return ((self.forward(z, y) + 1) * 0.5).clamp(0.0, 1.0)


def _refine(channels: int, blocks: int) -> list[nn.Module]:
    """`blocks` 3x3 convolutions that keep the resolution: depth where the strokes are drawn."""
    return [layer for _ in range(blocks) for layer in (
        nn.Conv2d(channels, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels), nn.LeakyReLU(0.2))]


class MinibatchStd(nn.Module):
    """Appends one plane: the mean standard deviation of the features across each group of `group`
    consecutive images (Karras et al. 2018). A generator that draws the same few digits gives its group
    a low value, which the discriminator can then punish: a check on mode dropping. Groups never mix real
    and fake when both halves of the batch are multiples of `group`."""

    def __init__(self, group: int):
        super().__init__()
        self.group = group

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        n, c, height, width = h.shape
        g = self.group if n % self.group == 0 else 1
        grouped = h.float().view(n // g, g, c, height, width)                              # consecutive groups
        spread = (grouped.var(dim=1, unbiased=False) + 1e-8).sqrt().mean(dim=(1, 2, 3))   # [N / g]
        plane = spread.repeat_interleave(g)[:, None, None, None].expand(n, 1, height, width)  # [N, 1, H, W]
        return torch.cat([h, plane.to(h.dtype)], dim=1)


class Discriminator(nn.Module):
    def __init__(self, config: GANConfig, num_classes: int = 0):
        super().__init__()
        self.num_classes = num_classes
        self.info_codes = 0 if num_classes else config.info_codes
        c = config.d_channels
        if config.d_layers not in (2, 3):
            raise ValueError(f"d_layers={config.d_layers}: 2 or 3")
        last, side = (4 * c, 4) if config.d_layers == 3 else (2 * c, 7)

        def norm(channels: int, size: int) -> nn.Module:
            return nn.LayerNorm([channels, size, size]) if config.d_norm == "layer" else nn.Identity()
        deeper = [nn.Conv2d(2 * c, 4 * c, 3, stride=2, padding=1), norm(4 * c, 4), nn.LeakyReLU(0.2)] \
            if config.d_layers == 3 else []                                             # [N, 4c, 4, 4]
        extra = [MinibatchStd(config.mbstd_group)] if config.mbstd_group > 1 else []  # one more plane
        self.net = nn.Sequential(
            nn.Conv2d(1 + num_classes, c, 4, stride=2, padding=1), nn.LeakyReLU(0.2),  # [N, c, 14, 14]
            nn.Conv2d(c, 2 * c, 4, stride=2, padding=1), norm(2 * c, 7), nn.LeakyReLU(0.2),  # [N, 2c, 7, 7]
            *deeper,
            *extra,
            nn.Flatten(),
            nn.Linear((last + len(extra)) * side * side, 1),
        )
        # InfoGAN's Q: the code's logits from the features the score is read from
        self.code_head = nn.Linear((last + len(extra)) * side * side, self.info_codes) if self.info_codes else None
        if config.d_spectral:  # each weight divided by its largest singular value: D is 1-Lipschitz per layer
            for layer in self.net:
                if isinstance(layer, (nn.Conv2d, nn.Linear)):
                    nn.utils.parametrizations.spectral_norm(layer)

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None,
                codes: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """One logit (GAN) or score (WGAN critic) per image: [N]; with `codes`, also the logits of the
        categorical code each image was drawn with, [N, info_codes] (one pass for both)."""
        if self.num_classes:
            assert y is not None, "a conditional discriminator needs the class vector y"
            planes = y[:, :, None, None].expand(-1, -1, x.shape[2], x.shape[3])  # [N, classes, 28, 28]
            x = torch.cat([x, planes], dim=1)
        if not codes:
            return self.net(x).squeeze(1)
        assert self.code_head is not None, "codes=True needs a discriminator built with info_codes"
        features = self.net[:-1](x)
        return self.net[-1](features).squeeze(1), self.code_head(features)
