import math

import pytest
import torch

from training import losses


def test_vae_terms_are_per_image_sums():
    x = torch.zeros(4, 1, 28, 28)
    logits = torch.zeros_like(x)  # p = 0.5 everywhere: log 2 nats per pixel
    recon, kl = losses.vae_terms(logits, x, torch.zeros(4, 3), torch.zeros(4, 3))
    assert math.isclose(recon.item(), 784 * math.log(2), rel_tol=1e-5)
    assert kl.item() == 0
    _, kl = losses.vae_terms(logits, x, torch.ones(4, 3), torch.zeros(4, 3))
    assert math.isclose(kl.item(), 1.5)  # 0.5 * mu^2 per dimension


def test_nonsaturating_loss_has_strong_gradient_where_minimax_saturates():
    logits = torch.tensor([-8.0], requires_grad=True)  # D confidently rejects the fake
    losses.g_loss_nonsaturating(logits).backward()
    ns_grad = logits.grad.abs().item()
    logits.grad = None
    losses.g_loss_minimax(logits).backward()
    assert ns_grad > 0.99 and logits.grad.abs().item() < 1e-3


def test_wasserstein_signs():
    real, fake = torch.tensor([2.0, 4.0]), torch.tensor([1.0, 1.0])
    assert losses.critic_loss(real, fake).item() == -2.0  # minimising it maximises D(x) - D(G(z))
    assert losses.g_loss_wasserstein(fake).item() == -1.0


def test_gradient_penalty_is_zero_for_a_unit_slope_critic_and_finite_for_a_flat_one():
    ramp = lambda x, y=None: x.flatten(1)[:, 0]  # gradient norm exactly 1 everywhere
    real, fake = torch.rand(8, 1, 28, 28), torch.rand(8, 1, 28, 28)
    assert losses.gradient_penalty(ramp, real, fake).item() < 1e-6
    flat_weight = torch.zeros(1, requires_grad=True)
    flat = lambda x, y=None: (x.flatten(1) * flat_weight).sum(1)  # gradient 0: sqrt(0) needs the epsilon
    gp = losses.gradient_penalty(flat, real, fake)
    gp.backward()
    assert math.isclose(gp.item(), 1.0, rel_tol=1e-5) and torch.isfinite(flat_weight.grad).all()


def test_gradient_penalty_mixes_each_sample_with_one_weight():
    seen = {}

    def critic(x, y=None):
        seen["x"] = x
        return x.flatten(1).sum(1)

    real, fake = torch.ones(4, 1, 28, 28), torch.zeros(4, 1, 28, 28)
    losses.gradient_penalty(critic, real, fake)
    per_sample = seen["x"].flatten(1)
    assert torch.allclose(per_sample, per_sample[:, :1].expand_as(per_sample))


def test_r1_penalty_is_the_squared_slope_of_the_critic_on_real_images():
    w = torch.randn(1, 1, 28, 28)

    def critic(x, y=None):
        return (x * w).flatten(1).sum(1)
    r1 = losses.r1_penalty(critic, torch.rand(8, 1, 28, 28))
    assert r1.item() == pytest.approx(w.pow(2).sum().item(), rel=1e-5)
