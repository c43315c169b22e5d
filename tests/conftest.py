"""Shared fixtures: a small slice of the real digits and tiny networks, so every test runs in seconds."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from training.data import DigitData, Split, load_dataset
from training.models import MODELS, model_config
from training.trainers import train_config

TINY = {
    "vae": {"channels": "8,16", "hidden": "32", "latent_dim": "4"},
    "cvae": {"channels": "8,16", "hidden": "32", "latent_dim": "4"},
    "vae-dense": {"hidden": "64,32", "latent_dim": "4"},
    "gan": {"g_channels": "8", "d_channels": "8", "latent_dim": "8"},
    "cgan": {"g_channels": "8", "d_channels": "8", "latent_dim": "8"},
    "wgan": {"g_channels": "8", "d_channels": "8", "latent_dim": "8"},
    "wgan-clip": {"g_channels": "8", "d_channels": "8", "latent_dim": "8"},
}


@pytest.fixture(scope="session")
def digits() -> DigitData:
    """The real mnist-5k digits (4,500 train / 500 validation)."""
    return load_dataset("mnist-5k")


@pytest.fixture(scope="session")
def few_digits(digits) -> DigitData:
    """256 training and 100 validation digits."""
    return DigitData(digits.name, Split(digits.train.images[:256], digits.train.labels[:256]),
                     Split(digits.val.images[:100], digits.val.labels[:100]), digits.class_names)


def tiny_setup(model: str, **train_overrides):
    """(TrainConfig, model config) for a tiny, quick version of `model` on the CPU."""
    config = train_config(model, **{"batch_size": 32, "device": "cpu", **train_overrides})
    return config, model_config(MODELS[model], TINY[model])


def state_equal(a: dict, b: dict) -> bool:
    """Exact equality of two (nested) state dicts."""
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(state_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(state_equal(x, y) for x, y in zip(a, b))
    if isinstance(a, torch.Tensor):
        return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    return a == b


@pytest.fixture
def run_dir(tmp_path) -> Path:
    return tmp_path / "run"


@pytest.fixture(scope="session")
def quick_evaluator(digits):
    """An evaluator trained briefly on 1,500 digits: (network, validation accuracy)."""
    from training.evaluate import train_evaluator
    some = DigitData(digits.name, Split(digits.train.images[:1500], digits.train.labels[:1500]), digits.val,
                     digits.class_names)
    return train_evaluator(some, epochs=3, log=lambda *_: None)


@pytest.fixture(scope="session")
def evaluator_dir(tmp_path_factory, quick_evaluator) -> Path:
    """An evaluator cache holding the quick evaluator for mnist-5k, so nothing trains the full one."""
    folder = tmp_path_factory.mktemp("evaluators")
    net, accuracy = quick_evaluator
    torch.save({"net": net.state_dict(), "accuracy": accuracy}, folder / "mnist-5k.pt")
    return folder
