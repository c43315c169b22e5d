"""The sample-set figures on cases whose answer is known."""

from __future__ import annotations

import pytest
import torch

from training import metrics
from training.metrics import expected_calibration_error, frechet_distance, precision_recall


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
    whole = metrics._within_manifold(a, b, 3, chunk=10_000)
    assert torch.equal(metrics._within_manifold(a, b, 3, chunk=64), whole)


def test_expected_calibration_error_of_a_sure_coin_flip_and_of_an_honest_classifier():
    labels = torch.tensor([0, 1] * 500)
    sure = torch.tensor([[1.0, 0.0]] * 1000)  # always "class 0, certainly": right half the time
    assert expected_calibration_error(sure, labels) == pytest.approx(0.5)
    honest = torch.tensor([[0.5, 0.5]] * 1000)
    assert expected_calibration_error(honest, labels) == pytest.approx(0.0, abs=1e-6)
