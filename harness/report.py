"""Run summaries: pandas tables per task, parity and environment, as terminal text, report.md and report.html."""

from __future__ import annotations

import base64
import datetime as _dt
import html
import json
import logging
from collections import Counter
from pathlib import Path

from harness.stats import (
    cell_key,
    figure,
    format_stat,
    group_cells,
    judged_by_loss,
    ok_records,
    spread_kind,
    summarise,
    summarise_figure,
    target_loss,
)
from harness.storage import write_atomic

log = logging.getLogger(__name__)

REPORT_MD = "report.md"
REPORT_HTML = "report.html"
MISSING = "\u2014"
# How far apart two backends' initial test losses may be (relative) and still "agree".
# Same weights and data give the same loss up to float reduction order in fp32; reduced
# precision matmuls (TF32, bf16) legitimately move it further; fp64 agrees to rounding (measured 2e-16).
INITIAL_LOSS_RTOL = {"fp32": 1e-4, "tf32": 5e-3, "bf16": 5e-2, "fp64": 1e-10}

# (column header, figure name, format) of the figures every task shows.
CORE_COLUMNS = (
    ("test accuracy", "test_accuracy", lambda v: f"{100 * v:.2f}%"),
    ("time to target (s)", "time_to_target_s", ".3g"),
    ("train samples/s", "train_samples_per_s", ",.0f"),
    ("eval samples/s", "eval_samples_per_s", ",.0f"),
    ("warm-up (s)", "warmup_s", ".3g"),
    ("peak host RSS (MiB)", "peak_rss_mb", ",.0f"),
    ("device peak (MiB)", "device_peak_mb", ",.0f"),
)
LOSS_HEADER = "held-out loss (lower is better)"
# Shown only where some record of the task has them (the finetune task, GPU roofline runs).
EXTRA_COLUMNS = (
    # Tasks judged by loss (language models): the held-out loss, its bits per byte, per-token rates.
    (LOSS_HEADER, "test_loss", ".4f"),
    ("bits/byte (lower is better)", "bits_per_byte", ".3f"),
    ("train tokens/s", "train_tokens_per_s", ",.0f"),
    ("eval tokens/s", "eval_tokens_per_s", ",.0f"),
    ("scratch loss", "scratch_loss", ".4f"),  # a staged language model's control, same budget, fresh weights
    ("finetuned accuracy", "finetuned_accuracy", lambda v: f"{100 * v:.2f}%"),
    ("scratch accuracy", "scratch_accuracy", lambda v: f"{100 * v:.2f}%"),
    ("frozen train samples/s", "frozen_train_samples_per_s", ",.0f"),
    ("full train samples/s", "full_train_samples_per_s", ",.0f"),
)
OPTIONAL_HEADERS = tuple(h for h, _, _ in EXTRA_COLUMNS) + ("freezing speed-up", "roofline", "mode", "error")
KEY_HEADERS = ("task", "backend", "device", "status", "n", "data")


# -- small helpers ---------------------------------------------------------------------------

def _data_label(record: dict) -> str:
    data = record.get("data") or {}
    if not data:
        return MISSING
    kind = "SYNTHETIC" if data.get("synthetic") else "real"
    sizes = f"{data.get('n_train', '?')}/{data.get('n_test', '?')}"
    subset = f", subset {data['subset']}" if data.get("subset") else ""
    return f"{kind} {data.get('name', '?')} {sizes}{subset}"


def _is_cpu(env: dict) -> bool:
    kind = env.get("device_type") or env.get("device") or "cpu"
    return str(kind).lower().startswith("cpu")


def mode_text(env: dict) -> str:
    """The mode a record trained in, "(best)" where the probe chose it rather than the user."""
    return f"{env.get('mode') or '?'}{' (best)' if env.get('mode_requested') == 'best' else ''}"


def _unique(values) -> list:
    seen = []
    for v in values:
        if v not in (None, "") and v not in seen:
            seen.append(v)
    return seen


def _cell_status(records: list[dict]) -> tuple[str, str]:
    """(status text, first error) of a cell's repeats: 'ok', 'ok 2/3, 1 failed' or 'failed x3'."""
    counts = Counter(r.get("status", "?") for r in records)
    n = len(records)
    error = next((str(r["error"]) for r in records if r.get("status") != "ok" and r.get("error")), "")
    if counts.get("ok", 0) == n:
        return "ok", ""
    others = ", ".join(f"{c} {s}" for s, c in sorted(counts.items()) if s != "ok")
    if counts.get("ok"):
        return f"ok {counts['ok']}/{n}, {others}", error
    if len(counts) == 1:
        status = next(iter(counts))
        return (status if n == 1 else f"{status} x{n}"), error
    return others, error


def _params(records: list[dict]) -> str:
    total = _unique(figure(r, "params_total") for r in records)
    trainable = _unique(figure(r, "params_trainable") for r in records)
    if not total:
        return MISSING
    t = f"{int(total[0]):,}"
    return f"{t} / {int(trainable[0]):,}" if trainable else t


def _time_to_target(records: list[dict]) -> str:
    ok = ok_records(records)
    s = summarise_figure(ok, "time_to_target_s")
    if not ok:
        return ""
    if s["n"] == 0:
        return "never"
    text = format_stat(s, ".3g")
    # A repeat that never reached the target has no time; say so rather than hide it.
    return text if s["n"] == len(ok) else f"{text}; {s['n']}/{len(ok)} reached"


def _speedup(records: list[dict]) -> str:
    ratios = []
    for r in ok_records(records):
        frozen, full = figure(r, "frozen_train_samples_per_s"), figure(r, "full_train_samples_per_s")
        if frozen and full:
            ratios.append(frozen / full)
    s = summarise(ratios)
    return format_stat(s, lambda v: f"{v:.2f}x") if s["n"] else ""


# -- the summary table -------------------------------------------------------------------------

def summary_table(records: list[dict]):
    """One row per task x backend x device, formatted for display.

    Ok repeats give the median and spread of each figure (see stats.format_stat); cells
    with no ok repeat still get a row with their status and error, so a failure is seen
    next to the successes instead of vanishing. Optional columns are empty strings where
    they do not apply; `task_table` drops the ones empty for a whole task.
    """
    import pandas as pd

    rows = []
    for (task, backend, device), rs in group_cells(records).items():
        ok = ok_records(rs)
        status, error = _cell_status(rs)
        first = (ok or rs)[0]
        row = {"task": task, "backend": backend, "device": device, "status": status,
               "n": len(ok), "data": _data_label(first)}
        for header, name, fmt in CORE_COLUMNS:
            row[header] = format_stat(summarise_figure(ok, name), fmt) if ok else ""
        row["time to target (s)"] = _time_to_target(rs)
        if ok and _is_cpu(first.get("env") or {}) and summarise_figure(ok, "device_peak_mb")["n"] == 0:
            row["device peak (MiB)"] = f"n/a ({device})"
        row["params (total / trainable)"] = _params(ok) if ok else ""
        for header, name, fmt in EXTRA_COLUMNS:
            if name == "test_loss" and not judged_by_loss(ok):
                row[header] = ""  # every task has a loss; the column is for those judged by it
                continue
            s = summarise_figure(ok, name)
            row[header] = format_stat(s, fmt) if s["n"] else ""
        row["freezing speed-up"] = _speedup(rs)
        s = summarise_figure(ok, "roofline_fraction")
        row["roofline"] = format_stat(s, lambda v: f"{100 * v:.1f}%") if s["n"] else ""
        row["mode"] = ", ".join(_unique(mode_text(r.get("env") or {}) for r in rs))
        row["error"] = error
        rows.append(row)
    columns = [*KEY_HEADERS, *(h for h, _, _ in CORE_COLUMNS), "params (total / trainable)", *OPTIONAL_HEADERS]
    return pd.DataFrame(rows, columns=columns)


def task_table(table, task: str):
    """The rows of one task, without the task column and without optional columns empty for it."""
    sub = table[table["task"] == task].drop(columns=["task"])
    empty = [c for c in OPTIONAL_HEADERS if c in sub and (sub[c] == "").all()]
    return sub.drop(columns=empty).reset_index(drop=True)


# -- parity and provenance ---------------------------------------------------------------------

def judged_line(records: list[dict]) -> str:
    """How one task's cells are judged and ranked: by held-out loss (lower is better) or test accuracy (higher)."""
    by_loss = judged_by_loss(records)
    name = "test_loss" if by_loss else "test_accuracy"
    cells = {k: summarise_figure(rs, name) for k, rs in group_cells(records).items()}
    ranked = sorted((k for k in cells if cells[k]["n"]), key=lambda k: cells[k]["median"], reverse=not by_loss)
    order = ", ".join(f"{k[1]}/{k[2]} {cells[k]['median']:.4f}" if by_loss else
                      f"{k[1]}/{k[2]} {100 * cells[k]['median']:.2f}%" for k in ranked) or "no ok cell"
    if not by_loss:
        return f"Judged by test accuracy (higher is better); best first (medians): {order}."
    target = target_loss(records)
    aim = (f"target {target:g} nats; time to target: training time until the held-out loss first fell to it"
           if target is not None else "no target loss")
    return (f"Judged by held-out loss (lower is better; {aim}; test accuracy is next-token accuracy); "
            f"best first (medians, nats): {order}.")


def parity_line(records: list[dict]) -> str:
    """Largest test-accuracy (loss-based tasks: held-out-loss) gap between cells, and initial-loss agreement."""
    if judged_by_loss(records):
        return _loss_parity_line(records)
    cells = {k: summarise_figure(rs, "test_accuracy") for k, rs in group_cells(records).items()}
    cells = {k: s for k, s in cells.items() if s["n"]}
    if not cells:
        return "Parity: no successful cell, nothing to compare."
    label = {k: f"{k[1]}/{k[2]}" for k in cells}
    if len(cells) == 1:
        k = next(iter(cells))
        acc = f"only one backend ran ({label[k]}), no accuracy gap to measure"
    else:
        # Sorting (not max/min) keeps hi and lo distinct cells even when every median ties.
        ranked = sorted(cells, key=lambda k: cells[k]["median"])
        lo, hi = ranked[0], ranked[-1]
        gap = 100 * (cells[hi]["median"] - cells[lo]["median"])
        hi_acc, lo_acc = 100 * cells[hi]["median"], 100 * cells[lo]["median"]
        acc = (f"largest test-accuracy gap between backends {gap:.2f} points "
               f"({label[hi]} {hi_acc:.2f}% vs {label[lo]} {lo_acc:.2f}%, medians)")
    return f"Parity: {acc}; {_initial_loss_agreement(records)}."


def _loss_parity_line(records: list[dict]) -> str:
    """Parity of a loss-based task (language models, lower is better): the largest relative held-out-loss gap."""
    cells = {k: summarise_figure(rs, "test_loss") for k, rs in group_cells(records).items()}
    cells = {k: s for k, s in cells.items() if s["n"]}
    ranked = sorted(cells, key=lambda k: cells[k]["median"])
    if len(ranked) < 2:
        gap = "one backend only, no held-out-loss gap to measure"
    else:
        lo, hi = cells[ranked[0]]["median"], cells[ranked[-1]]["median"]
        gap = (f"largest held-out-loss gap between backends {(hi - lo) / hi:.1e} relative "
               f"({ranked[-1][1]} {hi:.4f} vs {ranked[0][1]} {lo:.4f} nats, medians; lower is better)")
    return f"Parity: {gap}; {_initial_loss_agreement(records)}.{_stage_losses(records)}"


def _stage_losses(records: list[dict]) -> str:
    """Each stage's held-out loss (median over ok records) and trainable parameters, per backend."""
    parts = []
    for (_, backend, _), rs in group_cells(records).items():
        stages = [figure(r, "stage_test_loss") for r in ok_records(rs)]
        stages = [s for s in stages if isinstance(s, dict)]
        if not stages:
            continue
        first = ok_records(rs)[0]
        counts = figure(first, "stage_params_trainable") or {}
        # The spec's stage order (records are written with sorted keys).
        order = [s.get("name") for s in (first.get("spec") or {}).get("stages") or []] or list(stages[0])
        cells = []
        for name in (n for n in order if n in stages[0]):
            values = sorted(s[name] for s in stages if s.get(name) is not None)
            loss = f"{values[len(values) // 2]:.4f}" if values else "n/a"
            cells.append(f"{name} {loss} ({counts.get(name, 0):,} trainable)")
        parts.append(f"{backend}: " + ", ".join(cells))
    return ("\nHeld-out loss per stage (each on its own stage's corpus): " + "; ".join(parts) + ".") if parts else ""


def _initial_loss_agreement(records: list[dict]) -> str:
    ok = ok_records(records)
    by_seed: dict = {}
    for r in ok:
        loss = figure(r, "initial_test_loss")
        if loss is not None:
            by_seed.setdefault(r.get("seed"), {}).setdefault((r.get("backend"), cell_key(r)[2]), loss)
    if not by_seed:
        return "initial losses not recorded"
    if all(len(v) < 2 for v in by_seed.values()):
        return "initial loss from one backend only, nothing to agree with"
    precisions = _unique((r.get("env") or {}).get("precision") for r in ok) or ["fp32"]
    rtol = max(INITIAL_LOSS_RTOL.get(str(p), INITIAL_LOSS_RTOL["fp32"]) for p in precisions)
    worst = 0.0
    for losses in by_seed.values():
        values = list(losses.values())
        if len(values) > 1:
            scale = max(abs(v) for v in values) or 1.0
            worst = max(worst, (max(values) - min(values)) / scale)
    verdict = "agree" if worst <= rtol else "DISAGREE (the backends did not start from the same model)"
    return (f"initial test losses {verdict}: largest relative difference {worst:.1e} "
            f"(tolerance {rtol:.0e} for {', '.join(map(str, precisions))}, same seed)")


def environment(records: list[dict]) -> list[tuple[str, str]]:
    """(label, value) pairs describing where and how the run happened, values merged over records."""
    envs = [r.get("env") or {} for r in records]

    def joined(key: str) -> str:
        return ", ".join(str(v) for v in _unique(e.get(key) for e in envs)) or MISSING

    gpus = _unique(e.get("device_name") or e.get("device") for e in envs if not _is_cpu(e))
    devices = _unique(e.get("device") for e in envs)
    versions = _unique((r.get("backend"), (r.get("env") or {}).get("framework_version")) for r in records
                       if (r.get("env") or {}).get("framework_version"))
    commits = _unique((e.get("git_commit"), e.get("git_dirty")) for e in envs if e.get("git_commit"))
    cpu_counts = joined("cpu_count")
    rows = [
        ("Machine", f"{joined('hostname')} ({joined('platform')})"),
        ("CPU", f"{joined('cpu')}, {cpu_counts} logical cores"),
        ("GPU", ", ".join(map(str, gpus)) if gpus else "none used"),
        ("Devices", ", ".join(map(str, devices)) or MISSING),
        ("Python", f"{joined('python')} (numpy {joined('numpy_version')})"),
        ("Frameworks", ", ".join(f"{b} {v}" for b, v in versions) or MISSING),
        ("Threads", joined("threads") + (f" (inter-op {joined('interop_threads')})"
                                          if any(e.get("interop_threads") for e in envs) else "")),
        ("Precision", joined("precision")),
        ("Data parallel", (joined("data_parallel") + " replica(s) per cell; per-replica batch "
                           + joined("per_replica_batch")) if any(e.get("data_parallel") for e in envs) else "1"),
        ("Mode", joined("mode") + (" (--mode best: each cell probed both modes and trained in the faster; "
                                   "probe rates in each record's metrics.mode_probe)"
                                   if any(e.get("mode_requested") == "best" for e in envs) else "")),
        ("Git commit", ", ".join(f"{c[:12]}{' (dirty tree)' if d else ''}" for c, d in commits) or MISSING),
    ]
    for task, rs in _by_task(records).items():
        rows.append((f"Data ({task})", _data_sources(rs)))
    for task, rs in _by_task(records).items():
        ns = sorted({len(ok_records(c)) for c in group_cells(rs).values()})
        rows.append((f"Repeats ({task})", ", ".join(map(str, ns)) + f" ok per cell; spread: {spread_kind(max(ns))}"))
    return rows


def _data_sources(records: list[dict]) -> str:
    out = []
    for d in _unique(tuple(sorted((r.get("data") or {}).items())) for r in records if r.get("data")):
        d = dict(d)
        kind = "SYNTHETIC" if d.get("synthetic") else "real"
        subset = f", subset {d['subset']}" if d.get("subset") else ""
        out.append(f"{kind} {d.get('name')} from {d.get('source')} "
                   f"({d.get('n_train')} train / {d.get('n_test')} test{subset})")
    return "; ".join(out) or "none loaded (no cell got that far)"


def _by_task(records: list[dict]) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for r in records:
        out.setdefault(str(r.get("task")), []).append(r)
    return out


def synthetic_warning(records: list[dict]) -> str | None:
    """A loud sentence when any cell trained on synthetic data; None when all data was real."""
    tasks = sorted({str(r.get("task")) for r in records if (r.get("data") or {}).get("synthetic")})
    if not tasks:
        return None
    return (f"SYNTHETIC DATA in {', '.join(tasks)}: these accuracies say nothing about the real dataset; "
            "timings and memory are still meaningful for the shapes used.")


def task_source(records: list[dict]) -> str:
    """Where one task's figures come from: data, devices, repeats."""
    devices = ", ".join(map(str, _unique(cell_key(r)[2] for r in records)))
    ns = sorted({len(ok_records(c)) for c in group_cells(records).values()})
    return f"data: {_data_sources(records)}; device: {devices}; ok repeats per cell: {', '.join(map(str, ns))}"


LEGEND = ("Cells show the median over ok repeats: `v (n=1)` is a single run with no spread; "
          "`median [min\u2013max]` for 2\u20134 repeats; `median (IQR q1\u2013q3)` from 5 repeats. "
          "Time to target is training time only (evaluation excluded); memory in MiB.")


# -- terminal --------------------------------------------------------------------------------

TERMINAL_COLUMNS = ("backend", "device", "status", "n", "test accuracy", LOSS_HEADER, "bits/byte (lower is better)",
                    "time to target (s)", "train samples/s", "train tokens/s", "eval samples/s", "eval tokens/s",
                    "scratch loss", "warm-up (s)", "peak host RSS (MiB)", "device peak (MiB)",
                    "freezing speed-up", "roofline", "mode", "error")


def render_terminal(records: list[dict]) -> str:
    """The summary printed when a run ends: a table per task, its parity line, and a loud synthetic warning."""
    if not records:
        return "No records: nothing ran."
    table = summary_table(records)
    lines = []
    warning = synthetic_warning(records)
    if warning:
        lines += ["!" * 78, f"!!! {warning}", "!" * 78, ""]
    for task, rs in _by_task(records).items():
        sub = task_table(table, task)
        sub = sub[[c for c in TERMINAL_COLUMNS if c in sub]]
        lines += [f"== {task} ==", task_source(rs), sub.to_string(index=False), judged_line(rs), parity_line(rs), ""]
    if warning:
        lines.append(f"!!! {warning}")
    return "\n".join(lines).rstrip() + "\n"


# -- markdown and HTML -------------------------------------------------------------------------

def _md(text) -> str:
    """Record text made inert in markdown: renderers pass raw HTML through, so <script> from a record must not."""
    return html.escape(str(text), quote=False).replace("|", "\\|").replace("\n", " ")


def _md_table(df) -> str:
    cell = _md
    head = "| " + " | ".join(cell(c) for c in df.columns) + " |"
    rule = "|" + "|".join("---" for _ in df.columns) + "|"
    body = ["| " + " | ".join(cell(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join([head, rule, *body])


def _render_md(records, table, figures, title) -> str:
    out = [f"# {title}", ""]
    warning = synthetic_warning(records)
    if warning:
        out += [f"> **{_md(warning)}**", ""]
    out += ["## Environment", ""]
    out += [f"- **{_md(k)}**: {_md(v)}" for k, v in environment(records)]
    out += ["", LEGEND, ""]
    for task, rs in _by_task(records).items():
        out += [f"## {_md(task)}", "", f"_{_md(task_source(rs))}_", "", _md_table(task_table(table, task)), "",
                _md(judged_line(rs)), "", f"**{_md(parity_line(rs))}**", ""]
    out += ["## Plots", ""]
    if not figures:
        out += ["No successful cell: nothing to plot.", ""]
    for path, caption in figures:
        out += [f"![{caption}]({path.name})", "", f"_{caption}_", ""]
    return "\n".join(out)


CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",sans-serif;margin:2em auto;max-width:1400px;padding:0 1em}
table{border-collapse:collapse;font-size:0.85em;margin:0.5em 0}
th,td{border:1px solid #ccc;padding:0.25em 0.5em;text-align:right;white-space:nowrap}
th{background:#f0f0f0}td:nth-child(-n+5){text-align:left}
.warn{background:#fff3cd;border:2px solid #e0a800;padding:0.75em;font-weight:bold}
.parity{font-weight:bold}.src{color:#555;font-style:italic}figure{margin:1.5em 0}
img{max-width:100%;border:1px solid #ddd}dl.env dt{font-weight:bold;float:left;clear:left;width:11em}
dl.env dd{margin-left:12em}
"""


def _render_html(records, table, figures, title) -> str:
    esc = html.escape
    out = ["<!DOCTYPE html>", "<html lang='en'><head><meta charset='utf-8'>", f"<title>{esc(title)}</title>",
           f"<style>{CSS}</style></head><body>", f"<h1>{esc(title)}</h1>"]
    warning = synthetic_warning(records)
    if warning:
        out.append(f"<p class='warn'>{esc(warning)}</p>")
    out.append("<h2>Environment</h2><dl class='env'>")
    out += [f"<dt>{esc(k)}</dt><dd>{esc(str(v))}</dd>" for k, v in environment(records)]
    out.append(f"</dl><p>{esc(LEGEND.replace('`', ''))}</p>")
    for task, rs in _by_task(records).items():
        out += [f"<h2>{esc(task)}</h2>", f"<p class='src'>{esc(task_source(rs))}</p>",
                task_table(table, task).to_html(index=False, escape=True, border=0),
                f"<p>{esc(judged_line(rs))}</p>", f"<p class='parity'>{esc(parity_line(rs))}</p>"]
    out.append("<h2>Plots</h2>")
    if not figures:
        out.append("<p>No successful cell: nothing to plot.</p>")
    for path, caption in figures:
        # Embedded as data URIs so the page is one self-contained file that needs no network
        # and survives being mailed or moved away from its PNGs.
        data = base64.b64encode(path.read_bytes()).decode("ascii")
        out.append(f"<figure><img src='data:image/png;base64,{data}' alt='{esc(caption, quote=True)}'>"
                   f"<figcaption>{esc(caption)} <small>({esc(path.name)})</small></figcaption></figure>")
    out.append("</body></html>")
    return "\n".join(out)


def _parse_time(text) -> _dt.datetime | None:
    try:
        when = _dt.datetime.fromisoformat(str(text).replace("Z", "+00:00"))
    except ValueError:
        return None
    return when if when.tzinfo else when.replace(tzinfo=_dt.timezone.utc)


def run_stamp(run_dir: Path, records: list[dict]) -> str:
    """When the run ran, from its records (first start to last finish), else run.json; never the report's own time."""
    starts = [t for t in (_parse_time(r.get("started_at")) for r in records if r.get("started_at")) if t]
    ends = [t for t in (_parse_time(r.get("finished_at")) for r in records if r.get("finished_at")) if t]
    if not starts:
        try:
            created = json.loads((Path(run_dir) / "run.json").read_text(encoding="utf-8")).get("created_at")
        except (OSError, ValueError, AttributeError):
            created = None
        starts = [t for t in (_parse_time(created),) if t] if created else []
    if not starts:
        return "run time unknown"
    fmt = "%Y-%m-%d %H:%M"
    first, last = min(starts).astimezone(_dt.timezone.utc), max(ends or starts).astimezone(_dt.timezone.utc)
    end = last.strftime("%H:%M" if last.date() == first.date() else fmt)
    return f"run {first.strftime(fmt)}\u2013{end} UTC"


def write_report(run_dir, *, records: list[dict] | None = None) -> list[Path]:
    """Write report.md, report.html and the PNG plots into `run_dir`; return the paths written.

    Reads run_dir/records.jsonl when `records` is None. Works for any subset of outcomes:
    only failures (tables of statuses, no plots), one backend, one repeat.
    """
    from harness.plots import write_plots
    from harness.results import read_records

    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    if records is None:
        records = read_records(run_dir)
    table = summary_table(records)
    figures = write_plots(records, run_dir) if ok_records(records) else []
    title = f"tribench report: {run_dir.name} ({len(records)} records, {run_stamp(run_dir, records)})"
    md_path, html_path = run_dir / REPORT_MD, run_dir / REPORT_HTML
    write_atomic(md_path, (_render_md(records, table, figures, title) + "\n").encode())
    write_atomic(html_path, (_render_html(records, table, figures, title) + "\n").encode())
    log.info("report written to %s", html_path)
    return [md_path, html_path, *(p for p, _ in figures)]
