import json

import numpy as np
import pytest
import torch
from conftest import TINY, assert_alternation_holds, imports_of, state_equal, tiny_setup

from training.loop import RunError, train
from training.models import MODELS, model_config
from training.trainers import EMA, AdversarialTrainer, make_trainer

quiet = dict(progress=False, log=lambda *_: None)


@pytest.mark.parametrize("name", list(MODELS))
def test_every_family_trains_with_finite_losses(name, few_digits, run_dir):
    config, mconfig = tiny_setup(name, epochs=1)
    result = train(config, mconfig, run_dir, data=few_digits, **quiet)
    row = result.history[0]
    terms = {k: v for k, v in row.items() if k not in ("epoch", "step")}
    assert "g_loss" in terms or "recon" in terms
    assert all(torch.isfinite(torch.tensor(v)) for v in terms.values()), terms


def test_vae_overfits_a_tiny_set(few_digits, run_dir):
    config, mconfig = tiny_setup("vae", epochs=15, batch_size=64, lr=3e-3)
    history = train(config, mconfig, run_dir, data=few_digits, **quiet).history
    assert history[-1]["loss"] < 0.6 * history[0]["loss"]
    assert history[-1]["recon"] < history[0]["recon"]


def adversarial(name="gan", **overrides) -> AdversarialTrainer:
    config, mconfig = tiny_setup(name, **{"ema_decay": 0.0, **overrides})
    return make_trainer(MODELS[name], mconfig, config, 10, torch.device("cpu"))


@pytest.mark.parametrize("name", ["gan", "cgan", "wgan", "wgan-clip"])
def test_discriminator_step_holds_generator_fixed_and_generator_step_freezes_discriminator(name, few_digits):
    assert_alternation_holds(adversarial(name, n_critic=2), few_digits)


def test_weight_clipping_bounds_the_critic(few_digits):
    trainer = adversarial("wgan-clip")
    trainer.step(few_digits.train.images[:32], few_digits.train.labels[:32], 0)
    assert max(p.abs().max().item() for p in trainer.nets["discriminator"].parameters()) <= 0.01


def test_ema_follows_the_generator_with_warmup():
    net = torch.nn.Linear(2, 2)
    ema = EMA(net, decay=0.999)
    start = ema.net.weight.clone()
    with torch.no_grad():
        net.weight.add_(1.0)
    ema.update(net)  # first update: decay warms up to (1 + 1) / (10 + 1)
    expected = start + (1 - 2 / 11) * (net.weight - start)
    assert torch.allclose(ema.net.weight, expected)
    assert not ema.net.weight.requires_grad


def test_snapshots_come_from_the_ema_generator_when_it_is_on():
    trainer = adversarial("gan", ema_decay=0.999)
    assert trainer.sampler() is trainer.ema.net
    plain = adversarial("gan")
    assert plain.ema is None and plain.sampler() is plain.nets["generator"]


def test_run_directory_holds_config_metrics_snapshots_gif_and_curves(few_digits, run_dir):
    from PIL import Image
    config, mconfig = tiny_setup("cgan", epochs=3)
    train(config, mconfig, run_dir, data=few_digits, **quiet)
    record = json.loads((run_dir / "config.json").read_text())
    assert record["train"]["model"] == "cgan" and record["model_config"]["g_channels"] == 8
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    assert {"d_loss", "g_loss", "seconds", "images_per_s"} <= rows[0].keys()
    assert sorted(p.name for p in (run_dir / "snapshots").iterdir()) == [
        "epoch_0001.png", "epoch_0002.png", "epoch_0003.png"]
    gif = Image.open(run_dir / "progress.gif")
    assert gif.n_frames == 3 and gif.size == Image.open(run_dir / "snapshots" / "epoch_0001.png").size
    assert Image.open(run_dir / "loss.png").format == "PNG"
    assert (run_dir / "checkpoint.pt").exists()
    assert not list(run_dir.glob(".*.tmp"))


def test_snapshots_use_the_same_noise_and_labels_every_epoch(few_digits, run_dir, monkeypatch):
    from training.models.gan import Generator
    seen = []
    real_generate = Generator.generate

    def recording_generate(self, z, y=None):
        seen.append((z.clone(), y.clone()))
        return real_generate(self, z, y)

    monkeypatch.setattr(Generator, "generate", recording_generate)
    config, mconfig = tiny_setup("cgan", epochs=3)
    train(config, mconfig, run_dir, data=few_digits, **quiet)
    assert len(seen) == 3
    assert all(torch.equal(z, seen[0][0]) and torch.equal(y, seen[0][1]) for z, y in seen)
    assert seen[0][1].argmax(1)[:10].tolist() == list(range(10))  # one class per grid column


def test_vae_reports_validation_elbo(few_digits, run_dir):
    config, mconfig = tiny_setup("cvae", epochs=1)
    row = train(config, mconfig, run_dir, data=few_digits, **quiet).history[0]
    assert row["val_loss"] == pytest.approx(row["val_recon"] + row["val_kl"])


@pytest.mark.parametrize("name", ["cgan", "vae"])
def test_seeded_cpu_run_is_reproducible_bit_for_bit(name, few_digits, tmp_path):
    config, mconfig = tiny_setup(name, epochs=1)
    a = train(config, mconfig, tmp_path / "a", data=few_digits, **quiet).trainer.state_dict()
    b = train(config, mconfig, tmp_path / "b", data=few_digits, **quiet).trainer.state_dict()
    config.seed = 1
    c = train(config, mconfig, tmp_path / "c", data=few_digits, **quiet).trainer.state_dict()
    assert state_equal(a, b)
    assert not state_equal(a, c)


class Crash(Exception):
    pass


@pytest.mark.parametrize("name", ["cgan", "wgan", "cvae"])
def test_resume_after_a_crash_mid_epoch_matches_an_uninterrupted_run(name, few_digits, tmp_path,
                                                                    monkeypatch):
    # The EMA, the R1 penalty and the learning-rate schedule must resume exactly too (cvae: its prior flow).
    extra = {"ema_decay": 0.99} if MODELS[name].kind == "gan" else {}
    extra |= {"r1_weight": 1.0} if name == "cgan" else {}
    config, mconfig = tiny_setup(name, epochs=3, lr_decay_start=0.3, **extra)
    straight = train(config, mconfig, tmp_path / "straight", data=few_digits, **quiet)

    calls = {"n": 0}
    real_step = type(straight.trainer).step

    def crashing_step(self, *args):
        calls["n"] += 1
        if calls["n"] == 12:  # batch 4 of epoch 2 (8 batches per epoch)
            raise Crash()
        return real_step(self, *args)

    monkeypatch.setattr(type(straight.trainer), "step", crashing_step)
    with pytest.raises(Crash):
        train(config, mconfig, tmp_path / "crashed", data=few_digits, **quiet)
    monkeypatch.setattr(type(straight.trainer), "step", real_step)
    assert json.loads((tmp_path / "crashed" / "metrics.jsonl").read_text().splitlines()[-1])["epoch"] == 1

    resumed = train(config, mconfig, tmp_path / "crashed", resume=True, data=few_digits, **quiet)
    assert state_equal(straight.trainer.state_dict(), resumed.trainer.state_dict())
    assert [r["epoch"] for r in resumed.history] == [1, 2, 3]
    assert [r.get("g_loss", r.get("loss")) for r in resumed.history] == \
           [r.get("g_loss", r.get("loss")) for r in straight.history]


def test_an_existing_run_is_not_overwritten_without_resume(few_digits, run_dir):
    config, mconfig = tiny_setup("vae", epochs=1)
    train(config, mconfig, run_dir, data=few_digits, **quiet)
    with pytest.raises(RunError, match="already holds a run: pass --resume"):
        train(config, mconfig, run_dir, data=few_digits, **quiet)


def test_batch_larger_than_the_data_is_named(few_digits, run_dir):
    config, mconfig = tiny_setup("vae", epochs=1, batch_size=1000)
    with pytest.raises(RunError, match="--batch-size 1000"):
        train(config, mconfig, run_dir, data=few_digits, **quiet)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_cuda_requested_without_a_gpu_is_named(few_digits, run_dir):
    config, mconfig = tiny_setup("vae", epochs=1, device="cuda")
    with pytest.raises(RunError, match="--device cuda: no CUDA device"):
        train(config, mconfig, run_dir, data=few_digits, **quiet)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("name", ["cgan", "wgan", "cvae"])
def test_training_on_cuda_with_mixed_precision(name, few_digits, run_dir):
    config, mconfig = tiny_setup(name, epochs=2, device="cuda")
    result = train(config, mconfig, run_dir, data=few_digits, **quiet)
    assert result.trainer.autocast._enabled
    assert next(result.trainer.sampler().parameters()).device.type == "cuda"
    assert all(torch.isfinite(torch.tensor(v)) for v in result.history[-1].values())


def test_learning_rate_is_constant_then_falls_linearly_towards_zero():
    from training.trainers import lr_scale
    assert [lr_scale(e, 4, 1.0) for e in (1, 2, 3, 4)] == [1.0] * 4
    assert [lr_scale(e, 4, 0.5) for e in (1, 2, 3, 4)] == [1.0, 1.0, 1.0, 0.5]
    assert [round(lr_scale(e, 5, 0.0), 6) for e in (1, 3, 5)] == [1.0, 0.6, 0.2]


def test_the_schedule_sets_every_optimizers_learning_rate(few_digits, run_dir):
    config, mconfig = tiny_setup("gan", epochs=3, lr_decay_start=0.5, lr=1e-3)
    trainer = train(config, mconfig, run_dir, data=few_digits, **quiet).trainer
    for opt in trainer.optimizers.values():  # the last epoch: 1/3 of the run left of the decaying half
        assert opt.param_groups[0]["lr"] == pytest.approx(1e-3 * 2 / 3)


def test_r1_runs_every_few_batches_and_only_on_the_discriminator(few_digits):
    from training.trainers import R1_INTERVAL
    trainer = adversarial("gan", r1_weight=10.0)
    x, labels = few_digits.train.images[:32], few_digits.train.labels[:32]
    assert "r1" in trainer.step(x, labels, index=0)
    assert "r1" not in trainer.step(x, labels, index=1)
    assert "r1" in trainer.step(x, labels, index=R1_INTERVAL)


def test_the_prior_flow_learns_while_the_vae_trains(few_digits, run_dir):
    config, mconfig = tiny_setup("vae", epochs=4, batch_size=64, lr=3e-3)
    result = train(config, mconfig, run_dir, data=few_digits, **quiet)
    history = result.history
    assert all("flow_nll" in row for row in history)
    # The codes move while the VAE trains, so the flow's loss need not fall; what it learned shows on the
    # trained encoder's codes: the flow gives them a clearly higher likelihood than the N(0, I) it starts as.
    model = result.trainer.nets["model"].eval()
    with torch.no_grad():
        _, mu, _ = model(few_digits.val.images, None)
        flow_nll = -model.prior.log_prob(mu, None).mean()
        normal_nll = -torch.distributions.Normal(0.0, 1.0).log_prob(mu).sum(dim=1).mean()
    assert flow_nll < normal_nll - 0.5, (float(flow_nll), float(normal_nll))
    assert history[-1]["loss"] == pytest.approx(history[-1]["recon"] + history[-1]["kl"], rel=1e-4)


def test_a_snapshot_grid_lays_images_out_in_rows_with_black_gaps():
    from training.pictures import grid_pixels
    images = np.stack([np.full((1, 2, 2), v, np.float32) for v in (0.2, 0.4, 0.6)])  # three 2x2 images
    grid = grid_pixels(images, nrow=2, padding=1, scale=2)  # two rows of two 4x4 cells, 1-pixel gaps
    assert grid.shape == (9, 9) and grid.dtype == np.uint8
    assert (grid[:4, :4] == 51).all() and (grid[:4, 5:] == 102).all() and (grid[5:, :4] == 153).all()
    assert (grid[4] == 0).all() and (grid[:, 4] == 0).all() and (grid[5:, 5:] == 0).all()


def test_training_imports_nothing_of_the_service_but_its_manifest():
    """STYLE.md: training may import service.manifest (pure pydantic), no other part of the service; and
    service.admission, the floors and the comparison a version must pass at export as at the gate (pure
    arithmetic on the manifest's figures)."""
    import importlib
    import pkgutil

    import training
    for module in pkgutil.walk_packages(training.__path__, "training."):
        service = {name for name in imports_of(importlib.import_module(module.name)) if name.split(".")[0] == "service"}
        assert service <= {"service.manifest", "service.admission"}, (module.name, service)


def coded(name: str, weight: str = "1", **overrides) -> AdversarialTrainer:
    config, _ = tiny_setup(name, **{"ema_decay": 0.0, **overrides})
    mconfig = model_config(MODELS[name], {**TINY[name], "info_codes": "4", "info_weight": weight})
    return make_trainer(MODELS[name], mconfig, config, 10, torch.device("cpu"))


@pytest.mark.parametrize("name", ["gan", "wgan", "wgan-clip"])
def test_the_code_trains_the_discriminators_head_and_enters_the_generators_loss(name, few_digits):
    """InfoGAN's term: the discriminator step trains the code's head (the generator held fixed, as
    always), the generator step moves only the generator and carries the term (weighed by info_weight),
    within a few dozen steps the head names the codes far better than chance (log 4 nats), and a checkpoint
    holds the head. Weight clipping leaves the head alone: it is no part of the critic's score."""
    trainer = coded(name, n_critic=2, lr=1e-3, r1_weight=1.0)
    assert_alternation_holds(trainer, few_digits)
    head = trainer.nets["discriminator"].code_head.weight.detach().clone()
    x, labels = few_digits.train.images[:32], few_digits.train.labels[:32]
    infos = [float(trainer.step(x, labels, index)["info"]) for index in range(60)]
    assert not torch.equal(head, trainer.nets["discriminator"].code_head.weight)
    if name == "wgan-clip":  # its clipped critic's features are small: the head learns, but slowly
        assert trainer.nets["discriminator"].code_head.weight.abs().max() > trainer.config.clip
        assert np.mean(infos[-10:]) < np.mean(infos[:10]), infos
    else:
        assert np.mean(infos[-10:]) < 0.5 * np.log(4), infos
    resumed = coded(name, n_critic=2, lr=1e-3, r1_weight=1.0)
    resumed.load_state_dict(trainer.state_dict())
    assert state_equal(resumed.state_dict(), trainer.state_dict())
    heavy, light = coded(name, "1000", n_critic=1), coded(name, "0", n_critic=1)
    assert float(heavy.step(x, labels, 0)["g_loss"]) > 100 > abs(float(light.step(x, labels, 0)["g_loss"]))
