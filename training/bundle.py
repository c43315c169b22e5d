"""The bundled model set: what `make train` trains, evaluates and exports into exported/.

Each recipe is the `python -m training train` command line that produced a bundled model, so the
figures in the manifest and the README can be reproduced one model at a time as well.
Runs go to runs/NAME and resume, so an interrupted `make train` continues where it stopped.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Recipe:
    name: str                           # the exported model's name
    model: str                          # the family in training.models.MODELS
    flags: tuple[str, ...]              # `train` flags: epochs and tuned settings
    default_for: tuple[str, ...] = ()   # service endpoints this model serves by default


RECIPES: dict[str, Recipe] = {r.name: r for r in [
    Recipe("vae", "vae", ("--epochs", "60")),
    Recipe("cvae", "cvae", ("--epochs", "60")),
    Recipe("gan", "gan", ("--epochs", "150")),
    Recipe("wgan", "wgan", ("--epochs", "100")),
    Recipe("cgan", "cgan", ("--epochs", "200"), default_for=("sample", "generate", "interpolate")),
]}


def build(names: list[str], runs_dir: Path = Path("runs"), out_dir: Path = Path("exported"),
          device: str = "auto", samples: int = 5000) -> None:
    """Train (or resume) each recipe, then export and evaluate it into `out_dir`."""
    from training.__main__ import main as cli
    from training.export import export_run
    from training.loop import RunError

    for name in names:
        recipe = RECIPES[name]
        run = runs_dir / name
        code = cli(["train", recipe.model, *recipe.flags, "--device", device, "--out", str(run),
                    "--resume", "--quiet"])
        if code:
            raise RunError(f"training {name} failed (exit {code}); its run is in {run}")
        export_run(run, name, out_dir, recipe.default_for, samples)
