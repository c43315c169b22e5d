"""Bundle recipes and the augmentation they may use."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from conftest import imports_of, tiny_setup

from training.__main__ import main as cli
from training.augment import augment, cutout, translate
from training.bundle import RECIPES, check_recipe
from training.loop import RunError, train
from training.models import MODELS, model_config
from training.train_command import parse_train_flags, train_config_from_args


def fake_run(path, recipe, model_changes=None, **changes):
    """A run folder as `recipe` would leave it (a config.json, an empty checkpoint), with `changes`."""
    args = parse_train_flags([recipe.model, *recipe.flags])
    config = dataclasses.replace(train_config_from_args(args), **changes)
    path.mkdir()
    record = {"train": dataclasses.asdict(config),
              "model_config": dataclasses.asdict(model_config(MODELS[recipe.model],
                                                              {**dict(args.set), **(model_changes or {})}))}
    (path / "config.json").write_text(json.dumps(record))
    (path / "checkpoint.pt").write_bytes(b"")


def test_a_run_matching_its_recipe_may_resume_even_with_another_epoch_target(tmp_path):
    fake_run(tmp_path / "cvae", RECIPES["cvae"], epochs=3)
    check_recipe(RECIPES["cvae"], tmp_path / "cvae")


def test_a_run_with_other_settings_than_its_recipe_is_refused_naming_each_flag(tmp_path):
    fake_run(tmp_path / "cvae", RECIPES["cvae"], {"prior_flow": "4"}, lr_decay_start=1.0)
    with pytest.raises(RunError, match="recipe cvae") as refused:
        check_recipe(RECIPES["cvae"], tmp_path / "cvae")
    assert "--lr-decay-start 0.5 (the run: 1.0)" in str(refused.value)
    assert "--set prior_flow=8 (the run: 4)" in str(refused.value)


def test_what_a_recipe_leaves_to_the_defaults_is_part_of_it(tmp_path):
    """The gan recipe names no --n-critic: a run with 2 critic steps is not what it trains."""
    fake_run(tmp_path / "gan", RECIPES["gan"], n_critic=2)
    with pytest.raises(RunError, match=r"--n-critic 1 \(the run: 2\)"):
        check_recipe(RECIPES["gan"], tmp_path / "gan")


def test_a_run_may_resume_from_another_copy_of_the_data(tmp_path):
    fake_run(tmp_path / "gan", RECIPES["gan"], data_dir="/elsewhere/mnist")
    check_recipe(RECIPES["gan"], tmp_path / "gan")


def test_each_recipe_is_what_the_bundled_model_was_trained_with():
    from pathlib import Path

    from service.manifest import load_manifest
    manifest = load_manifest(Path(__file__).resolve().parents[1] / "exported")
    for recipe in RECIPES.values():
        config = train_config_from_args(parse_train_flags([recipe.model, *recipe.flags]))
        entry = manifest.model(recipe.name)
        assert (entry.dataset, entry.training.epochs, entry.family) == (config.dataset, config.epochs, recipe.model)
        if entry.training.settings is not None:  # recorded since issue 28: the export's own settings too
            exported_as = entry.training.settings.get("export", {})
            assert (exported_as.get("dense_rank"), exported_as.get("sharpen")) == (recipe.dense_rank, recipe.sharpen), \
                recipe.name


def test_the_bundle_and_the_command_line_do_not_import_each_other():
    """The CLI imports the bundle (the `bundle` command); the bundle must reach training through
    training.train_command, not through the CLI, not even inside a function, and compare a run's settings
    by the train command's own rule (it reads no run files itself)."""
    import training.bundle
    imported = imports_of(training.bundle)
    assert "training.__main__" not in imported
    assert "training.train_command" in imported
    assert not {"json", "training.loop"} & imported


def test_every_recipe_parses():
    for recipe in RECIPES.values():
        train_config_from_args(parse_train_flags([recipe.model, *recipe.flags]))


def test_translation_shifts_content_and_fills_with_background():
    torch.manual_seed(0)
    x = torch.full((64, 1, 28, 28), -1.0)
    x[:, :, 10:18, 10:18] = 1.0
    moved = translate(x, 3)
    assert torch.equal(moved.sum(dim=(1, 2, 3)), x.sum(dim=(1, 2, 3)))  # an 8x8 square 3+ px from the edge survives
    assert not torch.equal(moved, x) and set(moved.unique().tolist()) == {-1.0, 1.0}


def test_cutout_blanks_a_square_and_augmentation_is_differentiable():
    x = torch.ones(32, 1, 28, 28, requires_grad=True)
    blanked = (cutout(x, 14) == -1).flatten(1).sum(1)
    assert ((blanked > 0) & (blanked <= 15 * 15)).all()
    augment(x * 2, "translation,cutout").sum().backward()
    assert x.grad.abs().sum() > 0


def test_a_gan_trains_with_augmentation(tmp_path, few_digits):
    config, mconfig = tiny_setup("gan", epochs=1, augment="translation,cutout")
    result = train(config, mconfig, tmp_path / "run", progress=False, data=few_digits, log=lambda *_: None)
    assert all(torch.isfinite(torch.tensor(v)) for k, v in result.history[0].items() if k != "epoch")


@pytest.mark.parametrize("flags, message", [
    (["gan", "--augment", "rotate"], "--augment"),
    (["vae", "--augment", "translation"], "--augment"),
    (["gan", "--kl-weight", "2"], "--kl-weight"),
    (["vae", "--ema-decay", "0.999"], "--ema-decay"),
])
def test_training_flags_for_the_wrong_family_are_refused(flags, message, tmp_path, capsys):
    assert cli(["train", *flags, "--out", str(tmp_path / "r")]) == 2
    assert message in capsys.readouterr().err
