import pytest
import torch
from torch import nn

from training.models import MODELS, ConfigError, model_config
from training.models.gan import Discriminator, GANConfig, Generator
from training.models.vae import ConvVAE, ConvVAEConfig

from conftest import TINY


@pytest.mark.parametrize("name", list(MODELS))
def test_every_model_generates_images_in_unit_range(name):
    spec = MODELS[name]
    nets = spec.build(model_config(spec, TINY[name]), num_classes=10)
    sampler = nets.get("generator", nets.get("model")).eval()
    z = torch.randn(5, sampler.latent_dim)
    y = torch.eye(10)[:5] if spec.conditional else None
    images = sampler.generate(z, y)
    assert images.shape == (5, 1, 28, 28)
    assert images.min() >= 0 and images.max() <= 1


@pytest.mark.parametrize("name", ["vae", "vae-dense", "cvae"])
def test_vae_forward_returns_logits_mean_and_logvar(name):
    spec = MODELS[name]
    model = spec.build(model_config(spec, TINY[name]), 10)["model"]
    y = torch.eye(10)[:3] if spec.conditional else None
    logits, mu, logvar = model(torch.rand(3, 1, 28, 28), y)
    assert logits.shape == (3, 1, 28, 28) and mu.shape == logvar.shape == (3, 4)


def test_discriminator_gives_one_logit_per_image():
    d = Discriminator(GANConfig(d_channels=8), num_classes=10)
    assert d(torch.rand(6, 1, 28, 28), torch.eye(10)[:6]).shape == (6,)


def test_conditional_generator_accepts_blended_classes():
    g = Generator(GANConfig(g_channels=8, latent_dim=8), num_classes=10).eval()
    blend = 0.5 * torch.eye(10)[2] + 0.5 * torch.eye(10)[5]
    z = torch.randn(1, 8)
    out = g.generate(z, blend[None])
    assert out.shape == (1, 1, 28, 28)
    assert not torch.equal(out, g.generate(z, torch.eye(10)[2][None]))


def test_convolutional_networks_downsample_by_stride_never_pooling():
    nets = [ConvVAE(ConvVAEConfig()), Discriminator(GANConfig())]
    for net in nets:
        kinds = {type(m) for m in net.modules()}
        assert not kinds & {nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d}
        assert any(isinstance(m, nn.Conv2d) and m.stride == (2, 2) for m in net.modules())


def test_discriminator_has_no_batch_norm_and_no_sigmoid():
    kinds = {type(m) for m in Discriminator(GANConfig()).modules()}
    assert not kinds & {nn.BatchNorm2d, nn.BatchNorm1d, nn.Sigmoid}


def test_generator_is_dense_then_transposed_convolutions_with_tanh():
    layers = [type(m) for m in Generator(GANConfig()).modules() if not list(m.children())]
    assert layers[0] is nn.Linear and layers[-1] is nn.Tanh
    assert layers.count(nn.ConvTranspose2d) == 2 and nn.LeakyReLU in layers


def test_settings_override_and_unknown_settings_are_named():
    spec = MODELS["gan"]
    assert model_config(spec, {"g_channels": "16"}, latent_dim=12) == GANConfig(latent_dim=12, g_channels=16)
    assert model_config(MODELS["vae-dense"], {"hidden": "128,64"}).hidden == (128, 64)
    with pytest.raises(ConfigError, match="--set widht: gan has no setting 'widht'"):
        model_config(spec, {"widht": "3"})
    with pytest.raises(ConfigError, match="--set g_channels=wide"):
        model_config(spec, {"g_channels": "wide"})
    with pytest.raises(ConfigError, match="d_norm=batch"):
        model_config(spec, {"d_norm": "batch"})


def test_minibatch_std_sees_a_collapsed_group_and_never_mixes_groups():
    from training.models.gan import MinibatchStd
    h = torch.randn(8, 3, 7, 7)
    h[4:] = h[4:5]  # the second group of four is one image repeated: a collapsed generator
    spread = MinibatchStd(4)(h)[:, 3, 0, 0]
    assert (spread[:4] > 0.3).all() and (spread[4:] < 1e-3).all()


def test_discriminator_with_minibatch_std_scores_each_image():
    from training.models.gan import Discriminator, GANConfig
    d = Discriminator(GANConfig(d_channels=8, mbstd_group=4), num_classes=10)
    x, y = torch.randn(8, 1, 28, 28), torch.eye(10)[:8]
    assert d(x, y).shape == (8,)


def test_discriminator_parameter_names_stay_stable_so_old_checkpoints_resume():
    from training.models.gan import Discriminator, GANConfig
    keys = list(Discriminator(GANConfig(d_channels=8)).state_dict())
    assert keys == ["net.0.weight", "net.0.bias", "net.2.weight", "net.2.bias", "net.3.weight", "net.3.bias",
                    "net.6.weight", "net.6.bias"]
