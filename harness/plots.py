"""Matplotlib (Agg) PNG plots of a run: accuracy or held-out loss vs time, per-epoch curves, throughput, memory."""

from __future__ import annotations

import io
import itertools
import math
import multiprocessing
import textwrap
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

from harness.figures import DEVICE_PEAK, PEAK_RSS, RSS_AFTER_IMPORT, TRAIN_RATE, objective
from harness.run_config import available_cores
from harness.stats import (
    data_label,
    figure,
    group_cells,
    judged_by_loss,
    ok_records,
    primary_stage,
    spread_interval,
    spread_kind,
    stage_data,
    summarise_figure,
    target_loss,
)
from harness.storage import write_atomic

DPI = 110
# Overlaid backends with identical weights should draw on top of each other; distinct
# widths, dashes and markers keep every one visible when they coincide exactly.
STYLES = (
    {"linewidth": 5.0, "alpha": 0.45, "linestyle": "-", "marker": "o", "markersize": 9},
    {"linewidth": 2.2, "alpha": 0.95, "linestyle": "--", "marker": "s", "markersize": 5},
    {"linewidth": 1.4, "alpha": 1.0, "linestyle": ":", "marker": "^", "markersize": 4},
    {"linewidth": 1.0, "alpha": 1.0, "linestyle": "-.", "marker": "x", "markersize": 6},
)
COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b")


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # never needs a display, and is safe in a worker thread
    import matplotlib.pyplot as plt

    return plt


def _by_task(records):
    out: dict[str, list[dict]] = {}
    for r in ok_records(records):
        out.setdefault(str(r.get("task")), []).append(r)
    return out


def _stage_records(records: list[dict], stage: str) -> list[dict]:
    """The records as one stage sees them: that stage's metrics (epoch 0 its own start) and its data, named."""
    out = []
    for r in records:
        metrics = ((r.get("metrics") or {}).get("stages") or {}).get(stage)
        if metrics is not None:
            data = {**(r.get("data") or {}), **(((r.get("data") or {}).get("stages") or {}).get(stage) or {})}
            data["name"] = stage_data(r, stage, mark_synthetic=False)
            out.append({**r, "metrics": metrics, "data": data})
    return out


def _panels(records, *, every_stage: bool) -> dict[str, list[dict]]:
    """{panel title: records} per task; a staged task's primary stage (or each stage) on its own data, named."""
    out = {}
    for task, rs in _by_task(records).items():
        first = rs[0]
        primary = primary_stage(first)
        if primary is None or not any((r.get("metrics") or {}).get("stages") for r in rs):
            out[task] = rs
            continue
        names = [s.get("name") for s in first["spec"]["stages"]] if every_stage else [primary]
        for name in names:
            view = _stage_records(rs, name)
            if view:
                out[f"{task}, stage {name}"] = view
    return out


def _label(key) -> str:
    return f"{key[1]} ({key[2]})"


def _source(records) -> str:
    """Data source, sizes and devices of some records, for a title."""
    parts = []
    for r in records:
        text = data_label(r.get("data")) or "no"
        if text not in parts:
            parts.append(text)
    devices = sorted({str((r.get("env") or {}).get("device", "?")) for r in records})
    return f"{'; '.join(parts)} data, {', '.join(devices)}"


# Fixed margins in inches: a title of up to three lines above each panel, tick labels and an axis
# label left of and below it, the figure's title on top. Constrained layout would fit them to the
# text, at the price of drawing every panel twice (docs/modes.md).
TITLE_IN, SUPTITLE_IN, LEFT_IN, RIGHT_IN, BOTTOM_IN = 0.65, 0.45, 0.9, 0.25, 0.6
CHAR_IN = 0.07  # the mean width of a 9-point character


def _grid(plt, n_panels: int, *, rows_per_panel: int = 1, width: float = 5.2, height: float = 3.8):
    cols = min(n_panels, 3) if rows_per_panel == 1 else rows_per_panel
    rows = math.ceil(n_panels / cols) if rows_per_panel == 1 else n_panels
    fig_w, fig_h = width * cols, height * rows + SUPTITLE_IN
    fig, axes = plt.subplots(rows, cols, figsize=(fig_w, fig_h), squeeze=False)
    panel_w, panel_h = width - LEFT_IN - RIGHT_IN, height - TITLE_IN - BOTTOM_IN
    fig.subplots_adjust(left=LEFT_IN / fig_w, right=1 - RIGHT_IN / fig_w, bottom=BOTTOM_IN / fig_h,
                        top=1 - (SUPTITLE_IN + TITLE_IN) / fig_h, wspace=(LEFT_IN + RIGHT_IN) / panel_w,
                        hspace=(TITLE_IN + BOTTOM_IN) / panel_h)
    return fig, axes


def _title(ax, head: str, records):
    """A panel's title: what it shows, then its data and devices wrapped to the panel's width."""
    inches = ax.get_position().width * ax.figure.get_figwidth()
    ax.set_title(f"{head}\n{textwrap.fill(_source(records), max(int(inches / CHAR_IN), 20))}", fontsize=9)


def _suptitle(fig, text: str, fontsize: float = 12):
    """The figure's title in the band above the panels' titles, whatever the figure's height."""
    fig.suptitle(text, fontsize=fontsize, y=1 - 0.1 / fig.get_figheight(), va="top")


def readable(ax, *, xs=None):
    """Tick labels read at face value: no offset (`1e-6+8.3075e-1`), and a flat curve drawn flat.

    Identical backends give values equal to float precision; autoscaling would stretch that
    1e-7 span over the whole axis and make them look different. `xs`: epochs, kept off the edges.
    """
    from matplotlib.ticker import ScalarFormatter

    for axis in (ax.xaxis, ax.yaxis):
        formatter = axis.get_major_formatter()
        if isinstance(formatter, ScalarFormatter):  # not fixed labels such as commit names
            formatter.set_useOffset(False)
            formatter.set_scientific(False)
    ys = [y for line in ax.get_lines() for y in line.get_ydata() if math.isfinite(y)]
    if ys and max(ys) - min(ys) <= 1e-3 * max(abs(max(ys)), abs(min(ys)), 1e-12):
        centre = (max(ys) + min(ys)) / 2
        pad = max(abs(centre) * 0.02, 0.01)
        ax.set_ylim(centre - pad, centre + pad)
    if xs:
        from matplotlib.ticker import MaxNLocator

        ax.set_xlim(min(xs) - 0.3, max(xs) + 0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))


def _hide_unused(axes, used: int):
    for ax in axes.flat[used:]:
        ax.set_visible(False)


class _Metric:
    """What a task's records are judged by: test accuracy (higher is better) or held-out loss (lower is better)."""

    def __init__(self, records: list[dict]):
        self.loss = judged_by_loss(records)
        judged = objective(by_loss=self.loss)
        self.name, self.series, self.initial = judged.name, judged.series, f"initial_{judged.name}"
        if self.loss:
            self.scale, self.label, unit = 1.0, "held-out loss (nats, lower is better)", " nats"
            self.title = "held-out loss"
            target = target_loss(records)
        else:
            self.scale, self.label, self.title, unit = 100.0, "test accuracy (%)", "test accuracy", "%"
            target = (records[0].get("spec") or {}).get("target_accuracy") if records else None
        self.target = None if target is None else self.scale * target
        self.target_label = None if target is None else f"target {self.target:g}{unit}"
        # Where the curves are not late in training: low for accuracy, high for a falling loss.
        self.legend_at = "upper right" if self.loss else "lower right"


def _median_repeat(records: list[dict]) -> dict:
    """The repeat whose final test accuracy (loss-judged: held-out loss) is the median (lower middle for even n)."""
    name = _Metric(records).name
    ranked = sorted(records, key=lambda r: (figure(r, name) or 0.0, r.get("repeat") or 0))
    return ranked[(len(ranked) - 1) // 2]


def _metric_points(record: dict, metric: _Metric) -> tuple[list[float], list[float], list[float]]:
    """(epochs, cumulative training s, the task's metric in plot units) at each evaluation, epoch 0 included."""
    m = record.get("metrics") or {}
    values = list(m.get(metric.series) or [])
    times = list(m.get("epoch_train_time_s") or [])
    epochs, ts, ys = [], [], []
    if m.get(metric.initial) is not None:
        epochs.append(0)
        ts.append(0.0)
        ys.append(metric.scale * m[metric.initial])
    for epoch, v in enumerate(values, start=1):  # the loop evaluates after every epoch
        if v is None:
            continue
        epochs.append(epoch)
        ts.append(times[epoch - 1] if epoch - 1 < len(times) else float("nan"))
        ys.append(metric.scale * v)
    return epochs, ts, ys


def _shared_repeat(groups) -> int | None:
    """The repeat drawn bold for every backend: the median repeat (by final accuracy) of the first backend.

    Repeat r of every backend has the same seed, weights and batch order, so drawing the
    same r for all is what lets their curves coincide; each backend's own median repeat
    could be a different seed per backend.
    """
    first = next(iter(groups.values()), None)
    return _median_repeat(first).get("repeat") if first else None


def _bold(cell: list[dict], repeat: int | None) -> dict:
    """The record of `repeat` in this cell, or the cell's median repeat where that repeat is missing."""
    return next((r for r in cell if r.get("repeat") == repeat), None) or _median_repeat(cell)


def _repeat_note(by_task: dict[str, dict]) -> str:
    """The caption's words on repeats: which repeat is bold in each task's panel, and why."""
    n = max((len(rs) for groups in by_task.values() for rs in groups.values()), default=1)
    if n <= 1:
        return "one repeat per backend"
    bold = ", ".join(f"{task}: repeat {_shared_repeat(groups)} (median of {next(iter(groups))[1]}"
                     f"{' by held-out loss' if _Metric(_flat(groups)).loss else ''})"
                     for task, groups in by_task.items())
    return (f"bold line: the same repeat for every backend (same seed, weights and batch order), the median repeat "
            f"by final accuracy (loss-judged tasks: held-out loss) of the first backend; {bold}; "
            "thin lines: the other repeats")


def _flat(groups: dict) -> list[dict]:
    return [r for cell in groups.values() for r in cell]


def plot_accuracy_vs_time(records, path) -> str:  # path: a file name or a binary file
    """Test accuracy (loss-judged tasks: held-out loss) against cumulative training time, a line per backend,
    a panel per task, the task's target drawn."""
    plt = _pyplot()
    tasks = _panels(records, every_stage=False)
    fig, axes = _grid(plt, len(tasks))
    colors = _colors(records)
    shown: dict[str, dict] = {}
    losses = []
    for ax, (task, rs) in zip(axes.flat, tasks.items()):
        groups = group_cells(rs)
        shown[task] = groups
        metric = _Metric(rs)
        if metric.loss:
            losses.append(task)
        for key, cell in groups.items():
            color = colors[key[1:]]
            best = _bold(cell, _shared_repeat(groups))
            for r in cell:
                _, ts, ys = _metric_points(r, metric)
                main = r is best
                ax.plot(ts, ys, color=color, marker="o" if main else None, markersize=4,
                        linewidth=2.0 if main else 0.8, alpha=1.0 if main else 0.35,
                        label=f"{_label(key)}, n={len(cell)}" if main else None)
        if metric.target:
            ax.axhline(metric.target, color="grey", linestyle="--", linewidth=1, label=metric.target_label)
        _title(ax, task, rs)
        ax.set_xlabel("cumulative training time (s, evaluation excluded)")
        ax.set_ylabel(metric.label)
        ax.grid(alpha=0.3)
        readable(ax)
        ax.legend(fontsize=8, loc=metric.legend_at)
    _hide_unused(axes, len(tasks))
    title = ("Held-out loss vs training time" if len(losses) == len(tasks) else
             "Test accuracy vs training time" if not losses else "Test accuracy / held-out loss vs training time")
    _suptitle(fig, title)
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    judged = (f"; {', '.join(losses)}: held-out loss in nats, lower is better, the dashed line the target loss"
              if losses else "")
    return (f"Test accuracy against cumulative training time per backend{judged} ({_repeat_note(shown)}; the first "
            "point is the model before training; a staged task shows its primary stage, on that stage's data).")


def plot_epoch_curves(records, path) -> str:  # path: a file name or a binary file
    """Training loss and test accuracy per epoch, backends overlaid: the picture of parity."""
    plt = _pyplot()
    tasks = _panels(records, every_stage=True)
    fig, axes = _grid(plt, len(tasks), rows_per_panel=2, width=5.6, height=3.6)
    colors = _colors(records)
    shown: dict[str, dict] = {}
    for row, (task, rs) in zip(axes, tasks.items()):
        groups = group_cells(rs)
        shown[task] = groups
        loss_ax, acc_ax = row
        metric = _Metric(rs)
        xs = []
        for i, (key, cell) in enumerate(groups.items()):
            style = STYLES[i % len(STYLES)]
            color = colors[key[1:]]
            best = _bold(cell, _shared_repeat(groups))
            for r in cell:
                main = r is best
                kw = dict(style, color=color) if main else {"color": color, "linewidth": 0.7, "alpha": 0.3}
                label = f"{_label(key)}, n={len(cell)}" if main else None
                loss = (r.get("metrics") or {}).get("epoch_train_loss") or []
                loss_ax.plot(range(1, len(loss) + 1), loss, label=label, **kw)
                epochs, _, ys = _metric_points(r, metric)
                acc_ax.plot(epochs, ys, label=label, **kw)
                xs += [*epochs, len(loss)]
        if metric.loss and metric.target:
            acc_ax.axhline(metric.target, color="grey", linestyle="--", linewidth=1, label=metric.target_label)
        for ax, ylabel in ((loss_ax, "training loss (cross-entropy, epoch mean)"), (acc_ax, metric.label)):
            ax.set_xlabel("epoch")
            ax.set_ylabel(ylabel)
            ax.grid(alpha=0.3)
            readable(ax, xs=[x for x in xs if ax is acc_ax or x >= 1])
            ax.legend(fontsize=8)
        _title(loss_ax, f"{task}: training loss", rs)
        _title(acc_ax, f"{task}: {metric.title}", rs)
    _suptitle(fig, "Per-epoch curves, backends overlaid (same weights and batch order: curves should coincide)",
              fontsize=11)
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    losses = [task for task, groups in shown.items() if _Metric(_flat(groups)).loss]
    judged = (f"test accuracy ({', '.join(losses)}: held-out loss, lower is better, the dashed line the target)"
              if losses else "test accuracy")
    return (f"Training loss and {judged} per epoch with the backends overlaid; with identical initial "
            f"weights and batch order the curves should lie on each other ({_repeat_note(shown)}).")


def _bars(ax, labels, summaries, *, offset=0.0, width=0.8, color=None, hatch=None, label=None):
    """Bars at the medians with the spread as error bars, and n written above each bar."""
    xs = [i + offset for i in range(len(labels))]
    heights, lower, upper = [], [], []
    for s in summaries:
        med = s["median"] if s["n"] else 0.0
        lo, hi = spread_interval(s) or (med, med)
        heights.append(med)
        lower.append(max(med - lo, 0.0))
        upper.append(max(hi - med, 0.0))
    ax.bar(xs, heights, width=width, color=color, hatch=hatch, edgecolor="black", linewidth=0.5, label=label,
           yerr=[lower, upper], capsize=4, error_kw={"elinewidth": 1.2})
    for x, h, up, s in zip(xs, heights, upper, summaries):
        if not s["n"]:
            continue  # no bar (e.g. no device memory on a CPU): nothing to label
        ax.annotate(f"n={s['n']}", (x, h + up), textcoords="offset points", xytext=(0, 3), ha="center", fontsize=7)


def _headroom(ax):
    """Room above the tallest bar for its n label and the legend, and thousands separators."""
    from matplotlib.ticker import StrMethodFormatter

    ax.set_ylim(0, ax.get_ylim()[1] * 1.4)
    ax.yaxis.set_major_formatter(StrMethodFormatter("{x:,.0f}"))


def _colors(records) -> dict:
    """One colour per cell label across every panel of a figure, so a backend keeps its colour."""
    labels = sorted({(k[1], k[2]) for k in group_cells(ok_records(records))})
    return {lab: COLORS[i % len(COLORS)] for i, lab in enumerate(labels)}


def plot_throughput(records, path) -> str:  # path: a file name or a binary file
    """Training throughput per backend: median bars with the spread as error bars."""
    plt = _pyplot()
    tasks = _panels(records, every_stage=False)
    colors = _colors(records)
    fig, axes = _grid(plt, len(tasks), width=4.8)
    kinds = set()
    for ax, (task, rs) in zip(axes.flat, tasks.items()):
        groups = group_cells(rs)
        labels = [_label(k) for k in groups]
        sums = [summarise_figure(c, TRAIN_RATE.name) for c in groups.values()]
        kinds.update(spread_kind(s["n"]) for s in sums)
        _bars(ax, labels, sums, color=[colors[k[1:]] for k in groups], label="median; whiskers: spread")
        ax.set_xticks(range(len(labels)), labels, rotation=20, ha="right", fontsize=8)
        ax.set_ylabel("training throughput (samples/s, steady state)")
        _title(ax, task, rs)
        _headroom(ax)
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=8, loc="upper right", handlelength=0, handletextpad=0)
    _hide_unused(axes, len(tasks))
    _suptitle(fig, "Training throughput")
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return ("Training throughput (steady state, warm-up excluded): bars are medians over repeats, whiskers the "
            f"spread ({', '.join(sorted(kinds))}).")


def plot_memory(records, path) -> str:  # path: a file name or a binary file
    """Peak host RSS, RSS after import and device peak per backend, grouped bars with spread."""
    plt = _pyplot()
    tasks = _panels(records, every_stage=False)
    fig, axes = _grid(plt, len(tasks), width=5.0)
    series = ((PEAK_RSS.name, "peak host RSS", None, "#4c72b0"),
              (RSS_AFTER_IMPORT.name, "host RSS after import", "//", "#a6bddb"),
              (DEVICE_PEAK.name, "device peak (allocator)", "..", "#dd8452"))
    for ax, (task, rs) in zip(axes.flat, tasks.items()):
        groups = group_cells(rs)
        labels = [_label(k) for k in groups]
        present = [s for s in series if any(summarise_figure(c, s[0])["n"] for c in groups.values())]
        width = 0.8 / max(len(present), 1)
        for j, (name, label, hatch, color) in enumerate(present):
            sums = [summarise_figure(c, name) for c in groups.values()]
            _bars(ax, labels, sums, offset=(j - (len(present) - 1) / 2) * width, width=width, color=color,
                  hatch=hatch, label=label)
        ax.set_xticks(range(len(labels)), labels, rotation=20, ha="right", fontsize=8)
        ax.set_ylabel("memory (MiB)")
        _title(ax, task, rs)
        _headroom(ax)
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=7, loc="upper center", ncol=min(len(present), 2), columnspacing=1.0)
    _hide_unused(axes, len(tasks))
    _suptitle(fig, "Peak memory")
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return ("Peak memory per backend: host RSS (sampled during training and ru_maxrss), the RSS right after "
            "importing the framework, and the device allocator's peak where a GPU was used; whiskers are the spread.")


PLOTS = (
    ("accuracy_vs_time.png", plot_accuracy_vs_time),
    ("epoch_curves.png", plot_epoch_curves),
    ("throughput.png", plot_throughput),
    ("memory.png", plot_memory),
)


def write_plots(records, run_dir: Path) -> list[tuple[Path, str]]:
    """Every plot of the ok records into `run_dir`, as (path, caption) pairs; none when nothing succeeded."""
    if not ok_records(records):
        return []
    run_dir = Path(run_dir)
    out = []
    for (name, _), (png, caption) in zip(PLOTS, _drawn(records)):
        # Drawn in memory and written in one checked, atomic write: a full disk leaves no 0-byte PNG.
        write_atomic(run_dir / name, png)
        out.append((run_dir / name, caption))
    return out


def _draw(index: int, records) -> tuple[bytes, str]:
    """PLOTS[index] drawn in memory: (PNG bytes, caption)."""
    buffer = io.BytesIO()
    caption = PLOTS[index][1](records, buffer)
    return buffer.getvalue(), caption


def _drawn(records) -> list[tuple[bytes, str]]:
    """Every plot drawn, side by side in processes where there are cores for them (docs/modes.md:
    on 2 cores a --quick run's four take ~10 s in one process, ~4 s in two)."""
    workers = min(len(PLOTS), available_cores())
    if workers > 1:
        # Forked from a fresh server process, not from this one: a process that has imported a
        # framework (a test, a notebook) holds threads a fork would copy mid-lock.
        if "forkserver" in multiprocessing.get_all_start_methods():
            context = multiprocessing.get_context("forkserver")
            context.set_forkserver_preload([__name__])  # imported once in the server, not in every child
        else:
            context = multiprocessing.get_context("spawn")
        try:
            with ProcessPoolExecutor(workers, mp_context=context) as pool:
                return list(pool.map(_draw, range(len(PLOTS)), itertools.repeat(records)))
        except (OSError, BrokenProcessPool):  # no process to be had (a process limit), or one died: drawn here
            pass
    return [_draw(index, records) for index in range(len(PLOTS))]
