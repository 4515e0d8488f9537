"""Median and spread over repeats, the one-repeat rule, and the record grouping they run over."""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Iterable

# From this many repeats on the spread shown is the interquartile range; below it the
# full min-max range, since quartiles of two to four numbers mean little.
IQR_FROM = 5
DASH = "\u2013"  # en dash, for ranges


def _clean(values: Iterable) -> list[float]:
    out = []
    for v in values:
        if v is None or isinstance(v, bool):
            continue
        try:
            f = float(v)
        except (TypeError, ValueError):
            continue
        if math.isfinite(f):
            out.append(f)
    return out


def summarise(values: Iterable) -> dict:
    """n, median, min, max, q1, q3 of the finite numbers in `values` (None is ignored).

    With no numbers every statistic is None and n is 0.
    """
    xs = sorted(_clean(values))
    n = len(xs)
    if n == 0:
        return {"n": 0, "median": None, "min": None, "max": None, "q1": None, "q3": None}
    if n == 1:
        q1 = q3 = xs[0]
    else:
        # "inclusive" keeps the quartiles inside [min, max], as a spread should be.
        q1, _, q3 = statistics.quantiles(xs, n=4, method="inclusive")
    return {"n": n, "median": statistics.median(xs), "min": xs[0], "max": xs[-1], "q1": q1, "q3": q3}


def spread_interval(summary: dict) -> tuple[float, float] | None:
    """The interval a table shows as the spread: min-max below IQR_FROM repeats, else q1-q3."""
    if not summary or not summary.get("n"):
        return None
    if summary["n"] >= IQR_FROM:
        return summary["q1"], summary["q3"]
    return summary["min"], summary["max"]


def spread_kind(n: int) -> str:
    if n <= 1:
        return "none (n=1)"
    return "IQR" if n >= IQR_FROM else "min-max"


def _formatter(fmt: str | Callable[[float], str]) -> Callable[[float], str]:
    if callable(fmt):
        return fmt
    return lambda v: format(v, fmt)


def format_stat(summary: dict, fmt: str | Callable[[float], str] = ".3g") -> str:
    """One table cell: `v (n=1)`, `median [min-max]` for 2-4 repeats, `median (IQR q1-q3)` from 5.

    `fmt` is a format spec ("`,.0f`") or a function of one number. One run is never
    dressed up as a distribution, so n=1 shows no spread.
    """
    n = summary.get("n", 0) if summary else 0
    if not n:
        return "\u2014"  # em dash: no value
    f = _formatter(fmt)
    med = f(summary["median"])
    if n == 1:
        return f"{med} (n=1)"
    if n >= IQR_FROM:
        return f"{med} (IQR {f(summary['q1'])}{DASH}{f(summary['q3'])})"
    return f"{med} [{f(summary['min'])}{DASH}{f(summary['max'])}]"


# -- records: cells and their values -------------------------------------------------------

def record_device(record: dict) -> str:
    return str((record.get("env") or {}).get("device") or "?")


def cell_key(record: dict) -> tuple[str, str, str]:
    """(task, backend, device): what a row of a table and a match in a comparison stand for."""
    return str(record.get("task")), str(record.get("backend")), record_device(record)


def group_cells(records: Iterable[dict]) -> dict[tuple[str, str, str], list[dict]]:
    """Records grouped by cell, cells and repeats in a stable order."""
    cells: dict[tuple[str, str, str], list[dict]] = {}
    for r in records:
        cells.setdefault(cell_key(r), []).append(r)
    for rs in cells.values():
        rs.sort(key=lambda r: (r.get("repeat") is None, r.get("repeat") or 0))
    return dict(sorted(cells.items()))


def figure(record: dict, name: str):
    """A named figure of a record, from metrics or memory (None when absent)."""
    for section in ("metrics", "memory"):
        value = (record.get(section) or {}).get(name)
        if value is not None:
            return value
    return None


def ok_records(records: Iterable[dict]) -> list[dict]:
    return [r for r in records if r.get("status") == "ok"]


def summarise_figure(records: Iterable[dict], name: str) -> dict:
    """Summary of one figure over the ok repeats of a cell."""
    return summarise(figure(r, name) for r in ok_records(records))


def judged_by_loss(records: Iterable[dict]) -> bool:
    """Whether these records' task is judged by held-out loss (lower is better): the objective each record carries."""
    return any(r.get("objective") == "loss" for r in records)


def target_loss(records: Iterable[dict]) -> float | None:
    """The held-out-loss target of a loss-judged task's records (the spec's, else the metrics' copy)."""
    for r in ok_records(records):
        value = (r.get("spec") or {}).get("target_loss")
        value = value if value is not None else figure(r, "target_loss")
        if value is not None:
            return float(value)
    return None


def beyond_spread(best: dict, other: dict, *, higher_is_better: bool) -> bool | None:
    """Whether `best` leads `other` by more than their spreads (the intervals a table shows do not overlap).

    None when either has a single repeat: one run has no spread, so noise cannot be told from a gap.
    """
    if best.get("n", 0) < 2 or other.get("n", 0) < 2:
        return None
    (b_lo, b_hi), (o_lo, o_hi) = spread_interval(best), spread_interval(other)
    return b_lo > o_hi if higher_is_better else b_hi < o_lo


def data_label(data: dict | None, *, sizes: bool = True, source: bool = False) -> str | None:
    """How every reader names a record's data: "real fashion-mnist 12000/2000", "SYNTHETIC cifar10 ...".

    `source` adds where it was read from, with the sizes spelled out; None where no data was loaded.
    """
    if not data:
        return None
    label = f"{'SYNTHETIC' if data.get('synthetic') else 'real'} {data.get('name', '?')}"
    subset = f", subset {data['subset']}" if data.get("subset") else ""
    if source:
        return f"{label} from {data.get('source')} ({data.get('n_train')} train / {data.get('n_test')} test{subset})"
    return f"{label} {data.get('n_train', '?')}/{data.get('n_test', '?')}{subset}" if sizes else label


def stage_data(record: dict, stage: str, *, mark_synthetic: bool = True) -> str:
    """The data a stage of `record` trained and was judged on, named as a reader knows it.

    A stage with its own corpus names it (SYNTHETIC where generated in its place); a stage
    training a subset of classes names them; any other stage the run's dataset.
    """
    spec = record.get("spec") or {}
    data = record.get("data") or {}
    entry = next((s for s in spec.get("stages") or [] if s.get("name") == stage), {})
    loaded = (data.get("stages") or {}).get(stage) or data
    synthetic = " [SYNTHETIC stand-in]" if mark_synthetic and loaded.get("synthetic") else ""
    if entry.get("data"):
        return f"{entry['data']}{synthetic}"
    name = str(data.get("name", "?"))
    classes = [int(c) for c in entry.get("classes") or []]
    if classes:
        run = classes == list(range(classes[0], classes[0] + len(classes))) and len(classes) > 2
        return f"classes {f'{classes[0]}{DASH}{classes[-1]}' if run else ', '.join(map(str, classes))} of {name}"
    return name


def primary_stage(record: dict) -> str | None:
    """The stage whose figures head a staged task's record; None for a task of one stage."""
    spec = record.get("spec") or {}
    if len(spec.get("stages") or []) < 2:
        return None
    return spec.get("primary_stage") or None
