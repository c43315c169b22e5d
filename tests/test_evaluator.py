"""The evaluator: it learns the digits, its calibration, one per kind of data."""

from __future__ import annotations

import pytest
import torch

from training import evaluator
from training.evaluator import EvaluationError, fit_temperature
from training.metrics import expected_calibration_error


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
    a, b = evaluator.calibration_holdout(labels, 100), evaluator.calibration_holdout(labels, 100)
    assert a.sum() == 100 and torch.equal(a, b)


def test_evaluator_learns_digits_and_reports_its_calibration(quick_evaluator):
    _, temperature, report = quick_evaluator
    assert report["test_accuracy"] > 0.85 and temperature > 0
    assert report["calibration_digits"] == 500 and report["train_digits"] == 1500
    assert report["test_nll"] <= report["test_nll_uncalibrated"] + 0.02  # fitted on other digits


def test_one_evaluator_per_kind_of_data():
    assert evaluator.evaluator_dataset("mnist") == evaluator.evaluator_dataset("mnist-5k")
    assert evaluator.evaluator_dataset("fashion-mnist") == "fashion-mnist"
    with pytest.raises(EvaluationError, match="emnist"):
        evaluator.evaluator_dataset("emnist")
