"""Scoring a generator's samples against real digits, on cases whose answer is known."""

from __future__ import annotations

import re

import numpy as np
import pytest
from conftest import imports_of

from training import evaluate
from training.evaluate import Source, score_images
from training.evaluator import EvaluationError
from training.models.gan import GANConfig, Generator


def test_real_digits_score_like_real_digits(judge, digits):
    real = score_images(judge, digits.train.images[-500:], digits.train.labels[-500:])
    assert abs(real["conditional_accuracy"] - judge.report["test_accuracy"]) < 0.06
    assert real["confidence_ratio"] == pytest.approx(1, abs=0.15)
    # the quick judge (3 epochs) confuses some of one class: seen at 0.046-0.07, against 0.0 for a collapse
    assert real["fid_ratio"] < 2 and real["min_class_share"] > 0.03


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


def test_a_generator_with_a_code_is_told_what_each_value_draws(judge, digits):
    """A source that draws a real 0 for code value 0 and a real 1 for value 1: the judge names the
    value's digit, the table says it, and a source without a code gets no such figures."""
    rng = np.random.default_rng(0)
    images, labels = digits.train.images.numpy(), digits.train.labels.numpy()
    zeros, ones = images[labels == 0], images[labels == 1]

    def draw(z, y):
        return np.where((z[:, 0] > z[:, 1])[:, None, None, None], zeros[rng.integers(0, len(zeros), len(z))],
                        ones[rng.integers(0, len(ones), len(z))])
    metrics = evaluate.evaluate_source(Source("coded", 4, 0, draw, codes=2), judge, n=400)
    assert metrics["code_digits"][0][0] > 0.9 and metrics["code_digits"][1][1] > 0.9
    assert metrics["code_purity"] > 0.9 and len(metrics["code_digits"]) == 2
    table = evaluate.format_table("coded", metrics)
    assert re.search(r"^\| 0 \| 0 \d+%", table, re.M) and re.search(r"^\| 1 \| 1 \d+%", table, re.M), table
    assert "of the samples are their value's most common digit" in table
    assert "code_digits" not in evaluate.evaluate_source(Source("plain", 4, 0, draw), judge, n=40)
    generator = Generator(GANConfig(latent_dim=4, g_channels=8, info_codes=3))
    assert evaluate.torch_source("g", generator, 0).codes == 3  # a run's generator says how many values


def test_truncation_scales_the_evaluated_noise(judge):
    seen = []
    source = Source("spy", 4, 0, lambda z, y: seen.append(z) or np.zeros((len(z), 1, 28, 28), np.float32))
    evaluate.evaluate_source(source, judge, n=20, truncation=0.5)
    full, _, _ = evaluate.evaluation_inputs(4, 0, 20)
    np.testing.assert_allclose(seen[0], full * 0.5)


def test_non_finite_samples_are_refused(judge):
    source = Source("broken", 4, 0, lambda z, y: np.full((len(z), 1, 28, 28), np.nan, np.float32))
    with pytest.raises(EvaluationError, match="broken"):
        evaluate.evaluate_source(source, judge, n=10)


def test_the_evaluation_modules_import_one_way():
    """metrics <- evaluator <- evaluate: the figures know no network, the judge knows no scoring."""
    from training import evaluator, metrics
    assert not {"training.evaluator", "training.evaluate"} & imports_of(metrics)
    assert "training.evaluate" not in imports_of(evaluator)


def test_the_code_table_lists_each_values_digits_most_common_first_from_five_percent():
    table = evaluate.code_table([[0.1, 0.02, 0.88], [0.0, 0.0, 0.0]], 0.5)
    assert "| 0 | 2 88%, 0 10% |" in table and "| 1 | no samples |" in table
    assert "| | 50.0% of the samples are their value's most common digit |" in table
