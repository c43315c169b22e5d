"""The evaluator's figures on cases whose answer is known, and its calibration."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from training import evaluate
from training.evaluate import (Source, expected_calibration_error, fit_temperature, frechet_distance,
                               precision_recall, score_images)


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


def test_precision_recall_in_chunks_equals_one_piece():
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(500, 4, generator=g), torch.randn(500, 4, generator=g) + 0.5
    whole = evaluate._within_manifold(a, b, 3, chunk=10_000)
    assert torch.equal(evaluate._within_manifold(a, b, 3, chunk=64), whole)


def test_expected_calibration_error_of_a_sure_coin_flip_and_of_an_honest_classifier():
    labels = torch.tensor([0, 1] * 500)
    sure = torch.tensor([[1.0, 0.0]] * 1000)  # always "class 0, certainly": right half the time
    assert expected_calibration_error(sure, labels) == pytest.approx(0.5)
    honest = torch.tensor([[0.5, 0.5]] * 1000)
    assert expected_calibration_error(honest, labels) == pytest.approx(0.0, abs=1e-6)


def test_temperature_scaling_recovers_the_overconfidence_factor_and_lowers_the_error():
    g = torch.Generator().manual_seed(0)
    true_logits = torch.randn(20_000, 10, generator=g) * 2
    labels = torch.multinomial(true_logits.softmax(1), 1, generator=g).squeeze(1)
    overconfident = true_logits * 3
    temperature = fit_temperature(overconfident, labels)
    assert temperature == pytest.approx(3, rel=0.05)
    before = expected_calibration_error(overconfident.softmax(1), labels)
    after = expected_calibration_error((overconfident / temperature).softmax(1), labels)
    assert after < 0.02 < before


def test_calibration_holdout_is_fixed_and_of_the_asked_size():
    labels = torch.arange(1000) % 10
    a, b = evaluate.calibration_holdout(labels, 100), evaluate.calibration_holdout(labels, 100)
    assert a.sum() == 100 and torch.equal(a, b)


def test_evaluator_learns_digits_and_reports_its_calibration(quick_evaluator):
    _, temperature, report = quick_evaluator
    assert report["test_accuracy"] > 0.85 and temperature > 0
    assert report["calibration_digits"] == 500 and report["train_digits"] == 1500
    assert report["test_nll"] <= report["test_nll_uncalibrated"] + 0.02  # fitted on other digits


def test_real_digits_score_like_real_digits(judge, digits):
    real = score_images(judge, digits.train.images[-500:], digits.train.labels[-500:])
    assert abs(real["conditional_accuracy"] - judge.report["test_accuracy"]) < 0.06
    assert real["confidence_ratio"] == pytest.approx(1, abs=0.15)
    assert real["fid_ratio"] < 2 and real["min_class_share"] > 0.05


def test_a_generator_that_always_draws_the_same_image_covers_one_class(judge, digits):
    same = digits.val.images[:1].repeat(500, 1, 1, 1)
    collapsed = score_images(judge, same)
    assert collapsed["min_class_share"] == 0.0 and collapsed["max_class_share"] == 1.0
    assert collapsed["fid_ratio"] > 5 and collapsed["recall"] < 0.05


def test_evaluate_source_reports_each_figure_beside_real_digits(judge, digits):
    rng = np.random.default_rng(0)
    pool = digits.train.images.numpy()
    source = Source("replay", 4, 0, lambda z, y: pool[rng.integers(0, len(pool), len(z))])
    metrics = evaluate.evaluate_source(source, judge, n=500)
    assert metrics["samples"] == 500 and "conditional_accuracy" not in metrics
    assert metrics["fid_ratio"] == pytest.approx(metrics["fid"] / metrics["fid_floor"], rel=1e-3)
    assert metrics["confidence_ratio"] == pytest.approx(metrics["confidence"] / metrics["real_confidence"], rel=1e-3)
    assert metrics["fid_ratio"] < 2  # real digits replayed are about as far from the test digits as the floor
    assert "| confidence (p > 0.9) |" in evaluate.format_table("replay", metrics)


def test_truncation_scales_the_evaluated_noise(judge):
    seen = []
    source = Source("spy", 4, 0, lambda z, y: seen.append(z) or np.zeros((len(z), 1, 28, 28), np.float32))
    evaluate.evaluate_source(source, judge, n=20, truncation=0.5)
    full, _, _ = evaluate.evaluation_inputs(4, 0, 20)
    np.testing.assert_allclose(seen[0], full * 0.5)


def test_non_finite_samples_are_refused(judge):
    source = Source("broken", 4, 0, lambda z, y: np.full((len(z), 1, 28, 28), np.nan, np.float32))
    with pytest.raises(evaluate.EvaluationError, match="broken"):
        evaluate.evaluate_source(source, judge, n=10)


def test_one_evaluator_per_kind_of_data():
    assert evaluate.evaluator_dataset("mnist") == evaluate.evaluator_dataset("mnist-5k")
    assert evaluate.evaluator_dataset("fashion-mnist") == "fashion-mnist"
    with pytest.raises(evaluate.EvaluationError, match="emnist"):
        evaluate.evaluator_dataset("emnist")
