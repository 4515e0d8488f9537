"""The figures registry: each figure's name, label, unit, format, direction and where it is shown, in one table."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

Format = str | Callable[[float], str]


def percent(value: float) -> str:
    return f"{100 * value:.2f}%"


@dataclass(frozen=True)
class Figure:
    """One figure of a record (found in its metrics or memory section) and how every reader treats it.

    `compare`: None (compare skips it), "relative" or "points" (an absolute change in percentage
    points, for fractions near 1 where a relative change hides what users care about).
    `report`: "core" (a column every task shows), "extra" (shown where some record has it) or None.
    `series`: the record key of its per-epoch list, exported as a curve under `name`.
    `loss_only`: shown and compared only for tasks judged by held-out loss.
    `history`: its label in the history tables, None where history does not follow it.
    """

    name: str
    label: str
    fmt: Format = ".4g"
    unit: str = ""
    higher_is_better: bool | None = None
    compare: str | None = None
    exported: bool = False
    series: str | None = None
    report: str | None = None
    terminal: bool = False
    loss_only: bool = False
    history: str | None = None


TEST_ACCURACY = Figure("test_accuracy", "test accuracy", percent, "fraction", True, "points", exported=True,
                       series="epoch_test_accuracy", report="core", terminal=True, history="test accuracy")
TEST_LOSS = Figure("test_loss", "held-out loss (lower is better)", ".4f", "nats", False, "relative", exported=True,
                   series="epoch_test_loss", report="extra", terminal=True, loss_only=True,
                   history="test loss (lower is better)")
TIME_TO_TARGET = Figure("time_to_target_s", "time to target (s)", ".3g", "s", False, "relative", exported=True,
                        report="core", terminal=True, history="time to target (s)")
TRAIN_RATE = Figure("train_samples_per_s", "train samples/s", ",.0f", "samples/s", True, "relative", exported=True,
                    report="core", terminal=True, history="train samples/s")
EVAL_RATE = Figure("eval_samples_per_s", "eval samples/s", ",.0f", "samples/s", True, "relative", exported=True,
                   report="core", terminal=True)
WARMUP = Figure("warmup_s", "warm-up (s)", ".3g", "s", False, "relative", exported=True, report="core",
                terminal=True)
PEAK_RSS = Figure("peak_rss_mb", "peak host RSS (MiB)", ",.0f", "MiB", False, "relative", exported=True,
                  report="core", terminal=True, history="peak host RSS (MiB)")
RSS_AFTER_IMPORT = Figure("rss_after_import_mb", "host RSS after import (MiB)", ",.0f", "MiB", False, exported=True)
DEVICE_PEAK = Figure("device_peak_mb", "device peak (MiB)", ",.0f", "MiB", False, exported=True, report="core",
                     terminal=True)
# The finetune task's two stages: full training of the scratch control against the frozen backbone.
FROZEN_RATE = Figure("frozen_" + TRAIN_RATE.name, "frozen train samples/s", ",.0f", "samples/s", True,
                     report="extra")
FULL_RATE = Figure("full_" + TRAIN_RATE.name, "full train samples/s", ",.0f", "samples/s", True, report="extra")

# Registry order is the terminal's column order; the report's core and extra columns keep it too.
FIGURES: tuple[Figure, ...] = (
    TEST_ACCURACY,
    TEST_LOSS,
    Figure("bits_per_byte", "bits/byte (lower is better)", ".3f", "bits", False, report="extra", terminal=True),
    TIME_TO_TARGET,
    TRAIN_RATE,
    Figure("train_tokens_per_s", "train tokens/s", ",.0f", "tokens/s", True, report="extra", terminal=True),
    EVAL_RATE,
    Figure("eval_tokens_per_s", "eval tokens/s", ",.0f", "tokens/s", True, report="extra", terminal=True),
    # A staged language model's control: same budget, fresh weights.
    Figure("scratch_loss", "scratch loss", ".4f", "nats", False, report="extra", terminal=True),
    WARMUP,
    PEAK_RSS,
    DEVICE_PEAK,
    Figure("finetuned_accuracy", "finetuned accuracy", percent, "fraction", True, exported=True, report="extra"),
    Figure("scratch_accuracy", "scratch accuracy", percent, "fraction", True, exported=True, report="extra"),
    FROZEN_RATE,
    FULL_RATE,
    Figure("initial_test_loss", "initial test loss", ".4f", "nats", False, exported=True),
    Figure("initial_test_accuracy", "initial test accuracy", percent, "fraction", True, exported=True),
    Figure("wall_s", "wall time (s)", ".3g", "s", False, exported=True),
    Figure("roofline_fraction", "roofline", lambda v: f"{100 * v:.1f}%", "fraction", True, exported=True),
    RSS_AFTER_IMPORT,
    # The trained model served (harness/inference.py): batch-1 latency percentiles, throughput at the
    # eval batch size, the host-to-device copy of a batch apart, host memory while serving.
    Figure("infer_latency_ms_p50", "latency p50 b1 (ms)", ".3g", "ms", False, "relative", exported=True,
           report="core", terminal=True, history="inference latency p50, batch 1 (ms)"),
    Figure("infer_latency_ms_p90", "latency p90 b1 (ms)", ".3g", "ms", False, exported=True, report="extra"),
    Figure("infer_latency_ms_p99", "latency p99 b1 (ms)", ".3g", "ms", False, "relative", exported=True,
           report="core"),
    Figure("infer_samples_per_s", "infer samples/s", ",.0f", "samples/s", True, "relative", exported=True,
           report="core", terminal=True, history="inference samples/s"),
    Figure("infer_h2d_ms", "host-to-device copy (ms)", ".3g", "ms", False, exported=True, report="extra"),
    Figure("infer_peak_rss_mb", "serving peak host RSS (MiB)", ",.0f", "MiB", False, exported=True,
           report="extra"),
    # Greedy generation of a language model with a KV cache (harness/generation.py).
    Figure("generate_tokens_per_s_b1", "generate tokens/s b1", ",.0f", "tokens/s", True, "relative", exported=True,
           report="extra", terminal=True),
    Figure("generate_tokens_per_s_b32", "generate tokens/s b32", ",.0f", "tokens/s", True, "relative",
           exported=True, report="extra"),
    Figure("time_to_first_token_ms", "time to first token (ms)", ".3g", "ms", False, "relative", exported=True,
           report="extra"),
    # Per-epoch curves with no final figure of their own.
    Figure("train_loss", "train loss", ".4f", "nats", False, series="epoch_train_loss"),
    Figure("epoch_s", "epoch time (s)", ".3g", "s", False, series="epoch_s"),
    Figure("train_time_s", "cumulative train time (s)", ".3g", "s", False, series="epoch_train_time_s"),
)
BY_NAME = {f.name: f for f in FIGURES}


def report_columns(kind: str) -> tuple[Figure, ...]:
    """The report's "core" or "extra" columns, in registry order."""
    return tuple(f for f in FIGURES if f.report == kind)


def compared(*, by_loss: bool) -> tuple[Figure, ...]:
    """The figures compare judges for a cell; `by_loss` adds those of tasks judged by held-out loss."""
    return tuple(f for f in FIGURES if f.compare and (by_loss or not f.loss_only))


def followed(*, by_loss: bool) -> tuple[Figure, ...]:
    """The figures history follows across commits."""
    return tuple(f for f in FIGURES if f.history and (by_loss or not f.loss_only))


def exported_scalars() -> tuple[str, ...]:
    """Names of the final figures the tracker exports write, one value each."""
    return tuple(f.name for f in FIGURES if f.exported)


def epoch_series() -> dict[str, str]:
    """Per-epoch series the tracker exports write: record key -> exported name."""
    return {f.series: f.name for f in FIGURES if f.series}


def terminal_headers() -> tuple[str, ...]:
    return tuple(f.label for f in FIGURES if f.terminal)


def objective(*, by_loss: bool) -> Figure:
    """The figure a task is judged by: held-out loss (lower is better) or test accuracy."""
    return TEST_LOSS if by_loss else TEST_ACCURACY
