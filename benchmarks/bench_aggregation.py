"""Combiner fold throughput: WeightedSum.fold vs numpy's in-place ``a += w * b``.

Both fold the same 1M-parameter updates into a float64 accumulator. The baseline is the
one-liner a combiner would write without edgefl (``a += w * b``, float64 ``a``, float32 ``b``);
WeightedSum.fold does the same sum but multiplies in float64 and blockwise, so it never
allocates a model-sized temporary. Figures are GB/s of update bytes folded (median of several
repetitions). Target: fold float32 >= 0.70 x the baseline.
"""

from __future__ import annotations

import time

import numpy as np
from _common import emit, log, median, setup_logging

from edgefl.aggregation import WeightedSum, spec_of

N_PARAMS = 1_000_000
FOLDS = 40  # updates folded per repetition
REPS = 9
TARGET = 0.70


def _updates(dtype: str, k: int = 4) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(1)
    return [{"w": rng.standard_normal(N_PARAMS).astype(dtype)} for _ in range(k)]


def _gbps(nbytes: int, seconds: float) -> float:
    return nbytes / seconds / 1e9


def bench_fold(updates: list[dict[str, np.ndarray]]) -> list[float]:
    acc = WeightedSum(spec_of(updates[0]))
    nbytes = updates[0]["w"].nbytes * FOLDS
    acc.fold(updates[0], 1.0)  # warm up (page in the accumulator)
    out = []
    for _ in range(REPS):
        t0 = time.perf_counter()
        for i in range(FOLDS):
            acc.fold(updates[i % len(updates)], 3.0 + i)
        out.append(_gbps(nbytes, time.perf_counter() - t0))
    return out


def bench_numpy(updates: list[dict[str, np.ndarray]]) -> list[float]:
    a = np.zeros(N_PARAMS, dtype=np.float64)
    bs = [u["w"] for u in updates]
    nbytes = bs[0].nbytes * FOLDS
    a += 1.0 * bs[0]
    out = []
    for _ in range(REPS):
        t0 = time.perf_counter()
        for i in range(FOLDS):
            w = 3.0 + i
            a += w * bs[i % len(bs)]
        out.append(_gbps(nbytes, time.perf_counter() - t0))
    return out


def main() -> None:
    setup_logging()
    f32, f64 = _updates("float32"), _updates("float64")
    # Interleave the measurements so that drifts in machine load hit both sides alike.
    fold32: list[float] = []
    np32: list[float] = []
    fold64: list[float] = []
    np64: list[float] = []
    for rnd in range(3):
        fold32 += bench_fold(f32)
        np32 += bench_numpy(f32)
        fold64 += bench_fold(f64)
        np64 += bench_numpy(f64)
        log(
            f"pass {rnd + 1}/3: fold f32 {median(fold32):.2f} GB/s, numpy f32 {median(np32):.2f}"
            f" GB/s, fold f64 {median(fold64):.2f} GB/s, numpy f64 {median(np64):.2f} GB/s"
        )
    ratio = median(fold32) / median(np32)
    emit(
        {
            "benchmark": "aggregation",
            "params": N_PARAMS,
            "update_bytes_f32": N_PARAMS * 4,
            "folds_per_rep": FOLDS,
            "reps": len(fold32),
            "fold_f32_gbps": round(median(fold32), 3),
            "baseline_numpy_f32_gbps": round(median(np32), 3),
            "ratio": round(ratio, 3),
            "fold_f64_gbps": round(median(fold64), 3),
            "baseline_numpy_f64_gbps": round(median(np64), 3),
            "ratio_f64": round(median(fold64) / median(np64), 3),
            "target": f"fold_f32 / numpy_f32 >= {TARGET}",
            "target_met": ratio >= TARGET,
        }
    )


if __name__ == "__main__":
    main()
