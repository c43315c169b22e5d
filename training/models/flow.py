"""A small normalising flow (RealNVP: affine couplings) that learns where a VAE's latents live.

Prior samples z ~ N(0, I) fall in holes of the aggregate posterior that the decoder never saw (Dai &
Wipf 2019; Ghosh et al. 2020): blurry, unreadable digits. The flow is fitted to posterior samples during
training (on detached latents, so the VAE's own objective is unchanged) and maps N(0, I) noise onto
them. Being a continuous map of the noise, it folds into the exported graph: the ONNX interface stays
`z` ~ N(0, I) in, image out, and walks between two z stay smooth. Conditional when num_classes > 0:
every coupling reads the class vector (a one-hot or a blend), so each class gets its own latent density.
"""

from __future__ import annotations

import math

import torch
from torch import nn

SCALE_BOUND = 2.0  # |log-scale| per coupling stays below this: no exploding exp() early in training


class AffineCoupling(nn.Module):
    """One half of z (and the class) sets a scale and shift for the other half; `flip` swaps the halves."""

    def __init__(self, dim: int, num_classes: int, hidden: int, flip: bool):
        super().__init__()
        self.flip = flip
        self.keep = dim - dim // 2 if flip else dim // 2  # size of the half that conditions
        moved = dim - self.keep
        self.net = nn.Sequential(
            nn.Linear(self.keep + num_classes, hidden), nn.LeakyReLU(0.2),
            nn.Linear(hidden, hidden), nn.LeakyReLU(0.2),
            nn.Linear(hidden, 2 * moved),
        )
        last = self.net[-1]
        assert isinstance(last, nn.Linear)
        nn.init.zeros_(last.weight)  # starts as the identity map
        nn.init.zeros_(last.bias)

    def _halves(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(conditioning half, moved half): the first half conditions unless flipped."""
        cut = x.shape[1] - self.keep if self.flip else self.keep
        first, second = x[:, :cut], x[:, cut:]
        return (second, first) if self.flip else (first, second)

    def _join(self, kept: torch.Tensor, moved: torch.Tensor) -> torch.Tensor:
        return torch.cat([moved, kept] if self.flip else [kept, moved], dim=1)

    def _scale_shift(self, kept: torch.Tensor, y: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        h = kept if y is None else torch.cat([kept, y], dim=1)
        raw_scale, shift = self.net(h).chunk(2, dim=1)
        return SCALE_BOUND * torch.tanh(raw_scale / SCALE_BOUND), shift

    def forward(self, u: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """Noise side -> latent side."""
        kept, moved = self._halves(u)
        log_scale, shift = self._scale_shift(kept, y)
        return self._join(kept, moved * torch.exp(log_scale) + shift)

    def inverse(self, z: torch.Tensor, y: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Latent side -> noise side, with log |det d(noise)/d(latent)| per row."""
        kept, moved = self._halves(z)
        log_scale, shift = self._scale_shift(kept, y)
        return self._join(kept, (moved - shift) * torch.exp(-log_scale)), -log_scale.sum(dim=1)


class LatentFlow(nn.Module):
    """N(0, I) noise u -> latent z through `layers` couplings with alternating halves and a final
    per-dimension affine map; `log_prob(z)` is the exact density, for fitting it to posterior samples."""

    def __init__(self, dim: int, num_classes: int = 0, layers: int = 8, hidden: int = 128):
        super().__init__()
        self.couplings = nn.ModuleList(AffineCoupling(dim, num_classes, hidden, flip=i % 2 == 1)
                                       for i in range(layers))
        self.log_scale = nn.Parameter(torch.zeros(dim))
        self.shift = nn.Parameter(torch.zeros(dim))

    def forward(self, u: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """Latents [N, dim] for noise [N, dim]: what the exported graph runs before the decoder."""
        for coupling in self.couplings:
            u = coupling(u, y)
        return u * torch.exp(self.log_scale) + self.shift

    def log_prob(self, z: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """log p(z) [N] in nats: the standard normal density of the noise that maps to z, times the
        Jacobian of the inverse map."""
        u = (z - self.shift) * torch.exp(-self.log_scale)
        log_det = -self.log_scale.sum().expand(z.shape[0])
        for coupling in reversed(self.couplings):
            assert isinstance(coupling, AffineCoupling)
            u, step = coupling.inverse(u, y)
            log_det = log_det + step
        normal = -0.5 * (u.pow(2).sum(dim=1) + u.shape[1] * math.log(2 * math.pi))
        return normal + log_det
