"""One training step per family, written out plainly: zero_grad, loss, backward, step.

A trainer owns its networks, optimizers and (for generators) an exponential moving average of the
weights, and can save and restore all of it. The epoch loop in `loop.py` drives it.
"""

from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

from training import losses, precision
from training.augment import augment
from training.models import ModelSpec
from training.models.gan import Generator, info_code
from training.models.vae import VAE, reparameterise


@dataclass
class TrainConfig:
    """Training settings; each model's registry entry supplies its own defaults for these."""
    model: str
    dataset: str = "mnist-5k"
    data_dir: str | None = None
    limit: int | None = None        # use only the first N training images
    epochs: int = 20
    batch_size: int = 64
    lr: float = 2e-4
    betas: tuple[float, float] = (0.5, 0.999)
    optimizer: str = "adam"         # "adam" or "rmsprop"
    loss: str = "ns"                # GAN generator loss: "ns" (non-saturating) or "minimax"
    n_critic: int = 1               # discriminator/critic steps per generator step
    clip: float = 0.0               # WGAN weight clipping bound (0: off)
    gp_weight: float = 0.0          # WGAN gradient-penalty weight (0: off)
    ema_decay: float = 0.0          # EMA of generator weights for snapshots and export (0: off)
    augment: str = ""               # GANs: DiffAugment policy for all D inputs, e.g. "translation,cutout"
    kl_weight: float = 1.0          # VAE: loss = recon + kl_weight * KL (beta-VAE); the ELBO is logged at 1
    r1_weight: float = 0.0          # GANs: gamma of the R1 penalty gamma/2 E|grad D(real)|^2 (0: off)
    lr_decay_start: float = 1.0     # share of the epochs after which every lr falls linearly to 0 (1: off)
    seed: int = 0
    device: str = "auto"
    amp: bool = True                # bf16 autocast where the hardware runs bf16 natively
    compile: bool = False           # torch.compile each step's main forwards (inductor; CUDA graphs on CUDA)


def train_config(model: str, **settings) -> TrainConfig:
    """The model's own training defaults (its registry entry), then `settings` on top."""
    from training.models import MODELS
    return TrainConfig(**{"model": model, **MODELS[model].train_defaults, **settings})


def make_optimizer(params, config: TrainConfig) -> torch.optim.Optimizer:
    """Adam runs fused (one kernel for all parameters): the small VAEs train ~1.7x faster (make bench)."""
    if config.optimizer == "rmsprop":
        return torch.optim.RMSprop(params, lr=config.lr)
    return torch.optim.Adam(params, lr=config.lr, betas=config.betas, fused=True)


@contextlib.contextmanager
def frozen(module: nn.Module):
    """Hold a network fixed: its parameters get no gradient while the other network trains."""
    flags = [p.requires_grad for p in module.parameters()]
    module.requires_grad_(False)
    try:
        yield module
    finally:
        for p, flag in zip(module.parameters(), flags):
            p.requires_grad_(flag)


class EMA:
    """Exponential moving average of a network's weights; buffers (BatchNorm statistics) are copied.

    The decay warms up as (1 + t) / (10 + t) so that early snapshots are not dominated by the
    random initial weights.
    """

    def __init__(self, net: nn.Module, decay: float):
        self.net = copy.deepcopy(net).eval().requires_grad_(False)
        self.decay = decay
        self.updates = 0

    @torch.no_grad()
    def update(self, net: nn.Module) -> None:
        self.updates += 1
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        torch._foreach_lerp_(list(self.net.parameters()), list(net.parameters()), 1.0 - decay)
        for mine, theirs in zip(self.net.buffers(), net.buffers()):
            mine.copy_(theirs)

    def state_dict(self) -> dict:
        return {"net": self.net.state_dict(), "updates": self.updates}

    def load_state_dict(self, state: dict) -> None:
        self.net.load_state_dict(state["net"])
        self.updates = state["updates"]


class Trainer:
    """Networks by role, their optimizers, and the step; subclasses define the step."""

    def __init__(self, spec: ModelSpec, model_config, config: TrainConfig, num_classes: int,
                 device: torch.device):
        self.spec, self.model_config, self.config, self.device = spec, model_config, config, device
        self.num_classes = num_classes if spec.conditional else 0
        # channels_last: oneDNN and cuDNN run these convolutions faster in NHWC (measured: make bench).
        # The ignore: Module.to takes memory_format=, which the overloads in its stub omit.
        self.nets: dict[str, nn.Module] = {role: net.to(device, memory_format=torch.channels_last)  # type: ignore[call-overload]
                                           for role, net in spec.build(model_config, num_classes).items()}
        self.optimizers = {role: make_optimizer(net.parameters(), config) for role, net in self.nets.items()}
        # What the steps call to train: the networks themselves, or their DistributedDataParallel wrappers
        # (`distribute`), compiled with `config.compile`. Saving, sampling and the EMA always use `nets`,
        # so no `module.` or `_orig_mod.` prefix leaks into a checkpoint.
        self.train_nets: dict[str, nn.Module] = {role: self.compiled(net) for role, net in self.nets.items()}
        self.ema: EMA | None = None
        self.autocast = precision.autocast(device, config.amp)

    def compiled(self, net: nn.Module) -> nn.Module:
        """`net` as the steps call it: itself, or with `config.compile` torch.compile'd (inductor; on CUDA
        mode "reduce-overhead", whose CUDA graphs remove the kernel launches that bind small batches).
        Only the main forwards go through it: the gradient penalty and R1 need a double backward, which
        compiled graphs do not support, so they call the network itself."""
        if not self.config.compile:
            return net
        # torch.compile returns an OptimizedModule for a module; its stub says only "a callable"
        return cast(nn.Module, torch.compile(net, mode="reduce-overhead" if self.device.type == "cuda" else None))

    def one_hot(self, labels: torch.Tensor) -> torch.Tensor | None:
        return F.one_hot(labels, self.num_classes).float() if self.num_classes else None

    def step(self, x: torch.Tensor, labels: torch.Tensor, index: int) -> dict[str, torch.Tensor]:
        """Train on one batch of real images ([N, 1, 28, 28] in [0, 1]); return detached loss terms."""
        raise NotImplementedError

    def sampler(self) -> Generator | VAE:
        """The network whose `generate(z, y)` draws images: the EMA copy when there is one."""
        raise NotImplementedError

    def state_dict(self) -> dict:
        return {
            "nets": {role: net.state_dict() for role, net in self.nets.items()},
            "optimizers": {role: opt.state_dict() for role, opt in self.optimizers.items()},
            "ema": self.ema.state_dict() if self.ema else None,
        }

    def load_state_dict(self, state: dict) -> None:
        for role, net in self.nets.items():
            net.load_state_dict(state["nets"][role])
        for role, opt in self.optimizers.items():
            opt.load_state_dict(state["optimizers"][role])
        if self.ema:
            self.ema.load_state_dict(state["ema"])

    def distribute(self, world) -> None:
        """Wrap each network in DistributedDataParallel: its gradients are averaged across the ranks.

        Only the main forward of each step goes through a wrapper; the extra forwards (gradient penalty,
        R1, the frozen discriminator under the generator step, the prior flow) call the network itself,
        so each backward reduces every gradient exactly once and a held network joins no reduction.
        On CUDA the generator's BatchNorm becomes SyncBatchNorm (statistics over the global batch);
        PyTorch runs SyncBatchNorm on GPUs only, so CPU ranks normalise over their own batch.
        """
        if not world.distributed:
            return
        import warnings

        from torch.nn.parallel import DistributedDataParallel

        # A weight with one input channel has two valid layouts under channels_last; DDP's reducer notices
        # the grad's and warns on every backward. Harmless for these few small tensors.
        warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")
        cuda = self.device.type == "cuda"
        for role, net in self.nets.items():
            if cuda and role == "generator":  # the same Parameter objects: the optimizer and EMA still hold them
                net = self.nets[role] = nn.SyncBatchNorm.convert_sync_batchnorm(net)
            self.train_nets[role] = self.compiled(
                DistributedDataParallel(net, device_ids=[self.device.index] if cuda else None))

    def train(self, mode: bool = True) -> None:
        for net in self.nets.values():
            net.train(mode)

    def set_lr_scale(self, scale: float) -> None:
        """Every optimizer's learning rate as `scale` times the configured one."""
        for opt in self.optimizers.values():
            for group in opt.param_groups:
                group["lr"] = self.config.lr * scale


def lr_scale(epoch: int, epochs: int, decay_start: float) -> float:
    """1 until `decay_start` of the run, then falling linearly towards 0 over the rest; `epoch` counts
    from 1. A function of the epoch alone, so a resumed run lands on the same schedule."""
    progress = (epoch - 1) / epochs
    if decay_start >= 1 or progress < decay_start:
        return 1.0
    return (1 - progress) / (1 - decay_start)


class VAETrainer(Trainer):
    def step(self, x, labels, index):
        model, opt = self.nets["model"], self.optimizers["model"]
        with self.autocast:
            logits, mu, logvar = self.train_nets["model"](x, self.one_hot(labels))
        recon, kl = losses.vae_terms(logits.float(), x, mu.float(), logvar.float())
        loss = recon + self.config.kl_weight * kl
        terms = {"loss": (recon + kl).detach(), "recon": recon.detach(), "kl": kl.detach()}
        if model.prior is not None:
            # The prior flow learns the posterior's samples, detached: the VAE's objective is unchanged.
            z = reparameterise(mu.detach().float(), logvar.detach().float())
            flow_nll = -model.prior.log_prob(z, self.one_hot(labels)).mean()
            loss = loss + flow_nll
            terms["flow_nll"] = flow_nll.detach()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return terms

    @torch.no_grad()
    def validate(self, x: torch.Tensor, labels: torch.Tensor, batch_size: int = 500) -> dict[str, float]:
        """Negative ELBO and its terms on held-out images, per image, in nats."""
        model = self.nets["model"].eval()
        totals = torch.zeros(2, device=x.device)
        for xb, lb in zip(x.split(batch_size), labels.split(batch_size)):
            logits, mu, logvar = model(xb, self.one_hot(lb))
            totals += torch.stack(losses.vae_terms(logits.float(), xb, mu.float(), logvar.float())) * len(xb)
        model.train()
        recon, kl = (totals / len(x)).tolist()
        return {"val_loss": recon + kl, "val_recon": recon, "val_kl": kl}

    def sampler(self):
        return self.nets["model"]


R1_INTERVAL = 4  # batches between R1 penalties: the double backward costs about a discriminator step


class AdversarialTrainer(Trainer):
    """GAN, CGAN and WGAN: a discriminator (critic) step with the generator held fixed, then every
    `n_critic` batches a generator step with the discriminator frozen."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.config.ema_decay > 0:
            self.ema = EMA(self.nets["generator"], self.config.ema_decay)
        self.wasserstein = self.spec.objective.startswith("wgan")
        self.info_weight = getattr(self.model_config, "info_weight", 0.0)
        self.g_loss_fn = (losses.g_loss_wasserstein if self.wasserstein
                          else losses.g_loss_minimax if self.config.loss == "minimax"
                          else losses.g_loss_nonsaturating)

    def step(self, x, labels, index):
        G, D = self.nets["generator"], self.nets["discriminator"]
        G_train, D_train = self.train_nets["generator"], self.train_nets["discriminator"]
        opt_g, opt_d = self.optimizers["generator"], self.optimizers["discriminator"]
        real = x * 2 - 1                                  # the generator's tanh scale
        y = self.one_hot(labels)                          # fakes take the batch's own labels
        train_g = (index + 1) % self.config.n_critic == 0
        z = torch.randn(x.shape[0], G.latent_dim, device=x.device)
        terms = {}
        # InfoGAN: the code each fake was drawn with, which D learns to name and G to make nameable
        code = info_code(z, G.info_codes).argmax(dim=1) if G.info_codes else None

        # Discriminator step: the fake is detached, so the generator gets no gradient from it.
        with self.autocast, torch.set_grad_enabled(train_g):
            fake = G_train(z, y)                          # kept with its graph when G trains next
        seen = augment(torch.cat([real, fake.detach()]), self.config.augment)
        with self.autocast:
            both, code_logits = self.judge(D_train, seen, None if y is None else torch.cat([y, y]), code)
        real_out, fake_out = both.float().chunk(2)
        if self.wasserstein:
            d_loss = losses.critic_loss(real_out, fake_out)
            terms["wasserstein"] = -d_loss.detach()
            if self.config.gp_weight:
                with self.autocast:  # as in PyTorch's AMP recipe for gradient penalties
                    gp = losses.gradient_penalty(D, real, fake.detach(), y).float()
                terms["gp"] = gp.detach()
                d_loss = d_loss + self.config.gp_weight * gp
        else:
            d_loss = losses.d_loss_gan(real_out, fake_out)
            terms["d_real"] = torch.sigmoid(real_out).mean().detach()
            terms["d_fake"] = torch.sigmoid(fake_out).mean().detach()
        if self.config.r1_weight and index % R1_INTERVAL == 0:
            # Lazy R1 (Karras et al. 2020): every R1_INTERVAL batches, weighted up by as much.
            with self.autocast:
                r1 = losses.r1_penalty(D, real, y).float()
            terms["r1"] = r1.detach()
            d_loss = d_loss + self.config.r1_weight / 2 * R1_INTERVAL * r1
        if code is not None:
            info = F.cross_entropy(code_logits[len(x):].float(), code)
            terms["info"] = info.detach()
            d_loss = d_loss + self.info_weight * info
        opt_d.zero_grad(set_to_none=True)
        d_loss.backward()
        opt_d.step()
        self.clip_critic(D)
        terms["d_loss"] = d_loss.detach()

        # Generator step: the discriminator is frozen, so only the generator moves.
        if train_g:
            with frozen(D), self.autocast:
                scores, code_logits = self.judge(D, augment(fake, self.config.augment), y, code)
            # with a code, the mutual-information term: draw each code so that D can name it
            g_loss = self.g_loss_fn(scores.float()) + self.code_term(code_logits, code)
            opt_g.zero_grad(set_to_none=True)
            g_loss.backward()
            opt_g.step()
            if self.ema:
                self.ema.update(G)
            terms["g_loss"] = g_loss.detach()
        return terms

    @torch.no_grad()
    def clip_critic(self, D: nn.Module) -> None:
        """Weight clipping (`clip`): the score's weights only, as the code's head is no part of the
        critic's Lipschitz bound."""
        if self.config.clip:
            for p in D.get_submodule("net").parameters():
                p.clamp_(-self.config.clip, self.config.clip)

    def code_term(self, logits: torch.Tensor, code: torch.Tensor | None) -> torch.Tensor | float:
        """`info_weight` times the cross-entropy of D's logits for the code; 0 without a code."""
        return 0.0 if code is None else self.info_weight * F.cross_entropy(logits.float(), code)

    @staticmethod
    def judge(D: nn.Module, images: torch.Tensor, y: torch.Tensor | None,
              code: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """D's scores and, when the generator draws a code, its logits for the code, from one pass;
        without a code the second is an empty placeholder nothing reads."""
        if code is None:
            return D(images, y), images.new_empty(0)
        return D(images, y, codes=True)

    def sampler(self):
        return self.ema.net if self.ema else self.nets["generator"]


def make_trainer(spec: ModelSpec, model_config, config: TrainConfig, num_classes: int,
                 device: torch.device) -> Trainer:
    cls = VAETrainer if spec.kind == "vae" else AdversarialTrainer
    return cls(spec, model_config, config, num_classes, device)
