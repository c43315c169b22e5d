"""Variational autoencoders: a dense one, a convolutional one, and the conditional (CVAE) form.

Each encodes an image to a mean and log-variance, samples z = mu + exp(logvar / 2) * eps and decodes
z back to pixel logits. `generate(z, y)` is the exported decoder: intensities in [0, 1]. With a prior
flow (`prior_flow` > 0 couplings) it first maps the N(0, I) noise onto where the latents live. An
`output_temperature` below 1 (set at export, `--sharpen`) divides the logits before the sigmoid: the
Bernoulli mean is grey wherever the decoder is unsure where a stroke's edge falls, and real digits are not.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from training.models.flow import LatentFlow

IMAGE_PIXELS = 28 * 28


def reparameterise(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """A sample of N(mu, exp(logvar)) that gradients flow through."""
    return mu + torch.exp(0.5 * logvar) * torch.randn_like(mu)


class VAE(nn.Module):
    """The parts every VAE shares: encode -> reparameterise -> decode, and the exported decoder."""

    latent_dim: int
    num_classes: int
    output_temperature: float = 1.0  # the drawn image's logits are divided by it; training never reads it

    def _build_prior(self, config) -> None:
        """The learned map N(0, I) -> aggregate posterior, fitted during training; None: plain N(0, I)."""
        self.prior = (LatentFlow(config.latent_dim, self.num_classes, config.prior_flow, config.flow_hidden)
                      if config.prior_flow else None)

    def encode(self, x: torch.Tensor, y: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def decode_logits(self, z: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None):
        mu, logvar = self.encode(x, y)                            # [N, latent_dim] each
        logits = self.decode_logits(reparameterise(mu, logvar), y)  # [N, 1, 28, 28]
        return logits, mu, logvar

    def generate(self, z: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """Images for N(0, I) noise z: through the prior flow when there is one, then the decoder."""
        if self.prior is not None:
            z = self.prior(z, y)
        logits = self.decode_logits(z, y)
        return torch.sigmoid(logits if self.output_temperature == 1.0 else logits / self.output_temperature)


@dataclass
class DenseVAEConfig:
    latent_dim: int = 16
    hidden: tuple[int, ...] = (512, 256)  # encoder widths, shrinking; the decoder mirrors them
    prior_flow: int = 0                   # coupling layers of the learned prior flow (0: sample N(0, I))
    flow_hidden: int = 128


class DenseVAE(VAE):
    """MLP encoder 784 -> hidden... -> (mu, logvar); mirrored MLP decoder."""

    def __init__(self, config: DenseVAEConfig, num_classes: int = 0):
        super().__init__()
        self.latent_dim, self.num_classes = config.latent_dim, num_classes
        widths = [IMAGE_PIXELS, *config.hidden]
        self.encoder = nn.Sequential(*[layer for a, b in zip(widths, widths[1:])
                                       for layer in (nn.Linear(a, b), nn.LeakyReLU(0.2))])
        self.to_stats = nn.Linear(widths[-1], 2 * config.latent_dim)
        back = [config.latent_dim, *reversed(config.hidden)]
        self.decoder = nn.Sequential(*[layer for a, b in zip(back, back[1:])
                                       for layer in (nn.Linear(a, b), nn.LeakyReLU(0.2))],
                                     nn.Linear(back[-1], IMAGE_PIXELS))
        self._build_prior(config)

    def encode(self, x, y=None):
        return self.to_stats(self.encoder(x.flatten(1))).chunk(2, dim=1)

    def decode_logits(self, z, y=None):
        return self.decoder(z).view(-1, 1, 28, 28)


@dataclass
class ConvVAEConfig:
    latent_dim: int = 16
    channels: tuple[int, int] = (32, 64)  # filters of the two stride-2 convolutions: 28 -> 14 -> 7
    hidden: int = 256                     # dense layer between the 7x7 features and the latent
    prior_flow: int = 0                   # coupling layers of the learned prior flow (0: sample N(0, I))
    flow_hidden: int = 128


class ConvVAE(VAE):
    """Strided-conv encoder (no pooling) and transposed-conv decoder; conditional when num_classes > 0.

    The CVAE appends the one-hot class to the encoder's dense features and to z, so the decoder
    answers "draw a 7" and accepts blends of classes.
    """

    def __init__(self, config: ConvVAEConfig, num_classes: int = 0):
        super().__init__()
        self.latent_dim, self.num_classes = config.latent_dim, num_classes
        c1, c2 = config.channels
        self.features = nn.Sequential(
            nn.Conv2d(1, c1, 4, stride=2, padding=1), nn.LeakyReLU(0.2),   # [N, c1, 14, 14]
            nn.Conv2d(c1, c2, 4, stride=2, padding=1), nn.LeakyReLU(0.2),  # [N, c2, 7, 7]
            nn.Flatten(),
        )
        self.to_stats = nn.Sequential(
            nn.Linear(c2 * 49 + num_classes, config.hidden), nn.LeakyReLU(0.2),
            nn.Linear(config.hidden, 2 * config.latent_dim),
        )
        self.from_latent = nn.Sequential(
            nn.Linear(config.latent_dim + num_classes, config.hidden), nn.LeakyReLU(0.2),
            nn.Linear(config.hidden, c2 * 49), nn.LeakyReLU(0.2),
            nn.Unflatten(1, (c2, 7, 7)),
        )
        self.upsample = nn.Sequential(
            nn.ConvTranspose2d(c2, c1, 4, stride=2, padding=1), nn.LeakyReLU(0.2),  # [N, c1, 14, 14]
            nn.ConvTranspose2d(c1, 1, 4, stride=2, padding=1),                      # [N, 1, 28, 28]
        )
        self._build_prior(config)

    def _with_class(self, h: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        if not self.num_classes:
            return h
        assert y is not None, "a conditional VAE needs the class vector y"
        return torch.cat([h, y], dim=1)

    def encode(self, x, y=None):
        return self.to_stats(self._with_class(self.features(x), y)).chunk(2, dim=1)

    def decode_logits(self, z, y=None):
        return self.upsample(self.from_latent(self._with_class(z, y)))
