"""The evaluator's figures on cases whose answer is known."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from training import evaluate
from training.evaluate import Source, frechet_distance, precision_recall, score_images


def test_frechet_distance_is_zero_for_the_same_set_and_the_squared_shift_for_a_moved_one():
    a = torch.randn(2000, 6, generator=torch.Generator().manual_seed(0))
    assert frechet_distance(a, a) == pytest.approx(0, abs=1e-6)
    assert frechet_distance(a, a + 3) == pytest.approx(9 * 6, rel=1e-6)


def test_precision_recall_of_identical_and_of_disjoint_sets():
    a = torch.randn(300, 4, generator=torch.Generator().manual_seed(0))
    assert precision_recall(a, a) == (1.0, 1.0)
    assert precision_recall(a, a + 100) == (0.0, 0.0)
    half = precision_recall(a, torch.cat([a[:150], a[:150] + 100]))  # half the fakes far off
    assert half[0] == pytest.approx(0.5)


def test_evaluator_learns_digits(quick_evaluator):
    assert quick_evaluator[1] > 0.85


def test_real_digits_score_like_real_digits(quick_evaluator, digits):
    net, accuracy = quick_evaluator
    real = score_images(net, digits.train.images[-500:], digits.val.images, digits.train.labels[-500:])
    assert abs(real["conditional_accuracy"] - accuracy) < 0.06
    assert real["min_class_share"] > 0.05


def test_a_generator_that_always_draws_the_same_image_covers_one_class(quick_evaluator, digits):
    net, _ = quick_evaluator
    same = digits.val.images[:1].repeat(500, 1, 1, 1)
    collapsed = score_images(net, same, digits.val.images)
    assert collapsed["min_class_share"] == 0.0 and collapsed["max_class_share"] == 1.0
    real = score_images(net, digits.train.images[-500:], digits.val.images)
    assert collapsed["fid"] > 5 * real["fid"] and collapsed["recall"] < 0.05


def test_evaluate_source_reports_floor_and_ratio(evaluator_dir, digits):
    rng = np.random.default_rng(0)
    pool = digits.train.images.numpy()
    source = Source("replay", 4, 0, lambda z, y: pool[rng.integers(0, len(pool), len(z))])
    metrics = evaluate.evaluate_source(source, digits, n=600, cache_dir=evaluator_dir, log=lambda *_: None)
    assert metrics["samples"] == 600 and "conditional_accuracy" not in metrics
    assert metrics["fid_ratio"] == pytest.approx(metrics["fid"] / metrics["fid_floor"], rel=1e-3)
    assert metrics["fid_ratio"] < 2  # real digits replayed are about as far from validation as the floor


def test_non_finite_samples_are_refused(evaluator_dir, digits):
    source = Source("broken", 4, 0, lambda z, y: np.full((len(z), 1, 28, 28), np.nan, np.float32))
    with pytest.raises(evaluate.EvaluationError, match="broken"):
        evaluate.evaluate_source(source, digits, n=10, cache_dir=evaluator_dir, log=lambda *_: None)
