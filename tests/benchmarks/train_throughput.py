"""Training images/s of each family: our loop against a reference loop written the plain way.

Reference: a torch DataLoader over a TensorDataset (batch 64, shuffled), the same networks in float32
and default memory layout, D(real) and D(fake) as two forwards, one optimizer step each for D and G
(pytorch/examples style). Ours: `training.trainers` as `python -m training train` runs it (the whole
dataset as one tensor, batches by shuffled index, one D forward over real + fake, channels_last,
bf16 autocast where the hardware runs it natively, fused Adam), also shown with float32 forced.
The loops run side by side in interleaved rounds; the table gives each one's median.
With --compile, a fourth loop is ours with `--compile` (torch.compile of the steps' forwards), and the
table adds its images/s, its gain over ours, and its compile time (the warm-up's extra seconds).

    python tests/benchmarks/train_throughput.py [--rounds 3] [--batches 30] [--compile]
        [--models cgan,vae (default: every family)]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from training import losses
from training.data import load_dataset, shuffled_batches
from training.models import MODELS, model_config
from training.trainers import make_trainer, train_config

BATCH = 64


def reference_loop(name: str, data, batches: int):
    """A closure that trains `batches` batches the plain way and returns images/s."""
    spec = MODELS[name]
    config = train_config(name, batch_size=BATCH)
    nets = spec.build(model_config(spec), data.num_classes)
    plain_optimizer = (lambda p: torch.optim.RMSprop(p, lr=config.lr)) if config.optimizer == "rmsprop" \
        else (lambda p: torch.optim.Adam(p, lr=config.lr, betas=config.betas))
    opts = {role: plain_optimizer(net.parameters()) for role, net in nets.items()}
    loader = DataLoader(TensorDataset(data.train.images, data.train.labels), batch_size=BATCH,
                        shuffle=True, drop_last=True)
    one_hot = (lambda l: F.one_hot(l, 10).float()) if spec.conditional else (lambda l: None)

    def vae_step(x, labels, i):
        model, opt = nets["model"], opts["model"]
        logits, mu, logvar = model(x, one_hot(labels))
        recon, kl = losses.vae_terms(logits, x, mu, logvar)
        opt.zero_grad()
        (recon + kl).backward()
        opt.step()

    def gan_step(x, labels, i):
        G, D, opt_g, opt_d = nets["generator"], nets["discriminator"], opts["generator"], opts["discriminator"]
        real, y = x * 2 - 1, one_hot(labels)
        fake = G(torch.randn(x.shape[0], G.latent_dim), y)
        opt_d.zero_grad()
        real_out, fake_out = D(real, y), D(fake.detach(), y)
        if spec.objective == "gan":
            d_loss = losses.d_loss_gan(real_out, fake_out)
        else:
            d_loss = losses.critic_loss(real_out, fake_out)
            if config.gp_weight:
                d_loss = d_loss + config.gp_weight * losses.gradient_penalty(D, real, fake.detach(), y)
        d_loss.backward()
        opt_d.step()
        if config.clip:
            for p in D.parameters():
                p.data.clamp_(-config.clip, config.clip)
        if (i + 1) % config.n_critic == 0:
            opt_g.zero_grad()
            g_out = D(fake, y)
            g_loss = losses.g_loss_wasserstein(g_out) if spec.objective != "gan" else \
                losses.g_loss_nonsaturating(g_out)
            g_loss.backward()
            opt_g.step()

    step = vae_step if spec.kind == "vae" else gan_step

    def run() -> float:
        started, done = time.perf_counter(), 0
        while done < batches:
            for x, labels in loader:
                step(x, labels, done)
                done += 1
                if done == batches:
                    break
        return batches * BATCH / (time.perf_counter() - started)
    return run


def our_loop(name: str, data, batches: int, amp: bool, compile: bool = False, batch_size: int = BATCH):
    spec = MODELS[name]
    config = train_config(name, batch_size=batch_size, device="cpu", compile=compile)
    config.amp = config.amp and amp
    trainer = make_trainer(spec, model_config(spec), config, data.num_classes, torch.device("cpu"))
    rng = torch.Generator().manual_seed(0)

    def run() -> float:
        started, done = time.perf_counter(), 0
        while done < batches:
            for batch in shuffled_batches(len(data.train), batch_size, rng):
                trainer.step(data.train.images[batch], data.train.labels[batch], done)
                done += 1
                if done == batches:
                    break
        return batches * batch_size / (time.perf_counter() - started)
    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batches", type=int, default=30, help="batches per loop per round")
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--compile", action="store_true", help="also our loop with --compile")
    args = parser.parse_args()
    torch.manual_seed(0)
    data = load_dataset("mnist-5k")
    print(f"# training throughput, batch {BATCH}, CPU: {platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}")
    extra_head, extra_rule = (" ours, compiled img/s | compile gain | compile s |", "---:|---:|---:|") \
        if args.compile else ("", "")
    print(f"| model | reference img/s | ours, float32 img/s | ours img/s | speed-up (float32) | speed-up |{extra_head}")
    print(f"|---|---:|---:|---:|---:|---:|{extra_rule}")
    for name in args.models.split(","):
        loops = {"reference": reference_loop(name, data, args.batches),
                 "fp32": our_loop(name, data, args.batches, amp=False),
                 "ours": our_loop(name, data, args.batches, amp=True)}
        if args.compile:
            loops["compiled"] = our_loop(name, data, args.batches, amp=True, compile=True)
        warm_up = {key: run() for key, run in loops.items()}  # first-call allocations, oneDNN kernel choice, compile
        rates = {key: [] for key in loops}
        for _ in range(args.rounds):
            for key, run in loops.items():
                rates[key].append(run())
        med = {key: statistics.median(values) for key, values in rates.items()}
        extra = ""
        if args.compile:  # compile time: the warm-up's seconds beyond a steady round's
            compile_s = args.batches * BATCH * (1 / warm_up["compiled"] - 1 / med["compiled"])
            extra = f" {med['compiled']:.0f} | {med['compiled'] / med['ours']:.2f}x | {compile_s:.0f} |"
        print(f"| {name} | {med['reference']:.0f} | {med['fp32']:.0f} | {med['ours']:.0f} | "
              f"{med['fp32'] / med['reference']:.2f}x | {med['ours'] / med['reference']:.2f}x |{extra}", flush=True)


if __name__ == "__main__":
    main()
