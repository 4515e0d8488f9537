"""Run summaries: pandas tables per task, parity and environment, as terminal text, report.md and report.html."""

from __future__ import annotations

import base64
import datetime as _dt
import html
import logging
import textwrap
from collections import Counter
from pathlib import Path

from harness.confine import UntrustedInput
from harness.figures import (
    DEVICE_PEAK,
    FROZEN_RATE,
    FULL_RATE,
    TIME_TO_TARGET,
    TRAIN_RATE,
    Figure,
    objective,
    percent,
    report_columns,
    terminal_headers,
)
from harness.load import under_load
from harness.schema import load_run_file
from harness.stats import (
    beyond_spread,
    cell_key,
    data_label,
    figure,
    format_stat,
    group_cells,
    judged_by_loss,
    ok_records,
    primary_stage,
    spread_kind,
    stage_data,
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

# Columns computed here rather than read as one figure; shown where some record of the task has them.
EXPORT_HEADER = "exported (size, max |logit diff|)"
DERIVED_HEADERS = ("freezing speed-up", "roofline", EXPORT_HEADER, "mode", "error")
CELL_HEADERS = ("backend", "device", "status", "n")
KEY_HEADERS = ("task", *CELL_HEADERS, "data")
# Terminal prose is wrapped to this width; the 8-column main tables are a little wider at most.
TEXT_WIDTH = 100


# -- small helpers ---------------------------------------------------------------------------

def _data_label(record: dict) -> str:
    return data_label(record.get("data")) or MISSING


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
    s = summarise_figure(ok, TIME_TO_TARGET.name)
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
        frozen, full = figure(r, FROZEN_RATE.name), figure(r, FULL_RATE.name)
        if frozen and full:
            ratios.append(frozen / full)
    s = summarise(ratios)
    return format_stat(s, lambda v: f"{v:.2f}x") if s["n"] else ""


def _optional_headers() -> tuple[str, ...]:
    return (*(f.label for f in report_columns("extra")), *DERIVED_HEADERS)


def _exported_rows(cell_row: dict, ok: list[dict]) -> list[dict]:
    """A row per exported format of a cell (`--export`), under its backend's row: the runtime's figures."""
    rows = []
    formats = _unique(fmt for r in ok for fmt in (r.get("exported") or {}))
    for fmt in formats:
        runs = [(r.get("exported") or {}).get(fmt) or {} for r in ok]
        done = [e for e in runs if "error" not in e]
        row = {h: "" for h in cell_row}
        row.update(task=cell_row["task"], backend=f"{cell_row['backend']} \u2192 {fmt}", device=cell_row["device"],
                   n=len(done), data=cell_row["data"], mode=", ".join(_unique(e.get("exporter") for e in done)))
        row["status"] = "ok" if len(done) == len(runs) else ("unsupported" if any(e.get("unsupported") for e in runs)
                                                           else "failed")
        row["error"] = next((str(e["error"]) for e in runs if "error" in e), "")
        for f in (*report_columns("core"), *report_columns("extra")):
            s = summarise(e.get(f.name) for e in done)
            if s["n"]:
                row[f.label] = format_stat(s, f.fmt)
        if done:
            size = max(e.get("size_bytes", 0) for e in done) / 2**20
            diff = max(e.get("max_abs_logit_diff", 0.0) for e in done)
            parity = "parity ok" if all(e.get("parity_ok") for e in done) else "PARITY FAILED"
            row[EXPORT_HEADER] = f"{size:,.2f} MiB, {diff:.1e} ({parity})"
        rows.append(row)
    return rows


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
        for f in report_columns("core"):
            row[f.label] = format_stat(summarise_figure(ok, f.name), f.fmt) if ok else ""
        row[TIME_TO_TARGET.label] = _time_to_target(rs)
        if ok and _is_cpu(first.get("env") or {}) and summarise_figure(ok, DEVICE_PEAK.name)["n"] == 0:
            row[DEVICE_PEAK.label] = f"n/a ({device})"
        row["params (total / trainable)"] = _params(ok) if ok else ""
        for f in report_columns("extra"):
            if f.loss_only and not judged_by_loss(ok):
                row[f.label] = ""  # every task has a loss; the column is for those judged by it
                continue
            s = summarise_figure(ok, f.name)
            row[f.label] = format_stat(s, f.fmt) if s["n"] else ""
        row["freezing speed-up"] = _speedup(rs)
        s = summarise_figure(ok, "roofline_fraction")
        row["roofline"] = format_stat(s, lambda v: f"{100 * v:.1f}%") if s["n"] else ""
        row[EXPORT_HEADER] = ""  # the rows of its exported formats say it
        row["mode"] = ", ".join(_unique(mode_text(r.get("env") or {}) for r in rs))
        row["error"] = error
        rows.append(row)
        rows += _exported_rows(row, ok)
    columns = [*KEY_HEADERS, *(f.label for f in report_columns("core")), "params (total / trainable)",
               *_optional_headers()]
    return pd.DataFrame(rows, columns=columns)


def task_table(table, task: str):
    """The rows of one task, without the task column and without optional columns empty for it."""
    sub = table[table["task"] == task].drop(columns=["task"])
    empty = [c for c in _optional_headers() if c in sub and (sub[c] == "").all()]
    return sub.drop(columns=empty).reset_index(drop=True)


def main_headers(*, by_loss: bool) -> tuple[str, ...]:
    """The columns a task's main table shows: the cell, the figure it is judged by, time to target, speed, mode."""
    return (*CELL_HEADERS, objective(by_loss=by_loss).label, TIME_TO_TARGET.label, TRAIN_RATE.label, "mode")


# Per-cell notes listed under a task's main table (a failure's error; a note on how a cell ran joins here).
NOTE_HEADERS = ("error",)


def cell_label(row) -> str:
    return f"{row['backend']}/{row['device']}"


def split_table(sub, *, by_loss: bool):
    """(main table, details table) of one task's rows (`task_table`'s).

    The details table is transposed, a row per remaining figure and a column per cell, so a
    task with many figures grows down the page rather than off its right edge.
    """
    import pandas as pd

    main = sub[[c for c in main_headers(by_loss=by_loss) if c in sub]]
    rest = [c for c in sub.columns if c not in main.columns and c not in NOTE_HEADERS]
    details = pd.DataFrame({"figure": rest, **{cell_label(row): [row[c] for c in rest] for _, row in sub.iterrows()}})
    return main, details


def cell_notes(sub) -> list[str]:
    """One line per cell with a note (`NOTE_HEADERS`), as 'backend/device: note'."""
    return [f"{cell_label(row)}: {'; '.join(str(row[c]) for c in NOTE_HEADERS if c in sub and row[c])}"
            for _, row in sub.iterrows() if any(c in sub and row[c] for c in NOTE_HEADERS)]


# -- the headline: who leads, by how much, and whether that is more than the noise ------------

def _gap(fig: Figure, lead: float, other: float) -> str:
    """How far `lead` is ahead of `other` in `fig`'s own terms: points, a ratio, or a difference."""
    if fig.fmt is percent:
        return f"{100 * abs(lead - other):.2f} points ahead"
    if fig.higher_is_better and other > 0:
        return f"{lead / other:.2f}x as fast" if fig.unit.endswith("/s") else f"{lead / other:.2f}x as high"
    diff = format(abs(other - lead), fig.fmt if isinstance(fig.fmt, str) else ".4g")
    unit = f" {fig.unit}" if fig.unit else ""
    rel = f" ({abs(other - lead) / abs(other):.1%})" if other else ""
    return f"{diff}{unit} {'lower' if fig.higher_is_better is False else 'apart'}{rel}"


def _noise(verdict: bool | None) -> str:
    if verdict is None:
        return "noise unknown (one repeat has no spread; --repeats 3 gives one)"
    return "beyond noise (the spreads do not overlap)" if verdict else "within noise (the spreads overlap)"


def lead_line(records: list[dict], fig: Figure, what: str) -> str:
    """Which cell leads in `fig` (median over ok repeats), with its spread, and the gap to the next cell.

    Cells whose medians show the same are a tie, said so and listed by name; the next cell is
    the first one that does not tie.
    """
    cells = {f"{k[1]}/{k[2]}": summarise_figure(rs, fig.name) for k, rs in group_cells(records).items()}
    cells = {k: s for k, s in cells.items() if s["n"]}
    if not cells:
        return f"{what}: no ok cell has it."
    groups = _ranked(cells, fig)
    top = groups[0]
    if len(top) > 1:
        head = f"{what}: a tie at {_shown(cells[top[0]]['median'], fig)} (medians) between {_and(top)}"
    else:
        head = f"{what}: {top[0]} {format_stat(cells[top[0]], fig.fmt)}"
    if len(groups) == 1:
        return head + (", every cell." if len(top) > 1 else ", the only cell.")
    nxt_name = groups[1][0]
    lead, nxt = cells[top[0]], cells[nxt_name]
    verdict = beyond_spread(lead, nxt, higher_is_better=bool(fig.higher_is_better))
    return (f"{head}; next {nxt_name} {format_stat(nxt, fig.fmt)}: "
            f"{_gap(fig, lead['median'], nxt['median'])}, {_noise(verdict)}.")


def judged_on(records: list[dict]) -> str:
    """For a staged task, the stage and data its judged figure comes from ("stage finetune, on licenses")."""
    first = next(iter(ok_records(records) or records), {})
    stage = primary_stage(first)
    return f"stage {stage}, on {stage_data(first, stage)}" if stage else ""


def headline(records: list[dict]) -> list[str]:
    """A task's two headline sentences: the best judged figure, and the fastest training."""
    by_loss = judged_by_loss(records)
    where = judged_on(records)
    what = "Lowest held-out loss" if by_loss else "Best test accuracy"
    return [lead_line(records, objective(by_loss=by_loss), f"{what}{f' ({where})' if where else ''}"),
            lead_line(records, TRAIN_RATE, f"Fastest training ({TRAIN_RATE.unit})")]


# -- parity and provenance ---------------------------------------------------------------------

def _shown(value: float, fig: Figure) -> str:
    """A median as a table shows it: two medians that show the same are a tie."""
    return format_stat({"n": 1, "median": value}, fig.fmt).removesuffix(" (n=1)")


def _ranked(cells: dict, fig: Figure) -> list[list]:
    """Cell labels best first by median of `fig`, grouped into ties (same shown value), each tie by name."""
    sign = -1 if fig.higher_is_better else 1
    groups: list[list] = []
    for k in sorted(cells, key=lambda k: (sign * cells[k]["median"], k)):
        if groups and _shown(cells[groups[-1][0]]["median"], fig) == _shown(cells[k]["median"], fig):
            groups[-1].append(k)
        else:
            groups.append([k])
    return [sorted(g) for g in groups]


def judged_line(records: list[dict]) -> str:
    """How one task's cells are judged and ranked: by held-out loss (lower is better) or test accuracy (higher)."""
    by_loss = judged_by_loss(records)
    fig = objective(by_loss=by_loss)
    cells = {f"{k[1]}/{k[2]}": summarise_figure(rs, fig.name) for k, rs in group_cells(records).items()}
    cells = {k: s for k, s in cells.items() if s["n"]}
    groups = _ranked(cells, fig)
    order = ", ".join(" = ".join(f"{k} {_shown(cells[k]['median'], fig)}" for k in g) for g in groups) or "no ok cell"
    if any(len(g) > 1 for g in groups):
        order += " ('=': a tie at the precision shown, listed by name)"
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
    for r in records:
        label = data_label(r.get("data"), source=True)
        if label and label not in out:
            out.append(label)
    return "; ".join(out) + _stage_sources(records) if out else "none loaded (no cell got that far)"


def _stage_sources(records: list[dict]) -> str:
    """A staged task's data per stage: "; stages pretrain on fortunes, finetune and lora on licenses"."""
    first = next(iter(ok_records(records) or records), {})
    names = [s.get("name") for s in (first.get("spec") or {}).get("stages") or []]
    if len(names) < 2:
        return ""
    by_data: dict[str, list[str]] = {}
    for name in names:
        by_data.setdefault(stage_data(first, name), []).append(str(name))
    return "; stages " + ", ".join(f"{_and(n)} on {d}" for d, n in by_data.items())


def _and(names: list[str]) -> str:
    return f"{', '.join(names[:-1])} and {names[-1]}" if len(names) > 1 else names[0]


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
    loaded = [f"{r.get('backend')} r{r.get('repeat')} ({why})" for r in records
              if (why := under_load(r.get("env") or {}))]
    forked = any(((r.get("env") or {}).get("worker_start") or {}).get("how") == "fork" for r in records)
    return (f"data: {_data_sources(records)}; device: {devices}; ok repeats per cell: {', '.join(map(str, ns))}"
            + ("; workers forked from a process that had imported the framework (--quick): peak RSS leaves "
               "out the library pages a cell never touched" if forked else "")
            + (f"; UNDER LOAD: {', '.join(loaded)}" if loaded else ""))


LEGEND = ("Cells show the median over ok repeats: `v (n=1)` is a single run with no spread; "
          "`median [min\u2013max]` for 2\u20134 repeats; `median (IQR q1\u2013q3)` from 5 repeats. "
          "Time to target is training time only (evaluation excluded); memory in MiB.")


# -- terminal --------------------------------------------------------------------------------

def _wrap(text: str, indent: str = "") -> list[str]:
    return [ln for para in str(text).split("\n")
            for ln in textwrap.wrap(para, TEXT_WIDTH, initial_indent=indent, subsequent_indent=indent + "  ")]


def _terminal_details(sub, main) -> list[str]:
    """Per cell, its terminal figures beyond the main table, wrapped: "jax/cpu: eval samples/s 1,234 (n=1); ..."."""
    shown = [c for c in (*terminal_headers(), *DERIVED_HEADERS)
             if c in sub and c not in main.columns and c not in NOTE_HEADERS]
    lines = []
    for _, row in sub.iterrows():
        parts = [f"{c} {row[c]}" for c in shown if row[c] not in ("", MISSING) and not str(row[c]).startswith("n/a")]
        if parts:
            lines += _wrap(f"{cell_label(row)}: " + "; ".join(parts), "  ")
    return lines


def render_terminal(records: list[dict]) -> str:
    """The summary printed when a run ends: per task its headline, a short table, notes and parity, wrapped."""
    if not records:
        return "No records: nothing ran."
    table = summary_table(records)
    lines = []
    warning = synthetic_warning(records)
    if warning:
        lines += ["!" * 78, *_wrap(f"!!! {warning}"), "!" * 78, ""]
    for task, rs in _by_task(records).items():
        sub = task_table(table, task)
        main, _ = split_table(sub, by_loss=judged_by_loss(rs))
        lines += [f"== {task} ==", *_wrap(task_source(rs)), *(ln for h in headline(rs) for ln in _wrap(h)),
                  main.to_string(index=False)]
        lines += [ln for note in cell_notes(sub) for ln in _wrap(note, "  ")]
        details = _terminal_details(sub, main)
        lines += ["Also:", *details] if details else []
        lines += [*_wrap(judged_line(rs)), *_wrap(parity_line(rs)), ""]
    if warning:
        lines += _wrap(f"!!! {warning}")
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
        sub = task_table(table, task)
        main, details = split_table(sub, by_loss=judged_by_loss(rs))
        out += [f"## {_md(task)}", "", f"_{_md(task_source(rs))}_", ""]
        out += [f"**{_md(line)}**  " for line in headline(rs)] + [""]
        out += [_md_table(main), ""]
        notes = cell_notes(sub)
        out += [*(f"- {_md(note)}" for note in notes), ""] if notes else []
        out += [_md(judged_line(rs)), "", f"**{_md(parity_line(rs))}**", ""]
        out += ["<details><summary>Every figure of " + _md(task) + "</summary>", "", _md_table(details), "",
                "</details>", ""]
    out += ["## Plots", ""]
    if not figures:
        out += ["No successful cell: nothing to plot.", ""]
    for path, caption in figures:  # captions name tasks, which come from records: escaped like the tables
        out += [f"![{_md(caption)}]({path.name})", "", f"_{_md(caption)}_", ""]
    return "\n".join(out)


CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",sans-serif;margin:2em auto;max-width:1200px;padding:0 1em;
overflow-wrap:anywhere}
table{border-collapse:collapse;font-size:0.85em;margin:0.5em 0;max-width:100%}
th,td{border:1px solid #ccc;padding:0.25em 0.5em;text-align:right}
th{background:#f0f0f0}td.text,th.text{text-align:left}
.warn{background:#fff3cd;border:2px solid #e0a800;padding:0.75em;font-weight:bold}
.parity,.headline{font-weight:bold}.src{color:#555;font-style:italic}figure{margin:1.5em 0}
img{max-width:100%;height:auto;border:1px solid #ddd}
dl.env{display:grid;grid-template-columns:max-content minmax(0,1fr);gap:0.2em 1em}
dl.env dt{font-weight:bold}dl.env dd{margin:0}
summary{cursor:pointer;margin:0.5em 0}
"""
# Columns holding words rather than numbers: left-aligned.
TEXT_COLUMNS = ("figure", *CELL_HEADERS[:3], "mode")


def _html_table(df) -> str:
    """A table whose cells are escaped and whose word columns are left-aligned."""
    esc = html.escape
    kind = ["text" if c in TEXT_COLUMNS else "num" for c in df.columns]
    head = "".join(f"<th class='{k}'>{esc(str(c))}</th>" for c, k in zip(df.columns, kind))
    body = "".join("<tr>" + "".join(f"<td class='{k}'>{esc(str(v))}</td>" for v, k in zip(row, kind)) + "</tr>"
                   for row in df.itertuples(index=False))
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _render_html(records, table, figures, title) -> str:
    esc = html.escape
    out = ["<!DOCTYPE html>", "<html lang='en'><head><meta charset='utf-8'>",
           "<meta name='viewport' content='width=device-width, initial-scale=1'>", f"<title>{esc(title)}</title>",
           f"<style>{CSS}</style></head><body>", f"<h1>{esc(title)}</h1>"]
    warning = synthetic_warning(records)
    if warning:
        out.append(f"<p class='warn'>{esc(warning)}</p>")
    out.append("<h2>Environment</h2><dl class='env'>")
    out += [f"<dt>{esc(k)}</dt><dd>{esc(str(v))}</dd>" for k, v in environment(records)]
    out.append(f"</dl><p>{esc(LEGEND.replace('`', ''))}</p>")
    for task, rs in _by_task(records).items():
        sub = task_table(table, task)
        main, details = split_table(sub, by_loss=judged_by_loss(rs))
        out += [f"<h2>{esc(task)}</h2>", f"<p class='src'>{esc(task_source(rs))}</p>",
                *(f"<p class='headline'>{esc(line)}</p>" for line in headline(rs)), _html_table(main)]
        notes = cell_notes(sub)
        if notes:
            out.append("<ul>" + "".join(f"<li>{esc(note)}</li>" for note in notes) + "</ul>")
        out += [f"<p>{esc(judged_line(rs))}</p>", f"<p class='parity'>{esc(parity_line(rs))}</p>",
                f"<details><summary>Every figure of {esc(task)}</summary>{_html_table(details)}</details>"]
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
            created = load_run_file(Path(run_dir) / "run.json", str(run_dir)).get("created_at")
        except UntrustedInput:
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
