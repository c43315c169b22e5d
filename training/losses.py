"""Losses as plain functions of network outputs. Each returns a scalar to minimise."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def vae_terms(logits: torch.Tensor, x: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor):
    """Reconstruction (Bernoulli cross-entropy) and KL to N(0, I), each summed per image and
    averaged over the batch, in nats. Their sum is the negative ELBO."""
    n = x.shape[0]
    recon = F.binary_cross_entropy_with_logits(logits, x, reduction="sum") / n
    kl = -0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp()) / n
    return recon, kl


def d_loss_gan(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    """Discriminator: real -> 1, fake -> 0."""
    return (F.binary_cross_entropy_with_logits(real_logits, torch.ones_like(real_logits))
            + F.binary_cross_entropy_with_logits(fake_logits, torch.zeros_like(fake_logits)))


def g_loss_nonsaturating(fake_logits: torch.Tensor) -> torch.Tensor:
    """Generator maximises log D(G(z)): strong gradients while D rejects its samples."""
    return F.binary_cross_entropy_with_logits(fake_logits, torch.ones_like(fake_logits))


def g_loss_minimax(fake_logits: torch.Tensor) -> torch.Tensor:
    """Generator minimises log(1 - D(G(z))): the original, saturating form, kept for comparison."""
    return -F.binary_cross_entropy_with_logits(fake_logits, torch.zeros_like(fake_logits))


def critic_loss(real_scores: torch.Tensor, fake_scores: torch.Tensor) -> torch.Tensor:
    """The critic maximises D(x) - D(G(z)), so it minimises the negation."""
    return fake_scores.mean() - real_scores.mean()


def g_loss_wasserstein(fake_scores: torch.Tensor) -> torch.Tensor:
    """The generator maximises D(G(z))."""
    return -fake_scores.mean()


def gradient_penalty(critic, real: torch.Tensor, fake: torch.Tensor, y: torch.Tensor | None = None,
                     eps: float = 1e-12) -> torch.Tensor:
    """(||grad D(x_hat)|| - 1)^2 on random points between real and fake (Gulrajani et al. 2017).

    One mixing weight per sample, not per pixel; the epsilon keeps sqrt's gradient finite at 0.
    """
    alpha = torch.rand(real.shape[0], 1, 1, 1, device=real.device, dtype=real.dtype)
    mixed = (alpha * real + (1 - alpha) * fake).requires_grad_(True)
    scores = critic(mixed, y)
    (grad,) = torch.autograd.grad(scores.sum(), mixed, create_graph=True)
    norm = torch.sqrt(grad.flatten(1).pow(2).sum(dim=1) + eps)
    return (norm - 1).pow(2).mean()


def r1_penalty(critic, real: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
    """E |grad_x D(x)|^2 on real images (Mescheder et al. 2018): keeps the discriminator flat on the
    data, so it cannot push the generator away from real digits with steep, noisy gradients."""
    real = real.detach().requires_grad_(True)
    scores = critic(real, y)
    (grad,) = torch.autograd.grad(scores.float().sum(), real, create_graph=True)
    return grad.flatten(1).pow(2).sum(dim=1).mean()
