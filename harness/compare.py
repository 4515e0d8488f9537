"""Regression check between two comparable runs: matched cells, per-figure verdicts, exit 1 or 3 (incomplete)."""

from __future__ import annotations

import json
import math
from pathlib import Path

from harness.comparable import chosen_programs, differences, execution
from harness.figures import TIME_TO_TARGET, compared
from harness.results import STATUSES
from harness.stats import (
    cell_key,
    format_stat,
    group_cells,
    judged_by_loss,
    ok_records,
    spread_interval,
    summarise_figure,
)

# (figure, higher is better, format, rule) from the figures registry; cells of a task judged by
# held-out loss (language models) also compare the loss (_cell_figures).
FIGURES = tuple((f.name, f.higher_is_better, f.fmt, f.compare) for f in compared(by_loss=False))
STATUS_FAILURES = ("failed", "diverged")
# Exit codes: a regression; else a cell new did not measure (skipped, missing or failed repeats).
EXIT_REGRESSION, EXIT_INCOMPLETE = 1, 3
INCOMPLETE_RULE = "rule: every cell and repeat of base measured ok in new"
FORMATS = ("text", "markdown", "json")
DEFAULT = "*"  # the thresholds key for every figure not named


class Incomparable(ValueError):
    """Runs that differ in what they measured; `lines` names each difference."""

    def __init__(self, lines: list[str]):
        super().__init__(f"the runs are not comparable ({len(lines)} difference(s)); --force compares anyway")
        self.lines = lines


def parse_threshold(text: str, *, points_ok: bool = True) -> float:
    """'5%' or '0.05' -> 0.05; '0.5pt' -> 0.005 (percentage points, accuracy only). A bare number above 1
    is refused as ambiguous (5 -> 500%?)."""
    raw = str(text).strip()
    if raw.endswith("pt"):
        if not points_ok:
            raise ValueError(f"threshold {text!r}: points ('pt') are for test_accuracy; use a percentage")
        try:
            value = float(raw[:-2]) / 100
        except ValueError:
            raise ValueError(f"threshold {text!r} is not a number of points like '0.5pt'") from None
        if not math.isfinite(value) or not 0 < value < 1:
            raise ValueError(f"threshold {text!r} must be between 0 and 100 points")
        return value
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


def parse_thresholds(text: str) -> dict[str, float]:
    """'5%' (every figure) or 'eval_samples_per_s=5%,test_accuracy=0.5pt' (each named figure; the others 5%)."""
    names = {f.name: f.compare for f in compared(by_loss=True)}
    out = {DEFAULT: 0.05}
    for item in (i.strip() for i in str(text).split(",")):
        name, sep, value = item.rpartition("=")
        name = name.strip() if sep else DEFAULT
        if name != DEFAULT and name not in names:
            raise ValueError(f"threshold for unknown figure {name!r}; valid: {', '.join(names)}")
        out[name] = parse_threshold(value, points_ok=name == DEFAULT or names.get(name) == "points")
    return out


def _limit(thresholds: dict[str, float], name: str) -> float:
    return thresholds.get(name, thresholds[DEFAULT])


def _cell_figures(records: list[dict]) -> tuple:
    """The figures compared for one cell: the loss-judged ones add the held-out loss after accuracy."""
    return tuple((f.name, f.higher_is_better, f.fmt, f.compare) for f in compared(by_loss=judged_by_loss(records)))


def _threshold_text(thresholds: dict[str, float], figures: tuple = FIGURES) -> str:
    parts = []
    for name, _, _, rule in figures:
        value = _limit(thresholds, name)
        parts.append(f"{name} {100 * value:g} points" if rule == "points" else f"{name} {100 * value:g}%")
    return "thresholds: " + ", ".join(parts)


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
    if name == TIME_TO_TARGET.name and base["n"] and not new["n"]:
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


def _repeat_gaps(base: list[dict], new: list[dict]) -> list[tuple[str, bool]]:
    """(note, is a regression) for each repeat of a cell that new did not measure as base did.

    A repeat failed or diverged in new that base did not is a regression; one missing
    from new, skipped in new, or failed in both is incomplete: the cell was not measured.
    """
    base_by = {r.get("repeat"): r.get("status") for r in base}
    new_by = {r.get("repeat"): r.get("status") for r in new}
    gaps = []
    for repeat in sorted(set(base_by) | set(new_by), key=str):
        status = new_by.get(repeat)
        if status is None:
            gaps.append((f"INCOMPLETE ({INCOMPLETE_RULE}): repeat {repeat} missing in new", False))
        elif status in STATUS_FAILURES and base_by.get(repeat) not in STATUS_FAILURES:
            gaps.append((f"REGRESSION (rule: every repeat ok in new): repeat {repeat} {status} in new", True))
        elif status != "ok":
            gaps.append((f"INCOMPLETE ({INCOMPLETE_RULE}): repeat {repeat} {status} in new", False))
    return gaps


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
    programs = sorted({str(execution(r)) for r in records if execution(r)})
    return f"data {', '.join(data) or '?'}; {', '.join(versions) or 'versions ?'}; {', '.join(programs) or 'program ?'}"


def _table(rows: list[list[str]]) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return ["  " + "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]


def compare_records(base: list[dict], new: list[dict], *, threshold: float | dict[str, float] = 0.05,
                    base_name: str = "base", new_name: str = "new", force: bool = False,
                    fmt: str = "text") -> tuple[str, int]:
    """The comparison of two runs' records as text, markdown or JSON, and its exit code.

    1 (EXIT_REGRESSION) if any regression was found, else 3 (EXIT_INCOMPLETE) if new left a
    cell or repeat of base unmeasured (skipped, missing, failed in both), else 0.

    Raises Incomparable when the runs differ in what they measured (comparable.differences)
    unless `force`, which compares under a banner naming each difference.
    """
    thresholds = threshold if isinstance(threshold, dict) else {DEFAULT: threshold}
    diffs = differences(base, new)
    if diffs and not force:
        raise Incomparable(diffs)
    base_cells = group_cells(base)
    new_cells = _align_devices(base_cells, group_cells(new))
    figures = _cell_figures(base + new)  # the threshold line names test_loss where some cell is judged by it
    lines = [f"tribench compare: base {base_name} vs new {new_name}"]
    if diffs:
        lines += ["NOT COMPARABLE, compared anyway (--force); the runs differ in:", *[f"  - {d}" for d in diffs]]
    rules = (f"{_threshold_text(thresholds, figures)} (accuracy: absolute change in points; others: relative change). "
             "A regression needs the change beyond the threshold AND each median outside the other run's "
             "spread (min-max below 5 repeats, IQR from 5; with n=1 on both sides the threshold alone decides).")
    lines += [rules, ""]
    choices = chosen_programs(base, new)
    if choices:
        lines += ["--mode best chose other programs (the figures compare each side's choice):",
                  *[f"  - {c}" for c in choices], ""]
    result = {"base": base_name, "new": new_name, "comparable": not diffs, "differences": diffs, "rules": rules,
              "chosen_programs": choices,
              "thresholds": {name: _limit(thresholds, name) for name, *_ in figures}, "cells": []}
    regressions, incomplete = [], []
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
                note = f"REGRESSION (rule: cell ok in base, {status} in new)"
                regressions.append(f"{label}: status")
            else:  # never measured in new (a backend not installed): not a pass
                note = f"INCOMPLETE ({INCOMPLETE_RULE}): no ok repeat in new: {status}; base: {_status_text(b_rs)}"
                incomplete.append(f"{label}: no ok repeat")
            lines += [f"  {note}", ""]
            result["cells"].append({"cell": label, "note": note})
            continue
        for note, is_regression in _repeat_gaps(b_rs, n_rs):
            lines.append(f"  {note}")
            (regressions if is_regression else incomplete).append(f"{label}: {note.split(': ', 1)[1]}")
        if not b_ok:
            note = f"no ok repeat in base ({_status_text(b_rs)}); nothing to compare against"
            lines += [f"  {note}", ""]
            result["cells"].append({"cell": label, "note": note})
            continue
        rows = [["figure", "base", "new", "ratio", "verdict"]]
        cell = {"cell": label, "base": _provenance(b_rs), "new": _provenance(n_rs), "figures": []}
        for name, higher, form, rule in _cell_figures(b_ok + n_ok):
            bs, ns = summarise_figure(b_ok, name), summarise_figure(n_ok, name)
            if name == TIME_TO_TARGET.name and not bs["n"] and not ns["n"]:
                verdict, bad = "n/a (target never reached in either run)", False
            else:
                verdict, bad = judge(name, bs, ns, threshold=_limit(thresholds, name), higher_better=higher,
                                     rule=rule)
            if bad:
                regressions.append(f"{label}: {name}")
            direction = "higher" if higher else "lower"
            rows.append([f"{name} ({direction} better)", _fmt(bs, form), _fmt(ns, form), _ratio(bs, ns), verdict])
            cell["figures"].append({"figure": name, "higher_is_better": higher, "base": bs, "new": ns,
                                    "verdict": verdict, "regression": bad})
        result["cells"].append({**cell, "table": rows})
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
        also = f" (and {len(incomplete)} incomplete: {'; '.join(incomplete)})" if incomplete else ""
        lines.append(f"RESULT: {len(regressions)} regression(s): {'; '.join(regressions)}{also}")
    elif incomplete:
        lines.append(f"RESULT: INCOMPLETE: {len(incomplete)} cell(s) not fully measured in new: "
                     f"{'; '.join(incomplete)}")
    else:
        lines.append("RESULT: no regression")
    code = EXIT_REGRESSION if regressions else EXIT_INCOMPLETE if incomplete else 0
    result.update(regressions=regressions, incomplete=incomplete, only_base=["/".join(k) for k in only_base],
                  only_new=["/".join(k) for k in only_new], result=lines[-1])
    if fmt == "json":
        return json.dumps(result, indent=2, default=str, allow_nan=False) + "\n", code
    if fmt == "markdown":
        return _markdown(result), code
    return "\n".join(lines) + "\n", code


def _markdown(result: dict) -> str:
    """The comparison as GitHub markdown: a banner for differences, one table per cell, the result."""
    out = [f"## tribench compare: `{result['base']}` vs `{result['new']}`", ""]
    if result["differences"]:
        out += ["> **NOT COMPARABLE, compared anyway (--force).** The runs differ in:", ">"]
        out += [f"> - {d}" for d in result["differences"]]
        out.append("")
    out += [result["rules"], ""]
    for cell in result["cells"]:
        if "note" in cell:
            out += [f"### {cell['cell']}", "", cell["note"], ""]
            continue
        header, *rows = cell["table"]
        out += [f"### {cell['cell']}", "", f"base: {cell['base']}; new: {cell['new']}", "",
                "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        out += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in rows]
        out.append("")
    for title, cells in (("Not fully measured in new (incomplete)", result["incomplete"]),
                         ("Cells in base missing from new (regression)", result["only_base"]),
                         ("Cells only in new", result["only_new"])):
        if cells:
            out += [f"**{title}:** {', '.join(cells)}", ""]
    out.append(f"**{result['result']}**")
    return "\n".join(out) + "\n"


def compare_runs(base_dir, new_dir, *, threshold: float | dict[str, float] = 0.05, force: bool = False,
                 fmt: str = "text") -> tuple[str, int]:
    """Compare the records.jsonl of two run folders; (text to print, exit code as compare_records gives it).

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
    return compare_records(*runs, threshold=threshold, base_name=str(base_dir), new_name=str(new_dir),
                           force=force, fmt=fmt)


class EmptyRun(ValueError):
    """A run folder whose records.jsonl holds no record."""
