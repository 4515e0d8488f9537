"""Regression check between two runs: matched cells, per-figure ratio and verdict, exit code 1 on regression."""

from __future__ import annotations

import math
from pathlib import Path

from harness.results import STATUSES
from harness.stats import cell_key, format_stat, group_cells, ok_records, spread_interval, summarise_figure

# (figure, higher is better, format, rule). Accuracy is compared as an absolute change in
# percentage points: a relative change of a fraction near 1 hides what users care about.
FIGURES = (
    ("test_accuracy", True, lambda v: f"{100 * v:.2f}%", "points"),
    ("train_samples_per_s", True, ",.0f", "relative"),
    ("eval_samples_per_s", True, ",.0f", "relative"),
    ("warmup_s", False, ".3g", "relative"),
    ("time_to_target_s", False, ".3g", "relative"),
    ("peak_rss_mb", False, ",.0f", "relative"),
)
STATUS_FAILURES = ("failed", "diverged")


def parse_threshold(text: str) -> float:
    """'5%' or '0.05' -> 0.05. A bare number above 1 is refused as ambiguous (5 -> 500%?)."""
    raw = str(text).strip()
    percent = raw.endswith("%")
    try:
        value = float(raw[:-1] if percent else raw)
    except ValueError:
        raise ValueError(f"threshold {text!r} is not a number; give a percentage like '5%' or a fraction "
                         "like '0.05'") from None
    if percent:
        value /= 100
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"threshold {text!r} must be positive, e.g. '5%' or '0.05'")
    if not percent and value >= 1:
        raise ValueError(f"threshold {text!r} is ambiguous: a fraction must be below 1; "
                         f"write '{raw}%' for {value:g} percent")
    return value


def _inside(value: float, interval) -> bool:
    lo, hi = interval
    return lo <= value <= hi


def judge(name: str, base: dict, new: dict, *, threshold: float, higher_better: bool, rule: str) -> tuple[str, bool]:
    """(verdict text, is regression) for one figure of one cell, from base and new summaries.

    A regression needs both: the change beyond the threshold, and each median outside
    the other run's spread (min-max below 5 repeats, IQR from 5). With one repeat on
    both sides there is no spread and the threshold alone decides; the verdict says so.
    """
    if not base["n"] and not new["n"]:
        return "n/a (no value in either run)", False
    if name == "time_to_target_s" and base["n"] and not new["n"]:
        return "REGRESSION (rule: target reached in base, never in new)", True
    if not base["n"]:
        return "new value (none in base)", False
    if not new["n"]:
        return "missing in new", False
    b, m = base["median"], new["median"]
    if rule == "points":
        change = 100 * (m - b)
        limit = 100 * threshold
        change_text = f"{change:+.2f} points vs {limit:g}-point threshold (rule: absolute change in points)"
    else:
        if b == 0:
            return "n/a (base is 0)", False
        change = (m - b) / abs(b)
        limit = threshold
        change_text = f"{100 * change:+.1f}% vs {100 * limit:g}% threshold (rule: relative change)"
    worse = change < 0 if higher_better else change > 0
    if abs(change) <= limit:
        return f"ok: within threshold ({change_text})", False
    in_base = _inside(m, spread_interval(base))
    in_new = _inside(b, spread_interval(new))
    no_spread = base["n"] == 1 and new["n"] == 1
    if in_base or in_new:
        where = " and ".join(w for w, hit in (("base", in_base), ("new", in_new)) if hit)
        return f"noise: beyond threshold but inside the {where} spread ({change_text} + spread rule)", False
    spread_note = "no spread with n=1, threshold alone" if no_spread else "outside both runs' spread"
    if worse:
        return f"REGRESSION ({change_text}; {spread_note})", True
    return f"improved ({change_text}; {spread_note})", False


def _fmt(summary: dict, fmt) -> str:
    return format_stat(summary, fmt) if summary["n"] else "\u2014"


def _ratio(base: dict, new: dict) -> str:
    if base["n"] and new["n"] and base["median"]:
        return f"{new['median'] / base['median']:.3f}"
    return "\u2014"


def _align_devices(base_cells: dict, new_cells: dict) -> dict:
    """Give cells whose records carry no device (skipped early) the device of the other run's same cell."""
    out = {}
    for key, rs in new_cells.items():
        task, backend, device = key
        if device == "?":
            others = [k for k in base_cells if k[:2] == (task, backend)]
            if len(others) == 1:
                key = others[0]
        out.setdefault(key, []).extend(rs)
    return out


def _status_text(records: list[dict]) -> str:
    statuses = sorted({r.get("status", "?") for r in records})
    error = next((r.get("error") for r in records if r.get("error")), None)
    return "/".join(statuses) + (f" ({error})" if error else "")


def _provenance(records: list[dict]) -> str:
    data = sorted({f"{'synthetic' if (r.get('data') or {}).get('synthetic') else 'real'} "
                   f"{(r.get('data') or {}).get('name')}" for r in records if r.get("data")})
    versions = sorted({f"{r.get('backend')} {(r.get('env') or {}).get('framework_version')}"
                       for r in records if (r.get("env") or {}).get("framework_version")})
    return f"data {', '.join(data) or '?'}; {', '.join(versions) or 'versions ?'}"


def _table(rows: list[list[str]]) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return ["  " + "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]


def compare_records(base: list[dict], new: list[dict], *, threshold: float = 0.05,
                    base_name: str = "base", new_name: str = "new") -> tuple[str, int]:
    """The comparison of two runs' records as text, and 1 if any regression was found else 0."""
    base_cells = group_cells(base)
    new_cells = _align_devices(base_cells, group_cells(new))
    lines = [f"tribench compare: base {base_name} vs new {new_name}",
             f"threshold {100 * threshold:g}% (relative; test accuracy: {100 * threshold:g} points absolute). "
             "A regression needs the change beyond the threshold AND each median outside the other run's "
             "spread (min-max below 5 repeats, IQR from 5; with n=1 on both sides the threshold alone decides).",
             ""]
    regressions = []
    only_base = sorted(set(base_cells) - set(new_cells))
    only_new = sorted(set(new_cells) - set(base_cells))
    # A record with no known status says nothing about its cell: never count it as a pass.
    for r in new:
        if r.get("status") not in STATUSES:
            label = f"{'/'.join(cell_key(r))} repeat {r.get('repeat')}"
            what = "no status" if r.get("status") is None else f"unknown status {r.get('status')!r}"
            lines += [f"REGRESSION (rule: every new record has a status): {label} has {what}", ""]
            regressions.append(f"{label}: {what}")
    for key in sorted(set(base_cells) & set(new_cells)):
        b_rs, n_rs = base_cells[key], new_cells[key]
        b_ok, n_ok = ok_records(b_rs), ok_records(n_rs)
        label = "/".join(key)
        lines.append(f"== {label} ==")
        lines.append(f"  base: {_provenance(b_rs)}, {len(b_ok)} ok of {len(b_rs)}")
        lines.append(f"  new:  {_provenance(n_rs)}, {len(n_ok)} ok of {len(n_rs)}")
        if not n_ok:
            status = _status_text(n_rs)
            if b_ok and any(r.get("status") != "skipped" for r in n_rs):
                lines.append(f"  REGRESSION (rule: cell ok in base, {status} in new)")
                regressions.append(f"{label}: status")
            else:
                lines.append(f"  no ok repeat in new: {status}; base: {_status_text(b_rs)}")
            lines.append("")
            continue
        if not b_ok:
            lines += [f"  no ok repeat in base ({_status_text(b_rs)}); nothing to compare against", ""]
            continue
        rows = [["figure", "base", "new", "ratio", "verdict"]]
        for name, higher, fmt, rule in FIGURES:
            bs, ns = summarise_figure(b_ok, name), summarise_figure(n_ok, name)
            if name == "time_to_target_s" and not bs["n"] and not ns["n"]:
                verdict, bad = "n/a (target never reached in either run)", False
            else:
                verdict, bad = judge(name, bs, ns, threshold=threshold, higher_better=higher, rule=rule)
            if bad:
                regressions.append(f"{label}: {name}")
            direction = "higher" if higher else "lower"
            rows.append([f"{name} ({direction} better)", _fmt(bs, fmt), _fmt(ns, fmt), _ratio(bs, ns), verdict])
        lines += [*_table(rows), ""]
    for title, keys, cells in (("REGRESSION: cells in base missing from new (rule: every base cell is in new)",
                                only_base, base_cells),
                               ("Cells only in new (not in base)", only_new, new_cells)):
        if keys:
            lines.append(f"{title}:")
            lines += [f"  {'/'.join(k)}: {_status_text(cells[k])}" for k in keys]
            lines.append("")
    regressions += [f"{'/'.join(k)}: missing from new" for k in only_base]
    if regressions:
        lines.append(f"RESULT: {len(regressions)} regression(s): {'; '.join(regressions)}")
    else:
        lines.append("RESULT: no regression")
    return "\n".join(lines) + "\n", 1 if regressions else 0


def compare_runs(base_dir, new_dir, *, threshold: float = 0.05) -> tuple[str, int]:
    """Compare the records.jsonl of two run folders; (text to print, exit code 1 on regression else 0).

    Raises FileNotFoundError for a folder without records.jsonl and EmptyRun for one with no record.
    """
    from harness.results import RECORDS_FILE, read_records

    if isinstance(threshold, str):
        threshold = parse_threshold(threshold)
    base_dir, new_dir = Path(base_dir), Path(new_dir)
    runs = []
    for d in (base_dir, new_dir):
        path = d if d.is_file() else d / RECORDS_FILE
        if not path.exists():
            raise FileNotFoundError(f"no records at {path}: is {d} a tribench run folder?")
        records = read_records(d)
        if not records:  # an empty run is no evidence of "no regression"
            raise EmptyRun(f"{path} holds no records: nothing to compare (did that run write anything?)")
        runs.append(records)
    return compare_records(*runs, threshold=threshold, base_name=str(base_dir), new_name=str(new_dir))


class EmptyRun(ValueError):
    """A run folder whose records.jsonl holds no record."""
