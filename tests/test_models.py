import dataclasses

import pytest
import torch
from conftest import TINY
from torch import nn

from training.models import MODELS, ConfigError, model_config
from training.models.gan import Discriminator, GANConfig, Generator
from training.models.vae import ConvVAE, ConvVAEConfig


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


# --- the learned prior of the VAEs ------------------------------------------------------------------

def _randomised_flow(num_classes: int = 0):
    from training.models.flow import LatentFlow
    torch.manual_seed(0)
    flow = LatentFlow(dim=5, num_classes=num_classes, layers=4, hidden=16)
    with torch.no_grad():  # off the identity it starts as
        for p in flow.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return flow


def test_prior_flow_log_prob_is_the_change_of_variables_density():
    flow = _randomised_flow().double()
    u = torch.randn(1, 5, dtype=torch.float64)
    z = flow(u)
    jacobian = torch.autograd.functional.jacobian(lambda v: flow(v), u).reshape(5, 5)
    normal = torch.distributions.Normal(0.0, 1.0).log_prob(u).sum()
    expected = normal - torch.linalg.slogdet(jacobian).logabsdet
    assert flow.log_prob(z).item() == pytest.approx(expected.item(), abs=1e-9)


def test_prior_flow_starts_as_the_identity_and_reads_the_class():
    from training.models.flow import LatentFlow
    u = torch.randn(4, 6)
    assert torch.equal(LatentFlow(6, layers=3, hidden=8)(u), u)
    flow = _randomised_flow(num_classes=10)
    u = torch.randn(2, 5)
    assert not torch.allclose(flow(u, torch.eye(10)[:2]), flow(u, torch.eye(10)[2:4]))


def test_a_vae_with_a_prior_flow_decodes_the_flows_output():
    model = ConvVAE(ConvVAEConfig(latent_dim=5, channels=(8, 16), hidden=32, prior_flow=2, flow_hidden=8)).eval()
    with torch.no_grad():
        for p in model.prior.parameters():
            p.add_(0.3 * torch.randn_like(p))
        z = torch.randn(3, 5)
        expected = torch.sigmoid(model.decode_logits(model.prior(z)))
        assert torch.equal(model.generate(z), expected)
        assert not torch.equal(model.generate(z), torch.sigmoid(model.decode_logits(z)))


def test_spectral_normalisation_bounds_each_discriminator_layer():
    d = Discriminator(GANConfig(d_channels=8, d_spectral=True, d_norm="none"))
    for _ in range(30):  # power iterations run in training mode
        d(torch.rand(4, 1, 28, 28))
    d.eval()
    for layer in d.modules():
        if isinstance(layer, (nn.Linear, nn.Conv2d)):
            sigma = torch.linalg.matrix_norm(layer.weight.detach().flatten(1), ord=2).item()
            assert sigma == pytest.approx(1.0, abs=0.05)


def test_refine_blocks_deepen_the_generator_without_changing_its_output_shape():
    plain = Generator(GANConfig(g_channels=8, latent_dim=8))
    deeper = Generator(GANConfig(g_channels=8, latent_dim=8, g_refine=1)).eval()
    assert sum(isinstance(m, nn.Conv2d) for m in deeper.modules()) == 2
    assert not any(isinstance(m, nn.Conv2d) for m in plain.modules())
    assert deeper.generate(torch.randn(2, 8)).shape == (2, 1, 28, 28)


def test_the_wider_options_add_a_dense_layer_to_the_generator_and_a_third_convolution_to_the_critic():
    """Options of the same family (issue 30): g_hidden units before the 7x7 projection, d_layers=3 down to
    4x4; the defaults keep the networks (and their checkpoints' names) as they were."""
    wide = GANConfig(g_channels=8, d_channels=8, latent_dim=8, g_hidden=32, d_layers=3, mbstd_group=4)
    g, d = Generator(wide).eval(), Discriminator(wide, num_classes=10)
    assert [m.out_features for m in g.project if isinstance(m, nn.Linear)] == [32, 2 * 8 * 49]
    strided = [m for m in d.net if isinstance(m, nn.Conv2d)]
    assert [(m.out_channels, m.stride) for m in strided] == [(8, (2, 2)), (16, (2, 2)), (32, (2, 2))]
    images = g.generate(torch.randn(8, 8))
    assert images.shape == (8, 1, 28, 28) and d(images, torch.eye(10)[:8]).shape == (8,)
    with pytest.raises(ValueError, match="d_layers=4"):
        Discriminator(GANConfig(d_layers=4))


def test_the_categorical_code_is_the_argmax_of_zs_first_entries_each_value_equally_often():
    """InfoGAN's code as the generator draws it: a function of z (so the exported graph keeps its one
    input), uniform over its values because z's entries are iid, and unmoved by truncation (psi * z)."""
    from training.models.gan import info_code
    z = torch.randn(20_000, 16, generator=torch.Generator().manual_seed(0))
    code = info_code(z, 10)
    assert torch.equal(code.sum(1), torch.ones(len(z))) and torch.equal(code.argmax(1), z[:, :10].argmax(1))
    shares = code.mean(0)
    assert shares.min() > 0.09 and shares.max() < 0.11, shares
    assert torch.equal(info_code(0.5 * z, 10), code)
    ties = torch.tensor([[0.0, 0.0, 0.0], [1.0, 2.0, 2.0]])  # one value each, the first of the largest
    assert torch.equal(info_code(ties, 3), torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]))


def test_a_generator_with_a_code_reads_it_beside_z_and_the_discriminator_names_it():
    from training.models.gan import info_code
    config = GANConfig(g_channels=8, d_channels=8, latent_dim=8, info_codes=4)
    g, d = Generator(config).eval(), Discriminator(config)
    assert g.project[0].in_features == 8 + 4
    z = torch.randn(6, 8)
    images = g.generate(z)
    assert torch.equal(g.inputs(z)[:, 8:], info_code(z, 4))
    with torch.no_grad():
        g.project[0].weight[:, 8:] = 0        # the code's columns silenced: the same z draws other images
    assert not torch.allclose(g.generate(z), images)
    scores, code_logits = d(images, codes=True)
    assert scores.shape == (6,) and code_logits.shape == (6, 4)
    assert torch.equal(scores, d(images))    # the score is the same with or without the code's head
    assert "code_head.weight" not in Discriminator(GANConfig()).state_dict()  # old checkpoints still load


@pytest.mark.parametrize("model, setting, message", [
    ("cgan", "10", "cgan is conditional"),
    ("gan", "9", r"0 \(off\) or 2 to latent_dim \(8\)"),
    ("wgan", "1", r"0 \(off\) or 2 to latent_dim"),
])
def test_a_code_a_model_cannot_draw_is_refused_by_name(model, setting, message):
    with pytest.raises(ConfigError, match=rf"--set info_codes={setting}: .*{message}"):
        model_config(MODELS[model], {**TINY[model], "info_codes": setting})


@pytest.mark.parametrize("settings", [{"info_weight": "2"}, {"info_codes": "4", "info_weight": "-1"}])
def test_a_codes_weight_without_a_code_or_below_zero_is_refused_by_name(settings):
    with pytest.raises(ConfigError, match=r"--set info_weight=.*: a weight of 0 or more, with info_codes set"):
        model_config(MODELS["gan"], {**TINY["gan"], **settings})


@pytest.mark.parametrize("name", ["gan", "cgan", "wgan"])
def test_every_setting_a_run_records_builds_its_config_again(name):
    """A run's config.json holds every setting, defaults included, and loading it passes them all back."""
    config = model_config(MODELS[name], TINY[name])
    recorded = {key: str(value) for key, value in dataclasses.asdict(config).items()}
    assert model_config(MODELS[name], recorded) == config
