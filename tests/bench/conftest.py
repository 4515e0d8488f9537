"""Benchmark suite plumbing: keeps frameworks grouped and prints the yardstick table."""

from __future__ import annotations

import os
import platform
import time
from pathlib import Path

import pytest

from harness.load import loadavg

BENCH_DIR = Path(__file__).resolve().parent
SUMMARY_ENV = "TRIBENCH_BENCH_SUMMARY"  # a path: the yardstick table is also written there as markdown
ROWS = pytest.StashKey[list]()
INFER_ROWS = pytest.StashKey[list]()
STARTED = pytest.StashKey[dict]()
FRAMEWORK_ORDER = ("torch", "tensorflow", "jax")
ROOFLINE_TARGET = 0.6  # the fastest backend on the MLP, compiled mode


def _in_bench(item: pytest.Item) -> bool:
    return BENCH_DIR in Path(str(item.path)).resolve().parents


def pytest_configure(config: pytest.Config) -> None:
    config.stash[ROWS] = []
    config.stash[INFER_ROWS] = []
    config.stash[STARTED] = {"time": time.time(), "loadavg": loadavg()}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    bench = [item for item in items if _in_bench(item)]
    if not bench:
        return

    # One framework at a time (all of torch, then TensorFlow, then JAX): a framework's
    # models, thread pools and compiled code are built once and used by all its tests, and
    # its idle pools are not left competing with the next framework's timings.
    def key(item):
        params = getattr(getattr(item, "callspec", None), "params", {})
        backend = params.get("backend")
        rank = FRAMEWORK_ORDER.index(backend) if backend in FRAMEWORK_ORDER else len(FRAMEWORK_ORDER)
        return rank, params.get("task", ""), params.get("mode", "")

    positions = {id(item): i for i, item in enumerate(items)}
    bench.sort(key=lambda item: (key(item), positions[id(item)]))
    first = min(positions[id(item)] for item in bench)
    others = [item for item in items if not _in_bench(item)]
    items[:] = others[:first] + bench + others[first:]


@pytest.fixture(scope="session")
def yardstick_rows(request) -> list:
    """Where the yardstick comparisons put their rows for the end-of-session table."""
    return request.config.stash[ROWS]


@pytest.fixture(scope="session")
def inference_rows(request) -> list:
    """Where the inference comparisons put their rows for the end-of-session table."""
    return request.config.stash[INFER_ROWS]


def inference_lines(rows: list[dict]) -> list[str]:
    """The serving table: batch-1 latency and eval-batch throughput, harness beside the framework's own predict."""
    if not rows:
        return []
    lines = ["| backend | task | harness path (mode) | b1 latency ms harness [min-max] | yardstick "
             "| ratio | samples/s harness (batch) [min-max] | yardstick | ratio |", "|" + "---|" * 9]
    for r in rows:
        lat, rate = r["latency_ms"], r["samples_per_s"]
        lines.append(f"| {r['backend']} | {r['task']} | {r['path']} ({r['ran_in']}) "
                     f"| {lat['harness']['median']:.3f} [{lat['harness']['min']:.3f}-{lat['harness']['max']:.3f}] "
                     f"| {lat['yardstick']['median']:.3f} | {r['latency_ratio']:.2f}x "
                     f"| {rate['harness']['median']:,.0f} ({r['batch']}) [{rate['harness']['min']:,.0f}-"
                     f"{rate['harness']['max']:,.0f}] | {rate['yardstick']['median']:,.0f} | {r['rate_ratio']:.2f}x |")
    return lines + ["", f"Median of {rows[0]['repeats']} interleaved rounds (yardstick, then harness); latency ratio = "
                        "yardstick / harness, throughput ratio = harness / yardstick (>= 1.0: the harness is as fast)."]


def _rate(row: dict, side: str) -> str:
    return f"{row[side]['median']:,.0f} [{row[side]['min']:,.0f}-{row[side]['max']:,.0f}]"


def _tokens(row: dict, side: str) -> str:
    per = row["tokens_per_sample"]
    return f"{row[side]['median'] * per:,.0f} [{row[side]['min'] * per:,.0f}-{row[side]['max'] * per:,.0f}]"


def token_lines(rows: list[dict]) -> list[str]:
    """The language-model rows in tokens/s (samples are windows of `tokens_per_sample` tokens)."""
    if not rows:
        return []
    lines = ["| backend | task | steps timed / epoch | mode | harness tokens/s [min-max] "
                 "| yardstick tokens/s [min-max] | ratio [pairs min-max] | target | met? |", "|" + "---|" * 9]
    for r in rows:
        mode = r["mode"] if r.get("ran_in", r["mode"]) == r["mode"] else f"{r['mode']}: {r['ran_in']}"
        bs = r["samples_timed"] // r["steps_timed"]
        lines.append(f"| {r['backend']} | {r['task']} | {r['steps_timed']} / {r['samples_per_epoch'] // bs} | {mode} "
                     f"| {_tokens(r, 'harness')} | {_tokens(r, 'yardstick')} "
                     f"| {r['ratio']:.2f}x [{r['pair_ratio_min']:.2f}-{r['pair_ratio_max']:.2f}] "
                     f"| {r['target']:.2f}x | {'yes' if r['met'] else 'NO'} |")
    return lines


def summary_lines(rows: list[dict], *, started: dict) -> list[str]:
    """The yardstick table as markdown lines (printed and, with $TRIBENCH_BENCH_SUMMARY, written)."""
    head = ("| backend | task | samples timed / dataset | mode | harness samples/s [min-max] "
            "| yardstick samples/s [min-max] | ratio [pairs min-max] | target | met? | roofline |")
    images = [r for r in rows if not r.get("tokens_per_sample")]
    lines = [head, "|" + "---|" * 10] if images else []
    for r in images:
        roof = f"{r['roofline_fraction']:.3f}" if r.get("roofline_fraction") is not None else "-"
        mode = r["mode"] if r.get("ran_in", r["mode"]) == r["mode"] else f"{r['mode']}: {r['ran_in']}"
        size = f"{r.get('samples_timed', r['samples_per_epoch']):,} / {r['samples_per_epoch']:,}"
        lines.append(f"| {r['backend']} | {r['task']} | {size} | {mode} | {_rate(r, 'harness')} "
                     f"| {_rate(r, 'yardstick')} "
                     f"| {r['ratio']:.2f}x [{r['pair_ratio_min']:.2f}-{r['pair_ratio_max']:.2f}] "
                     f"| {r['target']:.2f}x | {'yes' if r['met'] else 'NO'} | {roof} |")
    tokens = token_lines([r for r in rows if r.get("tokens_per_sample")])
    lines += ([""] if lines and tokens else []) + tokens
    mlp = [r for r in rows if r.get("roofline_fraction") is not None and r["mode"] == "compiled"]
    if mlp:
        best = max(mlp, key=lambda r: r["harness"]["median"])
        met = best["roofline_fraction"] >= ROOFLINE_TARGET
        lines += ["", f"Fastest on {best['task']} (compiled): {best['backend']} at {best['roofline_fraction']:.3f} "
                      f"of the roofline ({best['flops_per_sample']:,} FLOP/sample, peak "
                      f"{best['peak_gflops']:.1f} GFLOP/s); target {ROOFLINE_TARGET}: {'met' if met else 'NOT met'}."]
    repeats = rows[0]["repeats"] if rows else 0
    lines += ["", f"Median of {repeats} interleaved repeats (yardstick epoch, then harness epoch) per row; "
                  "ratio = harness median / yardstick median. Reported, not asserted.",
              f"Device: {', '.join(sorted({r['device'] for r in rows}))}; fp32.",
              f"Host: {platform.node()}, {os.cpu_count()} CPUs; load average at start {started['loadavg']}, "
              f"at end {loadavg()}; {time.time() - started['time']:.0f} s session."]
    return lines


def pytest_terminal_summary(terminalreporter, exitstatus, config: pytest.Config) -> None:
    rows = config.stash.get(ROWS, [])
    serving = inference_lines(config.stash.get(INFER_ROWS, []))
    if not rows and not serving:
        return
    lines = summary_lines(rows, started=config.stash[STARTED]) if rows else []
    lines += ([""] if lines and serving else []) + serving
    terminalreporter.section("tribench: harness vs framework yardsticks")
    for line in lines:
        terminalreporter.write_line(line)
    target = os.environ.get(SUMMARY_ENV)
    if target:
        path = Path(target)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("\n".join(lines) + "\n")
        terminalreporter.write_line(f"(written to {path})")

