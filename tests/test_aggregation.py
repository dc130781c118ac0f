"""Aggregation math: sufficient statistics, exact merges, server optimizers, validation."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edgefl.aggregation import (
    UpdateRejected,
    WeightedSum,
    available_aggregators,
    make_aggregator,
    spec_of,
    validate_update,
)
from edgefl.models.numpy_models import train_epochs
from edgefl.tasks import digits


@settings(max_examples=60, deadline=None)
@given(
    n_updates=st.integers(1, 12),
    n_parts=st.integers(1, 4),
    size=st.integers(1, 70_000),
    seed=st.integers(0, 2**16),
)
def test_partials_merge_to_the_same_mean(n_updates, n_parts, size, seed) -> None:
    rng = np.random.default_rng(seed)
    updates = [{"x": rng.normal(size=size).astype(np.float32)} for _ in range(n_updates)]
    weights = rng.integers(1, 500, n_updates).astype(float)
    spec = spec_of(updates[0])
    parts = [WeightedSum(spec) for _ in range(n_parts)]
    for i, (u, w) in enumerate(zip(updates, weights, strict=True)):
        parts[i % n_parts].fold(u, w)
    merged = WeightedSum(spec)
    for p in parts:
        merged.merge(p.sums, p.weight, p.count)
    expected = sum(w * u["x"].astype(np.float64) for u, w in zip(updates, weights, strict=True))
    expected /= weights.sum()
    assert merged.count == n_updates
    assert merged.weight == pytest.approx(weights.sum())
    np.testing.assert_allclose(merged.mean()["x"], expected, rtol=1e-10, atol=1e-12)
    assert merged.mean({"x": "float32"})["x"].dtype == np.float32


def test_fold_rejects_non_positive_weight() -> None:
    acc = WeightedSum({"x": ("float64", (3,))})
    with pytest.raises(ValueError):
        acc.fold({"x": np.ones(3)}, 0)
    with pytest.raises(ValueError):
        acc.mean()


@pytest.mark.parametrize(
    ("tensors", "reason"),
    [
        ({"W": np.zeros((2, 3))}, "missing"),
        ({"W": np.zeros((2, 3)), "b": np.zeros(3), "z": np.zeros(1)}, "unexpected"),
        ({"W": np.zeros((3, 2)), "b": np.zeros(3)}, "shape"),
        ({"W": np.zeros((2, 3), np.float32), "b": np.zeros(3)}, "dtype"),
        ({"W": np.full((2, 3), np.inf), "b": np.zeros(3)}, "NaN or infinite"),
        ({"W": np.zeros((2, 3)), "b": np.array([0, np.nan, 0])}, "NaN or infinite"),
    ],
)
def test_validate_update_rejects_with_reason(tensors, reason) -> None:
    spec = spec_of({"W": np.zeros((2, 3)), "b": np.zeros(3)})
    with pytest.raises(UpdateRejected, match=reason):
        validate_update(tensors, spec)


def test_fedavg_is_the_mean() -> None:
    g = {"w": np.zeros(4)}
    mean = {"w": np.arange(4.0)}
    np.testing.assert_array_equal(make_aggregator("fedavg").step(g, mean)["w"], mean["w"])


def test_fedadam_first_step_matches_the_paper_formula() -> None:
    agg = make_aggregator("fedadam", lr=0.5, beta1=0.9, beta2=0.99, tau=1e-3)
    g = {"w": np.array([1.0, -2.0])}
    mean = {"w": np.array([1.5, -2.5])}
    delta = mean["w"] - g["w"]
    m = 0.1 * delta
    v = 0.99 * 1e-6 + 0.01 * delta**2
    expected = g["w"] + 0.5 * m / (np.sqrt(v) + 1e-3)
    np.testing.assert_allclose(agg.step(g, mean)["w"], expected)
    state = agg.state_dict()
    other = make_aggregator("fedadam", lr=0.5, beta1=0.9, beta2=0.99, tau=1e-3)
    other.load_state_dict(state)
    nxt = {"w": np.array([2.0, -3.0])}
    np.testing.assert_array_equal(agg.step(g, nxt)["w"], other.step(g, nxt)["w"])


def test_unknown_aggregator_lists_the_known_ones() -> None:
    with pytest.raises(ValueError, match="fedavg"):
        make_aggregator("nope")
    assert {"fedavg", "fedadam", "fedyogi", "fedadagrad"} <= set(available_aggregators())


@pytest.mark.parametrize("name", ["fedadam", "fedyogi", "fedadagrad"])
def test_fedopt_learns_the_digits_task(name) -> None:
    """Each server optimizer, run on the canonical partition, must actually learn."""
    d = digits.load()
    parts = digits.partition(d.ytr, 10)
    sizes = np.array([len(p) for p in parts], dtype=float)
    agg = make_aggregator(name, lr=0.05)
    w = digits.initial_weights()
    start = digits.evaluator(w)
    for r in range(1, 16):
        acc = WeightedSum(spec_of(w))
        for k, p in enumerate(parts):
            acc.fold(train_epochs(w, d.Xtr[p], d.ytr[p], round_=r, seed=k), sizes[k])
        w = agg.step(w, acc.mean())
    end = digits.evaluator(w)
    assert end["accuracy"] > 0.85, end
    assert end["loss"] < start["loss"]
