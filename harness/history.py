"""History: every run under a results folder, keyed by machine and git commit, as tables and a trend plot."""

from __future__ import annotations

import io
import os
import textwrap
from pathlib import Path

from harness.confine import is_regular
from harness.figures import BY_NAME, followed, percent
from harness.results import RECORDS_FILE, read_records
from harness.stats import (
    data_label,
    figure,
    format_stat,
    judged_by_loss,
    ok_records,
    spread_interval,
    spread_kind,
    summarise_figure,
)
from harness.storage import write_atomic

HISTORY_MD, HISTORY_PNG = "history.md", "history.png"


def find_runs(root: Path) -> list[Path]:
    """Every folder under `root` (itself included) holding a records.jsonl that is a regular file, sorted.

    Symlinked folders are not entered and symlinked or special records files not read:
    history reads what is under `root`, nothing it points elsewhere.
    """
    return sorted(Path(folder) for folder, _, files in os.walk(root, followlinks=False)
                  if RECORDS_FILE in files and is_regular(Path(folder) / RECORDS_FILE))


def machine(record: dict) -> str:
    env = record.get("env") or {}
    device = env.get("device_name") if env.get("device") == "gpu" else env.get("device")
    return f"{env.get('hostname', '?')}: {env.get('cpu', '?')} x{env.get('cpu_count', '?')}, {device or '?'}"


def commit(record: dict) -> str:
    env = record.get("env") or {}
    sha = str(env.get("git_commit") or "unknown")[:8]
    return sha + ("-dirty" if env.get("git_dirty") else "")


def variant(record: dict) -> str:
    """What must match for two records to sit on one line: data, sizes, epochs, precision, mode, framework version."""
    d, env, spec = record.get("data") or {}, record.get("env") or {}, record.get("spec") or {}
    return (f"{data_label(d) or '? data'}, "
            f"{spec.get('epochs', '?')} epochs, {env.get('precision', '?')} {env.get('mode', '?')}, "
            f"{env.get('framework', '?')} {env.get('framework_version', '?')}")


def collect(root: Path) -> tuple[dict, list[str]]:
    """({(machine, task, backend, variant): {commit: [ok records]}}, commits oldest first)."""
    series: dict[tuple[str, str, str, str], dict[str, list[dict]]] = {}
    first_seen: dict[str, str] = {}
    for run in find_runs(root):
        for r in ok_records(read_records(run)):
            c = commit(r)
            when = str(r.get("started_at") or "")
            first_seen[c] = min(first_seen.get(c, when), when)
            key = (machine(r), str(r.get("task")), str(r.get("backend")), variant(r))
            series.setdefault(key, {}).setdefault(c, []).append(r)
    commits = sorted(first_seen, key=lambda c: (first_seen[c], c))
    return dict(sorted(series.items())), commits


def by_loss(series: dict) -> set:
    """The series keys of tasks judged by held-out loss."""
    return {k for k, by_commit in series.items() if judged_by_loss(r for rs in by_commit.values() for r in rs)}


def figures(series: dict, loss_keys: set) -> tuple:
    """(figure, label, format) followed across commits that some record of `series` has, the held-out loss
    where any series (of `loss_keys`, by_loss's) is judged by it: a loss-judged task's accuracy is a token
    accuracy that says less. A figure no record has (runs from before it was measured) gets no table or panel."""
    records = [r for by_commit in series.values() for rs in by_commit.values() for r in rs]
    return tuple((f.name, f.history, f.fmt) for f in followed(by_loss=bool(loss_keys))
                 if any(figure(r, f.name) is not None for r in records))


def render_markdown(series: dict, commits: list[str], root: Path) -> str:
    """Per machine and figure, one table: a row per task/backend/variant, a column per commit (oldest first)."""
    out = [f"# tribench history: {root}", "",
           f"{sum(len(v) for v in series.values())} (series, commit) points from {len(find_runs(root))} run(s). "
           "Cells: median over the ok repeats of every run at that commit, `[min\u2013max]` for 2-4 repeats, "
           "`(IQR)` from 5, `(n=1)` for one. Commits oldest first (by their first record); `-dirty`: uncommitted "
           "changes.", ""]
    machines = sorted({k[0] for k in series})
    loss_keys = by_loss(series)
    for m in machines:
        keys = [k for k in series if k[0] == m]
        used = [c for c in commits if any(c in series[k] for k in keys)]
        out += [f"## {m}", ""]
        for name, label, form in figures(series, loss_keys):
            rows = [k for k in keys if not BY_NAME[name].loss_only or k in loss_keys]
            if not rows:
                continue
            out += [f"### {label}", "", "| task | backend | data, epochs, precision, mode, version | " + " | ".join(
                f"`{c}`" for c in used) + " |", "|---|---|---|" + "---|" * len(used)]
            for k in rows:
                cells = [format_stat(summarise_figure(series[k].get(c, []), name), form) for c in used]
                out.append(f"| {k[1]} | {k[2]} | {k[3]} | " + " | ".join(cells) + " |")
            out.append("")
    return "\n".join(out)


LINESTYLES = ("-", "--", ":", "-.")


def plot_trends(series: dict, commits: list[str], path) -> str:  # path: a file name or a binary file
    """A row of panels per machine and task, a panel per figure: a line per backend/variant across commits.

    One machine per row keeps a laptop's and a GPU server's figures off one axis; each row has
    its own legend outside its panels, its lines in distinct colours.
    """
    from harness.plots import _pyplot, readable

    plt = _pyplot()
    rows = sorted({(k[0], k[1]) for k in series})
    loss_keys = by_loss(series)
    columns, loss_tasks = figures(series, loss_keys), {k[1] for k in loss_keys}
    fig, axes = plt.subplots(len(rows), len(columns), squeeze=False, layout="constrained",
                             figsize=(4.2 * len(columns) + 3.5, 3.4 * len(rows) + 0.6))
    cycle = plt.get_cmap("tab10")
    kinds = set()
    for row, (where, task) in zip(axes, rows):
        keys = [k for k in series if k[:2] == (where, task)]
        # Colours repeat only after ten lines in one row, and then with another line style.
        style = {k: {"color": cycle(i % 10), "linestyle": LINESTYLES[(i // 10) % len(LINESTYLES)]}
                 for i, k in enumerate(keys)}
        handles = {}
        for ax, (name, label, _) in zip(row, columns):
            if BY_NAME[name].loss_only and task not in loss_tasks:
                ax.set_visible(False)  # an accuracy-judged task: no loss panel
                continue
            scale = 100 if BY_NAME[name].fmt is percent else 1
            for key in keys:
                xs, ys, lo, hi = [], [], [], []
                for i, c in enumerate(commits):
                    s = summarise_figure(series[key].get(c, []), name)
                    if not s["n"]:
                        continue
                    kinds.add(spread_kind(s["n"]))
                    a, b = spread_interval(s)
                    xs.append(i)
                    ys.append(scale * s["median"])
                    lo.append(scale * (s["median"] - a))
                    hi.append(scale * (b - s["median"]))
                if xs:
                    handles[key] = ax.errorbar(xs, ys, yerr=[lo, hi], marker="o", capsize=3, linewidth=1.2,
                                               **style[key])
            ax.set_title(f"{task}: {label}\n{textwrap.fill(where, 60)}", fontsize=9)
            ax.set_xticks(range(len(commits)), commits, rotation=30, ha="right", fontsize=7)
            ax.set_xlim(-0.5, len(commits) - 0.5)
            ax.grid(alpha=0.3)
            readable(ax)
            if scale == 100:
                ax.set_ylabel("%")
        last = [ax for ax in row if ax.get_visible()][-1]
        last.legend([handles[k] for k in handles], [f"{k[2]} | {_short_variant(k[3])}" for k in handles],
                    loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize=7, frameon=False)
    fig.suptitle("tribench history: median per commit (oldest left), whiskers the spread of repeats", fontsize=12)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return (f"A row per machine and task, a panel per figure; medians over repeats per commit, whiskers the spread "
            f"({', '.join(sorted(kinds))}).")


def _short_variant(text: str) -> str:
    """A variant for a legend, wrapped at its commas so the legend stays narrow."""
    return textwrap.fill(text, 45, subsequent_indent="   ")


def write_history(root: Path, out: Path) -> list[Path]:
    """history.md and history.png for every run under `root`, into `out`; [] when no run has an ok record."""
    series, commits = collect(root)
    if not series:
        return []
    out.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    caption = plot_trends(series, commits, buffer)
    write_atomic(out / HISTORY_PNG, buffer.getvalue())
    text = render_markdown(series, commits, root) + f"\n![history]({HISTORY_PNG})\n\n{caption}\n"
    write_atomic(out / HISTORY_MD, text.encode())
    return [out / HISTORY_MD, out / HISTORY_PNG]
