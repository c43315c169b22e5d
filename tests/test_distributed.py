"""Training under torchrun: 2 processes on the CPU (gloo), launched with torch's own launcher."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import state_equal, tiny_setup

from training import distributed
from training.data import shuffled_batches
from training.distributed import DistributedError, World
from training.loop import load_run, train
from training.models import MODELS
from training.trainers import make_trainer

WORKER = Path(__file__).with_name("distributed_worker.py")
ROOT = Path(__file__).parent.parent
quiet = dict(progress=False, log=lambda *_: None)


def torchrun(*args: str, **kwargs) -> subprocess.CompletedProcess | subprocess.Popen:
    """torch.distributed.run with 2 processes of one thread each (the machine has 2 cores)."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    if kwargs.pop("background", False):
        return subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True)
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, **kwargs)


def test_the_environment_names_the_world():
    assert distributed.from_environment({}) == World()
    assert distributed.from_environment({"RANK": "3", "LOCAL_RANK": "1", "WORLD_SIZE": "4"}) == World(3, 1, 4)
    with pytest.raises(DistributedError, match="RANK 4 outside WORLD_SIZE 4"):
        distributed.from_environment({"RANK": "4", "LOCAL_RANK": "0", "WORLD_SIZE": "4"})
    with pytest.raises(DistributedError, match="must be integers"):
        distributed.from_environment({"RANK": "x", "WORLD_SIZE": "2"})


def test_the_ranks_share_each_global_batch_and_cover_the_epoch_once():
    one = shuffled_batches(100, 8, torch.Generator().manual_seed(5))  # 12 batches of 8; 4 images left out
    ranks = [shuffled_batches(100, 4, torch.Generator().manual_seed(5), rank=r, ranks=2) for r in range(2)]
    assert len(ranks[0]) == len(ranks[1]) == len(one) == 12
    for k, batch in enumerate(one):  # step k of the two ranks together = step k of one process, batch 8
        assert torch.equal(torch.cat([ranks[0][k], ranks[1][k]]), batch)
    seen = torch.cat([b for r in ranks for b in r])
    assert len(seen.unique()) == len(seen) == 96


@pytest.fixture(scope="module")
def worker(tmp_path_factory) -> tuple[dict, dict]:
    """Both ranks' reports from tests/distributed_worker.py."""
    out = tmp_path_factory.mktemp("ddp")
    done = torchrun(str(WORKER), str(out))
    assert done.returncode == 0, done.stdout + done.stderr
    return tuple(torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(2))


def parameters(state: dict) -> dict:
    """The trained weights, the optimizers and the EMA's weights: without BatchNorm's running statistics,
    which each CPU rank computes over its own batch (SyncBatchNorm runs on GPUs only)."""
    nets = {role: {k: v for k, v in net.items() if "running" not in k and "num_batches" not in k}
            for role, net in state["nets"].items()}
    ema = state["ema"] and {k: v for k, v in state["ema"]["net"].items() if "running" not in k
                            and "num_batches" not in k}
    return {"nets": nets, "optimizers": state["optimizers"], "ema": ema}


def test_the_held_network_gets_no_gradient_and_no_update_under_ddp(worker):
    for report in worker:
        assert report["alternation"] == {"wgan": "ok", "cgan": "ok"}


def test_every_rank_holds_the_same_weights(worker):
    rank0, rank1 = worker
    assert state_equal(rank0["vae"], rank1["vae"])  # no BatchNorm: everything is equal
    assert state_equal(parameters(rank0["straight"]), parameters(rank1["straight"]))


def test_a_resumed_distributed_run_equals_the_uninterrupted_one(worker):
    rank0, rank1 = worker
    assert state_equal(rank0["straight"], rank0["resumed"])  # what rank 0 saved, EMA and buffers included
    assert state_equal(parameters(rank1["straight"]), parameters(rank1["resumed"]))
    assert [row["epoch"] for row in rank0["history"]] == [1, 2]


def _vae_by_hand(data, noise_seed: int, batch_size: int) -> dict:
    """The tiny VAE trained 2 epochs in one process, drawing its noise from `noise_seed`."""
    config, mconfig = tiny_setup("vae", epochs=2, batch_size=batch_size)
    torch.manual_seed(0)
    trainer = make_trainer(MODELS["vae"], mconfig, config, 10, torch.device("cpu"))
    torch.manual_seed(noise_seed)
    order = torch.Generator().manual_seed(0)
    for _ in range(2):
        for index, batch in enumerate(shuffled_batches(len(data.train), batch_size, order)):
            trainer.step(data.train.images[batch], data.train.labels[batch], index)
    return trainer.state_dict()["nets"]["model"]


def _distance(a: dict, b: dict) -> float:
    return float(sum(((a[k] - b[k]) ** 2).sum() for k in a).sqrt())


def test_two_processes_at_half_the_batch_follow_one_process_at_the_whole(worker, few_digits, tmp_path):
    """Not bit-exact: each rank draws its own reparameterisation noise where one process draws one stream,
    and the ranks' gradients are summed in another order. So the tolerance is the noise's own effect: two
    one-process runs that differ only in their noise are as far apart (L2 over all weights after 16 Adam
    steps), while a run at the per-process batch (twice the steps, half the batch) is far off."""
    two = worker[0]["vae"]["nets"]["model"]
    config, mconfig = tiny_setup("vae", epochs=2, batch_size=32)
    one = train(config, mconfig, tmp_path / "one", data=few_digits, **quiet).trainer.state_dict()["nets"]["model"]
    noise_only = _distance(_vae_by_hand(few_digits, 1, 32), _vae_by_hand(few_digits, 2, 32))
    half_batch = _distance(two, _vae_by_hand(few_digits, 1, 16))
    assert _distance(two, one) < 1.5 * noise_only
    assert _distance(two, one) < 0.6 * half_batch


TINY_CGAN = ["--set", "g_channels=8", "--set", "d_channels=8", "--latent-dim", "8", "--batch-size", "32",
             "--limit", "256", "--device", "cpu", "--quiet"]


def test_torchrun_trains_one_run_written_by_rank_0_alone(tmp_path):
    run = tmp_path / "run"
    done = torchrun("-m", "training", "train", "cgan", "--epochs", "2", "--out", str(run), *TINY_CGAN)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.count("done:") == 1 and done.stdout.count("cgan epoch 1/2") == 1, done.stdout
    assert sorted(p.name for p in run.iterdir()) == ["checkpoint.pt", "config.json", "loss.png", "metrics.jsonl",
                                                     "progress.gif", "snapshots"]
    assert [json.loads(line)["epoch"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    record = json.loads((run / "config.json").read_text())
    assert record["processes"] == 2 and record["train"]["batch_size"] == 32
    trainer, _, epoch = load_run(run)  # what export and evaluate read: no DDP `module.` prefix
    assert epoch == 2
    assert not any(key.startswith("module.") for net in trainer.state_dict()["nets"].values() for key in net)
    # 2 processes x 32 = 64 images a step; 256 // 64 = 4 steps an epoch
    assert json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])["step"] == 8

    alone = subprocess.run([sys.executable, "-m", "training", "train", "cgan", "--epochs", "3", "--out", str(run),
                            "--resume", *TINY_CGAN], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert alone.returncode == 2
    assert "written by a run of 2 process(es); resume it with 2" in alone.stderr


def _rank_pid(rank: int, marker: str) -> int | None:
    """The pid of the training process with RANK=`rank` whose command line holds `marker`."""
    for proc in Path("/proc").iterdir():
        try:
            environ = (proc / "environ").read_bytes().split(b"\0")
            command = (proc / "cmdline").read_bytes()
        except OSError:
            continue
        if f"RANK={rank}".encode() in environ and marker.encode() in command and b"training" in command:
            return int(proc.name)
    return None


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="finds the rank's process through /proc")
def test_a_failed_rank_ends_the_run_and_leaves_the_last_checkpoint(tmp_path):
    run = tmp_path / "run"
    launcher = torchrun("-m", "training", "train", "cgan", "--epochs", "500", "--out", str(run), *TINY_CGAN,
                        background=True)
    try:
        deadline = time.monotonic() + 120
        while not (run / "checkpoint.pt").exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        pid = _rank_pid(1, str(run))
        assert pid, "rank 1 not found"
        os.kill(pid, signal.SIGKILL)
        output, _ = launcher.communicate(timeout=120)
    finally:
        launcher.kill()
    assert launcher.returncode != 0
    assert "rank" in output and "SIGKILL" in output, output  # torchrun names the rank and what ended it
    trainer, _, epoch = load_run(run)  # intact: written atomically, so an epoch is either all there or not
    assert 1 <= epoch < 500
