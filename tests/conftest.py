"""Shared fixtures: a small slice of the real digits and tiny networks, so every test runs in seconds."""

from __future__ import annotations

import atexit
import contextlib
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from training.data import DigitData, Split, load_dataset
from training.models import MODELS, model_config
from training.trainers import train_config

# The quality gate's cache (service/gate_cache.py) in a folder of this run, never the user's: each run gates
# afresh, and the processes the tests start inherit it.
_CACHE = tempfile.mkdtemp(prefix="digitgen-test-cache-")
os.environ["XDG_CACHE_HOME"] = _CACHE
atexit.register(shutil.rmtree, _CACHE, True)

TINY = {
    "vae": {"channels": "8,16", "hidden": "32", "latent_dim": "4", "prior_flow": "2", "flow_hidden": "16"},
    "cvae": {"channels": "8,16", "hidden": "32", "latent_dim": "4", "prior_flow": "2", "flow_hidden": "16"},
    "vae-dense": {"hidden": "64,32", "latent_dim": "4"},
    "gan": {"g_channels": "8", "d_channels": "8", "latent_dim": "8"},
    "cgan": {"g_channels": "8", "d_channels": "8", "latent_dim": "8"},
    "wgan": {"g_channels": "8", "d_channels": "8", "latent_dim": "8"},
    "wgan-clip": {"g_channels": "8", "d_channels": "8", "latent_dim": "8"},
}

# Tiny runs train for seconds and score below the floors of service/admission.py: export lists them only with
# --accept-worse, and the service's gate refuses them.
TINY_MODEL = "a tiny test model, trained for seconds"


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


def free_port() -> int:
    """A TCP port nothing listens on now (the kernel's choice)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(condition, what: str, seconds: float = 60, every: float = 0.02):
    """condition()'s first truthy value; fails the test naming `what` when none comes within `seconds`."""
    deadline = time.monotonic() + seconds
    while True:
        value = condition()
        if value:
            return value
        assert time.monotonic() < deadline, f"{what}: not within {seconds:g} s"
        time.sleep(every)


def wait_ready(client, seconds: float = 60):
    """A TestClient once its /readyz is 200 (its models warmed); fails the test otherwise."""
    wait_until(lambda: client.get("/readyz").status_code == 200, "the service never became ready", seconds)
    return client


@dataclass
class RunningService:
    url: str
    process: subprocess.Popen


@contextlib.contextmanager
def running_service(models_dir: Path, workers: int = 1, **settings: str):
    """`python -m service` on a free port over `models_dir`, DIGITGEN_<KEY> = each setting; yields its URL
    and process once every worker answers ready."""
    port = free_port()
    env = os.environ | {"DIGITGEN_LOG_LEVEL": "warning"} | {f"DIGITGEN_{k.upper()}": v for k, v in settings.items()}
    process = subprocess.Popen([sys.executable, "-m", "service", "--port", str(port), "--workers", str(workers),
                                "--models-dir", str(models_dir)], env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        answered = {"run": 0}

        def every_worker_ready():  # a run of answers: the kernel spreads new connections over the workers
            assert process.poll() is None, f"the service exited with status {process.returncode}"
            try:
                ok = urllib.request.urlopen(f"{url}/readyz", timeout=1).status == 200
            except OSError:
                ok = False
            answered["run"] = answered["run"] + 1 if ok else 0
            return answered["run"] >= 4 * workers
        wait_until(every_worker_ready, "the service never became ready", 120)
        yield RunningService(url, process)
    finally:
        process.terminate()
        process.wait(30)


def imports_of(module) -> set[str]:
    """Every module `module`'s source imports, at its top or inside a function."""
    import ast
    tree = ast.parse(Path(module.__file__).read_text())
    found = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    return found | {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}


def _params(net) -> list[torch.Tensor]:
    return [p.detach().clone() for p in net.parameters()]


def assert_alternation_holds(trainer, data: DigitData) -> None:
    """The discriminator step leaves the generator untouched (no gradient, no update), and the generator
    step leaves the discriminator untouched. `trainer` has n_critic 2; also used under DDP."""
    G, D = trainer.nets["generator"], trainer.nets["discriminator"]
    x, labels = data.train.images[:32], data.train.labels[:32]

    g_before, d_before = _params(G), _params(D)
    terms = trainer.step(x, labels, index=0)  # (0 + 1) % 2 != 0: a discriminator step only
    assert "g_loss" not in terms
    assert all(torch.equal(a, b) for a, b in zip(g_before, _params(G)))
    assert all(p.grad is None for p in G.parameters())
    assert not all(torch.equal(a, b) for a, b in zip(d_before, _params(D)))

    # On the next index both steps run. When the generator step begins (its zero_grad), record D
    # and clear D's gradients; afterwards D must be unchanged and must have received no gradient.
    d_after_d_step = {}
    original = trainer.optimizers["generator"].zero_grad

    def spy(*args, **kwargs):
        original(*args, **kwargs)
        d_after_d_step["params"] = _params(D)
        for p in D.parameters():
            p.grad = None
    trainer.optimizers["generator"].zero_grad = spy
    g_before = _params(G)
    try:
        terms = trainer.step(x, labels, index=1)
    finally:
        trainer.optimizers["generator"].zero_grad = original
    assert "g_loss" in terms
    assert all(torch.equal(a, b) for a, b in zip(d_after_d_step["params"], _params(D)))
    assert all(p.grad is None for p in D.parameters())
    assert all(p.requires_grad for p in D.parameters())  # unfrozen again afterwards
    assert not all(torch.equal(a, b) for a, b in zip(g_before, _params(G)))


@pytest.fixture
def run_dir(tmp_path) -> Path:
    return tmp_path / "run"


@pytest.fixture(scope="session", autouse=True)
def digits_judged_on_mnist_5k():
    """The suite's digit evaluator trains on mnist-5k: tests never read or download the full MNIST."""
    from training import evaluator
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(evaluator.EVALUATOR_DATASETS, "digits", "mnist-5k")
        yield


@pytest.fixture(scope="session")
def quick_evaluator(digits):
    """An evaluator trained briefly on 1,500 digits and calibrated on 500 more: (network, temperature, report)."""
    from training.evaluator import train_evaluator
    some = DigitData(digits.name, Split(digits.train.images[:2000], digits.train.labels[:2000]), digits.val,
                     digits.class_names)
    return train_evaluator(some, epochs=3, holdout=500, log=lambda *_: None)


@pytest.fixture(scope="session")
def evaluator_dir(tmp_path_factory, quick_evaluator) -> Path:
    """An evaluator cache holding the quick evaluator as the digits' one, so nothing trains the full one."""
    from training.evaluator import EVALUATOR_VERSION, save_judge
    folder = tmp_path_factory.mktemp("evaluators")
    save_judge(folder / f"digits-mnist-5k-v{EVALUATOR_VERSION}.pt", *quick_evaluator)
    return folder


@pytest.fixture(scope="session")
def judge(evaluator_dir):
    """The quick evaluator as a judge, with mnist-5k's validation digits as the reference."""
    from training.evaluator import load_judge
    return load_judge("mnist-5k", cache_dir=evaluator_dir, log=lambda *_: None)


def unversioned(metrics_text: str) -> str:
    """A scrape with the `version` label taken out of every series, for checks about a model whatever its
    version (tests/test_canary.py checks the label itself)."""
    return re.sub(r',version="[0-9a-f]+"', "", metrics_text)
