"""The checks that need several processes, run by tests/test_distributed.py under torch's launcher:

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/distributed_worker.py OUT

Every rank runs the same program on the CPU (gloo) and saves what it saw to OUT/rank{R}.pt; the test
compares the ranks with each other and with one-process runs.
"""

from __future__ import annotations

import sys
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

from conftest import assert_alternation_holds, tiny_setup  # noqa: E402

from training import distributed  # noqa: E402
from training.data import DigitData, Split, load_dataset  # noqa: E402
from training.loop import train  # noqa: E402
from training.models import MODELS  # noqa: E402
from training.trainers import make_trainer  # noqa: E402

REFERENCE_BATCH = 32   # the one-process runs the test compares with use this batch
DIGITS = 256


def few_digits() -> DigitData:
    digits = load_dataset("mnist-5k")
    return DigitData(digits.name, Split(digits.train.images[:DIGITS], digits.train.labels[:DIGITS]),
                     Split(digits.val.images[:100], digits.val.labels[:100]), digits.class_names)


def alternation(name: str, data: DigitData, world, **extra) -> str:
    """"ok", or why the held network moved under DDP."""
    config, mconfig = tiny_setup(name, ema_decay=0.0, n_critic=2, **extra)
    trainer = make_trainer(MODELS[name], mconfig, config, 10, torch.device("cpu"))
    trainer.distribute(world)
    try:
        assert_alternation_holds(trainer, data)
    except AssertionError:
        return traceback.format_exc()
    return "ok"


def main(out: Path) -> None:
    world = distributed.from_environment()
    distributed.join(world, torch.device("cpu"))
    data = few_digits()
    quiet = dict(progress=False, log=lambda *_: None, data=data, world=world)
    per_rank = REFERENCE_BATCH // world.size
    report = {
        # wgan: the gradient penalty's double backward; cgan: the R1 penalty and the class input
        "alternation": {"wgan": alternation("wgan", data, world), "cgan": alternation("cgan", data, world,
                                                                                      r1_weight=1.0)},
    }
    config, mconfig = tiny_setup("vae", epochs=2, batch_size=per_rank)
    report["vae"] = train(config, mconfig, out / "vae", **quiet).trainer.state_dict()

    # A distributed run stopped after epoch 1 and resumed must equal the uninterrupted one.
    settings = dict(batch_size=per_rank, ema_decay=0.99, lr_decay_start=0.3)
    config, mconfig = tiny_setup("wgan", epochs=2, **settings)
    report["straight"] = train(config, mconfig, out / "straight", **quiet).trainer.state_dict()
    config, mconfig = tiny_setup("wgan", epochs=1, **settings)
    train(config, mconfig, out / "resumed", **quiet)
    config, mconfig = tiny_setup("wgan", epochs=2, **settings)
    resumed = train(config, mconfig, out / "resumed", resume=True, **quiet)
    report["resumed"] = resumed.trainer.state_dict()
    report["history"] = resumed.history
    torch.save(report, out / f"rank{world.rank}.pt")
    distributed.leave()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
