"""Inference figures of a trained model: batch-1 latency percentiles, throughput, host-to-device copies apart."""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from backends.base import Backend, InferencePath
from harness.measure import RssSampler

# The budget: timed calls may take this fraction of the cell's training time (warm-up, epochs and
# evaluations), split evenly between the latency and the throughput calls. The call counts below
# bound it; the record states the budget, the counts chosen and the time actually spent.
BUDGET_FRACTION = 0.10
MAX_LATENCY_CALLS, MAX_THROUGHPUT_CALLS = 2000, 100


@dataclass(frozen=True)
class Minimums:
    """The fewest timed calls, whatever the budget says."""

    latency: int  # batch-1 calls: percentiles up to p99 need a few hundred
    throughput: int  # whole-batch calls


FULL = Minimums(latency=200, throughput=3)
# --quick checks that serving runs and gives its figures, from fewer calls (its p99 is nearly the maximum).
QUICK = Minimums(latency=50, throughput=1)
WARMUP_CALLS = 2  # after the first call of each shape, which traces or compiles


def _timed(fn, *args) -> tuple[object, float]:
    t0 = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - t0


def _calls(budget_s: float, per_call_s: float, *, low: int, high: int) -> int:
    """How many timed calls fit the budget at the warm-up's pace, within [low, high]."""
    fit = int(budget_s / per_call_s) if per_call_s > 0 else high
    return max(low, min(high, fit))


def _until(call, count: int, low: int, budget_s: float, clock=time.perf_counter) -> list:
    """`count` calls' results, fewer (never below `low`) once `budget_s` is spent: calls slowed by load
    after the warm-up's pace was taken must not stretch the measurement past its budget."""
    deadline, out = clock() + budget_s, []
    for _ in range(count):
        out.append(call())
        if len(out) >= low and clock() > deadline:
            break
    return out


def _warm(run, x) -> tuple[float, float]:
    """(first call s, median s of the warm-up calls after it): the first traces or compiles."""
    _, first = _timed(run, x)
    pace = float(np.median([_timed(run, x)[1] for _ in range(WARMUP_CALLS)]))
    return first, pace


def measure_inference(backend: Backend, model, x: np.ndarray, *, batch_size: int, train_s: float,
                      minimums: Minimums = FULL) -> dict:
    """Serve `model` through backend.inference and time it on held-out samples `x` (see time_path)."""
    return time_path(backend.inference(model), x, batch_size=batch_size, train_s=train_s, minimums=minimums)


def time_path(path: InferencePath, x: np.ndarray, *, batch_size: int, train_s: float,
              minimums: Minimums = FULL) -> dict:
    """Time an inference path on device-resident inputs from `x`, within the call budget.

    Every call returns only once its logits are ready on the device (the path synchronises),
    so each latency is one whole request. The host-to-device copy of a request is timed apart.
    """
    batch_size = min(int(batch_size), len(x))
    budget_s = BUDGET_FRACTION * train_s
    started = time.perf_counter()
    with RssSampler() as rss:
        one, h2d_one = _timed(path.put, x[:1])
        batch, h2d_batch = _timed(path.put, x[:batch_size])
        first_one, pace_one = _warm(path.run, one)
        first_batch, pace_batch = _warm(path.run, batch)
        warmup_s = time.perf_counter() - started
        n_one = _calls(budget_s / 2, pace_one, low=minimums.latency, high=MAX_LATENCY_CALLS)
        latencies = np.array(_until(lambda: _timed(path.run, one)[1], n_one, minimums.latency, budget_s / 2))
        n_one = len(latencies)
        n_batch = _calls(budget_s / 2, pace_batch, low=minimums.throughput, high=MAX_THROUGHPUT_CALLS)
        t0 = time.perf_counter()
        n_batch = len(_until(lambda: path.run(batch), n_batch, minimums.throughput, budget_s / 2))
        batch_s = time.perf_counter() - t0
    p50, p90, p99 = np.percentile(latencies * 1e3, [50, 90, 99])
    return {
        "infer_path": path.name,
        "infer_latency_ms_p50": float(p50), "infer_latency_ms_p90": float(p90), "infer_latency_ms_p99": float(p99),
        "infer_latency_calls": n_one,
        "infer_samples_per_s": n_batch * batch_size / batch_s if batch_s > 0 else None,
        "infer_batch_size": batch_size, "infer_throughput_calls": n_batch,
        "infer_h2d_ms_b1": 1e3 * h2d_one, "infer_h2d_ms": 1e3 * h2d_batch,
        "infer_first_call_ms_b1": 1e3 * first_one, "infer_first_call_ms": 1e3 * first_batch,
        "infer_warmup_s": warmup_s,
        "infer_peak_rss_mb": rss.peak_mb,
        "infer_budget_s": budget_s,
    }
