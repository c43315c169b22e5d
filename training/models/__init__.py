"""The model registry: each trainable name, its networks, its objective and its training defaults."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from training.models.gan import Discriminator, GANConfig, Generator
from training.models.vae import ConvVAE, ConvVAEConfig, DenseVAE, DenseVAEConfig


@dataclass(frozen=True)
class ModelSpec:
    name: str
    description: str
    kind: str                 # "vae": one network; "gan": generator + discriminator/critic
    objective: str            # "elbo", "gan" (--loss ns|minimax), "wgan-gp" or "wgan-clip"
    conditional: bool
    config_cls: type
    train_defaults: dict[str, Any] = field(default_factory=dict)

    def build(self, config, num_classes: int) -> dict[str, nn.Module]:
        """The networks by role: {"model"} for a VAE, {"generator", "discriminator"} for a GAN."""
        classes = num_classes if self.conditional else 0
        if self.config_cls is DenseVAEConfig:
            return {"model": DenseVAE(config, classes)}
        if self.config_cls is ConvVAEConfig:
            return {"model": ConvVAE(config, classes)}
        return {"generator": Generator(config, classes), "discriminator": Discriminator(config, classes)}


_VAE = dict(batch_size=128, lr=1e-3, betas=(0.9, 0.999), ema_decay=0.0)
# EMA of generator weights is opt-in (--ema-decay); the bundled recipes turn it on where it paid
# (`evaluate --raw` scores a run's raw weights beside its EMA; exported/README.md has the figures).
_GAN = dict(batch_size=64, lr=2e-4, betas=(0.5, 0.999))

MODELS: dict[str, ModelSpec] = {spec.name: spec for spec in [
    ModelSpec("vae", "convolutional VAE (strided conv encoder, transposed-conv decoder)",
              "vae", "elbo", False, ConvVAEConfig, _VAE),
    # bf16 makes this small MLP slower on the CPU (measured), so it trains in float32.
    ModelSpec("vae-dense", "dense (MLP) VAE", "vae", "elbo", False, DenseVAEConfig, dict(_VAE, amp=False)),
    ModelSpec("cvae", "conditional convolutional VAE: draws a chosen digit", "vae", "elbo", True,
              ConvVAEConfig, _VAE),
    ModelSpec("gan", "DCGAN, non-saturating loss (--loss minimax for the saturating form)",
              "gan", "gan", False, GANConfig, _GAN),
    ModelSpec("cgan", "conditional DCGAN: one-hot class into generator and discriminator",
              "gan", "gan", True, GANConfig, _GAN),
    ModelSpec("wgan", "WGAN with gradient penalty (Adam, 5 critic steps, lambda 10)",
              "gan", "wgan-gp", False, GANConfig,
              dict(_GAN, lr=1e-4, betas=(0.5, 0.9), n_critic=5, gp_weight=10.0)),
    ModelSpec("wgan-clip", "WGAN with weight clipping as in the original paper (RMSprop, 5 critic steps)",
              "gan", "wgan-clip", False, GANConfig,
              dict(_GAN, lr=5e-5, optimizer="rmsprop", n_critic=5, clip=0.01)),
]}


class ConfigError(ValueError):
    """A model setting that does not exist or does not parse; the message names it."""


def _parse_value(text: str, current: Any, key: str) -> Any:
    try:
        if isinstance(current, bool):
            if text.lower() not in ("true", "false", "1", "0"):
                raise ValueError
            return text.lower() in ("true", "1")
        if isinstance(current, tuple):
            return tuple(type(current[0])(part) for part in text.split(","))
        return type(current)(text)
    except ValueError:
        raise ConfigError(f"--set {key}={text}: expected a value like {current!r}") from None


def model_config(spec: ModelSpec, overrides: dict[str, str] | None = None, **typed: Any):
    """The spec's config dataclass with defaults, then `typed` values, then `--set KEY=VALUE` strings."""
    config = spec.config_cls(**{k: v for k, v in typed.items() if v is not None})
    names = {f.name for f in dataclasses.fields(config)}
    for key, text in (overrides or {}).items():
        if key not in names:
            raise ConfigError(f"--set {key}: {spec.name} has no setting {key!r}; "
                              f"its settings are {', '.join(sorted(names))}")
        config = dataclasses.replace(config, **{key: _parse_value(text, getattr(config, key), key)})
    if getattr(config, "d_norm", "none") not in ("none", "layer"):
        raise ConfigError(f"--set d_norm={config.d_norm}: choose none or layer")
    if config.latent_dim < 1:
        raise ConfigError(f"--latent-dim {config.latent_dim}: must be at least 1")
    codes = getattr(config, "info_codes", 0)
    if codes and spec.conditional:
        raise ConfigError(f"--set info_codes={codes}: {spec.name} is conditional; the code is for a model "
                          f"that draws without a class")
    if not 0 <= codes <= config.latent_dim or codes == 1:
        raise ConfigError(f"--set info_codes={codes}: 0 (off) or 2 to latent_dim ({config.latent_dim}); "
                          f"the code is read from z's first entries")
    weight = getattr(config, "info_weight", GANConfig.info_weight)
    # a run's config.json records every setting, the default weight of a run without a code included
    if weight < 0 or (weight != GANConfig.info_weight and not codes):
        raise ConfigError(f"--set info_weight={weight}: a weight of 0 or more, with info_codes set (the "
                          f"code's term is otherwise not there to weigh)")
    return config
