"""Every aggregator against a plain numpy implementation of its paper's formula, on random
inputs; the splittable ones also through a multi-region split of sufficient statistics; and
the validation of their parameters."""

from __future__ import annotations

import importlib.metadata
import math

import numpy as np
import pytest
from scipy import stats

from edgefl.aggregation import WeightedSum, make_aggregator
from edgefl.aggregation import base as agg_base
from edgefl.aggregation.base import describe_aggregators
from edgefl.aggregation.robust import RegionalEstimates, robust_rule
from edgefl.controller.config import SessionConfig
from edgefl.protocol.types import spec_of

SHAPES = {"W": (5, 3), "b": (3,)}


def random_models(n: int, seed: int) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{k: rng.normal(size=s) for k, s in SHAPES.items()} for _ in range(n)]


def split_mean(models: list, weights: np.ndarray, n_regions: int) -> dict[str, np.ndarray]:
    """The controller's merge of ``n_regions`` combiners' sums (devices round-robin)."""
    spec = spec_of(models[0])
    merged = WeightedSum(spec)
    for r in range(n_regions):
        part = WeightedSum(spec)
        for i in range(r, len(models), n_regions):
            part.fold(models[i], weights[i])
        merged.merge(part.sums, part.weight, part.count)
    return merged.mean()


def adam_family(variant: str, g, means, lr=0.1, b1=0.9, b2=0.99, tau=1e-3):
    """Reddi et al. 2021, Algorithm 2, written out per variant."""
    m = dict.fromkeys(g, 0.0)
    v = dict.fromkeys(g, tau**2)
    out = []
    for mean in means:
        new = {}
        for k in g:
            d = mean[k] - g[k]
            m[k] = b1 * m[k] + (1 - b1) * d
            if variant == "fedadam":
                v[k] = b2 * v[k] + (1 - b2) * d**2
            elif variant == "fedyogi":
                v[k] = v[k] - (1 - b2) * d**2 * np.sign(v[k] - d**2)
            else:
                v[k] = v[k] + d**2
            new[k] = g[k] + lr * m[k] / (np.sqrt(v[k]) + tau)
        g = new
        out.append(g)
    return out


def fedavgm_ref(g, means, server_lr, beta):
    """Hsu et al. 2019: v = beta v + (w - mean); w -= server_lr v."""
    v = {k: np.zeros_like(g[k]) for k in g}
    out = []
    for mean in means:
        v = {k: beta * v[k] + (g[k] - mean[k]) for k in g}
        g = {k: g[k] - server_lr * v[k] for k in g}
        out.append(g)
    return out


@pytest.mark.parametrize("n_regions", [1, 2, 5])
def test_fedavg_and_fedprox_are_the_weighted_mean_over_any_split(n_regions: int) -> None:
    models = random_models(11, seed=1)
    weights = np.random.default_rng(2).integers(1, 200, size=11).astype(float)
    want = {k: sum(w * m[k] for w, m in zip(weights, models)) / weights.sum() for k in SHAPES}
    g = random_models(1, seed=3)[0]
    for name in ("fedavg", "fedprox"):
        got = make_aggregator(name).step(g, split_mean(models, weights, n_regions))
        for k in SHAPES:
            np.testing.assert_allclose(got[k], want[k], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("variant", ["fedadam", "fedyogi", "fedadagrad"])
@pytest.mark.parametrize("n_regions", [1, 3])
def test_fedopt_family_follows_reddi_et_al(variant: str, n_regions: int) -> None:
    g = random_models(1, seed=4)[0]
    weights = np.arange(1.0, 10.0)
    means = [split_mean(random_models(9, seed=10 + t), weights, n_regions) for t in range(3)]
    want = adam_family(variant, g, means, lr=0.05, b1=0.8, b2=0.95, tau=1e-2)
    agg = make_aggregator(variant, lr=0.05, beta1=0.8, beta2=0.95, tau=1e-2)
    got = []
    for t, mean in enumerate(means):
        if t == 2:  # a restarted controller resumes from the stored state
            state = agg.state_dict()
            agg = make_aggregator(variant, lr=0.05, beta1=0.8, beta2=0.95, tau=1e-2)
            agg.load_state_dict(state)
        g_next = agg.step(got[-1] if got else g, mean)
        got.append(g_next)
    for a, b in zip(got, want):
        for k in SHAPES:
            np.testing.assert_allclose(a[k], b[k], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("n_regions", [1, 4])
def test_fedavgm_follows_hsu_et_al(n_regions: int) -> None:
    g = random_models(1, seed=5)[0]
    weights = np.arange(2.0, 10.0)
    means = [split_mean(random_models(8, seed=20 + t), weights, n_regions) for t in range(4)]
    want = fedavgm_ref(g, means, server_lr=0.7, beta=0.6)
    agg = make_aggregator("fedavgm", server_lr=0.7, beta=0.6)
    cur = g
    for t, mean in enumerate(means):
        if t == 2:
            state = agg.state_dict()
            agg = make_aggregator("fedavgm", server_lr=0.7, beta=0.6)
            agg.load_state_dict(state)
        cur = agg.step(cur, mean)
        for k in SHAPES:
            np.testing.assert_allclose(cur[k], want[t][k], rtol=1e-12, atol=1e-12)


def test_fedavgm_without_momentum_is_fedavg() -> None:
    g = random_models(1, seed=6)[0]
    mean = random_models(1, seed=7)[0]
    got = make_aggregator("fedavgm", server_lr=1.0, beta=0.0).step(g, mean)
    for k in SHAPES:
        np.testing.assert_allclose(got[k], mean[k], rtol=0, atol=1e-15)


def test_fedmedian_is_the_coordinate_wise_median() -> None:
    for n in (7, 8):  # odd and even counts
        models = random_models(n, seed=n)
        got = make_aggregator("fedmedian").estimate(models)  # type: ignore[attr-defined]
        for k, shape in SHAPES.items():
            for idx in np.ndindex(shape):
                vals = sorted(m[k][idx] for m in models)
                mid = (vals[(n - 1) // 2] + vals[n // 2]) / 2
                assert got[k][idx] == pytest.approx(mid, abs=1e-15)


@pytest.mark.parametrize(("n", "beta"), [(10, 0.2), (9, 0.1), (7, 0.3), (5, 0.0)])
def test_trimmed_mean_follows_yin_et_al(n: int, beta: float) -> None:
    models = random_models(n, seed=30 + n)
    got = make_aggregator("trimmed_mean", beta=beta).estimate(models)  # type: ignore[attr-defined]
    k_cut = math.floor(beta * n)
    for k, shape in SHAPES.items():
        for idx in np.ndindex(shape):
            vals = sorted(m[k][idx] for m in models)
            assert got[k][idx] == pytest.approx(np.mean(vals[k_cut : n - k_cut]), abs=1e-14)
        ref = stats.trim_mean(np.stack([m[k] for m in models]), beta, axis=0)
        np.testing.assert_allclose(got[k], ref, rtol=1e-12)


def krum_ref(models: list, f: int, m: int) -> dict[str, np.ndarray]:
    """Blanchard et al. 2017, written with loops over pairs."""
    n = len(models)
    flat = [np.concatenate([u[k].ravel() for k in SHAPES]) for u in models]
    scores = []
    for i in range(n):
        d = sorted(float(np.sum((flat[i] - flat[j]) ** 2)) for j in range(n) if j != i)
        scores.append(sum(d[: n - f - 2]))
    chosen = sorted(range(n), key=lambda i: scores[i])[:m]
    return {k: np.mean([models[i][k] for i in chosen], axis=0) for k in SHAPES}


@pytest.mark.parametrize(("n", "f"), [(7, 2), (10, 1), (12, 3)])
def test_krum_and_multikrum_follow_blanchard_et_al(n: int, f: int) -> None:
    models = random_models(n, seed=40 + n)
    # two far-off (Byzantine) updates are never chosen
    models[0] = {k: v * 50 for k, v in models[0].items()}
    models[1] = {k: v - 30 for k, v in models[1].items()}
    krum = make_aggregator("krum", f=f).estimate(models)  # type: ignore[attr-defined]
    want = krum_ref(models, f, 1)
    assert any(all(np.array_equal(krum[k], u[k]) for k in SHAPES) for u in models[2:])
    for m in (None, 3):
        multi = make_aggregator("multikrum", f=f, m=m)
        got = multi.estimate(models)  # type: ignore[attr-defined]
        want_m = krum_ref(models, f, n - f if m is None else m)
        for k in SHAPES:
            np.testing.assert_allclose(got[k], want_m[k], rtol=1e-12, atol=1e-12)
    for k in SHAPES:
        np.testing.assert_allclose(krum[k], want[k], rtol=0, atol=0)


def test_krum_refuses_too_few_updates() -> None:
    with pytest.raises(ValueError, match=r"f=2 needs at least 7 updates, got 6"):
        make_aggregator("krum", f=2).estimate(random_models(6, 0))  # type: ignore[attr-defined]


def weighted_median_ref(values: list[float], weights: list[float]) -> float:
    order = sorted(range(len(values)), key=lambda i: values[i])
    acc = 0.0
    for i in order:
        acc += weights[i]
        if acc >= sum(weights) / 2:
            return values[i]
    raise AssertionError


@pytest.mark.parametrize("rule", ["fedmedian", "trimmed_mean", "krum", "multikrum"])
def test_two_level_estimator(rule: str) -> None:
    """One region: the paper's estimator itself. Several: the count-weighted coordinate-wise
    median of the regional estimates (docs/algorithms.md)."""
    agg = robust_rule(make_aggregator(rule))
    assert agg is not None and agg.splittable is False
    models = random_models(15, seed=50)
    spec = spec_of(models[0])
    one = RegionalEstimates(agg, spec)
    one.add(agg.estimate(models), len(models))
    for k in SHAPES:
        np.testing.assert_array_equal(one.center()[k], agg.estimate(models)[k])
    groups = [models[0:5], models[5:12], models[12:15] + models[0:3]]  # 5, 7 and 6 updates
    regional = [agg.estimate(g) for g in groups]
    merged = RegionalEstimates(agg, spec)
    for est, g in zip(regional, groups):
        merged.add(est, len(g))
    got = merged.center()
    assert merged.count == 18
    for k, shape in SHAPES.items():
        for idx in np.ndindex(shape):
            vals = [e[k][idx] for e in regional]
            assert got[k][idx] == weighted_median_ref(vals, [5, 7, 6])
            assert min(vals) <= got[k][idx] <= max(vals)


# parameter validation --------------------------------------------------------------------
@pytest.mark.parametrize(
    ("name", "params", "message"),
    [
        ("fedadam", {"lr": 0}, r"aggregator 'fedadam': parameter 'lr'.*greater than 0.*lr > 0"),
        ("fedavgm", {"beta": 1.0}, r"'fedavgm': parameter 'beta'.*allowed: beta >= 0, < 1"),
        ("trimmed_mean", {"beta": 0.5}, r"'trimmed_mean': parameter 'beta'.*< 0.5"),
        ("krum", {"f": -1}, r"'krum': parameter 'f'.*>= 0"),
        ("krum", {"m": 3}, r"'krum': unknown parameter 'm' \(it takes: f\)"),
        ("fedprox", {"mu": "lots"}, r"'fedprox': parameter 'mu'.*number"),
        ("fedavg", {"lr": 1}, r"'fedavg': unknown parameter 'lr' \(it takes: none\)"),
        ("fedavgx", {}, r"unknown aggregator 'fedavgx'; available: .*fedavgm"),
    ],
)
def test_bad_parameters_fail_with_a_clear_message(name: str, params: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        make_aggregator(name, **params)
    with pytest.raises(ValueError, match=message):  # ... and so at session creation
        SessionConfig(aggregator=name, aggregator_params=params)


def test_defaults_are_filled_and_documented() -> None:
    infos = {i.name: i for i in describe_aggregators()}
    assert {"fedavg", "fedavgm", "fedprox", "fedadam", "fedyogi", "fedadagrad"} <= {
        n for n, i in infos.items() if i.splittable
    }
    assert {n for n, i in infos.items() if not i.splittable} == {
        "fedmedian",
        "trimmed_mean",
        "krum",
        "multikrum",
    }
    params = {p.name: (p.default, p.allowed) for p in infos["fedavgm"].params or []}
    assert params == {"server_lr": (1.0, "> 0"), "beta": (0.9, ">= 0, < 1")}
    assert make_aggregator("fedadam").lr == 0.1  # type: ignore[attr-defined]


class PlainPlugin:
    """A third-party aggregator with no Params: its own constructor checks its input."""

    name = "plain"

    def __init__(self, scale: float = 1.0) -> None:
        if scale <= 0:
            raise ValueError("scale must be positive")
        self.scale = scale

    def step(self, global_weights, mean):
        return {k: global_weights[k] + self.scale * (mean[k] - global_weights[k]) for k in mean}

    def state_dict(self):
        return {}

    def load_state_dict(self, state) -> None:
        pass


def test_plugins_without_a_schema_still_work(monkeypatch: pytest.MonkeyPatch) -> None:
    ep = importlib.metadata.EntryPoint(
        name="plain", value="tests.test_aggregators:PlainPlugin", group="edgefl.aggregators"
    )
    monkeypatch.setattr(agg_base, "entry_points", lambda group: [ep])
    agg = make_aggregator("plain", scale=0.5)
    assert agg.step({"w": np.zeros(2)}, {"w": np.ones(2)})["w"].tolist() == [0.5, 0.5]
    assert SessionConfig(aggregator="plain", aggregator_params={"scale": 2}).aggregator == "plain"
    with pytest.raises(ValueError, match="scale must be positive"):
        SessionConfig(aggregator="plain", aggregator_params={"scale": -1})
    info = {i.name: i for i in describe_aggregators()}["plain"]
    assert info.params is None and info.splittable
